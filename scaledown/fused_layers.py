"""Fused work of Llama-family layers for serving: the decode step as a few fused blocks (`FusedDecode`, for
`StaticGreedyGenerator`), and, for every forward, each residual sum run with the norm after it
(`fuse_residual_norms`).

At a small batch a decode step is a chain of small kernels: in the H100's batch-32 profile of Mistral-7B
(benchmarks/NOTES.md) each layer ran, besides its seven products and its attention, about fifteen kernels of 1-3 us
(two residual sums, two norms, the rotary embedding, two cache writes, the activation, layout copies), about 28 us a
layer and 0.9 ms of a 9.5 ms step. transformers' layer code keeps them apart: the residual sum and the next norm live
in different modules, the rotary embedding and the cache write in different functions. Here each layer is two
functions of tensors, compiled once for every layer (the weights are arguments, not constants), with the attention
between them:

- `attention_input`: the previous layer's residual sum, the input norm, the query, key and value products, the rotary
  embedding, the cache writes at the step's slot; returns the queries laid out by key/value group;
- the attention over the cache (the engine's kernel: SDPA or flex, chosen per shape);
- `attention_output`: the output product, the residual sum, the post-attention norm and the MLP; the MLP's residual sum
  is left to the next layer's `attention_input` (or the final norm), where it fuses with the norm.

Each function does what transformers' modules do, in their order (float32 norms included), so the logits equal
transformers' up to the kernels' summation order. Eagerly (the CPU tests) it is the same arithmetic; compiled, inductor
fuses each sum with its norm, the rotary embedding with the cache writes, the activation with its product.

The prefill's element-wise passes are over thousands of positions, where the sum and the norm cost their memory
traffic rather than their launches: fused, a sum and its norm read two tensors and write two, four passes against the
five they make apart (`ResidualNormDecoderLayer`).
"""

import functools

import torch
import torch.nn.functional as F

# The model families whose layers these levers (and `fast_generation.stack_projections`) know: a decoder layer of
# input norm, attention (q, k, v, o projections, rotary embedding), post-attention norm and gated MLP, as above.
LLAMA_FAMILIES = ("Llama", "Mistral", "Qwen2")
FUSED_LAYERS = tuple(f"{family}DecoderLayer" for family in LLAMA_FAMILIES)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (Mistral's and Qwen2's are the same): statistics in float32."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(dtype)


def add_rms_norm(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + delta` `(..., hidden)` and its RMS norm: one pass over the activations once compiled, where
    transformers' layer code runs the sum and the norm (in the next module or layer) as passes of their own."""
    total = residual + delta
    return total, _rms_norm(total, weight, eps)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Llama-family rotary embedding of `(..., head_dim)` states by angles cos, sin that broadcast against them.
    Written out rather than through a modeling file's function, which rotates a query and a key together."""
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin


def attention_input(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    projections: tuple,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's work up to its attention.

    residual `(batch, 1, hidden)` plus the previous layer's MLP output `delta` (None for the first layer) is the
    layer's input; projections: `((weight, bias),)` stacked `(q + k + v, hidden)` or the three of q, k, v; cos, sin
    `(batch, 1, head_dim)`; key_cache, value_cache `(batch, kv_heads, slots, head_dim)`, written at `slot` `(1,)`.
    Returns the layer's input (the next residual) and the queries `(batch, kv_heads, heads // kv_heads, head_dim)`.
    """
    batch, head_dim = residual.shape[0], key_cache.shape[-1]
    if delta is None:
        normed = _rms_norm(residual, norm_weight, eps)
    else:
        residual, normed = add_rms_norm(residual, delta, norm_weight, eps)
    if len(projections) == 1:
        qkv = F.linear(normed, *projections[0])  # (batch, 1, q + k + v)
        query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    else:
        query, key, value = (F.linear(normed, weight, bias) for weight, bias in projections)
    query = rotate(query.view(batch, heads, head_dim), cos, sin)  # (batch, heads, head_dim)
    key = rotate(key.view(batch, kv_heads, head_dim), cos, sin)
    key_cache.index_copy_(2, slot, key[:, :, None])
    value_cache.index_copy_(2, slot, value.view(batch, kv_heads, 1, head_dim))
    # head h reads key/value head h // (heads / kv_heads), as transformers' repeated heads do
    return residual, query.reshape(batch, kv_heads, heads // kv_heads, head_dim)


def attention_output(
    attended: torch.Tensor,
    residual: torch.Tensor,
    output_projection: tuple,
    norm_weight: torch.Tensor,
    eps: float,
    mlp_projections: tuple,
    act,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's work after its attention.

    attended `(batch, kv_heads, group, head_dim)`, the attention's output; residual `(batch, 1, hidden)`, the layer's
    input; output_projection `(weight, bias)`; mlp_projections `((gate_up_weight, bias), (down_weight, bias))` stacked
    or `((gate...), (up...), (down...))`. Returns the next residual and the MLP's output, whose sum is the layer's
    output (left to the next layer, whose norm it fuses with).
    """
    projected = F.linear(attended.reshape(attended.shape[0], 1, -1), *output_projection)  # (batch, 1, hidden)
    residual, normed = add_rms_norm(residual, projected, norm_weight, eps)
    if len(mlp_projections) == 2:
        gate, up = F.linear(normed, *mlp_projections[0]).chunk(2, dim=-1)
    else:
        gate, up = (F.linear(normed, weight, bias) for weight, bias in mlp_projections[:2])
    return residual, F.linear(act(gate) * up, *mlp_projections[-1])


def final_logits(
    residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, head: tuple
) -> torch.Tensor:
    """The last layer's output through the final norm and the LM head: `(batch, vocab)`."""
    return F.linear(add_rms_norm(residual, delta, norm_weight, eps)[1], *head)[:, -1]


def _compiles(use_compile: bool | None, device: torch.device) -> bool:
    """Whether a lever runs its functions compiled: as asked, or by default on CUDA, where their fusion is the point."""
    return use_compile if use_compile is not None else device.type == "cuda"


@functools.cache
def _compiled_add_rms_norm():
    return torch.compile(add_rms_norm)


class ResidualNormDecoderLayer(torch.nn.Module):
    """A Llama, Mistral or Qwen2 decoder layer (`fuse_residual_norms`) whose residual sums run with the norm after them:
    the attention's with the post-attention norm, the MLP's with the next layer's input norm, whose result it hands
    that layer with the sum. The same arithmetic as the layer it replaces, whose children (and so parameter names)
    it keeps. A layer given another input than the one handed to it (a hook that keeps some rows) norms its own.

    use_compile: run the sum and norm compiled (None: on CUDA only, where the saved pass is the point).
    """

    def __init__(self, layer: torch.nn.Module, use_compile: bool | None = None):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.attention_type = getattr(layer, "attention_type", None)  # transformers picks each layer's mask by it
        self.use_compile = use_compile
        self.next_layer: list = []  # the next ResidualNormDecoderLayer (in a list: not a child module)
        self.handed: tuple[torch.Tensor, torch.Tensor] | None = None  # (this layer's input, its input norm)

    def _add_norm(self, residual, delta, norm) -> tuple[torch.Tensor, torch.Tensor]:
        function = _compiled_add_rms_norm() if _compiles(self.use_compile, residual.device) else add_rms_norm
        return function(residual, delta, norm.weight, norm.variance_epsilon)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:  # (batch, length, hidden) both
        handed, self.handed = self.handed, None
        if handed is not None and handed[0] is hidden_states:
            normed = handed[1]
        else:
            normed = self.input_layernorm(hidden_states)
        del handed  # each activation is dropped once used, as transformers' layer drops it by reassignment
        attended = self.self_attn(hidden_states=normed, **kwargs)[0]  # the same keywords transformers' layer passes
        del normed
        residual, normed = self._add_norm(hidden_states, attended, self.post_attention_layernorm)
        del attended
        delta = self.mlp(normed)
        del normed
        if not self.next_layer:  # the model's final norm follows
            return residual + delta
        following = self.next_layer[0]
        output, following_normed = self._add_norm(residual, delta, following.input_layernorm)
        following.handed = (output, following_normed)
        return output


def fuse_residual_norms(module: torch.nn.Module, use_compile: bool | None = None) -> str:
    """Replace, in place, the decoder layers of FUSED_LAYERS in `module` (a generator, an N-layers compressor,
    a ScaleDown model) by `ResidualNormDecoderLayer`s; says how many. For inference: the state dict keeps its names
    and values. Call it before `compile_elementwise_work`, which compiles the norms and MLPs the layers keep using.
    A second call replaces nothing more."""
    replaced = 0
    for parent in list(module.modules()):
        layers = getattr(parent, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            continue
        for index, layer in enumerate(layers):
            if type(layer).__name__ in FUSED_LAYERS:
                layers[index] = ResidualNormDecoderLayer(layer, use_compile)
                replaced += 1
        for layer, following in zip(layers[:-1], layers[1:]):
            if isinstance(layer, ResidualNormDecoderLayer) and isinstance(following, ResidualNormDecoderLayer):
                layer.next_layer = [following]
    return f"residual sums of {replaced} decoder layers"


def _weights(linear) -> tuple:
    return linear.weight, linear.bias


def _plain_linear(*modules) -> bool:
    return all(type(module) is torch.nn.Linear for module in modules)


def unfusable_reason(generator) -> str | None:
    """Why `FusedDecode` cannot run this generator's decode step, or None when it can."""
    decoder = generator.get_decoder() if hasattr(generator, "get_decoder") else None
    if decoder is None or not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(generator).__name__} is not a Llama-family causal LM (embed_tokens, layers, norm, rotary_emb)"
    for index, layer in enumerate(decoder.layers):
        name = type(layer).__name__
        if name not in FUSED_LAYERS and not isinstance(layer, ResidualNormDecoderLayer):
            return f"layer {index} is a {name}, not one of {', '.join(FUSED_LAYERS)}"
        attention, mlp = layer.self_attn, layer.mlp
        stacked_attention = hasattr(attention, "stacked_qkv_weight")
        if not stacked_attention and not _plain_linear(attention.q_proj, attention.k_proj, attention.v_proj):
            return f"layer {index}'s query, key or value projection is a {type(attention.q_proj).__name__} (LoRA?)"
        gate = () if hasattr(mlp, "gate_up_weight") else (mlp.gate_proj, mlp.up_proj)
        if not _plain_linear(attention.o_proj, mlp.down_proj, *gate):
            return f"layer {index}'s output or MLP projections are not plain nn.Linear layers (LoRA?)"
    modules = [generator, decoder, *decoder.modules()]
    if any(getattr(module, "_hf_hook", None) is not None for module in modules):
        return "accelerate hooks (device_map offloading) move weights at each call"
    return None


class FusedDecode:
    """The decode step of a Llama, Mistral or Qwen2 generator through `attention_input`, the attention and
    `attention_output` for each layer (module docstring), reading the generator's own weights at each call.

    use_compile: torch.compile the three functions (None: on CUDA only, where their fusion is the point; the eager
    form is the same arithmetic, which the CPU tests compare with transformers' forward). mode: torch.compile's mode.
    Projections stacked by `stack_projections` are read as their stacks. LoRA-wrapped projections and offloaded
    weights are refused with the reason (`unfusable_reason`); merge adapters first.
    """

    def __init__(self, generator: torch.nn.Module, use_compile: bool | None = None, mode: str | None = None):
        reason = unfusable_reason(generator)
        if reason is not None:
            raise ValueError(
                f"The fused decode step cannot run this generator: {reason}. A ScaleDown checkpoint saved with "
                "`save_pretrained(..., merge_generator=True)` loads with its LoRA merged into plain layers; otherwise "
                "leave the fused decode step off for this model."
            )
        self.generator = generator
        self.use_compile = use_compile
        self.mode = mode
        self._compiled = None

    def _functions(self, device: torch.device) -> tuple:
        functions = (attention_input, attention_output, final_logits)
        if not _compiles(self.use_compile, device):
            return functions
        if self._compiled is None:
            self._compiled = tuple(torch.compile(function, mode=self.mode) for function in functions)
        return self._compiled

    @torch.no_grad()
    def __call__(self, tokens, positions, caches, slot, allowed, attend) -> torch.Tensor:
        """Logits `(batch, vocab)` of one step, the step's keys and values written into `caches` at `slot`.

        tokens, positions `(batch, 1)`; caches: each layer's `(keys, values)` `(batch, kv_heads, slots, head_dim)`,
        position i at slot i (a sliding window is no shorter than the cache: the engine refuses shorter ones); slot
        `(1,)`; allowed `(batch, 1, 1, slots)` boolean; attend(query, keys, values, allowed, scaling) returns
        `(batch, kv_heads, group, head_dim)` for queries laid out so.
        """
        decoder = self.generator.get_decoder()
        config = self.generator.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        before, after, last = self._functions(tokens.device)
        residual = decoder.embed_tokens(tokens)  # (batch, 1, hidden)
        cos, sin = decoder.rotary_emb(residual, position_ids=positions)  # (batch, 1, head_dim) each
        act = decoder.layers[0].mlp.act_fn  # one object for every layer: compiled once
        delta = None
        for layer, (keys, values) in zip(decoder.layers, caches):
            attention, mlp = layer.self_attn, layer.mlp
            if hasattr(attention, "stacked_qkv_weight"):
                projections = ((attention.stacked_qkv_weight, attention.stacked_qkv_bias),)
            else:
                projections = tuple(_weights(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
            if hasattr(mlp, "gate_up_weight"):
                mlp_projections = ((mlp.gate_up_weight, mlp.gate_up_bias), _weights(mlp.down_proj))
            else:
                mlp_projections = tuple(_weights(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            norm = layer.input_layernorm
            residual, query = before(
                residual, delta, norm.weight, norm.variance_epsilon, projections, cos, sin, keys, values, slot,
                heads, kv_heads,
            )
            attended = attend(query, keys, values, allowed, attention.scaling)
            norm = layer.post_attention_layernorm
            residual, delta = after(
                attended, residual, _weights(attention.o_proj), norm.weight, norm.variance_epsilon, mlp_projections, act
            )
        head = self.generator.get_output_embeddings()
        return last(residual, delta, decoder.norm.weight, decoder.norm.variance_epsilon, _weights(head))
