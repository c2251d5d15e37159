"""The differences between transformers versions (4.57, optimum-neuron's pin, to the newest 5.x) that ScaleDown's
training code and generation engine meet, in one place. (The model files stand alone on the Hub and need none of
this.)"""

import inspect

from transformers import TrainingArguments

_TRAINING_FIELDS = TrainingArguments.__dataclass_fields__


def warmup_arguments(ratio: float) -> dict:
    """A warmup given as a fraction of the run: `warmup_ratio` on 4.x, a float `warmup_steps` on 5.x."""
    if "warmup_ratio" in _TRAINING_FIELDS:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def checkpointing_arguments(enabled: bool, **options) -> dict:
    """Activation checkpointing for `TrainingArguments`, under the names this transformers reads.

    transformers 5.25 renamed `gradient_checkpointing*` to `activation_checkpointing*`. It still reads the old names
    when the new ones are unset, so defaults under the old names leave a user's flag of either name in charge (a
    default under the new name would override a user's `--gradient_checkpointing false`). The new names serve once
    the old ones are gone.
    """
    prefix = "gradient" if "gradient_checkpointing" in _TRAINING_FIELDS else "activation"
    return {f"{prefix}_checkpointing": enabled, **({f"{prefix}_checkpointing_kwargs": options} if options else {})}


def checkpointing_flag() -> str:
    """The command-line flag of `checkpointing_arguments`."""
    return "--" + next(iter(checkpointing_arguments(False)))


def cache_keyword(model) -> str:
    """The name of the KV cache in `model`'s forward arguments and outputs: `cache` from transformers 5.25, which
    still takes `past_key_values` with a warning until 5.40, and `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
