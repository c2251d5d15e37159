"""`scaledown-train`: train a ScaleDown compressor (and the generator's LoRA) for your generator.

    scaledown-train --preset tiny                                  # the embedded demo, CPU, a few minutes
    scaledown-train --generator_name_or_path mistralai/Mistral-7B-Instruct-v0.2 --compressor_type n_layers \
        --num_layers 8 --train_data train.jsonl --output_dir runs/oscar-8l
    accelerate launch -m scaledown.train --config my_run.yaml       # same command on many GPUs

Every `transformers.TrainingArguments` field is a flag too; `--config file.yaml|json` sets any of them, and flags
given on the command line win over the file. Defaults are the paper's (OSCAR Table 7).
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from ._compat import checkpointing_arguments, warmup_arguments
from .configuration_scaledown import DEFAULT_GENERATOR, ScaleDownConfig
from .modeling_scaledown import ScaleDownForCausalLM
from .neuron import NEURON_INSTALL_HINT, is_optimum_neuron_available, neuron_trainer_classes, to_neuron_arguments
from .trainer import (
    DEFAULT_COMPRESSOR_LR,
    LossCurveCallback,
    ScaleDownCollator,
    ScaleDownTrainer,
    gradient_accumulation_for,
    load_examples,
    plot_loss_curve,
    pretraining_examples,
    read_texts,
    upcast_for_fsdp1,
)


@dataclass
class ScaleDownArguments:
    generator_name_or_path: str = field(default=DEFAULT_GENERATOR, metadata={"help": "Causal LM id or folder."})
    compressor_type: str = field(
        default="n_layers", metadata={"help": "n_layers | modernbert | encoder", "choices": ["n_layers", "modernbert", "encoder"]}
    )
    num_layers: int = field(default=8, metadata={"help": "Depth N of the n_layers compressor (5, 8, 10 in the paper)."})
    compressor_name_or_path: str | None = field(default=None, metadata={"help": "Encoder compressor checkpoint."})
    num_memory_tokens: int = field(default=8, metadata={"help": "Vectors per document (8 for 128 tokens = 16x)."})
    max_document_length: int = 128
    max_query_length: int = 64
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    enable_reranking: bool = field(default=False, metadata={"help": "Train the RR head on the data's rerank_scores."})
    rerank_loss_weight: float = 0.05
    train_data: str | None = field(default=None, metadata={"help": "JSONL, Parquet, datasets folder or Hub id."})
    eval_data: str | None = None
    stage: str = field(
        default="finetune",
        metadata={"help": "pretrain (plain text: auto-encoding + continuation) or finetune", "choices": ["pretrain", "finetune"]},
    )
    init_checkpoint: str | None = field(
        default=None, metadata={"help": "Start from a ScaleDown checkpoint, e.g. the pretraining stage's output."}
    )
    device: str = field(default="auto", metadata={"choices": ["auto", "gpu", "cpu", "trainium"]})
    compressor_learning_rate: float | None = field(
        default=None, metadata={"help": "Defaults: 5e-5 for n_layers, 1e-4 for encoders (--learning_rate is the LoRA's)."}
    )
    effective_batch_size: int = field(
        default=128, metadata={"help": "Gradient accumulation is set to reach it; 0 keeps --gradient_accumulation_steps."}
    )
    max_train_examples: int | None = None
    preset: str | None = field(default=None, metadata={"help": "tiny: the embedded CPU demo.", "choices": ["tiny"]})
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of any of these flags."})


def paper_training_defaults() -> dict:
    """OSCAR Table 7 where TrainingArguments' own defaults differ."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dict(
        output_dir="scaledown-output",
        learning_rate=1e-4,
        num_train_epochs=1,
        lr_scheduler_type="linear",
        **warmup_arguments(0.05),
        weight_decay=0.1,
        max_grad_norm=1.0,
        per_device_train_batch_size=4,
        bf16=bf16,
        **checkpointing_arguments(True, use_reentrant=False),
        remove_unused_columns=False,
        logging_steps=10,
        save_steps=500,
        save_total_limit=2,
        report_to="none",
    )


def parse_arguments(argv: list[str] | None = None) -> tuple[ScaleDownArguments, TrainingArguments]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ScaleDownArguments, TrainingArguments))
    parser.set_defaults(**paper_training_defaults())
    config_path = _flag_value(argv, "--config")
    if config_path:
        parser.set_defaults(**read_config_file(config_path))
    if "--preset" in argv and _flag_value(argv, "--preset") == "tiny":
        parser.set_defaults(**tiny_preset_defaults())
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return args, training_args


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(handle) or {}
        return json.load(handle)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


# ---- device ---------------------------------------------------------------------------------------------------
def apply_device_choice(device: str, training_args: TrainingArguments) -> None:
    if device == "cpu":
        training_args.use_cpu = True
        training_args.bf16 = False
    elif device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu was asked for but torch sees no CUDA device; use --device cpu or auto.")
    elif device == "trainium" and not is_optimum_neuron_available():
        raise RuntimeError(NEURON_INSTALL_HINT)


# ---- model and data -------------------------------------------------------------------------------------------
def build_model(args: ScaleDownArguments) -> ScaleDownForCausalLM:
    if args.init_checkpoint:
        model = ScaleDownForCausalLM.from_pretrained(args.init_checkpoint)
        if args.enable_reranking and not model.config.enable_reranking:
            raise ValueError(f"{args.init_checkpoint} has no rerank head; train it with --enable_reranking from the start.")
    else:
        config = ScaleDownConfig(
            generator_name_or_path=args.generator_name_or_path,
            compressor_type=args.compressor_type,
            num_compressor_layers=args.num_layers,
            compressor_name_or_path=args.compressor_name_or_path,
            num_memory_tokens=args.num_memory_tokens,
            max_document_length=args.max_document_length,
            max_query_length=args.max_query_length,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            enable_reranking=args.enable_reranking,
            rerank_loss_weight=args.rerank_loss_weight,
        )
        model = ScaleDownForCausalLM(config)
    # Trainable weights in float32 (mixed precision keeps master weights in full precision); the frozen base
    # generator stays in its checkpoint dtype.
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    model.train()
    return model


def load_split(args: ScaleDownArguments, source: str | None, split: str):
    import datasets

    if source is None:
        return None
    if args.stage == "pretrain":
        return datasets.Dataset.from_list(
            pretraining_examples(read_texts(source), words_per_chunk=max(16, args.max_document_length // 2))
        )
    rows = load_examples(source, split=split, require_rerank_scores=args.enable_reranking)
    if args.max_train_examples and split == "train":
        rows = rows.select(range(min(args.max_train_examples, len(rows))))
    return rows


def train(args: ScaleDownArguments, training_args: TrainingArguments) -> ScaleDownTrainer:
    """The whole training run: model, data, Trainer, checkpoint. Returns the trainer (its state holds the logs)."""
    apply_device_choice(args.device, training_args)
    if args.train_data is None:
        raise ValueError("--train_data is required (or run the embedded demo with --preset tiny).")
    if args.effective_batch_size:
        training_args.gradient_accumulation_steps = gradient_accumulation_for(
            args.effective_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    train_rows = load_split(args, args.train_data, "train")
    eval_rows = load_split(args, args.eval_data, "validation")
    trainer_class = ScaleDownTrainer
    if args.device == "trainium":
        if training_args.resume_from_checkpoint:
            raise ValueError(
                "NeuronTrainer cannot resume a run's optimizer state: restart from the last saved model with "
                "--init_checkpoint PATH instead of --resume_from_checkpoint."
            )
        trainer_class, arguments_class = neuron_trainer_classes()
        training_args = to_neuron_arguments(training_args, arguments_class)
    set_seed(training_args.seed)  # LoRA and new-row inits draw random numbers: a rerun must start from the same model
    model = build_model(args)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        # Pretraining text has no rerank targets; the RR head waits for fine-tuning.
        data_collator=ScaleDownCollator(
            model.input_builder, use_rerank_scores=model.config.enable_reranking and args.stage != "pretrain"
        ),
        compressor_learning_rate=args.compressor_learning_rate or DEFAULT_COMPRESSOR_LR[model.config.compressor_type],
        callbacks=[LossCurveCallback()],
    )
    if trainer.is_fsdp_enabled:
        upcast_for_fsdp1(model, trainer.accelerator)
    resume = training_args.resume_from_checkpoint
    if resume in ("last", "true", "True"):
        resume = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        plot_loss_curve(trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png"))
        with open(os.path.join(training_args.output_dir, "log_history.json"), "w") as handle:
            json.dump(trainer.state.log_history, handle, indent=1)
    return trainer


# ---- the embedded demo ----------------------------------------------------------------------------------------
def tiny_preset_defaults() -> dict:
    return dict(
        output_dir="scaledown-tiny",
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        num_train_epochs=3,
        logging_steps=5,
        save_steps=40,
        **checkpointing_arguments(False),
        disable_tqdm=False,
    )


def run_tiny_preset(args: ScaleDownArguments, training_args: TrainingArguments) -> dict:
    """Build a tiny generator locally, train ScaleDown on the bundled sample data, answer held-out questions."""
    from importlib.resources import files

    from .toy_models import build_causal_lm, build_tokenizer

    sample = files("scaledown") / "sample_data"
    train_path, eval_path = str(sample / "tiny_train.jsonl"), str(sample / "tiny_eval.jsonl")
    train_rows = [json.loads(line) for line in open(train_path, encoding="utf-8") if line.strip()]
    texts = [t for row in train_rows for t in [row["question"], row["answer"], *row["documents"]]]
    generator_dir = os.path.join(training_args.output_dir, "base_generator")
    with training_args.main_process_first(desc="building the demo generator"):  # one builder under torchrun/DDP
        if not os.path.isdir(generator_dir):
            build_causal_lm(generator_dir, build_tokenizer(texts, vocab_size=800), architecture="llama", num_layers=4)
    args.generator_name_or_path = generator_dir
    args.compressor_type, args.num_layers = "n_layers", 2
    args.num_memory_tokens, args.max_document_length, args.max_query_length = 4, 64, 24
    args.train_data, args.eval_data = train_path, None
    args.effective_batch_size = 0
    if args.device == "auto" and not torch.cuda.is_available():
        args.device = "cpu"
    trainer = train(args, training_args)

    if not trainer.is_world_process_zero():
        return {}
    # Answer from the saved checkpoint: under FSDP the trained model's weights are shards, and it shows the folder loads.
    model = ScaleDownForCausalLM.from_pretrained(training_args.output_dir).to(trainer.args.device).eval()
    held_out = [json.loads(line) for line in open(eval_path, encoding="utf-8") if line.strip()][:5]
    predictions = model.generate_from_documents(
        [row["question"] for row in held_out], [row["documents"] for row in held_out], max_new_tokens=8
    )
    print("\nHeld-out questions (entities never seen in training):")
    for row, prediction in zip(held_out, predictions):
        print(f"  Q: {row['question']}\n     gold: {row['answer']!r}   ScaleDown: {prediction!r}")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry] or [float("nan")]
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpoint and loss_curve.png in {training_args.output_dir}")
    print(
        "The demo's generator is a randomly initialised toy, so these answers only show the mechanics (a falling "
        "loss, a loadable checkpoint). For a run that learns to answer, see `scaledown reproduce` in the README."
    )
    return {"first_loss": losses[0], "last_loss": losses[-1], "predictions": predictions}


def main(argv: list[str] | None = None) -> None:
    args, training_args = parse_arguments(argv)
    if args.preset == "tiny":
        run_tiny_preset(args, training_args)
    else:
        train(args, training_args)


if __name__ == "__main__":
    main()
