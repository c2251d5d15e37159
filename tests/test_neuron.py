"""Trainium gating. A CPU machine can import optimum.neuron but not its NeuronTrainer (that needs the Neuron SDK
from AWS's package index), so the trainer subclass itself is checked only where it loads."""

import dataclasses
import importlib.util

import pytest

from scaledown.neuron import NEURON_INSTALL_HINT, is_optimum_neuron_available, neuron_trainer_classes, to_neuron_arguments
from scaledown.trainer import ScaleDownTrainer, ScaleDownTrainingMixin


def _neuron_trainer_loads() -> bool:
    try:
        from optimum.neuron import NeuronTrainer  # noqa: F401
    except Exception:
        return False
    return True


def test_availability_matches_the_installed_packages():
    expected = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.neuron") is not None
    assert is_optimum_neuron_available() == expected


def test_both_trainers_share_one_loss_and_optimizer():
    assert ScaleDownTrainer.compute_loss is ScaleDownTrainingMixin.compute_loss
    assert ScaleDownTrainer.create_optimizer is ScaleDownTrainingMixin.create_optimizer


@pytest.mark.skipif(_neuron_trainer_loads(), reason="the Neuron SDK is installed: the trainer loads")
def test_clear_error_without_the_neuron_sdk():
    with pytest.raises(RuntimeError) as error:
        neuron_trainer_classes()
    assert "pip install 'scaledown[neuron]'" in str(error.value)
    if is_optimum_neuron_available():  # optimum-neuron without neuronx: says what is missing
        assert "cannot load its trainer" in str(error.value)
    else:
        assert str(error.value) == NEURON_INSTALL_HINT


@pytest.mark.skipif(not _neuron_trainer_loads(), reason="needs optimum-neuron with the Neuron SDK (a Trainium host)")
def test_neuron_trainer_is_a_neuron_trainer_with_the_shared_loss():
    from optimum.neuron import NeuronTrainer

    trainer_class, _ = neuron_trainer_classes()
    assert issubclass(trainer_class, NeuronTrainer) and issubclass(trainer_class, ScaleDownTrainingMixin)
    assert trainer_class.compute_loss is ScaleDownTrainingMixin.compute_loss


def test_training_arguments_carry_over_to_neuron_arguments(tmp_path):
    from transformers import TrainingArguments

    @dataclasses.dataclass
    class FakeNeuronArguments:  # only some fields, as NeuronTrainingArguments has its own set
        output_dir: str
        learning_rate: float = 0.0
        weight_decay: float = 0.0
        tensor_parallel_size: int = 1

    source = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.1, report_to="none")
    converted = to_neuron_arguments(source, FakeNeuronArguments)
    assert (converted.output_dir, converted.learning_rate, converted.weight_decay) == (str(tmp_path), 1e-4, 0.1)
    assert converted.tensor_parallel_size == 1
