"""Evaluate finished abm_mpo.py runs again, each from the same many start states: the final policy and prior.

    python benchmarks/final_eval.py runs/reproduce/cpu-quadruped/runs/*-seed* --episodes 50
    python benchmarks/final_eval.py RUN_DIR... --episodes 50 --seed 1000 --out final_eval.md --json final_eval.json
    python benchmarks/final_eval.py --from-json part1.json part2.json --episodes 50 --out final_eval.md  # pieces

A run's final return (the paper's protocol: the mean of its last 10% of evaluations) comes from a few episodes
whose start states follow the run's seed (reset(seed=seed + 100 + i)). Where the start state decides much of the
return, that noise can hide the differences between columns: quadruped-run starts in a random orientation, and a
quadruped that stays upright without running earns about 500, one left upside down about 0. This tool loads each
run's checkpoint.pt and acts with the policy the run evaluated and with its prior, in `--episodes` episodes that
start from reset(seed=--seed + i) for every run, so every run meets the same start states. Runs that differ only
in their seed form a cell. It prints each cell's mean over seeds with a 95% bootstrap interval, and for every pair
of cells the mean of the per-seed differences over their common seeds (paired: the same seed and the same start
states), with its 95% interval (seeds resampled) and the number of seeds where the first is higher.

Every learning script now does the same at the end of a run with --final-eval-episodes K (from reset(seed=1000 + i),
this tool's default --seed), into summary.json, and reproduce.py's presets ask for it with final_eval_episodes; this
tool stays for runs made without it whose resume is not wanted, and keeps every episode's return in --json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("MUJOCO_GL", "disable")  # nothing here renders
import abm_mpo  # noqa: E402  (the learning script itself: its networks, acting policy and evaluation)
from abm_filter import read_run  # noqa: E402  (config.json, checkpoint.pt and Args of an abm_mpo.py run)
from reproduce import machine, mean_std, paired  # noqa: E402  (the grid's statistics over seeds)

COLUMN = {"abm": "ABM+MPO", "bm": "BM+MPO", "none": "MPO"}


def cell_name(args) -> str:
    """The run's column, as the grid names it, with Eq. 4's N for an ABM prior: 'ABM+MPO N=10', 'BM+MPO'."""
    name = COLUMN[args.prior] + (f" N={args.snippet_length}" if args.prior == "abm" else "")
    return name + (" eps=0" if args.epsilon == 0 else "")


def load_run(run_dir: Path):
    """The run's Args and spec (config.json) and its Agent with the weights of checkpoint.pt, and that step."""
    config, state, args = read_run(run_dir, "final_eval.py", "their policy and prior")
    spec = config["spec"]
    agent = abm_mpo.Agent(spec["obs_dim"], spec["act_dim"], len(spec["tasks"]), args)
    agent.load_state_dict(state["agent"])  # the observation statistics are buffers of the networks: no data needed
    return args, spec, agent.eval(), state["step"]


@torch.no_grad()
def evaluate_run(run_dir: Path, episodes: int, seed: int) -> dict:
    """Returns of the run's policy (and prior, where it has both) in `episodes` episodes from reset(seed=seed + i),
    averaged over the tasks of a multi-task run: {"policy": [...], "prior": [...]}, with the run's labels."""
    args, spec, agent, step = load_run(run_dir)
    args.capture_video = False
    tasks = spec["tasks"]
    envs = abm_mpo.make_eval_envs(args, run_dir, tasks)
    actors = {"policy": agent.evaluated_policy()}
    if agent.prior is not None and agent.policy is not None:
        actors["prior"] = agent.prior
    result = {"run": str(run_dir), "cell": cell_name(args), "env": args.env, "seed": args.seed, "step": step,
              "total_steps": args.total_steps}
    for name, actor in actors.items():
        policy = abm_mpo.ActingPolicy(actor, spec)
        per_task = []
        for k in range(len(tasks)):
            act = lambda o, k=k: policy(torch.as_tensor(o, dtype=torch.float32)[None], torch.tensor([k]))[0].numpy()  # noqa: E731
            per_task.append(abm_mpo.evaluate(act, envs[k], episodes, seed, args.eval_max_steps))
        result[name] = np.mean(per_task, axis=0).tolist()
    return result


def report(results: list[dict], episodes: int, seed: int) -> str:
    envs = sorted({r["env"] for r in results})
    cells: dict = {}  # "<cell>" or "<cell> prior" -> {seed: mean return}
    for r in results:
        base = r["cell"] if len(envs) == 1 else f"{r['env']}: {r['cell']}"
        for name, suffix in (("policy", ""), ("prior", " prior")):
            if name in r:
                cells.setdefault(base + suffix, {})[r["seed"]] = float(np.mean(r[name]))
    lines = [f"Every run's final checkpoint, acting in the same {episodes} episodes (start states reset(seed={seed} + i), "
             f"i < {episodes}); a cell's seeds are its runs.", "",
             "| cell | mean over seeds [95% CI] (seeds) | per seed |", "|---|---|---|"]
    for name, values in cells.items():
        lines.append(f"| {name} | {mean_std(list(values.values()))} | "
                     + ", ".join(f"{s}: {v:.1f}" for s, v in sorted(values.items())) + " |")
    lines += ["", "Pairs: the mean over the seeds both cells have of first - second (the same seed and start states) "
                  "[95% CI, seeds resampled].", "",
              "| first | second | paired difference [95% CI] | first higher | interval excludes 0 |",
              "|---|---|---|---|---|"]
    names = list(cells)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if set(cells[first]) & set(cells[second]):
                lines.append(f"| {first} | {second} | {paired(cells[first], cells[second])} |")
    lines += ["", "| run | step | policy | prior |", "|---|---|---|---|"]
    for r in results:
        prior = f"{np.mean(r['prior']):.1f}" if "prior" in r else "-"
        lines.append(f"| {r['run']} | {r['step']} of {r['total_steps']} | {np.mean(r['policy']):.1f} | {prior} |")
    return "\n".join(lines) + "\n"


def read_json(paths: list, episodes: int, seed: int) -> list[dict]:
    """The runs of earlier --json files (the same evaluation evaluated in pieces); SystemExit in one sentence when
    a file is unreadable or evaluated other start states."""
    runs = []
    for path in paths:
        try:
            saved = json.loads(Path(path).read_text())
            found = (saved["episodes"], saved["seed"])
            runs += saved["runs"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"final_eval.py: error: {path} is not a --json file of final_eval.py ({error})") from None
        if found != (episodes, seed):
            raise SystemExit(f"final_eval.py: error: {path} evaluated --episodes {found[0]} --seed {found[1]}, not "
                             f"--episodes {episodes} --seed {seed}: its runs met other start states")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="*", type=Path, help="abm_mpo.py run directories (config.json, checkpoint.pt)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy and run (default 50)")
    parser.add_argument("--seed", type=int, default=1000,
                        help="episode i starts from reset(seed=SEED + i) in every run (default 1000: away from the "
                             "seeds the runs' own evaluations used, seed + 100 + i)")
    parser.add_argument("--from-json", nargs="+", default=[], metavar="JSON",
                        help="add the runs of these --json files (an evaluation done in pieces, with the same "
                             "--episodes and --seed) to the report")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write every return to this JSON file")
    args = parser.parse_args()
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    if not args.run_dirs and not args.from_json:
        parser.error("give run directories, --from-json files, or both")
    torch.set_num_threads(1)  # one episode's acting is a batch of one: more threads only contend
    results, started = read_json(args.from_json, args.episodes, args.seed), time.time()
    for run_dir in args.run_dirs:
        results.append(evaluate_run(run_dir, args.episodes, args.seed))
        print(f"{run_dir}: policy {np.mean(results[-1]['policy']):.1f}"
              + (f", prior {np.mean(results[-1]['prior']):.1f}" if "prior" in results[-1] else ""), flush=True)
    text = report(results, args.episodes, args.seed)
    print(text, end="")
    command = "python benchmarks/final_eval.py " + " ".join(map(str, args.run_dirs)) + \
              f" --episodes {args.episodes} --seed {args.seed}" + \
              (" --from-json " + " ".join(args.from_json) if args.from_json else "")
    if args.out:
        args.out.write_text(f"Command: `{command}`\n\n{text}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "episodes": args.episodes, "seed": args.seed,
                                         "machine": machine()["cpu"], "wall_seconds": round(time.time() - started),
                                         "runs": results}, indent=1))


if __name__ == "__main__":
    main()
