"""Training ScaleDown: example loading, the collator, and `ScaleDownTrainer`.

Sequence-level distillation (OSCAR §3): cross-entropy on a teacher's answers given the compressed documents, plus
`rerank_loss_weight * MSE(rerank_scores, teacher scores)` when the rerank head is on. The loss lives in the model's
forward; this module only feeds it and optimises it with two learning rates.
"""

import json
import math
import os
import random
import re

import torch
from transformers import Trainer, TrainerCallback

from .modeling_scaledown import ScaleDownInputBuilder

REQUIRED_FIELDS = ("question", "documents", "answer")
# Paper Table 7: the N-layers compressor needs a lower learning rate than the generator's LoRA.
DEFAULT_COMPRESSOR_LR = {"n_layers": 5e-5, "encoder": 1e-4, "modernbert": 1e-4}


# ---- data -----------------------------------------------------------------------------------------------------
def load_examples(source: str, split: str = "train", require_rerank_scores: bool = False):
    """Load training examples from JSONL, Parquet, a `datasets` folder (save_to_disk) or a Hub dataset id.

    Every row needs question, documents (a list of strings) and answer; rerank_scores, when present, needs one
    score per document. Errors name the row (line, for JSONL) and the fix.
    """
    import datasets

    if source.endswith((".jsonl", ".json", ".parquet")) or os.path.sep in source or source.startswith("."):
        if not os.path.exists(source):
            raise FileNotFoundError(
                f"Training data {source!r} does not exist. Pass a JSONL or Parquet file, a folder written by "
                "datasets' save_to_disk, or a Hub dataset id."
            )
    if os.path.isdir(source):
        dataset = datasets.load_from_disk(source)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    elif source.endswith(".parquet"):
        dataset = datasets.load_dataset("parquet", data_files=source, split="train")
    elif source.endswith((".jsonl", ".json")):
        dataset = datasets.load_dataset("json", data_files=source, split="train")
    else:
        dataset = datasets.load_dataset(source, split=split)
    validate_examples(dataset, source, require_rerank_scores)
    return dataset


def validate_examples(rows, source: str, require_rerank_scores: bool = False) -> None:
    where = "line" if source.endswith((".jsonl", ".json")) else "row"
    offset = 1 if where == "line" else 0
    columns = set(rows.column_names) if hasattr(rows, "column_names") else None
    if require_rerank_scores and columns is not None and "rerank_scores" not in columns:
        raise ValueError(
            f"--enable_reranking needs teacher scores, but {source} has no 'rerank_scores' field. Add one score per "
            "document (scaledown-prepare-data --stage rerank writes them) or train without --enable_reranking."
        )
    for index, row in enumerate(rows):
        label = f"{where} {index + offset} of {source}"
        for field in REQUIRED_FIELDS:
            if row.get(field) is None:
                raise ValueError(f"{label} has no {field!r}: every example needs question, documents and answer.")
        if not isinstance(row["documents"], (list, tuple)):
            raise ValueError(f"{label}: 'documents' must be a list of strings.")
        if not str(row["question"]).strip():
            raise ValueError(f"{label} has an empty question.")
        scores = row.get("rerank_scores")
        if scores is not None and len(scores) != len(row["documents"]):
            raise ValueError(
                f"{label} has {len(scores)} rerank_scores for {len(row['documents'])} documents: give one score "
                "per document."
            )
        if require_rerank_scores and scores is None:
            raise ValueError(f"{label} has no rerank_scores, which --enable_reranking needs.")


class ScaleDownCollator:
    """Batches examples into model inputs through the model's own input builder (one prompt format everywhere)."""

    def __init__(self, input_builder: ScaleDownInputBuilder, use_rerank_scores: bool = False):
        self.input_builder = input_builder
        self.use_rerank_scores = use_rerank_scores

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.input_builder(
            [e["question"] for e in examples],
            [list(e["documents"]) for e in examples],
            answers=[e["answer"] for e in examples],
            rerank_scores=[e["rerank_scores"] for e in examples] if self.use_rerank_scores else None,
        )


# ---- pretraining (encoder compressors) ------------------------------------------------------------------------
AUTOENCODE_QUESTION = "Repeat the background text exactly."
CONTINUE_QUESTION = "Continue the background text."


def pretraining_examples(texts: list[str], words_per_chunk: int = 64, autoencode_ratio: float = 0.5, seed: int = 0):
    """Turn plain text into examples for the pretraining stage (COCOM/OSCAR App. I).

    Auto-encoding: the compressed chunk must be reproduced. Continuation: the generator reads the compressed
    chunk and writes the text that follows it. Both teach the generator to read compressor vectors before
    fine-tuning; the exact recipe matters little (OSCAR App. I).
    """
    rng = random.Random(seed)
    words = [w for text in texts for w in text.split()]
    chunks = [" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]
    examples = []
    for index, chunk in enumerate(chunks):
        following = chunks[index + 1] if index + 1 < len(chunks) else None
        if following is None or rng.random() < autoencode_ratio:
            examples.append({"question": AUTOENCODE_QUESTION, "documents": [chunk], "answer": chunk})
        else:
            continuation = " ".join(following.split()[: max(8, words_per_chunk // 4)])
            examples.append({"question": CONTINUE_QUESTION, "documents": [chunk], "answer": continuation})
    return examples


def read_texts(source: str) -> list[str]:
    """Plain text for pretraining: a .txt file (one passage per line) or JSONL with a 'text' field."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"Pretraining text {source!r} does not exist: pass a .txt or a JSONL with 'text'.")
    with open(source, encoding="utf-8") as handle:
        if source.endswith((".jsonl", ".json")):
            return [json.loads(line)["text"] for line in handle if line.strip()]
        return [line.strip() for line in handle if line.strip()]


# ---- trainer --------------------------------------------------------------------------------------------------
class ScaleDownTrainingMixin:
    """What ScaleDown changes in a trainer: the loss terms logged apart and two learning rates.

    Shared by `ScaleDownTrainer` (transformers) and `ScaleDownNeuronTrainer` (optimum-neuron), so both optimise the
    same objective with the same parameter groups.
    """

    compressor_learning_rate: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        terms = self.__dict__.setdefault("_loss_terms", {"generation_loss": [], "rerank_loss": []})
        for name in terms:
            value = getattr(outputs, name)
            if value is not None:
                terms[name].append(value.detach().float())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, *args, **kwargs):
        if "loss" in logs:  # training logs: add the terms seen since the last log
            for name, values in self.__dict__.get("_loss_terms", {}).items():
                if values:
                    logs[name] = round(torch.stack(values).mean().item(), 4)
                values.clear()
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        self.optimizer = torch.optim.AdamW(
            parameter_groups(
                model,
                generator_lr=self.args.learning_rate,
                compressor_lr=self.compressor_learning_rate or DEFAULT_COMPRESSOR_LR[model.config.compressor_type],
                weight_decay=self.args.weight_decay,
                decay_names=set(self.get_decay_parameter_names(model)),
            ),
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        return self.optimizer


class ScaleDownTrainer(ScaleDownTrainingMixin, Trainer):
    """`transformers.Trainer` with ScaleDown's two learning rates and its loss terms logged apart."""

    def __init__(self, *args, compressor_learning_rate: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.compressor_learning_rate = compressor_learning_rate

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Save as transformers does, but keep the training arguments as JSON: a model folder holds no pickle."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        pickled = os.path.join(output_dir, "training_args.bin")
        if self.args.should_save and os.path.isfile(pickled):
            os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
                handle.write(self.args.to_json_string())


def upcast_for_fsdp1(model, accelerator) -> None:
    """FSDP1 flattens each wrapped unit into one tensor of one dtype, so the frozen bf16 weights go to float32 beside
    the trainable ones (its bf16 mixed precision still computes in bf16). FSDP2 shards each parameter apart and keeps
    their dtypes; DDP and one device need nothing."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.fsdp_version == 1:
        model.float()


_WRAPPER_SEGMENTS = re.compile(r"^module\.|_fsdp_wrapped_module\.|_checkpoint_wrapped_module\.|_orig_mod\.")


def unwrapped_name(name: str) -> str:
    """A parameter's name in the bare model: DDP, FSDP, activation checkpointing and torch.compile add segments."""
    return _WRAPPER_SEGMENTS.sub("", name)


def parameter_groups(model, generator_lr: float, compressor_lr: float, weight_decay: float, decay_names: set):
    """Generator side (LoRA, new token embeddings) at one rate; compressor side (compressor, connector, rerank head)
    at another. Biases and norms (not in `decay_names`) get no weight decay."""
    groups = {}
    decay_names = {unwrapped_name(name) for name in decay_names}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        name = unwrapped_name(name)
        side = "generator" if name.startswith(("generator.", "new_token_embeddings.")) else "compressor"
        decays = name in decay_names
        key = (side, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": generator_lr if side == "generator" else compressor_lr,
                "weight_decay": weight_decay if decays else 0.0,
                "name": f"{side}{'' if decays else '_no_decay'}",
            }
        groups[key]["params"].append(parameter)
    return list(groups.values())


class LossCurveCallback(TrainerCallback):
    """Writes loss_curve.png in the output folder whenever the Trainer logs, so a killed run still has its plot."""

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, os.path.join(args.output_dir, "loss_curve.png"))


def plot_loss_curve(log_history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        name: [(entry["step"], entry[name]) for entry in log_history if name in entry and "step" in entry]
        for name in ("loss", "generation_loss", "rerank_loss", "eval_loss")
    }
    series = {name: points for name, points in series.items() if points}
    if not series:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        steps, values = zip(*points)
        axis.plot(steps, values, label=name, marker="o" if len(points) < 20 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("ScaleDown training")
    if all(v > 0 for points in series.values() for _, v in points):
        axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def gradient_accumulation_for(effective_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """Accumulation steps that reach the paper's effective batch (128) on any number of devices."""
    return max(1, math.ceil(effective_batch_size / (per_device_batch_size * world_size)))
