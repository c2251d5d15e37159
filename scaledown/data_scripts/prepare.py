"""`scaledown-prepare-data`: questions + corpus -> OSCAR training data (question, documents, answer, rerank_scores).

Stages (``--stage``; ``all`` runs the three in order):
- ``retrieve``: cut the corpus into passages, build the SPLADE index, retrieve the top 50 passages per question;
- ``rerank``: score them with the cross-encoder and keep the top 5 with their raw scores;
- ``teach``: have the teacher answer each question from its top 5 documents.

Everything lands in ``--output_dir``, one folder per step, each a set of numbered shards::

    passages/  shard-NNNNN/        Arrow passage shards (id, text)
    index/     shard-NNNNN/        SPLADE posting lists of the passage shard with the same number
    retrieved/ shard-NNNNN.jsonl   {question, passage_ids, retrieval_scores}
    reranked/  shard-NNNNN.jsonl   {question, documents, rerank_scores, passage_ids}
    teacher/   shard-NNNNN.jsonl   {question, documents, answer, rerank_scores}   (the training format)
    train.jsonl                    all teacher shards in order, written once the last one exists

Resumable: a shard is written under a temporary name and renamed when complete; a restarted run skips the
shards that exist. Each step records the settings its shards depend on and refuses to resume with others.
"""

import argparse
import logging
import math
import os

from tqdm.auto import tqdm

from ..configuration_scaledown import DEFAULT_SYSTEM_PROMPT
from . import corpus, queries, rerank, retrieval, teacher
from .shards import ShardedStep, merge_jsonl_shards

logger = logging.getLogger("scaledown.prepare_data")

STAGES = ("retrieve", "rerank", "teach", "all")
TRAIN_FILE = "train.jsonl"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaledown-prepare-data",
        description="Turn questions and a corpus into ScaleDown training data: SPLADE-v3 retrieval, DeBERTa-v3 "
        "reranking and teacher answers, sharded and resumable.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--output_dir", required=True, help="where every step writes its shards")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N questions (a quick run)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: a GPU when there is one)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="model weights' dtype; auto: bfloat16 on GPU, float32 on CPU",
    )

    group = parser.add_argument_group("corpus")
    group.add_argument(
        "--corpus",
        default="kilt",
        help="'kilt' (KILT Wikipedia), a .jsonl/.json/.parquet/.txt file or folder, a Hub dataset id, or 'sample'",
    )
    group.add_argument("--corpus_split", default="train", help="split of a Hub corpus")
    group.add_argument("--corpus_text_field", default="text")
    group.add_argument("--corpus_title_field", default="title")
    group.add_argument(
        "--words_per_passage",
        type=int,
        default=corpus.WORDS_PER_PASSAGE,
        help="cut documents into passages of this many words, prefixed with the title (0: keep documents whole)",
    )
    group.add_argument("--max_passages", type=int, default=None, help="use only the first N passages")
    group.add_argument("--passage_shard_size", type=int, default=1_000_000)

    group = parser.add_argument_group("queries")
    group.add_argument(
        "--queries",
        default="msmarco",
        help="'msmarco', a Hub QA dataset id, a .jsonl/.json/.parquet/.txt file, or 'sample'",
    )
    group.add_argument("--queries_config", default=None)
    group.add_argument("--queries_split", default="train")
    group.add_argument("--question_field", default=None, help="default: 'question', else 'query', else 'text'")
    group.add_argument("--query_shard_size", type=int, default=1000, help="questions per output shard")

    group = parser.add_argument_group("retrieval (SPLADE)")
    group.add_argument("--retriever", default=retrieval.DEFAULT_RETRIEVER)
    group.add_argument("--retriever_max_length", type=int, default=retrieval.RETRIEVER_MAX_LENGTH)
    group.add_argument("--retrieve_top_k", type=int, default=50)
    group.add_argument("--max_active_dims", type=int, default=None, help="cap the non-zeros of a SPLADE vector")
    group.add_argument("--encode_batch_size", type=int, default=64)
    group.add_argument("--search_batch_size", type=int, default=64, help="questions scored together")
    group.add_argument(
        "--search_workers", type=int, default=None, help="processes searching index shards at once (default: all cores)"
    )

    group = parser.add_argument_group("reranking (cross-encoder)")
    group.add_argument("--reranker", default=rerank.DEFAULT_RERANKER)
    group.add_argument("--reranker_max_length", type=int, default=rerank.RERANKER_MAX_LENGTH)
    group.add_argument("--documents_per_question", type=int, default=rerank.DOCUMENTS_KEPT, help="top k kept")
    group.add_argument("--rerank_batch_size", type=int, default=64)

    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", default=teacher.DEFAULT_TEACHER)
    group.add_argument("--teacher_backend", choices=teacher.BACKENDS, default="auto", help="auto: vLLM when installed")
    group.add_argument("--teacher_batch_size", type=int, default=16)
    group.add_argument("--max_new_tokens", type=int, default=teacher.MAX_NEW_TOKENS)
    group.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT)
    group.add_argument(
        "--prompt_template",
        default=None,
        help="for a teacher without a chat template: a Jinja chat template (inline or a file), or 'plain'",
    )
    return parser


def resolve_dtype(name: str, device: str | None):
    import torch

    if name == "auto":
        on_gpu = device.startswith("cuda") if device else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def validate(args) -> None:
    """Fail before hours of work for what can be checked at once: numbers, missing files, the teacher's prompt."""
    for flag in ("limit", "max_passages"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}.")
    for flag in (
        "passage_shard_size",
        "query_shard_size",
        "retrieve_top_k",
        "documents_per_question",
        "max_new_tokens",
    ):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.stage in ("retrieve", "all"):
        if args.corpus not in (*corpus.KILT_ALIASES, "sample"):
            corpus.local_data_files(args.corpus, "corpus")
        if args.queries not in ("msmarco", "sample"):
            corpus.local_data_files(args.queries, "query")
    teacher_done = os.path.exists(os.path.join(args.output_dir, "teacher", "done.json"))
    if args.stage in ("teach", "all") and not teacher_done:
        teacher.check_prompt_template(args.teacher, args.prompt_template)


class Pipeline:
    """The steps of one --output_dir, each a ShardedStep whose settings are what its shards depend on."""

    def __init__(self, args):
        self.args = args
        self.dtype = resolve_dtype(args.dtype, args.device)
        out = args.output_dir
        self.passages = ShardedStep(
            os.path.join(out, "passages"),
            {
                "corpus": args.corpus,
                "corpus_split": args.corpus_split,
                "text_field": args.corpus_text_field,
                "title_field": args.corpus_title_field,
                "words_per_passage": args.words_per_passage,
                "max_passages": args.max_passages,
                "shard_size": args.passage_shard_size,
            },
            extension="",
        )
        self.index = ShardedStep(
            os.path.join(out, "index"),
            {
                "retriever": args.retriever,
                "max_length": args.retriever_max_length,
                "max_active_dims": args.max_active_dims,
                "passages": self.passages.settings,
            },
            extension="",
        )
        self.retrieved = ShardedStep(
            os.path.join(out, "retrieved"),
            {
                "queries": args.queries,
                "queries_config": args.queries_config,
                "queries_split": args.queries_split,
                "question_field": args.question_field,
                "limit": args.limit,
                "shard_size": args.query_shard_size,
                "top_k": args.retrieve_top_k,
                "index": self.index.settings,
            },
        )
        self.reranked = ShardedStep(
            os.path.join(out, "reranked"),
            {
                "reranker": args.reranker,
                "max_length": args.reranker_max_length,
                "documents_per_question": args.documents_per_question,
            },
        )
        self.answers = ShardedStep(
            os.path.join(out, "teacher"),
            {
                "teacher": args.teacher,
                "max_new_tokens": args.max_new_tokens,
                "system_prompt": args.system_prompt,
                "prompt_template": args.prompt_template,
            },
        )

    # ---- retrieve -------------------------------------------------------------------------------------------
    def retrieve(self) -> None:
        args = self.args
        self.passages.open()
        if not self.passages.is_done():
            with tqdm(desc="passages", unit="passage", total=args.max_passages) as progress:
                corpus.write_passage_shards(
                    self.passages,
                    corpus.corpus_passages(
                        args.corpus,
                        args.corpus_text_field,
                        args.corpus_title_field,
                        args.words_per_passage,
                        args.corpus_split,
                    ),
                    args.passage_shard_size,
                    args.max_passages,
                    progress,
                )
        passage_summary = self.passages.summary()
        self.index.open()
        encoder = None
        if not self.index.is_done():
            encoder = self._sparse_encoder()
            with tqdm(desc="index", unit="passage", total=passage_summary["num_passages"]) as progress:
                retrieval.build_index(
                    self.index, self.passages, encoder, args.encode_batch_size, args.max_active_dims, progress
                )
        self.retrieved.open()
        if self.retrieved.is_done():
            return
        questions = queries.load_questions(
            args.queries, args.limit, args.question_field, args.queries_config, args.queries_split
        )
        num_shards = math.ceil(len(questions) / args.query_shard_size)
        pending = [shard for shard in range(num_shards) if not self.retrieved.has_shard(shard)]
        if pending:
            encoder = encoder or self._sparse_encoder()
            with retrieval.SparseIndex(self.index, args.search_workers) as index:
                for shard in tqdm(pending, desc="retrieve", unit="shard"):
                    batch = questions[shard * args.query_shard_size : (shard + 1) * args.query_shard_size]
                    rows = retrieval.retrieve(
                        batch, encoder, index, args.retrieve_top_k, args.encode_batch_size, args.search_batch_size
                    )
                    self.retrieved.write_rows(shard, rows)
        self.retrieved.mark_done({"num_examples": len(questions), "num_shards": num_shards})

    def _sparse_encoder(self):
        return retrieval.load_sparse_encoder(
            self.args.retriever, self.args.device, self.args.retriever_max_length, self.dtype
        )

    # ---- rerank ---------------------------------------------------------------------------------------------
    def rerank(self) -> None:
        args = self.args
        summary = self.retrieved.require_done("retrieve")
        self.reranked.settings["input"] = self.retrieved.settings_on_disk()
        self.reranked.open()
        if self.reranked.is_done():
            return
        cross_encoder = passages = None
        for shard in tqdm(range(summary["num_shards"]), desc="rerank", unit="shard"):
            if self.reranked.has_shard(shard):
                continue
            if cross_encoder is None:
                cross_encoder = rerank.load_cross_encoder(
                    args.reranker, args.device, args.reranker_max_length, self.dtype
                )
                passages = corpus.PassageStore(self.passages)
            rows = rerank.rerank(
                self.retrieved.read_rows(shard),
                passages,
                cross_encoder,
                args.documents_per_question,
                args.rerank_batch_size,
            )
            self.reranked.write_rows(shard, rows)
        self.reranked.mark_done(summary)

    # ---- teach ----------------------------------------------------------------------------------------------
    def teach(self) -> str:
        args = self.args
        summary = self.reranked.require_done("rerank")
        self.answers.settings["input"] = self.reranked.settings_on_disk()
        self.answers.open()
        model = None
        if not self.answers.is_done():
            for shard in tqdm(range(summary["num_shards"]), desc="teach", unit="shard"):
                if self.answers.has_shard(shard):
                    continue
                model = model or teacher.load_teacher(
                    args.teacher,
                    args.teacher_backend,
                    args.device,
                    self.dtype,
                    args.teacher_batch_size,
                    args.max_new_tokens,
                    args.prompt_template,
                    args.system_prompt,
                )
                rows = self.reranked.read_rows(shard)
                answers = model.answer(rows)
                self.answers.write_rows(
                    shard,
                    [
                        {
                            "question": row["question"],
                            "documents": row["documents"],
                            "answer": answer,
                            "rerank_scores": row["rerank_scores"],
                        }
                        for row, answer in zip(rows, answers)
                    ],
                )
            self.answers.mark_done(summary)
        train_file = os.path.join(args.output_dir, TRAIN_FILE)
        if not os.path.exists(train_file):
            merge_jsonl_shards(self.answers, summary["num_shards"], train_file)
        return train_file


def run(args) -> str | None:
    """Run the requested stage(s); returns the training file once the teach stage has finished."""
    validate(args)
    pipeline = Pipeline(args)
    if args.stage in ("retrieve", "all"):
        pipeline.retrieve()
    if args.stage in ("rerank", "all"):
        pipeline.rerank()
    if args.stage in ("teach", "all"):
        train_file = pipeline.teach()
        logger.info("Training data: %s", train_file)
        return train_file
    return None


def main(argv: list[str] | None = None) -> None:
    import datasets

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()  # one bar per shard saved would drown the pipeline's own bars
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"scaledown-prepare-data: {error}") from error


if __name__ == "__main__":
    main()
