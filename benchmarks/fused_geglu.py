"""Can a hand-written kernel beat cuBLAS plus a compiled GeGLU at the ModernBERT compressor's MLP input product?

    python benchmarks/fused_geglu.py --rows 1377280,172160

ModernBERT's MLP computes h = x @ Wi.T ([rows, 768] -> [rows, 2 x 1152]) and then gelu(h[:, :1152]) * h[:, 1152:]:
cuBLAS writes all of h and a compiled kernel reads it back (at batch 512 the GeGLU kernel alone is 8% of the
compression, benchmarks/NOTES.md). A Triton product that keeps both halves' accumulators for the same output columns
applies the GeGLU before anything is written, and writes half as much. This times, at the compressor's row counts
(1,377,280 = 512 questions x 10 documents x 269 positions):

- cuBLAS: the product alone, and the product followed by the compiled GeGLU (what the compiled compressor runs);
- Triton: the same product written as a plain Triton kernel (how close Triton's matrix product comes to cuBLAS), and
  with the GeGLU in its epilogue;
- inductor: the product compiled with `max-autotune` and its persistent TMA templates on, which times cuBLAS against
  inductor's own Triton templates and keeps the fastest (its table of candidates goes to stderr).

Each is timed as four calls captured in a CUDA graph and replayed (no launch or Python overhead). Needs a CUDA GPU
(Triton). NOTES.md holds the H100 numbers.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from scaledown.fast_generation import cuda_graph_milliseconds

CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
    for m, n, warps, stages in [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4), (256, 64, 8, 3), (64, 128, 4, 4)]
]


@triton.autotune(configs=CONFIGS, key=["rows", "outputs", "width", "gated"])
@triton.jit
def _product(x, w, out, rows, outputs, width, gated: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """out = x @ w.T ([rows, width] x [outputs, width]), or with `gated` (w is [2 x outputs, width]):
    out = gelu(x @ w[:outputs].T) * (x @ w[outputs:].T). `width` must be a multiple of BLOCK_K."""
    program = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(rows, BLOCK_M), tl.cdiv(outputs, BLOCK_N)
    group = program // (GROUP_M * blocks_n)  # neighbouring programs share weight tiles in L2
    first_m = group * GROUP_M
    group_size = min(blocks_m - first_m, GROUP_M)
    block_m = first_m + (program % (GROUP_M * blocks_n)) % group_size
    block_n = (program % (GROUP_M * blocks_n)) // group_size
    offs_m = (block_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x outputs passes 2**31 at batch 512
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_ok, outputs_ok = offs_m[:, None] < rows, offs_n[None, :] < outputs
    x_tile = x + offs_m[:, None] * width + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_tile = w + offs_n[None, :] * width + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: w's rows as columns
    accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, width, BLOCK_K):
        a = tl.load(x_tile, mask=rows_ok, other=0.0)
        accumulator = tl.dot(a, tl.load(w_tile, mask=outputs_ok, other=0.0), accumulator)
        if gated:
            gate = tl.dot(a, tl.load(w_tile + outputs * width, mask=outputs_ok, other=0.0), gate)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    if gated:  # exact (erf) GELU, as ModernBERT's "gelu"
        accumulator = 0.5 * accumulator * (1.0 + tl.erf(accumulator * 0.7071067811865476)) * gate
    tl.store(out + offs_m[:, None] * outputs + offs_n[None, :], accumulator.to(out.dtype.element_ty),
             mask=rows_ok & outputs_ok)  # fmt: skip


def triton_product(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    """[rows, width] x [outputs (x 2 if gated), width] -> [rows, outputs]."""
    rows, width = x.shape
    outputs = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(rows, outputs, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(outputs, meta["BLOCK_N"]),)

    _product[grid](x, weight, out, rows, outputs, width, gated)
    return out


torch._inductor.config.triton.enable_persistent_tma_matmul = True  # Hopper's TMA copies among inductor's templates


@torch.compile(mode="max-autotune-no-cudagraphs")
def autotuned_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


@torch.compile
def geglu(hidden: torch.Tensor) -> torch.Tensor:
    """ModernBERT's activation: [rows, 2 x n] -> [rows, n]."""
    gate_input, gate = hidden.chunk(2, dim=-1)
    return F.gelu(gate_input) * gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1377280,172160", help="comma-separated row counts (positions)")
    parser.add_argument("--width", type=int, default=768, help="ModernBERT-base's hidden size")
    parser.add_argument("--intermediate", type=int, default=1152, help="ModernBERT-base's intermediate size")
    parser.add_argument("--repeats", type=int, default=10, help="replays of each variant's graph")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    weight = torch.randn(2 * args.intermediate, args.width, device=device, dtype=torch.bfloat16) / args.width**0.5
    print(f"{torch.cuda.get_device_name(device)}: x [rows, {args.width}] @ Wi.T [{args.width}, 2 x {args.intermediate}]")
    print("| rows | variant | ms | TFLOP/s | against cuBLAS + GeGLU | max abs diff |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.width, device=device, dtype=torch.bfloat16)
        variants = {
            "cuBLAS product": lambda: x @ weight.t(),
            "cuBLAS product + compiled GeGLU": lambda: geglu(x @ weight.t()),
            "Triton product": lambda: triton_product(x, weight, gated=False),
            "Triton product, GeGLU in its epilogue": lambda: triton_product(x, weight, gated=True),
            "inductor max-autotune product": lambda: autotuned_product(x, weight),
        }
        reference = variants["cuBLAS product + compiled GeGLU"]()
        flops = 2 * rows * args.width * weight.shape[0]
        baseline = None
        for name, function in variants.items():
            milliseconds = cuda_graph_milliseconds(function, calls=4, replays=args.repeats)
            baseline = baseline if name != "cuBLAS product + compiled GeGLU" else milliseconds
            output = function()
            diff = (output.float() - reference.float()).abs().max().item() if output.shape == reference.shape else None
            diff = "-" if diff is None else f"{diff:.4f}"
            against = f"{milliseconds / baseline:.3f}" if baseline else "-"
            print(f"| {rows} | {name} | {milliseconds:.3f} | {flops / milliseconds / 1e9:.0f} | {against} | {diff} |",
                  flush=True)  # fmt: skip
        print(f"| {rows} | (reference output scale: max abs {reference.float().abs().max().item():.3f}) |||||")


if __name__ == "__main__":
    main()
