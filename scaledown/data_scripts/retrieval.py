"""SPLADE-v3 retrieval: sentence-transformers' SparseEncoder and a sharded sparse inverted index (scipy CSR).

Index layout. Each passage shard becomes one index shard: its SPLADE document vectors transposed into posting
lists, a CSR matrix of shape (vocabulary, passages in the shard) whose row t lists the passages that activate
term t with their weights. Scoring a batch of queries against a shard is one sparse product
``queries (n_queries x vocabulary) @ postings``, which only visits the posting lists of the terms the queries
activate: exactly what an inverted index does. Shards are stored as .npy arrays and memory-mapped, so the index
never has to fit in memory: the OS page cache keeps what RAM allows. Each shard keeps its own top-k per query;
the shard results are merged, ties broken by passage id, so results never depend on the sharding or the number
of workers.

Full KILT-100w (about 24M passages of 100 words, the OSCAR corpus) with naver/splade-v3:
- Non-zeros. SPLADE-v3 gives about 170 non-zero terms per MS MARCO passage (~56 words) and about 25 per query
  (figures published with an MS MARCO collection encoded by splade-v3); 100-word passages cut at 128 tokens give
  more: count about 250. ``--max_active_dims`` caps them.
- Disk and memory. A non-zero costs 8 bytes (float32 weight + int32 passage id): 24M x 250 x 8 B = about 48 GB of
  index, in 24 shards of 1M passages (2 GB each). Building holds one shard in memory (about 3x its size while it
  is transposed: 6 GB). Searching memory-maps the shards: with 48 GB of free RAM they stay in the page cache,
  with less they are re-read from disk for each batch of questions. The passage texts add about 16 GB of Arrow
  files, memory-mapped too.
- Encoding time (an estimate, not measured here): SPLADE-v3 is BERT-base plus its MLM head over 30,522 terms,
  about 2 x 110M x 128 + 2 x 128 x 768 x 30,522 = 34 GFLOP per 128-token passage, so 24M passages are 0.8 EFLOP:
  about 40 minutes of one H100 at 35% of its bf16 peak, a few hours with tokenisation and top-k kept on the host.
  Each passage shard is its own resumable unit. On CPU it would take weeks.
- Search time (an estimate): a query activates about 25 terms whose posting lists hold, under a Zipf term
  distribution, a few percent of a shard's non-zeros; scoring is a sparse product over those lists, so about
  0.1-1 core-second per question over 24M passages, and 900k questions take tens to a few hundred core-hours,
  which ``--search_workers`` spreads over processes. The reranker (900k x 50 pairs) and the teacher (900k answers)
  then dominate.
"""

import functools
import json
import logging
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .shards import ShardedStep, batched

logger = logging.getLogger(__name__)

DEFAULT_RETRIEVER = "naver/splade-v3"
RETRIEVER_MAX_LENGTH = 128  # BERGEN's SPLADE max_len, the OSCAR data setup
ENCODE_CHUNK = 4096  # passages encoded between two progress updates (and two conversions to scipy)
POSTINGS_FILES = ("data", "indices", "indptr")


def load_sparse_encoder(
    name_or_path: str, device: str | None = None, max_length: int = RETRIEVER_MAX_LENGTH, dtype=None
):
    """A SPLADE model as a sentence-transformers SparseEncoder (a Hub id or a local SparseEncoder folder)."""
    from sentence_transformers import SparseEncoder

    model_kwargs = {"dtype": dtype} if dtype is not None else None
    encoder = SparseEncoder(name_or_path, device=device, model_kwargs=model_kwargs)
    encoder.max_seq_length = max_length
    return encoder


def sparse_tensor_to_csr(embeddings):
    """A torch sparse (COO) batch of SPLADE vectors as a scipy CSR matrix of float32 weights."""
    import scipy.sparse

    embeddings = embeddings.coalesce().cpu()
    rows, columns = embeddings.indices().numpy()
    weights = embeddings.values().float().numpy()
    return scipy.sparse.csr_matrix((weights, (rows, columns)), shape=tuple(embeddings.shape), dtype=np.float32)


def encode(encoder, texts: list[str], kind: str, batch_size: int, max_active_dims: int | None = None, progress=None):
    """SPLADE vectors of `texts` (kind "query" or "document") as one CSR matrix (len(texts) x vocabulary)."""
    import scipy.sparse

    encode_fn = encoder.encode_query if kind == "query" else encoder.encode_document
    parts = []
    for chunk in batched(texts, ENCODE_CHUNK):
        embeddings = encode_fn(
            chunk,
            batch_size=batch_size,
            convert_to_sparse_tensor=True,
            max_active_dims=max_active_dims,
            show_progress_bar=False,
        )
        parts.append(sparse_tensor_to_csr(embeddings))
        if progress is not None:
            progress.update(len(chunk))
    return scipy.sparse.vstack(parts, format="csr", dtype=np.float32)


# ---- index shards ----------------------------------------------------------------------------------------------
def save_postings(document_vectors, directory: str) -> None:
    """Store a shard's document vectors (passages x vocabulary) as posting lists (vocabulary x passages)."""
    postings = document_vectors.T.tocsr()
    postings.sort_indices()
    # int32 offsets while they fit, so that scipy multiplies the memory-mapped arrays without copying them.
    index_dtype = np.int32 if postings.nnz < np.iinfo(np.int32).max else np.int64
    os.makedirs(directory)
    np.save(os.path.join(directory, "data.npy"), postings.data.astype(np.float32))
    np.save(os.path.join(directory, "indices.npy"), postings.indices.astype(index_dtype))
    np.save(os.path.join(directory, "indptr.npy"), postings.indptr.astype(index_dtype))
    with open(os.path.join(directory, "shape.json"), "w", encoding="utf-8") as handle:
        json.dump(list(postings.shape), handle)


def load_postings(directory: str):
    """A shard's posting lists, memory-mapped (nothing is read until a query touches it)."""
    import scipy.sparse

    arrays = [np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in POSTINGS_FILES]
    with open(os.path.join(directory, "shape.json"), encoding="utf-8") as handle:
        shape = tuple(json.load(handle))
    return scipy.sparse.csr_matrix(tuple(arrays), shape=shape, copy=False)


def build_index(
    index_step: ShardedStep,
    passage_step: ShardedStep,
    encoder,
    batch_size: int,
    max_active_dims: int | None = None,
    progress=None,
) -> dict:
    """Encode every passage shard that has no index shard yet (resumable shard by shard)."""
    from .corpus import load_passage_shard

    passages = passage_step.require_done("retrieve")
    if index_step.is_done():
        return index_step.summary()
    for index, size in enumerate(passages["shard_sizes"]):
        if index_step.has_shard(index):
            if progress is not None:
                progress.update(size)
            continue
        texts = list(load_passage_shard(passage_step.shard_path(index))["text"])
        vectors = encode(encoder, texts, "document", batch_size, max_active_dims, progress)
        index_step.write_shard(index, functools.partial(save_postings, vectors))
    first_ids = np.concatenate([[0], np.cumsum(passages["shard_sizes"])[:-1]]).tolist()
    summary = {"num_passages": passages["num_passages"], "first_ids": first_ids}
    index_step.mark_done(summary)
    return summary


# ---- search ----------------------------------------------------------------------------------------------------
def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (id, score) pairs, best first; equal scores are ordered by id so results are reproducible."""
    if len(scores) > k:
        kth_best = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= kth_best
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return ids[order], scores[order]


@functools.lru_cache(maxsize=None)
def _postings(directory: str):
    return load_postings(directory)  # memory-mapped once per process


def search_shard(directory: str, first_id: int, queries, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query row's k best (passage id, score) pairs within one index shard."""
    scores = (queries @ _postings(directory)).tocsr()  # (queries x passages of the shard)
    results = []
    for row in range(scores.shape[0]):
        start, end = scores.indptr[row], scores.indptr[row + 1]
        row_ids = scores.indices[start:end].astype(np.int64) + first_id
        results.append(top_k(row_ids, scores.data[start:end], k))
    return results


def _end_with_parent(parent_pid: int) -> None:
    """Worker initializer: a worker must not outlive a killed run, where it would wait for work forever."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # from <sys/prctl.h>: the signal this process gets when its parent dies
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


class SparseIndex:
    """Search over all index shards of a finished index step.

    scipy's sparse product holds the GIL, so `workers` > 1 searches several shards at once in worker processes
    (forked: they share the memory-mapped shards through the page cache). Use it as a context manager, or
    call close(), to end the workers.
    """

    def __init__(self, index_step: ShardedStep, workers: int | None = 1):
        summary = index_step.require_done("retrieve")
        self.first_ids = summary["first_ids"]
        self.directories = [index_step.shard_path(i) for i in range(len(self.first_ids))]
        workers = min(workers or os.cpu_count() or 1, len(self.directories))
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_end_with_parent,
                initargs=(os.getpid(),),
            )

    def search(self, queries, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(passage ids, scores) of the k best passages of each query row, best first.

        Passages that share no term with a query score zero and are never returned, so a query can get fewer.
        """
        tasks = [(directory, first_id, queries, k) for directory, first_id in zip(self.directories, self.first_ids)]
        if self.pool is None:
            per_shard = [search_shard(*task) for task in tasks]
        else:
            per_shard = list(self.pool.map(search_shard, *zip(*tasks)))
        merged = []
        for row in range(queries.shape[0]):
            ids = np.concatenate([results[row][0] for results in per_shard])
            scores = np.concatenate([results[row][1] for results in per_shard])
            merged.append(top_k(ids, scores, k))  # ties by id: the same result whatever the sharding
        return merged

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def retrieve(
    questions: list[str],
    encoder,
    index: SparseIndex,
    top_k_passages: int,
    batch_size: int,
    search_batch_size: int = 64,
) -> list[dict]:
    """Rows {question, passage_ids, retrieval_scores} for a list of questions."""
    rows = []
    for batch in batched(questions, search_batch_size):
        queries = encode(encoder, batch, "query", batch_size)
        for question, (ids, scores) in zip(batch, index.search(queries, top_k_passages)):
            rows.append(
                {"question": question, "passage_ids": ids.tolist(), "retrieval_scores": scores.astype(float).tolist()}
            )
    return rows
