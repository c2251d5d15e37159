"""Question-answering and reranking metrics, as BERGEN computes them for OSCAR.

Answers are compared after SQuAD-style normalisation (lower case, no punctuation, no articles, single spaces), and
every score takes the best match over the gold answers, since a question can have several correct phrasings.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

# An LLM judge (or any other grader): (question, prediction, gold answers) -> a score in [0, 1].
# OSCAR's judge is SOLAR-10.7B with the rubric 1 correct / 0.5 partially correct / 0 wrong; any callable fits here.
JudgeFn = Callable[[str, str, Sequence[str]], float]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(character for character in text if character not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_gold_list(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("Every example needs at least one gold answer to be scored.")
    return golds


def match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if some normalised gold answer is a substring of the normalised prediction (OSCAR's "accuracy")."""
    predicted = normalize_answer(prediction)
    for gold in _as_gold_list(golds):
        normalised_gold = normalize_answer(gold)
        # An answer made only of punctuation or articles normalises to "" and would match everything.
        if normalised_gold and normalised_gold in predicted:
            return 1.0
    return 0.0


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in _as_gold_list(golds)))


def _f1_against(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)  # both empty is a perfect match, one empty scores 0
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Harmonic mean of token precision and recall (bag of normalised words), best over the gold answers."""
    prediction_tokens = normalize_answer(prediction).split()
    return max(_f1_against(prediction_tokens, normalize_answer(gold).split()) for gold in _as_gold_list(golds))


def ndcg_at_k(scores: Sequence[float], relevances: Sequence[float], k: int = 10) -> float:
    """nDCG@k of the ranking that sorts documents by `scores` (highest first), with linear gains.

    Linear gains (relevance / log2(rank + 1)) are trec_eval's, which BEIR reports. Ties keep the input order.
    Returns 0.0 when no document is relevant; callers averaging over questions should skip those, as trec_eval does.
    """
    if len(scores) != len(relevances):
        raise ValueError(
            f"Got {len(scores)} scores for {len(relevances)} relevance labels: pass one of each per document."
        )
    if any(relevance < 0 for relevance in relevances):
        raise ValueError("Relevance labels must be non-negative gains.")
    order = sorted(range(len(scores)), key=lambda index: -float(scores[index]))
    gained = sum(float(relevances[index]) / math.log2(rank + 2) for rank, index in enumerate(order[:k]))
    ideal = sum(
        float(relevance) / math.log2(rank + 2) for rank, relevance in enumerate(sorted(relevances, reverse=True)[:k])
    )
    return gained / ideal if ideal > 0 else 0.0


def score_answers(
    questions: Sequence[str],
    predictions: Sequence[str],
    golds: Sequence[Sequence[str]],
    judge: JudgeFn | None = None,
) -> list[dict[str, float]]:
    """Per-example scores: match, exact_match, f1, and llm_judge when a judge is given."""
    if not len(questions) == len(predictions) == len(golds):
        raise ValueError(
            f"Got {len(questions)} questions, {len(predictions)} predictions and {len(golds)} gold lists: "
            "pass one of each per example."
        )
    per_example = []
    for question, prediction, gold in zip(questions, predictions, golds):
        scores = {
            "match": match(prediction, gold),
            "exact_match": exact_match(prediction, gold),
            "f1": token_f1(prediction, gold),
        }
        if judge is not None:
            scores["llm_judge"] = float(judge(question, prediction, _as_gold_list(gold)))
        per_example.append(scores)
    return per_example


def aggregate(per_example: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over the examples (metrics missing from an example are averaged over the others)."""
    totals: dict[str, list[float]] = {}
    for scores in per_example:
        for name, value in scores.items():
            totals.setdefault(name, []).append(float(value))
    return {name: sum(values) / len(values) for name, values in totals.items()}


__all__ = [
    "JudgeFn",
    "aggregate",
    "exact_match",
    "match",
    "ndcg_at_k",
    "normalize_answer",
    "score_answers",
    "token_f1",
]
