import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ANSWERS, DOCUMENTS, QUESTIONS

from scaledown import ScaleDownConfig, ScaleDownForCausalLM
from scaledown.toy_models import minilm_path

HIDDEN = 64


def _batch(model, answers=ANSWERS, rerank=None):
    return model.input_builder(QUESTIONS, DOCUMENTS, answers=answers, rerank_scores=rerank)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_shapes_for_each_generator_family(make_model, arch):
    model = make_model(arch)
    batch = _batch(model)
    n_docs = sum(len(d) for d in DOCUMENTS)
    assert batch["compressor_input_ids"].shape[0] == n_docs
    out = model(**batch)
    n_label_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert out.logits.shape == (n_label_tokens, model.generator.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.rerank_scores is None and out.rerank_loss is None

    compressed = model.compress(QUESTIONS, DOCUMENTS)
    assert [tuple(e.shape) for e in compressed.embeddings] == [(3, 8, HIDDEN), (1, 8, HIDDEN), (0, 8, HIDDEN)]
    assert compressed.rerank_scores is None

    no_labels = model(**model.input_builder(QUESTIONS, DOCUMENTS))
    assert no_labels.logits.shape[:2] == no_labels.logits.shape[:2]
    assert no_labels.loss is None


def test_compressor_is_an_independent_trimmed_copy(make_model, generator_dirs):
    model = make_model("mistral", num_compressor_layers=2)
    assert len(model.compressor.layers) == 2
    assert isinstance(model.compressor.norm, torch.nn.Identity)
    assert not hasattr(model.compressor, "lm_head")
    gen_layer = model.generator.get_decoder().layers[0].mlp.down_proj.base_layer.weight
    comp_layer = model.compressor.layers[0].mlp.down_proj.weight
    assert torch.equal(gen_layer, comp_layer)  # copied from the generator's checkpoint...
    assert gen_layer.data_ptr() != comp_layer.data_ptr()  # ...not shared
    assert all(p.requires_grad for p in model.compressor.parameters())


def test_compression_depends_on_the_query(make_model):
    model = make_model()
    doc = [["William Shakespeare wrote Hamlet."]]
    a = model.compress(["Who wrote Hamlet?"], doc).embeddings[0]
    b = model.compress(["When was it written?"], doc).embeddings[0]
    assert not torch.allclose(a, b)
    # ... and not on other documents of the batch (each document is compressed alone).
    c = model.compress(["Who wrote Hamlet?"], [["William Shakespeare wrote Hamlet.", "Paris."]]).embeddings[0][:1]
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_memory_tokens_are_distinct(make_model):
    model = make_model()
    ids = model.input_builder.compressor_memory_ids
    assert len(set(ids)) == model.config.num_memory_tokens
    rows = model.compressor.get_input_embeddings().weight[ids]
    assert torch.cdist(rows, rows).fill_diagonal_(1.0).min() > 0


def test_each_document_lands_at_its_own_placeholders(make_model):
    model = make_model()
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    compressed, _ = model.compress_tensors(batch["compressor_input_ids"], batch["compressor_attention_mask"])
    # Make every vector identify its document and slot, so any shift is visible.
    marked = torch.zeros_like(compressed)
    for doc in range(compressed.shape[0]):
        for slot in range(compressed.shape[1]):
            marked[doc, slot] = doc * 100 + slot
    embeds = model.embed_generator_inputs(batch["input_ids"], marked)
    builder = model.input_builder
    doc = 0
    for row in range(len(QUESTIONS)):
        ids = batch["input_ids"][row].tolist()
        positions = [i for i, t in enumerate(ids) if t == builder.memory_placeholder_id]
        assert len(positions) == len(DOCUMENTS[row]) * 8
        for k, position in enumerate(positions):
            expected = (doc + k // 8) * 100 + k % 8
            assert torch.all(embeds[row, position] == expected)
            if k % 8 == 7:  # a run of placeholders is closed by the separator token
                assert ids[position + 1] == builder.separator_id
                torch.testing.assert_close(embeds[row, position + 1], model.new_token_embeddings.weight[1])
        doc += len(DOCUMENTS[row])
    plain = ~torch.isin(batch["input_ids"], torch.tensor([builder.memory_placeholder_id, builder.separator_id]))
    base = model.generator.get_input_embeddings()(batch["input_ids"].masked_fill(~plain, 0))
    torch.testing.assert_close(embeds[plain], base[plain])


def test_placeholder_count_mismatch_is_an_error(make_model):
    model = make_model()
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    with pytest.raises(ValueError, match="placeholders"):
        model.embed_generator_inputs(batch["input_ids"], torch.zeros(2, 8, HIDDEN))


def test_gradients_reach_trainable_parts_only(make_model, modernbert_dir):
    for model in (
        make_model(enable_reranking=True),
        make_model(compressor_type="modernbert", compressor_name_or_path=modernbert_dir),
    ):
        model.train()
        out = model(**_batch(model, rerank=[[1.0, 0.0, 0.5], [2.0], []]))
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("compressor."))
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        assert grads["new_token_embeddings.weight"].abs().sum() > 0
        if model.connector is not None:
            assert all(grads[n].abs().sum() > 0 for n, _ in model.connector.named_parameters(prefix="connector"))
        if model.rerank_head is not None:
            assert grads["rerank_head.weight"].abs().sum() > 0
        frozen = [n for n, p in model.named_parameters() if n.startswith("generator.") and "lora_" not in n]
        assert frozen and all(grads[n] is None for n in frozen)
        assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)


def test_lora_starts_as_identity_and_has_paper_settings(make_model, generator_dirs):
    from transformers import AutoModelForCausalLM

    model = make_model()
    lora_layer = model.generator.get_decoder().layers[0].self_attn.q_proj
    assert lora_layer.r["generator"] == 16 and lora_layer.scaling["generator"] == 2.0
    assert isinstance(lora_layer.lora_dropout["generator"], torch.nn.Dropout)
    assert lora_layer.lora_dropout["generator"].p == pytest.approx(0.1)
    base = AutoModelForCausalLM.from_pretrained(generator_dirs["llama"]).eval()
    ids = torch.tensor([[1, 20, 30, 40]])
    torch.testing.assert_close(model.generator(ids).logits, base(ids).logits)


def test_rerank_head_and_loss(make_model):
    model = make_model(enable_reranking=True)
    teacher = [[1.0, 0.0, 0.5], [2.0], []]
    batch = _batch(model, rerank=teacher)
    assert (batch["compressor_input_ids"] == model.input_builder.rerank_token_id).sum() == 4
    out = model(**batch)
    assert out.rerank_scores.shape == (4,)
    expected = torch.nn.functional.mse_loss(out.rerank_scores, torch.tensor([1.0, 0.0, 0.5, 2.0]))
    torch.testing.assert_close(out.rerank_loss, expected)
    torch.testing.assert_close(out.loss, out.generation_loss + 0.05 * out.rerank_loss)
    scores = model.compress(QUESTIONS, DOCUMENTS).rerank_scores
    assert [s.shape[0] for s in scores] == [3, 1, 0]


def test_left_padding_does_not_change_answers(make_model):
    model = make_model("qwen2")
    alone = model.generate_from_documents(QUESTIONS[1:2], DOCUMENTS[1:2], max_new_tokens=6)
    batched = model.generate_from_documents(QUESTIONS, DOCUMENTS, max_new_tokens=6)
    assert batched[1] == alone[0]
    single_logits = model(**model.input_builder(QUESTIONS[1:2], DOCUMENTS[1:2])).logits[0, -1]
    batch_logits = model(**model.input_builder(QUESTIONS, DOCUMENTS)).logits[1, -1]
    torch.testing.assert_close(single_logits, batch_logits, atol=1e-4, rtol=1e-4)


def test_query_and_document_have_separate_budgets(make_model):
    model = make_model(max_query_length=4, max_document_length=6)
    builder = model.input_builder
    long_query = "who " * 50
    with pytest.warns(UserWarning, match="max_document_length"):
        batch = builder.compressor_inputs([long_query], [["doc " * 50]])
    row = batch["compressor_input_ids"][0].tolist()
    fixed = len(builder.compressor_prefix_ids) + len(builder.query_marker_ids) + len(builder.document_marker_ids)
    assert len(row) == fixed + 4 + 6 + 8
    short = builder.compressor_inputs(["who"], [["doc " * 50]])["compressor_input_ids"][0]
    assert short.shape[0] < len(row)  # the short query did not hand its budget over to the document
    assert row[-8:] == builder.compressor_memory_ids


def test_truncation_warns_once_and_never_fails(make_model):
    model = make_model(max_document_length=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = model.generate_from_documents(["q?"] * 2, [["long " * 40, "long " * 40]] * 2, max_new_tokens=2)
        model.generate_from_documents(["q?"], [["long " * 40]], max_new_tokens=2)
    assert len(answers) == 2
    assert sum("max_document_length" in str(w.message) for w in caught) == 1


def test_generation_prompt_uses_chat_template(make_model):
    model = make_model()
    text = model.generator_tokenizer.decode(model.input_builder(["Q?"], [["d"]])["input_ids"][0])
    assert text.startswith("<s><|system|>") and "Background:" in text and text.endswith("<|assistant|>")
    assert "Question: Q?" in text


def test_labels_cover_answer_and_eos_only(make_model):
    model = make_model()
    batch = model.input_builder(["Who?"], [["doc"]], answers=["Shakespeare"])
    labels = batch["labels"][0]
    kept = labels[labels != -100].tolist()
    answer_ids = model.generator_tokenizer("Shakespeare", add_special_tokens=False)["input_ids"]
    assert kept == answer_ids + [model.generator_tokenizer.eos_token_id]
    assert batch["input_ids"][0, -len(kept) :].tolist() == kept


@pytest.mark.parametrize("compressor", ["n_layers", "modernbert", "minilm"])
def test_save_load_round_trip(make_model, modernbert_dir, tmp_path, compressor):
    options = {"enable_reranking": True}
    if compressor == "modernbert":
        options.update(compressor_type="modernbert", compressor_name_or_path=modernbert_dir)
    elif compressor == "minilm":
        options.update(compressor_type="encoder", compressor_name_or_path=minilm_path())
    model = make_model(**options)
    with torch.no_grad():  # move the trained parts away from their initial values
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "modeling_scaledown.py", "configuration_scaledown.py"} <= files
    assert "compressor_tokenizer/tokenizer_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    # The default checkpoint holds no base generator weight.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert not [k for k in keys if k.startswith("generator.") and "lora_" not in k]

    loaded = ScaleDownForCausalLM.from_pretrained(tmp_path)
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    expected, got = model(**batch), loaded(**batch)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.rerank_scores, expected.rerank_scores)


def test_merged_save_needs_no_base(make_model, tmp_path):
    model = make_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    model.save_pretrained(tmp_path, merge_generator=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["generator_subfolder"] == "generator" and config["lora_r"] == 0
    assert (tmp_path / "generator" / "model.safetensors").is_file()
    config_path = tmp_path / "config.json"
    config["generator_name_or_path"] = "/nonexistent/base"  # prove the base is not fetched
    config_path.write_text(json.dumps(config))
    loaded = ScaleDownForCausalLM.from_pretrained(tmp_path)
    batch = model.input_builder(QUESTIONS, DOCUMENTS)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)
    assert model.config.lora_r == 16  # the live model keeps its adapters


def test_auto_model_remote_code_in_fresh_process(make_model, tmp_path):
    model = make_model("mistral", enable_reranking=True)
    model.save_pretrained(tmp_path / "ckpt")
    expected = model.generate_from_documents(QUESTIONS, DOCUMENTS, max_new_tokens=8)
    script = f"""
import json, sys
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModel.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
assert type(model).__name__ == "ScaleDownForCausalLM"
assert "scaledown" not in sys.modules  # the checkpoint's own code, not the installed package
other = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
print(json.dumps(model.generate_from_documents({QUESTIONS!r}, {DOCUMENTS!r}, max_new_tokens=8)))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_zero_documents_everywhere(make_model):
    model = make_model(enable_reranking=True)
    answers = model.generate_from_documents(["a?", "b?"], [[], []], max_new_tokens=3)
    assert len(answers) == 2
    out = model(**model.input_builder(["a?"], [[]], answers=["x"]))
    assert torch.isfinite(out.loss)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_questions_and_documents_of_different_lengths(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="one list of documents per question"):
        model.generate_from_documents(["a?", "b?"], [["d"]])


def test_empty_question(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="Question 1 is empty"):
        model.compress(["a?", "   "], [["d"], ["e"]])


def test_documents_not_a_list_of_lists(make_model):
    model = make_model()
    with pytest.raises(TypeError, match=r"wrap a single document as \[document\]"):
        model.generate_from_documents(["a?"], ["just a string"])


def test_unknown_compressor_type():
    with pytest.raises(ValueError, match="Unknown compressor_type 'bert-ish'"):
        ScaleDownConfig(compressor_type="bert-ish")


def test_too_many_compressor_layers(generator_dirs):
    config = ScaleDownConfig(generator_name_or_path=generator_dirs["llama"], num_compressor_layers=7)
    with pytest.raises(ValueError, match=r"larger than the generator's depth \(3 layers\)"):
        ScaleDownForCausalLM(config)


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "tokenizer_config.json", "compressor_tokenizer/tokenizer_config.json"]
)
def test_checkpoint_missing_a_file(make_model, tmp_path, missing):
    model = make_model()
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing.replace("/", ".")):
        ScaleDownForCausalLM.from_pretrained(tmp_path)


def test_follows_model_dtype(make_model):
    model = make_model().to(torch.bfloat16)
    compressed = model.compress(QUESTIONS[:1], DOCUMENTS[:1]).embeddings[0]
    assert compressed.dtype == torch.bfloat16
    assert len(model.generate_from_documents(QUESTIONS[:1], DOCUMENTS[:1], max_new_tokens=2)) == 1


def test_input_embeddings_are_the_generators_and_nothing_gets_tied(make_model, tmp_path):
    """accelerate's FSDP2 asks for the input embeddings; transformers must still find no output head to tie to them."""
    model = make_model("mistral")
    assert model.get_input_embeddings() is model.generator.get_input_embeddings()
    assert model.get_output_embeddings() is None
    model.save_pretrained(tmp_path)
    generator = ScaleDownForCausalLM.from_pretrained(tmp_path).generator
    assert generator.get_output_embeddings().weight.data_ptr() != generator.get_input_embeddings().weight.data_ptr()
