"""Model cards for ScaleDown checkpoints, rendered with huggingface_hub's `ModelCard` from `template.md`.

The card's YAML header (base model, tags, license, `model-index` eval results) comes from `ModelCardData`, so the
Hub reads it exactly as huggingface_hub writes it. Two optional reports fill the rest; both readers are tolerant:
what they do not recognise is skipped, never an error.

Evaluation report, as `scaledown-evaluate` writes it (one file per dataset; several files or a list for more):

    {"num_examples": 500,
     "methods": {"scaledown": {"match": 0.61, "exact_match": 0.40, "f1": 0.52, "ms_per_question": 41.0, ...},
                 "uncompressed": {...}, "closed_book": {...}},
     "rerank": {"ndcg@10": 0.71, "questions": 500},          # or null
     "settings": {"data": "nq", "split": "validation", ...}}

Also accepted: "results" for "methods"; "dataset" / "dataset_name", "dataset_id" (Hub id), "split", "config" at the
top level; `{"nq": {"results": ...}, ...}` keyed by dataset; a flat `"results": {"match": ...}` (one method). The
metrics read are those of `METRIC_NAMES` (plus `TABLE_EXTRAS`, shown in the table only). Only this model's method
goes into `model-index`, the baselines stay in the card's table: `model_method` names it, else the first of
`MODEL_METHODS` present, else the only method.

Bench report, as `scaledown-bench` writes it: rows of measurements under "results" (or "rows" / "runs", or a bare
list), run settings under "settings":

    {"settings": {"device": "NVIDIA H100", "dtype": "bfloat16", "protocol": {...}, "notes": "..."},
     "results": [{"side": "compressed", "compressor": "8l", "batch": "32", "batch_size": 32, "ms_per_query": 4.1,
                  "peak_memory_gb": 20.3, "speedup": {"measured": 3.1, "flops_paper": 4.2, ...}}, ...]}

Nested values are read one level deep ("speedup (measured)"). Rows with those known measures show the identity,
measure and speed-up columns; simpler rows (`{"method": ..., "batch_size": 32, "speedup": 3.1}`) show every scalar.
Speed-up columns are printed as `3.10x`.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

TEMPLATE_PATH = Path(__file__).with_name("template.md")
CARD_TAGS = ["custom_code", "rag", "context-compression", "scaledown", "oscar"]
DEFAULT_LICENSE = "apache-2.0"
QA_TASK = ("question-answering", "Retrieval-augmented question answering")
RERANK_TASK = ("text-ranking", "Document reranking (rerank head)")
DEFAULT_METHOD = "scaledown"
MODEL_METHODS = ("scaledown", "compressed", "oscar", "model")

# Metric keys an evaluation report may use (lower case, '-' read as '_'), in display order, with their card names.
METRIC_NAMES = {
    "match": "Match",
    "accuracy": "Accuracy",
    "exact_match": "Exact match",
    "f1": "F1",
    "precision": "Precision",
    "recall": "Recall",
    "llm_judge": "LLM judge",
    "rouge_l": "ROUGE-L",
}
METRIC_ALIASES = {"em": "exact_match", "rougel": "rouge_l", "llm_eval": "llm_judge"}
TABLE_EXTRAS = {"ms_per_question": "ms/question"}  # shown next to the metrics, never in model-index

# scaledown-bench rows: the columns that identify a measurement and the measures worth a card.
BENCH_IDENTITY = ("method", "side", "compressor", "batch", "batch_size", "num_documents")
BENCH_MEASURES = ("ms_per_query", "compression_ms_per_query", "peak_memory_gb", "error")
BENCH_NOTE_KEYS = ("device", "dtype", "engine", "source", "protocol")

OSCAR_CITATION = """@misc{louis2025oscar,
  title         = {OSCAR: Online Soft Compression And Reranking},
  author        = {Louis, Maxime and Formal, Thibault and Dejean, Herv{\\'e} and Clinchant, St{\\'e}phane},
  year          = {2025},
  eprint        = {2504.07109},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CL},
  url           = {https://arxiv.org/abs/2504.07109}
}"""


@dataclass
class EvaluationTable:
    """One dataset's scores: `scores[method][metric]`, and the rerank head's nDCG when measured."""

    dataset: str
    dataset_id: str
    split: str | None = None
    config: str | None = None
    num_examples: int | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    rerank: dict[str, float] = field(default_factory=dict)
    model_method: str | None = None

    @property
    def columns(self) -> list[str]:
        present = {name for scores in self.scores.values() for name in scores}
        return [name for name in [*METRIC_NAMES, *TABLE_EXTRAS] if name in present]


@dataclass
class SpeedupTable:
    columns: list[str]
    rows: list[list[str]]
    notes: str = ""
    remarks: str = ""


def load_report(path: str | os.PathLike, what: str) -> dict | list:
    """Read an evaluation or bench JSON, with an error that says which file and what is wrong with it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {what} JSON {str(path)!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"The {what} JSON {str(path)!r} is not valid JSON: {error}.") from error


def _reports(value, what: str) -> list:
    """A report, a path to one, or a list of paths: always a list of parsed reports."""
    if isinstance(value, (str, os.PathLike)):
        return [load_report(value, what)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [load_report(v, what) for v in value]
    return [] if value is None else [value]


def hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub model id, None for a local path (which would be invalid card metadata)."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


# ---- evaluation report ---------------------------------------------------------------------------------------
def _metric_key(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    return METRIC_ALIASES.get(key, key)


def _scores_of(entry: dict):
    return entry.get("methods", entry.get("results"))


def _evaluation_entries(report) -> list[dict]:
    if isinstance(report, list):
        return [entry for entry in report if isinstance(entry, dict)]
    if not isinstance(report, dict):
        return []
    if _scores_of(report) is not None:
        return [report]
    return [
        {"dataset": name, **entry}
        for name, entry in report.items()
        if isinstance(entry, dict) and _scores_of(entry) is not None
    ]


def _method_scores(results) -> dict[str, dict[str, float]]:
    if not isinstance(results, dict):
        return {}
    if any(_is_number(value) for value in results.values()):  # a flat dict: one method's metrics
        results = {DEFAULT_METHOD: results}
    scores = {}
    for method, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        known = {_metric_key(name): float(value) for name, value in metrics.items() if _is_number(value)}
        known = {name: value for name, value in known.items() if name in METRIC_NAMES or name in TABLE_EXTRAS}
        if known:
            scores[str(method)] = known
    return scores


def _pick_model_method(methods: list[str], requested: str | None) -> str | None:
    by_lower = {method.lower(): method for method in methods}
    if requested is not None:
        return by_lower.get(requested.lower())
    for name in MODEL_METHODS:
        if name in by_lower:
            return by_lower[name]
    return methods[0] if len(methods) == 1 else None


def _known_dataset(name: str):
    """The Hub dataset behind one of scaledown-evaluate's dataset names ("nq" -> nq_open), if it is one."""
    try:
        from ..evaluation.evaluate import HUB_DATASETS
    except ImportError:  # a trimmed install without the evaluation module: the card shows the name as given
        return None
    return HUB_DATASETS.get(name)


def _dataset_identity(entry: dict, index: int) -> tuple[str, str, str | None]:
    """(name shown, Hub id for model-index, split)."""
    settings = entry.get("settings") if isinstance(entry.get("settings"), dict) else {}
    data = settings.get("data")
    name = entry.get("dataset") or entry.get("dataset_name")
    if not name and isinstance(data, str):
        name = os.path.splitext(os.path.basename(data))[0]  # a JSONL path names its dataset by its file name
    name = str(name or f"dataset {index + 1}")
    known = _known_dataset(name)
    dataset_id = entry.get("dataset_id") or settings.get("dataset_id") or getattr(known, "hub_id", None) or name
    split = entry.get("split") or settings.get("split") or getattr(known, "split", None)
    return name, str(dataset_id), split


def evaluation_tables(report, model_method: str | None = None) -> list[EvaluationTable]:
    """Parse an evaluation report (schema in the module docstring); what cannot be read is skipped."""
    tables = []
    for index, entry in enumerate(_evaluation_entries(report)):
        scores = _method_scores(_scores_of(entry))
        if not scores:
            continue
        name, dataset_id, split = _dataset_identity(entry, index)
        rerank = entry.get("rerank") if isinstance(entry.get("rerank"), dict) else {}
        tables.append(
            EvaluationTable(
                dataset=name,
                dataset_id=dataset_id,
                split=split,
                config=entry.get("config"),
                num_examples=entry.get("num_examples") if _is_number(entry.get("num_examples")) else None,
                scores=scores,
                rerank={k: float(v) for k, v in rerank.items() if k.lower().startswith("ndcg") and _is_number(v)},
                model_method=_pick_model_method(list(scores), model_method),
            )
        )
    return tables


def eval_results(tables: list[EvaluationTable]) -> list[EvalResult]:
    """This model's scores (not the baselines') and its rerank head's nDCG, as model-index entries."""
    results = []
    for table in tables:
        dataset = {
            "dataset_type": table.dataset_id,
            "dataset_name": table.dataset,
            "dataset_config": table.config,
            "dataset_split": table.split,
        }
        if table.model_method is not None:
            for metric, value in table.scores[table.model_method].items():
                if metric in METRIC_NAMES:
                    results.append(
                        EvalResult(
                            task_type=QA_TASK[0],
                            task_name=QA_TASK[1],
                            metric_type=metric,
                            metric_name=METRIC_NAMES[metric],
                            metric_value=value,
                            **dataset,
                        )
                    )
        for metric, value in table.rerank.items():
            results.append(
                EvalResult(
                    task_type=RERANK_TASK[0],
                    task_name=RERANK_TASK[1],
                    metric_type=metric.lower(),
                    metric_name=metric.replace("ndcg", "nDCG"),
                    metric_value=value,
                    **dataset,
                )
            )
    return results


# ---- bench report --------------------------------------------------------------------------------------------
def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_number(value)


def _flatten(row: dict) -> dict:
    """Scalars as they are, nested dicts one level deep ("speedup": {"measured": 3} -> "speedup (measured)")."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key} ({sub})": v for sub, v in value.items() if _is_scalar(v)})
        elif _is_scalar(value):
            flat[key] = value
    return flat


def _is_speedup(column: str) -> bool:
    return "speedup" in column.lower() and "fraction" not in column.lower()


def _bench_cell(column: str, value) -> str:
    if _is_number(value) and _is_speedup(column):
        return f"{value:.2f}x"
    return format_number(value)


def _bench_notes(report: dict) -> tuple[str, str]:
    """("device: ..., dtype: ...", free-text notes) from the report's top level and its settings."""
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    facts = {k: v for k, v in report.items() if _is_scalar(v) and v is not None}
    facts.update({k: settings[k] for k in BENCH_NOTE_KEYS if settings.get(k) is not None})
    parts = []
    for key, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if _is_scalar(v))
        if _is_scalar(value):
            parts.append(f"{key}: {value}")
    remarks = settings.get("notes") if isinstance(settings.get("notes"), str) else ""
    return "; ".join(parts), remarks


def speedup_table(report) -> SpeedupTable | None:
    """A table of the bench rows (schema in the module docstring), or None when there is no row to show."""
    rows, notes, remarks = report, "", ""
    if isinstance(report, dict):
        rows = next((report[k] for k in ("results", "rows", "runs") if isinstance(report.get(k), list)), [])
        notes, remarks = _bench_notes(report)
    if not isinstance(rows, list):
        return None
    rows = [_flatten(row) for row in rows if isinstance(row, dict)]
    rows = [row for row in rows if any(value is not None for value in row.values())]
    if not rows:
        return None
    present = [c for c in dict.fromkeys(key for row in rows for key in row) if any(r.get(c) is not None for r in rows)]
    speedups = [c for c in present if _is_speedup(c)]
    if any(c in BENCH_MEASURES for c in present):  # a scaledown-bench report: the columns a reader needs
        columns = [c for c in BENCH_IDENTITY + BENCH_MEASURES if c in present] + speedups
    else:  # a simpler report: every column, the method first and the speed-ups last
        columns = sorted(present, key=lambda c: (c != "method", _is_speedup(c)))
    cells = [[_bench_cell(column, row.get(column)) for column in columns] for row in rows]
    labels = [column.replace("_", " ") for column in columns]
    return SpeedupTable(columns=labels, rows=cells, notes=notes, remarks=remarks)


# ---- training configuration ----------------------------------------------------------------------------------
def training_rows(config) -> list[tuple[str, str]]:
    """The settings that define a ScaleDown model, read from its config."""
    if config.uses_encoder_compressor:
        width = config.connector_hidden_size
        if width is None and config.generator_config is not None:
            width = 2 * config.generator_config.get_text_config().hidden_size
        compressor = f"`{config.compressor_name_or_path}` ({config.compressor_type}) + MLP connector"
        compressor += f" (hidden {width})" if width else ""
    else:
        compressor = f"first {config.num_compressor_layers} layers of the generator (n_layers)"
    if config.generator_subfolder:
        lora = f"merged into the generator weights (`{config.generator_subfolder}/`)"
    elif config.lora_r and config.lora_r > 0:
        lora = (
            f"r={config.lora_r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
            f"targets={config.lora_target_modules}"
        )
    else:
        lora = "none"
    rerank = f"yes (loss weight {config.rerank_loss_weight})" if config.enable_reranking else "no"
    generator = f"`{config.generator_name_or_path}`"
    if config.generator_subfolder and hub_id_or_none(config.generator_name_or_path) is None:
        generator = "a local base model"  # its path means nothing to readers (the weights ship in the subfolder)
    return [
        ("Generator", generator),
        ("Compressor", compressor),
        ("Memory tokens per document", str(config.num_memory_tokens)),
        ("Document budget", f"{config.max_document_length} tokens"),
        ("Compression rate", f"{config.compression_rate:g}x"),
        ("Query budget in the compressor", f"{config.max_query_length} tokens"),
        ("LoRA on the generator", lora),
        ("Reranking head", rerank),
    ]


# ---- the card ------------------------------------------------------------------------------------------------
def build_model_card(
    config,
    repo_id: str | None = None,
    *,
    evaluation=None,
    bench=None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    language: str | None = "en",
    model_method: str | None = None,
) -> ModelCard:
    """Render the model card of a ScaleDown model.

    config: its `ScaleDownConfig`. repo_id: where it will live (used in the usage snippet and as model-index name).
    evaluation / bench: a parsed report, a path to its JSON, or a list of paths (schemas in the module docstring).
    license: must agree with the base models' licenses. datasets: Hub ids of the training data.
    """
    tables = [t for report in _reports(evaluation, "evaluation") for t in evaluation_tables(report, model_method)]
    speedup_tables = [t for t in map(speedup_table, _reports(bench, "bench")) if t is not None]
    results = eval_results(tables)
    base_model = hub_id_or_none(config.generator_name_or_path)
    model_name = repo_id.split("/")[-1] if repo_id else "scaledown"
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        datasets=list(datasets) if datasets else None,
        tags=CARD_TAGS + [tag for tag in tags or [] if tag not in CARD_TAGS],
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=f"{model_name} (ScaleDown)" if repo_id else "ScaleDown model",
        repo_id=repo_id or "your-namespace/your-scaledown-model",
        base_model=base_model,
        generator_name_or_path=config.generator_name_or_path,
        generator_subfolder=config.generator_subfolder,
        num_memory_tokens=config.num_memory_tokens,
        max_document_length=config.max_document_length,
        max_query_length=config.max_query_length,
        compression_rate=f"{config.compression_rate:g}x",
        reranking=config.enable_reranking,
        training_rows=training_rows(config),
        evaluation_tables=tables,
        column_names={**METRIC_NAMES, **TABLE_EXTRAS},
        format_number=format_number,
        speedup_tables=speedup_tables,
        citation=OSCAR_CITATION,
    )
