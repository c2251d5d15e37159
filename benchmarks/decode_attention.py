"""One decode step's attention at the bench's shapes: which kernel reads the static cache fastest.

    python benchmarks/decode_attention.py --shape mistral-7b --cases 1x1506,96x1506,32x286,512x286

A decode step's attention is one query token per head against the whole static cache, under a boolean mask (left
padding and the slots not yet written). It only has to read the cache once, so its roofline is the cache's bytes over
the memory bandwidth. The phase profiles showed SDPA's default choice (cuDNN) far from that at batch 512 (about
0.5 ms a layer for 0.6 GB), so this times the candidates alone, each replayed in a CUDA graph as the engine does, and
checks each against a float32 reference. With `--layers N` each call reads the next of N distinct caches, as the
engine's layers do, instead of the same one again.
"""

import argparse
import functools

import torch

from scaledown.evaluation import bench
from scaledown.evaluation.evaluate import resolve_device
from scaledown.evaluation.flops import TransformerShape, detect_hardware
from scaledown.fast_generation import (
    DECODE_ATTENTION_KERNELS,
    _flex_decode_attention,
    cuda_graph_milliseconds,
    grouped_decode_attention,
)


def decode_inputs(shape: TransformerShape, batch: int, slots: int, device, dtype, seed: int = 0):
    """query `(batch, heads, 1, head_dim)`, key/value `(batch, kv_heads, slots, head_dim)`, boolean mask
    `(batch, 1, 1, slots)`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def normal(*size):
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    query = normal(batch, shape.num_heads, 1, shape.head_dim)
    key = normal(batch, shape.num_kv_heads, slots, shape.head_dim)
    value = normal(batch, shape.num_kv_heads, slots, shape.head_dim)
    padding = torch.randint(0, max(slots // 8, 1), (batch, 1), generator=generator)  # left padding of each row
    allowed = torch.arange(slots)[None, :] >= padding  # (batch, slots)
    allowed[:, -slots // 16 :] = False  # cache slots the decode steps have not written yet
    return query, key, value, allowed[:, None, None, :].to(device)


def parse_kernel_options(options: str) -> dict[str, int]:
    """'BLOCK_N=32/num_stages=3' -> {'BLOCK_N': 32, 'num_stages': 3}."""
    parsed = {}
    for item in options.split("/"):
        name, _, value = item.partition("=")
        if not name or not value.isdigit():
            raise ValueError(f"--flex_options entry {item!r} is not NAME=integer; write e.g. BLOCK_N=32/num_stages=3")
        parsed[name] = int(value)
    return parsed


def flex_with_options(kernel_options: dict[str, int], shape: TransformerShape):
    """Flex's decoding kernel as the engine calls it ("auto"'s flex) with fixed kernel options (the tile length along
    the cache, pipeline stages, warps) instead of the engine's autotuned ones."""
    compiled = torch.compile(functools.partial(_flex_decode_attention, kernel_options=kernel_options), dynamic=False)

    def attend(module, query, key, value, mask, scaling):
        batch, group = query.shape[0], shape.num_heads // shape.num_kv_heads
        grouped = query.reshape(batch, shape.num_kv_heads, group, shape.head_dim)
        output = compiled(grouped, key, value, mask[:, 0, 0, :], scaling)
        return output.reshape(batch, 1, shape.num_heads, shape.head_dim), None

    return attend


def graph_time_us(function, device, calls: int = 32, replays: int = 10) -> float:
    """Microseconds per call, `calls` calls captured in one CUDA graph (as the engine replays decode steps)."""
    if device.type != "cuda":
        import time

        start = time.perf_counter()
        for _ in range(calls):
            function()
        return 1e6 * (time.perf_counter() - start) / calls
    return 1000 * cuda_graph_milliseconds(function, calls, replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mistral-7b", choices=sorted(bench.GENERATOR_SHAPES))
    parser.add_argument("--cases", default="1x1506,32x1506,96x1506,32x286,512x286", help="batch x cache slots")
    parser.add_argument("--layers", type=int, default=1, help="distinct caches the calls cycle through")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--flex_options",
        default="",
        help="also time flex's decoding kernel with these fixed kernel options, e.g. "
        "'BLOCK_N=64/num_stages=3/num_warps=4;BLOCK_N=32/num_stages=4/num_warps=2' (the engine autotunes them; "
        "untuned, flex takes 64/1/2 on an H100)",
    )
    args = parser.parse_args()
    flex_settings = {f"flex[{o}]": parse_kernel_options(o) for o in args.flex_options.split(";") if o}
    torch._dynamo.config.recompile_limit = 64  # each shape and option set compiles flex's kernel anew
    device = resolve_device(args.device)
    hardware = detect_hardware(device, None, None)
    shape = bench.preset_shape(bench.GENERATOR_SHAPES[args.shape])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scaling = shape.head_dim**-0.5
    print(f"{bench._device_name(device)}, {args.shape}: {shape.num_heads} heads, {shape.num_kv_heads} key/value heads")
    print(f"{'batch':>5} {'slots':>5} {'kernel':>9} {'us/layer':>9} {'TB/s':>6} {'of roofline':>11} {'max |diff|':>10}")
    for case in args.cases.split(","):
        batch, slots = (int(v) for v in case.split("x"))
        caches = [decode_inputs(shape, batch, slots, device, dtype, seed=layer) for layer in range(args.layers)]
        query, key, value, mask = caches[0]
        reference, _ = grouped_decode_attention(
            None, query.float(), key.float(), value.float(), mask, scaling=scaling, kernel="matmul"
        )
        cache_bytes = 2 * key.numel() * key.element_size()
        for kernel in list(DECODE_ATTENTION_KERNELS) + list(flex_settings):
            if kernel in flex_settings:
                attend = flex_with_options(flex_settings[kernel], shape)
            else:
                attend = functools.partial(grouped_decode_attention, kernel=kernel)

            def step(attend=attend, calls=iter(range(1 << 62))):
                layer_query, layer_key, layer_value, layer_mask = caches[next(calls) % len(caches)]
                return attend(None, layer_query, layer_key, layer_value, layer_mask, scaling=scaling)

            try:
                output, _ = attend(None, query, key, value, mask, scaling=scaling)
                difference = (output.float() - reference).abs().max().item()
                microseconds = graph_time_us(step, device)
            except RuntimeError as error:  # a backend that refuses this mask or shape
                print(f"{batch:>5} {slots:>5} {kernel:>9} unavailable: {str(error).splitlines()[0][:80]}")
                continue
            bandwidth = cache_bytes / microseconds / 1e6
            of_roofline = f"{bandwidth / (hardware.peak_bandwidth / 1e12):.2f}" if hardware else "-"
            print(f"{batch:>5} {slots:>5} {kernel:>9} {microseconds:>9.1f} {bandwidth:>6.2f} {of_roofline:>11} "
                  f"{difference:>10.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
