"""Compare table cells across results folders: the difference of their means and P(first > second), with intervals.

    python benchmarks/compare.py "results/cpu-filtered:BM+MPO prior" "results/cpu-long:BM+MPO prior"
    python benchmarks/compare.py "results/cpu:ABM+MPO prior@cheetah (first 20)" \
        "results/cpu-critic:ABM+MPO prior@cheetah (first 20)" --out cmp.md

Each table.md of benchmarks/reproduce.py compares the columns of one preset. A control often lives in another
preset (cpu-filtered's BM prior against cpu-long's priors); this reads the published runs (<folder>/runs) of each
argument FOLDER:COLUMN[@ROW] (COLUMN as the table heads it, a prior as "<column> prior"; ROW as the table's first
column, needed when the folder has more than one) and prints each cell's final returns as reproduce.py does (mean over
seeds, 95% stratified-bootstrap interval), then every pair in the order given: the difference of means and the
probability that a seed of the first beats a seed of the second, each with its 95% interval. Seeds are resampled
independently in each cell, as they are independent runs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import difference_cells, load_published, mean_std, table_rows  # noqa: E402


def cell(argument: str) -> tuple[str, list[float]]:
    """`FOLDER:COLUMN[@ROW]` -> (its label, the final returns of its seeds); SystemExit in one sentence otherwise."""
    folder, _, rest = argument.partition(":")
    column, _, row = rest.partition("@")
    if not column:
        raise SystemExit(f"compare.py: error: {argument!r}: give FOLDER:COLUMN[@ROW], e.g. 'results/cpu:BM+MPO prior'")
    runs = load_published(Path(folder))
    if not runs:
        raise SystemExit(f"compare.py: error: {folder} holds no published runs (<folder>/runs/*/summary.json)")
    rows = {label: values for (label, _), values in table_rows(runs, []).items() if column in values}
    if not rows:
        columns = sorted({name for values in table_rows(runs, []).values() for name in values if name != "best"})
        raise SystemExit(f"compare.py: error: {folder} has no column {column!r} (its columns: {', '.join(columns)})")
    if row and row not in rows or not row and len(rows) > 1:
        raise SystemExit(f"compare.py: error: {argument!r}: {'no row ' + repr(row) if row else 'several rows'} in "
                         f"{folder}; add one of @" + ", @".join(rows))
    label = row or next(iter(rows))
    return f"{folder}: {column} ({label})", rows[label][column]


def report(cells: list[tuple[str, list[float]]]) -> str:
    lines = ["| cell | final return, mean over seeds [95% CI] (seeds) |", "|---|---|"]
    lines += [f"| {label} | {mean_std(values)} |" for label, values in cells]
    lines += ["", "| first | second | difference of means [95% CI] | interval excludes 0 | P(first > second) [95% CI] |",
              "|---|---|---|---|---|"]
    for i, (first, x) in enumerate(cells):
        for second, y in cells[i + 1:]:
            if len(x) < 2 or len(y) < 2:
                lines.append(f"| {first} | {second} | (needs 2 seeds in each) | - | - |")
                continue
            lines.append(f"| {first} | {second} | {difference_cells(x, y)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", metavar="FOLDER:COLUMN[@ROW]", help="two or more table cells")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown to this file, with the command")
    args = parser.parse_args()
    if len(args.cells) < 2:
        parser.error("give at least two cells to compare")
    text = report([cell(argument) for argument in args.cells])
    print(text, end="")
    if args.out:
        command = "python benchmarks/compare.py " + " ".join(f'"{c}"' for c in args.cells)
        args.out.write_text(f"Command: `{command}`\n\n{text}")


if __name__ == "__main__":
    main()
