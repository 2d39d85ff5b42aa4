"""Effect of --normalize-observations on a short ABM+MPO run on the simulated Sawyer.

    python benchmarks/observation_normalisation.py [--seeds 0 1] [--total-steps 2000] [--task reach]

Collects a 100-episode Sawyer dataset with collect.py (once, in --workdir), then runs abm_mpo.py on
one task with raw and with standardised observations for each seed (batch 64, one torch thread,
3 evaluation episodes every 500 updates) and prints a markdown table of the policy and prior
returns at every evaluation, with the machine's load average.
"""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(command: list) -> None:
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--total-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--task", default="reach")
    parser.add_argument("--workdir", default="/tmp/observation_normalisation")
    options = parser.parse_args()
    workdir = Path(options.workdir)
    dataset = workdir / "sawyer100.npz"
    if not dataset.exists():
        run(["collect.py", "--env", "sawyer", "--episodes", "100", "--output", str(dataset)])
    print(f"load average before: {os.getloadavg()}\n")
    print("| seed | observations | update | policy return | prior return |\n|---|---|---|---|---|")
    for seed in options.seeds:
        for normalize in (False, True):
            run_dir = workdir / f"{'standardised' if normalize else 'raw'}_seed{seed}"
            run(["abm_mpo.py", "--env", "sawyer", "--task", options.task, "--dataset", str(dataset),
                 "--batch-size", "64", "--total-steps", str(options.total_steps), "--eval-every",
                 str(options.eval_every), "--eval-episodes", "3", "--checkpoint-every", str(options.total_steps),
                 "--device", "cpu", "--seed", str(seed), "--normalize-observations", str(normalize),
                 "--run-dir", str(run_dir), "--overwrite"])  # a rerun replaces the last one
            with open(run_dir / "metrics.csv") as handle:
                for row in csv.DictReader(handle):
                    print(f"| {seed} | {'standardised' if normalize else 'raw'} | {row['step']} | "
                          f"{float(row['eval/return']):.1f} | {float(row['eval/prior_return']):.1f} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
