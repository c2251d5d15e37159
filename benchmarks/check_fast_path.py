"""Does the fast engine compute what transformers' `generate` computes? Logits and greedy tokens, both sides.

    python benchmarks/check_fast_path.py --shape mistral-7b --compressor 8l --batch_size 4 [--compile] [--float32_reference]
        [--stack_projections] [--fuse_residual_norms] [--fused_decode]

Random weights of the real shape (no download). Prints, per side, the largest and mean logit difference over the
steps whose prefix is the same on both paths, and how many greedy tokens agree before the first divergence (bf16
kernels differ in summation order, so divergences between near-tied logits are expected). With --float32_reference
both paths are also compared with the plain path on float32 weights: the fast path is within bf16 tolerance when its
distance from float32 is that of plain bf16.
"""

from copy import deepcopy

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


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean fraction of each row's tokens that agree before its first divergence."""
    same = (tokens[:, : reference.shape[1]] == reference).cumprod(-1)
    return same.float().mean().item()


def plain_outputs(output) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate`'s new tokens `(batch, steps)` and float32 logits `(batch, steps, vocab)`."""
    return output.sequences[:, -len(output.scores) :], torch.stack(output.scores, 1).float()


def compare(name: str, tokens, scores, reference_tokens, reference_scores) -> dict:
    """Logits are compared at every step whose prefix is the same on both paths (up to and including the step of a
    row's first divergence), so decode steps are judged too, not only the prefill's first token."""
    steps = reference_scores.shape[1]
    same = (tokens[:, :steps] == reference_tokens).long()
    same_prefix = torch.cat([torch.ones_like(same[:, :1]), same[:, :-1]], 1).cumprod(-1).bool()  # (batch, steps)
    compared = torch.isfinite(reference_scores) & same_prefix[..., None]  # min_new_tokens set EOS to -inf
    difference = (scores[:, :steps].float() - reference_scores)[compared].abs()
    spread = reference_scores[compared].std().item()
    row = {"side": name, "max_abs_logit_diff": difference.max().item(), "mean_abs_logit_diff": difference.mean().item(),
           "logit_std": spread, "steps_compared": int(same_prefix.sum()),
           "greedy_agreement": agreement(tokens, reference_tokens)}  # fmt: skip
    print(f"{name:>32}: |dlogit| max {row['max_abs_logit_diff']:.4f} mean {row['mean_abs_logit_diff']:.5f} over "
          f"{row['steps_compared']} steps with equal prefixes (logit std {spread:.3f}); greedy tokens agreeing "
          f"before the first divergence: {row['greedy_agreement']:.3f}", flush=True)  # fmt: skip
    return row


def float32_reference(module, generate) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate` run on a float32 copy of `module` (made and freed here): what bf16 rounding is measured against."""
    copy = deepcopy(module).float()
    with torch.no_grad():
        output = plain_outputs(generate(copy))
    device = copy.device
    del copy
    bench._free_memory(device)
    return output


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--float32_reference",
        action="store_true",
        help="also compare both paths with the plain path on float32 copies of the weights: the size of bf16 rounding",
    )
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
    for model in models.values():
        bench.set_encoder_attention(model, args.encoder_attn_implementation)
    batches = {
        name: {k: v.to(device) for k, v in model.input_builder(questions, documents).items()}
        for name, model in models.items()
    }
    run_plain = {"uncompressed": (generator, lambda module: module.generate(**text_inputs, **greedy))}
    run_plain.update({name: (model, lambda module, name=name: module.generate(**batches[name], **greedy))
                      for name, model in models.items()})  # fmt: skip
    with torch.no_grad():  # the reference: transformers' generate, eager, before anything is compiled
        plain = {name: plain_outputs(generate(module)) for name, (module, generate) in run_plain.items()}
    float32 = {}
    if args.float32_reference:
        float32 = {name: float32_reference(module, generate) for name, (module, generate) in run_plain.items()}
    for said in bench.change_layers(generator, args):
        print(f"generator: {said}")
    for name, model in models.items():
        for said in bench.change_compressor_layers(model, args):
            print(f"{name} compressor: {said}")
    if args.compile:
        mode = bench.compile_mode(args)
        print(f"generator: compiled {compile_elementwise_work(generator, mode)}")
        for name, model in models.items():
            print(f"{name} compressor: compiled {compile_compressor(model, mode)}")

    # --shared_prefix_min_tokens 1 sends small batches through the shared-prefix prefill too
    options = bench.static_engine_options(args)
    engines = {"uncompressed": StaticGreedyGenerator(generator, **options)}
    fast = {
        "uncompressed": engines["uncompressed"].generate(
            **text_inputs, max_new_tokens=steps, pad_token_id=pad, return_scores=True
        )
    }
    for name, model in models.items():
        engines[name] = StaticGreedyGenerator(model.generator, **options)
        fast[name] = generate_compressed(
            model, batches[name], engines[name], steps, stop_at_eos=False, return_scores=True
        )
    for name, engine in engines.items():
        kernel = f", remainder attention {engine.last_suffix_attention}" if engine.last_shared_prefix else ""
        print(f"{name}: shared prefix of {engine.last_shared_prefix} tokens prefilled once{kernel}")
    engine = "fast path" + (" (compiled)" if args.compile else "") + (" (stacked)" if args.stack_projections else "")
    engine += " (fused residual norms)" if args.fuse_residual_norms else ""
    engine += " (fused decode)" if args.fused_decode else ""
    for name in run_plain:
        print(f"== {name}")
        compare(f"{engine} vs plain bf16", *fast[name], *plain[name])
        if name in float32:
            compare("plain bf16 vs plain float32", *plain[name], *float32[name])
            compare(f"{engine} vs plain float32", *fast[name], *float32[name])

if __name__ == "__main__":
    main()
