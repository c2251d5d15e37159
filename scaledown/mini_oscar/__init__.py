"""Miniature OSCAR reproduction: a synthetic fact world where compression can be trained and measured end to end.

The world generator lives in `scaledown.mini_oscar.world`. Its names are re-exported here lazily, so that
`python -m scaledown.mini_oscar.world` does not import the module twice (runpy warns when a package has already
imported the module it is asked to run).
"""

_WORLD_EXPORTS = (
    "ATTRIBUTES",
    "SAMPLE_DATA_DIR",
    "Entity",
    "World",
    "build_world",
    "chance_accuracy",
    "expected_chance_accuracy",
    "majority_guess_accuracy",
    "make_examples",
    "pretraining_texts",
    "read_jsonl",
    "write_dataset",
    "write_jsonl",
    "write_tiny_sample",
)

__all__ = list(_WORLD_EXPORTS)


def __getattr__(name):
    if name in _WORLD_EXPORTS:
        from . import world

        return getattr(world, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
