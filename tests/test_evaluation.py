import json
import math
import os

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from scaledown.evaluation import evaluate as evaluation
from scaledown.evaluation.metrics import (
    aggregate,
    exact_match,
    match,
    ndcg_at_k,
    normalize_answer,
    score_answers,
    token_f1,
)

MINI_EVAL = os.path.join(os.path.dirname(evaluation.__file__), "..", "sample_data", "mini_eval.jsonl")


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The Cat, a dog &  AN apple.") == "cat dog apple"
    assert normalize_answer("  Théâtre   (the) Globe!! ") == "théâtre globe"
    # Articles only as whole words: "another" and "theme" keep their letters.
    assert normalize_answer("another theme") == "another theme"


def test_match_is_gold_inside_prediction_over_all_golds():
    assert match("It was written by William Shakespeare.", ["Christopher Marlowe", "Shakespeare"]) == 1.0
    assert match("Paris", ["the city of Paris"]) == 0.0  # the gold must sit in the prediction, not the reverse
    assert match("An apple a day", "the apple") == 1.0  # a single gold string is accepted
    assert match("anything at all", ["The", "..."]) == 0.0  # golds that normalise to nothing never match
    with pytest.raises(ValueError):
        match("x", [])


def test_exact_match_after_normalisation():
    assert exact_match("An apple!", ["the apple"]) == 1.0
    assert exact_match("apple pie", ["apple"]) == 0.0
    assert exact_match("1969", ["July 1969", "1969"]) == 1.0


def test_token_f1_by_hand():
    # prediction {quick, brown, fox} ("the" dropped) against gold {quick, fox, jumps}: overlap 2, P = R = 2/3.
    assert token_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    # Against "brown" alone: P = 1/3, R = 1, F1 = 0.5; the best gold wins.
    assert token_f1("the quick brown fox", ["brown"]) == pytest.approx(0.5)
    assert token_f1("the quick brown fox", ["brown", "quick fox jumps"]) == pytest.approx(2 / 3)
    assert token_f1("nothing shared", ["other words"]) == 0.0
    # Repeated words count as many times as they appear in both.
    assert token_f1("new new york", ["new york"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_ndcg_by_hand():
    scores, relevances = [0.1, 0.9, 0.5], [1, 0, 2]
    # Ranking by score: doc1 (gain 0), doc2 (gain 2), doc0 (gain 1); linear gains over log2(rank + 1).
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 0 / math.log2(4)
    assert ndcg_at_k(scores, relevances) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(scores, relevances, k=1) == 0.0
    assert ndcg_at_k(scores, relevances, k=2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k([3, 2, 1], [2, 1, 0]) == pytest.approx(1.0)
    assert ndcg_at_k([3, 2, 1], [0, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        ndcg_at_k([1, 2], [1])


def test_scores_with_a_judge_and_their_means():
    calls = []

    def judge(question, prediction, golds):
        calls.append((question, prediction, list(golds)))
        return 0.5

    per_example = score_answers(["q1", "q2"], ["Paris", "Rome"], [["paris"], "Berlin"], judge=judge)
    assert per_example[0] == {"match": 1.0, "exact_match": 1.0, "f1": 1.0, "llm_judge": 0.5}
    assert calls[1] == ("q2", "Rome", ["Berlin"])
    assert aggregate(per_example) == {"match": 0.5, "exact_match": 0.5, "f1": 0.5, "llm_judge": 0.5}


# ---- data ------------------------------------------------------------------------------------------------------
def test_bundled_mini_set_loads():
    examples = evaluation.load_examples(MINI_EVAL, num_documents=2)
    assert 10 <= len(examples) <= 20
    assert all(e.answers and 1 <= len(e.documents) <= 2 and len(e.relevance) == len(e.documents) for e in examples)
    assert len(evaluation.load_examples(MINI_EVAL, limit=3)) == 3


def test_jsonl_rows_are_checked(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "Who?", "documents": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        evaluation.load_jsonl(str(path))
    row = {
        "question": "Q",
        "documents": [{"title": "T", "text": "body"}, "plain"],
        "answer": "A",
        "rerank_scores": [2.0, -2.0],
    }
    example = evaluation.example_from_row(row)
    assert example.documents == ["T: body", "plain"] and example.answers == ["A"]
    assert example.relevance == pytest.approx([1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))])  # logits -> gains


def test_hub_dataset_offline_error_points_to_jsonl(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(evaluation, "_hub_rows", offline)
    for name in evaluation.HUB_DATASETS:
        with pytest.raises(evaluation.DatasetUnavailableError, match="local JSONL"):
            evaluation.load_examples(name)
    with pytest.raises(ValueError, match="Unknown dataset"):
        evaluation.load_examples("not-a-dataset")


def test_hotpotqa_rows_become_documents_with_relevance(monkeypatch):
    row = {
        "question": "Which city?",
        "answer": "Paris",
        "context": {"title": ["A", "B"], "sentences": [["First.", " Second."], ["Other."]]},
        "supporting_facts": {"title": ["B"], "sent_id": [0]},
    }
    monkeypatch.setattr(evaluation, "_hub_rows", lambda *args: [row])
    (example,) = evaluation.load_examples("hotpotqa")
    assert example.documents == ["A: First. Second.", "B: Other."]
    assert example.relevance == [0.0, 1.0] and example.answers == ["Paris"]


# ---- baselines -------------------------------------------------------------------------------------------------
def test_adapters_disabled_runs_the_base_generator(make_model, generator_dirs):
    model = make_model("llama")
    with torch.no_grad():  # make LoRA change the output (it starts as the identity)
        for name, parameter in model.generator.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    base = AutoModelForCausalLM.from_pretrained(generator_dirs["llama"]).eval()
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        expected = base(ids).logits
        assert not torch.allclose(model.generator(ids).logits, expected, atol=1e-4)
        with evaluation.adapters_disabled(model.generator):
            torch.testing.assert_close(model.generator(ids).logits, expected, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model.generator(ids).logits, expected, atol=1e-4)
    layers = [m for m in model.generator.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(layer.disable_adapters for layer in layers)
    assert all(p.requires_grad for n, p in model.generator.named_parameters() if "lora_" in n)


def test_evaluate_function_with_a_judge_and_closed_book_only(make_model):
    model = make_model("llama")
    rows = [
        {"question": "Who wrote Hamlet?", "answers": ["Shakespeare"]},
        {"question": "Capital of France?", "answers": ["Paris"]},
    ]
    report = evaluation.evaluate(
        model, rows, methods=["closed_book"], max_new_tokens=3, judge=lambda q, p, g: 1.0, progress=False
    )
    assert set(report["methods"]) == {"closed_book"}
    assert report["methods"]["closed_book"]["llm_judge"] == 1.0
    assert report["rerank"] is None  # no rerank head
    with pytest.raises(ValueError, match="no.*documents|None of the examples"):
        evaluation.evaluate(model, rows, methods=["scaledown"], progress=False)
    with pytest.raises(ValueError, match="Unknown methods"):
        evaluation.evaluate(model, rows, methods=["oracle"], progress=False)


def test_evaluate_command_end_to_end(make_model, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    make_model("llama", enable_reranking=True).save_pretrained(checkpoint)
    output_dir = tmp_path / "results"
    exit_code = evaluation.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--data",
            MINI_EVAL,
            "--output_dir",
            str(output_dir),
            "--max_new_tokens",
            "4",
            "--batch_size",
            "6",
            "--no_progress",
        ]
    )
    assert exit_code == 0
    report = json.loads((output_dir / "evaluation_mini_eval.json").read_text())
    assert list(report["methods"]) == ["scaledown", "uncompressed", "closed_book"]
    for scores in report["methods"].values():
        assert {"match", "exact_match", "f1", "seconds", "ms_per_question"} <= set(scores)
        assert 0.0 <= scores["match"] <= 1.0 and scores["ms_per_question"] > 0
    assert report["num_examples"] == len(report["examples"]) == 12
    assert set(report["examples"][0]["predictions"]) == {"scaledown", "uncompressed", "closed_book"}
    assert report["rerank"]["questions"] == 12 and 0.0 < report["rerank"]["ndcg@10"] <= 1.0
    assert report["settings"]["num_documents"] == 10
    png = (output_dir / "evaluation_mini_eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
