"""Does compression really run beside decoding? The GPU timeline of one overlapped stream of batches.

    python benchmarks/overlap_timeline.py --shape mistral-7b --compressor modernbert-base --batch_size 32 \
        --overlap_batches 4 --compile --encoder_attn_implementation flex_attention

Runs the bench's compressed side (static engine) on a stream of `--overlap_batches` batches, once one after the
other and once overlapped (`generate_compressed_overlapped`), and reads the kernels of one profiled overlapped run
from torch.profiler's trace: how long each CUDA stream was busy, and for how long both were busy at once. If the
side stream's compression mostly runs while the main stream is idle or is stretched by sharing the GPU, the overlap
has nothing to give; NOTES.md holds the H100 numbers.
"""

import json
import os
import tempfile
from statistics import median

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype
from scaledown.fast_generation import compile_compressor, compile_elementwise_work


def busy_intervals(kernels: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (start, end) intervals, sorted and merged."""
    merged: list[list[int]] = []
    for start, end in sorted(kernels):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def overlap_length(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> int:
    """Total length of the intersection of two merged interval lists."""
    total, i, j = 0, 0, 0
    while i < len(first) and j < len(second):
        start, end = max(first[i][0], second[j][0]), min(first[i][1], second[j][1])
        total += max(0, end - start)
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return total


def stream_timeline(trace_path: str) -> dict[int, list[tuple[int, int]]]:
    """Kernel intervals (microseconds) per CUDA stream, from a chrome trace written by torch.profiler."""
    with open(trace_path) as handle:
        events = json.load(handle)["traceEvents"]
    streams: dict[int, list[tuple[int, int]]] = {}
    for event in events:
        if event.get("cat") == "kernel" and "dur" in event:
            stream = int(event.get("args", {}).get("stream", -1))
            start = int(event["ts"])
            streams.setdefault(stream, []).append((start, start + max(int(event["dur"]), 1)))
    return {stream: busy_intervals(kernels) for stream, kernels in streams.items()}


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, generator, tokenizer, _, _, names, protocol = bench._load_models(args, device, dtype, print)
    questions, documents = bench.synthetic_requests(tokenizer, protocol, args.batch_size, seed=args.seed)
    model = bench.build_random_scaledown(
        names[0], generator, tokenizer, args.shape, protocol, device, dtype, args.attn_implementation
    )
    bench.set_encoder_attention(model, args.encoder_attn_implementation)
    if args.compile:
        print(f"generator: {compile_elementwise_work(generator)}; compressor: {compile_compressor(model)}")
    dtype_bytes = torch.finfo(dtype).bits // 8
    batches = args.overlap_batches
    one_by_one = bench.CompressedSide(names[0], model, protocol, dtype_bytes, "static")
    overlapped = bench.CompressedSide(names[0], model, protocol, dtype_bytes, "static", overlap_batches=batches)
    overlapped.fast = one_by_one.fast  # one engine: the same captured decode graph for both ways
    batch = one_by_one.prepare(questions, documents, device)

    def sequential():
        for _ in range(batches):
            one_by_one.run(batch)

    ways = [("one by one", sequential), ("overlapped", lambda: overlapped.run(batch))]
    per_query = batches * args.batch_size
    for label, function in ways:
        seconds = bench.timed_runs(function, device, warmup=2, repeats=args.repeats)
        print(f"{label:>10}: {1000 * median(seconds) / per_query:.2f} ms/query", flush=True)
    seconds = bench.timed_runs(lambda: one_by_one.compress(batch), device, warmup=1, repeats=args.repeats)
    print(f"compression alone: {1000 * median(seconds) / args.batch_size:.2f} ms/query")

    if device.type != "cuda":
        print("the timeline needs a GPU: no CUDA streams here")
        return
    with tempfile.TemporaryDirectory() as folder:
        trace = os.path.join(folder, "trace.json")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            overlapped.run(batch)
            bench.synchronize(device)
        profiler.export_chrome_trace(trace)
        streams = stream_timeline(trace)
    first = min(intervals[0][0] for intervals in streams.values())
    last = max(intervals[-1][1] for intervals in streams.values())
    print(f"profiled overlapped run: {(last - first) / 1000:.1f} ms of GPU timeline, {len(streams)} streams")
    busiest = sorted(streams, key=lambda s: -sum(e - b for b, e in streams[s]))
    for stream in busiest:
        busy = sum(end - start for start, end in streams[stream])
        print(f"  stream {stream:>3}: busy {busy / 1000:9.1f} ms")
    if len(busiest) > 1:
        both = overlap_length(streams[busiest[0]], streams[busiest[1]])
        either = sum(end - start for start, end in busy_intervals(streams[busiest[0]] + streams[busiest[1]]))
        print(f"  both busiest streams busy at once: {both / 1000:.1f} ms; either busy: {either / 1000:.1f} ms")


if __name__ == "__main__":
    main()
