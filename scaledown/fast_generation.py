"""Greedy decoding with a static KV cache and the decode step captured as a CUDA graph.

`transformers`' `generate` spends most of a small batch's time in Python: at batch 1 on an H100 a 7B decode step
costs about 4 ms of weight reads and several times that in kernel launches and bookkeeping. This engine removes
that overhead for both sides of the comparison alike (the base generator reading text and ScaleDown reading
compressed vectors): the prompt is prefilled once through transformers' own path and its keys and values copied
into a `StaticCache`; every later step (forward pass, argmax, end-of-sequence bookkeeping, cache and mask updates) is
one CUDA-graph replay on fixed buffers. A small prompt without padding (batch 1, say) is prefilled by a graph replay
too, since its launches, not its arithmetic, set its time. Off CUDA the same steps run eagerly, which is what the
tests compare against `generate`.

Decode-step masks are given to the generator as 4D boolean tensors over cache slots, which every attention path of
transformers 4.57 and 5 passes through unchanged; a left-padded prompt keeps its padding slots in the cache, masked.

A large batch whose prompts open with the same tokens (chat template, system prompt) prefills that prefix once and
each row's remainder against its keys and values, as serving engines with prefix caching do: exact under causal
attention, and worth most to compressed prompts, whose shared template is a larger part of them.
"""

import contextlib
import functools
import re
import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ._compat import cache_keyword
from .fused_layers import LLAMA_FAMILIES, FusedDecode, rotate

# How a decode step's grouped attention is computed: "sdpa" lets PyTorch pick (cuDNN on an H100), the next three force
# one SDPA backend, "matmul" is two batched matrix products around a float32 softmax, "flex" is PyTorch's flex
# attention (compiled on CUDA: its split-key decoding kernel). `benchmarks/decode_attention.py` times them alone at the
# bench's shapes and `scaledown-bench --decode_attention_kernel` inside the engine. The engine's default, "auto", times
# AUTO_CANDIDATES on each new batch shape's own cache before capturing its graph and keeps the faster (on an H100 flex
# at the bench's larger batches, SDPA at batch 1: benchmarks/NOTES.md); off CUDA it is "sdpa".
DECODE_ATTENTION_KERNELS = ("sdpa", "cudnn", "efficient", "math", "matmul", "flex")
AUTO_CANDIDATES = ("sdpa", "flex")
DECODE_ATTENTION_KERNEL = "auto"
# A prompt of at most this many tokens (batch x length) and without padding is prefilled by replaying a CUDA graph:
# at batch 1 the prefill's time is its kernel launches, not its arithmetic (benchmarks/NOTES.md).
PREFILL_GRAPH_MAX_TOKENS = 2048
# The shared prefix is prefilled apart when the prompt tokens this spares, (batch - 1) x prefix length, reach this
# many. The extra pass costs about one read of the weights and the remainder's attention, which no fused kernel runs
# as fast as the square one; each spared token saves a token's share of the prefill's matrix products. On an H200
# (benchmarks/NOTES.md) sharing made ModernBERT's side 8% slower at batch 32 (992 spared tokens, 13.66 -> 14.73
# ms/query with the threshold at 512) and faster at 1,024; 2,048 keeps batch 32 on the plain prefill.
SHARED_PREFIX_MIN_TOKENS = 2048
# ... and when the prefix is at least this part of the prompt: the remainder's attention costs in proportion to the
# whole prompt ("padded" pads its queries back to the prompt's length). On an H100 (benchmarks/NOTES.md) a 35-token
# prefix of 1,474 (2.4%) made the uncompressed side 0.65% slower at batch 96, a 32-token prefix of 254 (12.6%) made
# ModernBERT's compressed side 4.6% faster at 512.
SHARED_PREFIX_MIN_FRACTION = 0.05
# How a shared prefix's remainder attends to the prompt's keys (causal, aligned to the last key): "padded" pads its
# queries in front to the whole prompt's square causal kernel, in the (batch, heads, length, head_dim) layout;
# "padded-bshd" does the same in the layout the query projection wrote, (batch, length, heads, head_dim), so that its
# input and output copies move whole rows; "masked" runs SDPA under the remainder's explicit mask with grouped heads
# read in place, cuDNN's kernel first on CUDA. None wins everywhere: on an H200, with the queries laid out as
# transformers hands them over, "masked" took 4.2 ms a layer at 1,024 x 254 ("padded-bshd" 6.3, "padded" 10.3, the
# square kernel over the same prompt 2.1) and "padded-bshd" won at 32 x 254 (benchmarks/NOTES.md). The default,
# "auto", times all three on each new shape before its prefill and keeps the fastest; off CUDA it is "padded".
SUFFIX_ATTENTION_KERNELS = ("padded", "padded-bshd", "masked")
SUFFIX_ATTENTION_KERNEL = "auto"


def _check_kernel(what: str, kernel: str, choices: tuple[str, ...], allow_auto: bool = False) -> None:
    choices = choices + (("auto",) if allow_auto else ())
    if kernel not in choices:
        raise ValueError(f"Unknown {what} kernel {kernel!r}; choose one of {choices}.")


def _flex_decode_attention(query, key, value, allowed_slots, scaling, kernel_options=None):
    from torch.nn.attention.flex_attention import flex_attention

    def keep_allowed(score, batch, head, query_index, slot):
        return torch.where(allowed_slots[batch, slot], score, -float("inf"))

    return flex_attention(query, key, value, score_mod=keep_allowed, scale=scaling, kernel_options=kernel_options)


@functools.cache
def _compiled_flex_decode_attention():
    # Static shapes: compiled for dynamic ones (torch.compile's default from a second shape on), the decoding kernel
    # lost to cuDNN at 512 x 286 slots in the bench; compiled for that shape it took 0.26 ms a layer against 0.32.
    # Autotuned among inductor's few candidate tiles: on an H100 flex's untuned tile (64 slots, one pipeline stage)
    # read that cache at 0.70 of the memory bandwidth, the tuned one (32 slots, three stages) at 0.81
    # (benchmarks/NOTES.md); compilation takes a few seconds longer per shape.
    # A shape past torch.compile's recompilation limit runs eagerly, and "auto" then keeps SDPA.
    return torch.compile(_flex_decode_attention, dynamic=False, mode="max-autotune-no-cudagraphs")


def _flex_grouped_attention(query, key, value, allowed, scaling):
    allowed_slots = allowed[:, 0, 0, :]  # (batch, slots)
    # eager flex attention is a reference implementation, not a fast kernel: compiled wherever it runs for speed
    attend = _compiled_flex_decode_attention() if query.is_cuda else _flex_decode_attention
    return attend(query, key, value, allowed_slots, scaling)


def _grouped_attention(query, key, value, allowed, scaling, kernel):
    """query `(batch, kv_heads, group, head_dim)` against key/value `(batch, kv_heads, slots, head_dim)`."""
    _check_kernel("decode attention", kernel, DECODE_ATTENTION_KERNELS)
    if kernel == "flex":
        return _flex_grouped_attention(query, key, value, allowed, scaling)
    if kernel == "matmul":
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, kv_heads, group, slots)
        weights = scores.float().masked_fill(~allowed, float("-inf")).softmax(-1).to(value.dtype)
        return torch.matmul(weights, value)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = dict(cudnn=SDPBackend.CUDNN_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION, math=SDPBackend.MATH)
    with sdpa_kernel(backends[kernel]):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)


def grouped_decode_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, kernel="sdpa", **kwargs
):
    """SDPA for one-token decoding under a mask without copying keys and values for every query head.

    With a mask, transformers' SDPA path repeats grouped key/value heads to the query heads' count (SDPA's own GQA
    would fall back to its math kernel on CUDA): a copy of the whole cache, per layer and step. For one query token
    the heads of a group can instead be laid out as the group's query positions: same scores, no copy.
    query: `(batch, heads, 1, head_dim)`; key, value: `(batch, kv_heads, slots, head_dim)`; attention_mask a
    `(batch, 1, 1, slots)` boolean. Returns `(batch, 1, heads, head_dim)` as transformers' attention functions do.
    `kernel` is one of DECODE_ATTENTION_KERNELS.
    """
    batch, heads, query_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if query_len != 1 or kv_heads == heads or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scaling = head_dim**-0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head h belongs to group h // (heads/kv)
    output = _grouped_attention(grouped, key, value, attention_mask, scaling, kernel)
    return output.reshape(batch, 1, heads, head_dim), None


def _attention_name(kernel: str) -> str:
    return f"scaledown_grouped_decode_{kernel}"


def _cudnn_attention_first(device: torch.device):
    """SDPA's backends in the order cuDNN, memory-efficient, math on CUDA (cuDNN is the one that reads grouped heads
    in place under a boolean mask); nothing changed elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends, set_priority=True)


def causal_suffix_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, kernel="padded", **kwargs
):
    """Attention of a prompt's last positions over all of its keys, for prompts without padding.

    query: `(batch, heads, rest, head_dim)`; key, value: `(batch, kv_heads, prompt_len, head_dim)`. The remainder's
    causal mask is aligned to the last key (query i sits at slot prompt_len - rest + i). No fused SDPA kernel takes
    that alignment from `is_causal` with grouped heads, so `kernel` (one of SUFFIX_ATTENTION_KERNELS) is either
    - "padded": the queries padded in front with zeros to the prompt's length through the whole prompt's square
      causal kernel, whose padded rows are dropped (attention_mask is not read);
    - "padded-bshd": the same, padded in `(batch, prompt_len, heads, head_dim)`, the layout whose transpose transformers
      hands over, so that the padding and the output's copy move whole rows; or
    - "masked": SDPA under attention_mask, the engine's `(1 or batch, 1, rest, prompt_len)` boolean, with grouped heads
      read in place, cuDNN's kernel first on CUDA.
    On an H100 (`benchmarks/suffix_attention.py`) "padded" took 3.0 ms a layer at 512 x 254 and 5.7 at 96 x 1,474,
    against 5.3 and 9.3 for SDPA's lower-right causal bias and 2.7 and 7.0 for flex attention, which would also
    compile per shape; "masked" took 2.3 and 10.4. Returns `(batch, rest, heads, head_dim)` as transformers'
    attention functions do.
    """
    batch, heads, rest, head_dim = query.shape
    length, kv_heads = key.shape[2], key.shape[1]
    grouped = kv_heads != heads
    if rest == 1:  # the last position alone (`_last_layer_on_last_position`) sees every key: a decode step's layout
        output = F.scaled_dot_product_attention(
            query.reshape(batch, kv_heads, heads // kv_heads, head_dim), key, value, scale=scaling
        )  # (batch, kv_heads, group, head_dim)
        return output.reshape(batch, 1, heads, head_dim), None
    if kernel == "masked":
        if attention_mask is None:
            raise ValueError("The masked suffix attention needs the remainder's mask; use kernel='padded' without one.")
        with _cudnn_attention_first(query.device):
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=grouped
            )  # (batch, heads, rest, head_dim)
        return output.transpose(1, 2).contiguous(), None
    if kernel == "padded-bshd":
        padded = query.new_empty(batch, length, heads, head_dim)  # (batch, prompt_len, heads, head_dim)
        padded[:, : length - rest].zero_()
        padded[:, length - rest :] = query.transpose(1, 2)
        output = F.scaled_dot_product_attention(
            padded.transpose(1, 2), key, value, is_causal=True, scale=scaling, enable_gqa=grouped
        )  # (batch, heads, prompt_len, head_dim), which the fused kernels lay out as the query
        # Contiguous, as every attention function returns: some families `.view` it. transformers' own `.contiguous()`
        # after the reshape is then free, so the output is still copied once, here in whole rows.
        return output.transpose(1, 2)[:, length - rest :].contiguous(), None
    padded = torch.cat([query.new_zeros(batch, heads, length - rest, head_dim), query], dim=2)  # (batch, heads, len, d)
    output = F.scaled_dot_product_attention(
        padded, key, value, is_causal=True, scale=scaling, enable_gqa=grouped
    )  # (batch, heads, prompt_len, head_dim)
    return output[:, :, length - rest :].transpose(1, 2).contiguous(), None


def _suffix_attention_name(kernel: str) -> str:
    return f"scaledown_causal_suffix_{kernel}"


for _kernel in DECODE_ATTENTION_KERNELS:  # one registered attention function per kernel, chosen through the config
    AttentionInterface.register(_attention_name(_kernel), functools.partial(grouped_decode_attention, kernel=_kernel))
for _kernel in SUFFIX_ATTENTION_KERNELS:
    AttentionInterface.register(
        _suffix_attention_name(_kernel), functools.partial(causal_suffix_attention, kernel=_kernel)
    )


@contextlib.contextmanager
def _sdpa_routed_to(generator, implementation: str | None):
    """Route the generator's SDPA attention through a registered attention function (other implementations, and
    None, leave it untouched)."""
    config = generator.config
    previous = config._attn_implementation
    if previous == "sdpa" and implementation is not None:
        config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def _decode_attention(generator, kernel: str):
    """Route the generator's SDPA attention through `grouped_decode_attention` with `kernel`."""
    return _sdpa_routed_to(generator, _attention_name(kernel))


def shared_prefix_length(prompt: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading real tokens every row of a left-padded prompt shares, leaving each row one of its own.

    prompt: `(batch, prompt_len)` ids or `(batch, prompt_len, hidden)` embeddings (equal vectors count as equal
    tokens); attention_mask `(batch, prompt_len)`. Waits for the GPU (the length decides the next launches).
    """
    batch, width = attention_mask.shape
    lengths = attention_mask.long().sum(-1)  # (batch,)
    longest = int(lengths.min()) - 1
    if batch < 2 or longest < 1:
        return 0
    starts = width - lengths  # (batch,) padding slots before each row's first token
    index = starts[:, None] + torch.arange(longest, device=prompt.device)  # (batch, longest)
    if prompt.dim() == 3:
        heads = prompt.gather(1, index[..., None].expand(-1, -1, prompt.shape[-1]))  # (batch, longest, hidden)
        same = (heads == heads[:1]).all(-1).all(0)  # (longest,)
    else:
        heads = prompt.gather(1, index)  # (batch, longest)
        same = (heads == heads[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def prefix_first_layout(
    prompt: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each left-padded row's first `prefix_len` tokens to the front, ahead of its padding.

    The shared prefix then sits at the same slots in every row (its keys and values can be computed once) and each
    row's own tokens stay where they were. Returns the prompt and its mask (padding now between prefix and rest).
    """
    width = attention_mask.shape[1]
    starts = width - attention_mask.long().sum(-1, keepdim=True)  # (batch, 1)
    slots = torch.arange(width, device=attention_mask.device)[None, :]  # (1, prompt_len)
    in_prefix, in_padding = slots < prefix_len, slots < prefix_len + starts
    source = torch.where(in_prefix, starts + slots, torch.where(in_padding, slots - prefix_len, slots))
    gather_index = source if prompt.dim() == 2 else source[..., None].expand(-1, -1, prompt.shape[-1])
    return prompt.gather(1, gather_index), (in_prefix | ~in_padding).to(attention_mask.dtype)


def _run_then_capture(
    function, runs: int, device=None, captured_calls: int = 1, may_fail: bool = False
) -> "torch.cuda.CUDAGraph | None":
    """Call `function` `runs` times for real on a side stream (compilation, lazy allocations and kernel warm-up happen
    there, off the capture, as capture requires), then capture `captured_calls` calls of it in a CUDA graph. The
    captured calls are recorded, not run. With `may_fail`, a capture that raises gives None (the real runs' errors
    still raise)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(runs):
            function()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(captured_calls):
                function()
    except RuntimeError:
        if not may_fail:
            raise
        return None
    return graph


def cuda_graph_milliseconds(function, calls: int = 8, replays: int = 5) -> float:
    """GPU time of one call as the decode graph runs it: `calls` calls captured in one CUDA graph, replayed.

    Timing plain calls would charge a compiled kernel's Python and guard overhead, which the graph removes (at 32
    rows, flex attention measured 0.24 ms a call so, against 0.024 in a graph).
    """
    graph = _run_then_capture(function, runs=3, captured_calls=calls)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def cuda_milliseconds(function, repeats: int = 3) -> float:
    """Median GPU time of one eager call of `function` (after one untimed call), as an eager prefill runs it."""
    function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _window_shorter_than(config, length: int) -> bool:
    """Whether the model attends within a sliding window shorter than `length` positions."""
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return window is not None and window < length


# Models whose last layer's keys are exactly rotary(k_proj(input_layernorm(h))) with the full rotary embedding, as
# `_keep_rows_of_last_layer` computes them. Many layers look the same and differ there (key norms, clipped
# projections, partial rotary, layers without rotary), so the list names model types, not shapes.
LAST_POSITION_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _last_position_layer(model):
    """The last decoder layer of a generator or N-layers compressor where its keys can be completed ahead
    (LAST_POSITION_MODEL_TYPES, under SDPA or eager attention, whose 4D masks give a query's row), else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LAST_POSITION_MODEL_TYPES:
        return None
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    return layers[-1] if layers else None


def _gather_rows(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`(n, length, d)` states at `(n, k)` positions: `(n, k, d)`."""
    return states.gather(1, rows[..., None].expand(-1, -1, states.shape[-1]))


def _read_rows(model, lengths: torch.LongTensor) -> torch.LongTensor:
    """The `(n, k)` positions ScaleDown reads of right-padded compressor rows of `lengths` real tokens: the memory
    tokens, then RR, close each row."""
    read = model.config.num_memory_tokens + int(model.rerank_head is not None)
    return lengths[:, None] - read + torch.arange(read, device=lengths.device)


class _CompletedKeys:
    """Stands in for a layer's cache once its keys and values are complete: the layer's own `update` hands them back
    instead of adding the positions it runs again."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (batch, kv_heads, keys, head_dim)

    def update(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


def _keep_rows_of_last_layer(rows: torch.Tensor | None):
    """A forward pre-hook for a last decoder layer (`_last_position_layer`) that keeps `(batch, k)` positions of its
    input, or with `rows` None its last position: every position's keys and values go through the cache as usual,
    and the layer then runs its query, attention, output product and MLP at those rows only, the ones read (a
    prefill's next-token logits, a compressor's memory rows and RR). Exact: the kept rows see the keys they saw.

    Its norm, and what it hands the layer, have the layouts of every other layer's and of a decode step's, so that
    compiled norms and MLPs (`compile_elementwise_work`) do not recompile. With `rows` None it steps aside where a
    sliding window shorter than the keys would drop some from the cache (the last position's output is read either
    way); explicit rows are the caller's to keep within the window.
    """

    def keep_rows(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (batch, length, hidden)
        attention = layer.self_attn
        keyword = cache_keyword(attention)  # the layer's keyword too (transformers' layers pass theirs on as is)
        cache = kwargs.get(keyword)
        batch, length = hidden.shape[:2]
        past = cache.get_seq_length(attention.layer_idx) if cache is not None else 0
        kept_rows = rows
        if kept_rows is None:
            if _window_shorter_than(getattr(attention, "config", None), past + length):
                return None
            kept_rows = torch.full((batch, 1), length - 1, device=hidden.device)
        normed = layer.input_layernorm(hidden)  # (batch, length, hidden)
        shape = (batch, length, -1, attention.head_dim)
        keys = attention.k_proj(normed).view(shape).transpose(1, 2)  # (batch, kv_heads, length, head_dim)
        values = attention.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = (angles.expand(batch, -1, -1) for angles in kwargs["position_embeddings"])  # (batch, length, hd)
        # not the modeling file's function, which, compiled (`compile_elementwise_work`), would recompile for keys alone
        keys = rotate(keys, cos[:, None], sin[:, None])
        if cache is not None:
            keys, values = cache.update(keys, values, attention.layer_idx)  # (batch, kv_heads, past + length, hd)

        mask = kwargs.get("attention_mask")  # (1 or batch, 1, length, keys), or None
        if mask is None:  # transformers found nothing to mask (no padding, no gaps): causal over the keys
            slots = torch.arange(keys.shape[2], device=hidden.device)
            mask = slots[None, None, None, :] <= (past + kept_rows)[:, None, :, None]  # (batch, 1, k, keys)
            if attention.config._attn_implementation == "eager":  # eager adds its mask to the scores
                mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(hidden.dtype).min
                )
        else:  # the kept queries' rows
            mask = mask.expand(batch, -1, -1, -1)
            mask = mask.gather(2, kept_rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
        kwargs = dict(kwargs, attention_mask=mask)
        kwargs["position_embeddings"] = (_gather_rows(cos, kept_rows), _gather_rows(sin, kept_rows))
        kwargs[keyword] = _CompletedKeys(keys, values)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].expand(batch, -1).gather(1, kept_rows)
        kept = _gather_rows(hidden, kept_rows)  # (batch, k, hidden)
        if args:
            return (kept, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=kept)

    return keep_rows


@contextlib.contextmanager
def _last_layer_on_rows(model, rows: torch.Tensor | None, enabled: bool = True):
    """Within it, `model`'s last layer runs on `rows` only (`_keep_rows_of_last_layer`; None: the last position)
    where `_last_position_layer` finds one; other models, and `enabled` False, run unchanged. Yields whether it
    does. Entered before any routing of SDPA (`_sdpa_routed_to`), which it reads."""
    layer = _last_position_layer(model) if enabled else None
    handle = None
    if layer is not None:
        handle = layer.register_forward_pre_hook(_keep_rows_of_last_layer(rows), with_kwargs=True)
    try:
        yield layer is not None
    finally:
        if handle is not None:
            handle.remove()


def _last_layer_on_last_position(generator, enabled: bool = True):
    """A prefill's last layer on its last position only: it needs of that layer the next token's logits and every
    position's keys and values. The last layer is one of 32 in a 7B model: a prefill loses about 3% of its work."""
    return _last_layer_on_rows(generator, None, enabled)


@contextlib.contextmanager
def _writes_at(cache: StaticCache, slot: torch.Tensor):
    """Within it, the cache's full-attention layers write a step's keys and values `(batch, kv_heads, 1, head_dim)`
    at `slot` `(1,)`, the engine's own count, as transformers 4's layers did from `cache_position`. transformers 5's
    layers each derive the slot from a counter of their own (an arange, a sum and an in-place add): three small
    kernels a layer in every replayed decode step. Sliding-window layers, which roll, and layers not yet filled keep
    their own update. The layers' counters stay where the prefill left them; `generate` resets them per call."""
    layers = [layer for layer in cache.layers if type(layer) is StaticLayer and layer.is_initialized]

    def writer(layer):
        def update(key_states, value_states, *args, **kwargs):
            layer.keys.index_copy_(2, slot, key_states)
            layer.values.index_copy_(2, slot, value_states)
            return layer.keys, layer.values

        return update

    for layer in layers:
        layer.update = writer(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.update  # the class's method again


@dataclass
class _DecodeState:
    """Everything one decode step reads and writes, at fixed addresses (a CUDA graph replays on these)."""

    cache: StaticCache
    key_mask: torch.Tensor  # (batch, max_len) bool: cache slots a real query may attend to
    tokens: torch.Tensor  # (batch, 1) the last generated token, input of the next step
    positions: torch.Tensor  # (batch, 1) its rotary position (prompt positions ignore left padding)
    cache_position: torch.Tensor  # (1,) the cache slot the next step writes
    step: torch.Tensor  # (1,) index of the next output column
    finished: torch.Tensor  # (batch,) bool: the row has produced EOS
    output: torch.Tensor  # (batch, max_new_tokens) generated ids, padding after EOS
    scores: torch.Tensor | None = None  # (batch, max_new_tokens, vocab) float32 logits, when asked for
    graph: "torch.cuda.CUDAGraph | None" = None
    prefill_graph: "torch.cuda.CUDAGraph | bool | None" = None  # False: this generator's prefill cannot be captured
    prefill_input: torch.Tensor | None = None  # ids or embeddings the prefill graph reads, copied in for each call
    prefill_positions: torch.Tensor | None = None  # (batch, prompt_len) the graph reads them: kept alive with it
    attention_kernel: str | None = None  # the decode attention kernel of this shape, once chosen
    attention_kernel_ms: dict | None = None  # what "auto" measured: milliseconds a layer for each candidate
    # shared prefix length -> (its remainder's attention kernel, what "auto" measured for it or None)
    suffix_kernels: dict = field(default_factory=dict)


class StaticGreedyGenerator:
    """Greedy generation for a causal LM from token ids or input embeddings (left-padded).

    One instance per generator; the state of the most recent batch shape is kept (buffers, cache and graph) so
    that repeated calls of the same shape replay without re-capturing. A new shape releases the old state.
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        use_cuda_graph: bool | None = None,
        decode_attention_kernel: str = DECODE_ATTENTION_KERNEL,
        prefill_graph_max_tokens: int = PREFILL_GRAPH_MAX_TOKENS,
        shared_prefix_min_tokens: int | None = SHARED_PREFIX_MIN_TOKENS,
        shared_prefix_min_fraction: float = SHARED_PREFIX_MIN_FRACTION,
        suffix_attention_kernel: str = SUFFIX_ATTENTION_KERNEL,
        last_layer_on_last_position: bool = True,
        fused_decode: bool = False,
        fused_decode_mode: str | None = None,
    ):
        _check_kernel("decode attention", decode_attention_kernel, DECODE_ATTENTION_KERNELS, allow_auto=True)
        _check_kernel("suffix attention", suffix_attention_kernel, SUFFIX_ATTENTION_KERNELS, allow_auto=True)
        self.generator = generator
        self._cache_keyword = cache_keyword(generator)
        self.use_cuda_graph = use_cuda_graph
        self.prefill_graph_max_tokens = prefill_graph_max_tokens
        self.shared_prefix_min_tokens = shared_prefix_min_tokens  # None: never prefill a shared prefix apart
        self.shared_prefix_min_fraction = shared_prefix_min_fraction
        self.last_shared_prefix = 0  # prompt tokens the last call prefilled once for the whole batch
        self.suffix_attention_kernel = suffix_attention_kernel
        self.last_suffix_attention = None  # (kernel, "auto"'s milliseconds a layer or None) of the last shared prefill
        self.decode_attention_kernel = decode_attention_kernel
        self.last_layer_on_last_position = last_layer_on_last_position  # `_last_layer_on_last_position` in prefills
        # decode steps through `FusedDecode` (compiled on CUDA, with torch.compile's `fused_decode_mode`) instead of
        # the generator's forward; a generator it cannot run is refused here with the reason
        self._fused = FusedDecode(generator, mode=fused_decode_mode) if fused_decode else None
        self._key_now = None  # the key of the state held
        self._state: _DecodeState | None = None

    # ---- masks ---------------------------------------------------------------------------------------------------
    def _as_attention_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean `allowed` for SDPA; additive for the eager attention path, which adds the mask to the scores."""
        if getattr(self.generator.config, "_attn_implementation", "sdpa") == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed

    # ---- state ---------------------------------------------------------------------------------------------------
    def _new_state(
        self, batch: int, max_len: int, max_new_tokens: int, device: torch.device, keep_scores: bool
    ) -> _DecodeState:
        long = dict(dtype=torch.long, device=device)
        vocab = self.generator.get_output_embeddings().weight.shape[0]
        return _DecodeState(
            cache=StaticCache(config=self.generator.config, max_cache_len=max_len),
            key_mask=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            tokens=torch.zeros(batch, 1, **long),
            positions=torch.zeros(batch, 1, **long),
            cache_position=torch.zeros(1, **long),
            step=torch.zeros(1, **long),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
            output=torch.zeros(batch, max_new_tokens, **long),
            scores=torch.zeros(batch, max_new_tokens, vocab, device=device) if keep_scores else None,
        )

    def _key(self, attention_mask, max_new_tokens, eos_token_id, pad_token_id, return_scores) -> tuple:
        """Everything a call's state and captured graph bake in: a call with another key needs a new state."""
        batch, prompt_len = attention_mask.shape
        dtype = self.generator.get_input_embeddings().weight.dtype
        tokens = (eos_token_id, pad_token_id)
        return (batch, prompt_len, max_new_tokens, attention_mask.device, dtype, return_scores, tokens)

    @property
    def attention_kernel(self) -> str | None:
        """The decode attention kernel of the batch shape held (None before its first call)."""
        return self._state.attention_kernel if self._state is not None else None

    @property
    def attention_kernel_ms(self) -> dict | None:
        """For "auto" on CUDA, the milliseconds a layer it measured for each candidate on the shape held."""
        return self._state.attention_kernel_ms if self._state is not None else None

    def has_graph_for(
        self, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id=None, pad_token_id=0, return_scores=False
    ) -> bool:
        """Whether `generate` with these arguments replays a captured graph (captures nothing, allocates nothing)."""
        key = self._key(attention_mask, max_new_tokens, eos_token_id, pad_token_id, return_scores)
        return key == self._key_now and self._state is not None and self._state.graph is not None

    def _state_for(self, key: tuple) -> _DecodeState:
        if key != self._key_now:
            batch, prompt_len, max_new_tokens, device, _, keep_scores, _ = key
            self._state = None  # free the old cache and graph before allocating new ones
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self._state = self._new_state(batch, prompt_len + max_new_tokens, max_new_tokens, device, keep_scores)
            self._key_now = key
        return self._state

    # ---- one decode step (graph-capturable: in-place updates only, no host synchronisation) -----------------------
    def _decode_step(self, state: _DecodeState, eos_token_id: int | None, pad_token_id: int, dtype) -> None:
        state.key_mask.index_fill_(1, state.cache_position, True)
        allowed = state.key_mask[:, None, None, :]  # (batch, 1, 1, max_len)
        if self._fused is not None:
            caches = [(layer.keys, layer.values) for layer in state.cache.layers]
            attend = functools.partial(_grouped_attention, kernel=state.attention_kernel)
            logits = self._fused(state.tokens, state.positions, caches, state.cache_position, allowed, attend)
        else:
            logits = self._generator_step(state, allowed, dtype)
        self._emit(state, logits, eos_token_id, pad_token_id)
        state.positions.add_(1)
        state.cache_position.add_(1)

    def _generator_step(self, state: _DecodeState, allowed: torch.Tensor, dtype) -> torch.Tensor:
        """The step's logits `(batch, vocab)` through the generator's own forward."""
        with _decode_attention(self.generator, state.attention_kernel), _writes_at(state.cache, state.cache_position):
            return self.generator(
                input_ids=state.tokens,
                attention_mask=self._as_attention_mask(allowed, dtype),
                position_ids=state.positions,
                cache_position=state.cache_position,
                use_cache=True,
                **{self._cache_keyword: state.cache},
            ).logits[:, -1]  # (batch, vocab)

    def _choose_attention_kernel(self, state: _DecodeState) -> str:
        """The configured kernel, or for "auto" the faster of AUTO_CANDIDATES on this state's filled cache."""
        if self.decode_attention_kernel != "auto":
            return self.decode_attention_kernel
        key, value = state.cache.layers[0].keys, state.cache.layers[0].values  # (batch, kv_heads, slots, head_dim)
        config = self.generator.config
        heads = config.num_attention_heads
        if key.device.type != "cuda" or key.shape[1] == heads:  # the grouped path only runs for grouped heads
            return "sdpa"
        batch, kv_heads, _, head_dim = key.shape
        query = torch.randn(batch, kv_heads, heads // kv_heads, head_dim, dtype=key.dtype, device=key.device)
        allowed = state.key_mask[:, None, None, :]
        scaling = head_dim**-0.5
        state.attention_kernel_ms = {
            kernel: cuda_graph_milliseconds(lambda k=kernel: _grouped_attention(query, key, value, allowed, scaling, k))
            for kernel in AUTO_CANDIDATES
        }
        return min(state.attention_kernel_ms, key=state.attention_kernel_ms.get)

    def _choose_suffix_kernel(
        self, state: _DecodeState, batch: int, allowed: torch.Tensor, prefix_keys: torch.Tensor
    ) -> tuple[str, dict | None]:
        """The configured remainder attention kernel, or for "auto" on CUDA the fastest of SUFFIX_ATTENTION_KERNELS at
        this shape, timed once per state and prefix length on random inputs as large as one layer's.

        allowed: the remainder's mask `(1, 1, rest, prompt_len)`; prefix_keys: the prefix's first-layer keys
        `(1, kv_heads, prefix_len, head_dim)`. Returns the kernel and, when timed, the milliseconds a layer of each
        candidate.
        """
        _, kv_heads, prefix_len, head_dim = prefix_keys.shape
        if self.suffix_attention_kernel != "auto" or prefix_keys.device.type != "cuda":
            return ("padded" if self.suffix_attention_kernel == "auto" else self.suffix_attention_kernel), None
        if prefix_len not in state.suffix_kernels:
            like = dict(dtype=prefix_keys.dtype, device=prefix_keys.device)
            rest, prompt_len = allowed.shape[-2:]
            heads = self.generator.config.num_attention_heads
            # (batch, heads, rest, head_dim) as a transposed view, the layout transformers' attention receives
            query = torch.randn(batch, rest, heads, head_dim, **like).transpose(1, 2)
            key, value = (torch.randn(batch, kv_heads, prompt_len, head_dim, **like) for _ in range(2))
            measured = {
                kernel: cuda_milliseconds(
                    lambda k=kernel: causal_suffix_attention(None, query, key, value, allowed, kernel=k)
                )
                for kernel in SUFFIX_ATTENTION_KERNELS
            }
            state.suffix_kernels[prefix_len] = (min(measured, key=measured.get), measured)
        return state.suffix_kernels[prefix_len]

    @staticmethod
    def _emit(state: _DecodeState, logits: torch.Tensor, eos_token_id: int | None, pad_token_id: int) -> None:
        if state.scores is not None:
            state.scores.index_copy_(1, state.step, logits.float()[:, None])
        next_tokens = logits.argmax(-1)  # (batch,)
        next_tokens = torch.where(state.finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        if eos_token_id is not None:
            state.finished.logical_or_(next_tokens == eos_token_id)
        state.output.index_copy_(1, state.step, next_tokens[:, None])
        state.tokens.copy_(next_tokens[:, None])
        state.step.add_(1)

    # ---- prefill ---------------------------------------------------------------------------------------------------
    def _prefill(self, state, prompt, attention_mask, positions, eos_token_id, pad_token_id) -> None:
        """Run the prompt, copy its keys and values into the static cache, emit the first token.

        prompt: `(batch, prompt_len)` ids or `(batch, prompt_len, hidden)` embeddings; attention_mask None for a
        prompt without padding, which spares transformers' mask check its host synchronisation: the graphed prefill.
        """
        # The prompt goes through transformers' own path (a prompt without padding gets the causal flash kernel;
        # prefilling the static cache directly would mask over all of its slots), then its keys and values are
        # copied into the static cache, layer by layer.
        prompt_input = {"input_ids" if prompt.dim() == 2 else "inputs_embeds": prompt}
        with _last_layer_on_last_position(self.generator, self.last_layer_on_last_position):
            prefill = self.generator(
                **prompt_input,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
        self._store_prefill(state, prefill, eos_token_id, pad_token_id)

    def _store_prefill(self, state, prefill, eos_token_id, pad_token_id) -> None:
        """Copy a prefill's keys and values `(batch, kv_heads, prompt_len, head_dim)` into the static cache, layer by
        layer, and emit its first token."""
        layers = getattr(prefill, self._cache_keyword).layers
        slots = {"cache_position": torch.arange(layers[0].keys.shape[-2], device=layers[0].keys.device)}
        for index, layer in enumerate(layers):
            state.cache.update(layer.keys, layer.values, index, slots)
            layer.keys = layer.values = None  # release the prompt's copy as soon as it is in the static cache
        self._emit(state, prefill.logits[:, -1], eos_token_id, pad_token_id)  # logits: (batch, 1, vocab)

    def _prefill_route(self, state, prompt, attention_mask, use_graph: bool, total_len: int) -> tuple[bool, int]:
        """Whether this call replays the prefill graph, and the shared prefix length to prefill apart (0: none).

        A prompt the graph would take never shares, also where its capture failed (`state.prefill_graph` False), so
        that every call of a shape runs the same prefill and gives the same bf16 answers.
        """
        graph_sized = use_graph and self._prefill_fits_graph(attention_mask)
        if graph_sized:
            return state.prefill_graph is not False, 0
        return False, self._prefix_to_share(prompt, attention_mask, total_len)

    def _prefix_to_share(self, prompt: torch.Tensor, attention_mask: torch.Tensor, total_len: int) -> int:
        """The shared prefix length `_prefill_sharing_prefix` should take, or 0 where sharing is off, would not pay
        (SHARED_PREFIX_MIN_TOKENS, SHARED_PREFIX_MIN_FRACTION) or would not be exact: the remainder's 4D mask knows
        no sliding window, so a window shorter than prompt and answer, or an attention other than SDPA or eager,
        keeps the plain prefill."""
        batch, prompt_len = attention_mask.shape
        config = self.generator.config
        if (
            self.shared_prefix_min_tokens is None
            or batch < 2
            or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager")
            or _window_shorter_than(config, total_len)
        ):
            return 0
        prefix_len = shared_prefix_length(prompt, attention_mask)
        pays = (batch - 1) * prefix_len >= max(self.shared_prefix_min_tokens, 1)
        return prefix_len if pays and prefix_len >= self.shared_prefix_min_fraction * prompt_len else 0

    def _prefill_sharing_prefix(
        self, state, prompt, attention_mask, positions, prefix_len: int, padded: bool, eos_token_id, pad_token_id
    ) -> None:
        """`_prefill` for rows whose first `prefix_len` slots hold the same tokens (`prefix_first_layout` where the
        prompt is `padded`).

        The prefix runs once, as a batch of one; its keys and values, broadcast to the batch, are the cache that every
        row's remainder attends to. Exact: under causal attention the prefix never sees what follows it.
        """
        batch, prompt_len = attention_mask.shape
        name = "input_ids" if prompt.dim() == 2 else "inputs_embeds"
        prefix = self.generator(
            **{name: prompt[:1, :prefix_len]}, position_ids=positions[:1, :prefix_len], use_cache=True, logits_to_keep=1
        )
        cache = getattr(prefix, self._cache_keyword)
        slots = torch.arange(prompt_len, device=attention_mask.device)
        keys_seen = attention_mask.bool() if padded else attention_mask[:1].bool()  # without padding: one row for all
        causal = slots[None, :] <= slots[prefix_len:, None]  # (rest, prompt_len): query i sits at slot prefix + i
        allowed = keys_seen[:, None, None, :] & causal[None, None]  # (batch or 1, 1, rest, prompt_len)
        # Only SDPA is routed to the suffix kernels; padded rows keep transformers' own path (its mask holds each row's
        # padding), as does eager attention.
        if not padded and self.generator.config._attn_implementation == "sdpa":
            self.last_suffix_attention = self._choose_suffix_kernel(state, batch, allowed, cache.layers[0].keys)
        for layer in cache.layers:  # (1, kv_heads, prefix, head_dim) -> (batch, ...) views, copied by the next update
            layer.keys = layer.keys.expand(batch, -1, -1, -1)
            layer.values = layer.values.expand(batch, -1, -1, -1)
        dtype = self.generator.get_input_embeddings().weight.dtype
        routed = _suffix_attention_name(self.last_suffix_attention[0]) if self.last_suffix_attention else None
        with _last_layer_on_last_position(self.generator, self.last_layer_on_last_position), _sdpa_routed_to(
            self.generator, routed
        ):
            prefill = self.generator(
                **{name: prompt[:, prefix_len:]},
                attention_mask=self._as_attention_mask(allowed, dtype),
                position_ids=positions[:, prefix_len:],
                cache_position=slots[prefix_len:],
                use_cache=True,
                **{self._cache_keyword: cache},
                logits_to_keep=1,
            )
        self._store_prefill(state, prefill, eos_token_id, pad_token_id)

    def _prefill_fits_graph(self, attention_mask: torch.Tensor) -> bool:
        """Small enough for launches to dominate, and no padding (so no mask: transformers' mask checks synchronise
        with the host, which a graph capture forbids)."""
        return attention_mask.numel() <= self.prefill_graph_max_tokens and bool(attention_mask.all())

    def _prefill_through_graph(self, state: _DecodeState, prompt: torch.Tensor, eos_token_id, pad_token_id) -> None:
        """Replay this state's prefill graph on `prompt`; a first call runs the prefill for real and then captures it.

        A generator whose prefill cannot be captured (its cache copies a CPU tensor in, as transformers' sliding-window
        layers do on first use, or it synchronises with the host) has this call's prefill run for real all the same,
        and its state marked (prefill_graph False) so that `generate` keeps the eager prefill for this shape.
        """
        if isinstance(state.prefill_graph, torch.cuda.CUDAGraph) and state.prefill_input.dtype == prompt.dtype:
            state.prefill_input.copy_(prompt)
            state.prefill_graph.replay()
            return
        batch, prompt_len = prompt.shape[:2]
        # Every tensor the graph reads but does not allocate itself must outlive it, or its memory is reused.
        state.prefill_input = prompt.clone()
        state.prefill_positions = torch.arange(prompt_len, device=prompt.device).expand(batch, -1)  # no padding

        def prefill():
            self._prefill(state, state.prefill_input, None, state.prefill_positions, eos_token_id, pad_token_id)

        # the real run is this call's prefill; the captured one leaves the state as the real run wrote it
        state.prefill_graph = _run_then_capture(prefill, runs=1, device=prompt.device, may_fail=True)
        if state.prefill_graph is None:
            state.prefill_graph, state.prefill_input, state.prefill_positions = False, None, None

    # ---- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        return_scores: bool = False,
    ) -> torch.LongTensor | tuple[torch.LongTensor, torch.Tensor]:
        """New tokens `(batch, max_new_tokens)`, padding after a row's EOS (eos_token_id None: never stop).

        With return_scores, also the logits of every step `(batch, max_new_tokens, vocab)` in float32.

        attention_mask: `(batch, prompt_len)` left-padded; input_ids `(batch, prompt_len)` or inputs_embeds
        `(batch, prompt_len, hidden)`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        total_len = attention_mask.shape[1] + max_new_tokens  # prompt and answer: the static cache's slots
        config = getattr(self.generator, "config", None)
        if _window_shorter_than(config, total_len):
            raise ValueError(
                f"The generator attends within a sliding window of {config.sliding_window} positions, "
                f"shorter than this call's prompt and answer ({total_len}); the static engine keeps every position's "
                "keys. Use the model's own `generate` for it, or shorter prompts."
            )
        key = self._key(attention_mask, max_new_tokens, eos_token_id, pad_token_id, return_scores)
        state = self._state_for(key)
        _, prompt_len, _, device, dtype, _, _ = key
        use_graph = self.use_cuda_graph if self.use_cuda_graph is not None else device.type == "cuda"
        prompt = input_ids if input_ids is not None else inputs_embeds
        graphed_prefill, prefix_len = self._prefill_route(state, prompt, attention_mask, use_graph, total_len)
        padded = bool(prefix_len) and not bool(attention_mask.all())  # the layout keeps the padding, moved
        if padded:
            prompt, attention_mask = prefix_first_layout(prompt, attention_mask, prefix_len)
        self.last_shared_prefix = prefix_len
        self.last_suffix_attention = None

        state.cache.reset()
        state.key_mask.zero_()
        state.key_mask[:, :prompt_len] = attention_mask.bool()
        state.finished.zero_()
        state.output.fill_(pad_token_id)
        state.step.zero_()

        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, prompt_len)
        if graphed_prefill:
            self._prefill_through_graph(state, prompt, eos_token_id, pad_token_id)
        elif prefix_len:
            self._prefill_sharing_prefix(
                state, prompt, attention_mask, positions, prefix_len, padded, eos_token_id, pad_token_id
            )
        else:
            self._prefill(state, prompt, attention_mask, positions, eos_token_id, pad_token_id)
        state.positions.copy_(positions[:, -1:] + 1)
        state.cache_position.fill_(prompt_len)
        if state.attention_kernel is None:
            state.attention_kernel = self._choose_attention_kernel(state)

        remaining = max_new_tokens - 1
        if use_graph and state.graph is not None:
            for _ in range(remaining):
                state.graph.replay()
        elif use_graph and remaining >= 3:
            # First call of this shape: two steps run for real, then one is captured and replayed for the rest,
            # and for later calls.
            state.graph = _run_then_capture(
                lambda: self._decode_step(state, eos_token_id, pad_token_id, dtype), runs=2, device=device
            )
            remaining -= 2
            for _ in range(remaining):
                state.graph.replay()
        else:
            for _ in range(remaining):
                self._decode_step(state, eos_token_id, pad_token_id, dtype)
        if return_scores:
            return state.output.clone(), state.scores.clone()
        return state.output.clone()


@torch.no_grad()
def compress_sharing_queries(
    model, compressor_input_ids: torch.LongTensor, compressor_attention_mask: torch.LongTensor,
    compressor_query_lengths: torch.LongTensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model.compress_tensors` for an N-layers compressor, with each question's prefix computed once.

    Under causal attention the prefix every row of a question starts with (special tokens, query marker, query)
    never sees the document, so its keys and values are the same in each of the question's rows: they are computed
    once per question and reused by its documents, which then only run their own tokens; the last layer runs on the
    rows ScaleDown reads alone (`_last_layer_on_rows`). Exact up to float reordering. Rows are question by
    question (consecutive rows with an identical prefix share it).
    Inputs as built by `input_builder.compressor_inputs(..., return_query_lengths=True)`; returns what
    `compress_tensors` returns.
    """
    if model.config.compressor_type != "n_layers":
        raise ValueError("Sharing the query prefix is exact only for causal (n_layers) compressors.")
    ids, lengths, query_lengths = compressor_input_ids, compressor_attention_mask.sum(-1), compressor_query_lengths
    if ids.shape[0] == 0:
        return model.compress_tensors(compressor_input_ids, compressor_attention_mask)
    device = ids.device
    width = int(query_lengths.max())
    in_prefix = torch.arange(width, device=device)[None, :] < query_lengths[:, None]  # (rows, width)
    prefixes = ids[:, :width].masked_fill(~in_prefix, -1)
    starts_group = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
    starts_group[1:] = (prefixes[1:] != prefixes[:-1]).any(-1)
    group = starts_group.long().cumsum(0) - 1  # (rows,) index of the row's question
    firsts = starts_group.nonzero().squeeze(-1)  # (questions,)

    keyword = cache_keyword(model.compressor)
    shared = model.compressor(input_ids=ids[firsts, :width], attention_mask=in_prefix[firsts].long(), use_cache=True)
    cache = getattr(shared, keyword)  # keys/values: (questions, kv_heads, width, head_dim) per layer
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, group), layer.values.index_select(0, group)

    suffix_lengths = lengths - query_lengths  # (rows,) document marker, document, memory tokens, RR
    span = int(suffix_lengths.max())
    offsets = torch.arange(span, device=device)[None, :]
    in_suffix = offsets < suffix_lengths[:, None]  # (rows, span)
    positions = query_lengths[:, None] + offsets  # (rows, span)
    suffix_ids = ids.gather(1, positions.clamp(max=ids.shape[1] - 1)).masked_fill(
        ~in_suffix, model.input_builder.compressor_pad_id
    )
    if _window_shorter_than(model.compressor.config, width + span):  # the window would count the prefix's gaps
        return model.compress_tensors(compressor_input_ids, compressor_attention_mask)
    read_rows = _read_rows(model, suffix_lengths)  # (rows, read)
    with _last_layer_on_rows(model.compressor, read_rows) as rows_only:
        hidden = model.compressor(
            input_ids=suffix_ids,
            attention_mask=torch.cat([in_prefix, in_suffix], -1).long(),  # (rows, width + span); gaps are masked
            position_ids=positions,
            use_cache=True,
            **{keyword: cache},
        ).last_hidden_state  # (rows, read, compressor_hidden) where rows_only, else (rows, span, compressor_hidden)
    read_lengths = torch.full_like(suffix_lengths, read_rows.shape[1]) if rows_only else suffix_lengths
    return model.read_compressed(hidden, read_lengths)


def reads_memory_rows_only(model) -> bool:
    """Whether `compress_batch` runs `model`'s compressor's last layer on the rows ScaleDown reads only
    (`compress_reading_memory_rows`): a ModernBERT encoder whose layers take their rotary embeddings from the model
    (transformers 5; 4.57's attention computes its own, so it keeps the plain compression)."""
    encoder = model.compressor
    return (
        model.config.uses_encoder_compressor
        and type(encoder).__name__ == "ModernBertModel"
        and hasattr(encoder, "rotary_emb")
    )


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ModernBERT's rotary embedding of `(n, heads, rows, head_dim)` states with `(n, rows, head_dim)` angles, in
    float32 as its `apply_rotary_pos_emb` computes it (that function rotates a query and a key of one length)."""
    from transformers.models.modernbert.modeling_modernbert import rotate_half

    cos, sin, wide = cos[:, None], sin[:, None], states.float()
    return (wide * cos + rotate_half(wide) * sin).to(states.dtype)


def _modernbert_layer_on_rows(layer, hidden, cos_sin, attention_mask, rows, sliding_window):
    """One ModernBERT encoder layer whose outputs are wanted at `rows` only: keys and values from every position,
    the query, the attention output, the residual sums and the MLP at `rows` alone.

    hidden: `(n, length, hidden)`; cos_sin: the layer type's rotary angles, each `(1 or n, length, head_dim)`;
    attention_mask: `(n, length)`, 1 for real tokens; rows: `(n, k)` positions. Returns `(n, k, hidden)`.
    """
    attention = layer.attn
    (n, length, width), k, head_dim = hidden.shape, rows.shape[1], attention.head_dim
    heads = width // head_dim
    at_rows = functools.partial(_gather_rows, rows=rows)  # (n, length, d) -> (n, k, d)
    normed = layer.attn_norm(hidden)  # (n, length, hidden)
    weight, bias = attention.Wqkv.weight, attention.Wqkv.bias  # output features: queries, keys, values
    query = F.linear(at_rows(normed), weight[:width], None if bias is None else bias[:width])  # (n, k, hidden)
    key_value = F.linear(normed, weight[width:], None if bias is None else bias[width:])  # (n, length, 2 * hidden)
    key, value = key_value.view(n, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # each (n, heads, length, hd)
    query = query.view(n, k, heads, head_dim).transpose(1, 2)  # (n, heads, k, head_dim)
    cos, sin = (angles.expand(n, -1, -1) for angles in cos_sin)  # (n, length, head_dim)
    query, key = _rotate(query, at_rows(cos), at_rows(sin)), _rotate(key, cos, sin)

    allowed = attention_mask.bool()[:, None, None, :]  # (n, 1, 1, length): real keys
    if sliding_window is not None:  # local layers: |query - key| <= the half window, as transformers' mask
        distance = rows[:, :, None] - torch.arange(length, device=rows.device)  # (n, k, length)
        allowed = allowed & (distance.abs() <= sliding_window)[:, None]  # (n, 1, k, length)
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=head_dim**-0.5)
    attended = attended.transpose(1, 2).reshape(n, k, width)  # (n, k, hidden)
    hidden = at_rows(hidden) + attention.out_drop(attention.Wo(attended))
    return hidden + layer.mlp(layer.mlp_norm(hidden))  # (n, k, hidden)


def modernbert_memory_rows(encoder, input_ids, attention_mask, rows) -> torch.Tensor:
    """A ModernBERT encoder's last hidden states at `rows` only (`(n, length)` right-padded ids and mask, `(n, k)`
    rows): its forward pass with the last layer run by `_modernbert_layer_on_rows`. Returns `(n, k, hidden)`."""
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    config = encoder.config
    hidden = encoder.embeddings(input_ids=input_ids)  # (n, length, hidden)
    mask_arguments = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    masks = {
        "full_attention": create_bidirectional_mask(**mask_arguments),
        "sliding_attention": create_bidirectional_sliding_window_mask(**mask_arguments),
    }
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # right padding: the same every row
    angles = {kind: encoder.rotary_emb(hidden, positions, kind) for kind in set(config.layer_types)}
    *layers, last = encoder.layers
    for layer in layers:
        kind = layer.attention_type
        hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=angles[kind])
    window = config.sliding_window if last.attention_type == "sliding_attention" else None
    hidden = _modernbert_layer_on_rows(last, hidden, angles[last.attention_type], attention_mask, rows, window)
    return encoder.final_norm(hidden)


_encoders_compiled = weakref.WeakSet()  # encoders whose memory-rows pass `compile_compressor` compiled


@functools.cache
def _compiled_memory_rows():
    """`modernbert_memory_rows` compiled, once per process (its guards tell encoders apart)."""
    return torch.compile(modernbert_memory_rows)


@torch.no_grad()
def compress_reading_memory_rows(
    model, compressor_input_ids: torch.LongTensor, compressor_attention_mask: torch.LongTensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model.compress_tensors` for a ModernBERT compressor (`reads_memory_rows_only`), its last layer run on the
    memory tokens and the RR token alone: ScaleDown reads nothing else, and every other position's last-layer
    output would be discarded. Their keys and values still come from every position, so the result is exact up to
    float reordering; the last layer loses about three quarters of its work. Compiled by `compile_compressor`."""
    lengths = compressor_attention_mask.sum(-1)  # (n,)
    if lengths.numel() == 0:
        return model.compress_tensors(compressor_input_ids, compressor_attention_mask)
    rows = _read_rows(model, lengths)  # (n, read)
    forward = _compiled_memory_rows() if model.compressor in _encoders_compiled else modernbert_memory_rows
    hidden = forward(model.compressor, compressor_input_ids, compressor_attention_mask, rows)  # (n, read, hidden)
    return model.read_compressed(hidden, torch.full_like(lengths, rows.shape[1]))


ELEMENTWISE_BLOCKS = ("RMSNorm", "MLP")  # class-name endings of transformers' decoder norms and feed-forwards
ROTARY_FUNCTION = "apply_rotary_pos_emb"  # what a Llama-family attention calls, by name, from its modeling file
_compiled_rotary = {}  # modeling file's name -> its rotary function compiled (one compilation per process)


def compile_elementwise_work(module: torch.nn.Module, mode: str | None = None) -> str:
    """torch.compile in place the element-wise work of a Llama-family decoder; says what was compiled.

    Eager mode runs an RMSNorm as about eight kernels (casts, power, mean, rsqrt, products), the MLP's activation and
    product as two, and the rotary embedding of queries and keys as about ten (products, halves negated and
    concatenated, sums), each a full pass over the activations; compiled, each is one pass. Measured on an H100
    (NOTES.md): a fifth of a long prefill, and at batch 1 hundreds of tiny kernels a decode step.

    - Norm and MLP modules compile in place (weight names unchanged); instances of a class share one compilation.
    - The rotary function is module-level code in transformers' modeling file, looked up by name at each call, so
      it is replaced there by its compiled form: every model of that family in this process gets it (same values).
    - Attention stays eager: its KV-cache update reads the layer's index, which torch.compile treats as a
      constant, so a compiled attention (or decoder layer) would compile once per layer.
    - `mode` is torch.compile's for the norm and MLP blocks (None: its default, the MLP's products on cuBLAS).
      "max-autotune-no-cudagraphs" times inductor's Triton products against cuBLAS for each product shape and keeps
      the faster: minutes more compilation, for the decode's skinny products (a few rows against each weight).
    """
    blocks = [block for block in module.modules() if type(block).__name__.endswith(ELEMENTWISE_BLOCKS)]
    for block in blocks:
        block.compile(mode=mode)
    families = {
        sys.modules[type(block).__module__]
        for block in module.modules()
        if type(block).__name__.endswith("Attention") and hasattr(sys.modules[type(block).__module__], ROTARY_FUNCTION)
    }
    for family in families:
        if family.__name__ not in _compiled_rotary:
            _compiled_rotary[family.__name__] = torch.compile(getattr(family, ROTARY_FUNCTION))
        setattr(family, ROTARY_FUNCTION, _compiled_rotary[family.__name__])
    names = sorted(family.__name__.rsplit(".", 1)[-1] for family in families)
    return f"{len(blocks)} norm and MLP blocks, rotary embedding of {', '.join(names) or 'none'}"


# Layer classes whose projections of one input `stack_projections` runs as one product: these attentions project
# `hidden_states` by q_proj, k_proj and v_proj, these MLPs compute down_proj(act_fn(gate_proj(x)) * up_proj(x)).
STACKED_ATTENTIONS = tuple(f"{family}Attention" for family in LLAMA_FAMILIES)
STACKED_MLPS = tuple(f"{family}MLP" for family in LLAMA_FAMILIES)


def _stackable(*linears) -> bool:
    """Plain `nn.Linear` layers (a LoRA-wrapped or quantized one is not) reading the same width, all with a bias or
    none, with weights of one dtype on one device."""
    return all(type(linear) is torch.nn.Linear for linear in linears) and 1 == len(
        {(linear.in_features, linear.bias is None, linear.weight.dtype, linear.weight.device) for linear in linears}
    )


def _stack_linears(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights and biases of `linears` stacked by output rows: `(sum of outputs, inputs)`, `(sum of outputs,)`.
    Each layer's parameters become views into the stack, so every weight is held once and the state dict keeps its
    names and values."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


class StackedProjection(torch.nn.Module):
    """One of an attention's query, key and value projections once `stack_projections` has stacked them. Inside the
    attention's forward it hands back its columns of the one product the attention's pre-hook ran; on any other
    input (a hook that computes keys alone, `_keep_rows_of_last_layer`) it runs its own product, as the
    `nn.Linear` it replaces did, with the same parameters under the same names."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.handed: tuple[torch.Tensor, torch.Tensor] | None = None  # (the attention's input, this one's output)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        handed, self.handed = self.handed, None  # not held past its use: the stacked product is freed with its views
        if handed is not None and handed[0] is hidden:
            return handed[1]
        return F.linear(hidden, self.weight, self.bias)


def _project_once(attention, args, kwargs):
    """Forward pre-hook of a stacked attention: its three projections of `hidden_states` as one product."""
    hidden = args[0] if args else kwargs["hidden_states"]  # (batch, length, hidden)
    product = F.linear(hidden, attention.stacked_qkv_weight, attention.stacked_qkv_bias)  # (batch, length, q+k+v)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    for projection, output in zip(projections, product.split([p.out_features for p in projections], dim=-1)):
        projection.handed = (hidden, output)


class StackedGatedMLP(torch.nn.Module):
    """A Llama-family gated MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)), whose gate and up products run as one
    against their stacked weights. Its children and their parameters keep the replaced MLP's names."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.config = getattr(mlp, "config", None)
        weight, bias = _stack_linears([self.gate_proj, self.up_proj])
        self.register_buffer("gate_up_weight", weight, persistent=False)  # (2 x intermediate, hidden)
        self.register_buffer("gate_up_bias", bias, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., hidden)
        gate, up = F.linear(hidden, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)  # (..., intermediate)
        # In place, and the stacked product dropped before the down product: the gate's and up's two halves are one
        # buffer, which eagerly would otherwise live beside the activation and the product (a third more memory)
        activated = self.act_fn(gate)
        activated *= up
        del gate, up
        return self.down_proj(activated)


def stack_projections(module: torch.nn.Module) -> str:
    """Run the projections that read one input as one matrix product, in place, for serving; says what was stacked.

    A decode step multiplies a few rows by each weight, so its time is the weights' reads, and cuBLAS reads a narrow
    weight (a grouped-query key or value projection: 1,024 rows in Mistral-7B) at about half the bandwidth it
    reaches on a wide one (benchmarks/NOTES.md). Stacked, an attention's query, key and value weights are one
    product and an MLP's gate and up weights another: fewer, wider products, the same values up to summation order.

    - Attentions of STACKED_ATTENTIONS and MLPs of STACKED_MLPS whose projections are plain `nn.Linear` layers (not
      LoRA-wrapped: merge adapters first). Each weight is held once (the layers' parameters become views into the
      stacks) and the state dict is unchanged, but the parameters stop requiring gradients: this is for inference.
    - Call it after moving the model to its device and dtype, and before `compile_elementwise_work` (the stacked MLP
      is what should be compiled). A second call stacks nothing more.
    """
    attentions = mlps = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in STACKED_MLPS and _stackable(child.gate_proj, child.up_proj):
                setattr(parent, name, StackedGatedMLP(child))
                mlps += 1
            elif kind in STACKED_ATTENTIONS and _stackable(child.q_proj, child.k_proj, child.v_proj):
                weight, bias = _stack_linears([child.q_proj, child.k_proj, child.v_proj])
                child.register_buffer("stacked_qkv_weight", weight, persistent=False)  # (q + k + v, hidden)
                child.register_buffer("stacked_qkv_bias", bias, persistent=False)
                for projection in ("q_proj", "k_proj", "v_proj"):
                    setattr(child, projection, StackedProjection(getattr(child, projection)))
                child.register_forward_pre_hook(_project_once, with_kwargs=True)
                attentions += 1
    return f"query, key and value products of {attentions} attentions, gate and up products of {mlps} MLPs"


FLEX_BLOCK_PREFIX = "flex_attention_block"
# transformers 4's encoders (ModernBERT included) build their masks without transformers' mask functions
FLEX_TILES_SUPPORTED = int(transformers.__version__.split(".")[0]) >= 5


def _flex_attention_with_tiles(module, query, key, value, attention_mask, tiles: tuple[int, int], **kwargs):
    from transformers.integrations.flex_attention import flex_attention_forward

    if query.is_cuda:  # tile sizes of the compiled kernel; CPU kernels choose their own
        kwargs["kernel_options"] = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _flex_block_mask_with_tiles(*args, tiles: tuple[int, int], **kwargs):
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers.masking_utils import flex_attention_mask

    mask = flex_attention_mask(*args, **kwargs)  # transformers' own mask (padding, offsets), at the default block size
    batch, _, query_length, key_length = mask.shape
    device = mask.kv_num_blocks.device
    # built eagerly here and traced with the rest where the compressor is compiled (`compile_compressor`)
    return create_block_mask(mask.mask_mod, batch, None, query_length, key_length, device=device, BLOCK_SIZE=tiles)


def flex_attention_with_block_size(implementation: str) -> str:
    """Register `flex_attention_block{M}x{N}` (or `...block{M}`, square): transformers' flex attention with query
    tiles of M positions and key tiles of N, mask blocks to match; returns the name.

    Flex attention's default 128 x 128 tiles fit long sequences. ModernBERT's compressor rows are 269 positions: at
    128 they pad to 384 and a local layer's band (|i - j| <= 64) touches 7 of 9 tiles; smaller tiles pad less and the
    band skips more of them. `benchmarks/encoder_attention.py` times the sizes; NOTES.md has the outcome.
    """
    from transformers.masking_utils import AttentionMaskInterface

    sizes = re.fullmatch(re.escape(FLEX_BLOCK_PREFIX) + r"(\d+)(?:x(\d+))?", implementation)
    tiles = (int(sizes[1]), int(sizes[2] or sizes[1])) if sizes else None
    if tiles is None or min(tiles) < 16:
        raise ValueError(
            f"{implementation!r} is not a flex attention tile size: use {FLEX_BLOCK_PREFIX}MxN (or M for M x M) with "
            "tiles of at least 16 positions, e.g. flex_attention_block64x32 for ModernBERT's compressor rows."
        )
    if not FLEX_TILES_SUPPORTED:
        raise ValueError(
            f"{implementation} needs transformers 5 (earlier encoders build their masks without transformers' mask "
            f"functions), found {transformers.__version__}: upgrade transformers or keep sdpa."
        )
    AttentionInterface.register(implementation, functools.partial(_flex_attention_with_tiles, tiles=tiles))
    AttentionMaskInterface.register(implementation, functools.partial(_flex_block_mask_with_tiles, tiles=tiles))
    return implementation


def compile_compressor(model, mode: str | None = None) -> str:
    """torch.compile ScaleDown's compressor in place for serving; says what was compiled.

    An encoder (ModernBERT: norms, GeGLU, rotary embeddings and masks between small matrix products) compiles whole,
    and where `compress_batch` ends ModernBERT's pass on the memory rows, that pass is compiled whole too (each is
    compiled on its first call); an N-layers compressor runs through the query-sharing path with a KV cache, so it
    gets `compile_elementwise_work` with `mode` (the generator's mode: its blocks share their classes' code).
    """
    if not model.config.uses_encoder_compressor:
        return compile_elementwise_work(model.compressor, mode=mode)
    model.compressor.compile()  # for the memory-rows pass too, the plain path (`model.compress`)
    if not reads_memory_rows_only(model):
        return "the whole encoder"
    _encoders_compiled.add(model.compressor)
    return "the whole encoder, and its pass ending on the memory rows"


def compression_path(model, batch: dict[str, torch.Tensor]) -> str:
    """Which exact fast compression `compress_batch` takes for this model and batch: "shared query prefix" for a
    batch holding `compressor_query_lengths` (N-layers compressors), "last layer on memory rows" for a ModernBERT
    compressor (`reads_memory_rows_only`), else "whole compressor"."""
    if "compressor_query_lengths" in batch:
        return "shared query prefix"
    return "last layer on memory rows" if reads_memory_rows_only(model) else "whole compressor"


def compress_batch(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Compress a model-input batch the fast way that is exact for its compressor (`compression_path`)."""
    ids, mask = batch["compressor_input_ids"], batch["compressor_attention_mask"]
    path = compression_path(model, batch)
    if path == "shared query prefix":
        return compress_sharing_queries(model, ids, mask, batch["compressor_query_lengths"])
    if path == "last layer on memory rows":
        return compress_reading_memory_rows(model, ids, mask)
    return model.compress_tensors(ids, mask)


@torch.no_grad()
def generate_compressed(
    model,
    batch: dict[str, torch.Tensor],
    engine: StaticGreedyGenerator,
    max_new_tokens: int,
    stop_at_eos: bool = True,
    return_scores: bool = False,
    compressed: torch.Tensor | None = None,
):
    """ScaleDown's `generate` through the engine: compress (`compress_batch`, unless `compressed` already holds the
    batch's vectors), splice the vectors in, decode. `(batch, new)` ids."""
    if compressed is None:
        compressed, _ = compress_batch(model, batch)
    inputs_embeds = model.embed_generator_inputs(batch["input_ids"], compressed)  # (batch, seq, hidden)
    return engine.generate(
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        inputs_embeds=inputs_embeds,
        eos_token_id=model.generator_tokenizer.eos_token_id if stop_at_eos else None,
        pad_token_id=model.input_builder.generator_pad_id,
        return_scores=return_scores,
    )


@torch.no_grad()
def generate_compressed_overlapped(
    model, batches: list[dict[str, torch.Tensor]], engine: StaticGreedyGenerator, max_new_tokens: int, stop_at_eos=True
) -> list[torch.LongTensor]:
    """`generate_compressed` over a stream of batches, compressing batch i+1 on a side CUDA stream while batch i
    decodes: compression is compute-bound and a decode step mostly waits on memory, so the two share the GPU. Same
    ids as one `generate_compressed` per batch (off CUDA it is exactly that, in order).

    A batch whose decode graph is not captured yet runs with nothing beside it: capture forbids other streams'
    allocations.
    """
    device = batches[0]["input_ids"].device
    overlap = device.type == "cuda"
    main = torch.cuda.current_stream(device) if overlap else None
    side = torch.cuda.Stream(device) if overlap else None
    eos = model.generator_tokenizer.eos_token_id if stop_at_eos else None
    pad = model.input_builder.generator_pad_id
    compressed, _ = compress_batch(model, batches[0])
    outputs = []
    for index, batch in enumerate(batches):
        following = batches[index + 1] if index + 1 < len(batches) else None
        ready = engine.has_graph_for(batch["attention_mask"], max_new_tokens, eos, pad)
        beside = overlap and following is not None and ready
        if beside:  # the following batch's inputs were written on the main stream, before this batch's decode
            side.wait_stream(main)
        # Queued first: compression may wait on the host (row selection), and the decode replays must already be
        # queued on the main stream for the GPU to run them while it does.
        outputs.append(
            generate_compressed(model, batch, engine, max_new_tokens, stop_at_eos=stop_at_eos, compressed=compressed)
        )
        if following is None:
            break
        if beside:
            with torch.cuda.stream(side):
                following_compressed, _ = compress_batch(model, following)  # (batch, documents * memory, hidden)
            main.wait_stream(side)
            following_compressed.record_stream(main)  # made on the side stream, read and freed on the main one
        else:
            following_compressed, _ = compress_batch(model, following)
        compressed = following_compressed
    return outputs
