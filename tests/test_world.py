"""The synthetic fact world: reproducible, split by person, every answer in exactly its gold document."""

import json

import pytest

from scaledown.mini_oscar.world import (
    ATTRIBUTES,
    PASSAGE_TEMPLATES,
    QUESTION_TEMPLATES,
    SAMPLE_DATA_DIR,
    build_world,
    chance_accuracy,
    expected_chance_accuracy,
    main,
    majority_guess_accuracy,
    make_examples,
    pretraining_texts,
    read_jsonl,
    write_jsonl,
    write_tiny_sample,
)

EXAMPLE_FIELDS = ("question", "documents", "answer", "answers", "relevance", "rerank_scores")
BUNDLED_FILES = ("tiny_train.jsonl", "tiny_eval.jsonl", "pretrain_text.txt")


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, num_entities=80, eval_fraction=0.25)


@pytest.fixture(scope="module")
def examples(world):
    return {
        split: make_examples(world, split, num_documents=5, questions_per_entity=4)
        for split in ("train", "test")
    }


def test_templates_cover_every_attribute_in_several_phrasings():
    for attribute in ATTRIBUTES:
        assert len(PASSAGE_TEMPLATES[attribute]) >= 3
        assert len(QUESTION_TEMPLATES[attribute]) >= 3


def test_same_seed_gives_identical_output_and_another_seed_differs():
    def generate(seed):
        world = build_world(seed=seed, num_entities=40)
        return (
            make_examples(world, "train", num_documents=4),
            make_examples(world, "test", num_documents=4),
            pretraining_texts(world),
        )

    assert generate(0) == generate(0)
    assert generate(0) != generate(1)


def test_example_seed_changes_passages_but_not_the_people(world):
    first = make_examples(world, "train", seed=0)
    second = make_examples(world, "train", seed=1)
    assert first != second
    assert {e["entity"] for e in first} == {e["entity"] for e in second}


def test_sizes_follow_the_arguments(world, examples):
    assert len(world.entities) == 80
    assert len(world.entities_of("test")) == 20
    assert len(world.entities_of("train")) == 60
    assert len(examples["train"]) == 60 * 4
    assert all(len(e["documents"]) == 5 for e in examples["train"])
    assert len(make_examples(world, "test", num_documents=3, questions_per_entity=9)) == 20 * 9


def test_train_and_test_people_are_disjoint(world, examples):
    train_names = {entity.name for entity in world.entities_of("train")}
    test_names = {entity.name for entity in world.entities_of("test")}
    assert not train_names & test_names
    assert len({entity.name for entity in world.entities}) == len(world.entities)
    train_text = "\n".join(
        "\n".join([e["question"], *e["documents"]]) for e in examples["train"]
    ) + "\n".join(pretraining_texts(world))
    leaked = [name for name in test_names if name in train_text]
    assert not leaked


def test_answer_appears_in_the_gold_document_only(examples):
    for example in examples["train"] + examples["test"]:
        answer = example["answer"].lower()
        containing = [i for i, doc in enumerate(example["documents"]) if answer in doc.lower()]
        assert containing == [example["relevance"].index(1)], example
        assert sum(example["relevance"]) == 1
        assert answer not in example["question"].lower()


def test_gold_document_is_about_the_asked_person_and_distractors_are_not(examples):
    for example in examples["test"]:
        for document, relevant in zip(example["documents"], example["relevance"]):
            assert (example["entity"] in document) == bool(relevant)


def test_fields_and_rerank_targets(examples):
    for example in examples["train"]:
        for field in EXAMPLE_FIELDS:
            assert field in example
        k = len(example["documents"])
        assert len(example["relevance"]) == len(example["rerank_scores"]) == k
        assert example["answers"] == [example["answer"]]
        gold = example["relevance"].index(1)
        assert example["rerank_scores"][gold] == 5.0
        assert all(score < 0 for i, score in enumerate(example["rerank_scores"]) if i != gold)


def test_gold_position_is_shuffled(examples):
    positions = {example["relevance"].index(1) for example in examples["train"]}
    assert positions == set(range(5))


def test_passages_are_short_and_state_two_to_four_facts(world, examples):
    for example in examples["train"]:
        for document in example["documents"]:
            assert len(document.split()) <= 40
            assert 2 <= document.count(".") <= 4
    for text in pretraining_texts(world):
        assert len(text.split()) <= 40


def test_hard_distractors_state_the_asked_attribute(world):
    hard = make_examples(world, "test", num_documents=5, hard_distractor_fraction=1.0)
    easy = make_examples(world, "test", num_documents=5, hard_distractor_fraction=0.0)

    def distractor_scores(examples):
        return [s for e in examples for s, r in zip(e["rerank_scores"], e["relevance"]) if not r]

    # Hard distractors look relevant (score just below zero); easy ones are scored clearly lower.
    assert min(distractor_scores(hard)) >= -2.0
    assert max(distractor_scores(easy)) <= -2.5


def test_pretraining_text_holds_no_test_person_by_default(world):
    test_names = [entity.name for entity in world.entities_of("test")]
    assert not [t for t in pretraining_texts(world) if any(name in t for name in test_names)]
    assert len(pretraining_texts(world, split="all", passages_per_entity=2)) == 2 * len(world.entities)


def test_chance_levels(world, examples):
    assert chance_accuracy(world, "colour") == pytest.approx(1 / 10)
    assert chance_accuracy(world, "birth_year") == pytest.approx(1 / 50)
    assert 0.0 < chance_accuracy(world) < 0.15
    assert 0.0 < expected_chance_accuracy(world, examples["test"]) < 0.15
    assert 0.0 <= majority_guess_accuracy(examples["train"], examples["test"]) < 0.3


def test_too_few_people_for_the_documents_is_an_error():
    world = build_world(seed=0, num_entities=10, eval_fraction=0.2)
    with pytest.raises(ValueError, match="documents"):
        make_examples(world, "test", num_documents=5)


def test_write_and_read_jsonl_roundtrip(tmp_path, examples):
    path = tmp_path / "examples.jsonl"
    write_jsonl(path, examples["test"])
    assert read_jsonl(path) == examples["test"]


def test_command_line_writes_the_three_files(tmp_path):
    summary = main(["--out", str(tmp_path), "--seed", "2", "--num-entities", "30", "--num-documents", "3"])
    assert summary["files"] == {"train.jsonl": 24 * 4, "test.jsonl": 6 * 2, "pretrain.txt": 24 * 4}
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 96
    assert (tmp_path / "pretrain.txt").read_text().count("\n") == 96


def test_bundled_sample_files_parse_and_have_the_fields():
    train = read_jsonl(SAMPLE_DATA_DIR / "tiny_train.jsonl")
    evaluation = read_jsonl(SAMPLE_DATA_DIR / "tiny_eval.jsonl")
    assert 200 <= len(train) <= 300
    assert 20 <= len(evaluation) <= 30
    for example in train + evaluation:
        for field in EXAMPLE_FIELDS:
            assert field in example
        assert len(example["documents"]) == 3
        assert len(example["relevance"]) == len(example["rerank_scores"]) == 3
    assert not {e["entity"] for e in train} & {e["entity"] for e in evaluation}
    lines = (SAMPLE_DATA_DIR / "pretrain_text.txt").read_text(encoding="utf-8").splitlines()
    assert 200 <= len(lines) <= 500 and all(lines)


def test_bundled_sample_files_match_the_generator(tmp_path):
    """The bundled files are exactly what `write_tiny_sample` produces: regenerate them after any change."""
    write_tiny_sample(tmp_path)
    for name in BUNDLED_FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE_DATA_DIR / name).read_bytes(), (
            f"{name} is stale: run `python -m scaledown.mini_oscar.world --tiny-sample --out scaledown/sample_data`"
        )


def test_json_lines_are_plain_json():
    line = (SAMPLE_DATA_DIR / "tiny_eval.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert isinstance(json.loads(line)["rerank_scores"][0], float)
