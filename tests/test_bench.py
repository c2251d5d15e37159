import json
import random

import pytest
import torch

from scaledown.evaluation import bench
from scaledown.evaluation.flops import (
    Hardware,
    Phase,
    TransformerShape,
    compressor_phase,
    detect_hardware,
    generator_phases,
    hardware_from_device_name,
)
from scaledown.fast_generation import FLEX_TILES_SUPPORTED, StaticGreedyGenerator, stack_projections

# hidden 8, MLP 16, 2 layers, 2 heads of 4 dims, 1 KV head, vocabulary 10.
TINY = dict(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=10,
)


def test_shape_is_read_from_configs():
    shape = bench.preset_shape(dict(model_type="llama", **TINY))
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (2, 2, 1, 4)
    assert shape.causal and shape.mlp_matrices == 3
    encoder = bench.preset_shape(bench.ENCODER_SHAPES["modernbert-base"])
    assert not encoder.causal and encoder.mlp_matrices == 3 and encoder.head_dim == 64  # GeGLU: 3 h x i matrices
    bert = bench.preset_shape(
        dict(
            model_type="bert",
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=10,
        )
    )
    assert not bert.causal and bert.mlp_matrices == 2


def test_generator_flops_and_bytes_by_hand():
    shape = bench.preset_shape(dict(model_type="llama", **TINY))
    # Per token and layer: q 2*8*8 + k 2*8*4 + v 2*8*4 + o 2*8*8 + MLP 2*3*8*16 = 128 + 64 + 64 + 128 + 768 = 1152.
    per_token = 2 * 1152
    # Attention: (2 for QK + 2 for AV) FLOPs x 2 heads x 4 dims = 32 per (query, key) pair and layer; 2 layers.
    per_pair = 2 * 32
    lm_head = 2 * 8 * 10
    prefill, decode = generator_phases(shape, prompt_lengths=[3], new_tokens=2, bytes_per_value=2)
    # Prefill of 3 tokens: causal pairs 1 + 2 + 3 = 6; logits at the last position only.
    assert prefill.flops == 3 * per_token + 6 * per_pair + lm_head == 7456
    # One decoding step (the first new token came from the prefill): 1 token attending to 4 positions.
    assert decode.step_flops == [per_token + 4 * per_pair + lm_head] == [2720]
    # Bytes: weights (2 layers x 576 + LM head 80) x 2 bytes = 2464; KV per token: 2 layers x (K, V) x 4 dims x 2 bytes.
    weights, kv = (2 * 576 + 80) * 2, 2 * 2 * 4 * 2
    assert prefill.bytes == weights + 3 * kv == 2560
    assert decode.bytes == weights + (4 + 1) * kv == 2624  # read the 4-token cache, write one entry


def test_compressor_flops_by_hand():
    one_layer = bench.preset_shape(dict(model_type="llama", **{**TINY, "num_hidden_layers": 1}))
    n_layers = compressor_phase(one_layer, row_lengths=[3, 5], num_memory_tokens=2, generator_hidden_size=8)
    # 8 tokens x 1152 FLOPs, plus causal pairs (6 + 15) x 32 FLOPs; no LM head in a compressor.
    assert n_layers.flops == 1152 * 8 + 32 * 21 == 9888
    assert n_layers.bytes == 576 * 2

    encoder = TransformerShape(8, 16, 1, 2, 2, 4, 10, mlp_matrices=2, causal=False)
    phase = compressor_phase(
        encoder, [3], num_memory_tokens=2, generator_hidden_size=4, connector_hidden_size=6, rerank_head=True
    )
    # Layer weights: q, k, v, o 4 x 8 x 8 = 256, MLP 2 x 8 x 16 = 256 -> 512; bidirectional pairs 3 x 3 = 9;
    # connector 8x6 + 6x4 = 72 weights on 2 memory vectors; rerank head 8 weights on one token.
    assert phase.flops == 2 * 512 * 3 + 32 * 9 + 2 * 72 * 2 + 2 * 8 == 3664
    assert phase.bytes == (512 + 72 + 8) * 2


def test_roofline_takes_the_slower_bound_of_each_step():
    phase = Phase("mixed")
    phase.add_step(flops=100, bytes_moved=10)  # compute bound: 10 s
    phase.add_step(flops=10, bytes_moved=100)  # memory bound: 10 s
    assert phase.best_seconds(Hardware("toy", peak_flops=10, peak_bandwidth=10)) == 20


def test_mistral_shape_reproduces_the_papers_flops():
    """OSCAR Table 1 (batch 1, 128 + 10 x 128 tokens, 32 generated): 20.33 TF uncompressed, 3.49 compressed generation,
    3.04 / 4.87 TF for the 5 / 8 layer compressors counted over 10 x (128 + 8) tokens."""
    mistral = bench.preset_shape(bench.GENERATOR_SHAPES["mistral-7b"])

    def total(phases):
        return sum(p.flops for p in phases) / 1e12

    assert total(generator_phases(mistral, [1408], 32)) == pytest.approx(20.33, rel=0.03)
    assert total(generator_phases(mistral, [208], 32)) == pytest.approx(3.49, rel=0.05)
    for layers, paper in ((5, 3.04), (8, 4.87)):
        compressor = TransformerShape(**{**mistral.__dict__, "num_layers": layers})
        paper_rows, honest_rows = [136] * 10, [128 + 136] * 10
        assert compressor_phase(compressor, paper_rows, 8, 4096).flops / 1e12 == pytest.approx(paper, rel=0.03)
        assert (
            compressor_phase(compressor, honest_rows, 8, 4096).flops
            > 1.9 * compressor_phase(compressor, paper_rows, 8, 4096).flops
        )


def test_hardware_detection():
    assert hardware_from_device_name("NVIDIA H100 80GB HBM3").name == "H100-SXM"
    assert hardware_from_device_name("NVIDIA H100 PCIe").name == "H100-PCIe"
    assert hardware_from_device_name("NVIDIA H200").peak_bandwidth == 4.8e12
    assert hardware_from_device_name("NVIDIA H100 80GB HBM3").peak_flops == pytest.approx(989e12)
    assert hardware_from_device_name("Some CPU") is None
    assert detect_hardware("cpu") is None
    custom = detect_hardware("cpu", peak_tflops=2.0, peak_bandwidth_tbs=0.5)
    assert (custom.peak_flops, custom.peak_bandwidth) == (2e12, 0.5e12)
    with pytest.raises(ValueError):
        detect_hardware("cpu", peak_tflops=2.0)


def test_synthetic_texts_have_exact_token_counts():
    tokenizer = bench._word_level_tokenizer("decoder")
    text = bench.synthetic_text(tokenizer, 37, random.Random(0))
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 37
    assert bench.compressor_layers("8l") == 8 and bench.compressor_layers("modernbert-base") is None
    with pytest.raises(ValueError):
        bench.compressor_layers("bert-large")


def test_bench_command_on_tiny_shapes(tmp_path):
    output_dir = tmp_path / "bench"
    exit_code = bench.main(
        [
            "--shape",
            "tiny",
            "--compressor",
            "2l,modernbert-base",
            "--batch_sizes",
            "1,max",
            "--max_batch_size",
            "2",
            "--query_tokens",
            "12",
            "--document_tokens",
            "16",
            "--num_documents",
            "2",
            "--new_tokens",
            "3",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--peak_tflops",
            "1",
            "--peak_bandwidth_tbs",
            "0.1",
            "--output_dir",
            str(output_dir),
        ]
    )
    assert exit_code == 0
    report = json.loads((output_dir / "bench_tiny_2l-modernbert-base_generate.json").read_text())
    png = (output_dir / "bench_tiny_2l-modernbert-base_generate.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    results = report["results"]
    assert [(r["compressor"] or r["side"], r["batch"], r["batch_size"]) for r in results] == [
        ("uncompressed", "1", 1),
        ("uncompressed", "max", 2),
        ("2l", "1", 1),
        ("2l", "max", 2),
        ("modernbert-base", "1", 1),
        ("modernbert-base", "max", 2),
    ]
    for record in results:
        assert "error" not in record
        assert record["ms_per_query"] > 0 and record["seconds_median"] > 0
        assert record["tflops_per_query"]["honest"] > 0 and record["gb_moved_per_query"] > 0
        assert record["roofline_ms_per_query"] > 0 and 0 < record["roofline_fraction"]
    for record in results[2:]:
        assert record["compression_ms_per_query"] > 0
        assert record["compression_path"] == "whole compressor"  # beside generate, the model's own compression
        tokens = record["compressor_tokens_per_document"]
        assert tokens["paper"] == 16 + 8 and tokens["honest"] > tokens["paper"] + 12  # the query is in the honest count
        assert record["tflops_per_query"]["honest"] > record["tflops_per_query"]["paper"]
        speedup = record["speedup"]
        assert speedup["measured"] > 0 and speedup["roofline"] > 0 and speedup["flops_paper"] > speedup["flops_honest"]
    # The compressed prompt holds 8 memory vectors + 1 separator per document instead of the document text.
    assert results[2]["generator_prompt_tokens"] < results[0]["generator_prompt_tokens"]
    assert report["settings"]["protocol"] == {
        "query_tokens": 12,
        "document_tokens": 16,
        "num_documents": 2,
        "new_tokens": 3,
        "memory_tokens": 8,
    }


def test_largest_batch_on_cpu_is_the_requested_maximum():
    assert bench.largest_batch_that_fits(side=None, requests=None, max_batch_size=7, device=torch.device("cpu")) == 7


def test_largest_batch_search_steps_down_through_sizes_above_256(monkeypatch):
    tried = []

    def fits(side, requests, batch_size, device):
        tried.append(batch_size)
        return batch_size <= 640

    monkeypatch.setattr(bench, "fits", fits)
    found = bench.largest_batch_that_fits(side=None, requests=None, max_batch_size=900, device=torch.device("cuda"))
    assert (found, tried) == (640, [900, 768, 640])


def test_bench_command_on_a_checkpoint(make_model, tmp_path):
    make_model("llama").save_pretrained(tmp_path / "checkpoint")
    bench.main(
        [
            "--checkpoint",
            str(tmp_path / "checkpoint"),
            "--batch_sizes",
            "1",
            "--query_tokens",
            "8",
            "--document_tokens",
            "8",
            "--num_documents",
            "2",
            "--new_tokens",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--output_dir",
            str(tmp_path / "bench"),
        ]
    )
    report = json.loads((tmp_path / "bench" / "bench_checkpoint_2l_generate.json").read_text())
    uncompressed, compressed = report["results"]
    assert (uncompressed["side"], compressed["compressor"]) == ("uncompressed", "2l")
    assert compressed["speedup"]["measured"] > 0 and compressed["roofline_ms_per_query"] is None  # no peaks on a CPU
    assert report["settings"]["hardware"] is None


def test_max_batch_steps_down_when_repeated_runs_run_out_of_memory(monkeypatch):
    import sys

    monkeypatch.setattr(bench, "largest_batch_that_fits", lambda *args: 128)  # one run fitted at 128
    handling = []  # at each freeing of memory: was an exception (whose frames hold the failed run's tensors) alive?
    monkeypatch.setattr(bench, "_free_memory", lambda device: handling.append(sys.exc_info()[0] is not None))

    def measure(side, requests, batch_size, label, *rest):
        if batch_size > 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"ms_per_query": 1.0, "batch_size": batch_size}

    monkeypatch.setattr(bench, "measure", measure)
    common = dict(requests=None, max_batch_size=128, device=torch.device("cpu"), warmup=0, repeats=1, hardware=None)
    side = type("FakeSide", (), {"name": "uncompressed"})()
    records = bench.bench_side(side, batch_labels=["max", "96"], log=lambda message: None, **common)
    assert records["max"]["batch_size"] == 64
    assert records["96"]["error"] == "out of memory"  # a fixed batch size is reported, not changed
    assert handling and not any(handling)


def tiny_static_argv(tmp_path, *flags, compressor="2l", batch_sizes="2", num_documents=1, new_tokens=2, repeats=1):
    """The bench's command line on the tiny shape with the static engine on CPU, 8-token queries and documents."""
    return ["--shape", "tiny", "--compressor", compressor, "--batch_sizes", batch_sizes, "--engine", "static",
            "--query_tokens", "8", "--document_tokens", "8", "--num_documents", str(num_documents),
            "--new_tokens", str(new_tokens), "--repeats", str(repeats), "--warmup", "0", "--device", "cpu", *flags,
            "--output_dir", str(tmp_path)]  # fmt: skip


def test_static_engine_bench_on_tiny_shapes(tmp_path):
    argv = ["--shape", "tiny", "--compressor", "2l,modernbert-base", "--batch_sizes", "2", "--engine", "static",
            "--query_tokens", "12", "--document_tokens", "16", "--num_documents", "2", "--new_tokens", "3",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output_dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_tiny_2l-modernbert-base_static.json").read_text())
    assert "static KV cache" in report["settings"]["engine"]
    compressed = [r for r in report["results"] if r["side"] == "compressed"]
    assert {r["compressor"] for r in compressed} == {"2l", "modernbert-base"}
    assert all(r["speedup"]["measured"] > 0 and r["compression_ms_per_query"] > 0 for r in compressed)
    assert all(r["shared_prefix_tokens"] == 0 for r in report["results"])  # 1 x prefix < SHARED_PREFIX_MIN_TOKENS
    paths = {r["compressor"]: r["compression_path"] for r in report["results"]}
    modernbert_rows = "last layer on memory rows" if FLEX_TILES_SUPPORTED else "whole compressor"  # transformers 5
    assert paths == {None: None, "2l": "shared query prefix", "modernbert-base": modernbert_rows}


def test_profile_flag_writes_each_sides_kernel_table(tmp_path):
    argv = tiny_static_argv(tmp_path, "--profile", batch_sizes="1,2")
    assert bench.main(argv) == 0
    tables = sorted(path.name for path in tmp_path.glob("*_profile_*.txt"))
    assert tables == [f"bench_tiny_2l_static_profile_{side}_b{batch}.txt" for side in ("2l", "uncompressed")
                      for batch in (1, 2)]  # fmt: skip
    table = (tmp_path / "bench_tiny_2l_static_profile_2l_b2.txt").read_text()
    assert "Self CPU" in table and "aten::" in table  # torch.profiler's operator table
    plain = tmp_path / "plain"
    assert bench.main([arg if arg != str(tmp_path) else str(plain) for arg in argv if arg != "--profile"]) == 0
    assert sorted(path.name for path in plain.iterdir()) == ["bench_tiny_2l_static.json", "bench_tiny_2l_static.png"]


@pytest.mark.parametrize("setting,suffix_kernel", [("1", "masked"), ("off", "auto")])
def test_shared_prefix_flags_reach_both_sides(tmp_path, setting, suffix_kernel):
    argv = tiny_static_argv(tmp_path, "--shared_prefix_min_tokens", setting, "--suffix_attention_kernel", suffix_kernel)
    assert bench.main(argv) == 0
    stem = "bench_tiny_2l_static" + ("_no-shared-prefix" if setting == "off" else "_suffix-masked")
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["settings"]["shared_prefix_min_tokens"] == (None if setting == "off" else 1)
    assert report["settings"]["suffix_attention_kernel"] == suffix_kernel
    shared = {r["side"]: r["shared_prefix_tokens"] for r in report["results"]}
    kernels = {r["side"]: r["suffix_attention_kernel"] for r in report["results"]}
    if setting == "off":
        assert shared == {"uncompressed": 0, "compressed": 0}
        assert kernels == {"uncompressed": None, "compressed": None}
    else:  # the chat template and system prompt open every prompt of both sides
        assert shared["uncompressed"] >= shared["compressed"] > 10
        assert kernels == {"uncompressed": "masked", "compressed": "masked"}  # prompts of equal length: no padding


def test_prefill_last_layer_flag_reaches_the_engine():
    default = bench.static_engine_options(bench.build_parser().parse_args([]))
    whole = bench.static_engine_options(bench.build_parser().parse_args(["--prefill_last_layer", "every_position"]))
    assert default["last_layer_on_last_position"] is True and whole["last_layer_on_last_position"] is False
    assert StaticGreedyGenerator(torch.nn.Linear(2, 2), **whole).last_layer_on_last_position is False


def test_stack_projections_flag_stacks_the_generator_and_n_layers_compressors(tmp_path, monkeypatch, capsys):
    stacked = []

    def stack_and_record(module):
        said = stack_projections(module)
        stacked.append((type(module).__name__, said))
        return said

    monkeypatch.setattr(bench, "stack_projections", stack_and_record)
    argv = tiny_static_argv(tmp_path, "--stack_projections", compressor="2l,modernbert-base")
    assert bench.main(argv) == 0
    layers = bench.GENERATOR_SHAPES["tiny"]["num_hidden_layers"]
    assert [name for name, _ in stacked] == ["LlamaForCausalLM", "LlamaModel"]  # an encoder has nothing to stack
    assert [said for _, said in stacked] == [
        f"query, key and value products of {n} attentions, gate and up products of {n} MLPs" for n in (layers, 2)
    ]
    assert "generator: stacked the query, key and value products" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench_tiny_2l-modernbert-base_static_stacked.json").read_text())
    assert report["settings"]["stack_projections"] is True
    assert all("error" not in record for record in report["results"]) and len(report["results"]) == 3


def test_layer_flags_change_the_generator_then_n_layers_compressors_before_compiling(tmp_path, monkeypatch, capsys):
    from scaledown.fused_layers import fuse_residual_norms

    changed = []  # (what, module class) in call order
    monkeypatch.setattr(bench, "stack_projections", lambda module: changed.append(("stack", type(module).__name__)))
    monkeypatch.setattr(
        bench, "fuse_residual_norms",
        lambda module: changed.append(("fuse", type(module).__name__)) or fuse_residual_norms(module),
    )  # fmt: skip
    monkeypatch.setattr(bench, "compile_elementwise_work", lambda module, mode: changed.append(("compile", "")))
    monkeypatch.setattr(bench, "compile_compressor", lambda model, mode: changed.append(("compile", "")))
    flags = ("--stack_projections", "--fuse_residual_norms", "--compile")
    assert bench.main(tiny_static_argv(tmp_path, *flags, compressor="2l,modernbert-base")) == 0
    generator, compressor = "LlamaForCausalLM", "LlamaModel"  # an encoder compressor has no Llama layers
    assert changed == [("stack", generator), ("fuse", generator), ("compile", ""),
                       ("stack", compressor), ("fuse", compressor), ("compile", ""), ("compile", "")]  # fmt: skip
    layers = bench.GENERATOR_SHAPES["tiny"]["num_hidden_layers"]
    assert f"generator: fused the residual sums of {layers} decoder layers" in capsys.readouterr().out
    stem = "bench_tiny_2l-modernbert-base_static_compiled_stacked_residual-norms"
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["settings"]["fuse_residual_norms"] is True and report["settings"]["stack_projections"] is True


def test_fused_decode_flag_reaches_both_sides(tmp_path, monkeypatch):
    from scaledown import fast_generation

    steps = []  # (the FusedDecode, its generator) of each decode step that went through one

    class RecordedFusedDecode(fast_generation.FusedDecode):
        def __call__(self, *args, **kwargs):
            steps.append((id(self), id(self.generator)))
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(fast_generation, "FusedDecode", RecordedFusedDecode)
    argv = tiny_static_argv(tmp_path, "--fused_decode", new_tokens=3)
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_tiny_2l_static_fused-decode.json").read_text())
    assert report["settings"]["fused_decode"] is True
    assert all("error" not in record for record in report["results"]) and len(report["results"]) == 2
    engines, generators = ({step[i] for step in steps} for i in (0, 1))
    assert len(engines) == 2 and len(generators) == 1  # each side's engine, on the generator both sides share
    options = bench.static_engine_options(bench.build_parser().parse_args(["--fused_decode", "--compile"]))
    assert options["fused_decode"] is True and options["fused_decode_mode"] is None  # torch.compile's default mode


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compile_flag_compiles_the_shared_generator_once_and_each_compressor(tmp_path, monkeypatch, mode):
    compiled = []
    record = compiled.append
    monkeypatch.setattr(bench, "compile_elementwise_work", lambda module, m: record((type(module).__name__, m)))
    monkeypatch.setattr(bench, "compile_compressor", lambda model, m: record((model.config.compressor_type, m)))
    flags = ("--compile", "--compile_mode", mode)
    argv = tiny_static_argv(tmp_path, *flags, compressor="2l,modernbert-base", batch_sizes="1")
    assert bench.main(argv) == 0
    passed = None if mode == "default" else mode  # torch.compile's own default
    assert [name for name, _ in compiled[1:]] == ["n_layers", "encoder"] and compiled[0][0].endswith("ForCausalLM")
    assert {m for _, m in compiled} == {passed}
    stem = "bench_tiny_2l-modernbert-base_static_compiled" + ("" if mode == "default" else "-max-autotune")
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    assert report["settings"]["compile"] is True and report["settings"]["compile_mode"] == mode


def test_encoder_attention_flag_reaches_encoder_compressors_only(tmp_path):
    flags = ("--encoder_attn_implementation", "eager")
    argv = tiny_static_argv(tmp_path, *flags, compressor="2l,modernbert-base", batch_sizes="1")
    assert bench.main(argv) == 0
    report = json.loads((tmp_path / "bench_tiny_2l-modernbert-base_static_encoder-eager.json").read_text())
    assert report["settings"]["encoder_attn_implementation"] == "eager"
    assert report["settings"]["attn_implementation"] == "sdpa"


def test_overlapped_stream_is_timed_per_batch(tmp_path, monkeypatch):
    streams = []
    overlapped = bench.generate_compressed_overlapped

    def recording(model, batches, engine, max_new_tokens, stop_at_eos=True):
        streams.append(len(batches))
        return overlapped(model, batches, engine, max_new_tokens, stop_at_eos=stop_at_eos)

    monkeypatch.setattr(bench, "generate_compressed_overlapped", recording)
    timed = bench.timed_runs
    monkeypatch.setattr(bench, "timed_runs", lambda *a, **k: [0.3 for _ in timed(*a, **k)])  # each run: 0.3 s
    argv = tiny_static_argv(tmp_path, "--overlap_batches", "3", num_documents=2, new_tokens=3, repeats=2)
    assert bench.main(argv) == 0
    assert streams == [3, 3, 3]  # the output check, then two timed runs, each a stream of 3 batches
    report = json.loads((tmp_path / "bench_tiny_2l_static_overlap3.json").read_text())
    assert report["settings"]["overlap_batches"] == 3
    seconds = {r["side"]: r["seconds_median"] for r in report["results"]}
    assert seconds == pytest.approx({"uncompressed": 0.3, "compressed": 0.1})  # a run of 3 batches: 0.1 s a batch


def test_overlap_needs_the_static_engine(make_model):
    with pytest.raises(ValueError, match="--overlap_batches needs --engine static"):
        bench.CompressedSide("2l", make_model(), bench.Protocol(), 2, engine="generate", overlap_batches=2)


def test_set_encoder_attention_leaves_generator_and_n_layers_alone(make_model, modernbert_dir):
    encoder = make_model(compressor_type="modernbert", compressor_name_or_path=modernbert_dir)
    bench.set_encoder_attention(encoder, "eager")
    assert encoder.compressor.config._attn_implementation == "eager"
    assert encoder.generator.config._attn_implementation == "sdpa"
    n_layers = make_model()
    before = n_layers.compressor.config._attn_implementation
    bench.set_encoder_attention(n_layers, "eager")
    assert n_layers.compressor.config._attn_implementation == before


@pytest.mark.skipif(not FLEX_TILES_SUPPORTED, reason="flex attention tiles need transformers 5")
def test_encoder_attention_with_flex_tiles(make_model, modernbert_dir):
    encoder = make_model(compressor_type="modernbert", compressor_name_or_path=modernbert_dir)
    bench.set_encoder_attention(encoder, "flex_attention_block64x32")
    assert encoder.compressor.config._attn_implementation == "flex_attention_block64x32"
    assert encoder.generator.config._attn_implementation == "sdpa"


def _benchmark_script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # the scripts import each other as the command line runs them
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_encoder_attention_kernels_agree_with_their_masks():
    script = _benchmark_script("encoder_attention")
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 40, 16) for _ in range(3))
    for half_window in (None, 5):
        reference = script.encoder_attention(query, key, value, "sdpa", half_window)
        for kernel in ("flex-16", "flex-32x16"):
            got = script.encoder_attention(query, key, value, kernel, half_window)
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    band = script.encoder_attention(query, key, value, "sdpa", 5)
    assert not torch.allclose(band, script.encoder_attention(query, key, value, "sdpa", None))
    # 5 positions, keys at most 1 away: 13 of the 25 pairs; 4 multiply-adds per pair and head dimension
    small = torch.zeros(3, 2, 5, 8)
    assert script.useful_flops(small, 1) == 4 * 3 * 2 * 13 * 8
    assert script.useful_flops(small, None) == 4 * 3 * 2 * 25 * 8


def test_decode_attention_flex_options_parse_and_agree_with_sdpa():
    from scaledown.fast_generation import _flex_decode_attention, grouped_decode_attention

    script = _benchmark_script("decode_attention")
    assert script.parse_kernel_options("BLOCK_N=32/num_stages=3/num_warps=2") == dict(
        BLOCK_N=32, num_stages=3, num_warps=2
    )
    for bad in ("BLOCK_N", "BLOCK_N=x", "=4", "BLOCK_N=32/"):
        with pytest.raises(ValueError, match="NAME=integer"):
            script.parse_kernel_options(bad)
    shape = bench.preset_shape(bench.GENERATOR_SHAPES["tiny"])
    query, key, value, mask = script.decode_inputs(shape, 3, 40, torch.device("cpu"), torch.float32)
    group = shape.num_heads // shape.num_kv_heads
    grouped = query.reshape(3, shape.num_kv_heads, group, shape.head_dim)
    scaling = shape.head_dim**-0.5
    # eager flex (what runs off CUDA) takes the options and must still attend only to the allowed slots
    got = _flex_decode_attention(grouped, key, value, mask[:, 0, 0, :], scaling, kernel_options=dict(BLOCK_N=32))
    reference, _ = grouped_decode_attention(None, query, key, value, mask, scaling=scaling, kernel="sdpa")
    torch.testing.assert_close(got.reshape(3, 1, shape.num_heads, shape.head_dim), reference, rtol=1e-4, atol=1e-5)


def test_overlap_timeline_reads_concurrency_per_stream(tmp_path):
    timeline = _benchmark_script("overlap_timeline")
    kernel = lambda stream, ts, dur: {"cat": "kernel", "ts": ts, "dur": dur, "args": {"stream": stream}}  # noqa: E731
    events = [kernel(7, 0, 10), kernel(7, 5, 15), kernel(7, 30, 10), kernel(58, 15, 20), {"cat": "cpu_op", "ts": 0}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))

    streams = timeline.stream_timeline(str(trace))
    assert streams == {7: [(0, 20), (30, 40)], 58: [(15, 35)]}
    assert timeline.overlap_length(streams[7], streams[58]) == 10  # 15-20 and 30-35
    assert timeline.busy_intervals(streams[7] + streams[58]) == [(0, 40)]


def test_split_decode_rewind_decodes_the_same_tokens_again(make_model):
    script = _benchmark_script("split_decode")
    generator = make_model("llama").generator
    ids = torch.randint(3, generator.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: its positions start after it
    engine = StaticGreedyGenerator(generator, use_cuda_graph=False)
    first = engine.generate(attention_mask=mask, max_new_tokens=6, input_ids=ids)
    state = engine._state
    state.output.fill_(-1)
    state.output[:, 0] = first[:, 0]
    script.rewind(engine, mask)
    dtype = generator.get_input_embeddings().weight.dtype
    for _ in range(5):  # what the decode graph's replays run
        engine._decode_step(state, eos_token_id=None, pad_token_id=0, dtype=dtype)
    assert torch.equal(state.output, first)


def test_goal_table_lists_every_run_and_marks_misses(tmp_path, capsys):
    script = _benchmark_script("goal_table")

    def result(compressor, batch, size, share, ratio=None):
        speedup = None if ratio is None else {"fraction_of_roofline": ratio}
        return dict(compressor=compressor, batch=batch, batch_size=size, roofline_fraction=share, speedup=speedup)

    first = {"results": [result(None, "max", 192, 0.63), result("modernbert-base", "32", 32, 0.55, 0.884),
                         result("modernbert-base", "max", 1024, 0.592, 0.94)]}  # fmt: skip
    second = {"results": [result(None, "max", 192, 0.634), result("5l", "max", 384, 0.867, 1.368)]}
    paths = []
    for index, report in enumerate((first, second)):
        paths.append(tmp_path / f"bench_{index}.json")
        paths[-1].write_text(json.dumps(report))
    script.main([str(path) for path in paths])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| uncompressed | - | - | - (192) | 0.630, 0.634 |"  # uncompressed first, both runs
    assert lines[3] == "| modernbert-base | - | **0.884** | 0.940 (1024) | **0.592** |"
    assert lines[4] == "| 5l | - | - | 1.368 (384) | 0.867 |"
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a scaledown-bench report"):
        script.main([str(tmp_path / "other.json")])


@pytest.mark.parametrize(
    "name",
    ["check_fast_path", "compression_profile", "decode_attention", "decode_levers", "encoder_attention", "gemm_ceiling",
     "goal_table", "overlap_timeline", "phase_times", "split_decode", "suffix_attention", "train_throughput"],
)  # fmt: skip
def test_benchmark_scripts_parse_their_command_lines(name, monkeypatch, capsys):
    """The scripts that extend the bench's parser must not clash with flags it gains later."""
    script = _benchmark_script(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out


def test_decode_levers_times_each_configuration(tmp_path, monkeypatch):
    script = _benchmark_script("decode_levers")
    argv = ["decode_levers.py", "--shape", "tiny", "--device", "cpu", "--cases", "2x12", "--new_tokens", "3",
            "--levers", "stacked+fused,plain", "--repeats", "1", "--warmup", "0", "--output_dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)  # fmt: skip
    script.main()
    report = json.loads((tmp_path / "decode_levers.json").read_text())
    assert [row["lever"] for row in report["rows"]] == ["plain", "stacked+fused"]  # unstacked first, whatever asked
    assert all(row["ms_per_step"] > 0 and (row["batch"], row["prompt_len"]) == (2, 12) for row in report["rows"])
    monkeypatch.setattr("sys.argv", argv[:-2] + ["--levers", "plain,unrolled"])
    with pytest.raises(SystemExit, match="Unknown levers"):
        script.main()


def test_prefill_memory_runs_each_case(tmp_path, monkeypatch):
    script = _benchmark_script("prefill_memory")
    argv = ["prefill_memory.py", "--shape", "tiny", "--device", "cpu", "--cases", "2x12,1x9", "--new_tokens", "3",
            "--stack_projections", "--fuse_residual_norms", "--output_dir", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    script.main()
    report = json.loads((tmp_path / "prefill_memory_stacked+residual-norms.json").read_text())
    assert [(row["batch"], row["prompt_len"]) for row in report["rows"]] == [(2, 12), (1, 9)]
    assert all(row["levers"] == "stacked+residual-norms" and row["peak_gb"] is None for row in report["rows"])  # CPU
