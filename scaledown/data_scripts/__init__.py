"""Data preparation for ScaleDown (OSCAR, arXiv 2504.07109 section 4.1): questions + corpus -> training data.

Pipeline, run by ``scaledown-prepare-data`` (see `prepare`):

- `corpus`: KILT Wikipedia cut into 100-word passages prefixed with their title (BERGEN's KILT-100w), or the
  user's own corpus;
- `queries`: MS MARCO, any QA dataset's questions, or a local file;
- `retrieval`: SPLADE-v3 (sentence-transformers SparseEncoder) and a sharded sparse inverted index, top 50;
- `rerank`: the DeBERTa-v3 cross-encoder, top 5 with their raw scores (the rerank teacher signal);
- `teacher`: answers from the uncompressed top 5, with the prompt the compressed model is trained on;
- `shards`: the numbered, atomically published shards that make every step resumable.

The output, one JSON object a line: ``{"question", "documents", "answer", "rerank_scores"}``.
"""
