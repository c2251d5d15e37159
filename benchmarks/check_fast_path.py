"""Does the fast engine compute what transformers' `generate` computes? Logits and greedy tokens, both sides.

    python benchmarks/check_fast_path.py --shape mistral-7b --compressor 8l --batch_size 4 [--compile]

Random weights of the real shape (no download). Prints, per side, the largest logit difference over the steps whose
prefix is the same on both paths, relative to the logits' spread, and how many greedy tokens agree before the first
divergence (bf16 kernels differ in summation order, so late divergences between near-tied logits are expected).
"""

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype, tokenize_text_prompts
from scaledown.fast_generation import (
    StaticGreedyGenerator,
    compile_compressor,
    compile_elementwise_work,
    generate_compressed,
)
from scaledown.modeling_scaledown import text_prompt


def agreement(fast: torch.Tensor, plain: torch.Tensor) -> float:
    """Mean fraction of each row's tokens that agree before its first divergence."""
    same = (fast[:, : plain.shape[1]] == plain).cumprod(-1)
    return same.float().mean().item()


def compare(name, fast_tokens, fast_scores, plain) -> dict:
    """Logits are compared at every step whose prefix is the same on both paths (up to and including the step of a
    row's first divergence), so decode steps are judged too, not only the prefill's first token."""
    plain_scores = torch.stack(plain.scores, 1).float()  # (batch, steps, vocab); min_new_tokens set EOS to -inf
    new = plain.sequences[:, -len(plain.scores) :]
    same = (fast_tokens[:, : new.shape[1]] == new).long()
    same_prefix = torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], 1).cumprod(-1).bool()  # (batch, steps)
    finite = torch.isfinite(plain_scores) & same_prefix[..., None]
    difference = (fast_scores[:, : plain_scores.shape[1]] - plain_scores)[finite].abs().max().item()
    spread = plain_scores[finite].std().item()
    row = {"side": name, "max_abs_logit_diff": difference, "logit_std": spread, "relative": difference / spread,
           "steps_compared": int(same_prefix.sum()), "greedy_agreement": agreement(fast_tokens, new)}  # fmt: skip
    print(f"{name:>12}: max |dlogit| {difference:.4f} over {row['steps_compared']} steps with equal prefixes "
          f"(logit std {spread:.3f}, relative {difference / spread:.4f}); greedy tokens agreeing before the first "
          f"divergence: {row['greedy_agreement']:.3f}")  # fmt: skip
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
    text_inputs = tokenize_text_prompts(tokenizer, prompts, device)
    models = {
        name: bench.build_random_scaledown(
            name, generator, tokenizer, args.shape, protocol, device, dtype, args.attn_implementation
        )
        for name in names
    }
    batches = {
        name: {k: v.to(device) for k, v in model.input_builder(questions, documents).items()}
        for name, model in models.items()
    }
    with torch.no_grad():  # the reference: transformers' generate, eager, before anything is compiled
        plain = {"uncompressed": generator.generate(**text_inputs, **greedy)}
        plain.update({name: model.generate(**batches[name], **greedy) for name, model in models.items()})
    if args.compile:
        print(f"generator: compiled {compile_elementwise_work(generator)}")
        for name, model in models.items():
            print(f"{name} compressor: compiled {compile_compressor(model)}")

    tokens, scores = StaticGreedyGenerator(generator).generate(
        **text_inputs, max_new_tokens=steps, pad_token_id=pad, return_scores=True
    )
    compare("uncompressed", tokens, scores, plain["uncompressed"])
    for name, model in models.items():
        tokens, scores = generate_compressed(
            model, batches[name], StaticGreedyGenerator(model.generator), steps, stop_at_eos=False, return_scores=True
        )
        compare(name, tokens, scores, plain[name])

if __name__ == "__main__":
    main()
