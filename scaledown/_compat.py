"""The differences between transformers 4.57 (optimum-neuron's pin) and 5.x that ScaleDown's training code meets,
in one place. (The model files stand alone on the Hub and need none of this.)"""

from transformers import TrainingArguments

_TRAINING_FIELDS = TrainingArguments.__dataclass_fields__


def warmup_arguments(ratio: float) -> dict:
    """A warmup given as a fraction of the run: `warmup_ratio` on 4.x, a float `warmup_steps` on 5.x."""
    if "warmup_ratio" in _TRAINING_FIELDS:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}
