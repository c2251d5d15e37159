"""Publish a ScaleDown checkpoint on the Hugging Face Hub: `scaledown-push CHECKPOINT --repo-id org/name`.

Everything the model needs to load from its repo id alone (weights, both tokenizers, the modeling and configuration
files named by `auto_map`, a merged generator if any) goes up with a rendered model card in ONE commit, so the repo
is never seen half-updated. `HfApi.upload_folder` is not used because, with hf_xet installed, it may split a large
folder over several commits; `create_commit` with explicit operations is always a single commit.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from ..configuration_scaledown import ScaleDownConfig
from ..modeling_scaledown import COMPRESSOR_TOKENIZER_FOLDER, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .card import DEFAULT_LICENSE, build_model_card, hub_id_or_none

DEFAULT_COMMIT_MESSAGE = "Upload ScaleDown model"

# Files at the checkpoint root that loading reads. Anything else there (optimizer and scheduler states, trainer
# logs, loss plots, checkpoint-N/ folders, an old README) stays local.
ROOT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    WEIGHTS_INDEX_NAME,
    "*.py",  # the remote code, flattened into the root by save_pretrained
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.model",  # sentencepiece
]
# Pickled files are never needed (checkpoints are safetensors only) and are unsafe to load from a stranger's repo.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle"]
# Weight files left by an earlier push would shadow the new ones (an old index file wins over model.safetensors).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


class PushError(Exception):
    """A problem with the input of a push, explained so that it can be fixed without reading a traceback."""


class CheckpointError(PushError, ValueError):
    """The folder is not a complete, publishable ScaleDown checkpoint."""


class InvalidRepoIdError(PushError, ValueError):
    """The repo id is not of the form namespace/name."""


class MissingTokenError(PushError, RuntimeError):
    """No Hugging Face token was given or found."""


# ---- checks (no network) -------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """Require `namespace/name`: a bare name would land in whichever account the token belongs to."""
    form = "'namespace/name' (for example 'my-org/scaledown-8l'; letters, digits, '-', '_' and '.'; no '--' or '..')"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or "" in repo_id.split("/"):
        raise InvalidRepoIdError(f"Repo id {repo_id!r} must be of the form {form}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise InvalidRepoIdError(f"Repo id {repo_id!r} must be of the form {form}: {error}") from error
    return repo_id


def resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise MissingTokenError(
            "No Hugging Face token found: run `hf auth login` (or set the HF_TOKEN environment variable) "
            "with a token that can write to the target namespace, then push again."
        )
    return token


def _missing(checkpoint_dir: str, name: str) -> CheckpointError:
    return CheckpointError(
        f"{checkpoint_dir} is not a ScaleDown checkpoint: {name} is missing. Save one with "
        "model.save_pretrained(folder), which writes the config, the weights, the model code and both tokenizers."
    )


def _remote_code_files(config_dict: dict) -> list[str]:
    """The .py files that `auto_map` points at ("modeling_scaledown.ScaleDownForCausalLM" -> modeling_scaledown.py)."""
    references = [ref for ref in config_dict.get("auto_map", {}).values() if isinstance(ref, str) and "--" not in ref]
    return sorted({ref.rsplit(".", 1)[0] + ".py" for ref in references})


def check_checkpoint(checkpoint_dir: str) -> ScaleDownConfig:
    """Check that `checkpoint_dir` holds everything loading needs and that others can load it; return its config."""
    checkpoint_dir = str(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir} is not a folder: pass the folder written by model.save_pretrained.")
    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(config_path):
        raise _missing(checkpoint_dir, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        try:
            config_dict = json.load(handle)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path} is not valid JSON ({error}): re-save the checkpoint.") from error
    if config_dict.get("model_type") != "scaledown":
        raise CheckpointError(
            f"{checkpoint_dir} is not a ScaleDown checkpoint: config.json has model_type "
            f"{config_dict.get('model_type')!r}, not 'scaledown'."
        )
    required = ["tokenizer_config.json", f"{COMPRESSOR_TOKENIZER_FOLDER}/tokenizer_config.json"]
    required += _remote_code_files(config_dict) or ["modeling_scaledown.py (no auto_map in config.json)"]
    for name in required:
        if not os.path.isfile(os.path.join(checkpoint_dir, name)):
            raise _missing(checkpoint_dir, name)
    if not any(os.path.isfile(os.path.join(checkpoint_dir, n)) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        raise _missing(checkpoint_dir, WEIGHTS_NAME)

    config = ScaleDownConfig.from_pretrained(checkpoint_dir)
    if config.generator_subfolder:
        if not os.path.isfile(os.path.join(checkpoint_dir, config.generator_subfolder, "config.json")):
            raise _missing(checkpoint_dir, f"{config.generator_subfolder}/config.json (the merged generator)")
    elif hub_id_or_none(config.generator_name_or_path) is None:
        # Loading from the Hub fetches the base generator by this name: a local path only works on this machine.
        raise CheckpointError(
            f"{checkpoint_dir} references its base generator by the local path {config.generator_name_or_path!r}, "
            "which nobody else can load. Set generator_name_or_path in config.json to the base model's Hub id, "
            "or save with model.save_pretrained(folder, merge_generator=True) to ship the generator in the repo."
        )
    return config


# ---- staging -------------------------------------------------------------------------------------------------
def files_to_upload(checkpoint_dir: str, config: ScaleDownConfig) -> list[str]:
    """Paths (relative, '/'-separated) of the files that loading needs, sorted."""
    root = sorted(name for name in os.listdir(checkpoint_dir) if os.path.isfile(os.path.join(checkpoint_dir, name)))
    selected = list(filter_repo_objects(root, allow_patterns=ROOT_PATTERNS, ignore_patterns=PICKLE_PATTERNS))
    for folder in filter(None, (COMPRESSOR_TOKENIZER_FOLDER, config.generator_subfolder)):
        for directory, subfolders, names in os.walk(os.path.join(checkpoint_dir, folder)):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # .cache/, .git/
            relative = os.path.relpath(directory, checkpoint_dir).replace(os.sep, "/")
            inside = [f"{relative}/{name}" for name in names if not name.startswith(".")]
            selected += filter_repo_objects(inside, ignore_patterns=PICKLE_PATTERNS)
    return sorted(selected)


def _link_or_copy(source: str, target: str) -> None:
    # Weights can be many GB: link them rather than copy (a hard link needs one filesystem, a symlink does not).
    source = os.path.abspath(source)
    try:
        os.link(source, target)
    except OSError:
        try:
            os.symlink(source, target)
        except OSError:
            shutil.copy2(source, target)


def stage_checkpoint(checkpoint_dir: str, staging_dir: str, card) -> list[str]:
    """Fill `staging_dir` with exactly what will be uploaded: the files loading needs plus README.md (the card)."""
    return _stage(checkpoint_dir, check_checkpoint(checkpoint_dir), staging_dir, card)


def _stage(checkpoint_dir: str, config: ScaleDownConfig, staging_dir: str, card) -> list[str]:
    names = files_to_upload(checkpoint_dir, config)
    for name in names:
        target = os.path.join(staging_dir, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _link_or_copy(os.path.join(checkpoint_dir, name), target)
    card.save(os.path.join(staging_dir, "README.md"))
    return sorted(names + ["README.md"])


# ---- push ----------------------------------------------------------------------------------------------------
def push_checkpoint(
    checkpoint_dir: str,
    repo_id: str,
    private: bool | None = False,
    revision: str | None = None,
    token: str | None = None,
    eval_json: str | list[str] | None = None,
    bench_json: str | list[str] | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    *,
    commit_description: str | None = None,
    create_pr: bool = False,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
):
    """Upload a ScaleDown checkpoint folder and its model card to `repo_id` in one commit; return the CommitInfo.

    eval_json / bench_json: paths of scaledown-evaluate / scaledown-bench reports (one or a list) for the card.
    Every input is checked before the first network call: the repo id, the checkpoint, the reports, the token.
    `revision` is a branch, created from the default branch if needed. Weight files of an earlier push that this
    checkpoint does not overwrite are deleted in the same commit, so they cannot shadow the new weights.
    """
    repo_id = check_repo_id(repo_id)
    config = check_checkpoint(checkpoint_dir)
    card = build_model_card(
        config, repo_id, evaluation=eval_json, bench=bench_json, license=license, datasets=datasets, tags=tags
    )
    token = resolve_token(token)
    api = HfApi(token=token, library_name="scaledown")
    with tempfile.TemporaryDirectory(prefix="scaledown-push-") as staging_dir:
        names = _stage(checkpoint_dir, config, staging_dir, card)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        additions = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(staging_dir, name)) for name in names
        ]
        return api.create_commit(
            repo_id,
            operations=_stale_weight_deletions(api, repo_id, revision, set(names)) + additions,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _stale_weight_deletions(api: HfApi, repo_id: str, revision: str | None, uploaded: set[str]):
    remote = api.list_repo_files(repo_id, revision=revision)
    stale = filter_repo_objects([name for name in remote if name not in uploaded], allow_patterns=STALE_WEIGHT_PATTERNS)
    return [CommitOperationDelete(path_in_repo=name) for name in stale]


def push_model(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    eval_json: str | list[str] | None = None,
    bench_json: str | list[str] | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
):
    """`model.push_to_hub` for an in-memory ScaleDownForCausalLM (same keywords as transformers' push_to_hub):
    save it, then push the folder with its card in one commit."""
    check_repo_id(repo_id)
    resolve_token(token)  # fail before spending time on the save
    with tempfile.TemporaryDirectory(prefix="scaledown-save-") as checkpoint_dir:
        model.save_pretrained(checkpoint_dir, max_shard_size=max_shard_size)
        return push_checkpoint(
            checkpoint_dir,
            repo_id,
            private=private,
            revision=revision,
            token=token,
            eval_json=eval_json,
            bench_json=bench_json,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            create_pr=create_pr,
            license=license,
            datasets=datasets,
            tags=tags,
        )


# ---- command line --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaledown-push",
        description="Upload a ScaleDown checkpoint with its model card to the Hugging Face Hub in one commit. "
        "Log in first with `hf auth login` (or set HF_TOKEN).",
    )
    parser.add_argument("checkpoint", help="folder written by model.save_pretrained (or scaledown-train)")
    parser.add_argument("--repo-id", required=True, help="target repo, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", help="branch to push to (created if missing); default: the main branch")
    parser.add_argument(
        "--eval-json", action="append", help="report of scaledown-evaluate: the card's eval results (repeat: datasets)"
    )
    parser.add_argument("--bench-json", action="append", help="report of scaledown-bench: the card's speed-up table")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="card license; must agree with the base models'")
    parser.add_argument("--dataset", action="append", dest="datasets", help="Hub id of a training dataset (repeat)")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commit = push_checkpoint(
            args.checkpoint,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            eval_json=args.eval_json,
            bench_json=args.bench_json,
            commit_message=args.commit_message,
            license=args.license,
            datasets=args.datasets,
        )
    except (PushError, FileNotFoundError, ValueError) as error:
        print(f"scaledown-push: error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.checkpoint} to {args.repo_id} in one commit: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
