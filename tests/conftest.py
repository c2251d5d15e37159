"""Tiny local models for the test suite: nothing here touches the Hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from scaledown import ScaleDownConfig, ScaleDownForCausalLM
from scaledown.toy_models import build_causal_lm, build_encoder, build_tokenizer

CORPUS = [
    "The capital of France is Paris, a city on the Seine.",
    "William Shakespeare wrote Hamlet around the year 1600.",
    "Question: who wrote it? Answer: the author. Document: background text about people and places.",
    "Marie Curie was born in Warsaw in 1867 and worked in Paris.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


@pytest.fixture(scope="session")
def decoder_tokenizer():
    return build_tokenizer(CORPUS * 4, vocab_size=400)


@pytest.fixture(scope="session")
def encoder_tokenizer():
    return build_tokenizer(CORPUS * 4, vocab_size=400, kind="encoder")


@pytest.fixture(scope="session")
def generator_dirs(tmp_path_factory, decoder_tokenizer):
    root = tmp_path_factory.mktemp("generators")
    return {
        arch: build_causal_lm(str(root / arch), decoder_tokenizer, architecture=arch, num_layers=3)
        for arch in ("llama", "mistral", "qwen2")
    }


@pytest.fixture(scope="session")
def modernbert_dir(tmp_path_factory, encoder_tokenizer):
    return build_encoder(str(tmp_path_factory.mktemp("modernbert") / "enc"), encoder_tokenizer)


@pytest.fixture
def make_model(generator_dirs):
    def make(arch="llama", seed=0, **overrides):
        options = dict(generator_name_or_path=generator_dirs[arch], num_compressor_layers=2)
        options.update(overrides)
        torch.manual_seed(seed)
        return ScaleDownForCausalLM(ScaleDownConfig(**options)).eval()

    return make


QUESTIONS = ["Who wrote Hamlet?", "Where was Marie Curie born?", "What is the capital of France?"]
DOCUMENTS = [
    ["William Shakespeare wrote Hamlet.", "The fox jumps.", "Paris is on the Seine."],
    ["Marie Curie was born in Warsaw."],
    [],
]
ANSWERS = ["Shakespeare", "Warsaw", "Paris"]
