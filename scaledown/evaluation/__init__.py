"""Evaluation and cost benchmarks of ScaleDown.

- `metrics`: Match, exact match, token F1 (BERGEN/SQuAD normalisation), nDCG@k, the LLM-judge hook.
- `evaluate`: `scaledown-evaluate` and `evaluate(model, examples, ...)`, ScaleDown against the uncompressed base
  generator and a closed-book baseline on the same questions, documents and prompt.
- `flops`: analytic FLOPs, bytes moved and roofline times of compressed and uncompressed RAG.
- `bench`: `scaledown-bench`, wall clock and memory of both sides under the OSCAR protocol.

The submodules are not imported here, so that `scaledown.evaluation.evaluate` stays the module (not the function).
"""

from . import metrics
from .metrics import JudgeFn, aggregate, exact_match, match, ndcg_at_k, normalize_answer, score_answers, token_f1

__all__ = list(metrics.__all__)
