"""Step 1-2 of the miniature reproduction: a small decoder learns, from scratch, to answer from uncompressed
documents in the generator's prompt format; it then serves as the generator's base and as the teacher.
"""

import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from ..configuration_scaledown import DEFAULT_SYSTEM_PROMPT
from ..modeling_scaledown import text_prompt


def tokenize_full_text(tokenizer, examples: list[dict], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Each example as token ids: uncompressed prompt, and answer + EOS. Done once, in batches (the fast tokenizer
    runs them in parallel), so that training steps only pad; tokenising in every batch held the GPU back."""
    prompts = [text_prompt(tokenizer, e["question"], e["documents"], system_prompt) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [{"prompt": p, "answer": a + [eos]} for p, a in zip(prompt_ids, answer_ids)]


class FullTextCollator:
    """Pads tokenised examples (`tokenize_full_text`) on the left, the layout generation uses; labels on the
    answer only."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = [e["prompt"] + e["answer"] for e in examples]
        labels = [[-100] * len(e["prompt"]) + e["answer"] for e in examples]
        width = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([[self.pad_token_id] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            "labels": torch.tensor([[-100] * (width - len(r)) + r for r in labels]),
        }


def loader_workers(device) -> int:
    """Data-loader processes: building prompts is Python work that would starve a GPU; on CPU it competes."""
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


def pretrain_generator(
    generator_dir: str,
    examples: list[dict],
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[float]:
    """Fully train the (randomly initialised) decoder saved in `generator_dir` to answer from full text; save it back.

    Returns the loss per step. Position ids follow the attention mask, as in generation with left padding.
    """
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(generator_dir)
    model = AutoModelForCausalLM.from_pretrained(generator_dir).to(device).train()
    workers = loader_workers(device)
    loader = DataLoader(
        tokenize_full_text(tokenizer, examples),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=FullTextCollator(tokenizer.pad_token_id),
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    device_type = torch.device(device).type
    started = time.time()
    losses = []
    progress = tqdm(total=steps, desc="teacher pretraining")
    while len(losses) < steps:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            # bf16 autocast on a GPU (float32 master weights): several times the step rate of float32 matmuls
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                loss = model(**batch, position_ids=position_ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            if len(losses) % max(1, steps // 10) == 0:  # a trace that survives in plain logs
                recent = losses[-20:]
                print(f"teacher step {len(losses)}/{steps}: loss {sum(recent) / len(recent):.3f} "
                      f"({time.time() - started:.0f} s)", flush=True)  # fmt: skip
            if len(losses) >= steps:
                break
    progress.close()
    model.save_pretrained(generator_dir)
    return losses


@torch.no_grad()
def teacher_answers(
    generator_dir: str, examples: list[dict], batch_size: int = 64, max_new_tokens: int = 16, device="cpu"
) -> list[str]:
    """Greedy answers of the full-text teacher: the sequence-level distillation targets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(generator_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(generator_dir).to(device).eval()
    answers = []
    for start in tqdm(range(0, len(examples), batch_size), desc="teacher answers"):
        chunk = examples[start : start + batch_size]
        prompts = [text_prompt(tokenizer, e["question"], e["documents"]) for e in chunk]
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
