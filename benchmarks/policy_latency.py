"""Cost of exporting a policy and of one exported-policy step, against real_robot.py's 50 ms deadline.

    python benchmarks/policy_latency.py [--layers 256 256] [--calls 500]

Builds the paper's multi-task Gaussian policy for the Sawyer (103 observations, 5 actions, 9 task
heads), exports it with abm_mpo.export_policy (first export in the process, then a second one),
and times single-observation calls of the exported program as real_robot.py makes them, with one
and with two torch threads. Prints the machine's load average, which these numbers depend on.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import abm_mpo  # noqa: E402
import real_robot  # noqa: E402
import sawyer_env  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = {"env": "sawyer", "obs_dim": sawyer_env.OBS_DIM, "act_dim": sawyer_env.ACT_DIM, "tasks": list(sawyer_env.ALL_TASKS),
            "action_low": [-1.0] * 5, "action_high": [1.0] * 5,
            "env_action_low": sawyer_env.ACTION_LOW.tolist(), "env_action_high": sawyer_env.ACTION_HIGH.tolist()}
    net = abm_mpo.GaussianPolicy(sawyer_env.OBS_DIM, sawyer_env.ACT_DIM, tuple(args.layers), len(spec["tasks"]), 1)
    path = Path(tempfile.mkdtemp()) / "policy.pt2"
    print(f"load average {os.getloadavg()[0]:.2f}, policy {args.layers}, {len(spec['tasks'])} heads")
    for attempt in ("first", "second"):
        start = time.perf_counter()
        abm_mpo.export_policy(abm_mpo.ActingPolicy(net, spec), spec, path.parent)
        print(f"export ({attempt} in this process): {time.perf_counter() - start:.2f} s")
    observation = np.random.default_rng(0).standard_normal(sawyer_env.OBS_DIM).astype(np.float32)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        act, _ = real_robot.load_policy(path)
        times = []
        for _ in range(args.calls + 5):
            start = time.perf_counter()
            act(observation, 5)
            times.append(time.perf_counter() - start)
        ms = 1000 * np.array(times[5:])
        print(f"{threads} thread(s): median {np.median(ms):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms, "
              f"max {ms.max():.2f} ms, over {real_robot.DEADLINE * 1000:.0f} ms: {int(np.sum(ms > 50))} of {len(ms)}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
