"""`scaledown COMMAND ...`: one entry point for every ScaleDown tool (each also has its own console script)."""

import importlib
import sys

COMMANDS = {
    "train": ("scaledown.train", "train a compressor (scaledown-train)"),
    "prepare-data": ("scaledown.data_scripts.prepare", "retrieve, rerank, teach (scaledown-prepare-data)"),
    "evaluate": ("scaledown.evaluation.evaluate", "QA accuracy against baselines (scaledown-evaluate)"),
    "bench": ("scaledown.evaluation.bench", "FLOPs, wall clock and roofline (scaledown-bench)"),
    "push": ("scaledown.hub_cards.push", "publish a checkpoint with its model card (scaledown-push)"),
    "reproduce": ("scaledown.mini_oscar.reproduce", "the miniature OSCAR reproduction"),
}


def usage() -> str:
    lines = ["usage: scaledown COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<13} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "scaledown COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"Unknown command {command!r}.\n\n{usage()}")
    module = importlib.import_module(COMMANDS[command][0])
    module.main(rest)


if __name__ == "__main__":
    main()
