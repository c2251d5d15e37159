"""Does the fast engine compute what transformers' `generate` computes? Logits and greedy tokens, both sides.

    python benchmarks/check_fast_path.py --shape mistral-7b --compressor 8l --batch_size 4

Random weights of the real shape (no download). Prints, per side, the largest logit difference at the first step
(same prefix on both paths) relative to the logits' spread, and how many greedy tokens agree before the first
divergence (bf16 kernels differ in summation order, so late divergences between near-tied logits are expected).
"""

import argparse

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype, tokenize_text_prompts
from scaledown.fast_generation import StaticGreedyGenerator, generate_compressed
from scaledown.modeling_scaledown import text_prompt


def agreement(fast: torch.Tensor, plain: torch.Tensor) -> float:
    """Mean fraction of each row's tokens that agree before its first divergence."""
    same = (fast[:, : plain.shape[1]] == plain).cumprod(-1)
    return same.float().mean().item()


def compare(name, fast_tokens, fast_scores, plain) -> dict:
    first_plain = plain.scores[0].float()  # (batch, vocab); min_new_tokens set EOS to -inf
    finite = torch.isfinite(first_plain)
    difference = (fast_scores[:, 0] - first_plain)[finite].abs().max().item()
    spread = first_plain[finite].std().item()
    new = plain.sequences[:, -len(plain.scores) :]
    row = {"side": name, "max_abs_logit_diff": difference, "logit_std": spread, "relative": difference / spread,
           "greedy_agreement": agreement(fast_tokens, new)}  # fmt: skip
    print(f"{name:>12}: max |dlogit| {difference:.4f} (logit std {spread:.3f}, relative {difference / spread:.4f}); "
          f"greedy tokens agreeing before the first divergence: {row['greedy_agreement']:.3f}")  # fmt: skip
    return row


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, generator, tokenizer, system_prompt, _, names, protocol = bench._load_models(args, device, dtype, print)
    questions, documents = bench.synthetic_requests(tokenizer, protocol, args.batch_size, seed=args.seed)
    steps, pad = protocol.new_tokens, tokenizer.pad_token_id
    greedy = dict(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=pad,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip

    prompts = [text_prompt(tokenizer, q, docs, system_prompt) for q, docs in zip(questions, documents)]
    inputs = tokenize_text_prompts(tokenizer, prompts, device)
    with torch.no_grad():
        plain = generator.generate(**inputs, **greedy)
    tokens, scores = StaticGreedyGenerator(generator).generate(
        **inputs, max_new_tokens=steps, pad_token_id=pad, return_scores=True
    )
    compare("uncompressed", tokens, scores, plain)
    for name in names:
        model = bench.build_random_scaledown(
            name, generator, tokenizer, args.shape, protocol, device, dtype, args.attn_implementation
        )
        batch = {k: v.to(device) for k, v in model.input_builder(questions, documents).items()}
        with torch.no_grad():
            plain = model.generate(**batch, **greedy)
        tokens, scores = generate_compressed(
            model, batch, StaticGreedyGenerator(model.generator), steps, stop_at_eos=False, return_scores=True
        )
        compare(name, tokens, scores, plain)


if __name__ == "__main__":
    main()
