"""Where the fast engine's time goes: prefill, the copy into the static cache, and the replayed decode steps.

    python benchmarks/phase_times.py --shape mistral-7b --batch_sizes 1,8,32,64

Uncompressed side (the generator reading the document text), random weights of the real shape, the bench's
protocol. Each phase is timed alone and set beside its roofline time, so the slow phase shows itself. The bench's
flags that change the generator or its engine apply here too (--compile, --compile_mode, --stack_projections,
--fuse_residual_norms, --fused_decode, --decode_attention_kernel, ...); its --profile prints each phase's top kernels (torch.profiler).
"""

import json
import os
import statistics

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype, tokenize_text_prompts
from scaledown.evaluation.flops import TransformerShape, detect_hardware, generator_phases
from scaledown.fast_generation import StaticGreedyGenerator, compile_elementwise_work
from scaledown.modeling_scaledown import text_prompt
from split_decode import rewind


def median_ms(function, device, repeats: int) -> float:
    """Median wall clock of `repeats` synchronised runs after one warm-up, in ms (the bench's own timer)."""
    return 1000 * statistics.median(bench.timed_runs(function, device, warmup=1, repeats=repeats))


def print_top_kernels(title: str, function, rows: int = 15) -> None:
    """The kernels that take the phase's time: the first thing to read when a phase sits far from its roofline."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n== {title}\n" + bench.kernel_profile_table(function, device, rows), flush=True)


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--phase_batch_sizes", default="1,8,32,64")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    hardware = detect_hardware(device, args.peak_tflops, args.peak_bandwidth_tbs)
    _, generator, tokenizer, system_prompt, _, _, protocol = bench._load_models(args, device, dtype, print)
    shape = TransformerShape.from_config(generator.config)
    for said in bench.change_layers(generator, args):  # what the bench's flags do to the generator, before compiling
        print(said, flush=True)
    if args.compile:  # what the bench's --compile does to the generator
        print(f"compiled {compile_elementwise_work(generator, bench.compile_mode(args))}", flush=True)
    batch_sizes = [int(b) for b in args.phase_batch_sizes.split(",")]
    questions, documents = bench.synthetic_requests(tokenizer, protocol, max(batch_sizes), seed=args.seed)
    engine = StaticGreedyGenerator(generator, **bench.static_engine_options(args))
    steps = protocol.new_tokens
    rows = []
    for batch_size in batch_sizes:
        prompts = [text_prompt(tokenizer, q, d, system_prompt) for q, d in zip(questions, documents)][:batch_size]
        inputs = tokenize_text_prompts(tokenizer, prompts, device)
        lengths = inputs["attention_mask"].sum(-1).tolist()
        positions = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

        def whole():
            engine.generate(**inputs, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)

        def prefill():
            with torch.no_grad():
                generator(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)

        def decode():
            if engine._state.graph is None:
                raise RuntimeError("Decode timing replays the captured CUDA graph: run it on a GPU.")
            rewind(engine, inputs["attention_mask"])  # so that the replays write in bounds
            for _ in range(steps - 1):
                engine._state.graph.replay()

        try:
            total = median_ms(whole, device, args.repeats)
            prefill_ms = median_ms(prefill, device, args.repeats)
            decode_ms = median_ms(decode, device, args.repeats)
        except RuntimeError as error:
            if not bench.is_out_of_memory(error):
                raise
            print(f"batch {batch_size}: out of memory; larger batches are skipped", flush=True)
            break
        if args.profile:
            for name, function in (("prefill", prefill), ("decode", decode)):
                print_top_kernels(f"batch {batch_size}, {name}", function)
        phases = generator_phases(shape, lengths, steps, torch.finfo(dtype).bits // 8)
        roof = {p.name: 1000 * p.best_seconds(hardware) if hardware else None for p in phases}
        row = {
            "batch_size": batch_size,
            "total_ms": total,
            "prefill_ms": prefill_ms,
            "decode_ms": decode_ms,
            "decode_ms_per_step": decode_ms / (steps - 1),
            "rest_ms": total - prefill_ms - decode_ms,  # cache reset, KV copy into the static cache, first token
            "prefill_roofline_ms": roof["prefill"],
            "decode_roofline_ms": roof["decode"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| batch | total ms | prefill ms (roofline) | decode ms (roofline) | per step ms | rest ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {r['batch_size']} | {r['total_ms']:.1f} | {r['prefill_ms']:.1f} ({fmt(r['prefill_roofline_ms'])}) | "
              f"{r['decode_ms']:.1f} ({fmt(r['decode_roofline_ms'])}) | {r['decode_ms_per_step']:.2f} | "
              f"{r['rest_ms']:.1f} |")  # fmt: skip
    os.makedirs(args.output_dir, exist_ok=True)
    stem = f"phase_times_{args.shape}{'_compiled' if args.compile else ''}{bench.layer_levers_stem(args)}"
    report = {
        "device": bench._device_name(device), "protocol": str(protocol), "compile": args.compile,
        "stack_projections": args.stack_projections,
        "fuse_residual_norms": args.fuse_residual_norms, "fused_decode": args.fused_decode, "rows": rows,
    }  # fmt: skip
    path = os.path.join(args.output_dir, f"{stem}.json")
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
