"""The questions to answer: MS MARCO, the questions of any QA dataset on the Hub, or a local file.

- ``msmarco``: the queries of `microsoft/ms_marco` (config ``v2.1``, about 808k in its train split; the OSCAR
  paper used 500k of them).
- a Hub dataset id with ``--queries_config``/``--queries_split``: its question field (``question`` or ``query``
  unless ``--question_field`` names another).
- a local ``.jsonl``/``.json``/``.parquet`` file (same fields) or a ``.txt`` file with one question a line.
- ``sample``: the questions bundled with the package (scaledown/sample_data/mini_queries.jsonl).

Questions are read in their stored order, so ``--limit N`` always takes the same N and a resumed run sees the
same list.
"""

import itertools
import os

from .corpus import SAMPLE_DATA_DIR, local_data_files

MSMARCO_HUB_ID = "microsoft/ms_marco"
MSMARCO_CONFIG = "v2.1"
SAMPLE_QUERIES = os.path.join(SAMPLE_DATA_DIR, "mini_queries.jsonl")
QUESTION_FIELDS = ("question", "query", "text")


def load_query_rows(source: str, config: str | None = None, split: str = "train"):
    from datasets import load_dataset

    if source == "sample":
        source = SAMPLE_QUERIES
    if source == "msmarco":
        # Its rows also hold the candidate passages; only the query is needed.
        rows = load_dataset(MSMARCO_HUB_ID, config or MSMARCO_CONFIG, split=split, streaming=True)
        return rows.select_columns(["query"])
    local = local_data_files(source, "query")
    if local is not None:
        builder, files = local
        return load_dataset(builder, data_files=files, split="train", streaming=True)
    return load_dataset(source, config, split=split, streaming=True)


def load_questions(
    source: str,
    limit: int | None = None,
    question_field: str | None = None,
    config: str | None = None,
    split: str = "train",
) -> list[str]:
    """The first `limit` questions of a source (all of them when limit is None), as stripped strings."""
    rows = load_query_rows(source, config, split)
    questions = []
    for row_number, row in enumerate(itertools.islice(rows, limit)):
        field = question_field or next((name for name in QUESTION_FIELDS if name in row), None)
        question = row.get(field) if field else None
        if not isinstance(question, str) or not question.strip():
            raise ValueError(
                f"Query row {row_number} of {source} has no question text "
                f"({'field ' + repr(field) if field else 'none of the fields ' + ', '.join(QUESTION_FIELDS)}; "
                f"fields: {', '.join(sorted(row)) or 'none'}). Fix the row, or name the field with --question_field."
            )
        questions.append(question.strip())
    if not questions:
        raise ValueError(f"The query source {source} holds no question.")
    return questions
