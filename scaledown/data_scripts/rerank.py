"""Reranking: naver/trecdl22-crossencoder-debertav3 through sentence-transformers' CrossEncoder.

The scores kept are the cross-encoder's raw logits, as BERGEN's reranker and the OSCAR rerank targets use them.
CrossEncoder applies a Sigmoid by default to one-label models, which would squash the targets the compressor's
rerank head regresses onto; an Identity activation keeps the logits.
"""

import numpy as np

DEFAULT_RERANKER = "naver/trecdl22-crossencoder-debertav3"
RERANKER_MAX_LENGTH = 256  # BERGEN's max_len for this reranker
DOCUMENTS_KEPT = 5  # OSCAR trains on the top 5


def load_cross_encoder(name_or_path: str, device: str | None = None, max_length: int = RERANKER_MAX_LENGTH, dtype=None):
    import torch
    from sentence_transformers import CrossEncoder

    model_kwargs = {"dtype": dtype} if dtype is not None else None
    return CrossEncoder(
        name_or_path,
        device=device,
        max_length=max_length,
        activation_fn=torch.nn.Identity(),
        model_kwargs=model_kwargs,
    )


def rerank(rows: list[dict], passages, cross_encoder, keep: int = DOCUMENTS_KEPT, batch_size: int = 64) -> list[dict]:
    """Score every retrieved (question, passage) pair and keep each question's `keep` best passages, best first.

    rows: {question, passage_ids} (retrieval order). passages: a PassageStore. Returns rows
    {question, documents, rerank_scores, passage_ids}; equal scores keep the retrieval order.
    """
    texts = passages.texts([passage_id for row in rows for passage_id in row["passage_ids"]])
    pairs, start = [], 0
    for row in rows:
        pairs.extend((row["question"], text) for text in texts[start : start + len(row["passage_ids"])])
        start += len(row["passage_ids"])
    scores = (
        np.asarray(cross_encoder.predict(pairs, batch_size=batch_size, show_progress_bar=False), dtype=np.float32)
        if pairs
        else np.zeros(0, dtype=np.float32)
    )
    reranked, start = [], 0
    for row in rows:
        count = len(row["passage_ids"])
        row_scores, row_texts = scores[start : start + count], texts[start : start + count]
        best = np.argsort(-row_scores, kind="stable")[:keep]
        reranked.append(
            {
                "question": row["question"],
                "documents": [row_texts[i] for i in best],
                "rerank_scores": [float(row_scores[i]) for i in best],
                "passage_ids": [row["passage_ids"][i] for i in best],
            }
        )
        start += count
    return reranked
