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


def cache_keyword(model) -> str:
    """The name of the KV cache in `model`'s forward arguments and outputs: `cache` from transformers 5.25, which
    still takes `past_key_values` with a warning until 5.40, and `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
