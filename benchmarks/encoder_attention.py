"""The ModernBERT compressor's attention at the bench's shapes: which kernel and block size run it fastest.

    python benchmarks/encoder_attention.py --batch_size 64

Every compressor row is one (query, document) pair of 269 tokens, so each layer's attention is many short,
unpadded, bidirectional sequences with 64-wide heads: 8 global layers (every position sees every position) and 14
local ones (positions at most 64 apart). Inside the compiled compressor this attention runs near 90 TFLOP/s of
useful work (NOTES.md), far below the matrix products around it. This times the candidates alone, each layer kind
apart, each call replayed in a CUDA graph, and checks each against a float32 reference with the same mask.
Flex attention is timed at the tile sizes its names give (flex-M for M x M, flex-MxN): 128 is its default (269
positions pad to 384); smaller tiles pad less and let the local band skip more of them.
"""

import argparse
import functools
import re

import torch
import torch.nn.functional as F
from decode_attention import graph_time_us

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device
from scaledown.evaluation.flops import detect_hardware

SDPA_KERNELS = ("sdpa", "cudnn", "flash", "efficient")
KERNELS = SDPA_KERNELS + ("flex-128", "flex-64", "flex-128x64")  # flex-M or flex-MxN: M x N tiles and mask blocks


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@functools.cache
def _band(positions: int, half_window: int, device: str) -> torch.Tensor:
    """`(positions, positions)` boolean: key within half_window of the query."""
    index = torch.arange(positions, device=device)
    return (index[:, None] - index[None, :]).abs() <= half_window


@functools.cache
def _band_block_mask(positions: int, half_window: int, tiles: tuple[int, int], device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def within_window(batch, head, query_index, key_index):
        return (query_index - key_index).abs() <= half_window

    return create_block_mask(within_window, None, None, positions, positions, device=device, BLOCK_SIZE=tiles)


def flex_tiles(kernel: str) -> tuple[int, int] | None:
    """"flex-64x32" -> (64, 32), "flex-64" -> (64, 64); None for any other name."""
    sizes = re.fullmatch(r"flex-(\d+)(?:x(\d+))?", kernel)
    return (int(sizes[1]), int(sizes[2] or sizes[1])) if sizes else None


def encoder_attention(query, key, value, kernel: str, half_window: int | None):
    """query, key, value `(rows, heads, positions, head_dim)`; half_window None for a global layer."""
    positions, device = query.shape[2], str(query.device)
    tiles = flex_tiles(kernel)
    if tiles is not None:
        from torch.nn.attention.flex_attention import flex_attention

        mask = None if half_window is None else _band_block_mask(positions, half_window, tiles, device)
        if not query.is_cuda:  # eager flex attention: the reference implementation, with CPU's own tiles
            return flex_attention(query, key, value, block_mask=mask)
        options = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
        return _compiled_flex()(query, key, value, block_mask=mask, kernel_options=options)
    band = None if half_window is None else _band(positions, half_window, device)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=band)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = dict(
        cudnn=SDPBackend.CUDNN_ATTENTION, flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION
    )[kernel]
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=band)


def useful_flops(query, half_window: int | None) -> float:
    """Two products of (positions x attended keys x head_dim) per head and row, counting only unmasked pairs."""
    rows, heads, positions, head_dim = query.shape
    pairs = positions**2 if half_window is None else int(_band(positions, half_window, "cpu").sum())
    return 4 * rows * heads * pairs * head_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64, help="questions; each has --documents rows")
    parser.add_argument("--documents", type=int, default=10)
    parser.add_argument("--positions", type=int, default=269, help="tokens of one (query, document) row")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--half_window", type=int, default=64, help="local layers: keys at most this far away")
    parser.add_argument("--global_layers", type=int, default=8)
    parser.add_argument("--local_layers", type=int, default=14)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    # every tile size and mask is a recompilation of the one compiled flex attention: more than torch's default 8
    torch._dynamo.config.recompile_limit = 64
    device = resolve_device(args.device)
    hardware = detect_hardware(device, None, None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = args.batch_size * args.documents
    generator = torch.Generator(device="cpu").manual_seed(0)
    query, key, value = (
        torch.randn(rows, args.heads, args.positions, args.head_dim, generator=generator).to(device, dtype)
        for _ in range(3)
    )
    print(
        f"{bench._device_name(device)}: {rows} rows x {args.heads} heads x {args.positions} positions x "
        f"{args.head_dim}; {args.global_layers} global layers, {args.local_layers} local (|i-j| <= {args.half_window})"
    )
    print(f"{'kernel':>12} {'layer':>6} {'us/layer':>9} {'TFLOP/s':>8} {'of peak':>7} {'max |diff|':>10}")
    kernels = args.kernels.split(",")
    for kernel in kernels:
        if kernel not in SDPA_KERNELS and flex_tiles(kernel) is None:
            raise ValueError(f"Unknown kernel {kernel!r}; choose from {SDPA_KERNELS} or flex-M[xN], e.g. {KERNELS}.")
    layer_kinds = (("global", None, args.global_layers), ("local", args.half_window, args.local_layers))
    references = {  # float32, once per layer kind
        half_window: encoder_attention(query.float(), key.float(), value.float(), "sdpa", half_window)
        for _, half_window, _ in layer_kinds
    }
    per_query_ms = {}
    for kernel in kernels:
        total_us = 0.0
        for layer, half_window, count in layer_kinds:
            reference = references[half_window]
            try:
                output = encoder_attention(query, key, value, kernel, half_window)
                difference = (output.float() - reference).abs().max().item()
                microseconds = graph_time_us(
                    lambda k=kernel, w=half_window: encoder_attention(query, key, value, k, w), device, calls=8
                )
            except RuntimeError as error:  # a backend that refuses this mask or shape
                print(f"{kernel:>12} {layer:>6} unavailable: {str(error).splitlines()[0][:80]}")
                total_us = float("nan")
                continue
            tflops = useful_flops(query, half_window) / microseconds / 1e6
            of_peak = f"{tflops / (hardware.peak_flops / 1e12):.2f}" if hardware else "-"
            print(f"{kernel:>12} {layer:>6} {microseconds:>9.1f} {tflops:>8.1f} {of_peak:>7} {difference:>10.4f}")
            total_us += count * microseconds
        per_query_ms[kernel] = total_us / 1000 / args.batch_size
    print("\nattention of the whole compressor, ms per question:")
    for kernel, milliseconds in per_query_ms.items():
        print(f"{kernel:>12} {milliseconds:.3f}")


if __name__ == "__main__":
    main()
