"""`scaledown-bench`: cost of compressed against uncompressed RAG under OSCAR's protocol (oscar.md section 4).

Protocol: a 128-token query, 10 documents of 128 tokens, 32 generated tokens (forced with min_new_tokens, so both
sides decode the same number of steps), greedy, batch sizes 1, 32 and the largest that fits (up to 256).

Both sides run the same engine: the uncompressed side is the generator (LoRA off) reading the document text; the
compressed side is ScaleDown (compression, then generation from vectors). `--engine generate` is transformers'
`generate`; `--engine static` is `scaledown.fast_generation` (static KV cache, decode step replayed as a CUDA graph;
N-layers compressors compute each question's prefix once). The analytic FLOPs and roofline still charge the query
to every compressor row (the "honest" convention), so prefix sharing shows as time below that model.
Wall clock covers compression and generation, not tokenisation; warm-up runs are excluded; the median of the repeats
is reported, per query (batch time / batch size), with peak GPU memory.

Models are random-weight copies of real shapes built from configs written below (no download), or a real checkpoint:

    scaledown-bench --shape mistral-7b --compressor 5l,8l,10l,modernbert-base --output_dir results/
    scaledown-bench --checkpoint my-scaledown
    scaledown-bench --shape tiny --batch_sizes 1,2            # seconds on a CPU
"""

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedTokenizerFast

from ..configuration_scaledown import DEFAULT_SYSTEM_PROMPT, ScaleDownConfig
from ..fast_generation import (
    DECODE_ATTENTION_KERNEL,
    DECODE_ATTENTION_KERNELS,
    FLEX_BLOCK_PREFIX,
    SHARED_PREFIX_MIN_FRACTION,
    SHARED_PREFIX_MIN_TOKENS,
    SUFFIX_ATTENTION_KERNEL,
    SUFFIX_ATTENTION_KERNELS,
    StaticGreedyGenerator,
    compile_compressor,
    compile_elementwise_work,
    compress_batch,
    compression_path,
    flex_attention_with_block_size,
    generate_compressed,
    generate_compressed_overlapped,
    stack_projections,
)
from ..fused_layers import fuse_residual_norms
from ..modeling_scaledown import ScaleDownForCausalLM, text_prompt
from ..toy_models import SPECIAL_TOKENS, wrap_tokenizer
from .evaluate import (
    adapters_disabled,
    format_table,
    generate_with_base_generator,
    resolve_device,
    resolve_dtype,
    synchronize,
    tokenize_text_prompts,
)
from .flops import Hardware, Phase, TransformerShape, compressor_phase, detect_hardware, generator_phases

# Generator shapes, from the published config.json of each model (no weights are needed to time a random copy).
GENERATOR_SHAPES = {
    "mistral-7b": dict(  # mistralai/Mistral-7B-Instruct-v0.2
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        rms_norm_eps=1e-5,
    ),
    "llama-3.1-8b": dict(  # meta-llama/Llama-3.1-8B-Instruct (its rope scaling changes no cost, so it is left out)
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
    ),
    "qwen2-7b": dict(  # Qwen/Qwen2-7B-Instruct
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
    ),
    "tiny": dict(  # CPU-sized, deep enough for the 10-layer compressor
        model_type="llama",
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=10,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),
}
ENCODER_SHAPES = {
    "modernbert-base": dict(  # answerdotai/ModernBERT-base
        model_type="modernbert",
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=22,
        num_attention_heads=12,
        vocab_size=50368,
        max_position_embeddings=8192,
        global_attn_every_n_layers=3,
        local_attention=128,
    ),
    "tiny": dict(
        model_type="modernbert",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),
}
ENCODER_COMPRESSORS = ("modernbert-base",)
DEFAULT_COMPRESSORS = "5l,8l,10l,modernbert-base"
# torch.compile modes for --compile_mode ("default": torch.compile's own, the matrix products left to cuBLAS)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
BATCH_CANDIDATES = (1024, 768, 640, 512, 384, 256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # tried from the top

# Words of the synthetic queries and documents; with the bench's word-level tokenizer each word is one token.
TEXT_WORDS = (
    "river mountain history science city music energy garden winter ocean language market village museum planet "
    "forest engine library island teacher doctor season bridge painting festival harbor desert valley castle "
    "railway empire author novel theory element climate battle kingdom station mineral orchestra province"
).split()


@dataclass(frozen=True)
class Protocol:
    query_tokens: int = 128
    document_tokens: int = 128
    num_documents: int = 10
    new_tokens: int = 32
    memory_tokens: int = 8  # 16x compression of 128-token documents


# ---- tokenizers and models of real shapes ----------------------------------------------------------------------
def _word_level_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A tokenizer where each word is one token, so synthetic texts have exactly the protocol's token counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = SPECIAL_TOKENS[kind]
    prompt_words = DEFAULT_SYSTEM_PROMPT.replace(".", " ").replace(",", " ").split()
    words = list(dict.fromkeys(TEXT_WORDS + prompt_words + ["Background", "Question", "Document", "Query", "Answer"]))
    vocabulary = specials + words + list("0123456789:.,?")
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocabulary)}, unk_token=specials[3]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    return wrap_tokenizer(tokenizer, kind)


def _special_token_ids(tokenizer) -> dict:
    ids = dict(pad_token_id=tokenizer.pad_token_id)
    if tokenizer.cls_token_id is not None:  # an encoder's
        ids.update(
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
    else:
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return ids


def preset_shape(preset: dict) -> TransformerShape:
    """The layer geometry of a shape preset (`GENERATOR_SHAPES`, `ENCODER_SHAPES`), without building weights."""
    fields = dict(preset)
    return TransformerShape.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def _config(shape: dict, tokenizer, attn_implementation: str):
    fields = dict(shape)
    config = AutoConfig.for_model(
        fields.pop("model_type"), **fields, **_special_token_ids(tokenizer), tie_word_embeddings=False
    )
    config._attn_implementation = attn_implementation
    return config


def _random_model(auto_class, config, device: torch.device, dtype: torch.dtype):
    """Random weights built directly on the device (a 7B model never passes through CPU memory)."""
    with torch.device(device):
        model = auto_class.from_config(config, dtype=dtype)
    return model.to(device).eval()


def set_encoder_attention(model: ScaleDownForCausalLM, implementation: str | None) -> None:
    """Give an encoder compressor its own attention implementation (None: keep it). The generator, and an N-layers
    compressor that shares its code paths, keep theirs."""
    if implementation and model.config.uses_encoder_compressor:
        if implementation.startswith(FLEX_BLOCK_PREFIX):
            flex_attention_with_block_size(implementation)
        model.compressor.set_attn_implementation(implementation)


def change_layers(module: torch.nn.Module, args) -> list[str]:
    """`--stack_projections` and `--fuse_residual_norms` on a generator or an N-layers compressor, before anything is
    compiled (the stacked MLPs are blocks to compile); what each did."""
    said = [f"stacked the {stack_projections(module)}"] if args.stack_projections else []
    return said + ([f"fused the {fuse_residual_norms(module)}"] if args.fuse_residual_norms else [])


def layer_levers_stem(args) -> str:
    """The file-name part that names the layer levers on (`change_layers` and `--fused_decode`)."""
    levers = (
        (args.stack_projections, "_stacked"),
        (args.fuse_residual_norms, "_residual-norms"),
        (args.fused_decode, "_fused-decode"),
    )
    return "".join(part for on, part in levers if on)


def change_compressor_layers(model: ScaleDownForCausalLM, args) -> list[str]:
    """`change_layers` on an N-layers compressor; nothing for an encoder compressor, whose layers are not of the Llama
    family."""
    return [] if model.config.uses_encoder_compressor else change_layers(model.compressor, args)


def compressor_layers(name: str) -> int | None:
    """'8l' -> 8 (an N-layers compressor); None for an encoder name."""
    if name.lower().endswith("l") and name[:-1].isdigit():
        return int(name[:-1])
    if name.lower() in ENCODER_COMPRESSORS:
        return None
    raise ValueError(
        f"Unknown compressor {name!r}: use N-layer names such as 5l, 8l, 10l, or one of {ENCODER_COMPRESSORS}."
    )


def build_random_scaledown(
    name: str,
    generator,
    generator_tokenizer,
    shape: str,
    protocol: Protocol,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str,
) -> ScaleDownForCausalLM:
    """A ScaleDown model around the shared random generator, with a random compressor of the named kind (no LoRA)."""
    num_layers = compressor_layers(name)
    common = dict(
        generator_name_or_path=f"random-{shape}",
        num_memory_tokens=protocol.memory_tokens,
        max_document_length=protocol.document_tokens,
        max_query_length=protocol.query_tokens,  # the compressor reads the whole query: the honest convention
        lora_r=0,  # a served model merges its LoRA into the generator, so random shapes go without
    )
    generator_tokenizer = copy.deepcopy(generator_tokenizer)
    if num_layers is not None:
        compressor_config = copy.deepcopy(generator.config)
        compressor_config.num_hidden_layers = num_layers
        if isinstance(getattr(compressor_config, "layer_types", None), list):
            compressor_config.layer_types = compressor_config.layer_types[:num_layers]
        compressor = _random_model(AutoModel, compressor_config, device, dtype)
        config = ScaleDownConfig(compressor_type="n_layers", num_compressor_layers=num_layers, **common)
        compressor_tokenizer = copy.deepcopy(generator_tokenizer)
    else:
        compressor_tokenizer = _word_level_tokenizer("encoder")
        encoder_shape = ENCODER_SHAPES["tiny" if shape == "tiny" else name]
        compressor = _random_model(
            AutoModel, _config(encoder_shape, compressor_tokenizer, attn_implementation), device, dtype
        )
        config = ScaleDownConfig(compressor_type="encoder", compressor_name_or_path=f"random-{name}", **common)
    with torch.device(device):
        model = ScaleDownForCausalLM(
            config,
            generator=generator,
            compressor=compressor,
            generator_tokenizer=generator_tokenizer,
            compressor_tokenizer=compressor_tokenizer,
        )
    return model.to(device).eval()


# ---- synthetic requests ----------------------------------------------------------------------------------------
def synthetic_text(tokenizer, num_tokens: int, rng: random.Random) -> str:
    """Random words cut to `num_tokens` tokens of `tokenizer` (exact for the word-level tokenizer, close for others)."""
    words = " ".join(rng.choices(TEXT_WORDS, k=2 * num_tokens + 8))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


def synthetic_requests(tokenizer, protocol: Protocol, count: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    questions = [synthetic_text(tokenizer, protocol.query_tokens, rng) for _ in range(count)]
    documents = [
        [synthetic_text(tokenizer, protocol.document_tokens, rng) for _ in range(protocol.num_documents)]
        for _ in range(count)
    ]
    return questions, documents


# ---- the two sides ---------------------------------------------------------------------------------------------
@dataclass
class PreparedBatch:
    """Device tensors of one batch, and what the analytic cost model needs to know about them."""

    inputs: dict
    phases: dict[str, list[Phase]]  # convention ("paper", "honest") -> phases
    generator_prompt_tokens: float  # mean over the batch
    compressor_tokens: dict[str, float] | None = None  # convention -> mean tokens per document row


def static_engine(generator, engine: str, engine_options: dict | None = None) -> StaticGreedyGenerator | None:
    """The side's fast engine for `--engine static` (engine_options: `StaticGreedyGenerator`'s keyword arguments);
    None for transformers' `generate`."""
    if engine != "static":
        return None
    return StaticGreedyGenerator(generator, **(engine_options or {}))


class UncompressedSide:
    """The base generator reading the full document text."""

    name = "uncompressed"
    batches_per_run = 1

    def __init__(
        self,
        generator,
        tokenizer,
        system_prompt: str,
        pad_token_id: int,
        protocol: Protocol,
        dtype_bytes: int,
        engine: str = "generate",
        engine_options: dict | None = None,
    ):
        self.generator, self.tokenizer, self.system_prompt = generator, tokenizer, system_prompt
        self.pad_token_id, self.protocol, self.dtype_bytes = pad_token_id, protocol, dtype_bytes
        self.shape = TransformerShape.from_config(generator.config)
        self.fast = static_engine(generator, engine, engine_options)

    def prepare(self, questions: list[str], documents: list[list[str]], device: torch.device) -> PreparedBatch:
        prompts = [text_prompt(self.tokenizer, q, docs, self.system_prompt) for q, docs in zip(questions, documents)]
        inputs = tokenize_text_prompts(self.tokenizer, prompts, device)
        lengths = inputs["attention_mask"].sum(-1).tolist()
        phases = generator_phases(self.shape, lengths, self.protocol.new_tokens, self.dtype_bytes)
        return PreparedBatch(inputs, {"paper": phases, "honest": phases}, sum(lengths) / len(lengths))

    def run(self, batch: PreparedBatch) -> torch.Tensor:
        tokens = self.protocol.new_tokens
        if self.fast is not None:
            with adapters_disabled(self.generator):  # prefill and graph capture both run without LoRA
                return self.fast.generate(**batch.inputs, max_new_tokens=tokens, pad_token_id=self.pad_token_id)
        return generate_with_base_generator(
            self.generator, batch.inputs, self.pad_token_id, min_new_tokens=tokens, max_new_tokens=tokens
        )


class CompressedSide:
    """ScaleDown: compression of every (query, document) pair, then generation from the compressed vectors."""

    def __init__(
        self,
        name: str,
        model: ScaleDownForCausalLM,
        protocol: Protocol,
        dtype_bytes: int,
        engine: str = "generate",
        overlap_batches: int = 1,
        engine_options: dict | None = None,
    ):
        self.name, self.model, self.protocol, self.dtype_bytes = name, model, protocol, dtype_bytes
        self.fast = static_engine(model.generator, engine, engine_options)
        if overlap_batches > 1 and self.fast is None:
            raise ValueError("--overlap_batches needs --engine static (the overlap runs beside its decode graphs).")
        self.batches_per_run = overlap_batches  # a run answers the batch this many times, as a stream
        self.generator_shape = TransformerShape.from_config(model.generator.config)
        self.compressor_shape = TransformerShape.from_config(model.compressor.config)

    def prepare(self, questions: list[str], documents: list[list[str]], device: torch.device) -> PreparedBatch:
        model, config = self.model, self.model.config
        share_queries = self.fast is not None and config.compressor_type == "n_layers"  # prefix computed once
        inputs = model.input_builder(questions, documents, return_query_lengths=share_queries)
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        prompt_lengths = inputs["attention_mask"].sum(-1).tolist()
        honest_rows = inputs["compressor_attention_mask"].sum(-1).tolist()  # prefix, query, markers, document, MEM
        flat_documents = [d for docs in documents for d in docs]
        document_ids = model.compressor_tokenizer(flat_documents, add_special_tokens=False)["input_ids"]
        paper_rows = [min(len(ids), config.max_document_length) + config.num_memory_tokens for ids in document_ids]
        generation = generator_phases(self.generator_shape, prompt_lengths, self.protocol.new_tokens, self.dtype_bytes)
        connector = model.connector[0].out_features if model.connector is not None else None

        def compression(rows: list[int]) -> Phase:
            return compressor_phase(
                self.compressor_shape,
                rows,
                config.num_memory_tokens,
                self.generator_shape.hidden_size,
                connector_hidden_size=connector,
                rerank_head=model.rerank_head is not None,
                bytes_per_value=self.dtype_bytes,
            )

        return PreparedBatch(
            inputs,
            {"paper": [compression(paper_rows), *generation], "honest": [compression(honest_rows), *generation]},
            sum(prompt_lengths) / len(prompt_lengths),
            {"paper": sum(paper_rows) / len(paper_rows), "honest": sum(honest_rows) / len(honest_rows)},
        )

    def run(self, batch: PreparedBatch) -> torch.Tensor:
        tokens = self.protocol.new_tokens
        if self.batches_per_run > 1:  # compression of each next batch beside the current one's decoding
            stream = [batch.inputs] * self.batches_per_run
            return generate_compressed_overlapped(self.model, stream, self.fast, tokens, stop_at_eos=False)[-1]
        if self.fast is not None:  # no EOS stop: both sides decode exactly `tokens` steps
            return generate_compressed(self.model, batch.inputs, self.fast, tokens, stop_at_eos=False)
        return self.model.generate(**batch.inputs, min_new_tokens=tokens, max_new_tokens=tokens)

    def compression_path(self, batch: PreparedBatch) -> str:
        """What `compress` runs (`fast_generation.compression_path` beside the static engine)."""
        return "whole compressor" if self.fast is None else compression_path(self.model, batch.inputs)

    @torch.no_grad()
    def compress(self, batch: PreparedBatch):
        """The compression `run` does: the fast path's (`compress_batch`) beside the static engine, the model's own
        beside `generate`."""
        if self.fast is None:
            return self.model.compress_tensors(
                batch.inputs["compressor_input_ids"], batch.inputs["compressor_attention_mask"]
            )
        return compress_batch(self.model, batch.inputs)


# ---- measurement -----------------------------------------------------------------------------------------------
def timed_runs(function: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        function()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def kernel_profile_table(function: Callable[[], object], device: torch.device, rows: int = 40) -> str:
    """One run of `function` under torch.profiler; its most expensive operators and kernels as a table, by device
    time on a GPU (CPU time elsewhere): where a phase's or a side's time goes."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        function()
        synchronize(device)
    return profiler.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=rows)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OOM error, or the cuBLAS/cuDNN allocation failures that the same shortage can surface as."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        marker in str(error) for marker in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")
    )


def fits(side, requests, batch_size: int, device: torch.device) -> bool:
    """Whether one full run at this batch size completes without running out of GPU memory."""
    failed = False
    try:
        side.run(side.prepare(requests[0][:batch_size], requests[1][:batch_size], device))
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        failed = True  # memory is released below, once the exception and its frames are gone
    _free_memory(device)
    return not failed


def largest_batch_that_fits(side, requests, max_batch_size: int, device: torch.device) -> int:
    """Try batch sizes from `max_batch_size` down on the GPU; on a CPU, running out of memory cannot be caught."""
    if device.type != "cuda":
        return max_batch_size
    for batch_size in [max_batch_size] + [c for c in BATCH_CANDIDATES if c < max_batch_size]:
        if fits(side, requests, batch_size, device):
            return batch_size
    raise RuntimeError(f"The {side.name} side does not fit even one query on {device}.")


def measure(
    side,
    requests,
    batch_size: int,
    label: str,
    device: torch.device,
    warmup: int,
    repeats: int,
    hardware: Hardware | None,
    profile_path: str | None = None,
) -> dict:
    """Time one side at one batch size, and put the measured numbers next to the analytic ones; with `profile_path`,
    one more run goes through torch.profiler and its kernel table is written there."""
    batch = side.prepare(requests[0][:batch_size], requests[1][:batch_size], device)
    new_tokens = side.run(batch)  # also a warm-up run
    if new_tokens.shape[1] != side.protocol.new_tokens:
        raise RuntimeError(f"{side.name} generated {new_tokens.shape[1]} tokens instead of {side.protocol.new_tokens}.")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = timed_runs(lambda: side.run(batch), device, max(warmup - 1, 0), repeats)
    seconds = [run / side.batches_per_run for run in runs]  # per batch
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    compression_seconds = None
    if isinstance(side, CompressedSide):
        # The end-to-end runs have already warmed the compressor up.
        compression_seconds = statistics.median(timed_runs(lambda: side.compress(batch), device, 0, repeats))
    if profile_path is not None:
        with open(profile_path, "w") as handle:  # where this side's time goes when two runs differ
            handle.write(kernel_profile_table(lambda: side.run(batch), device) + "\n")
    median = statistics.median(seconds)
    honest, paper = batch.phases["honest"], batch.phases["paper"]
    record = {
        "side": "uncompressed" if isinstance(side, UncompressedSide) else "compressed",
        "compressor": None if isinstance(side, UncompressedSide) else side.name,
        "batch": label,
        "batch_size": batch_size,
        "seconds_median": median,
        "seconds_all": seconds,
        "ms_per_query": 1000 * median / batch_size,
        "compression_ms_per_query": 1000 * compression_seconds / batch_size
        if compression_seconds is not None
        else None,
        "peak_memory_gb": peak_gb,
        "generator_prompt_tokens": batch.generator_prompt_tokens,
        "compressor_tokens_per_document": batch.compressor_tokens,
        "tflops_per_query": {
            "paper": sum(p.flops for p in paper) / batch_size / 1e12,
            "honest": sum(p.flops for p in honest) / batch_size / 1e12,
        },
        "tflops_per_query_by_phase": {p.name: p.flops / batch_size / 1e12 for p in honest},
        "gb_moved_per_query": sum(p.bytes for p in honest) / batch_size / 1e9,
        "roofline_ms_per_query": None,
        "roofline_fraction": None,
        "decode_attention_kernel": side.fast.attention_kernel if side.fast is not None else None,
        "decode_attention_kernel_ms": side.fast.attention_kernel_ms if side.fast is not None else None,
        "shared_prefix_tokens": side.fast.last_shared_prefix if side.fast is not None else None,
        "compression_path": side.compression_path(batch) if isinstance(side, CompressedSide) else None,
    }
    suffix_attention = side.fast.last_suffix_attention if side.fast is not None else None
    record["suffix_attention_kernel"], record["suffix_attention_kernel_ms"] = suffix_attention or (None, None)
    if hardware is not None:
        best = sum(p.best_seconds(hardware) for p in honest)
        record["roofline_ms_per_query"] = 1000 * best / batch_size
        record["roofline_fraction"] = best / median  # 1.0 would be the hardware's limit
    return record


def speedups(uncompressed: dict, compressed: dict) -> dict:
    """Per-query ratios uncompressed / compressed: measured, by FLOPs (both conventions) and by the roofline."""
    result = {
        "measured": uncompressed["ms_per_query"] / compressed["ms_per_query"],
        "flops_paper": uncompressed["tflops_per_query"]["honest"] / compressed["tflops_per_query"]["paper"],
        "flops_honest": uncompressed["tflops_per_query"]["honest"] / compressed["tflops_per_query"]["honest"],
        "roofline": None,
        "fraction_of_roofline": None,
    }
    if uncompressed["roofline_ms_per_query"] and compressed["roofline_ms_per_query"]:
        result["roofline"] = uncompressed["roofline_ms_per_query"] / compressed["roofline_ms_per_query"]
        result["fraction_of_roofline"] = result["measured"] / result["roofline"]
    return result


def bench_side(
    side, *, requests, batch_labels: list[str], max_batch_size: int, device, warmup, repeats, hardware, log,
    profile_stem: str | None = None,
) -> dict:
    """Measure one side at every batch label ("1", "32", "max"); a batch that runs out of memory is recorded as such.
    With `profile_stem`, each measured batch's kernel table goes to `{profile_stem}_{side}_b{batch size}.txt`."""
    records = {}
    for label in batch_labels:
        if label == "max":
            batch_size = largest_batch_that_fits(side, requests, max_batch_size, device)
        else:
            batch_size = int(label)
        while True:
            try:
                profile_path = f"{profile_stem}_{side.name}_b{batch_size}.txt" if profile_stem else None
                records[label] = measure(
                    side, requests, batch_size, label, device, warmup, repeats, hardware, profile_path
                )
                ms = records[label]["ms_per_query"]
                log(f"  {side.name:>15} batch {label:>3} (B={batch_size}): {ms:.2f} ms/query")
                break
            except RuntimeError as error:
                if not is_out_of_memory(error):
                    raise
            smaller = [c for c in BATCH_CANDIDATES if c < batch_size]
            if label != "max" or not smaller:
                break  # out of memory, reported below
            # One run fitted but the repeated runs did not (fragmentation): the largest is one step down.
            log(f"  {side.name:>15} batch {label:>3} (B={batch_size}): out of memory when repeated, trying {smaller[0]}")
            # Freed here, after the except block: until then the exception's frames hold the failed run's tensors,
            # and every smaller batch tried would run out of memory too.
            _free_memory(device)
            batch_size = smaller[0]
        if label not in records:
            compressed = isinstance(side, CompressedSide)
            records[label] = {
                "side": "compressed" if compressed else "uncompressed",
                "compressor": side.name if compressed else None,
                "batch": label,
                "batch_size": batch_size,
                "error": "out of memory",
            }
            log(f"  {side.name:>15} batch {label:>3} (B={batch_size}): out of memory")
        _free_memory(device)
    return records


# ---- reporting -------------------------------------------------------------------------------------------------
def bench_table(results: list[dict]) -> str:
    headers = [
        "side",
        "batch",
        "B",
        "ms/query",
        "compress ms/q",
        "peak GB",
        "TFLOP/q paper",
        "TFLOP/q honest",
        "roofline ms/q",
        "of roofline",
        "speed-up",
        "FLOPs x paper",
        "FLOPs x honest",
        "roofline x",
    ]
    rows = []
    for r in results:
        name = r["compressor"] or r["side"]
        if "error" in r:
            rows.append([name, r["batch"], r["batch_size"], r["error"]] + [None] * (len(headers) - 4))
            continue
        s = r.get("speedup") or {}
        rows.append(
            [
                name,
                r["batch"],
                r["batch_size"],
                r["ms_per_query"],
                r["compression_ms_per_query"],
                r["peak_memory_gb"],
                r["tflops_per_query"]["paper"],
                r["tflops_per_query"]["honest"],
                r["roofline_ms_per_query"],
                r["roofline_fraction"],
                s.get("measured"),
                s.get("flops_paper"),
                s.get("flops_honest"),
                s.get("roofline"),
            ]
        )
    return format_table(headers, rows)


def _grouped_bars(
    axis, labels: list[str], series: dict[str, tuple[list[float], list[float | None]]], colors: dict[str, str]
) -> None:
    """Bars of measured values per batch label and series, with a black dash at each series' roofline value."""
    width = 0.8 / max(len(series), 1)
    drew_roofline = False
    for index, (name, (measured, roofline)) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(positions, measured, width, label=name, color=colors[name])
        points = [(x, y) for x, y in zip(positions, roofline) if y is not None]
        if points:
            axis.scatter(
                *zip(*points), marker="_", s=300, color="black", zorder=3, label=None if drew_roofline else "roofline"
            )
            drew_roofline = True
    axis.set_xticks(range(len(labels)), [f"batch {label}" for label in labels])
    if series:  # the speed-up panel is empty until a compressed side has been measured
        axis.legend(fontsize="small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))


def plot_bench(results: list[dict], path: str, title: str) -> None:
    """Left: ms per query of each side at each batch; right: each compressor's speed-up, measured and roofline."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    labels = list(dict.fromkeys(r["batch"] for r in ok))
    sides = list(dict.fromkeys(r["compressor"] or r["side"] for r in ok))
    by_key = {(r["compressor"] or r["side"], r["batch"]): r for r in ok}

    def values(side: str, field: str, inner: str | None = None) -> list:
        found = [by_key.get((side, label), {}) for label in labels]
        if inner is not None:
            found = [record.get(inner) or {} for record in found]
        return [record.get(field) for record in found]

    colors = {side: f"C{index}" for index, side in enumerate(sides)}  # one colour per side in both panels
    figure, (time_axis, speed_axis) = plt.subplots(1, 2, figsize=(13, 5))
    _grouped_bars(
        time_axis,
        labels,
        {
            side: ([v or 0 for v in values(side, "ms_per_query")], values(side, "roofline_ms_per_query"))
            for side in sides
        },
        colors,
    )
    time_axis.set_yscale("log")
    time_axis.set_ylabel("ms per query")
    time_axis.set_title("time per query")
    _grouped_bars(
        speed_axis,
        labels,
        {
            side: ([v or 0 for v in values(side, "measured", "speedup")], values(side, "roofline", "speedup"))
            for side in sides
            if side != "uncompressed"
        },
        colors,
    )
    speed_axis.axhline(1.0, color="gray", linewidth=0.8)
    speed_axis.set_ylabel("uncompressed time / compressed time")
    speed_axis.set_title("speed-up")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaledown-bench", description="Wall clock, memory, FLOPs and roofline of compressed vs uncompressed RAG."
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--shape", default="mistral-7b", choices=sorted(GENERATOR_SHAPES), help="random weights, real shape"
    )
    source.add_argument("--checkpoint", default=None, help="a ScaleDown checkpoint instead of random weights")
    parser.add_argument(
        "--compressor", default=DEFAULT_COMPRESSORS, help="with --shape: comma-separated 5l,8l,10l,modernbert-base"
    )
    parser.add_argument("--batch_sizes", default="1,32,max", help="comma-separated sizes; 'max' = largest that fits")
    parser.add_argument("--max_batch_size", type=int, default=256, help="where the search for 'max' starts")
    parser.add_argument("--query_tokens", type=int, default=128)
    parser.add_argument("--document_tokens", type=int, default=128)
    parser.add_argument("--num_documents", type=int, default=10)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--memory_tokens", type=int, default=8, help="with --shape: vectors per document (8 = 16x)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs before the timed ones (the first run, which checks the output length, is one)",
    )
    parser.add_argument("--device", default="auto", help="auto picks cuda when available")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each side's timed runs, one more under torch.profiler: its kernel table goes beside the JSON "
        "report as <stem>_profile_<side>_b<batch>.txt",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument(
        "--encoder_attn_implementation",
        default=None,
        help="attention of an encoder compressor if not --attn_implementation's (e.g. flex_attention, or "
        "flex_attention_block64x32 for flex attention with 64 x 32 tiles, the fastest for ModernBERT on an H100); "
        "N-layers compressors keep the generator's",
    )
    parser.add_argument(
        "--engine",
        default="generate",
        choices=["generate", "static"],
        help="generation engine of both sides: transformers' generate, or static cache + CUDA-graph decoding",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the generator's norms, MLPs and rotary embedding (both sides) and each compressor",
    )
    parser.add_argument(
        "--compile_mode",
        default="default",
        choices=COMPILE_MODES,
        help="with --compile: torch.compile's mode for the norm and MLP blocks of the generator and of N-layers "
        "compressors; max-autotune-no-cudagraphs also times Triton matrix products against cuBLAS per shape",
    )
    parser.add_argument(
        "--stack_projections",
        action="store_true",
        help="run each attention's query, key and value products and each MLP's gate and up products as one "
        "product (Llama, Mistral, Qwen2 layers: the generator, both sides, and N-layers compressors)",
    )
    parser.add_argument(
        "--fuse_residual_norms",
        action="store_true",
        help="run each residual sum with the norm after it (scaledown.fused_layers.fuse_residual_norms: Llama, "
        "Mistral, Qwen2 layers of the generator, both sides, and of N-layers compressors; compiled on CUDA)",
    )
    parser.add_argument(
        "--fused_decode",
        action="store_true",
        help="static engine, both sides: each decode step through scaledown.fused_layers (a layer's residual sums "
        "fused with its norms, its rotary embedding with its cache writes; compiled on CUDA, in --compile_mode "
        "with --compile) instead of the generator's forward",
    )
    parser.add_argument(
        "--overlap_batches",
        type=int,
        default=1,
        help="compressed sides, static engine: time a stream of this many batches, each next batch compressed on a "
        "side CUDA stream while the current one decodes (times stay per query)",
    )
    parser.add_argument(
        "--decode_attention_kernel",
        default=DECODE_ATTENTION_KERNEL,
        choices=("auto",) + DECODE_ATTENTION_KERNELS,
        help="static engine: the decode steps' attention kernel, both sides (auto: the faster of sdpa and flex, timed "
        "on each batch shape's cache)",
    )
    parser.add_argument(
        "--shared_prefix_min_tokens",
        type=lambda text: None if text == "off" else int(text),
        default=SHARED_PREFIX_MIN_TOKENS,
        help="static engine: prefill the prompts' shared opening (chat template, system prompt) once per batch when "
        f"(batch - 1) x its length reaches this many tokens and it is at least {SHARED_PREFIX_MIN_FRACTION * 100:g}%% "
        "of the prompt, both sides; 'off' never does",  # "%%": argparse %-formats help strings
    )
    parser.add_argument(
        "--suffix_attention_kernel",
        default=SUFFIX_ATTENTION_KERNEL,
        choices=("auto",) + SUFFIX_ATTENTION_KERNELS,
        help="static engine: how the rest of each prompt attends after a shared prefix (auto: the fastest of "
        f"{', '.join(SUFFIX_ATTENTION_KERNELS)}, timed on each batch shape)",
    )
    parser.add_argument(
        "--prefill_last_layer",
        default="last_position",
        choices=("last_position", "every_position"),
        help="static engine: run the generator's last layer in a prefill on the last position only (it still caches "
        "every position's keys and values; exact) or on every position, both sides",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the detected dense bf16 peak")
    parser.add_argument("--peak_bandwidth_tbs", type=float, default=None, help="override the detected memory bandwidth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="bench_results")
    return parser


def compile_mode(args) -> str | None:
    """torch.compile's mode for `compile_elementwise_work` and `compile_compressor` (None: its default)."""
    return None if args.compile_mode == "default" else args.compile_mode


def static_engine_options(args) -> dict:
    """`StaticGreedyGenerator` keyword arguments from the bench's command line (both sides get the same)."""
    return dict(
        decode_attention_kernel=args.decode_attention_kernel,
        shared_prefix_min_tokens=args.shared_prefix_min_tokens,
        suffix_attention_kernel=args.suffix_attention_kernel,
        last_layer_on_last_position=args.prefill_last_layer == "last_position",
        fused_decode=args.fused_decode,
        fused_decode_mode=compile_mode(args) if args.compile else None,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _batch_labels(text: str) -> list[str]:
    labels = [label.strip().lower() for label in text.split(",") if label.strip()]
    for label in labels:
        if label != "max" and not (label.isdigit() and int(label) > 0):
            raise ValueError(f"--batch_sizes takes positive integers and 'max', got {label!r}.")
    return labels


def _settings(
    args,
    source: str,
    compressor_names: list[str],
    protocol: Protocol,
    labels: list[str],
    device,
    dtype,
    hardware: Hardware | None,
) -> dict:
    return {
        "source": source,
        "shape": None if args.checkpoint else args.shape,
        "compressors": compressor_names,
        "protocol": asdict(protocol),
        "batch_sizes": labels,
        "max_batch_size": args.max_batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": args.attn_implementation,
        "encoder_attn_implementation": args.encoder_attn_implementation or args.attn_implementation,
        "engine": {
            "generate": "transformers generate (greedy, min_new_tokens = max_new_tokens)",
            "static": "scaledown.fast_generation (greedy, static KV cache, CUDA-graph decode, no EOS stop)",
        }[args.engine],
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "stack_projections": args.stack_projections,
        "fuse_residual_norms": args.fuse_residual_norms,
        "fused_decode": args.fused_decode,
        "overlap_batches": args.overlap_batches,
        "decode_attention_kernel": args.decode_attention_kernel,
        "shared_prefix_min_tokens": args.shared_prefix_min_tokens,
        "suffix_attention_kernel": args.suffix_attention_kernel,
        "prefill_last_layer": args.prefill_last_layer,
        "hardware": asdict(hardware) if hardware is not None else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "notes": (
            "Times are per query (batch time / batch size). FLOPs: 'paper' counts the compressor over document + "
            "memory tokens only (OSCAR Table 1), 'honest' over every compressor token (query included); the "
            "uncompressed side has no compressor, so both are equal there. Speed-ups are uncompressed / compressed; "
            "roofline times use the honest phases; 'max' rows compare each side at its own largest batch."
        ),
    }


def save_report(report: dict, json_path: str, png_path: str) -> None:
    """Written after every side, so that a run stopped early still leaves what it measured."""
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    if any("error" not in r for r in report["results"]):
        plot_bench(
            report["results"], png_path, title=f"{report['settings']['source']} on {report['settings']['device']}"
        )


def _load_models(args, device: torch.device, dtype: torch.dtype, log) -> tuple:
    """(checkpoint model or None, generator, tokenizer, system prompt, source, compressor names, protocol)."""
    if args.checkpoint:
        model = ScaleDownForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
        config = model.config
        protocol = Protocol(
            args.query_tokens, args.document_tokens, args.num_documents, args.new_tokens, config.num_memory_tokens
        )
        names = [f"{config.num_compressor_layers}l" if config.compressor_type == "n_layers" else config.compressor_type]
        return model, model.generator, model.generator_tokenizer, config.system_prompt, args.checkpoint, names, protocol

    if device.type == "cpu" and args.shape != "tiny":
        log(f"Note: building the {args.shape} shape in CPU memory; --shape tiny is the CPU-sized one.")
    protocol = Protocol(
        args.query_tokens, args.document_tokens, args.num_documents, args.new_tokens, args.memory_tokens
    )
    names = [name.strip() for name in args.compressor.split(",") if name.strip()]
    depth = GENERATOR_SHAPES[args.shape]["num_hidden_layers"]
    for name in names:
        layers = compressor_layers(name)
        if layers is not None and layers > depth:
            raise ValueError(f"Compressor {name} is deeper than the {args.shape} generator ({depth} layers).")
    tokenizer = _word_level_tokenizer("decoder")
    torch.manual_seed(args.seed)
    config = _config(GENERATOR_SHAPES[args.shape], tokenizer, args.attn_implementation)
    generator = _random_model(AutoModelForCausalLM, config, device, dtype)
    return None, generator, tokenizer, DEFAULT_SYSTEM_PROMPT, f"random weights, {args.shape} shape", names, protocol


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_bytes = torch.finfo(dtype).bits // 8
    hardware = detect_hardware(device, args.peak_tflops, args.peak_bandwidth_tbs)
    labels = _batch_labels(args.batch_sizes)
    largest_needed = max(
        [int(label) for label in labels if label != "max"] + [args.max_batch_size if "max" in labels else 0]
    )

    def log(message: str) -> None:
        print(message, flush=True)

    model, generator, tokenizer, system_prompt, source, compressor_names, protocol = _load_models(
        args, device, dtype, log
    )
    requests = synthetic_requests(tokenizer, protocol, largest_needed, seed=args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"Bench on {_device_name(device)} ({dtype}), {source}: {protocol}")
    if hardware is None:
        log(
            "No peak numbers for this device: the roofline columns stay empty "
            "(give --peak_tflops and --peak_bandwidth_tbs)."
        )

    report = {
        "settings": _settings(args, source, compressor_names, protocol, labels, device, dtype, hardware),
        "results": [],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    stem = f"bench_{'checkpoint' if args.checkpoint else args.shape}_{'-'.join(compressor_names)}_{args.engine}"
    stem += "_compiled" if args.compile else ""
    stem += "-max-autotune" if args.compile and compile_mode(args) else ""
    stem += layer_levers_stem(args)
    stem += f"_encoder-{args.encoder_attn_implementation}" if args.encoder_attn_implementation else ""
    stem += f"_overlap{args.overlap_batches}" if args.overlap_batches > 1 else ""
    stem += f"_decode-{args.decode_attention_kernel}" if args.decode_attention_kernel != DECODE_ATTENTION_KERNEL else ""
    stem += "_no-shared-prefix" if args.shared_prefix_min_tokens is None else ""
    stem += f"_suffix-{args.suffix_attention_kernel}" if args.suffix_attention_kernel != SUFFIX_ATTENTION_KERNEL else ""
    stem += "_whole-last-layer" if args.prefill_last_layer == "every_position" else ""
    json_path, png_path = (os.path.join(args.output_dir, f"{stem}.{ext}") for ext in ("json", "png"))
    engine_options = static_engine_options(args)
    run_side = dict(
        requests=requests,
        batch_labels=labels,
        max_batch_size=args.max_batch_size,
        device=device,
        warmup=args.warmup,
        repeats=args.repeats,
        hardware=hardware,
        log=log,
        profile_stem=os.path.join(args.output_dir, f"{stem}_profile") if args.profile else None,
    )

    for said in change_layers(generator, args):
        log(f"generator: {said}")
    if args.compile:  # the generator is shared, so both sides run the same compiled blocks
        log(f"generator: compiled {compile_elementwise_work(generator, compile_mode(args))} (warm-up runs compile)")
    # The uncompressed side runs first with only the generator in memory (a checkpoint's compressor waits on the CPU),
    # so that its peak memory and largest batch are not charged for weights it does not use.
    if model is not None:
        model.compressor.to("cpu")
        _free_memory(device)
    uncompressed = bench_side(
        UncompressedSide(
            generator, tokenizer, system_prompt, pad_id, protocol, dtype_bytes, args.engine, engine_options
        ),
        **run_side,
    )
    if model is not None:
        model.compressor.to(device)
    report["results"].extend(uncompressed.values())
    save_report(report, json_path, png_path)

    for name in compressor_names:
        if model is None:
            torch.manual_seed(args.seed)
            scaledown = build_random_scaledown(
                name, generator, tokenizer, args.shape, protocol, device, dtype, args.attn_implementation
            )
        else:
            scaledown = model
        set_encoder_attention(scaledown, args.encoder_attn_implementation)
        for said in change_compressor_layers(scaledown, args):
            log(f"{name} compressor: {said}")
        if args.compile:
            log(f"{name} compressor: compiled {compile_compressor(scaledown, compile_mode(args))}")
        side = CompressedSide(
            name, scaledown, protocol, dtype_bytes, args.engine, args.overlap_batches, engine_options
        )
        compressed = bench_side(side, **run_side)
        for label, record in compressed.items():
            if "error" not in record and "error" not in uncompressed[label]:
                record["speedup"] = speedups(uncompressed[label], record)
            report["results"].append(record)
        save_report(report, json_path, png_path)
        del scaledown  # the next compressor reuses the generator; this one's weights can go
        _free_memory(device)

    print(bench_table(report["results"]))
    print(f"Wrote {json_path} and {png_path}")
    report["paths"] = {"json": json_path, "png": png_path}
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
