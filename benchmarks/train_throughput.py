"""Training throughput of ScaleDown at real shapes with random weights (speed does not depend on their values).

For each compressor: the largest per-device batch that fits, then examples/s, tokens/s, peak memory and MFU of
full training steps (forward, backward, AdamW) with the paper's setup: LoRA r16 on the generator, the compressor
fully trained in float32 master weights, bf16 autocast, gradient checkpointing, 5 documents of 128 tokens, a
32-token question and a 32-token answer.

    python benchmarks/train_throughput.py --shape mistral-7b --compressor 8l,modernbert-base --output_dir OUT

Under `accelerate launch` (DDP, FSDP: configs/accelerate/) every process trains on its own batch of that size: the
table gives examples/s of all GPUs together and the largest peak memory of any one, so a 1-GPU and a multi-GPU run
of the same per-device batch give the scaling efficiency. Give one batch size there: a process that runs out of
memory stops while the others wait for it.
"""

import argparse
import json
import os
import random
import statistics
import time

import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoModelForCausalLM

from scaledown import ScaleDownConfig, ScaleDownForCausalLM
from scaledown.evaluation.bench import (
    ENCODER_SHAPES,
    GENERATOR_SHAPES,
    Protocol,
    _config,
    _word_level_tokenizer,
    compressor_layers,
    is_out_of_memory,
    synthetic_requests,
    synthetic_text,
)
from scaledown.trainer import DEFAULT_COMPRESSOR_LR, parameter_groups, upcast_for_fsdp1

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(shape: str, compressor: str, device, attn: str) -> ScaleDownForCausalLM:
    tokenizer = _word_level_tokenizer("decoder")
    generator_config = _config(GENERATOR_SHAPES[shape], tokenizer, attn)
    with torch.device(device):
        generator = AutoModelForCausalLM.from_config(generator_config, dtype=torch.bfloat16)
    layers = compressor_layers(compressor)
    common = dict(generator_name_or_path=f"random-{shape}", num_memory_tokens=8, max_document_length=128)
    if layers is not None:
        compressor_config = _config(GENERATOR_SHAPES[shape], tokenizer, attn)
        compressor_config.num_hidden_layers = layers
        compressor_tokenizer = tokenizer
        config = ScaleDownConfig(compressor_type="n_layers", num_compressor_layers=layers, **common)
    else:
        compressor_tokenizer = _word_level_tokenizer("encoder")
        compressor_config = _config(ENCODER_SHAPES["tiny" if shape == "tiny" else compressor], compressor_tokenizer, attn)
        config = ScaleDownConfig(compressor_type="encoder", compressor_name_or_path=f"random-{compressor}", **common)
    with torch.device(device):
        compressor_model = AutoModel.from_config(compressor_config, dtype=torch.bfloat16)
        model = ScaleDownForCausalLM(config, generator=generator, compressor=compressor_model,
                                     generator_tokenizer=tokenizer, compressor_tokenizer=compressor_tokenizer)
    for parameter in model.parameters():  # master weights of what trains in float32, as scaledown-train does
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train()


def make_batch(model, batch_size: int, documents: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    protocol = Protocol(query_tokens=32, document_tokens=128, num_documents=documents)
    questions, docs = synthetic_requests(model.generator_tokenizer, protocol, batch_size, seed=seed)
    answers = [synthetic_text(model.generator_tokenizer, 32, rng) for _ in range(batch_size)]
    return model.input_builder(questions, docs, answers=answers)


def parameter_counts(model) -> tuple[int, int]:
    """(generator, compressor) weights that multiply activations; counted before FSDP shards them."""
    generator = sum(p.numel() for n, p in model.generator.named_parameters() if "embed_tokens" not in n)
    compressor = sum(p.numel() for n, p in model.compressor.named_parameters() if "embed" not in n)
    return generator, compressor


def step_flops(counts: tuple[int, int], batch: dict) -> float:
    """Model FLOPs of one training step: 6 per parameter per token where weights train, 4 where they are frozen
    (the backward still propagates activations through them); attention scores are left out, as in MFU."""
    generator_tokens = int(batch["attention_mask"].sum())
    compressor_tokens = int(batch["compressor_attention_mask"].sum())
    return 4 * counts[0] * generator_tokens + 6 * counts[1] * compressor_tokens


def measure(accelerator, model, optimizer, counts, batch_size: int, documents: int, steps: int) -> dict:
    device = accelerator.device
    plain = accelerator.unwrap_model(model)
    batch = make_batch(plain, batch_size, documents, seed=accelerator.process_index)  # each process its own examples
    batch = {k: v.to(device) for k, v in batch.items()}

    def step():
        with accelerator.autocast():
            loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, kernels, optimizer state, DDP buckets)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    times = []
    for _ in range(steps):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    processes = accelerator.num_processes
    tokens = int(batch["attention_mask"].sum() + batch["compressor_attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peak = accelerator.gather(torch.tensor([peak], device=device)).max().item()  # the fullest GPU decides what fits
    return {
        "batch_size": batch_size,
        "processes": processes,
        "seconds_per_step": seconds,
        "examples_per_s": processes * batch_size / seconds,
        "tokens_per_s": processes * tokens / seconds,
        "model_tflops_per_s": processes * step_flops(counts, batch) / seconds / 1e12,
        "peak_memory_gb": peak if device.type == "cuda" else None,
    }


def run_compressor(
    accelerator, shape: str, compressor: str, batch_sizes: list[int], documents: int, steps: int, attn: str
):
    model = build_model(shape, compressor, accelerator.device, attn)
    decay = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}  # before FSDP flattens them
    compressor_lr = DEFAULT_COMPRESSOR_LR[model.config.compressor_type]
    counts = parameter_counts(model)
    fused = accelerator.device.type == "cuda"

    def optimizer_for(model):
        return torch.optim.AdamW(parameter_groups(model, 1e-4, compressor_lr, 0.1, decay), fused=fused)

    if accelerator.is_fsdp2:  # prepare swaps each parameter for its shard and points the optimizer at the shards
        model, optimizer = accelerator.prepare(model, optimizer_for(model))
    else:
        upcast_for_fsdp1(model, accelerator)  # as scaledown-train does
        model = accelerator.prepare(model)  # FSDP1 flattens the model before the optimizer may see its parameters
        optimizer = accelerator.prepare(optimizer_for(model))
    best = None
    for batch_size in batch_sizes:  # ascending: keep the largest that fits
        try:
            best = measure(accelerator, model, optimizer, counts, batch_size, documents, steps)
            accelerator.print(f"  {compressor} batch {batch_size}: {best['examples_per_s']:.2f} examples/s", flush=True)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            accelerator.print(f"  {compressor} batch {batch_size}: out of memory", flush=True)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            break
    del model, optimizer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mistral-7b", choices=sorted(GENERATOR_SHAPES))
    parser.add_argument("--compressor", default="8l,modernbert-base")
    parser.add_argument("--batch_sizes", default="1,4,16,32,64,96,128,192,256")  # stops at the first OOM
    parser.add_argument("--documents", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    rows = []
    for compressor in args.compressor.split(","):
        result = run_compressor(accelerator, args.shape, compressor, [int(b) for b in args.batch_sizes.split(",")],
                                args.documents, args.steps, args.attn)
        if result:
            result["mfu"] = result["model_tflops_per_s"] * 1e12 / (peak * accelerator.num_processes) if peak else None
            rows.append({"compressor": compressor, **result})
    if not accelerator.is_main_process:
        return
    header = (
        "| compressor | GPUs | batch/device | examples/s | tokens/s | model TFLOP/s | MFU | peak GB (fullest GPU) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [header] + [
        f"| {r['compressor']} | {r['processes']} | {r['batch_size']} | {r['examples_per_s']:.2f} | "
        f"{r['tokens_per_s']:.0f} | "
        f"{r['model_tflops_per_s']:.1f} | {r['mfu'] if r['mfu'] is None else format(r['mfu'], '.1%')} | "
        f"{r['peak_memory_gb'] if r['peak_memory_gb'] is None else format(r['peak_memory_gb'], '.1f')} |"
        for r in rows
    ]
    strategy = accelerator.distributed_type.value.lower()
    table = (f"Training throughput, {args.shape} shape, {accelerator.num_processes} x {gpu} ({strategy}), "
             f"{args.documents} docs x 128 tokens, LoRA r16, bf16\n\n" + "\n".join(lines))  # fmt: skip
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    name = f"train_throughput_{args.shape}_{accelerator.num_processes}x{gpu.replace(' ', '_')}_{strategy}"
    with open(os.path.join(args.output_dir, name + ".json"), "w") as handle:
        json.dump({"shape": args.shape, "gpu": gpu, "strategy": strategy, "rows": rows}, handle, indent=1)
    with open(os.path.join(args.output_dir, name + ".md"), "w") as handle:
        handle.write(table + "\n")

if __name__ == "__main__":
    main()
