"""Learning curves of any set of run directories, drawn the way the paper's Figures 1-2 are.

    python benchmarks/plot.py runs/abm_mpo__walker__0__* runs/bcq__walker__* --out walker.png

One panel per task (env, task and `--dataset-episodes`), two rows: the return of the policy
(`eval/return` in metrics.csv) and the return of the prior run on its own (`eval/prior_return`;
no such row when no run has a prior), against gradient updates. Runs whose config.json differs
only in the seed are one curve: the mean over seeds, shaded +- one standard deviation (at the
updates every seed has reached). The best episode return in the run's dataset is a dashed
horizontal line. A multi-task run (Sawyer `--task all`) gives one panel per task from
`eval/return/<task>`. Curves are labelled by the script and the flags that differ between the
runs given; benchmarks/reproduce.py passes its own column names instead.
"""

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# Flags that do not change what a run learns: never part of a curve's label.
NOT_A_SETTING = {"seed", "run_dir", "resume", "total_steps", "eval_every", "eval_episodes", "eval_max_steps",
                 "checkpoint_every", "device", "track", "wandb_project", "capture_video", "dataset"}
PANEL_KEYS = ("env", "task", "dataset_episodes")


@dataclass
class Curve:
    """One run's evaluations of one task."""

    steps: np.ndarray
    policy: np.ndarray
    prior: Optional[np.ndarray]  # None when the run has no prior (MPO with --prior none, SVG)
    best_in_data: Optional[float]


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(config.json, rows of metrics.csv) of a run directory."""
    config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.csv"
    if not config_file.exists() or not metrics_file.exists():
        raise SystemExit(f"{run_dir} is not a run directory: it needs config.json and metrics.csv")
    with open(metrics_file) as handle:
        return json.loads(config_file.read_text()), list(csv.DictReader(handle))


def column_of(rows: list[dict], key: str) -> Optional[np.ndarray]:
    values = [row.get(key, "") for row in rows]
    if not values or any(value in ("", None) for value in values):
        return None
    return np.asarray(values, dtype=np.float64)


def task_curves(config: dict, rows: list[dict]) -> dict[str, Curve]:
    """task -> its Curve; `eval/return/<task>` for a multi-task run, `eval/return` otherwise."""
    tasks = config["spec"]["tasks"]
    best = config["spec"].get("best_episode_return_in_dataset", {})
    steps = column_of(rows, "step")
    curves = {}
    for task in tasks:
        suffix = f"/{task}" if len(tasks) > 1 else ""
        policy = column_of(rows, f"eval/return{suffix}")
        if steps is None or policy is None:
            continue
        curves[task] = Curve(steps, policy, column_of(rows, f"eval/prior_return{suffix}"), best.get(task))
    return curves


def panel_name(config: dict, task: str) -> str:
    args = config["args"]
    name = task if args["env"] in task else f"{args['env']} {task}"  # "walker-walk", not "walker walker-walk"
    if len(config["spec"]["tasks"]) > 1:
        name += f" (1 of {len(config['spec']['tasks'])} tasks)"
    if args.get("dataset_episodes"):
        name += f", first {args['dataset_episodes']} episodes per collecting run"
    return name


def default_labels(configs: list[dict]) -> list[str]:
    """script + the flags that differ between the runs (seeds and bookkeeping flags left out)."""
    keys = sorted({key for config in configs for key in config["args"]} - NOT_A_SETTING - set(PANEL_KEYS))
    differing = [key for key in keys if len({json.dumps(c["args"].get(key)) for c in configs}) > 1]
    return [" ".join([config["script"]] + [f"--{key.replace('_', '-')} {config['args'].get(key)}" for key in differing])
            for config in configs]


def collect_panels(run_dirs: list[Path], labels: Optional[list[str]] = None) -> dict[str, dict[str, list[Curve]]]:
    """panel -> label -> one Curve per seed."""
    runs = [read_run(Path(run_dir)) for run_dir in run_dirs]
    labels = labels or default_labels([config for config, _ in runs])
    panels: dict[str, dict[str, list[Curve]]] = {}
    for (config, rows), label in zip(runs, labels):
        for task, curve in task_curves(config, rows).items():
            panels.setdefault(panel_name(config, task), {}).setdefault(label, []).append(curve)
    return panels


def seed_band(curves: list[Curve], which: str) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, mean, std) over seeds at the updates every seed has reached."""
    series = [(c.steps, getattr(c, which)) for c in curves if getattr(c, which) is not None]
    if not series:
        return None
    common = sorted(set.intersection(*[set(steps.tolist()) for steps, _ in series]))
    if not common:
        return None
    values = np.stack([[dict(zip(steps.tolist(), ys.tolist()))[s] for s in common] for steps, ys in series])
    return np.asarray(common), values.mean(axis=0), values.std(axis=0)


def plot_panels(panels: dict[str, dict[str, list[Curve]]], out: Path, title: str = "",
                order: Optional[Callable[[str], object]] = None) -> Path:
    """Draw the panels (columns) x {policy, prior} (rows) figure to `out` (PNG); no prior row when no run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(panels, key=order) if order else list(panels)
    labels = list(dict.fromkeys(label for name in names for label in panels[name]))
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(labels)}
    rows = [("policy", "return of the policy")]
    if any(c.prior is not None for by_label in panels.values() for curves in by_label.values() for c in curves):
        rows.append(("prior", "return of the prior"))
    figure, axes = plt.subplots(len(rows), len(names), figsize=(4.2 * len(names), 0.4 + 3 * len(rows)), squeeze=False,
                                sharex="col")
    for column, name in enumerate(names):
        for row, (which, ylabel) in enumerate(rows):
            axis = axes[row][column]
            for label, curves in panels[name].items():
                band = seed_band(curves, which)
                if band is None:
                    continue
                steps, mean, std = band
                axis.plot(steps, mean, color=colours[label], label=f"{label} ({len(curves)})")
                axis.fill_between(steps, mean - std, mean + std, color=colours[label], alpha=0.2, linewidth=0)
            best = [c.best_in_data for curves in panels[name].values() for c in curves if c.best_in_data is not None]
            if best:
                axis.axhline(max(best), color="black", linestyle="--", linewidth=1, label="best episode in the data")
            if row == 0:
                axis.set_title(name, fontsize=9)
            if row == len(rows) - 1:
                axis.set_xlabel("gradient updates")
            if column == 0:
                axis.set_ylabel(ylabel)
    handles = {}
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    columns = min(4 if len(names) > 1 else 2, len(handles))  # a one-panel figure is narrow
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=8,
                  title="(n) = seeds; shaded: mean +- std over seeds", title_fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    legend_inches = 0.4 + 0.2 * ((len(handles) - 1) // columns)  # below the panels, whatever the figure's height
    figure.tight_layout(rect=(0, legend_inches / figure.get_figheight(), 1, 0.97 if title else 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110, bbox_inches="tight")  # the legend may be wider than the panels
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (config.json + metrics.csv)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG file to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    print(plot_panels(collect_panels(args.run_dirs), args.out, args.title))


if __name__ == "__main__":
    main()
