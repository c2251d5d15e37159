"""Publishing ScaleDown models on the Hugging Face Hub: model cards (`card`) and one-commit uploads (`push`)."""

from .card import build_model_card, eval_results, evaluation_tables, speedup_table
from .push import (
    CheckpointError,
    InvalidRepoIdError,
    MissingTokenError,
    PushError,
    check_checkpoint,
    push_checkpoint,
    push_model,
    stage_checkpoint,
)

__all__ = [
    "CheckpointError",
    "InvalidRepoIdError",
    "MissingTokenError",
    "PushError",
    "build_model_card",
    "check_checkpoint",
    "eval_results",
    "evaluation_tables",
    "push_checkpoint",
    "push_model",
    "speedup_table",
    "stage_checkpoint",
]
