"""The retrieval corpus: KILT Wikipedia cut into 100-word passages as BERGEN's KILT-100w, or the user's own.

KILT-100w, as the OSCAR paper uses it: the paragraphs of an article that are not bullet items (no
``BULLET::::``) are stripped and joined by spaces, ``Section::::`` markers become ``Section:``, the words are cut
into runs of 100, and each run is prefixed with the article title and ". ". The KILT Wikipedia dump (2019-08-01,
5.9M articles) gives about 24M such passages.

Sources, all read as streams (a corpus is read once, in order, and never held in memory):
- ``kilt``: `facebook/kilt_wikipedia` through `datasets`. That Hub repo is reported to hold only a loading
  script, which datasets>=4 refuses to run; the loader then says so and streams the KILT knowledge source dump
  (kilt_knowledgesource.json, 34.8 GiB, one article a line) with ``load_dataset("json", ..., streaming=True)``.
  A local copy of that dump can be given as the corpus path instead; its rows are recognised as KILT articles.
- a local ``.jsonl``/``.json``/``.parquet`` file (or a folder of them): one document a row, text in ``text`` and an
  optional title in ``title`` (field names configurable); ``.txt``: one document a non-empty line.
- any other value: a Hub dataset id with the same fields.
- ``sample``: the small corpus bundled with the package (scaledown/sample_data/mini_corpus.jsonl).

Passages are written as numbered shards (`datasets` Arrow folders, memory-mapped when read back); a passage's id
is its row number across the shards in order, which the index and the reranker use to look its text up.
"""

import itertools
import logging
import os
from collections.abc import Iterable, Iterator

from .shards import ShardedStep, batched

logger = logging.getLogger(__name__)

KILT_HUB_ID = "facebook/kilt_wikipedia"
KILT_DUMP_URL = "http://dl.fbaipublicfiles.com/KILT/kilt_knowledgesource.json"
KILT_ALIASES = ("kilt", KILT_HUB_ID)
SAMPLE_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data")
SAMPLE_CORPUS = os.path.join(SAMPLE_DATA_DIR, "mini_corpus.jsonl")
WORDS_PER_PASSAGE = 100
BULLET_MARKER = "BULLET::::"

# File extension -> the `datasets` builder that reads it; compressed variants are read transparently by datasets.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


# ---- chunking --------------------------------------------------------------------------------------------------
def split_into_passages(title: str | None, text: str, words_per_passage: int = WORDS_PER_PASSAGE) -> list[str]:
    """Cut `text` into runs of `words_per_passage` words, each prefixed with "title. " when there is a title.

    words_per_passage <= 0 keeps the text whole (a corpus already cut into passages).
    """
    words = text.split()
    if words_per_passage > 0:
        runs = [" ".join(words[start : start + words_per_passage]) for start in range(0, len(words), words_per_passage)]
    else:
        runs = [" ".join(words)] if words else []
    prefix = f"{title}. " if title else ""
    return [prefix + run for run in runs]


def kilt_article_text(paragraphs: list[str]) -> str:
    """One KILT article as plain text, as KILT-100w reads it: no bullet items, short section markers."""
    kept = [paragraph.strip() for paragraph in paragraphs if BULLET_MARKER not in paragraph]
    return " ".join(kept).replace("Section::::", "Section:")


def kilt_paragraphs(row: dict) -> list[str] | None:
    """The paragraphs of a KILT article row, or None when the row is not one.

    The Hub dataset stores them as {"paragraph": [...]}; the JSON dump as a plain list.
    """
    if "wikipedia_title" not in row:
        return None
    text = row.get("text")
    if isinstance(text, dict):
        text = text.get("paragraph")
    return list(text) if isinstance(text, list) else None


# ---- sources ---------------------------------------------------------------------------------------------------
def file_builder(path: str) -> str | None:
    """The `datasets` builder for a path's extension ("json", "parquet", "text"), or None for an unknown one."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return FILE_BUILDERS.get(os.path.splitext(name)[1])


def local_data_files(source: str, what: str) -> tuple[str, list[str]] | None:
    """(builder, files) when `source` names a local file or folder; None for a Hub id.

    A value with a data-file extension that does not exist is a missing file, never a Hub id.
    """
    if os.path.isdir(source):
        for extension, builder in FILE_BUILDERS.items():
            files = sorted(
                os.path.join(source, name)
                for name in os.listdir(source)
                if file_builder(name) and name.endswith(extension)
            )
            if files:
                return builder, files
        raise FileNotFoundError(
            f"The {what} folder {source} holds no {'/'.join(FILE_BUILDERS)} file: point to a data file or a folder "
            "of them."
        )
    builder = file_builder(source)
    if os.path.isfile(source):
        if builder is None:
            raise ValueError(
                f"Cannot read the {what} file {source}: use one of {', '.join(FILE_BUILDERS)} (optionally compressed)."
            )
        if os.path.getsize(source) == 0:  # datasets cannot even infer a schema from it
            raise ValueError(f"The {what} file {source} is empty: it holds no row to read.")
        return builder, [source]
    if builder is not None:
        raise FileNotFoundError(
            f"The {what} file {source} does not exist: check the path (relative paths start from "
            f"{os.getcwd()}), or pass a Hub dataset id."
        )
    return None


def _is_script_only_error(error: Exception) -> bool:
    return "scripts are no longer supported" in str(error)


def load_kilt_articles():
    """Stream KILT Wikipedia articles: the Hub dataset where `datasets` can load it, else the KILT dump."""
    from datasets import load_dataset

    try:
        return load_dataset(KILT_HUB_ID, split="full", streaming=True)
    except RuntimeError as error:
        if not _is_script_only_error(error):
            raise
    logger.warning(
        "%s holds only a loading script, which datasets>=4 no longer runs. Streaming the KILT knowledge source dump "
        "instead: %s (34.8 GiB, read once, in order). To read a local copy, pass --corpus /path/to/"
        "kilt_knowledgesource.json.",
        KILT_HUB_ID,
        KILT_DUMP_URL,
    )
    articles = load_dataset("json", data_files=KILT_DUMP_URL, split="train", streaming=True)
    # The dump's other fields (anchors, history, categories) are large and unused.
    return articles.select_columns(["wikipedia_id", "wikipedia_title", "text"])


def load_corpus_rows(source: str, split: str = "train") -> Iterable[dict]:
    """The raw rows of a corpus source (see the module docstring), as a stream."""
    from datasets import load_dataset

    if source == "sample":
        source = SAMPLE_CORPUS
    if source in KILT_ALIASES:
        return load_kilt_articles()
    local = local_data_files(source, "corpus")
    if local is not None:
        builder, files = local
        return load_dataset(builder, data_files=files, split="train", streaming=True)
    return load_dataset(source, split=split, streaming=True)


def iter_passages(
    rows: Iterable[dict],
    source: str,
    text_field: str = "text",
    title_field: str = "title",
    words_per_passage: int = WORDS_PER_PASSAGE,
) -> Iterator[str]:
    """Passages from corpus rows, in order. KILT article rows are recognised and cut as KILT-100w."""
    produced = False
    for row_number, row in enumerate(rows):
        paragraphs = kilt_paragraphs(row)
        if paragraphs is not None:
            # Some Wikipedia articles are only bullet lists: they yield nothing, as in KILT-100w.
            passages = split_into_passages(row["wikipedia_title"], kilt_article_text(paragraphs), words_per_passage)
        else:
            text = row.get(text_field)
            if not isinstance(text, str) or not text.strip():
                present = ", ".join(sorted(row)) or "none"
                raise ValueError(
                    f"Corpus row {row_number} of {source} has no text in field {text_field!r} (fields: {present}). "
                    "Every row needs non-empty text: fix or drop the row, or name the text field with "
                    "--corpus_text_field."
                )
            title = row.get(title_field)
            passages = split_into_passages(title.strip() if isinstance(title, str) else None, text, words_per_passage)
        produced = produced or bool(passages)
        yield from passages
    if not produced:
        raise ValueError(
            f"The corpus {source} is empty: it yielded no passage to retrieve from. Check the file, or the "
            "--corpus_text_field that holds the text."
        )


def corpus_passages(
    source: str,
    text_field: str = "text",
    title_field: str = "title",
    words_per_passage: int = WORDS_PER_PASSAGE,
    split: str = "train",
) -> Iterator[str]:
    return iter_passages(load_corpus_rows(source, split), source, text_field, title_field, words_per_passage)


# ---- passage shards --------------------------------------------------------------------------------------------
def write_passage_shards(
    step: ShardedStep, passages: Iterable[str], shard_size: int, max_passages: int | None = None, progress=None
) -> dict:
    """Write passages as shards of `shard_size`, resuming after the shards a killed run finished.

    The corpus stream is deterministic, so a resumed run skips exactly the passages already written.
    """
    from datasets import Dataset

    if step.is_done():
        return step.summary()
    written = step.count_leading_shards()
    stream = itertools.islice(passages, max_passages)
    stream = itertools.islice(stream, written * shard_size, None)
    if progress is not None:
        progress.update(written * shard_size)
    for index, texts in enumerate(batched(stream, shard_size), start=written):
        first_id = index * shard_size
        shard = Dataset.from_dict({"id": list(range(first_id, first_id + len(texts))), "text": texts})
        step.write_shard(index, shard.save_to_disk)
        if progress is not None:
            progress.update(len(texts))
    shard_sizes = [len(load_passage_shard(step.shard_path(i))) for i in range(step.count_leading_shards())]
    if not shard_sizes:
        raise ValueError("The corpus yielded no passage: nothing to index.")
    summary = {"num_passages": sum(shard_sizes), "shard_sizes": shard_sizes}
    step.mark_done(summary)
    return summary


def load_passage_shard(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)


class PassageStore:
    """Passage texts by id, over all passage shards (memory-mapped Arrow: the corpus is never loaded whole)."""

    def __init__(self, step: ShardedStep):
        from datasets import concatenate_datasets

        summary = step.require_done("retrieve")
        shards = [load_passage_shard(step.shard_path(i)) for i in range(len(summary["shard_sizes"]))]
        self.passages = concatenate_datasets(shards) if len(shards) > 1 else shards[0]

    def __len__(self) -> int:
        return len(self.passages)

    def texts(self, passage_ids: list[int]) -> list[str]:
        return self.passages[list(passage_ids)]["text"] if passage_ids else []
