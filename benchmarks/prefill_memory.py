"""What the layer levers cost in memory: the fast engine's peak above the resident weights, a call of each shape.

    for levers in "" "--stack_projections" "--fuse_residual_norms" "--stack_projections --fuse_residual_norms"; do
        python benchmarks/prefill_memory.py --shape mistral-7b --compile --cases 32x1474 $levers; done

The levers replace the generator's layers in place (they cannot be undone in the process), so each set runs in a
process of its own. The largest batch that fits is set by the prefill's activations, so a lever that holds one more
activation a layer costs rows at the largest batch. Each case (random token ids without padding, the bench's answer
length) runs once to compile and capture, then once measured: `torch.cuda.max_memory_allocated` above what was
allocated before the call, in GB and in KB a prompt token. CUDA only; elsewhere the script checks itself and reports
no peak.
"""

import json
import os

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype
from scaledown.fast_generation import StaticGreedyGenerator, compile_elementwise_work


def peak_above_resident(function, device: torch.device) -> int | None:
    """Bytes `function` allocated at its peak beyond what was allocated when it began (None off CUDA)."""
    if device.type != "cuda":
        function()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - resident


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--cases", default="32x1474", help="batch x prompt length, comma-separated")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, generator, _, _, _, _, protocol = bench._load_models(args, device, dtype, print)
    for said in bench.change_layers(generator, args):
        print(said, flush=True)
    if args.compile:
        print(f"compiled {compile_elementwise_work(generator, bench.compile_mode(args))}", flush=True)
    levers = bench.layer_levers_stem(args).strip("_").replace("_", "+") or "plain"
    vocab = generator.get_input_embeddings().weight.shape[0]
    rows = []
    for case in args.cases.split(","):
        batch, prompt_len = (int(v) for v in case.split("x"))
        ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
        mask = torch.ones_like(ids)
        engine = StaticGreedyGenerator(generator, **bench.static_engine_options(args))
        engine.generate(mask, protocol.new_tokens, input_ids=ids)  # compiles and captures
        peak = peak_above_resident(lambda: engine.generate(mask, protocol.new_tokens, input_ids=ids), device)
        row = {"levers": levers, "batch": batch, "prompt_len": prompt_len,
               "peak_gb": None if peak is None else peak / 1e9,
               "kb_per_token": None if peak is None else peak / 1024 / ids.numel()}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
        bench._free_memory(device)

    print("\n| levers | batch x prompt | peak above resident, GB | KB a prompt token |\n|---|---|---|---|")
    for row in rows:
        gb, kb = ("-", "-") if row["peak_gb"] is None else (f"{row['peak_gb']:.2f}", f"{row['kb_per_token']:.1f}")
        print(f"| {row['levers']} | {row['batch']} x {row['prompt_len']} | {gb} | {kb} |")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"prefill_memory_{levers}.json"), "w") as handle:
        json.dump({"device": bench._device_name(device), "compile": args.compile, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
