"""Issue 8's goal table from `scaledown-bench` JSON files, as NOTES.md and the results READMEs report it.

    python benchmarks/goal_table.py benchmarks/results/h200-levers/bench_*.json

For each side: the ratio of its measured speed-up to the roofline speed-up at batch 1, 32 and its largest batch, and
its share of its own roofline at the largest batch. Every measurement found is listed (several files, several runs),
in the order of the files; bold marks one below the goal (0.9 for ratios, 0.6 for shares).
"""

import argparse
import json

RATIO_GOAL = 0.9
SHARE_GOAL = 0.6
BATCH_LABELS = ("1", "32", "max")


def collect(reports: list[dict]) -> dict[str, dict[str, list[tuple[float | None, float | None, int]]]]:
    """side -> batch label -> [(ratio, share, batch size)] over the reports' results, in their order."""
    table: dict[str, dict[str, list]] = {}
    for report in reports:
        for result in report["results"]:
            side = result["compressor"] or "uncompressed"
            ratio = (result.get("speedup") or {}).get("fraction_of_roofline")
            measured = (result["batch"], (ratio, result.get("roofline_fraction"), result["batch_size"]))
            table.setdefault(side, {}).setdefault(measured[0], []).append(measured[1])
    return table


def _values(numbers: list[float | None], goal: float) -> str:
    shown = [f"**{n:.3f}**" if n < goal else f"{n:.3f}" for n in numbers if n is not None]
    return ", ".join(shown) or "-"


def markdown(table: dict) -> str:
    """The goal table as markdown, uncompressed first, then the compressed sides as the files name them."""
    lines = [
        "| side | ratio at 1 | ratio at 32 | ratio at the largest batch | share at the largest batch |",
        "|---|---|---|---|---|",
    ]
    for side in sorted(table, key=lambda name: name != "uncompressed"):
        runs = table[side]
        cells = [_values([ratio for ratio, _, _ in runs.get(label, [])], RATIO_GOAL) for label in BATCH_LABELS]
        largest = runs.get("max", [])
        sizes = sorted({size for _, _, size in largest})
        if largest:
            cells[2] += f" ({', '.join(str(size) for size in sizes)})"
        cells.append(_values([share for _, share, _ in largest], SHARE_GOAL))
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="JSON files written by scaledown-bench")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as handle:
            report = json.load(handle)
        if "results" not in report:
            raise SystemExit(f"{path} is not a scaledown-bench report (no 'results'); pass the bench's JSON files.")
        reports.append(report)
    print(markdown(collect(reports)))


if __name__ == "__main__":
    main()
