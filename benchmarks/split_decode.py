"""Does a decode step go faster as micro-batches replayed side by side on CUDA streams?

    python benchmarks/split_decode.py --shape mistral-7b --compile --cases 512x254,96x1506 --splits 1,2,4

At the ModernBERT side's largest batch (512 prompts of 254 positions) a decode step is about half matrix products,
which are compute-bound at 512 rows, and half attention over the cache, which is bound by memory. The roofline counts
the two as overlapping; one stream runs them one after the other. Cut into micro-batches whose decode graphs replay
on separate streams, one micro-batch's attention may run beside another's matrix products (each matrix product
launches too few tiles to fill the GPU), at the price of reading the weights once per micro-batch.

Prints the decode time per step of each case and split: one stream (the engine today), the micro-batches one after
another on one stream, and side by side on their own streams (also with the first stream at high priority).
Random weights and token ids, no padding; needs a GPU (it times captured decode graphs).
"""

import json
import os
import statistics

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype
from scaledown.fast_generation import StaticGreedyGenerator, compile_elementwise_work


def rewind(engine: StaticGreedyGenerator, attention_mask: torch.Tensor) -> None:
    """Back to just after the prefill of the engine's last call (without EOS; `attention_mask` its left-padded
    `(batch, prompt_len)` mask): the replays that follow write inside the cache and decode what that call decoded."""
    state = engine._state
    prompt_len = attention_mask.shape[1]
    state.key_mask.zero_()
    state.key_mask[:, :prompt_len] = attention_mask.bool()
    state.tokens.copy_(state.output[:, :1])  # the prefill's token
    state.positions.copy_(attention_mask.long().sum(-1, keepdim=True))  # positions skip the left padding
    state.step.fill_(1)
    state.cache_position.fill_(prompt_len)
    for layer in state.cache.layers:  # transformers' static layers count their own write position
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.fill_(prompt_len)


def ms_per_step(engines, streams, attention_mask: torch.Tensor, steps: int, repeats: int = 3) -> float:
    """Median ms of one decode step of the whole batch: every micro-batch's graph replayed `steps` times."""
    main = torch.cuda.current_stream()

    def replay_all():
        for engine in engines:
            rewind(engine, attention_mask)
        for stream in streams:
            stream.wait_stream(main)
        for _ in range(steps):
            for engine, stream in zip(engines, streams):
                with torch.cuda.stream(stream):
                    engine._state.graph.replay()
        for stream in streams:
            main.wait_stream(stream)

    seconds = bench.timed_runs(replay_all, main.device, warmup=1, repeats=repeats)
    return 1000 * statistics.median(seconds) / steps


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--cases", default="512x254,96x1506", help="batch x prompt length, comma-separated")
    parser.add_argument("--splits", default="1,2,4", help="micro-batches per batch, comma-separated")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("split_decode.py times captured CUDA graphs: run it on a GPU.")
    dtype = resolve_dtype(args.dtype, device)
    _, generator, _, _, _, _, protocol = bench._load_models(args, device, dtype, print)
    if args.compile:
        print(f"compiled {compile_elementwise_work(generator)}", flush=True)
    steps = protocol.new_tokens - 1
    vocab = generator.get_input_embeddings().weight.shape[0]
    rows = []
    for case in args.cases.split(","):
        batch, prompt_len = (int(v) for v in case.split("x"))
        ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
        for split in (int(s) for s in args.splits.split(",")):
            if batch % split:
                continue
            part = batch // split
            engines = [StaticGreedyGenerator(generator, decode_attention_kernel=args.decode_attention_kernel)
                       for _ in range(split)]  # fmt: skip
            for index, engine in enumerate(engines):  # the first call of a shape captures its decode graph
                rows_of_part = ids[index * part : (index + 1) * part]
                engine.generate(
                    attention_mask=torch.ones_like(rows_of_part), max_new_tokens=protocol.new_tokens,
                    input_ids=rows_of_part,
                )  # fmt: skip
            main_stream = torch.cuda.current_stream()
            variants = {"one stream": [main_stream] * split}
            if split > 1:
                variants["side by side"] = [torch.cuda.Stream() for _ in range(split)]
                variants["side by side, first high priority"] = [torch.cuda.Stream(priority=-1)] + [
                    torch.cuda.Stream() for _ in range(split - 1)
                ]
            for name, streams in variants.items():
                row = {
                    "batch": batch, "prompt_len": prompt_len, "micro_batches": split, "streams": name,
                    "kernel": engines[0].attention_kernel,
                    "ms_per_step": ms_per_step(engines, streams, torch.ones_like(ids[:part]), steps),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del engines
            torch.cuda.empty_cache()
    print("\n| batch x prompt | micro-batches | streams | decode attention | ms a step | against one batch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        whole = next(r["ms_per_step"] for r in rows if r["batch"] == row["batch"] and r["micro_batches"] == 1)
        print(f"| {row['batch']} x {row['prompt_len']} | {row['micro_batches']} | {row['streams']} | {row['kernel']} "
              f"| {row['ms_per_step']:.2f} | {row['ms_per_step'] / whole:.3f} |")  # fmt: skip
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "split_decode.json"), "w") as handle:
        json.dump({"device": bench._device_name(device), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
