import json
import os
import subprocess
import sys

import pytest
import torch

from scaledown import ScaleDownForCausalLM
from scaledown.train import main, parse_arguments, train
from scaledown.trainer import ScaleDownTrainer, load_examples

FACTS = [
    ("Who founded Velmora?", "Velmora was founded by Arto Quell.", "Arto Quell"),
    ("Where does Tibbin live?", "Tibbin lives in Corsa.", "Corsa"),
    ("What colour is the Zell flag?", "The Zell flag is green.", "green"),
    ("Who painted Ombra?", "Ombra was painted by Lise Varn.", "Lise Varn"),
]


def write_examples(path, n=32, rerank=True):
    with open(path, "w") as handle:
        for i in range(n):
            question, doc, answer = FACTS[i % len(FACTS)]
            row = {"question": question, "documents": [doc, "The fox jumps."], "answer": answer}
            if rerank:
                row["rerank_scores"] = [3.0, -1.0]
            handle.write(json.dumps(row) + "\n")
    return str(path)


def base_argv(generator_dir, data, output_dir, *extra):
    return [
        "--generator_name_or_path", generator_dir, "--num_layers", "2", "--num_memory_tokens", "4",
        "--train_data", data, "--output_dir", str(output_dir), "--device", "cpu",
        "--per_device_train_batch_size", "4", "--effective_batch_size", "0", "--gradient_checkpointing", "false",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]  # fmt: skip


def test_loss_falls_over_30_steps(generator_dirs, tmp_path):
    data = write_examples(tmp_path / "train.jsonl")
    args, training_args = parse_arguments(
        base_argv(generator_dirs["llama"], data, tmp_path / "run", "--max_steps", "30", "--learning_rate", "1e-2",
                  "--compressor_learning_rate", "3e-3", "--enable_reranking", "--save_strategy", "no")
    )  # fmt: skip
    trainer = train(args, training_args)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    first, last = logs[0]["loss"], sum(e["loss"] for e in logs[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert "generation_loss" in logs[0] and "rerank_loss" in logs[0]
    assert logs[-1]["rerank_loss"] < logs[0]["rerank_loss"]
    assert os.path.isfile(tmp_path / "run" / "loss_curve.png")
    assert os.path.isfile(tmp_path / "run" / "training_args.json")
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    loaded = ScaleDownForCausalLM.from_pretrained(tmp_path / "run")
    assert loaded.config.enable_reranking


def test_two_learning_rates(generator_dirs, modernbert_dir, tmp_path):
    data = write_examples(tmp_path / "train.jsonl")
    for extra, compressor_lr in (([], 5e-5), (["--compressor_type", "modernbert", "--compressor_name_or_path", modernbert_dir], 1e-4)):
        args, training_args = parse_arguments(base_argv(generator_dirs["llama"], data, tmp_path / "o", *extra))
        assert training_args.learning_rate == 1e-4 and training_args.weight_decay == 0.1
        assert getattr(training_args, "warmup_ratio", None) == 0.05 or training_args.warmup_steps == 0.05
        assert training_args.max_grad_norm == 1.0
        from scaledown.train import build_model

        model = build_model(args)
        trainer = ScaleDownTrainer(model=model, args=training_args, compressor_learning_rate=None)
        groups = trainer.create_optimizer().param_groups
        by_side = {g["name"]: g["lr"] for g in groups}
        assert by_side["generator"] == 1e-4 and by_side["compressor"] == compressor_lr
        lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        compressor = {id(p) for n, p in model.named_parameters() if n.startswith(("compressor.", "connector."))}
        for group in groups:
            ids = {id(p) for p in group["params"]}
            assert not (ids & lora and ids & compressor)
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_effective_batch_defaults_to_128(generator_dirs, tmp_path):
    data = write_examples(tmp_path / "train.jsonl")
    argv = base_argv(generator_dirs["llama"], data, tmp_path / "o")
    argv[argv.index("--effective_batch_size") + 1] = "128"
    from scaledown.trainer import gradient_accumulation_for

    args, training_args = parse_arguments(argv)
    assert gradient_accumulation_for(args.effective_batch_size, training_args.per_device_train_batch_size, 1) == 32
    assert gradient_accumulation_for(128, 4, 2) == 16


def test_checkpointing_is_on_by_default_and_either_flag_turns_it_off(generator_dirs, tmp_path):
    from transformers import TrainingArguments

    def checkpointing(training_args) -> bool:  # transformers 5.25 renamed it activation_checkpointing
        return bool(getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing)

    data = write_examples(tmp_path / "train.jsonl")
    argv = base_argv(generator_dirs["llama"], data, tmp_path / "o")
    flag = argv.index("--gradient_checkpointing")
    default = argv[:flag] + argv[flag + 2 :]
    _, training_args = parse_arguments(default)
    assert checkpointing(training_args)
    options = getattr(training_args, "activation_checkpointing_kwargs", None)
    assert (options or training_args.gradient_checkpointing_kwargs) == {"use_reentrant": False}
    assert not checkpointing(parse_arguments(argv)[1])  # the flag users have passed until now
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        assert not checkpointing(parse_arguments(default + ["--activation_checkpointing", "false"])[1])


class _Crash(Exception):
    pass


def test_killed_run_resumes_to_the_same_end(generator_dirs, tmp_path):
    from transformers import TrainerCallback

    data = write_examples(tmp_path / "train.jsonl", n=40)
    common = ["--max_steps", "8", "--save_steps", "4", "--lora_dropout", "0.0", "--learning_rate", "1e-3"]
    args, training_args = parse_arguments(base_argv(generator_dirs["llama"], data, tmp_path / "full", *common))
    full = train(args, training_args).model

    class CrashAfterCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise _Crash()

    import scaledown.train as train_module

    original = train_module.LossCurveCallback
    train_module.LossCurveCallback = CrashAfterCheckpoint
    try:
        args, training_args = parse_arguments(base_argv(generator_dirs["llama"], data, tmp_path / "killed", *common))
        with pytest.raises(_Crash):
            train(args, training_args)
    finally:
        train_module.LossCurveCallback = original
    assert os.path.isdir(tmp_path / "killed" / "checkpoint-4")
    checkpoint = ScaleDownForCausalLM.from_pretrained(tmp_path / "killed" / "checkpoint-4")
    assert checkpoint.config.num_compressor_layers == 2

    args, training_args = parse_arguments(
        base_argv(generator_dirs["llama"], data, tmp_path / "killed", *common, "--resume_from_checkpoint", "last")
    )
    resumed = train(args, training_args).model
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_pretraining_stage_feeds_finetuning(generator_dirs, modernbert_dir, tmp_path):
    """Plain text has no rerank targets: the pretraining stage builds the RR head but trains without it."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Passage {i}: " + " ".join(f"word{j}" for j in range(i, i + 40)) for i in range(12)))
    encoder = ["--compressor_type", "modernbert", "--compressor_name_or_path", modernbert_dir, "--max_steps", "3",
               "--enable_reranking"]  # fmt: skip
    args, training_args = parse_arguments(
        base_argv(generator_dirs["llama"], str(text), tmp_path / "pre", *encoder, "--stage", "pretrain")
    )
    train(args, training_args)
    pretrained = ScaleDownForCausalLM.from_pretrained(tmp_path / "pre")
    data = write_examples(tmp_path / "train.jsonl")
    args, training_args = parse_arguments(
        base_argv(generator_dirs["llama"], data, tmp_path / "fine", "--max_steps", "2", "--init_checkpoint", str(tmp_path / "pre"),
                  "--enable_reranking")
    )
    trainer = train(args, training_args)
    finetuned = trainer.model
    assert finetuned.config.compressor_type == "modernbert"
    assert any("rerank_loss" in row for row in trainer.state.log_history)
    start = dict(pretrained.connector.named_parameters())
    assert any(not torch.equal(start[n], p.to(start[n].dtype)) for n, p in finetuned.connector.named_parameters())


def test_two_process_accelerate_run(generator_dirs, tmp_path):
    """Two CPU processes under torchrun (gloo): accelerate's own `launch --cpu` starts one process without MPI."""
    data = write_examples(tmp_path / "train.jsonl", n=16)
    argv = base_argv(generator_dirs["llama"], data, tmp_path / "ddp", "--num_train_epochs", "1", "--save_strategy", "no")
    argv[argv.index("--device") + 1] = "auto"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "scaledown.train", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((tmp_path / "ddp" / "log_history.json").read_text())
    assert history[-1]["step"] == 2  # 16 examples, 4 per process and step: two processes share an epoch in 2 steps
    model = ScaleDownForCausalLM.from_pretrained(tmp_path / "ddp")
    assert len(model.generate_from_documents(["Who founded Velmora?"], [["Velmora."]], max_new_tokens=3)) == 1


def test_parameter_groups_see_through_wrappers(generator_dirs, tmp_path):
    """DDP prefixes names with `module.`, FSDP adds `_fsdp_wrapped_module.`: the two learning rates must not move."""
    from scaledown.trainer import parameter_groups

    args, _ = parse_arguments(base_argv(generator_dirs["llama"], write_examples(tmp_path / "t.jsonl"), tmp_path / "o"))
    from scaledown.train import build_model

    model = build_model(args)
    wrapper = torch.nn.Module()
    wrapper.module = torch.nn.Module()
    wrapper.module._fsdp_wrapped_module = model  # names: module._fsdp_wrapped_module.generator...
    decay = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}

    def summary(groups):
        return sorted((g["name"], g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in groups)

    plain = summary(parameter_groups(model, 1e-4, 5e-5, 0.1, decay))
    wrapped = summary(parameter_groups(wrapper, 1e-4, 5e-5, 0.1, {f"module._fsdp_wrapped_module.{n}" for n in decay}))
    assert wrapped == plain
    assert {name for name, *_ in plain} >= {"generator", "compressor"}


def test_tiny_preset_answers_from_its_saved_checkpoint(tmp_path):
    from scaledown.train import run_tiny_preset

    args, training_args = parse_arguments(
        ["--preset", "tiny", "--output_dir", str(tmp_path / "tiny"), "--max_steps", "2", "--logging_steps", "1",
         "--device", "cpu",
         "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
    )  # fmt: skip
    result = run_tiny_preset(args, training_args)
    assert len(result["predictions"]) == 5 and result["last_loss"] == result["last_loss"]  # logged, not NaN
    assert os.path.isfile(tmp_path / "tiny" / "model.safetensors")


# ---- bad input ------------------------------------------------------------------------------------------------


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_example_without_answer_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "documents": ["d"], "answer": "a"}) + "\n"
                    + json.dumps({"question": "q", "documents": ["d"]}) + "\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"line 2 of .*bad.jsonl has no 'answer'"):
        load_examples(str(path))


def test_rerank_scores_length_mismatch(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "documents": ["d", "e"], "answer": "a", "rerank_scores": [1.0]}))
    with pytest.raises(ValueError, match="1 rerank_scores for 2 documents"):
        load_examples(str(path))


def test_reranking_without_scores(generator_dirs, tmp_path):
    data = write_examples(tmp_path / "train.jsonl", rerank=False)
    args, training_args = parse_arguments(base_argv(generator_dirs["llama"], data, tmp_path / "o", "--enable_reranking"))
    with pytest.raises(ValueError, match="no 'rerank_scores' field"):
        train(args, training_args)


def test_parquet_and_datasets_folder(tmp_path):
    import datasets

    rows = [{"question": q, "documents": [d], "answer": a} for q, d, a in FACTS]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    dataset.save_to_disk(str(tmp_path / "folder"))
    assert len(load_examples(str(tmp_path / "train.parquet"))) == 4
    assert load_examples(str(tmp_path / "folder"))[0]["answer"] == "Arto Quell"


def test_trainium_without_optimum_neuron(generator_dirs, tmp_path):
    try:
        import optimum.neuron  # noqa: F401

        pytest.skip("optimum-neuron is installed")
    except ImportError:
        pass
    data = write_examples(tmp_path / "train.jsonl")
    with pytest.raises(RuntimeError, match=r"pip install 'scaledown\[neuron\]'"):
        main(base_argv(generator_dirs["llama"], data, tmp_path / "o", "--device", "trainium"))


def test_yaml_config_with_cli_override(generator_dirs, tmp_path):
    data = write_examples(tmp_path / "train.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"learning_rate: 0.0005\nnum_layers: 3\ntrain_data: {data}\n")
    args, training_args = parse_arguments(["--config", str(config), "--num_layers", "2", "--output_dir", str(tmp_path)])
    assert training_args.learning_rate == 0.0005 and args.num_layers == 2 and args.train_data == data


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp1", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    """The README's multi-GPU commands point at these files; FSDP ones must gather full checkpoints for from_pretrained."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2
    if name.startswith("fsdp"):
        assert config.fsdp_config["fsdp_version"] == (1 if name == "fsdp1" else 2)
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("fsdp_version, dtype", [(1, torch.float32), (2, torch.bfloat16), (None, torch.bfloat16)])
def test_only_fsdp1_upcasts_the_frozen_weights(fsdp_version, dtype):
    from types import SimpleNamespace

    from scaledown.trainer import upcast_for_fsdp1

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    plugin = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
    upcast_for_fsdp1(model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    assert model.weight.dtype == dtype
