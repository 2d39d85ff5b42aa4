"""Does Eq. 4 keep the better actions? Its decisions against advantages measured in the simulator (cheetah).

    python benchmarks/advantage_truth.py runs/reproduce/cpu-snippets2/runs/cheetah-all80-ABM_MPO-seed*
    python benchmarks/advantage_truth.py RUN_DIR... --transitions 400 --horizon 100 --samples 8 \\
        --snippet-lengths 2 10 100 --out truth.md --json truth.json

abm_filter.py says which logged transitions Eq. 4 keeps; the data alone cannot say whether their actions were the
better ones, since it holds one action per state. The simulator can. A cheetah observation (every joint position
but the root's x, and every velocity) fixes the physics state up to that x, which neither the dynamics nor the
reward depend on: set from a logged s_t, one step of the logged a_t gives back the logged s_{t+1} and r_t to float
precision (tests/test_advantage_truth.py). So, for `--transitions` transitions drawn from the data and for each
abm_mpo.py run given, with the policy Eq. 4's last update used (the target policy):

    Q(s, a) = r(s, a) + sum_{k=1}^{H-1} gamma^k r_k     the rollout after a acts with the policy's mean,
    V(s)    = mean of Q(s, a_j) over `--samples` actions a_j ~ pi(.|s),
    the logged action did better when Q(s, a_t) - V(s) >= 0   (the test Eq. 4 approximates, with pi's own values),
and as a yardstick of how much one action matters there, the same for the policy's own mean action.

Beside that truth, each N's Eq. 4 decision (the same critic and policy, abm_filter.score) and the critic's own
advantage Q(s_t, a_t) - V(s_t) (no logged rewards: N = 0). The report gives, per N, the fraction kept, the share of
the kept and of the dropped transitions whose action truly did better (against the share among all of them: what a
BM prior, which keeps everything, imitates), the accuracy and phi of the decisions against the truth, and the rank
correlation of each advantage with the simulator's. Differences from Eq. 4's own V: the rollouts follow the policy's
mean after the first action (not samples) and stop after H steps (gamma^H of the tail left out, on both sides).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("MUJOCO_GL", "disable")  # nothing here renders
import abm_mpo  # noqa: E402  (the learning script itself: its env, networks and Eq. 4)
from abm_filter import load_run, phi, score, spearman  # noqa: E402  (a run's critic, policy and data; Eq. 4 per row)

RESTORABLE = {"cheetah-run"}  # tasks whose observation fixes the physics state (set_state)


def set_state(env, observation: np.ndarray) -> None:
    """The cheetah's physics state from an observation: qpos = (x = 0, the 8 positions), qvel = the 9 velocities."""
    physics = env.env.physics
    env.env.reset()  # its step count back to 0: a rollout never meets the 1,000-step limit
    with physics.reset_context():
        physics.data.qpos[0] = 0.0
        physics.data.qpos[1:] = observation[: physics.model.nq - 1]
        physics.data.qvel[:] = observation[physics.model.nq - 1:]


@torch.no_grad()
def rollout_returns(envs: list, policy, observation: np.ndarray, first_actions: np.ndarray, horizon: int,
                    gamma: float) -> np.ndarray:
    """The discounted return of each env, all set to `observation`, taking its row of `first_actions` and then the
    policy's mean for horizon - 1 steps, in lockstep (one policy pass per step for all of them)."""
    obs, rewards = [], []
    for env, action in zip(envs, first_actions):
        set_state(env, observation)
        next_obs, reward, *_ = env.step(action)
        obs.append(next_obs)
        rewards.append(reward)
    returns = np.array(rewards)
    for k in range(1, horizon):
        mean, _ = policy(torch.as_tensor(np.stack(obs))[None])  # [1, envs, act]
        steps = [env.step(action) for env, action in zip(envs, mean[0].numpy())]
        obs = [step[0] for step in steps]
        returns += gamma ** k * np.array([step[1] for step in steps])
    return returns


def measure(run_dir: Path, loaded: tuple, rows: np.ndarray, lengths: list, horizon: int, samples: int,
            seed: int) -> dict:
    """One run (`loaded`: abm_filter.load_run's): the simulator's advantage of the logged action at each of `rows`,
    and Eq. 4's at each N."""
    args, data, tasks, spec, agent, step = loaded
    task = abm_mpo.CONTROL_SUITE_ALIASES.get(args.env, args.env)
    if task not in RESTORABLE or len(tasks) != 1:
        raise SystemExit(f"advantage_truth.py: error: {run_dir} learned on {args.env}; only {', '.join(RESTORABLE)} "
                         "sets its simulator from an observation")
    envs = [abm_mpo.make_env(args.env) for _ in range(samples + 2)]
    generator = torch.Generator().manual_seed(seed)
    observation, action = data["observation"].numpy(), data["action"].numpy()
    truth, own, spread, started = [], [], [], time.time()
    for row in rows:
        mean, std = agent.target_policy(torch.as_tensor(observation[row])[None, None])
        drawn = (mean + std * torch.randn((samples, *mean.shape[2:]), generator=generator))[0].numpy()
        returns = rollout_returns(envs, agent.target_policy, observation[row],
                                  np.concatenate([action[row][None], mean[0].numpy(), drawn]), horizon, args.discount)
        truth.append(returns[0] - returns[2:].mean())
        own.append(returns[1] - returns[2:].mean())  # the policy's mean action: how much one first action matters
        spread.append(returns[2:].std())
    result = {"run": str(run_dir), "update": step, "snippet_length": args.snippet_length, "rows": rows.tolist(),
              "truth": np.array(truth), "mean_action": np.array(own), "spread": np.array(spread),
              "seconds": time.time() - started, "filters": {}}
    for length in lengths:  # the loaded run's own N stays
        scores = score(dataclasses.replace(args, snippet_length=length), data, spec, agent, seed, rows)
        result["filters"] = {"critic alone (N = 0)": scores["critic_advantage"][:, 0], **result["filters"],
                             f"N = {length}": scores["advantage"][:, 0]}
    return result


def rates(truth: np.ndarray, advantage: np.ndarray) -> dict:
    """How a filter that keeps advantage >= 0 sorts the transitions against the truth (truth >= 0: did better)."""
    better, kept = truth >= 0, advantage >= 0
    return {"kept": kept.mean(), "better_among_kept": better[kept].mean() if kept.any() else np.nan,
            "better_among_dropped": better[~kept].mean() if (~kept).any() else np.nan,
            "accuracy": (better == kept).mean(), "phi": phi(better.astype(float), kept.astype(float)),
            "rank_correlation": spearman(truth, advantage)}


def report(results: list[dict], horizon: int, samples: int, again: np.ndarray) -> str:
    """The table of rates() per filter, mean ± std over the runs; `again`: the first run's truth measured a second
    time with other sampled first actions, the noise floor of the truth itself."""
    names = list(results[0]["filters"])
    first = results[0]["truth"]
    columns = ("kept", "better_among_kept", "better_among_dropped", "accuracy", "phi", "rank_correlation")
    lines = [f"Eq. 4's decisions against the simulator's advantage of the logged action (rollouts of {horizon} steps, "
             f"V over {samples} sampled first actions), {len(results[0]['truth'])} transitions per run; mean ± std "
             f"over {len(results)} run(s). Truly better among all: "
             f"{np.mean([(r['truth'] >= 0).mean() for r in results]):.2f} (what a BM prior, keeping all, imitates). "
             f"The truth's own noise: measured again with other sampled first actions, the first run's signs agree "
             f"on {((first >= 0) == (again >= 0)).mean():.2f} of the transitions (phi "
             f"{phi((first >= 0).astype(float), (again >= 0).astype(float)):.2f}), the best any filter can reach. "
             f"How much one first action matters: the policy's own mean action beats V in "
             f"{np.mean([(r['mean_action'] >= 0).mean() for r in results]):.2f} of the states (mean advantage "
             f"{np.mean([r['mean_action'].mean() for r in results]):.2f}; the logged action's "
             f"{np.mean([r['truth'].mean() for r in results]):.2f}), against a spread (std) of "
             f"{np.mean([r['spread'].mean() for r in results]):.2f} in Q over the sampled first actions.",
             "", "| filter | kept | truly better among kept | among dropped | accuracy | phi | "
                 "rank corr. of advantages |", "|---|---|---|---|---|---|---|"]
    for name in names:
        per_run = [rates(r["truth"], r["filters"][name]) for r in results]
        with warnings.catch_warnings():  # a rate no run defines (nothing kept, say) stays nan
            warnings.simplefilter("ignore", RuntimeWarning)
            lines.append(f"| {name} | " + " | ".join(
                f"{np.nanmean([p[c] for p in per_run]):.2f} ± {np.nanstd([p[c] for p in per_run]):.2f}"
                for c in columns) + " |")
    lines += ["", "| run | update | seconds of rollouts |", "|---|---|---|"]
    lines += [f"| {Path(r['run']).name} | {r['update']:,} | {r['seconds']:.0f} |" for r in results]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="abm_mpo.py run directories on cheetah data")
    parser.add_argument("--transitions", type=int, default=400, help="transitions drawn from the data (default 400)")
    parser.add_argument("--horizon", type=int, default=100, help="steps of each rollout, H (default 100)")
    parser.add_argument("--samples", type=int, default=8, help="sampled first actions V averages over (default 8)")
    parser.add_argument("--snippet-lengths", type=int, nargs="+", default=[2, 10, 100], metavar="N")
    parser.add_argument("--seed", type=int, default=0, help="of the drawn transitions and first actions")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    args = parser.parse_args()
    if min(args.transitions, args.horizon, args.samples, *args.snippet_lengths) < 1:
        parser.error("--transitions, --horizon, --samples and --snippet-lengths must be positive")
    results, first = [], None
    for run_dir in args.run_dirs:
        loaded = load_run(run_dir)
        first = first or (run_dir, loaded)  # measured again below: the truth's own noise
        size = len(loaded[1]["observation"])
        rows = np.sort(np.random.default_rng(args.seed).choice(size, min(args.transitions, size), replace=False))
        results.append(measure(run_dir, loaded, rows, args.snippet_lengths, args.horizon, args.samples, args.seed))
        print(f"{run_dir}: {results[-1]['seconds']:.0f} s of rollouts", flush=True)
    again = measure(*first, np.array(results[0]["rows"]), [], args.horizon, args.samples, args.seed + 1)["truth"]
    table = report(results, args.horizon, args.samples, again)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps([{**r, **{key: r[key].tolist() for key in ("truth", "mean_action", "spread")},
                                          "filters": {k: v.tolist() for k, v in r["filters"].items()}}
                                         for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
