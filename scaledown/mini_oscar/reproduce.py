"""The miniature OSCAR reproduction, end to end:

1. a small decoder learns from scratch to answer from uncompressed documents (generator base and teacher);
2. it answers the training questions from full text (distillation targets); the world's relevance gives rerank
   targets;
3. ScaleDown is trained with the real training command: N-layers compressor and MiniLM-L6 encoder compressor
   (after the pretraining stage), at 16x, 32x and 64x, with and without the rerank head;
4. everything is evaluated with the real evaluation code on held-out people: closed-book, full text, compressed.

    python -m scaledown.mini_oscar.reproduce --scale gpu --output_dir runs/mini-oscar
"""

import argparse
import json
import os
import time

import torch

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
    # The GPU run: half of the distractors state the asked attribute of another person, 3 documents, all variants
    # (the most telling first: the report is rewritten after each one).
    "gpu": dict(
        world=dict(num_entities=2000, eval_fraction=0.1, name_syllables=(2, 3)),
        questions=dict(train=8, test=2, num_documents=3, hard_distractor_fraction=0.5, fresh_facts=True,
                       teacher_data="unseen"),
        generator=dict(hidden_size=256, num_layers=6, num_heads=8), vocab_size=2000,
        teacher=dict(steps=2000, batch_size=64, learning_rate=1e-3),
        scaledown=dict(max_steps=2000, batch_size=64, learning_rate=1e-3, compressor_learning_rate=1e-3),
        pretrain=dict(max_steps=300),
        variants=[
            dict(name="n_layers-16x", compressor="n_layers", num_layers=3, memory_tokens=4),
            dict(name="minilm-16x+rerank", compressor="encoder", memory_tokens=4, rerank=True),
            dict(name="n_layers-32x", compressor="n_layers", num_layers=3, memory_tokens=2),
            dict(name="n_layers-64x", compressor="n_layers", num_layers=3, memory_tokens=1),
            dict(name="n_layers-16x+rerank", compressor="n_layers", num_layers=3, memory_tokens=4, rerank=True),
            dict(name="minilm-16x", compressor="encoder", memory_tokens=4),
        ],
    ),
}


def build_data(scale: dict, data_dir: str) -> dict:
    world = build_world(seed=0, **scale["world"])
    q = scale["questions"]
    common = dict(num_documents=q["num_documents"], hard_distractor_fraction=q["hard_distractor_fraction"],
                  fresh_facts=q.get("fresh_facts", False))
    train = make_examples(world, "train", questions_per_entity=q["train"], **common)
    test = make_examples(world, "test", questions_per_entity=q["test"], **common)
    # "unseen": the teacher learns from its own fresh questions, each seen once, so it must read (and its answers
    # to the distillation questions are honest held-out answers). "distillation": it learns on the distillation
    # questions themselves, so its targets are nearly all correct: the cheap choice for the CPU scale.
    teacher_train = train
    if q.get("teacher_data", "distillation") == "unseen":
        per_person = scale["teacher"]["steps"] * scale["teacher"]["batch_size"] // len(world.entities_of("train"))
        teacher_train = make_examples(world, "train", questions_per_entity=max(1, per_person), seed=1, **common)
    os.makedirs(data_dir, exist_ok=True)
    write_jsonl(os.path.join(data_dir, "test.jsonl"), test)
    write_lines(os.path.join(data_dir, "pretrain.txt"), pretraining_texts(world, "train"))
    return {"world": world, "train": train, "teacher_train": teacher_train, "test": test}


def train_variant(variant: dict, scale: dict, generator_dir: str, data_dir: str, output_dir: str, device: str) -> str:
    """Train one compressor variant with `scaledown-train` (the same code path users run)."""
    run = scale["scaledown"]
    common = [
        "--generator_name_or_path", generator_dir,
        "--num_memory_tokens", str(variant["memory_tokens"]),
        "--max_document_length", str(DOCUMENT_TOKENS), "--max_query_length", "32",
        "--per_device_train_batch_size", str(run["batch_size"]), "--effective_batch_size", "0",
        "--learning_rate", str(run["learning_rate"]),
        "--compressor_learning_rate", str(run["compressor_learning_rate"]),
        "--gradient_checkpointing", "false", "--save_strategy", "no", "--logging_steps", "25",
        "--report_to", "none", "--device", device, "--seed", "0", "--disable_tqdm", "true",
        "--dataloader_num_workers", str(loader_workers("cuda" if device == "gpu" else "cpu")),
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
    if variant["compressor"] != "n_layers":  # encoder compressors need the pretraining stage (OSCAR App. I)
        pretrain_dir = variant_dir + "-pretrain"
        if not os.path.isfile(os.path.join(pretrain_dir, "model.safetensors")):
            train_main(common + ["--stage", "pretrain", "--train_data", os.path.join(data_dir, "pretrain.txt"),
                                 "--max_steps", str(scale["pretrain"]["max_steps"]), "--output_dir", pretrain_dir])
        init = ["--init_checkpoint", pretrain_dir]
    train_main(common + init + ["--train_data", os.path.join(data_dir, "distill.jsonl"),
                                "--max_steps", str(run["max_steps"]), "--output_dir", variant_dir])
    return variant_dir


def run(scale_name: str, output_dir: str, device: str = "auto", variants: list[str] | None = None) -> dict:
    scale = SCALES[scale_name]
    torch_device = "cuda" if device in ("auto", "gpu") and torch.cuda.is_available() else "cpu"
    train_device = "gpu" if torch_device == "cuda" else "cpu"
    started = time.time()
    data_dir = os.path.join(output_dir, "data")
    data = build_data(scale, data_dir)

    # 1. the generator base / teacher, from scratch
    # Each finished stage leaves a file behind; a rerun (after a kill) skips it.
    generator_dir = os.path.join(output_dir, "generator")
    teacher_log = os.path.join(output_dir, "teacher_losses.json")
    if not os.path.isfile(teacher_log):
        texts = [t for e in data["teacher_train"] for t in (e["question"], e["answer"], *e["documents"])]
        tokenizer = build_tokenizer(texts, vocab_size=scale["vocab_size"])
        build_causal_lm(generator_dir, tokenizer, "llama", **scale["generator"])
        losses = pretrain_generator(generator_dir, data["teacher_train"], device=torch_device, **scale["teacher"])
        with open(teacher_log, "w") as handle:
            json.dump(losses, handle)
    with open(teacher_log) as handle:
        teacher_losses = json.load(handle)

    # 2. sequence-level distillation targets
    distill_path = os.path.join(data_dir, "distill.jsonl")
    if not os.path.isfile(distill_path):
        answers = teacher_answers(generator_dir, data["train"], device=torch_device)
        write_jsonl(distill_path, [{**e, "answer": a} for e, a in zip(data["train"], answers)])
    answers = [row["answer"] for row in read_jsonl(distill_path)]
    teacher_train_accuracy = sum(a == e["answer"] for a, e in zip(answers, data["train"])) / len(answers)

    # 3-4. train and evaluate each variant on held-out people
    chosen = [v for v in scale["variants"] if variants is None or v["name"] in variants]
    results = {"scale": scale_name, "teacher_train_accuracy": teacher_train_accuracy,
               "teacher_final_loss": sum(teacher_losses[-20:]) / len(teacher_losses[-20:]),
               "closed_book_chance": chance_accuracy(data["world"]), "variants": {}}
    for variant in chosen:
        variant_dir = train_variant(variant, scale, generator_dir, data_dir, output_dir, train_device)
        model = ScaleDownForCausalLM.from_pretrained(variant_dir).to(torch_device)
        methods = ("scaledown",) if results.get("baselines") else ("scaledown", "uncompressed", "closed_book")
        report = evaluate(model, data["test"], methods=methods, batch_size=64, max_new_tokens=12, progress=False)
        if "uncompressed" in report["methods"]:
            results["baselines"] = {m: report["methods"][m] for m in ("uncompressed", "closed_book")}
        results["variants"][variant["name"]] = {
            **report["methods"]["scaledown"],
            "compression": DOCUMENT_TOKENS // variant["memory_tokens"],
            "rerank": report["rerank"],
        }
        del model
        results["seconds"] = time.time() - started
        write_report(results, output_dir)  # after every variant: a run cut short still leaves its table
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
    args = parser.parse_args(argv)
    return run(args.scale, args.output_dir, args.device, args.variants)


if __name__ == "__main__":
    main()
