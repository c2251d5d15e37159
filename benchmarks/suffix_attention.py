"""The attention of a shared prefix's remainder: each row's last `rest` prompt positions over all of its keys.

    python benchmarks/suffix_attention.py --shape mistral-7b --cases 96x1474x35,512x254x32

A case is batch x prompt length x shared prefix length. With the prefix prefilled once
(`StaticGreedyGenerator._prefill_sharing_prefix`), the remainder's queries attend causally, aligned to the last key,
which is not the square causal attention of a whole prompt. This times the candidates alone at the bench's shapes,
each checked against a float32 reference on two rows (max |error|; a large one means the wrong alignment), beside the
whole prompt's square causal attention (`square`, what the prefill without sharing runs):
- `padded`, `padded-bshd` and `masked`: the engine's kernels (`causal_suffix_attention`): queries padded in front to
  the square kernel in the heads-major layout or in the query projection's own, or SDPA under the boolean lower-right
  mask with cuDNN first (`engine` and `cudnn-mask` in results before the engine had more than one);
- `bias`: grouped heads repeated, SDPA with a lower-right causal bias (the engine's first version);
- `flex`: flex attention with a lower-right causal block mask, grouped heads read in place (compiled per shape);
- `cudnn`: SDPA's is_causal on cuDNN with grouped heads (top-left alignment: wrong, timing only);
- `cascade`: the remainder over its own keys (square causal) and over the prefix's, merged by log-sum-exps;
- `flash`: FlashAttention-2's own causal mask through ATen's flash operator, grouped heads read in place.
SDPA's public call refuses flash and memory-efficient attention for grouped heads with is_causal here ("No available
kernel"); FlashAttention-2 itself aligns a causal mask with fewer queries than keys to the last key.
Queries are the transposed views transformers' attention receives (`(batch, length, heads, head_dim)` in memory), for
the candidates and for `square` alike; results before December 2026 timed contiguous `(batch, heads, ...)` queries.
"""

import argparse

import torch
import torch.nn.functional as F

from scaledown.evaluation import bench
from scaledown.fast_generation import causal_suffix_attention

from phase_times import median_ms  # a sibling script: its directory is on the path when this one runs


def lower_right_flex(rest: int, length: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = length - rest

    def causal_to_last_key(batch, head, query_index, key_index):
        return key_index <= query_index + offset

    block_mask = create_block_mask(causal_to_last_key, None, None, rest, length, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(query, key, value, scaling):
        return compiled(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True).transpose(1, 2)

    return attend


def lower_right_allowed(rest: int, length: int, device) -> torch.Tensor:
    """`(rest, length)` boolean: query i, at slot length - rest + i, may attend to the keys up to its own slot."""
    slots = torch.arange(length, device=device)
    return slots[None, :] <= slots[length - rest :, None]


def reference(query, key, value, scaling):
    """float32 attention of the last queries, causal aligned to the last key, `(batch, rest, heads, head_dim)`."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.float().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = query.float() @ key.transpose(-1, -2) * scaling  # (batch, heads, rest, length)
    allowed = lower_right_allowed(*scores.shape[-2:], query.device)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ value).transpose(1, 2)


def lower_right_bias(query, key, value, scaling):
    from torch.nn.attention.bias import causal_lower_right

    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = causal_lower_right(query.shape[2], key.shape[2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling).transpose(1, 2)


def causal_on_cudnn(query, key, value, scaling):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2)


def cascade(query, key, value, scaling):
    """Two square-friendly cuDNN calls merged by their log-sum-exps: the remainder over its own keys (square
    causal) and over the prefix's (no mask)."""
    rest, prefix = query.shape[2], key.shape[2] - query.shape[2]
    groups = query.shape[1] // key.shape[1]
    parts = []
    own = (key[:, :, prefix:], value[:, :, prefix:], True)
    for keys, values, causal in (own, (key[:, :, :prefix], value[:, :, :prefix], False)):
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, keys, values, None, True, 0.0, causal, False, scale=scaling
        )[:2]
        parts.append((output.float(), lse.float().reshape(*output.shape[:3], 1)))  # (batch, heads, rest, 1)
    (own, own_lse), (shared, shared_lse) = parts
    top = torch.maximum(own_lse, shared_lse)
    own_weight, shared_weight = (own_lse - top).exp(), (shared_lse - top).exp()
    merged = (own * own_weight + shared * shared_weight) / (own_weight + shared_weight)
    return merged.to(query.dtype).transpose(1, 2)


def flash_lower_right(query, key, value, scaling):
    output = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)[0]
    return output.transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mistral-7b", choices=sorted(bench.GENERATOR_SHAPES))
    parser.add_argument("--cases", default="96x1474x35,512x254x32")
    parser.add_argument(
        "--answer_slots", type=int, default=0, help="keys and values as views of a cache this many slots longer"
    )
    parser.add_argument("--kernels", default=None, help="comma-separated subset of the candidates (default: all)")
    args = parser.parse_args()
    shape = bench.preset_shape(bench.GENERATOR_SHAPES[args.shape])
    device, dtype = torch.device("cuda"), torch.bfloat16
    scaling = shape.head_dim**-0.5
    print(f"{torch.cuda.get_device_name()}, {args.shape}: {shape.num_heads} heads, {shape.num_kv_heads} kv heads")
    print(f"{'case':>14}  {'kernel':>11}  {'ms a layer':>10}  {'max |error|':>11}")
    for case in args.cases.split(","):
        batch, length, prefix = (int(n) for n in case.split("x"))
        rest = length - prefix
        seeded = torch.Generator(device="cpu").manual_seed(0)

        def normal(*size):
            return torch.randn(*size, generator=seeded).to(device=device, dtype=dtype)

        query = normal(batch, rest, shape.num_heads, shape.head_dim).transpose(1, 2)  # as transformers hands it over
        slots = length + args.answer_slots
        key, value = (normal(batch, shape.num_kv_heads, slots, shape.head_dim)[:, :, :length] for _ in range(2))
        want = reference(query[:2], key[:2], value[:2], scaling)
        flex = lower_right_flex(rest, length, device)
        candidates = {
            "padded": lambda q, k, v: causal_suffix_attention(None, q, k, v, None, scaling=scaling)[0],
            "padded-bshd": lambda q, k, v: causal_suffix_attention(
                None, q, k, v, None, scaling=scaling, kernel="padded-bshd"
            )[0],
            "masked": lambda q, k, v: causal_suffix_attention(
                None, q, k, v, lower_right_allowed(rest, length, device)[None, None], scaling=scaling, kernel="masked"
            )[0],
            "bias": lambda q, k, v: lower_right_bias(q, k, v, scaling),
            "flex": lambda q, k, v: flex(q, k, v, scaling),
            "cudnn": lambda q, k, v: causal_on_cudnn(q, k, v, scaling),
            "cascade": lambda q, k, v: cascade(q, k, v, scaling),
            "flash": lambda q, k, v: flash_lower_right(q, k, v, scaling),
        }
        chosen = args.kernels.split(",") if args.kernels else list(candidates)
        unknown = set(chosen) - set(candidates)
        if unknown:
            raise SystemExit(f"--kernels: unknown {sorted(unknown)}; choose from {list(candidates)}.")
        for name in chosen:
            attend = candidates[name]
            try:
                error = (attend(query[:2], key[:2], value[:2]).float() - want).abs().max().item()
                ms = median_ms(lambda: attend(query, key, value), device, repeats=10)
            except RuntimeError as failure:
                print(f"{case:>14}  {name:>11}  fails: {str(failure).splitlines()[0][:100]}")
                continue
            print(f"{case:>14}  {name:>11}  {ms:10.3f}  {error:11.4f}")
        whole = normal(batch, length, shape.num_heads, shape.head_dim).transpose(1, 2)
        ms = median_ms(
            lambda: F.scaled_dot_product_attention(whole, key, value, is_causal=True, enable_gqa=True), device, 10
        )
        print(f"{case:>14}  {'square':>11}  {ms:10.3f}  {'-':>11}")
        del query, key, value, whole
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
