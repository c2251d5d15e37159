"""Hub publishing, offline: the model card, the folder that gets uploaded, and the one-commit push.

Network calls are intercepted at huggingface_hub's HfApi; loading "from the Hub" is simulated by laying repos out
in a private huggingface_hub cache and reading it with HF_HUB_OFFLINE=1.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DOCUMENTS, QUESTIONS
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, RepoUrl, constants

from scaledown import ScaleDownConfig, ScaleDownForCausalLM
from scaledown.hub_cards import (
    CheckpointError,
    InvalidRepoIdError,
    MissingTokenError,
    build_model_card,
    evaluation_tables,
    push_checkpoint,
    speedup_table,
    stage_checkpoint,
)
from scaledown.hub_cards.push import main

BASE_ID = "acme/tiny-llama"  # the Hub id the test checkpoints give their base generator
REPO_ID = "acme/scaledown-tiny"
NESTED_REPO_ID = "acme/scaledown-versions"  # holds a checkpoint in its subfolder v1/
# Reports as scaledown-evaluate and scaledown-bench write them (abridged).
EVALUATION = {
    "num_examples": 500,
    "methods": {
        "scaledown": {"match": 0.61, "exact_match": 0.4, "f1": 0.52, "seconds": 20.5, "ms_per_question": 41.0},
        "uncompressed": {"match": 0.64, "exact_match": 0.43, "f1": 0.6, "seconds": 60.0, "ms_per_question": 120.0},
    },
    "rerank": {"ndcg@10": 0.71, "questions": 500},
    "settings": {"data": "data/my_eval.jsonl", "split": "test", "device": "cpu"},
    "examples": [{"question": "q", "answers": ["a"], "predictions": {"scaledown": "a", "uncompressed": "a"}}],
}
BENCH = {
    "settings": {
        "device": "NVIDIA H100",
        "dtype": "bfloat16",
        "protocol": {"num_documents": 10, "new_tokens": 32},
        "notes": "Times are per query.",
        "hardware": None,
    },
    "results": [
        {
            "side": "uncompressed",
            "compressor": None,
            "batch": "32",
            "batch_size": 32,
            "seconds_all": [0.3, 0.4],
            "ms_per_query": 12.0,
            "compression_ms_per_query": None,
            "peak_memory_gb": 30.1,
            "tflops_per_query": {"paper": 1.0, "honest": 1.0},
        },
        {
            "side": "compressed",
            "compressor": "8l",
            "batch": "32",
            "batch_size": 32,
            "ms_per_query": 4.0,
            "compression_ms_per_query": 1.0,
            "peak_memory_gb": 20.0,
            "speedup": {"measured": 3.0, "flops_paper": 4.1, "roofline": None, "fraction_of_roofline": None},
        },
        {"side": "compressed", "compressor": "8l", "batch": "max", "batch_size": 256, "error": "out of memory"},
    ],
}


def _set_generator_id(checkpoint, generator_id: str) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["generator_name_or_path"] = generator_id
    path.write_text(json.dumps(config))


def _files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def published(generator_dirs, tmp_path_factory):
    """A trained-looking model and its checkpoint, whose config names the base generator by a Hub id."""
    torch.manual_seed(0)
    config = ScaleDownConfig(
        generator_name_or_path=generator_dirs["llama"], num_compressor_layers=2, enable_reranking=True
    )
    model = ScaleDownForCausalLM(config).eval()
    with torch.no_grad():  # move the trained parts off their initial values, so equal answers mean loaded weights
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    checkpoint = tmp_path_factory.mktemp("published") / "checkpoint"
    model.save_pretrained(checkpoint)
    _set_generator_id(checkpoint, BASE_ID)
    return model, checkpoint


@pytest.fixture
def checkpoint_copy(published, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(published[1], copy)
    return copy


class FakeHub:
    """Stands in for the Hub behind HfApi: records the calls, keeps each commit's files, reaches no network."""

    def __init__(self, remote_files=()):
        self.remote_files = list(remote_files)
        self.calls = {"create_repo": [], "create_branch": [], "list_repo_files": [], "create_commit": []}
        self.tokens = set()
        self.added, self.deleted = {}, set()

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub._record(api, "create_repo", repo_id=repo_id, **kwargs)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kwargs):
            hub._record(api, "create_branch", repo_id=repo_id, **kwargs)

        def list_repo_files(api, repo_id, **kwargs):
            hub._record(api, "list_repo_files", repo_id=repo_id, **kwargs)
            return list(hub.remote_files)

        def create_commit(api, repo_id, operations, **kwargs):
            hub._record(api, "create_commit", repo_id=repo_id, **kwargs)
            for operation in operations:  # read now: the staging folder is gone after the push returns
                if isinstance(operation, CommitOperationAdd):
                    with operation.as_file() as handle:
                        hub.added[operation.path_in_repo] = handle.read()
                elif isinstance(operation, CommitOperationDelete):
                    hub.deleted.add(operation.path_in_repo)
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/abc123",
                commit_message=kwargs["commit_message"],
                commit_description="",
                oid="abc123",
            )

        for name, fake in [
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("list_repo_files", list_repo_files),
            ("create_commit", create_commit),
        ]:
            monkeypatch.setattr(HfApi, name, fake)
        return self

    def _record(self, api, name, **kwargs):
        self.tokens.add(api.token)
        self.calls[name].append(kwargs)

    def card(self) -> ModelCard:
        return ModelCard(self.added["README.md"].decode("utf-8"))


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub(
        remote_files=[
            ".gitattributes",
            "README.md",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "model.safetensors",
        ]
    ).install(monkeypatch)


# ---- the card ------------------------------------------------------------------------------------------------
def test_card_renders_and_its_metadata_round_trips(tmp_path):
    config = ScaleDownConfig(generator_name_or_path="mistralai/Mistral-7B-Instruct-v0.2", enable_reranking=True)
    card = build_model_card(config, "acme/scaledown-8l", evaluation=EVALUATION, bench=BENCH, datasets=["acme/rag"])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    data = loaded.data
    assert data.base_model == "mistralai/Mistral-7B-Instruct-v0.2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["custom_code", "rag", "context-compression", "scaledown", "oscar"]
    assert data.license == "apache-2.0" and data.datasets == ["acme/rag"]
    assert data.model_name == "scaledown-8l"
    # model-index: this model's QA scores (not the baseline's, not the timings) and its rerank head's nDCG.
    results = {(r.task_type, r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {
        ("question-answering", "my_eval", "test", "match"): 0.61,
        ("question-answering", "my_eval", "test", "exact_match"): 0.4,
        ("question-answering", "my_eval", "test", "f1"): 0.52,
        ("text-ranking", "my_eval", "test", "ndcg@10"): 0.71,
    }

    text = loaded.text
    assert 'AutoModel.from_pretrained("acme/scaledown-8l", trust_remote_code=True)' in text
    assert "model.generate_from_documents(" in text
    assert "| Compressor | first 8 layers of the generator (n_layers) |" in text
    assert "| Compression rate | 16x |" in text
    assert "| LoRA on the generator | r=16, alpha=32, dropout=0.1, targets=all-linear |" in text
    assert "| Reranking head | yes (loss weight 0.05) |" in text
    assert "**my_eval** (test), 500 questions" in text
    assert "| **scaledown** (this model) | 0.61 | 0.4 | 0.52 | 41.00 |" in text
    assert "| uncompressed | 0.64 | 0.43 | 0.6 | 120.00 |" in text
    assert "Measured with device: NVIDIA H100; dtype: bfloat16; protocol: num_documents=10, new_tokens=32." in text
    header = (
        "| side | compressor | batch | batch size | ms per query | compression ms per query | peak memory gb | error |"
    )
    assert header + " speedup (measured) | speedup (flops paper) |" in text
    assert "| compressed | 8l | 32 | 32 | 4.00 | 1.00 | 20.00 | - | 3.00x | 4.10x |" in text
    assert "| compressed | 8l | max | 256 | - | - | - | out of memory | - | - |" in text
    assert "## Limitations" in text and "eprint        = {2504.07109}" in text


def test_card_without_reports_or_hub_base():
    config = ScaleDownConfig(generator_name_or_path="/local/generator", compressor_type="modernbert")
    card = build_model_card(config)
    assert card.data.base_model is None  # a local path is not a Hub id: left out rather than invalid metadata
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "## Evaluation" not in card.text and "## Speed-ups" not in card.text
    assert "`answerdotai/ModernBERT-base` (modernbert) + MLP connector" in card.text


def test_evaluate_dataset_names_resolve_to_hub_ids():
    from scaledown.evaluation.evaluate import HUB_DATASETS

    [table] = evaluation_tables({"methods": {"scaledown": {"f1": 0.5}}, "settings": {"data": "nq", "split": None}})
    assert (table.dataset, table.dataset_id, table.split) == ("nq", HUB_DATASETS["nq"].hub_id, HUB_DATASETS["nq"].split)


SIMPLE = {"dataset": "nq_open", "results": {"scaledown": {"match": 0.6}, "full_text": {"match": 0.7}}}


@pytest.mark.parametrize(
    "report, expected",
    [
        (
            [SIMPLE, {"dataset": "triviaqa", "results": {"oscar": {"match": 0.7}}}],
            {"nq_open": "scaledown", "triviaqa": "oscar"},
        ),
        ({"popqa": {"results": {"oscar": {"F1": 0.3}, "closed_book": {"f1": 0.1}}}}, {"popqa": "oscar"}),
        ({"dataset": "nq", "results": {"match": 0.5, "exact-match": 0.2}}, {"nq": "scaledown"}),  # flat: one method
        ({"dataset": "nq", "results": {"full_text": {"match": 0.6}, "closed_book": {"match": 0.2}}}, {"nq": None}),
        ({"dataset": "nq", "results": {"scaledown": {"n": 10, "time_s": 3.2}}}, {}),  # no known metric
        ({"results": "not a mapping"}, {}),
        ("not a report", {}),
    ],
)
def test_evaluation_report_schema_is_tolerant(report, expected):
    tables = evaluation_tables(report)
    assert {table.dataset: table.model_method for table in tables} == expected


def test_speedup_table_schema_is_tolerant():
    rows = [{"batch_size": 8, "speedup_vs_full_text": 2.5, "method": "scaledown", "nested": {"x": 1}, "all": [1]}]
    for report in (rows, {"rows": rows}, {"runs": rows, "dtype": "bfloat16"}):
        table = speedup_table(report)
        assert table.columns == ["method", "batch size", "nested (x)", "speedup vs full text"]
        assert table.rows == [["scaledown", "8", "1", "2.50x"]]
    assert speedup_table({"runs": rows, "dtype": "bfloat16"}).notes == "dtype: bfloat16"
    for junk in ({}, [], {"rows": "x"}, [1, 2], {"rows": [{}]}, {"results": [{"a": None}]}):
        assert speedup_table(junk) is None


# ---- the folder that gets uploaded ---------------------------------------------------------------------------
def _publish_to_offline_cache(hf_home, repo_id, folder):
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo, so HF_HUB_OFFLINE=1 resolves repo_id."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_staged_folder_holds_what_loading_needs_and_loads_in_a_fresh_process(
    published, checkpoint_copy, generator_dirs, tmp_path
):
    model, _ = published
    saved = _files(checkpoint_copy)
    # What a Trainer output folder holds besides the model: none of it may be uploaded.
    for junk in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "trainer_state.json",
        "loss_curve.png",
        "README.md",
        "checkpoint-10/config.json",
        ".cache/huggingface/x.lock",
    ):
        (checkpoint_copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint_copy / junk).write_text("junk")
    config = ScaleDownConfig.from_pretrained(checkpoint_copy)
    staged = tmp_path / "staged"
    names = stage_checkpoint(checkpoint_copy, staged, build_model_card(config, REPO_ID))

    assert set(names) == _files(staged) == saved | {"README.md"}
    assert {
        "config.json",
        "model.safetensors",
        "modeling_scaledown.py",
        "configuration_scaledown.py",
        "tokenizer_config.json",
        "compressor_tokenizer/tokenizer_config.json",
    } <= saved
    assert (checkpoint_copy / "README.md").read_text() == "junk"  # the card never overwrites a linked original

    # "The Hub": the staged folder as REPO_ID and the base generator as BASE_ID, in a private offline cache.
    hf_home = tmp_path / "hf_home"
    _publish_to_offline_cache(hf_home, BASE_ID, generator_dirs["llama"])
    _publish_to_offline_cache(hf_home, REPO_ID, staged)
    nested = tmp_path / "nested"  # a repo holding the checkpoint in a subfolder, its own subfolders under it
    shutil.copytree(staged, nested / "v1")
    _publish_to_offline_cache(hf_home, NESTED_REPO_ID, nested)
    expected = model.generate_from_documents(QUESTIONS, DOCUMENTS, max_new_tokens=8)
    script = f"""
import json, sys
from transformers import AutoModel
answers = []
for source in ({str(staged)!r}, {REPO_ID!r}):
    model = AutoModel.from_pretrained(source, trust_remote_code=True)
    answers.append(model.generate_from_documents({QUESTIONS!r}, {DOCUMENTS!r}, max_new_tokens=8))
assert "scaledown" not in sys.modules  # the repo's own code ran, not the installed package
# transformers fetches remote code from a repo's root only, so a checkpoint in a subfolder loads through the package
from scaledown import ScaleDownForCausalLM
for source in ({str(nested)!r}, {NESTED_REPO_ID!r}):
    model = ScaleDownForCausalLM.from_pretrained(source, subfolder="v1")
    answers.append(model.generate_from_documents({QUESTIONS!r}, {DOCUMENTS!r}, max_new_tokens=8))
print(json.dumps(answers))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": ""}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [expected] * 4


def test_merged_checkpoint_ships_its_generator(make_model, tmp_path):
    model = make_model()  # its base generator is a local folder: fine once merged into the checkpoint
    model.save_pretrained(tmp_path / "merged", merge_generator=True)
    config = ScaleDownConfig.from_pretrained(tmp_path / "merged")
    names = stage_checkpoint(tmp_path / "merged", tmp_path / "staged", build_model_card(config, REPO_ID))
    assert {"generator/config.json", "generator/model.safetensors", "model.safetensors", "README.md"} <= set(names)
    card = (tmp_path / "staged" / "README.md").read_text()
    assert "merged into the generator weights (`generator/`)" in card
    assert model.config.generator_name_or_path not in card  # the local base path stays off the card


# ---- the push ------------------------------------------------------------------------------------------------
def test_push_command_uploads_everything_in_one_commit(published, hub, tmp_path, capsys):
    _, checkpoint = published
    for name, report in [("eval_a.json", EVALUATION), ("eval_b.json", SIMPLE), ("bench.json", BENCH)]:
        (tmp_path / name).write_text(json.dumps(report))
    argv = [str(checkpoint), "--repo-id", REPO_ID, "--private", "--revision", "v1"]
    argv += ["--eval-json", str(tmp_path / "eval_a.json"), "--eval-json", str(tmp_path / "eval_b.json")]
    argv += ["--bench-json", str(tmp_path / "bench.json")]
    status = main(argv)

    assert status == 0
    assert "https://huggingface.co/acme/scaledown-tiny/commit/abc123" in capsys.readouterr().out
    assert hub.tokens == {"hf_test_token"}
    assert hub.calls["create_repo"] == [{"repo_id": REPO_ID, "private": True, "exist_ok": True}]
    assert hub.calls["create_branch"] == [{"repo_id": REPO_ID, "branch": "v1", "exist_ok": True}]
    [commit] = hub.calls["create_commit"]
    assert commit["revision"] == "v1" and commit["commit_message"] == "Upload ScaleDown model"

    assert set(hub.added) == _files(checkpoint) | {"README.md"}
    assert hub.added["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    # An earlier push's shards would shadow the new weights: they go in the same commit; other files stay.
    assert hub.deleted == {"model-00001-of-00002.safetensors", "model.safetensors.index.json"}
    card = hub.card()
    assert card.data.base_model == BASE_ID and "oscar" in card.data.tags
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in card.data.eval_results} == {
        ("my_eval", "match", 0.61),
        ("my_eval", "exact_match", 0.4),
        ("my_eval", "f1", 0.52),
        ("my_eval", "ndcg@10", 0.71),
        ("nq_open", "match", 0.6),
    }
    assert "| speedup (measured) |" in card.text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card.text


def test_model_push_to_hub_saves_and_pushes_in_one_commit(make_model, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    model = make_model()
    model.config.generator_name_or_path = BASE_ID
    model.push_to_hub(REPO_ID, token="hf_explicit", commit_message="v0", tags=["demo"])
    assert hub.tokens == {"hf_explicit"}
    assert len(hub.calls["create_commit"]) == 1 and not hub.calls["create_branch"]
    assert hub.calls["create_repo"][0]["private"] is None  # transformers' default: the namespace decides
    assert {
        "config.json",
        "model.safetensors",
        "modeling_scaledown.py",
        "configuration_scaledown.py",
        "tokenizer.json",
        "compressor_tokenizer/tokenizer.json",
        "README.md",
    } <= set(hub.added)
    assert hub.card().data.tags[-1] == "demo"


# ---- bad input: each error says what to do, and comes before any network call --------------------------------
@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    for name in ("create_repo", "create_branch", "list_repo_files", "create_commit", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda *a, _name=name, **k: pytest.fail(f"HfApi.{_name} was called"))


@pytest.mark.parametrize(
    "remove",
    [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "compressor_tokenizer/tokenizer_config.json",
        "modeling_scaledown.py",
    ],
)
def test_folder_missing_a_file_is_not_a_checkpoint(checkpoint_copy, no_network, remove):
    (checkpoint_copy / remove).unlink()
    with pytest.raises(CheckpointError, match=f"not a ScaleDown checkpoint: {remove} is missing"):
        push_checkpoint(checkpoint_copy, REPO_ID)


def test_other_model_type_is_not_a_checkpoint(generator_dirs, no_network):
    with pytest.raises(CheckpointError, match="model_type 'llama', not 'scaledown'"):
        push_checkpoint(generator_dirs["llama"], REPO_ID)


def test_local_base_generator_cannot_be_published(checkpoint_copy, no_network):
    _set_generator_id(checkpoint_copy, "/home/me/models/mistral")
    with pytest.raises(CheckpointError, match="local path '/home/me/models/mistral'.*merge_generator=True"):
        push_checkpoint(checkpoint_copy, REPO_ID)


def test_missing_token(checkpoint_copy, no_network, monkeypatch, tmp_path, capsys):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(MissingTokenError, match="run `hf auth login` \\(or set the HF_TOKEN"):
        push_checkpoint(checkpoint_copy, REPO_ID)
    # The command prints the same advice without a traceback.
    assert main([str(checkpoint_copy), "--repo-id", REPO_ID]) == 1
    assert "scaledown-push: error: No Hugging Face token found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "repo_id", ["scaledown-8l", "acme/models/scaledown", "acme/bad name", "acme/x--y", "/x", "acme/", "-a/b"]
)
def test_repo_id_of_the_wrong_form(checkpoint_copy, no_network, repo_id):
    with pytest.raises(InvalidRepoIdError, match="must be of the form 'namespace/name'"):
        push_checkpoint(checkpoint_copy, repo_id)


def test_unreadable_report(checkpoint_copy, no_network, tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluation JSON .*missing.json' does not exist"):
        push_checkpoint(checkpoint_copy, REPO_ID, eval_json=str(tmp_path / "missing.json"))
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(ValueError, match="bench JSON .* is not valid JSON"):
        push_checkpoint(checkpoint_copy, REPO_ID, bench_json=str(tmp_path / "bench.json"))
