"""The method learns: a miniature OSCAR run on CPU, judged on people the training never saw.

The answer to a held-out question is in its documents only (facts are drawn afresh for every question), so
closed-book sits at chance. A compressor whose vectors never reached the generator (a broken splice) would score
like closed-book; the assertion asks for a margin well above that.
"""

import json

import pytest

from scaledown.mini_oscar.reproduce import run


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mini_oscar")


@pytest.fixture(scope="module")
def results(output_dir):
    return run("cpu", str(output_dir), device="cpu")


def test_teacher_reads_documents(results):
    full_text = results["baselines"]["uncompressed"]["match"]
    closed_book = results["baselines"]["closed_book"]["match"]
    assert full_text >= 0.5, results
    assert closed_book <= results["closed_book_chance"] + 0.1, results


def test_compressed_answers_come_from_the_documents(results):
    compressed = results["variants"]["n_layers-16x"]
    closed_book = results["baselines"]["closed_book"]["match"]
    assert compressed["compression"] == 16
    assert compressed["match"] >= closed_book + 0.1, results


def test_report_files(results, output_dir):
    assert json.loads((output_dir / "results.json").read_text())["variants"].keys() == {"n_layers-16x"}
    assert "| n_layers-16x | 16x |" in (output_dir / "results.md").read_text()
    assert (output_dir / "mini_oscar.png").read_bytes()[:4] == b"\x89PNG"


def test_variants_side_by_side_and_resumed(tmp_path):
    """--jobs trains variants in parallel processes; a rerun keeps finished ones and redoes only what is missing."""
    results = run("smoke", str(tmp_path), device="cpu", jobs=2)
    assert list(results["variants"]) == ["n_layers-16x", "n_layers-32x"]
    assert [row["compression"] for row in results["variants"].values()] == [16, 32]
    kept = (tmp_path / "n_layers-16x" / "evaluation.json").stat().st_mtime_ns
    (tmp_path / "n_layers-32x" / "evaluation.json").unlink()
    again = run("smoke", str(tmp_path), device="cpu", variants=["n_layers-32x"])
    assert list(again["variants"]) == ["n_layers-16x", "n_layers-32x"]  # the report merges both runs
    assert (tmp_path / "n_layers-16x" / "evaluation.json").stat().st_mtime_ns == kept
    assert again["baselines"] == results["baselines"]


def test_teacher_batches_label_the_answer_and_eos_only():
    from scaledown.mini_oscar.teacher import FullTextCollator, tokenize_full_text
    from scaledown.mini_oscar.world import build_world, make_examples
    from scaledown.toy_models import build_tokenizer

    world = build_world(seed=0, num_entities=20, eval_fraction=0.25)
    examples = make_examples(world, "train", questions_per_entity=1, num_documents=2)[:4]
    tokenizer = build_tokenizer([t for e in examples for t in (e["question"], e["answer"], *e["documents"])], 300)
    tokenized = tokenize_full_text(tokenizer, examples)
    batch = FullTextCollator(tokenizer.pad_token_id)(tokenized)
    width = max(len(e["prompt"]) + len(e["answer"]) for e in tokenized)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for row, example, item in zip(range(4), examples, tokenized):
        assert batch["attention_mask"][row, -1] == 1  # left padded: every row ends at the last column
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == item["answer"] and labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]).strip() == example["answer"]


def test_variant_settings_reach_the_training_command(monkeypatch, tmp_path):
    """Per-variant pretraining steps, learning rate and step count; pretrain_steps=0 skips the pretraining stage."""
    from scaledown.mini_oscar import reproduce

    calls = []
    monkeypatch.setattr(reproduce, "train_main", lambda argv: calls.append(argv))

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    scale = reproduce.SCALES["gpu"]
    encoder = dict(name="enc", compressor="encoder", memory_tokens=4, compressor_learning_rate=1e-4, max_steps=7)
    reproduce.train_variant({**encoder, "pretrain_steps": 0}, scale, "gen", "data", str(tmp_path), "cpu", 0)
    assert len(calls) == 1 and "--init_checkpoint" not in calls[0] and "--stage" not in calls[0]
    assert flag(calls[0], "--max_steps") == "7" and flag(calls[0], "--compressor_learning_rate") == "0.0001"

    calls.clear()
    reproduce.train_variant({**encoder, "pretrain_steps": 5}, scale, "gen", "data", str(tmp_path), "cpu", 0)
    pretrain, finetune = calls
    assert flag(pretrain, "--stage") == "pretrain" and flag(pretrain, "--max_steps") == "5"
    assert flag(finetune, "--init_checkpoint") == flag(pretrain, "--output_dir")

    calls.clear()
    n_layers = dict(name="nl", compressor="n_layers", num_layers=3, memory_tokens=4)
    reproduce.train_variant(n_layers, scale, "gen", "data", str(tmp_path), "cpu", 0)
    assert flag(calls[0], "--max_steps") == str(scale["scaledown"]["max_steps"])
    assert flag(calls[0], "--compressor_learning_rate") == str(scale["scaledown"]["compressor_learning_rate"])
