"""AWS Trainium (Trn1/Trn1n/Trn2) through optimum-neuron's NeuronTrainer.

optimum-neuron is an optional extra (`pip install 'scaledown[neuron]'` on a Neuron instance, with AWS's package
index for the compiler and runtime wheels; see the README). Everything here imports it lazily, so the rest of
ScaleDown never needs it.
"""

import importlib.util

from .trainer import ScaleDownTrainingMixin

NEURON_INSTALL_HINT = (
    "--device trainium needs optimum-neuron with its Neuron packages: on a Trn1/Trn2 instance run "
    "pip install 'scaledown[neuron]' --extra-index-url https://pip.repos.neuron.amazonaws.com "
    "(see the README's Trainium section)."
)


def is_optimum_neuron_available() -> bool:
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.neuron") is not None


def neuron_trainer_classes():
    """(ScaleDownNeuronTrainer, NeuronTrainingArguments), or a RuntimeError that says how to install them."""
    if not is_optimum_neuron_available():
        raise RuntimeError(NEURON_INSTALL_HINT)
    try:
        from optimum.neuron import NeuronTrainer, NeuronTrainingArguments
    except Exception as error:  # installed without the Neuron SDK (torch-neuronx, neuronx-distributed)
        raise RuntimeError(f"optimum-neuron is installed but cannot load its trainer ({error}). {NEURON_INSTALL_HINT}") from error

    class ScaleDownNeuronTrainer(ScaleDownTrainingMixin, NeuronTrainer):
        """NeuronTrainer with ScaleDown's loss terms and two learning rates (the code ScaleDownTrainer runs)."""

        def __init__(self, *args, compressor_learning_rate: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.compressor_learning_rate = compressor_learning_rate

    return ScaleDownNeuronTrainer, NeuronTrainingArguments


def to_neuron_arguments(training_args, neuron_arguments_class):
    """NeuronTrainingArguments with the same values as `training_args`, for the fields both classes have.

    NeuronTrainer has no evaluation loop and cannot resume optimizer state, and it compiles one graph per input
    shape; fields it does not know are dropped.
    """
    import dataclasses

    names = {f.name for f in dataclasses.fields(neuron_arguments_class) if f.init}
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(training_args) if f.init}
    return neuron_arguments_class(**{k: v for k, v in values.items() if k in names})
