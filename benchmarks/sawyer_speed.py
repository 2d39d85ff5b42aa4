"""Speed of the simulated Sawyer (sawyer_env.py) on one core, and the success rates of its
scripted behaviour policies per task.

    python benchmarks/sawyer_speed.py [--episodes 20] [--repeats 3] [--noise 0.3]

Prints simulated control steps per second (median of `--repeats` runs of random actions, and
of scripted actions including the policy's own cost), then a markdown table of the fraction
of episodes whose last step is a success, per task, at noise 0 and at `--noise`.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"  # one core: set before numpy loads its BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sawyer_env as se  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steps_per_second(env, episodes: int, scripted: bool, seed: int) -> float:
    rng = np.random.default_rng(seed)
    steps, start = 0, time.perf_counter()
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            if scripted:
                action = se.scripted_policy("stack", observation, rng, se.DEFAULT_NOISE)
            else:
                action = rng.uniform(se.ACTION_LOW, se.ACTION_HIGH).astype(np.float32)
            observation, _, terminated, truncated, _ = env.step(action)
            steps += 1
            done = terminated or truncated
    return steps / (time.perf_counter() - start)


def success_rate(env, task: str, episodes: int, noise: float) -> tuple[float, float]:
    """(fraction of episodes ending in success, fraction terminated by the 20 N rule)"""
    column = se.ALL_TASKS.index(task)
    successes = terminations = 0
    for seed in range(episodes):
        rng = np.random.default_rng(1000 + seed)
        episode = se.collect_episode(env, task, rng, noise, seed=seed)
        successes += bool(episode["success"][-1, column])
        terminations += episode["terminated"]
    return successes / episodes, terminations / episodes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task and noise")
    parser.add_argument("--speed-episodes", type=int, default=5, help="episodes per speed run")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs; the median is shown")
    parser.add_argument("--noise", type=float, default=se.DEFAULT_NOISE,
                        help="action noise std as a fraction of the action limits")
    args = parser.parse_args()
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    env = se.SawyerEnv("stack")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, Python "
          f"{platform.python_version()}, mujoco {se.mujoco.__version__}, one thread")
    for label, scripted in (("random actions", False), ("scripted stack policy", True)):
        runs = [steps_per_second(env, args.speed_episodes, scripted, seed=100 * r)
                for r in range(args.repeats)]
        print(f"{label}: {statistics.median(runs):.0f} control steps/s "
              f"(median of {args.repeats} x {args.speed_episodes} episodes; "
              f"{statistics.median(runs) * se.CONTROL_TIMESTEP:.0f}x real time)")
    print(f"\nScripted policies, success at the last step over {args.episodes} episodes "
          f"(seeds 0-{args.episodes - 1}); terminated = ended by the 20 N rule\n")
    print(f"| task | success, noise 0 | success, noise {args.noise} "
          f"| terminated, noise {args.noise} |")
    print("|---|---|---|---|")
    for task in se.ALL_TASKS:
        clean, _ = success_rate(env, task, args.episodes, 0.0)
        noisy, terminated = success_rate(env, task, args.episodes, args.noise)
        print(f"| {task} | {clean:.2f} | {noisy:.2f} | {terminated:.2f} |", flush=True)


if __name__ == "__main__":
    main()
