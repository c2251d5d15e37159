"""What the GPU's matrix products sustain at the generator's own shapes: the practical ceiling under the roofline.

    python benchmarks/gemm_ceiling.py --shape mistral-7b --tokens 1,96,45056

The roofline divides by the data-sheet peaks (989 TFLOP/s dense bf16, 3.35 TB/s on an H100 SXM). A decoder layer is
seven matrix products (q, k, v, o, gate, up, down); this times them alone, back to back, for each token count (rows
of the activation), and prints their TFLOP/s and TB/s beside the peaks. No side of the bench can beat these numbers
by more than its non-matmul share, so they say how far "60% of the roofline" is from what the hardware gives.
"""

import argparse

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device
from scaledown.evaluation.flops import TransformerShape, detect_hardware


def layer_products(shape: TransformerShape) -> list[tuple[int, int]]:
    """(in, out) of a Llama-family layer's seven projections."""
    hidden, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q = shape.num_heads * shape.head_dim
    return [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, shape.intermediate_size),
            (hidden, shape.intermediate_size), (shape.intermediate_size, hidden)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mistral-7b", choices=sorted(bench.GENERATOR_SHAPES))
    parser.add_argument("--tokens", default="1,96,45056", help="rows of the activation: batch x tokens per step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    hardware = detect_hardware(device, None, None)
    shape = bench.preset_shape(bench.GENERATOR_SHAPES[args.shape])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = [torch.randn(n_in, n_out, device=device, dtype=dtype) for n_in, n_out in layer_products(shape)]
    print("| rows | ms per layer's products | TFLOP/s | of peak FLOP/s | TB/s | of peak bandwidth |")
    print("|---|---|---|---|---|---|")
    for rows in (int(t) for t in args.tokens.split(",")):
        inputs = {n_in: torch.randn(rows, n_in, device=device, dtype=dtype) for n_in, _ in layer_products(shape)}

        def products():
            for weight in weights:
                inputs[weight.shape[0]] @ weight

        seconds = min(bench.timed_runs(products, device, warmup=3, repeats=args.repeats))
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
        moved = sum((w.numel() + rows * (w.shape[0] + w.shape[1])) * w.element_size() for w in weights)
        tflops, tbs = flops / seconds / 1e12, moved / seconds / 1e12
        peak_f = f"{tflops * 1e12 / hardware.peak_flops:.2f}" if hardware else "-"
        peak_b = f"{tbs * 1e12 / hardware.peak_bandwidth:.2f}" if hardware else "-"
        print(f"| {rows} | {1000 * seconds:.3f} | {tflops:.0f} | {peak_f} | {tbs:.2f} | {peak_b} |", flush=True)


if __name__ == "__main__":
    main()
