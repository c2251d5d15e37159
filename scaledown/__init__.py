"""ScaleDown: OSCAR-style online soft compression that makes retrieval-augmented generation cheaper."""

from .configuration_scaledown import ScaleDownConfig
from .modeling_scaledown import (
    CompressionOutput,
    ScaleDownForCausalLM,
    ScaleDownInputBuilder,
    ScaleDownOutput,
)

__all__ = [
    "CompressionOutput",
    "ScaleDownConfig",
    "ScaleDownForCausalLM",
    "ScaleDownInputBuilder",
    "ScaleDownOutput",
]
