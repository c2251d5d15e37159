"""Configuration of ScaleDown, an OSCAR-style online soft compressor for retrieval-augmented generation.

This file travels with every checkpoint (``trust_remote_code``): it imports nothing but transformers.
"""

from transformers import AutoConfig, PretrainedConfig

COMPRESSOR_TYPES = ("n_layers", "encoder", "modernbert")
DEFAULT_GENERATOR = "mistralai/Mistral-7B-Instruct-v0.2"
DEFAULT_ENCODER = "answerdotai/ModernBERT-base"

# The OSCAR prompt (arXiv 2504.07109, Fig. 14): the compressed model and its teacher share it.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents "
    "and to answer to questions as briefly as possible."
)


class ScaleDownConfig(PretrainedConfig):
    r"""
    Configuration of [`ScaleDownForCausalLM`].

    Args:
        generator_name_or_path (`str`):
            Hub id or local folder of the causal LM that answers from the compressed documents.
        compressor_type (`str`):
            `"n_layers"`: a copy of the generator's embeddings and first `num_compressor_layers` layers.
            `"encoder"`: any `AutoModel` (an encoder such as BERT, or a small decoder) plus an MLP connector.
            `"modernbert"`: `"encoder"` with `compressor_name_or_path` defaulting to ModernBERT-base.
        num_compressor_layers (`int`): depth N of the n_layers compressor.
        compressor_name_or_path (`str`): the encoder compressor's base checkpoint.
        num_memory_tokens (`int`): compressed vectors per document (8 for 128 tokens is 16x).
        max_document_length (`int`): token budget of a document in the compressor; longer ones are truncated.
        max_query_length (`int`): token budget of the query in the compressor, separate from the document's.
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA on the generator (base weights stay frozen).
        enable_reranking (`bool`): append an RR token to every compressor input and score it with a linear head.
        rerank_loss_weight (`float`): weight of the rerank MSE term in the loss (0.05 in the paper).
        connector_hidden_size (`int`, *optional*): hidden width of the encoder connector MLP
            (defaults to twice the generator width, close to the paper's 8096 for a 4096-wide generator).
        system_prompt (`str`): system turn of the generator prompt.
        generator_subfolder (`str`, *optional*): set by a merged save; the generator's weights then live in this
            subfolder of the checkpoint instead of being fetched by `generator_name_or_path`.
        generator_config, compressor_config (`dict`, *optional*): filled at construction so that a checkpoint
            can rebuild its modules without fetching the base configs.
    """

    model_type = "scaledown"
    sub_configs = {"generator_config": AutoConfig, "compressor_config": AutoConfig}

    def __init__(
        self,
        generator_name_or_path: str = DEFAULT_GENERATOR,
        compressor_type: str = "n_layers",
        num_compressor_layers: int = 8,
        compressor_name_or_path: str | None = None,
        num_memory_tokens: int = 8,
        max_document_length: int = 128,
        max_query_length: int = 64,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.1,
        lora_target_modules: str | list[str] = "all-linear",
        enable_reranking: bool = False,
        rerank_loss_weight: float = 0.05,
        connector_hidden_size: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        generator_subfolder: str | None = None,
        generator_config: dict | PretrainedConfig | None = None,
        compressor_config: dict | PretrainedConfig | None = None,
        **kwargs,
    ):
        if compressor_type not in COMPRESSOR_TYPES:
            raise ValueError(
                f"Unknown compressor_type {compressor_type!r}. Use one of {COMPRESSOR_TYPES}: 'n_layers' copies the "
                "generator's first layers, 'encoder' wraps any AutoModel, 'modernbert' is 'encoder' with ModernBERT-base."
            )
        if compressor_type == "modernbert" and compressor_name_or_path is None:
            compressor_name_or_path = DEFAULT_ENCODER
        if compressor_type == "encoder" and compressor_name_or_path is None:
            compressor_name_or_path = DEFAULT_ENCODER
        if num_memory_tokens < 1:
            raise ValueError(f"num_memory_tokens must be at least 1, got {num_memory_tokens}.")
        if compressor_type == "n_layers" and num_compressor_layers < 1:
            raise ValueError(f"num_compressor_layers must be at least 1, got {num_compressor_layers}.")

        self.generator_name_or_path = generator_name_or_path
        self.compressor_type = compressor_type
        self.num_compressor_layers = num_compressor_layers
        self.compressor_name_or_path = compressor_name_or_path
        self.num_memory_tokens = num_memory_tokens
        self.max_document_length = max_document_length
        self.max_query_length = max_query_length
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.lora_target_modules = lora_target_modules
        self.enable_reranking = enable_reranking
        self.rerank_loss_weight = rerank_loss_weight
        self.connector_hidden_size = connector_hidden_size
        self.system_prompt = system_prompt
        self.generator_subfolder = generator_subfolder
        self.generator_config = _as_config(generator_config)
        self.compressor_config = _as_config(compressor_config)
        kwargs.setdefault("auto_map", {})
        kwargs["auto_map"].setdefault("AutoConfig", "configuration_scaledown.ScaleDownConfig")
        kwargs["auto_map"].setdefault("AutoModel", "modeling_scaledown.ScaleDownForCausalLM")
        kwargs["auto_map"].setdefault("AutoModelForCausalLM", "modeling_scaledown.ScaleDownForCausalLM")
        super().__init__(**kwargs)

    @property
    def uses_encoder_compressor(self) -> bool:
        return self.compressor_type in ("encoder", "modernbert")

    @property
    def compression_rate(self) -> float:
        return self.max_document_length / self.num_memory_tokens


def _as_config(value):
    if isinstance(value, dict):
        return AutoConfig.for_model(**value)
    return value


__all__ = ["ScaleDownConfig"]
