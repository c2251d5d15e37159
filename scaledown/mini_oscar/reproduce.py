"""The miniature OSCAR reproduction, end to end:

1. a small decoder learns from scratch to answer from uncompressed documents (generator base and teacher);
2. it answers the training questions from full text (distillation targets); the world's relevance gives rerank
   targets;
3. ScaleDown is trained with the real training command: N-layers compressor and MiniLM-L6 encoder compressor
   (with or without the pretraining stage, per variant), at 16x, 32x and 64x, with and without the rerank head;
4. everything is evaluated with the real evaluation code on held-out people: closed-book, full text, compressed.

    python -m scaledown.mini_oscar.reproduce --scale gpu --output_dir runs/mini-oscar
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import torch

from .._compat import checkpointing_flag
from ..evaluation.evaluate import evaluate
from ..modeling_scaledown import ScaleDownForCausalLM
from ..toy_models import build_causal_lm, build_tokenizer, minilm_path
from ..train import main as train_main
from .teacher import loader_workers, pretrain_generator, teacher_answers
from .world import (
    build_world,
    chance_accuracy,
    make_examples,
    pretraining_texts,
    read_jsonl,
    write_jsonl,
    write_lines,
)

DOCUMENT_TOKENS = 64  # passages stay under ~50 tokens; 64 / memory tokens is the compression rate

SCALES = {
    # The test suite's version: a few minutes on two CPU cores. Easy distractors (they never state the asked
    # attribute) keep the task learnable in that budget; fresh facts per question mean no person's facts can be
    # learnt by heart, so accuracy on held-out people measures reading.
    "cpu": dict(
        world=dict(num_entities=300, eval_fraction=0.2, num_towns=6, num_companies=6, birth_years=(1990, 1995),
                   name_syllables=(2,), attributes=("birthplace", "employer", "colour", "pet")),
        questions=dict(train=8, test=2, num_documents=2, hard_distractor_fraction=0.0, fresh_facts=True),
        generator=dict(hidden_size=96, num_layers=3, num_heads=4), vocab_size=500,
        teacher=dict(steps=800, batch_size=16, learning_rate=3e-3),
        scaledown=dict(max_steps=300, batch_size=32, learning_rate=3e-3, compressor_learning_rate=1e-3),
        variants=[dict(name="n_layers-16x", compressor="n_layers", num_layers=2, memory_tokens=4)],
    ),
    # Seconds, not minutes: for tests of the orchestration (resuming, merging reports, variants side by side).
    "smoke": dict(
        world=dict(num_entities=40, eval_fraction=0.25, num_towns=4, num_companies=4, birth_years=(1990, 1992),
                   name_syllables=(2,), attributes=("birthplace", "employer")),
        questions=dict(train=2, test=1, num_documents=2, hard_distractor_fraction=0.0, fresh_facts=True),
        generator=dict(hidden_size=32, num_layers=2, num_heads=2), vocab_size=200,
        teacher=dict(steps=5, batch_size=8, learning_rate=3e-3),
        scaledown=dict(max_steps=3, batch_size=8, learning_rate=3e-3, compressor_learning_rate=1e-3),
        variants=[dict(name="n_layers-16x", compressor="n_layers", num_layers=1, memory_tokens=4),
                  dict(name="n_layers-32x", compressor="n_layers", num_layers=1, memory_tokens=2)],
    ),
    # The GPU run (benchmarks/MINI_OSCAR.md): the CPU scale's narrow world (4 attributes, small value pools), 2000
    # people, 2 documents, half of the distractors stating the asked attribute of another person. The teacher
    # reads it perfectly (held-out full text 1.000); the widest world with 3 documents had kept it near 0.45.
    "gpu": dict(
        world=dict(num_entities=2000, eval_fraction=0.1, num_towns=6, num_companies=6, birth_years=(1990, 1995),
                   name_syllables=(2, 3), attributes=("birthplace", "employer", "colour", "pet")),
        questions=dict(train=8, test=2, num_documents=2, hard_distractor_fraction=0.5, fresh_facts=True,
                       teacher_questions=100),
        generator=dict(hidden_size=256, num_layers=6, num_heads=8), vocab_size=2000,
        teacher=dict(steps=2500, batch_size=256, learning_rate=2e-3),
        scaledown=dict(max_steps=2000, batch_size=64, learning_rate=1e-3, compressor_learning_rate=1e-3),
        # MiniLM learns only at the paper's encoder learning rate, 1e-4 (3e-4 and above leave it at closed-book
        # level), and without the pretraining stage, which slowed it down here (the gpu-encoder ablations below).
        variants=[
            dict(name="n_layers-16x", compressor="n_layers", num_layers=3, memory_tokens=4),
            dict(name="minilm-16x+rerank", compressor="encoder", memory_tokens=4, rerank=True, pretrain_steps=0,
                 compressor_learning_rate=1e-4, max_steps=1200),
            dict(name="n_layers-32x", compressor="n_layers", num_layers=3, memory_tokens=2),
            dict(name="n_layers-64x", compressor="n_layers", num_layers=3, memory_tokens=1),
            dict(name="n_layers-16x+rerank", compressor="n_layers", num_layers=3, memory_tokens=4, rerank=True),
            dict(name="minilm-16x", compressor="encoder", memory_tokens=4, pretrain_steps=0,
                 compressor_learning_rate=1e-4, max_steps=1200),
        ],
    ),
}
# Ablations of the encoder compressor in the gpu world (the same teacher, so the same --output_dir as `gpu` reuses
# it): the pretraining stage on or off, and the compressor learning rate, which also drives the new connector.
def _minilm_ablation(memory_tokens: int, learning_rate: str, pretrain_steps: int, rerank: bool = False) -> dict:
    pretraining = f"pretrain{pretrain_steps}" if pretrain_steps else "nopretrain"
    name = f"minilm-{DOCUMENT_TOKENS // memory_tokens}x{'+rerank' if rerank else ''}-{pretraining}-lr{learning_rate}"
    return dict(name=name, compressor="encoder", memory_tokens=memory_tokens, pretrain_steps=pretrain_steps,
                compressor_learning_rate=float(learning_rate), max_steps=1200, rerank=rerank)


SCALES["gpu-encoder"] = dict(
    SCALES["gpu"],
    variants=[
        _minilm_ablation(4, "1e-3", 0),
        _minilm_ablation(4, "1e-4", 0),
        _minilm_ablation(4, "3e-3", 0),
        _minilm_ablation(8, "1e-3", 0),
        _minilm_ablation(4, "1e-3", 800),
        _minilm_ablation(4, "3e-4", 800),
        _minilm_ablation(4, "1e-4", 300),
        _minilm_ablation(4, "1e-4", 300, rerank=True),
    ],
)


def build_data(scale: dict, data_dir: str, with_training_questions: bool) -> dict:
    """The world; held-out test questions and pretraining text on disk; training questions when still needed."""
    world = build_world(seed=0, **scale["world"])
    q = scale["questions"]
    common = dict(num_documents=q["num_documents"], hard_distractor_fraction=q["hard_distractor_fraction"],
                  fresh_facts=q.get("fresh_facts", False))
    os.makedirs(data_dir, exist_ok=True)
    test_path, pretrain_path = os.path.join(data_dir, "test.jsonl"), os.path.join(data_dir, "pretrain.txt")
    if not os.path.isfile(test_path):
        write_jsonl(test_path, make_examples(world, "test", questions_per_entity=q["test"], **common))
    if not os.path.isfile(pretrain_path):
        write_lines(pretrain_path, pretraining_texts(world, "train"))
    data = {"world": world, "test": read_jsonl(test_path)}
    if with_training_questions:
        data["train"] = make_examples(world, "train", questions_per_entity=q["train"], **common)
        # With teacher_questions, the teacher learns from its own questions, so it must read (and its answers to the
        # distillation questions are honest held-out answers). Without, it learns on the distillation questions
        # themselves, so its targets are nearly all correct: the cheap choice for the CPU scale.
        data["teacher_train"] = data["train"]
        if q.get("teacher_questions"):  # its own questions (seed 1), with facts drawn afresh for each
            data["teacher_train"] = make_examples(
                world, "train", questions_per_entity=q["teacher_questions"], seed=1, **common
            )
    return data


def train_variant(
    variant: dict, scale: dict, generator_dir: str, data_dir: str, output_dir: str, device: str, workers: int
) -> str:
    """Train one compressor variant with `scaledown-train` (the same code path users run)."""
    run = scale["scaledown"]
    common = [
        "--generator_name_or_path", generator_dir,
        "--num_memory_tokens", str(variant["memory_tokens"]),
        "--max_document_length", str(DOCUMENT_TOKENS), "--max_query_length", "32",
        "--per_device_train_batch_size", str(run["batch_size"]), "--effective_batch_size", "0",
        "--learning_rate", str(run["learning_rate"]),
        "--compressor_learning_rate", str(variant.get("compressor_learning_rate", run["compressor_learning_rate"])),
        checkpointing_flag(), "false", "--save_strategy", "no", "--logging_steps", "25",
        "--report_to", "none", "--device", device, "--seed", "0", "--disable_tqdm", "true",
        "--dataloader_num_workers", str(workers),
    ]  # fmt: skip
    if variant["compressor"] == "n_layers":
        common += ["--compressor_type", "n_layers", "--num_layers", str(variant["num_layers"])]
    else:
        common += ["--compressor_type", "encoder", "--compressor_name_or_path", minilm_path()]
    if variant.get("rerank"):
        common += ["--enable_reranking"]
    variant_dir = os.path.join(output_dir, variant["name"])
    if os.path.isfile(os.path.join(variant_dir, "model.safetensors")):
        return variant_dir
    init = []
    # An encoder variant with pretrain_steps first takes the pretraining stage (OSCAR App. I), then fine-tunes from it.
    pretrain_steps = variant.get("pretrain_steps", 0)
    if variant["compressor"] != "n_layers" and pretrain_steps:
        pretrain_dir = variant_dir + "-pretrain"
        if not os.path.isfile(os.path.join(pretrain_dir, "model.safetensors")):
            train_main(common + ["--stage", "pretrain", "--train_data", os.path.join(data_dir, "pretrain.txt"),
                                 "--max_steps", str(pretrain_steps), "--output_dir", pretrain_dir])
        init = ["--init_checkpoint", pretrain_dir]
    train_main(common + init + ["--train_data", os.path.join(data_dir, "distill.jsonl"),
                                "--max_steps", str(variant.get("max_steps", run["max_steps"])),
                                "--output_dir", variant_dir])
    return variant_dir


def _evaluation_path(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, name, "evaluation.json")


def _evaluate_to_file(model_dir: str, test: list[dict], methods: tuple, path: str, torch_device: str) -> dict:
    model = ScaleDownForCausalLM.from_pretrained(model_dir).to(torch_device)
    report = evaluate(model, test, methods=methods, batch_size=64, max_new_tokens=12, progress=False)
    row = {"methods": report["methods"], "rerank": report["rerank"]}
    with open(path, "w") as handle:
        json.dump(row, handle, indent=1)
    return row


def _run_variants_side_by_side(
    names: list[str],
    scale_name: str,
    output_dir: str,
    device: str,
    jobs: int,
    workers: int,
    on_finished: Callable[[], None],
) -> None:
    """One process per variant, `jobs` at a time. The miniature's models are so small that one process leaves a
    GPU mostly idle (launch- and Python-bound), so variants that share it finish in little more than one's time.
    Killing this process (SIGTERM, Ctrl-C) stops its children too; what finished is kept."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    waiting, running = list(names), []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                name = waiting.pop(0)
                command = [sys.executable, "-m", "scaledown.mini_oscar.reproduce", "--scale", scale_name,
                           "--output_dir", output_dir, "--device", device, "--variants", name,
                           "--loader_workers", str(workers), "--no_report"]  # fmt: skip
                with open(os.path.join(output_dir, f"{name}.log"), "w") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
                running.append((name, process))
            time.sleep(2)
            for name, process in list(running):
                if process.poll() is None:
                    continue
                running.remove((name, process))
                log_path = os.path.join(output_dir, f"{name}.log")
                if process.returncode == 0:
                    print(f"variant {name}: done ({log_path})", flush=True)
                    on_finished()
                else:
                    with open(log_path) as handle:
                        tail = handle.read()[-3000:]
                    print(f"variant {name}: FAILED (exit {process.returncode}); end of {log_path}:\n{tail}", flush=True)
    finally:
        for _, process in running:
            process.terminate()
        signal.signal(signal.SIGTERM, previous_handler)


def run(
    scale_name: str,
    output_dir: str,
    device: str = "auto",
    variants: list[str] | None = None,
    jobs: int = 1,
    loader_workers_count: int | None = None,
    report: bool = True,
) -> dict:
    """Every finished stage leaves a file behind (teacher, distillation data, each variant's evaluation), so a rerun
    after a kill, or with other --variants, continues where the last one stopped and reports them all."""
    scale = SCALES[scale_name]
    torch_device = "cuda" if device in ("auto", "gpu") and torch.cuda.is_available() else "cpu"
    train_device = "gpu" if torch_device == "cuda" else "cpu"
    workers = loader_workers(torch_device) if loader_workers_count is None else loader_workers_count
    started = time.time()
    data_dir = os.path.join(output_dir, "data")
    generator_dir = os.path.join(output_dir, "generator")
    teacher_log = os.path.join(output_dir, "teacher_losses.json")
    distill_path = os.path.join(data_dir, "distill.jsonl")
    teacher_summary = os.path.join(data_dir, "teacher.json")
    data = build_data(scale, data_dir, with_training_questions=not os.path.isfile(teacher_summary))

    # 1. the generator base / teacher, from scratch
    if not os.path.isfile(teacher_log):
        texts = [t for e in data["teacher_train"] for t in (e["question"], e["answer"], *e["documents"])]
        tokenizer = build_tokenizer(texts, vocab_size=scale["vocab_size"])
        build_causal_lm(generator_dir, tokenizer, "llama", **scale["generator"])
        losses = pretrain_generator(generator_dir, data["teacher_train"], device=torch_device, **scale["teacher"])
        with open(teacher_log, "w") as handle:
            json.dump(losses, handle)
        print(f"teacher trained after {time.time() - started:.0f} s", flush=True)

    # 2. sequence-level distillation targets
    if not os.path.isfile(teacher_summary):
        answers = teacher_answers(generator_dir, data["train"], device=torch_device)
        write_jsonl(distill_path, [{**e, "answer": a} for e, a in zip(data["train"], answers)])
        accuracy = sum(a == e["answer"] for a, e in zip(answers, data["train"])) / len(answers)
        with open(teacher_summary, "w") as handle:
            json.dump({"train_accuracy": accuracy}, handle)
        print(f"distillation answers written after {time.time() - started:.0f} s", flush=True)

    # 3-4. train and evaluate each variant on held-out people
    chosen = [v for v in scale["variants"] if variants is None or v["name"] in variants]
    todo = [v for v in chosen if not os.path.isfile(_evaluation_path(output_dir, v["name"]))]
    def report_so_far() -> dict:  # after every variant: a run cut short still leaves its table
        _evaluate_baselines(scale, output_dir, data["test"], torch_device)
        results = collect_results(scale_name, output_dir, data["world"], time.time() - started)
        write_report(results, output_dir)
        return results

    if jobs > 1 and len(todo) > 1:
        names = [v["name"] for v in todo]  # the machine's loader workers, shared among the side-by-side runs
        _run_variants_side_by_side(names, scale_name, output_dir, device, jobs, workers // jobs, report_so_far)
    else:
        for index, variant in enumerate(todo):
            variant_dir = train_variant(variant, scale, generator_dir, data_dir, output_dir, train_device, workers)
            _evaluate_to_file(variant_dir, data["test"], ("scaledown",), _evaluation_path(output_dir, variant["name"]),
                              torch_device)  # fmt: skip
            if report and index < len(todo) - 1:  # the last one is in the final report below
                report_so_far()
    return report_so_far() if report else {}


def _evaluate_baselines(scale: dict, output_dir: str, test: list[dict], torch_device: str) -> None:
    """Closed-book and full text are the teacher itself (the generator with LoRA off): measured once, through the
    first trained variant's model."""
    baselines_path = os.path.join(output_dir, "baselines.json")
    trained = [v["name"] for v in scale["variants"] if os.path.isfile(_evaluation_path(output_dir, v["name"]))]
    if trained and not os.path.isfile(baselines_path):
        _evaluate_to_file(os.path.join(output_dir, trained[0]), test, ("uncompressed", "closed_book"),
                          baselines_path, torch_device)  # fmt: skip


def collect_results(scale_name: str, output_dir: str, world, seconds: float) -> dict:
    """The report: every variant evaluated so far under output_dir, in the scale's order, and the baselines."""
    scale = SCALES[scale_name]
    with open(os.path.join(output_dir, "teacher_losses.json")) as handle:
        teacher_losses = json.load(handle)
    with open(os.path.join(output_dir, "data", "teacher.json")) as handle:
        teacher = json.load(handle)
    results = {"scale": scale_name, "teacher_train_accuracy": teacher["train_accuracy"],
               "teacher_final_loss": sum(teacher_losses[-20:]) / len(teacher_losses[-20:]),
               "closed_book_chance": chance_accuracy(world), "variants": {}, "seconds": seconds}  # fmt: skip
    baselines_path = os.path.join(output_dir, "baselines.json")
    if os.path.isfile(baselines_path):
        with open(baselines_path) as handle:
            results["baselines"] = json.load(handle)["methods"]
    for variant in scale["variants"]:
        path = _evaluation_path(output_dir, variant["name"])
        if os.path.isfile(path):
            with open(path) as handle:
                row = json.load(handle)
            results["variants"][variant["name"]] = {
                **row["methods"]["scaledown"],
                "compression": DOCUMENT_TOKENS // variant["memory_tokens"],
                "rerank": row["rerank"],
            }
    return results


def results_table(results: dict) -> str:
    full = results["baselines"]["uncompressed"]["match"]
    lines = [
        "| method | compression | Match | EM | Match / full text | nDCG@10 |",
        "|---|---|---|---|---|---|",
        f"| closed-book | - | {results['baselines']['closed_book']['match']:.3f} | "
        f"{results['baselines']['closed_book']['exact_match']:.3f} | - | - |",
        f"| full text (teacher) | 1x | {full:.3f} | {results['baselines']['uncompressed']['exact_match']:.3f} | 1.000 | - |",
    ]
    for name, row in results["variants"].items():
        ndcg = f"{row['rerank']['ndcg@10']:.3f}" if row.get("rerank") else "-"
        ratio = row["match"] / full if full else float("nan")
        lines.append(f"| {name} | {row['compression']}x | {row['match']:.3f} | {row['exact_match']:.3f} | {ratio:.3f} | {ndcg} |")
    lines.append(f"\nclosed-book chance (1 / value pool): {results['closed_book_chance']:.3f}; "
                 f"teacher accuracy on the distillation questions: {results['teacher_train_accuracy']:.3f}")
    return "\n".join(lines)


def write_report(results: dict, output_dir: str) -> None:
    if "baselines" not in results:
        print("No variant has finished yet: nothing to report.")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    table = results_table(results)
    with open(os.path.join(output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    print(table)
    names = ["closed-book", "full text"] + list(results["variants"])
    values = [results["baselines"]["closed_book"]["match"], results["baselines"]["uncompressed"]["match"]]
    values += [row["match"] for row in results["variants"].values()]
    figure, axis = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    colours = ["#999999", "#4477aa"] + ["#ee6677"] * len(results["variants"])
    axis.bar(range(len(names)), values, color=colours)
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel("Match on held-out people")
    axis.set_ylim(0, 1)
    axis.set_title("Miniature OSCAR: accuracy from compressed documents")
    figure.tight_layout()
    figure.savefig(os.path.join(output_dir, "mini_oscar.png"), dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--output_dir", default="mini-oscar")
    parser.add_argument("--device", default="auto", choices=["auto", "gpu", "cpu"])
    parser.add_argument("--variants", nargs="*", help="names of the variants to run (default: all of the scale)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained side by side, one process each")
    parser.add_argument("--loader_workers", type=int, default=None, help="data-loader processes per training run")
    parser.add_argument("--no_report", action="store_true", help="train and evaluate only (used by --jobs)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    unknown = set(args.variants or ()) - {v["name"] for v in SCALES[args.scale]["variants"]}
    if unknown:
        parser.error(f"Unknown variants {sorted(unknown)} for --scale {args.scale}: choose among "
                     f"{[v['name'] for v in SCALES[args.scale]['variants']]}.")  # fmt: skip
    return run(args.scale, args.output_dir, args.device, args.variants, args.jobs, args.loader_workers,
               report=not args.no_report)  # fmt: skip


if __name__ == "__main__":
    main()
