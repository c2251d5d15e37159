"""What each decode-step lever is worth, in one process: milliseconds a decode step, with and without each.

    python benchmarks/decode_levers.py --shape mistral-7b --compile --cases 32x254,32x1474,1x1474 [--profile]

At batch 32 ModernBERT's side spends most of its time in decode steps, whose products read the weights for 32 rows,
so the levers that shorten a step lift its ratio (benchmarks/NOTES.md). Each configuration runs the same prompts
(random token ids without padding, the bench's answer length) through its own engine: "plain" (the generator's
forward), "fused" (`--fused_decode`'s `FusedDecode`), then, once the generator's projections are stacked
(`stack_projections`, which cannot be undone in the process), "stacked" and "stacked+fused". With --compile the
generator's norm and MLP blocks are compiled as the bench compiles them (again after stacking, whose MLPs are new
blocks) and the fused step in --compile_mode. On CUDA a step is a replay of the captured graph; elsewhere it runs
eagerly (a check of the script, not a timing). --profile writes each configuration's kernel table beside the report.
"""

import json
import os
import statistics

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype
from scaledown.fast_generation import StaticGreedyGenerator, compile_elementwise_work, stack_projections
from split_decode import rewind

LEVERS = ("plain", "fused", "stacked", "stacked+fused")


def decode_steps(engine: StaticGreedyGenerator, attention_mask: torch.Tensor, steps: int):
    """The engine's decode steps after its last call's prefill: graph replays on CUDA, eager steps elsewhere."""
    state = engine._state
    rewind(engine, attention_mask)
    for _ in range(steps):
        if state.graph is not None:
            state.graph.replay()
        else:
            engine._decode_step(state, None, 0, engine.generator.dtype)


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--cases", default="32x254,32x1474,1x1474", help="batch x prompt length, comma-separated")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    args = parser.parse_args()
    levers = args.levers.split(",")
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise SystemExit(f"Unknown levers {sorted(unknown)}; choose among {', '.join(LEVERS)}.")
    levers.sort(key=LEVERS.index)  # stacking cannot be undone: the unstacked configurations run first
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, generator, _, _, _, _, protocol = bench._load_models(args, device, dtype, print)
    mode = bench.compile_mode(args) if args.compile else None
    if args.compile:
        print(f"compiled {compile_elementwise_work(generator, mode)}", flush=True)
    steps = protocol.new_tokens - 1
    vocab = generator.get_input_embeddings().weight.shape[0]
    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    prompts = {case: torch.randint(3, vocab, case, device=device) for case in cases}
    os.makedirs(args.output_dir, exist_ok=True)
    rows = []
    for lever in levers:
        if lever.startswith("stacked") and not any(r["lever"].startswith("stacked") for r in rows):
            print(f"stacked the {stack_projections(generator)}", flush=True)
            if args.compile:
                print(f"compiled {compile_elementwise_work(generator, mode)}", flush=True)
        fused = lever.endswith("fused")
        for batch, prompt_len in cases:
            ids = prompts[(batch, prompt_len)]
            mask = torch.ones_like(ids)
            engine = StaticGreedyGenerator(
                generator, decode_attention_kernel=args.decode_attention_kernel, fused_decode=fused,
                fused_decode_mode=mode,
            )  # fmt: skip
            engine.generate(mask, protocol.new_tokens, input_ids=ids)  # the first call of a shape captures its graph
            seconds = bench.timed_runs(lambda: decode_steps(engine, mask, steps), device, args.warmup, args.repeats)
            row = {
                "lever": lever, "batch": batch, "prompt_len": prompt_len, "kernel": engine.attention_kernel,
                "ms_per_step": 1000 * statistics.median(seconds) / steps,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                table = bench.kernel_profile_table(lambda: decode_steps(engine, mask, steps), device)
                name = f"decode_levers_{lever.replace('+', '-')}_{batch}x{prompt_len}_profile.txt"
                with open(os.path.join(args.output_dir, name), "w") as handle:
                    handle.write(table)
            del engine
            bench._free_memory(device)

    print("\n| batch x prompt | lever | decode attention | ms a step | saved against plain (ms a step) |")
    print("|---|---|---|---|---|")
    for row in rows:
        plain = next((r for r in rows if r["lever"] == "plain" and r["batch"] == row["batch"]
                      and r["prompt_len"] == row["prompt_len"]), None)  # fmt: skip
        saved = "-" if plain is None else f"{plain['ms_per_step'] - row['ms_per_step']:.3f}"
        print(f"| {row['batch']} x {row['prompt_len']} | {row['lever']} | {row['kernel']} | "
              f"{row['ms_per_step']:.3f} | {saved} |")  # fmt: skip
    report = {"device": bench._device_name(device), "compile": args.compile, "compile_mode": args.compile_mode,
              "steps": steps, "rows": rows}  # fmt: skip
    with open(os.path.join(args.output_dir, "decode_levers.json"), "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
