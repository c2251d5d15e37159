"""Analytic cost model of compressed and uncompressed RAG: FLOPs, bytes moved and the roofline.

Counted: every matrix multiplication (2 FLOPs per multiply-add) of the attention projections, the attention itself
(scores and weighted values), the MLP, the LM head where logits are computed, and ScaleDown's connector and rerank
head. Left out: norms, rotary embeddings, softmax and activations, which are element-wise and well under 1% at these
sizes, and an unmerged LoRA's low-rank matmuls (2 r (in + out) per adapted matrix and token: about 1% at r = 16).
Every sequence is counted at its own length (no padding), which is the work an ideal engine does.

Bytes are a lower bound on memory traffic: the weights every forward pass must read once, plus the KV cache written
in prefill and read at each decoding step. Activations are assumed to stay on chip.

Two conventions for the compressor: OSCAR's FLOPs (Table 1) fit 10 x (128 document + 8 memory) tokens, without the
query the compressor actually reads ("paper"); "honest" counts every token of the compressor input. Callers choose by
the row lengths they pass to `compressor_phase`.

The roofline (Williams et al. 2009): a phase cannot run faster than max(FLOPs / peak FLOP/s, bytes / peak bandwidth).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TransformerShape:
    """What the cost of a transformer depends on, read from its config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mlp_matrices: int = 3  # gated MLPs (Llama, Mistral, Qwen2) and ModernBERT's GeGLU have 3 h x i matrices; BERT 2
    causal: bool = True

    @classmethod
    def from_config(cls, config) -> "TransformerShape":
        """Read a transformers config (a decoder such as Mistral or an encoder such as ModernBERT or BERT)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        model_type = getattr(config, "model_type", "")
        is_encoder = model_type in ("bert", "roberta", "xlm-roberta", "modernbert", "deberta-v2", "electra")
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            # Plain BERT-style MLPs have an up and a down matrix; gated and GeGLU MLPs have three.
            mlp_matrices=2 if is_encoder and model_type != "modernbert" else 3,
            causal=not is_encoder,
        )

    # ---- parameters ---------------------------------------------------------------------------------------------
    def layer_weight_count(self) -> int:
        query_and_output = 2 * self.hidden_size * self.num_heads * self.head_dim
        keys_and_values = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = self.mlp_matrices * self.hidden_size * self.intermediate_size
        return query_and_output + keys_and_values + mlp

    def lm_head_weight_count(self) -> int:
        return self.hidden_size * self.vocab_size

    # ---- FLOPs ---------------------------------------------------------------------------------------------------
    def linear_flops_per_token(self) -> int:
        """Projections and MLP of all layers for one token (2 FLOPs per weight)."""
        return 2 * self.num_layers * self.layer_weight_count()

    def attention_flops(self, query_key_pairs: int) -> int:
        """Scores (Q K^T) and weighted values (A V) of all layers, for this many (query, key) pairs."""
        return 2 * 2 * self.num_layers * self.num_heads * self.head_dim * query_key_pairs

    def lm_head_flops(self, num_positions: int) -> int:
        return 2 * self.lm_head_weight_count() * num_positions

    def sequence_flops(self, length: int) -> int:
        """One forward pass over a whole sequence (prefill or an encoder), without the LM head."""
        # Causal: token t attends to t + 1 keys, so the pairs sum to L (L + 1) / 2; bidirectional: L^2.
        pairs = length * (length + 1) // 2 if self.causal else length * length
        return self.linear_flops_per_token() * length + self.attention_flops(pairs)

    # ---- bytes ---------------------------------------------------------------------------------------------------
    def kv_bytes_per_token(self, bytes_per_value: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value


@dataclass
class Phase:
    """A stretch of work that runs in `steps` sequential launches (decoding runs one step per new token)."""

    name: str
    step_flops: list[float] = field(default_factory=list)
    step_bytes: list[float] = field(default_factory=list)

    def add_step(self, flops: float, bytes_moved: float) -> None:
        self.step_flops.append(float(flops))
        self.step_bytes.append(float(bytes_moved))

    @property
    def flops(self) -> float:
        return sum(self.step_flops)

    @property
    def bytes(self) -> float:
        return sum(self.step_bytes)

    def best_seconds(self, hardware: "Hardware") -> float:
        """Roofline time: each step is bound either by compute or by memory, whichever is slower."""
        return sum(
            max(flops / hardware.peak_flops, bytes_moved / hardware.peak_bandwidth)
            for flops, bytes_moved in zip(self.step_flops, self.step_bytes)
        )


def generator_phases(
    shape: TransformerShape, prompt_lengths: list[int], new_tokens: int, bytes_per_value: int = 2
) -> list[Phase]:
    """Prefill of every prompt and greedy decoding of `new_tokens` tokens, batched.

    The prefill yields the first new token (transformers computes its logits at the last position only), so decoding
    runs `new_tokens - 1` forward steps of one token per sequence.
    """
    weight_bytes = (shape.num_layers * shape.layer_weight_count() + shape.lm_head_weight_count()) * bytes_per_value
    kv_bytes = shape.kv_bytes_per_token(bytes_per_value)

    prefill = Phase("prefill")
    prefill.add_step(
        flops=sum(shape.sequence_flops(length) + shape.lm_head_flops(1) for length in prompt_lengths),
        bytes_moved=weight_bytes + kv_bytes * sum(prompt_lengths),  # read every weight once, write the prompt's KV
    )
    decode = Phase("decode")
    for step in range(1, new_tokens):
        contexts = [length + step for length in prompt_lengths]  # the new token attends to all earlier ones and itself
        decode.add_step(
            flops=sum(
                shape.linear_flops_per_token() + shape.attention_flops(context) + shape.lm_head_flops(1)
                for context in contexts
            ),
            bytes_moved=weight_bytes + kv_bytes * sum(context + 1 for context in contexts),  # read the cache, write 1
        )
    return [prefill, decode]


def compressor_phase(
    shape: TransformerShape,
    row_lengths: list[int],
    num_memory_tokens: int,
    generator_hidden_size: int,
    connector_hidden_size: int | None = None,
    rerank_head: bool = False,
    bytes_per_value: int = 2,
) -> Phase:
    """One batched forward pass of the compressor over every (query, document) row.

    `shape.num_layers` is the compressor's depth (N for the N-layers compressor). An encoder compressor also runs the
    connector MLP (compressor width -> connector width -> generator width) on each memory vector.
    """
    connector_weights = 0
    if connector_hidden_size:
        connector_weights = shape.hidden_size * connector_hidden_size + connector_hidden_size * generator_hidden_size
    rerank_weights = shape.hidden_size if rerank_head else 0
    flops = sum(shape.sequence_flops(length) for length in row_lengths)
    flops += 2 * connector_weights * num_memory_tokens * len(row_lengths)
    flops += 2 * rerank_weights * len(row_lengths)
    weight_bytes = (
        shape.num_layers * shape.layer_weight_count() + connector_weights + rerank_weights
    ) * bytes_per_value
    phase = Phase("compress")
    phase.add_step(flops=flops, bytes_moved=weight_bytes)
    return phase


# ---- hardware --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    peak_bandwidth: float  # HBM bytes/s


# Vendor datasheet numbers, dense (no sparsity) bf16.
KNOWN_HARDWARE = {
    "H100-SXM": Hardware("H100-SXM", 989e12, 3.35e12),
    "H100-PCIe": Hardware("H100-PCIe", 756e12, 2.0e12),
    "H100-NVL": Hardware("H100-NVL", 835e12, 3.9e12),
    "H200": Hardware("H200", 989e12, 4.8e12),
    "A100-80GB": Hardware("A100-80GB", 312e12, 2.039e12),
    "A100-40GB": Hardware("A100-40GB", 312e12, 1.555e12),
}


def hardware_from_device_name(device_name: str, total_memory_bytes: int | None = None) -> Hardware | None:
    """Match a `torch.cuda.get_device_name()` string such as "NVIDIA H100 80GB HBM3" to its datasheet peaks."""
    name = device_name.upper()
    if "H200" in name:
        return KNOWN_HARDWARE["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return KNOWN_HARDWARE["H100-PCIe"]
        if "NVL" in name:
            return KNOWN_HARDWARE["H100-NVL"]
        return KNOWN_HARDWARE["H100-SXM"]
    if "A100" in name:
        large = "80GB" in name or (total_memory_bytes is not None and total_memory_bytes > 50e9)
        return KNOWN_HARDWARE["A100-80GB" if large else "A100-40GB"]
    return None


def detect_hardware(
    device, peak_tflops: float | None = None, peak_bandwidth_tbs: float | None = None
) -> Hardware | None:
    """Peak numbers given on the command line win; otherwise those of the detected GPU; None when unknown (CPU)."""
    import torch

    device = torch.device(device)
    detected = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        detected = hardware_from_device_name(torch.cuda.get_device_name(device), properties.total_memory)
    if peak_tflops is None and peak_bandwidth_tbs is None:
        return detected
    if detected is None and (peak_tflops is None or peak_bandwidth_tbs is None):
        raise ValueError("Unknown hardware: give both --peak_tflops and --peak_bandwidth_tbs for the roofline.")
    return Hardware(
        name="custom" if detected is None else f"{detected.name} (custom peaks)",
        peak_flops=peak_tflops * 1e12 if peak_tflops is not None else detected.peak_flops,
        peak_bandwidth=peak_bandwidth_tbs * 1e12 if peak_bandwidth_tbs is not None else detected.peak_bandwidth,
    )


__all__ = [
    "Hardware",
    "KNOWN_HARDWARE",
    "Phase",
    "TransformerShape",
    "compressor_phase",
    "detect_hardware",
    "generator_phases",
    "hardware_from_device_name",
]
