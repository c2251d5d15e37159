"""`scaledown-evaluate`: a ScaleDown checkpoint against its uncompressed base generator and a closed-book baseline.

All three methods answer the same questions with the same prompt (`text_prompt`, the one the compressed model is
trained with); only what stands in the Background block differs: compressed vectors, the document text, or nothing.

    scaledown-evaluate --checkpoint my-scaledown --data hotpotqa --limit 500 --output_dir results/
    scaledown-evaluate --checkpoint my-scaledown --data my_eval.jsonl
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..modeling_scaledown import ScaleDownForCausalLM, text_prompt
from .metrics import JudgeFn, aggregate, ndcg_at_k, score_answers

METHODS = ("scaledown", "uncompressed", "closed_book")
METHOD_DESCRIPTIONS = {
    "scaledown": "generator + LoRA reading the compressed documents",
    "uncompressed": "base generator (LoRA off) reading the document text",
    "closed_book": "base generator (LoRA off) with no documents",
}
NDCG_K = 10


# ---- data ------------------------------------------------------------------------------------------------------
@dataclass
class RagExample:
    question: str
    documents: list[str]
    answers: list[str]
    relevance: list[float] | None = None  # one gain per document, for nDCG of the rerank head

    def first_documents(self, k: int) -> "RagExample":
        relevance = self.relevance[:k] if self.relevance is not None else None
        return RagExample(self.question, self.documents[:k], self.answers, relevance)


class DatasetUnavailableError(RuntimeError):
    """A named dataset could not be loaded (typically: no network access to the Hugging Face Hub)."""


def _document_text(document) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and "text" in document:
        title = document.get("title")
        return f"{title}: {document['text']}" if title else document["text"]
    raise ValueError(f"A document must be a string or an object with a 'text' field, got {document!r}.")


def _gains_from_teacher_scores(scores: Sequence[float]) -> list[float]:
    """Teacher rerank scores as nDCG gains: probabilities are kept, logits go through a sigmoid (gains must be >= 0)."""
    scores = [float(score) for score in scores]
    if all(0.0 <= score <= 1.0 for score in scores):
        return scores
    return [1.0 / (1.0 + math.exp(-score)) for score in scores]


def example_from_row(row: dict, where: str = "row") -> RagExample:
    """A RagExample from a JSON object: question, documents (strings or {title, text}), answers (list or string).

    Optional relevance labels for nDCG: `relevant` or `relevance` (0/1 or graded, per document), else
    `rerank_scores` (teacher scores).
    """
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ValueError(f"{where} has no 'question' string.")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"{where} needs 'answers': a list of gold answer strings (or an 'answer' string).")
    documents = row.get("documents", [])
    if not isinstance(documents, list):
        raise ValueError(f"{where}: 'documents' must be a list of strings.")
    documents = [_document_text(document) for document in documents]
    relevance = None
    labels = row.get("relevant", row.get("relevance"))
    if labels is not None:
        relevance = [float(value) for value in labels]
    elif row.get("rerank_scores") is not None:
        relevance = _gains_from_teacher_scores(row["rerank_scores"])
    if relevance is not None and len(relevance) != len(documents):
        raise ValueError(f"{where} has {len(relevance)} relevance labels for {len(documents)} documents.")
    return RagExample(row["question"], documents, list(answers), relevance)


def load_jsonl(path: str) -> list[RagExample]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No evaluation file at {path}.")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(example_from_row(json.loads(line), where=f"{path} line {line_number}"))
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return examples


def _hub_rows(hub_id: str, config: str | None, split: str):
    import datasets

    return datasets.load_dataset(hub_id, config, split=split)


def _nq_open(split: str) -> list[RagExample]:
    return [
        RagExample(row["question"], [], list(row["answer"]))
        for row in _hub_rows(HUB_DATASETS["nq"].hub_id, None, split)
    ]


def _trivia_qa(split: str) -> list[RagExample]:
    rows = _hub_rows(HUB_DATASETS["triviaqa"].hub_id, "rc.nocontext", split)
    return [RagExample(row["question"], [], [row["answer"]["value"], *row["answer"]["aliases"]]) for row in rows]


def _hotpot_qa(split: str) -> list[RagExample]:
    """The distractor setting: 10 paragraphs per question, the 2 that hold the supporting facts count as relevant."""
    examples = []
    for row in _hub_rows(HUB_DATASETS["hotpotqa"].hub_id, "distractor", split):
        titles, sentences = row["context"]["title"], row["context"]["sentences"]
        supporting = set(row["supporting_facts"]["title"])
        documents = [
            f"{title}: {' '.join(s.strip() for s in paragraph)}" for title, paragraph in zip(titles, sentences)
        ]
        relevance = [1.0 if title in supporting else 0.0 for title in titles]
        examples.append(RagExample(row["question"], documents, [row["answer"]], relevance))
    return examples


def _pop_qa(split: str) -> list[RagExample]:
    rows = _hub_rows(HUB_DATASETS["popqa"].hub_id, None, split)
    return [RagExample(row["question"], [], list(json.loads(row["possible_answers"]))) for row in rows]


def _asqa(split: str) -> list[RagExample]:
    examples = []
    for row in _hub_rows(HUB_DATASETS["asqa"].hub_id, None, split):
        answers = [answer for pair in row["qa_pairs"] for answer in pair["short_answers"]]
        examples.append(RagExample(row["ambiguous_question"], [], answers))
    return examples


def _bioasq(split: str) -> list[RagExample]:
    """Questions with the PubMed passages the BioASQ experts marked relevant (gold evidence, not a retrieval run)."""
    hub_id = HUB_DATASETS["bioasq"].hub_id
    corpus_rows = _hub_rows(hub_id, "text-corpus", "passages")
    id_field = "id" if "id" in corpus_rows.column_names else "passage_id"
    passages = {str(row[id_field]): row["passage"] for row in corpus_rows}
    examples = []
    for row in _hub_rows(hub_id, "question-answer-passages", split):
        ids = row["relevant_passage_ids"]
        if isinstance(ids, str):
            ids = json.loads(ids)
        documents = [passages[str(passage_id)] for passage_id in ids if str(passage_id) in passages]
        examples.append(RagExample(row["question"], documents, [row["answer"]], [1.0] * len(documents)))
    return examples


@dataclass(frozen=True)
class HubDataset:
    hub_id: str
    split: str
    loader: Callable[[str], list[RagExample]]
    documents: str  # what the Hub rows carry as documents, shown in errors and --help


# The OSCAR evaluation sets (oscar.md section 3.1). Only HotpotQA's distractor setting and BioASQ ship documents with
# their questions; OSCAR retrieves the others' documents from KILT-100w (SPLADE-v3, then a DeBERTa-v3 reranker).
HUB_DATASETS: dict[str, HubDataset] = {
    "nq": HubDataset("google-research-datasets/nq_open", "validation", _nq_open, "none"),
    "triviaqa": HubDataset("mandarjoshi/trivia_qa", "validation", _trivia_qa, "none"),
    "hotpotqa": HubDataset("hotpotqa/hotpot_qa", "validation", _hotpot_qa, "10 paragraphs (2 gold, 8 distractors)"),
    "popqa": HubDataset("akariasai/PopQA", "test", _pop_qa, "none"),
    "asqa": HubDataset("din0s/asqa", "dev", _asqa, "none"),
    "bioasq": HubDataset("rag-datasets/rag-mini-bioasq", "test", _bioasq, "gold PubMed passages"),
}


def load_hub_dataset(name: str, split: str | None = None) -> list[RagExample]:
    entry = HUB_DATASETS[name]
    try:
        return entry.loader(split or entry.split)
    except Exception as error:  # offline, gated, renamed: every failure gets the same way out
        raise DatasetUnavailableError(
            f"Could not load {name!r} ({entry.hub_id}) through `datasets`: {type(error).__name__}: {error}\n"
            "Without access to the Hugging Face Hub, pass a local JSONL file instead (--data path/to/file.jsonl), "
            'one object per line: {"question": "...", "documents": ["...", ...], "answers": ["...", ...]}.'
        ) from error


def load_examples(
    source: str, split: str | None = None, limit: int | None = None, num_documents: int = 10
) -> list[RagExample]:
    """Examples from a dataset name of HUB_DATASETS or a JSONL path, cut to `limit` and `num_documents` each."""
    if source.lower() in HUB_DATASETS:
        examples = load_hub_dataset(source.lower(), split)
    elif source.endswith(".jsonl") or os.path.isfile(source):
        examples = load_jsonl(source)
    else:
        raise ValueError(f"Unknown dataset {source!r}: use one of {sorted(HUB_DATASETS)} or the path of a JSONL file.")
    if limit is not None:
        examples = examples[:limit]
    return [example.first_documents(num_documents) for example in examples]


# ---- generation ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Run the base generator: switch off every LoRA layer, then restore each layer's state and trainability."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    saved = [(layer, layer.disable_adapters, {p: p.requires_grad for p in layer.parameters()}) for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled, requires_grad in saved:
            layer.enable_adapters(not was_disabled)
            for parameter, flag in requires_grad.items():  # enable_adapters(True) would make adapters trainable
                parameter.requires_grad_(flag)


def has_adapters(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(layer, BaseTunerLayer) for layer in module.modules())


def greedy_kwargs(pad_token_id: int, **overrides) -> dict:
    """Greedy decoding settings shared by every method, so that they differ only in their inputs."""
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_token_id)
    kwargs.update(overrides)
    return kwargs


def tokenize_text_prompts(tokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded generator ids of full-text prompts (the prompt string already holds BOS and chat markers)."""
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


@torch.no_grad()
def generate_with_base_generator(
    generator: torch.nn.Module, batch: dict[str, torch.Tensor], pad_token_id: int, **generate_kwargs
) -> torch.Tensor:
    """New tokens `(batch, new)` of the generator with its LoRA switched off (if it has any), reading token ids."""
    with adapters_disabled(generator):
        output = generator.generate(**batch, **greedy_kwargs(pad_token_id, **generate_kwargs))
    return output[:, batch["input_ids"].shape[1] :]


def answer_batch(
    model: ScaleDownForCausalLM, method: str, examples: list[RagExample], max_new_tokens: int
) -> list[str]:
    questions = [example.question for example in examples]
    if method == "scaledown":
        return model.generate_from_documents(
            questions, [example.documents for example in examples], max_new_tokens=max_new_tokens
        )
    with_documents = method == "uncompressed"
    tokenizer = model.generator_tokenizer
    prompts = [
        text_prompt(tokenizer, e.question, e.documents if with_documents else [], model.config.system_prompt)
        for e in examples
    ]
    new_tokens = generate_with_base_generator(
        model.generator,
        tokenize_text_prompts(tokenizer, prompts, model.device),
        pad_token_id=model.input_builder.generator_pad_id,
        max_new_tokens=max_new_tokens,
    )
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock readings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# ---- evaluation ------------------------------------------------------------------------------------------------
def rerank_ndcg(
    model: ScaleDownForCausalLM, examples: list[RagExample], batch_size: int = 8, k: int = NDCG_K
) -> dict | None:
    """Mean nDCG@k of the rerank head over questions with a relevant document; None when there is no head or label."""
    if model.rerank_head is None:
        return None
    labelled = [e for e in examples if e.relevance is not None and e.documents and max(e.relevance) > 0]
    if not labelled:
        return None
    values = []
    for batch in _batches(labelled, batch_size):
        scores = model.compress([e.question for e in batch], [e.documents for e in batch]).rerank_scores
        values.extend(ndcg_at_k(s.float().tolist(), e.relevance, k=k) for s, e in zip(scores, batch))
    return {f"ndcg@{k}": sum(values) / len(values), "questions": len(values)}


def evaluate(
    model: ScaleDownForCausalLM,
    examples: Sequence[RagExample | dict],
    methods: Sequence[str] = METHODS,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    judge: JudgeFn | None = None,
    progress: bool = True,
) -> dict:
    """Answer every example with each method and score the answers.

    Returns {"num_examples", "methods": {method: {metric means, "seconds", "ms_per_question"}}, "rerank" (nDCG of the
    rerank head, or None), "examples": [{"question", "answers", "predictions": {method: answer}}]}. Times are wall
    clock of tokenisation, compression and generation, after one untimed warm-up batch per method.
    """
    from tqdm.auto import tqdm

    examples = [
        e if isinstance(e, RagExample) else example_from_row(e, where=f"example {i}") for i, e in enumerate(examples)
    ]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown methods {unknown}: choose among {list(METHODS)}.")
    if not examples:
        raise ValueError("No examples to evaluate.")
    if any(m != "closed_book" for m in methods) and not any(e.documents for e in examples):
        raise ValueError(
            "None of the examples has documents: this dataset ships questions and answers only. Retrieve documents "
            "for its questions (scaledown-prepare-data) and pass the resulting JSONL with --data, or run "
            "--methods closed_book."
        )
    model.eval()
    device = model.device
    report = {"num_examples": len(examples), "methods": {}, "rerank": None}
    predictions: dict[str, list[str]] = {}
    for method in methods:
        answer_batch(model, method, examples[:1], max_new_tokens=2)  # warm-up: kernels, caches, lazy initialisation
        answers, seconds = [], 0.0
        for batch in tqdm(_batches(examples, batch_size), desc=method, disable=not progress):
            synchronize(device)
            start = time.perf_counter()
            answers.extend(answer_batch(model, method, batch, max_new_tokens))
            synchronize(device)
            seconds += time.perf_counter() - start
        per_example = score_answers([e.question for e in examples], answers, [e.answers for e in examples], judge=judge)
        report["methods"][method] = {
            **aggregate(per_example),
            "seconds": seconds,
            "ms_per_question": 1000 * seconds / len(examples),
        }
        predictions[method] = answers
    report["rerank"] = rerank_ndcg(model, examples, batch_size)
    report["examples"] = [
        {"question": e.question, "answers": e.answers, "predictions": {m: predictions[m][i] for m in methods}}
        for i, e in enumerate(examples)
    ]
    return report


# ---- reporting -------------------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table; floats get 3 decimals, None shows as '-'."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in text_rows)) for i, header in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(value.rjust(w) for value, w in zip(row, widths)) for row in text_rows]
    return "\n".join(lines)


def evaluation_table(report: dict) -> str:
    metric_names = ["match", "exact_match", "f1"] + (
        ["llm_judge"] if any("llm_judge" in r for r in report["methods"].values()) else []
    )
    headers = ["method", *metric_names, "ms/question", "total s"]
    rows = [
        [method, *(scores.get(name) for name in metric_names), scores["ms_per_question"], scores["seconds"]]
        for method, scores in report["methods"].items()
    ]
    table = format_table(headers, rows)
    if report.get("rerank"):
        key = next(k for k in report["rerank"] if k.startswith("ndcg"))
        table += f"\nrerank head {key}: {report['rerank'][key]:.3f} over {report['rerank']['questions']} questions"
    return table


def plot_evaluation(report: dict, path: str, title: str = "") -> None:
    """Two panels: accuracy metrics per method, and milliseconds per question per method."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    methods = list(report["methods"])
    metric_names = [m for m in ("match", "exact_match", "f1", "llm_judge") if m in report["methods"][methods[0]]]
    figure, (accuracy_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(metric_names)
    for offset, name in enumerate(metric_names):
        positions = [i + (offset - (len(metric_names) - 1) / 2) * width for i in range(len(methods))]
        accuracy_axis.bar(positions, [report["methods"][m][name] for m in methods], width, label=name)
    accuracy_axis.set_xticks(range(len(methods)), methods)
    accuracy_axis.set_ylim(0, 1)
    accuracy_axis.set_ylabel("score")
    accuracy_axis.set_title("accuracy")
    accuracy_axis.legend()
    time_axis.bar(methods, [report["methods"][m]["ms_per_question"] for m in methods], color="tab:gray")
    time_axis.set_ylabel("ms per question")
    time_axis.set_title("time")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- command line ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls are slow on most CPUs
    return getattr(torch, name)


def load_judge(spec: str) -> JudgeFn:
    """Import `package.module:function`, a callable (question, prediction, golds) -> score in [0, 1]."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"--judge takes module:function, got {spec!r}.")
    return getattr(importlib.import_module(module_name), attribute)


def build_parser() -> argparse.ArgumentParser:
    datasets_help = "; ".join(
        f"{name}: {entry.hub_id} (documents: {entry.documents})" for name, entry in HUB_DATASETS.items()
    )
    parser = argparse.ArgumentParser(
        prog="scaledown-evaluate",
        description="Compare a ScaleDown checkpoint with its uncompressed base generator and a closed-book baseline.",
    )
    parser.add_argument("--checkpoint", required=True, help="folder or Hub id of a ScaleDown checkpoint")
    parser.add_argument(
        "--data", required=True, help=f"a JSONL file (question, documents, answers) or one of: {datasets_help}"
    )
    parser.add_argument("--split", default=None, help="dataset split (default: each dataset's evaluation split)")
    parser.add_argument(
        "--num_documents", type=int, default=10, help="documents per question (OSCAR evaluates with 10)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128, help="BERGEN's OSCAR setting is 128")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument(
        "--judge", default=None, help="module:function of an LLM judge (question, prediction, golds) -> score"
    )
    parser.add_argument("--output_dir", default="evaluation_results")
    parser.add_argument("--device", default="auto", help="auto picks cuda when available")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return parser


def run(args: argparse.Namespace) -> dict:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    examples = load_examples(args.data, args.split, args.limit, args.num_documents)
    judge = load_judge(args.judge) if args.judge else None
    model = ScaleDownForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to(device).eval()
    if any(m != "scaledown" for m in methods) and not has_adapters(model.generator):
        print(
            "Warning: this checkpoint's generator has no LoRA layers to switch off (saved merged, or lora_r=0): the "
            "'uncompressed' and 'closed_book' baselines run the generator as loaded, not the original base model."
        )
    report = evaluate(
        model, examples, methods, args.batch_size, args.max_new_tokens, judge=judge, progress=not args.no_progress
    )
    name = os.path.splitext(os.path.basename(args.data))[0] if os.path.isfile(args.data) else args.data.lower()
    report["settings"] = {
        "checkpoint": args.checkpoint,
        "data": args.data,
        "split": args.split,
        "num_documents": args.num_documents,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "judge": args.judge,
        "method_descriptions": {m: METHOD_DESCRIPTIONS[m] for m in methods},
    }
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, f"evaluation_{name}.json")
    png_path = os.path.join(args.output_dir, f"evaluation_{name}.png")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    plot_evaluation(
        report, png_path, title=f"{name}: {len(examples)} questions, up to {args.num_documents} documents each"
    )
    print(evaluation_table(report))
    print(f"Wrote {json_path} and {png_path}")
    report["paths"] = {"json": json_path, "png": png_path}
    return report


def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
