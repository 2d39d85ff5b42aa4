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

    python benchmarks/compare.py "results/cpu-snippets:ABM+MPO prior" "results/cpu-long:BM+MPO prior" --final-eval

--final-eval compares the runs' final_eval instead (reproduce.py's final_eval_episodes: each run's final checkpoint
from start states shared by every run) and pairs the cells seed for seed, as table.md's section on it does: the mean
over the seeds both cells have of first - second [95% interval, seeds resampled], and how many seeds the first wins.
Seed s of two presets on the same data starts from the same weights and meets the same start states.

    python benchmarks/compare.py "results/cpu-long:ABM+MPO" "results/cpu-long:BM+MPO" "results/cpu-mpo:MPO" \
        --final-eval --against-first

--against-first pairs the first cell with each of the others only (n - 1 rows instead of every pair): one column
against the rest, as a table of many columns is read.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import difference_cells, final_eval_rows, load_published, mean_std, paired, table_rows  # noqa: E402


def cell(argument: str, final_eval: bool = False) -> tuple[str, list[float]]:
    """`FOLDER:COLUMN[@ROW]` -> (its label, the final returns of its seeds; with `final_eval`, {seed: final_eval
    return}); SystemExit in one sentence otherwise."""
    folder, _, rest = argument.partition(":")
    column, _, row = rest.partition("@")
    if not column:
        raise SystemExit(f"compare.py: error: {argument!r}: give FOLDER:COLUMN[@ROW], e.g. 'results/cpu:BM+MPO prior'")
    runs = load_published(Path(folder))
    if not runs:
        raise SystemExit(f"compare.py: error: {folder} holds no published runs (<folder>/runs/*/summary.json)")
    if final_eval:
        table = final_eval_rows([run for run in runs if run["env"] != "sawyer"])
        if not table:
            raise SystemExit(f"compare.py: error: {folder}'s runs have no final_eval (its preset has no "
                             f"final_eval_episodes); compare their final returns without --final-eval")
    else:
        table = {label: values for (label, _), values in table_rows(runs, []).items()}
    rows = {label: values for label, values in table.items() if column in values}
    if not rows:
        columns = sorted({name for values in table.values() for name in values if name != "best"})
        raise SystemExit(f"compare.py: error: {folder} has no column {column!r} (its columns: {', '.join(columns)})")
    if row and row not in rows or not row and len(rows) > 1:
        raise SystemExit(f"compare.py: error: {argument!r}: {'no row ' + repr(row) if row else 'several rows'} in "
                         f"{folder}; add one of @" + ", @".join(rows))
    label = row or next(iter(rows))
    return f"{folder}: {column} ({label})", rows[label][column]


def report(cells: list, final_eval: bool = False, against_first: bool = False) -> str:
    """Each cell's mean over its seeds, then every pair (`against_first`: the first cell with each other): the
    difference of means and P(first > second), each with its interval; with `final_eval` ({seed: return} cells),
    the paired difference over the seeds both cells have."""
    measure = "final_eval return" if final_eval else "final return"
    lines = [f"| cell | {measure}, mean over seeds [95% CI] (seeds) |", "|---|---|"]
    lines += [f"| {label} | {mean_std(list(values.values()) if final_eval else values)} |" for label, values in cells]
    lines += ["", "| first | second | paired difference [95% CI] | first higher | interval excludes 0 |" if final_eval
              else "| first | second | difference of means [95% CI] | interval excludes 0 | P(first > second) [95% CI] |",
              "|---|---|---|---|---|"]
    for i, (first, x) in enumerate(cells[:1] if against_first else cells):
        for second, y in cells[i + 1:]:
            if final_eval:
                pair = paired(x, y) if set(x) & set(y) else "(no common seed) | - | -"
            else:
                pair = difference_cells(x, y) if len(x) >= 2 and len(y) >= 2 else "(needs 2 seeds in each) | - | -"
            lines.append(f"| {first} | {second} | {pair} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", metavar="FOLDER:COLUMN[@ROW]", help="two or more table cells")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown to this file, with the command")
    parser.add_argument("--final-eval", action="store_true",
                        help="compare the runs' final_eval (shared start states), paired seed for seed")
    parser.add_argument("--against-first", action="store_true",
                        help="pair the first cell with each of the others only, not every pair")
    args = parser.parse_args()
    if len(args.cells) < 2:
        parser.error("give at least two cells to compare")
    cells = [cell(argument, args.final_eval) for argument in args.cells]
    text = report(cells, args.final_eval, args.against_first)
    print(text, end="")
    if args.out:
        command = "python benchmarks/compare.py " + " ".join(f'"{c}"' for c in args.cells) + \
                  (" --final-eval" if args.final_eval else "") + (" --against-first" if args.against_first else "")
        args.out.write_text(f"Command: `{command}`\n\n{text}")


if __name__ == "__main__":
    main()
