"""How fast an encoder compressor compresses, eager and compiled in several ways, with the kernels that take the time.

    python benchmarks/compression_profile.py --shape mistral-7b --compressor modernbert-base --batch_size 64

Random weights of the real shapes, the bench's protocol (10 documents a query). For each variant: the first call
(compilation included), the median ms per query, and torch.profiler's top kernels. The variants:

- eager: SDPA picks its kernel (cuDNN on an H100);
- compiled / compiled-max-autotune: the whole encoder compiled (what `scaledown-bench --compile` does) / with
  inductor's matmul autotuning (mode "max-autotune-no-cudagraphs");
- eager-efficient / eager-no-cudnn: SDPA limited to the memory-efficient kernel / to everything but cuDNN;
- compiled-efficient: the whole encoder compiled, SDPA limited to the memory-efficient kernel;
- compiled-blocks: each of the encoder's blocks (`_no_split_modules`) compiled, the masks built eagerly;
- compiled-coordinate-descent: the whole encoder compiled, inductor tuning each fused element-wise kernel's launch
  configuration (`coordinate_descent_tuning`);
- compiled-graphs: the whole encoder compiled and replayed from CUDA graphs (mode "reduce-overhead");
- memory-rows / compiled-memory-rows: the fast path's compression (`compress_batch`), which runs ModernBERT's last
  layer on the memory and RR rows only, eager / compiled by `compile_compressor` (what `scaledown-bench --engine
  static --compile` times). Every other variant runs the whole encoder (`compress_tensors`).

Any variant followed by `-chunksN` (`compiled-chunks16`) compresses the batch N documents at a time, so that the
tensors passed between one layer's kernels can stay in the GPU's L2 cache instead of going out to memory.

NOTES.md holds the H100 numbers.
"""

import contextlib
import re
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scaledown.evaluation import bench
from scaledown.fast_generation import compile_compressor, compress_batch
from scaledown.evaluation.evaluate import resolve_device, resolve_dtype

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from phase_times import median_ms, print_top_kernels  # noqa: E402

BACKENDS = {  # variant -> the SDPA kernels it may use (None: SDPA's own choice)
    "eager": None,
    "compiled": None,
    "compiled-max-autotune": None,
    "eager-efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "eager-no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "compiled-efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "compiled-blocks": None,
    "compiled-coordinate-descent": None,
    "compiled-graphs": None,
    "memory-rows": None,
    "compiled-memory-rows": None,
}


def split_variant(variant: str) -> tuple[str, int | None]:
    """`compiled-chunks16` -> ("compiled", 16); a variant without the suffix compresses the batch at once."""
    match = re.fullmatch(r"(.+)-chunks(\d+)", variant)
    if match is None:
        return variant, None
    return match.group(1), int(match.group(2))


@torch.no_grad()
def compress_in_chunks(model, inputs: dict[str, torch.Tensor], chunk_documents: int) -> torch.Tensor:
    """The memory vectors `(n_documents, l, generator_hidden)`, compressing `chunk_documents` rows at a time."""
    ids, mask = inputs["compressor_input_ids"], inputs["compressor_attention_mask"]
    chunks = []
    for start in range(0, ids.shape[0], chunk_documents):
        torch.compiler.cudagraph_mark_step_begin()  # each chunk's vectors are read before the next replay
        vectors, _ = model.compress_tensors(ids[start : start + chunk_documents], mask[start : start + chunk_documents])
        chunks.append(vectors)
    return torch.cat(chunks)


def main() -> None:
    parser = bench.build_parser()
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--variants",
        default=",".join(BACKENDS),
        help=f"comma-separated, from {list(BACKENDS)}, each optionally with -chunksN",
    )
    parser.add_argument("--top_kernels", type=int, default=12, help="rows of each variant's kernel table")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _, generator, tokenizer, _, _, names, protocol = bench._load_models(args, device, dtype, print)
    questions, documents = bench.synthetic_requests(tokenizer, protocol, args.batch_size, seed=args.seed)
    for variant in args.variants.split(","):
        base, chunk_documents = split_variant(variant)
        backends = BACKENDS[base]
        if base.endswith("memory-rows") and chunk_documents is not None:
            raise SystemExit(f"{variant}: the memory-rows variants compress the batch at once; drop -chunks")
        torch._dynamo.reset()  # each variant compiles a new model: no recompilation limit carried over
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak printed below is this variant's own
        torch.manual_seed(args.seed)
        model = bench.build_random_scaledown(
            names[0], generator, tokenizer, args.shape, protocol, device, dtype, args.attn_implementation
        )
        bench.set_encoder_attention(model, args.encoder_attn_implementation)
        side = bench.CompressedSide(names[0], model, protocol, torch.finfo(dtype).bits // 8, "static")
        batch = side.prepare(questions, documents, device)
        if base in ("compiled", "compiled-efficient"):
            model.compressor.compile()
        elif base == "compiled-coordinate-descent":
            model.compressor.compile(options={"coordinate_descent_tuning": True})
        elif base == "compiled-max-autotune":
            model.compressor.compile(mode="max-autotune-no-cudagraphs")
        elif base == "compiled-graphs":
            model.compressor.compile(mode="reduce-overhead")
        elif base == "compiled-memory-rows":
            compile_compressor(model)
        elif base == "compiled-blocks":
            blocks = set(model.compressor._no_split_modules or [])
            for block in model.compressor.modules():
                if type(block).__name__ in blocks:
                    block.compile()

        rows = batch.inputs["compressor_input_ids"].shape[0]

        def compress(model=model, batch=batch, backends=backends, rows_only=base.endswith("memory-rows")):
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                if rows_only:
                    return compress_batch(model, batch.inputs)
                return compress_in_chunks(model, batch.inputs, chunk_documents or rows)

        try:
            start = time.perf_counter()
            compress()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"{variant} first call s {time.perf_counter() - start:.1f}", flush=True)
            print(f"{variant} {median_ms(compress, device, args.repeats) / args.batch_size:.3f} ms/q", flush=True)
            if device.type == "cuda":
                print(f"{variant} peak GB {torch.cuda.max_memory_allocated(device) / 1e9:.1f}", flush=True)
            print_top_kernels(variant, compress, rows=args.top_kernels)
        except RuntimeError as error:  # an SDPA kernel this device lacks (the CPU has only the math one)
            print(f"{variant} not available here: {str(error).splitlines()[0]}", flush=True)

if __name__ == "__main__":
    main()
