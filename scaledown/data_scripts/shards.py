"""Sharded, resumable outputs: every step writes numbered shards, each one published by an atomic rename.

A shard is first written under a temporary name and renamed to its final name only once complete, so a final
name on disk always holds a whole shard. A run killed at any moment leaves at most one temporary file behind;
the next run deletes it, skips the shards that exist and writes the others, so no example is lost or written
twice. Each step also records the settings its shards depend on (``settings.json``) and refuses to mix shards
made with other settings, and writes ``done.json`` once all its shards exist.
"""

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator

SETTINGS_FILE = "settings.json"
DONE_FILE = "done.json"
TEMPORARY_SUFFIX = ".tmp"


def shard_name(index: int, extension: str = "") -> str:
    return f"shard-{index:05d}{extension}"


def write_json_atomically(path: str, value) -> None:
    temporary = path + TEMPORARY_SUFFIX
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_jsonl_rows(path: str, rows: Iterable[dict]) -> None:
    """Write one JSON object a line (the training format's file layout)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def publish(temporary: str, final: str) -> None:
    """Make a finished shard visible under its final name in one step (a file or a folder)."""
    os.replace(temporary, final)


def remove_path(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


class ShardedStep:
    """One resumable step of the pipeline: a folder of numbered shards plus its settings and completion marker.

    `extension` is ".jsonl" for row shards and "" for shards that are folders (passages, index).
    """

    def __init__(self, directory: str, settings: dict, extension: str = ".jsonl"):
        self.directory = directory
        self.settings = settings
        self.extension = extension
        self.name = os.path.basename(os.path.normpath(directory))

    # ---- settings -------------------------------------------------------------------------------------------
    def open(self) -> "ShardedStep":
        """Create the folder, or check that the shards already in it were made with the same settings."""
        os.makedirs(self.directory, exist_ok=True)
        settings_path = os.path.join(self.directory, SETTINGS_FILE)
        if os.path.exists(settings_path):
            with open(settings_path, encoding="utf-8") as handle:
                recorded = json.load(handle)
            if recorded != json.loads(json.dumps(self.settings)) and self.has_any_shard():
                changed = sorted(
                    key for key in set(recorded) | set(self.settings) if recorded.get(key) != self.settings.get(key)
                )
                raise ValueError(
                    f"{self.directory} holds shards made with other settings ({', '.join(changed)} differ). "
                    "Resuming would mix the two. Keep the original settings, choose a new --output_dir, or delete "
                    f"{self.directory} (and the steps after it) to start this step again."
                )
        # A step without shards yet (a run that failed before its first shard) takes the new settings.
        write_json_atomically(settings_path, self.settings)
        for entry in os.listdir(self.directory):  # leftovers of a run killed while writing a shard
            if entry.endswith(TEMPORARY_SUFFIX):
                remove_path(os.path.join(self.directory, entry))
        return self

    def settings_on_disk(self) -> dict:
        """The settings this step's shards were made with (a later step records them as its input)."""
        with open(os.path.join(self.directory, SETTINGS_FILE), encoding="utf-8") as handle:
            return json.load(handle)

    # ---- shards ---------------------------------------------------------------------------------------------
    def shard_path(self, index: int) -> str:
        return os.path.join(self.directory, shard_name(index, self.extension))

    def has_any_shard(self) -> bool:
        return any(
            entry.startswith("shard-") and not entry.endswith(TEMPORARY_SUFFIX) for entry in os.listdir(self.directory)
        )

    def has_shard(self, index: int) -> bool:
        return os.path.exists(self.shard_path(index))

    def count_leading_shards(self) -> int:
        """How many shards 0, 1, 2, ... exist without a gap (steps that write their shards in order)."""
        count = 0
        while self.has_shard(count):
            count += 1
        return count

    def write_shard(self, index: int, write: Callable[[str], None]) -> None:
        """Call `write(temporary_path)` to produce the shard, then publish it under its final name."""
        final = self.shard_path(index)
        temporary = final + TEMPORARY_SUFFIX
        remove_path(temporary)
        write(temporary)
        publish(temporary, final)

    def write_rows(self, index: int, rows: list[dict]) -> None:
        self.write_shard(index, lambda path: write_jsonl_rows(path, rows))

    def read_rows(self, index: int) -> list[dict]:
        return read_jsonl(self.shard_path(index))

    # ---- completion -----------------------------------------------------------------------------------------
    def is_done(self) -> bool:
        return os.path.exists(os.path.join(self.directory, DONE_FILE))

    def mark_done(self, summary: dict) -> None:
        write_json_atomically(os.path.join(self.directory, DONE_FILE), summary)

    def summary(self) -> dict:
        with open(os.path.join(self.directory, DONE_FILE), encoding="utf-8") as handle:
            return json.load(handle)

    def require_done(self, stage_to_run: str) -> dict:
        """The summary of a finished step, or a clear error when a later stage is run before it."""
        if not self.is_done():
            raise FileNotFoundError(
                f"{self.directory} is missing or incomplete: run `scaledown-prepare-data --stage {stage_to_run}` "
                "with the same --output_dir first (it resumes where it stopped)."
            )
        return self.summary()


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def merge_jsonl_shards(step: ShardedStep, num_shards: int, destination: str) -> int:
    """Concatenate a finished step's row shards into one JSONL file, published atomically. Returns the row count."""
    temporary = destination + TEMPORARY_SUFFIX
    count = 0
    with open(temporary, "w", encoding="utf-8") as output:
        for index in range(num_shards):
            with open(step.shard_path(index), encoding="utf-8") as shard:
                for line in shard:
                    output.write(line)
                    count += 1
        output.flush()
        os.fsync(output.fileno())
    publish(temporary, destination)
    return count
