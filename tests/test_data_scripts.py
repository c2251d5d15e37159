"""Data preparation (scaledown.data_scripts), offline: tiny local models stand in for SPLADE-v3, the DeBERTa-v3
cross-encoder and the teacher; the bundled mini corpus and questions are the data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from scaledown.data_scripts import corpus, prepare, queries, rerank, retrieval, shards, teacher
from scaledown.data_scripts.shards import ShardedStep
from scaledown.modeling_scaledown import text_prompt
from scaledown.toy_models import build_causal_lm, build_tokenizer

TRAINING_FIELDS = {"question", "documents", "answer", "rerank_scores"}
KEY_WORDS = ["zeppelin", "kiwifruit"]  # single tokens that the "decided" SPLADE encoder reacts to, and nothing else


def sample_texts() -> list[str]:
    rows = [json.loads(line) for line in open(corpus.SAMPLE_CORPUS, encoding="utf-8")]
    questions = [json.loads(line)["question"] for line in open(queries.SAMPLE_QUERIES, encoding="utf-8")]
    return [f"{row['title']}. {row['text']}" for row in rows] + questions


# ---- tiny models ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_tokenizer():
    tokenizer = build_tokenizer(sample_texts(), vocab_size=800, kind="encoder")
    tokenizer.add_tokens(KEY_WORDS)
    return tokenizer


def bert_mlm_config(tokenizer):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def save_splade(mlm_model, tokenizer, directory) -> str:
    """Wrap a BertForMaskedLM as a SPLADE SparseEncoder (max pooling) and save it as a loadable folder."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.models import Transformer
    from sentence_transformers.sparse_encoder.models import SpladePooling

    mlm_dir = os.path.join(directory, "mlm")
    mlm_model.save_pretrained(mlm_dir)
    tokenizer.save_pretrained(mlm_dir)
    encoder = SparseEncoder(
        modules=[Transformer(mlm_dir, transformer_task="fill-mask"), SpladePooling(pooling_strategy="max")]
    )
    encoder.save(os.path.join(directory, "splade"))
    return os.path.join(directory, "splade")


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory, encoder_tokenizer):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    return save_splade(
        BertForMaskedLM(bert_mlm_config(encoder_tokenizer)), encoder_tokenizer, tmp_path_factory.mktemp("splade")
    )


@pytest.fixture(scope="module")
def decided_splade_dir(tmp_path_factory, encoder_tokenizer):
    """A SPLADE encoder whose only active vocabulary dimensions are the key words, each fired by its own token.

    Every layer's output projection is zeroed and position/type embeddings too, so a token's hidden state depends
    on the token alone. Hidden dimension j is +1 in key word j's embedding and -1 in every other token's; the MLM
    head copies hidden dimension j (through an identity transform) to key word j's vocabulary logit, with a bias
    of -3 that keeps every other logit, and key word j's logit for any other token, below zero.
    """
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(bert_mlm_config(encoder_tokenizer)).eval()
    key_ids = encoder_tokenizer.convert_tokens_to_ids(KEY_WORDS)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for projection in (layer.attention.output.dense, layer.output.dense):
                projection.weight.zero_()
                projection.bias.zero_()
        embeddings = model.bert.embeddings
        embeddings.position_embeddings.weight.zero_()
        embeddings.token_type_embeddings.weight.zero_()
        head = model.cls.predictions
        head.transform.dense.weight.copy_(torch.eye(head.transform.dense.weight.shape[0]))
        head.transform.dense.bias.zero_()
        head.decoder.weight.zero_()
        head.bias.fill_(-3.0)
        for dimension, token_id in enumerate(key_ids):
            embeddings.word_embeddings.weight[:, dimension] = -1.0
            embeddings.word_embeddings.weight[token_id, dimension] = 1.0
            head.decoder.weight[token_id, dimension] = 1.0
    return save_splade(model, encoder_tokenizer, tmp_path_factory.mktemp("decided_splade"))


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, encoder_tokenizer):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=len(encoder_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=encoder_tokenizer.pad_token_id,
    )
    model = DebertaV2ForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias.fill_(3.0)  # logits far above 1: a Sigmoid anywhere would show
    directory = str(tmp_path_factory.mktemp("cross_encoder"))
    model.save_pretrained(directory)
    encoder_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def decoder_tokenizer():
    return build_tokenizer(sample_texts(), vocab_size=1500)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, decoder_tokenizer):
    return build_causal_lm(
        str(tmp_path_factory.mktemp("teacher")), decoder_tokenizer, hidden_size=32, num_layers=2, num_heads=2
    )


@pytest.fixture(scope="module")
def teacher_without_template_dir(tmp_path_factory):
    tokenizer = build_tokenizer(sample_texts(), vocab_size=1500)
    tokenizer.chat_template = None
    return build_causal_lm(
        str(tmp_path_factory.mktemp("plain_teacher")), tokenizer, hidden_size=32, num_layers=2, num_heads=2
    )


@pytest.fixture(scope="module")
def pipeline_flags(splade_dir, cross_encoder_dir, teacher_dir):
    def flags(output_dir, *extra) -> list[str]:
        return [
            "--output_dir", str(output_dir),
            "--corpus", "sample", "--queries", "sample",
            "--retriever", splade_dir, "--reranker", cross_encoder_dir, "--teacher", teacher_dir,
            "--passage_shard_size", "16", "--query_shard_size", "4",
            "--retrieve_top_k", "8", "--max_new_tokens", "6", "--teacher_batch_size", "3",
            "--device", "cpu", "--search_workers", "2",
            *extra,
        ]  # fmt: skip

    return flags


def run_pipeline(flags: list[str]):
    return prepare.run(prepare.build_parser().parse_args(flags))


# ---- corpus and queries --------------------------------------------------------------------------------------------
def test_kilt_articles_are_cut_as_kilt_100w():
    words = [f"w{i}" for i in range(230)]
    paragraphs = [
        "Ada\n",
        " ".join(words[:120]) + "\n",
        "BULLET::::- a bullet item that KILT-100w drops\n",
        "Section::::Later life.\n",
        " ".join(words[120:]),
    ]
    # The Hub dataset nests the paragraphs under "paragraph"; the JSON dump stores them as a list.
    hub_row = {"wikipedia_id": "1", "wikipedia_title": "Ada", "text": {"paragraph": paragraphs}}
    dump_row = {"wikipedia_id": "1", "wikipedia_title": "Ada", "text": paragraphs}
    passages = list(corpus.iter_passages([hub_row], "kilt"))
    assert passages == list(corpus.iter_passages([dump_row], "kilt"))

    stream = ["Ada"] + words[:120] + ["Section:Later", "life."] + words[120:]  # 233 words, no bullet
    assert len(passages) == 3
    for index, passage in enumerate(passages):
        assert passage == "Ada. " + " ".join(stream[index * 100 : (index + 1) * 100])
    assert [len(p.split()) - 1 for p in passages] == [100, 100, 33]  # 100 words each (title word excluded)
    assert not any("BULLET" in p or "::::" in p for p in passages)


def test_user_corpus_rows_are_cut_with_their_titles():
    rows = [{"title": "T", "text": " ".join(["x"] * 150)}, {"text": "no title here"}]
    assert list(corpus.iter_passages(rows, "mine.jsonl")) == [
        "T. " + " ".join(["x"] * 100),
        "T. " + " ".join(["x"] * 50),
        "no title here",
    ]
    assert list(corpus.iter_passages(rows, "mine.jsonl", words_per_passage=0))[0] == "T. " + " ".join(["x"] * 150)
    # The bundled corpus: 42 short documents (one passage each) and two of 145-152 words (two passages each).
    sample = list(corpus.corpus_passages("sample"))
    assert len(sample) == 46 and sample[0].startswith("Paris. Paris is the capital")


def test_kilt_falls_back_to_streaming_the_dump_when_the_hub_repo_is_only_a_script(monkeypatch):
    import datasets

    calls = []

    class FakeStream:
        def select_columns(self, columns):
            calls.append(("select_columns", columns))
            return self

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs))
        if path == corpus.KILT_HUB_ID:
            raise RuntimeError("Dataset scripts are no longer supported, but found kilt_wikipedia.py")
        return FakeStream()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus.load_corpus_rows("kilt")
    assert calls[1] == ("json", {"data_files": corpus.KILT_DUMP_URL, "split": "train", "streaming": True})
    assert calls[2][0] == "select_columns"


def test_bad_corpus_and_query_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file .*missing.jsonl does not exist"):
        list(corpus.corpus_passages(str(tmp_path / "missing.jsonl")))
    with pytest.raises(FileNotFoundError, match="query file .*missing.jsonl does not exist"):
        queries.load_questions(str(tmp_path / "missing.jsonl"))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        list(corpus.corpus_passages(str(empty)))

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(
        json.dumps({"title": "A", "text": "fine"}) + "\n" + json.dumps({"title": "B", "body": "x"}) + "\n"
    )
    with pytest.raises(ValueError, match="Corpus row 1 .* no text in field 'text'.*--corpus_text_field"):
        list(corpus.corpus_passages(str(no_text)))

    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"query": "first?"}) + "\n" + json.dumps({"query": "  "}) + "\n")
    assert queries.load_questions(str(questions), limit=1) == ["first?"]
    with pytest.raises(ValueError, match="Query row 1 .* no question text"):
        queries.load_questions(str(questions))


# ---- retrieval -----------------------------------------------------------------------------------------------------
def test_index_returns_the_passage_the_query_matches(tmp_path, decided_splade_dir):
    texts = [
        "The capital of France is Paris.",
        "A zeppelin is a rigid airship named after Ferdinand von Zeppelin.",
        "Marie Curie was born in Warsaw.",
        "The Nile flows north into the Mediterranean.",
        "The kiwifruit is an edible berry.",
        "Chess is played on a board of 64 squares.",
        "Jupiter is the largest planet.",
    ]
    passage_step = ShardedStep(str(tmp_path / "passages"), {}, extension="").open()
    corpus.write_passage_shards(passage_step, iter(texts), shard_size=3)  # 3 shards: results are merged
    index_step = ShardedStep(str(tmp_path / "index"), {}, extension="").open()
    encoder = retrieval.load_sparse_encoder(decided_splade_dir, device="cpu")
    retrieval.build_index(index_step, passage_step, encoder, batch_size=4)

    # The encoder decides: a text activates exactly the key words it contains, and no other dimension.
    vectors = retrieval.encode(encoder, texts, "document", batch_size=4).toarray()
    zeppelin, kiwifruit = encoder.tokenizer.convert_tokens_to_ids(KEY_WORDS)
    assert [set(np.flatnonzero(vector)) for vector in vectors] == [
        set(),
        {zeppelin},
        set(),
        set(),
        {kiwifruit},
        set(),
        set(),
    ]

    questions = ["Which airship is a zeppelin?", "Where does the kiwifruit grow?", "What is the capital of France?"]
    with retrieval.SparseIndex(index_step, workers=2) as index:  # worker processes, as on a many-core machine
        rows = retrieval.retrieve(questions, encoder, index, top_k_passages=5, batch_size=4)
    assert rows == retrieval.retrieve(questions, encoder, retrieval.SparseIndex(index_step), 5, batch_size=4)
    assert rows[0]["passage_ids"] == [1] and rows[0]["retrieval_scores"][0] > 0
    assert rows[1]["passage_ids"] == [4]
    assert rows[2]["passage_ids"] == []  # no shared term, no score: nothing is retrieved


def test_top_k_orders_by_score_then_id():
    ids, scores = retrieval.top_k(np.array([7, 3, 5, 1]), np.array([0.5, 2.0, 0.5, 0.1], dtype=np.float32), 3)
    assert ids.tolist() == [3, 5, 7] and scores.tolist() == [2.0, 0.5, 0.5]


# ---- reranking -----------------------------------------------------------------------------------------------------
def test_reranking_keeps_the_best_documents_by_raw_logit(tmp_path, cross_encoder_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = list(corpus.corpus_passages("sample"))[:12]
    passage_step = ShardedStep(str(tmp_path / "passages"), {}, extension="").open()
    corpus.write_passage_shards(passage_step, iter(texts), shard_size=5)
    store = corpus.PassageStore(passage_step)
    rows = [
        {"question": "Who wrote Hamlet?", "passage_ids": list(range(12))},
        {"question": "What is the capital of France?", "passage_ids": [3, 0, 7]},
    ]
    cross_encoder = rerank.load_cross_encoder(cross_encoder_dir, device="cpu")
    reranked = rerank.rerank(rows, store, cross_encoder, keep=5, batch_size=4)

    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)
    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder_dir).eval()
    for row, out in zip(rows, reranked):
        with torch.no_grad():
            batch = tokenizer([row["question"]] * len(row["passage_ids"]), store.texts(row["passage_ids"]),
                              padding=True, truncation=True, max_length=256, return_tensors="pt")  # fmt: skip
            logits = model(**batch).logits[:, 0].numpy()
        best = np.argsort(-logits, kind="stable")[: len(out["documents"])]
        assert len(out["documents"]) == min(5, len(row["passage_ids"])) == len(out["rerank_scores"])
        assert out["passage_ids"] == [row["passage_ids"][i] for i in best]
        assert out["documents"] == store.texts(out["passage_ids"])
        np.testing.assert_allclose(out["rerank_scores"], logits[best], rtol=1e-4, atol=1e-5)  # raw logits
        assert out["rerank_scores"] == sorted(out["rerank_scores"], reverse=True)
        assert min(out["rerank_scores"]) > 1.0  # not squashed by a Sigmoid


# ---- teacher -------------------------------------------------------------------------------------------------------
def test_teacher_uses_the_training_prompt_and_batches_like_single_prompts(teacher_dir):
    rows = [
        {"question": "Who wrote Hamlet?", "documents": ["Hamlet is a tragedy by William Shakespeare."]},
        {"question": "Where was Marie Curie born?", "documents": ["Marie Curie was born in Warsaw.", "Paris."] * 2},
        {"question": "What is the capital of France?", "documents": []},
    ]
    model = teacher.TransformersTeacher(teacher_dir, device="cpu", batch_size=3, max_new_tokens=5)
    tokenizer = model.tokenizer
    expected = tokenizer(text_prompt(tokenizer, rows[1]["question"], rows[1]["documents"]), add_special_tokens=False)
    assert teacher.prompt_ids(tokenizer, rows, model.system_prompt)[1] == expected["input_ids"]
    assert tokenizer.decode(expected["input_ids"]).count(tokenizer.bos_token) == 1  # the template's BOS, no second

    batched_answers = model.answer(rows)
    model.batch_size = 1  # no padding at all
    assert batched_answers == model.answer(rows)
    assert all(isinstance(answer, str) for answer in batched_answers)


def test_teacher_without_chat_template_needs_a_prompt_template(tmp_path, teacher_without_template_dir):
    with pytest.raises(ValueError, match="has no chat template.*--prompt_template"):
        teacher.TransformersTeacher(teacher_without_template_dir, device="cpu")

    row = {"question": "Who wrote Hamlet?", "documents": ["Hamlet is a tragedy by William Shakespeare."]}
    plain = teacher.TransformersTeacher(teacher_without_template_dir, device="cpu", prompt_template="plain")
    prompt = plain.tokenizer.decode(teacher.prompt_ids(plain.tokenizer, [row], plain.system_prompt)[0])
    assert prompt.endswith("Question: Who wrote Hamlet?\nAnswer: ")  # the plain layout of text_prompt

    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    templated = teacher.TransformersTeacher(
        teacher_without_template_dir, device="cpu", prompt_template=str(template_file)
    )
    prompt = templated.tokenizer.decode(teacher.prompt_ids(templated.tokenizer, [row], templated.system_prompt)[0])
    assert prompt.startswith("[system] ") and "[user] Background:\nDocument 1: Hamlet" in prompt


# ---- the command: end to end, resumable ------------------------------------------------------------------------------
def read_outputs(output_dir) -> dict[str, bytes]:
    """Every row shard, index array and the training file, by relative path (passage shards by their texts)."""
    found = {}
    for root, _, files in os.walk(output_dir):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, output_dir)
            if name.endswith((".jsonl", ".npy")) or name in ("settings.json", "done.json", "shape.json"):
                found[relative] = open(path, "rb").read()
    passage_shards = json.load(open(os.path.join(output_dir, "passages", "done.json")))["shard_sizes"]
    for index in range(len(passage_shards)):
        shard = corpus.load_passage_shard(os.path.join(output_dir, "passages", shards.shard_name(index)))
        found[f"passages/{index}"] = json.dumps(shard.to_dict()).encode()
    return found


@pytest.fixture(scope="module")
def reference_output(tmp_path_factory, pipeline_flags):
    """One uninterrupted run of the whole pipeline."""
    output_dir = tmp_path_factory.mktemp("reference")
    train_file = run_pipeline(pipeline_flags(output_dir))
    return output_dir, train_file


def test_end_to_end_writes_the_training_format(reference_output):
    output_dir, train_file = reference_output
    rows = [json.loads(line) for line in open(train_file, encoding="utf-8")]
    assert len(rows) == 16  # every bundled question, once, in order
    assert [row["question"] for row in rows] == queries.load_questions("sample")
    for row in rows:
        assert set(row) == TRAINING_FIELDS
        assert isinstance(row["answer"], str)
        assert len(row["documents"]) == len(row["rerank_scores"]) == 5
        assert all(isinstance(doc, str) and doc for doc in row["documents"])
        assert row["rerank_scores"] == sorted(row["rerank_scores"], reverse=True)
    summary = json.load(open(os.path.join(output_dir, "passages", "done.json")))
    assert summary == {"num_passages": 46, "shard_sizes": [16, 16, 14]}


def test_training_command_accepts_the_pipeline_output(reference_output, teacher_dir, tmp_path):
    from scaledown import ScaleDownForCausalLM
    from scaledown.train import main as train_main

    _, train_file = reference_output
    run_dir = tmp_path / "run"
    train_main([
        "--generator_name_or_path", teacher_dir, "--num_layers", "1", "--num_memory_tokens", "4",
        "--train_data", str(train_file), "--output_dir", str(run_dir), "--device", "cpu", "--enable_reranking",
        "--per_device_train_batch_size", "4", "--effective_batch_size", "0", "--gradient_checkpointing", "false",
        "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
    ])  # fmt: skip
    assert ScaleDownForCausalLM.from_pretrained(run_dir).config.enable_reranking


def test_crashes_at_any_step_resume_to_the_uninterrupted_output(
    tmp_path, monkeypatch, pipeline_flags, reference_output
):
    """Crash while publishing shards of each step in turn, and while writing a shard; resume after each crash."""

    class Crash(Exception):
        pass

    flags = pipeline_flags(tmp_path / "run")
    real_publish, real_write = shards.publish, shards.write_jsonl_rows
    # 18 shards in all: passages 3, index 3, retrieved 4, reranked 4, teacher 4. Each run publishes
    # `crash_after` shards and dies on the next: in passages, index, retrieved, reranked, then teacher.
    for crash_after in (1, 4, 3, 3, 4):
        calls = {"count": 0}

        def publish_then_crash(temporary, final, calls=calls, crash_after=crash_after):
            if calls["count"] == crash_after:
                raise Crash(final)  # killed after writing the shard, before making it visible
            calls["count"] += 1
            real_publish(temporary, final)

        monkeypatch.setattr(shards, "publish", publish_then_crash)
        with pytest.raises(Crash):
            run_pipeline(flags)

    def write_half_then_crash(path, rows):
        real_write(path, rows[: len(rows) // 2])
        raise Crash(path)  # killed in the middle of a shard's file

    monkeypatch.setattr(shards, "publish", real_publish)
    monkeypatch.setattr(shards, "write_jsonl_rows", write_half_then_crash)
    with pytest.raises(Crash):
        run_pipeline(flags)
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path / "run" / "teacher"))
    monkeypatch.setattr(shards, "write_jsonl_rows", real_write)
    run_pipeline(flags)

    assert read_outputs(tmp_path / "run") == read_outputs(reference_output[0])


def test_killed_command_resumes_to_the_uninterrupted_output(tmp_path, pipeline_flags, reference_output):
    """The console script, killed with SIGKILL once its first questions are retrieved, then started again."""
    output_dir = tmp_path / "killed"
    flags = pipeline_flags(output_dir)
    script = shutil.which("scaledown-prepare-data")
    command = [script] if script else [sys.executable, "-m", "scaledown.data_scripts.prepare"]
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log_path = tmp_path / "log.txt"
    log = open(log_path, "wb")
    process = subprocess.Popen(command + flags, env=environment, stdout=log, stderr=subprocess.STDOUT)
    first_shard = output_dir / "retrieved" / shards.shard_name(0, ".jsonl")
    deadline = time.time() + 120
    while process.poll() is None and not first_shard.exists() and time.time() < deadline:
        time.sleep(0.02)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
    assert not (output_dir / "train.jsonl").exists()  # it was killed halfway, not at the end

    run_pipeline(flags)
    assert read_outputs(output_dir) == read_outputs(reference_output[0])


def test_resuming_with_other_settings_or_out_of_order_fails_clearly(
    tmp_path, pipeline_flags, reference_output, teacher_without_template_dir
):
    output_dir = reference_output[0]
    with pytest.raises(ValueError, match="other settings \\(top_k differ\\).*--output_dir"):
        run_pipeline(pipeline_flags(output_dir, "--retrieve_top_k", "9", "--stage", "retrieve"))
    with pytest.raises(FileNotFoundError, match="--stage retrieve"):
        run_pipeline(pipeline_flags(tmp_path / "fresh", "--stage", "rerank"))
    # Missing files are reported before any work starts.
    with pytest.raises(SystemExit, match="query file .*nowhere.jsonl does not exist"):
        prepare.main(pipeline_flags(tmp_path / "early", "--queries", str(tmp_path / "nowhere.jsonl")))
    assert not (tmp_path / "early").exists()

    # The command names the problem and the fix: a teacher without a chat template and no --prompt_template.
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy, ignore=shutil.ignore_patterns("teacher", "train.jsonl"))
    teach = pipeline_flags(copy, "--stage", "teach", "--teacher", teacher_without_template_dir)
    with pytest.raises(SystemExit, match="has no chat template.*--prompt_template"):
        prepare.main(teach)
    train_file = run_pipeline(teach + ["--prompt_template", "plain"])  # the same step, now with a prompt
    assert len(open(train_file, encoding="utf-8").readlines()) == 16
