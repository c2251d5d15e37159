"""Teacher answers: a causal LM answers each question from its uncompressed top documents (sequence-level
distillation: OSCAR trains on these answers, never on gold labels).

The prompt is `scaledown.modeling_scaledown.text_prompt`, the very prompt the compressed model is trained on
with the documents in clear. It goes through the teacher's chat template, so a teacher tokenizer without one
needs ``--prompt_template``: a Jinja chat template (inline or a file path) that receives the usual system and
user messages, or ``plain`` for ScaleDown's built-in plain layout (what a generator without a chat template is
trained on).

Generation is greedy with at most 128 new tokens, through vLLM when it is installed and a GPU is present, else
through batched transformers `generate` with left padding (questions sorted by prompt length, so that a batch
holds prompts of similar length).
"""

import importlib.util
import logging
import os

from ..configuration_scaledown import DEFAULT_SYSTEM_PROMPT
from ..modeling_scaledown import text_prompt
from .shards import batched

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "mistralai/Mistral-7B-Instruct-v0.2"
MAX_NEW_TOKENS = 128
PLAIN_PROMPT = "plain"
BACKENDS = ("auto", "transformers", "vllm")


def apply_prompt_template(tokenizer, prompt_template: str | None, teacher_name: str) -> None:
    """Give the tokenizer the chat template its prompts are built with, or fail clearly when it has none."""
    if prompt_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"The teacher {teacher_name} has no chat template, so its prompt would not match what a chat model "
                "expects. Pass --prompt_template with a Jinja chat template (inline or a file path), or "
                f"--prompt_template {PLAIN_PROMPT} for ScaleDown's plain prompt layout."
            )
        return
    if prompt_template == PLAIN_PROMPT:
        tokenizer.chat_template = None  # text_prompt falls back to its plain layout
        return
    if os.path.isfile(prompt_template):
        with open(prompt_template, encoding="utf-8") as handle:
            prompt_template = handle.read()
    if getattr(tokenizer, "chat_template", None):
        logger.warning("--prompt_template replaces the chat template of %s.", teacher_name)
    tokenizer.chat_template = prompt_template


def check_prompt_template(name_or_path: str, prompt_template: str | None) -> None:
    """Fail at start-up, not after retrieval, for a teacher whose prompt cannot be built."""
    from transformers import AutoTokenizer

    apply_prompt_template(AutoTokenizer.from_pretrained(name_or_path), prompt_template, name_or_path)


def prompt_ids(tokenizer, rows: list[dict], system_prompt: str) -> list[list[int]]:
    """Token ids of each row's prompt. The rendered prompt already holds BOS where the template puts one."""
    prompts = [text_prompt(tokenizer, row["question"], row["documents"], system_prompt) for row in rows]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


class TransformersTeacher:
    """Batched greedy generation with transformers (left padding)."""

    def __init__(
        self,
        name_or_path: str,
        device: str | None = None,
        dtype=None,
        batch_size: int = 16,
        max_new_tokens: int = MAX_NEW_TOKENS,
        prompt_template: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        apply_prompt_template(self.tokenizer, prompt_template, name_or_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:  # Mistral and Llama ship without one; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto").to(self.device).eval()
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        self.batch_size = batch_size
        self.system_prompt = system_prompt

    def answer(self, rows: list[dict]) -> list[str]:
        import torch

        ids = prompt_ids(self.tokenizer, rows, self.system_prompt)
        answers = [""] * len(rows)
        by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for batch in batched(by_length, self.batch_size):
            inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            with torch.inference_mode():
                output = self.model.generate(**inputs, generation_config=self.generation_config)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(batch, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text.strip()
        return answers


class VllmTeacher:
    """Greedy generation with vLLM, from the same prompt token ids."""

    def __init__(
        self,
        name_or_path: str,
        dtype: str = "auto",
        max_new_tokens: int = MAX_NEW_TOKENS,
        prompt_template: str | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        apply_prompt_template(self.tokenizer, prompt_template, name_or_path)
        self.llm = LLM(model=name_or_path, dtype=dtype, seed=0)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.system_prompt = system_prompt

    def answer(self, rows: list[dict]) -> list[str]:
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(self.tokenizer, rows, self.system_prompt)]
        outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]


def vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load_teacher(
    name_or_path: str,
    backend: str = "auto",
    device: str | None = None,
    dtype=None,
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    prompt_template: str | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
):
    if backend not in BACKENDS:
        raise ValueError(f"Unknown teacher backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ImportError("--teacher_backend vllm needs vLLM: pip install 'scaledown[vllm]' (best in its own venv).")
    if backend == "vllm" or (backend == "auto" and vllm_usable()):
        vllm_dtype = str(dtype).removeprefix("torch.") if dtype is not None else "auto"
        return VllmTeacher(name_or_path, vllm_dtype, max_new_tokens, prompt_template, system_prompt)
    return TransformersTeacher(name_or_path, device, dtype, batch_size, max_new_tokens, prompt_template, system_prompt)
