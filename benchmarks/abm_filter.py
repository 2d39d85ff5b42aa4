"""What an ABM prior keeps: the share of each episode's transitions that Eq. 4 accepts, against the episode's return.

    python benchmarks/abm_filter.py runs/reproduce/cpu/runs/cheetah-all80-ABM_MPO-seed*   # one or more run dirs
    python benchmarks/abm_filter.py RUN_DIR... --out filter.md --json filter.json
    python benchmarks/abm_filter.py RUN_DIR... --snippet-lengths 1 10 100   # the same critics, other N

The ABM prior (Eq. 4) imitates a logged action a_t when the advantage of its snippet is non-negative:

    R(s_t..s_N) + gamma^N V(s_N) - V(s_t) >= 0,   V(s) = mean_j Q(s, a_j), a_j ~ pi(.|s)

"Keep doing what worked" holds only when that test prefers the good episodes of the data. For each abm_mpo.py
run directory given, this loads checkpoint.pt (the target critic and target policy, as its last update used them)
and the run's own data, scores every transition of it with M samples from the run's M and snippet length, and
prints the fraction accepted overall and in each fifth of the episodes ranked by return (lowest first), the mean
V(s_t) beside the mean discounted return-to-go of the data, the rank correlation between an episode's return
and its accepted fraction, and the share of the accept/reject decisions' variance that lies between episodes
(1: Eq. 4 keeps or drops whole episodes, as a return filter does; 0: every episode keeps the same fraction, so
what it filters are actions inside episodes). Any abm_mpo.py run works (`--prior bm` and `none` too: what ABM
would keep under that run's critic). Several runs are also summarised as mean +- std over runs. `--snippet-lengths` scores the same
checkpoints with other N: how sharply Eq. 4 filters depends on how much of the logged rewards it reads. Last, how
far the runs agree on which transitions to keep (phi of their decisions, per pair of runs on the same data), beside
the first run's critic scored again with other action samples for V: whether the filter picks the same actions
from run to run, or flips coins.
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "disable")  # nothing here renders
import abm_mpo  # noqa: E402  (the learning script itself: its networks, data loading and Eq. 4)

FIFTHS = 5
CHUNK = 4096  # transitions scored at once


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing the mean of their ranks (an accepted fraction is often 0 or 1)."""
    order = np.argsort(values, kind="stable")
    positions = np.empty(len(values))
    positions[order] = np.arange(len(values))
    _, tie, count = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(tie, positions) / count)[tie]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (nan when either is constant)."""
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def read_run(run_dir: Path, tool: str = "abm_filter.py", reads: str = "their critic, target policy and snippets"):
    """An abm_mpo.py run's config.json, checkpoint.pt (on the CPU) and Args; SystemExit in one sentence, from `tool`,
    for a folder that is not one (also benchmarks/final_eval.py's)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(f"{tool}: error: {run_dir} is not a run directory with config.json and "
                         f"checkpoint.pt ({error})") from None
    if config.get("script") != "abm_mpo":
        raise SystemExit(f"{tool}: error: {run_dir} is a run of {config.get('script')}.py; this reads "
                         f"abm_mpo.py runs ({reads})")
    return config, state, abm_mpo.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["args"].items()})


def load_run(run_dir: Path):
    """The run's Args (config.json), data, spec and Agent with the checkpoint's weights."""
    config, state, args = read_run(run_dir)
    dataset = Path(config["spec"]["dataset"])  # relative to where the run started: here, or the repository's root
    args.dataset = str(ROOT / dataset if not dataset.exists() and (ROOT / dataset).exists() else dataset)
    if Path(args.dataset).is_file() and "dataset_sha256" in config and \
            hashlib.sha256(Path(args.dataset).read_bytes()).hexdigest() != config["dataset_sha256"]:
        raise SystemExit(f"abm_filter.py: error: {args.dataset} is not the data {run_dir} learned from (its SHA-256 "
                         f"differs from config.json's), so its critic would be scored on other transitions")
    try:
        data, tasks, spec = abm_mpo.load_data(args, abm_mpo.make_env(args.env), torch.device("cpu"))
    except abm_mpo.UserError as error:  # the data moved, for one
        raise SystemExit(f"abm_filter.py: error: {run_dir}: {error} (config.json names it relative to the "
                         f"directory the run started in)") from None
    agent = abm_mpo.Agent(spec["obs_dim"], spec["act_dim"], len(tasks), args)
    agent.load_state_dict(state["agent"])
    return args, data, tasks, spec, agent, state["step"]


@torch.no_grad()
def score(args, data: dict, spec: dict, agent, seed: int = 0, rows: Optional[np.ndarray] = None) -> dict:
    """Per transition (every one, or those of `rows`) and task: the Eq. 4 weight and advantage, V(s_t), and the
    critic's own advantage of the logged action Q(s_t, a_t) - V(s_t), as the run's last update computed them
    (target networks, M samples, snippets of args.snippet_length), [N, K] arrays."""
    generator = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(spec["action_low"]), torch.tensor(spec["action_high"])
    size, num_tasks = data["reward"].shape
    parts = {"weight": [], "advantage": [], "value": [], "critic_advantage": []}
    for chunk in (torch.arange(size) if rows is None else torch.as_tensor(rows)).split(CHUNK):
        index = chunk.expand(num_tasks, -1)  # [K, B]
        batch = abm_mpo.sample_batch(data, index.shape[1], args.snippet_length, args.discount, generator, index)
        states = torch.cat([batch["observation"], batch["bootstrap_observation"]], dim=1)  # [K, 2B, obs]
        mean, std = agent.target_policy(states)
        noise = torch.randn((args.num_action_samples, *mean.shape), generator=generator)
        value, bootstrap_value = abm_mpo.q_values(agent.target_critic, states, mean + std * noise, low, high) \
            .mean(0).split(index.shape[1], dim=1)
        parts["weight"].append(abm_mpo.advantage_weights(batch["snippet_return"], batch["bootstrap_discount"],
                                                         bootstrap_value, value).T)
        parts["advantage"].append((batch["snippet_return"] + batch["bootstrap_discount"] * bootstrap_value - value).T)
        parts["value"].append(value.T)
        logged = abm_mpo.q_values(agent.target_critic, batch["observation"], batch["action"][None], low, high)[0]
        parts["critic_advantage"].append((logged - value).T)
    return {name: torch.cat(chunks).numpy() for name, chunks in parts.items()}


def returns_to_go(reward: np.ndarray, discount: np.ndarray, episode_last: np.ndarray, gamma: float) -> np.ndarray:
    """The data's discounted return from each transition to its episode's end, [N, K]: what V would be for the
    behaviour itself (no bootstrap past the episode's end: a 1,000-step episode cut by its time limit)."""
    result = np.zeros_like(reward, dtype=np.float64)
    following = np.zeros(reward.shape[1])
    for i in range(len(reward) - 1, -1, -1):
        if episode_last[i] == i:
            following = np.zeros(reward.shape[1])
        following = reward[i] + gamma * discount[i] * following
        result[i] = following
    return result


def analyse(run_dir: Path, snippet_length: Optional[int] = None, loaded: Optional[tuple] = None,
            seed: int = 0) -> dict:
    """One run's numbers; `snippet_length`: score Eq. 4 with this N instead of the run's own (same critic, policy);
    `loaded`: load_run(run_dir) already done, for scoring one run with several N; `seed`: of the M action samples
    V(s) is averaged over. Under "decisions", Eq. 4's accept/reject of every transition (for agreement())."""
    args, data, tasks, spec, agent, step = loaded or load_run(run_dir)
    args = copy.copy(args)  # the loaded run's own N stays for the next call
    args.snippet_length = snippet_length or args.snippet_length
    scores = score(args, data, spec, agent, seed)
    reward = data["reward"].numpy().astype(np.float64)
    last = data["episode_last"].numpy()
    to_go = returns_to_go(reward, data["discount"].numpy(), last, args.discount)
    episodes, episode_of = np.unique(last, return_inverse=True)  # one id per episode (its last index)
    result = {"run": str(run_dir), "update": step, "prior": args.prior, "snippet_length": args.snippet_length,
              "transitions": len(reward), "dataset": args.dataset, "decisions": scores["weight"],
              "episodes": len(episodes), "args": dataclasses.asdict(args), "tasks": {}}
    for k, task in enumerate(tasks):
        episode_return = np.bincount(episode_of, reward[:, k])
        kept = np.bincount(episode_of, scores["weight"][:, k])  # accepted transitions per episode
        accepted = kept / np.bincount(episode_of)
        weight = scores["weight"][:, k].astype(np.float64)
        spread = ((weight - weight.mean()) ** 2).sum()  # [total variance] = [between episodes] + [within them]
        between = (np.bincount(episode_of) * (accepted - weight.mean()) ** 2).sum()
        fifths = np.array_split(np.argsort(episode_return, kind="stable"), FIFTHS)  # episodes, lowest return first
        result["tasks"][task] = {
            "accepted": float(scores["weight"][:, k].mean()),
            "mean_value": float(scores["value"][:, k].mean()),
            "mean_return_to_go": float(to_go[:, k].mean()),
            "rank_correlation": spearman(episode_return, accepted),
            "between_episodes": float(between / spread) if spread > 0 else float("nan"),
            # kept_share: the fifth's part of everything accepted, the mix the ABM prior imitates (a BM prior's
            # is each fifth's share of the transitions, 0.2 for equal episodes; filtered BC's is 1 for the kept)
            "fifths": [{"episode_return": float(episode_return[f].mean()), "accepted": float(accepted[f].mean()),
                        "kept_share": float(kept[f].sum() / max(kept.sum(), 1e-12))} for f in fifths]}
    return result


def report(results: list[dict]) -> str:
    """Two markdown tables, the accepted fractions and each fifth's share of what is kept: one row per run and
    task, then the mean (and for the fractions the std) over the runs per task, and per snippet length N where the
    runs were scored with several (--snippet-lengths)."""
    several = len(results[0]["tasks"]) > 1  # name the task in each row
    lengths = list(dict.fromkeys(result.get("snippet_length") for result in results))  # None: JSON of older versions
    by_length = lambda n: f" N = {n}" if len(lengths) > 1 else ""  # noqa: E731
    accepted = ["Accepted fraction of Eq. 4 (ABM) per fifth of the episodes ranked by return (fifth 1: lowest; "
                "the fifth's mean episode return in brackets).", "",
                "| run | update | accepted | " + " | ".join(f"fifth {i + 1}" for i in range(FIFTHS)) +
                " | rank corr. | between episodes | mean V(s) | mean return-to-go |", "|" + "---|" * (FIFTHS + 7)]
    shares = ["Share of everything accepted that each fifth holds: the mix of episodes the ABM prior imitates (a BM "
              "prior's is each fifth's share of the transitions: 0.20 when the episodes are equally long).", "",
              "| run | " + " | ".join(f"fifth {i + 1}" for i in range(FIFTHS)) + " |", "|" + "---|" * (FIFTHS + 1)]
    for result in results:
        for task, t in result["tasks"].items():
            name = (f"{Path(result['run']).name}{f' {task}' if len(result['tasks']) > 1 else ''}"
                    f"{by_length(result.get('snippet_length'))}")
            cells = [f"{f['accepted']:.2f} ({f['episode_return']:.0f})" for f in t["fifths"]]
            accepted.append(f"| {name} | {result['update']:,} | {t['accepted']:.2f} | " + " | ".join(cells) +
                            f" | {t['rank_correlation']:.2f} | {t.get('between_episodes', np.nan):.2f} | "
                            f"{t['mean_value']:.1f} | {t['mean_return_to_go']:.1f} |")
            shares.append(f"| {name} | " + " | ".join(f"{f['kept_share']:.2f}" for f in t["fifths"]) + " |")
    pm = lambda values: f"{np.mean(values):.2f} ± {np.std(values):.2f}"  # noqa: E731
    for length in lengths:
        group = [result for result in results if result.get("snippet_length") == length]
        for task in group[0]["tasks"] if len(group) > 1 else ():
            rows = [r["tasks"][task] for r in group if task in r["tasks"]]
            suffix = f"{f' {task}' if several else ''}{by_length(length)}"
            cells = [pm([row["fifths"][i]["accepted"] for row in rows]) for i in range(FIFTHS)]
            accepted.append(f"| mean ± std over {len(rows)} runs{suffix} | | {pm([row['accepted'] for row in rows])} | "
                            + " | ".join(cells) + f" | {pm([row['rank_correlation'] for row in rows])} | "
                            f"{pm([row.get('between_episodes', np.nan) for row in rows])} | "
                            f"{np.mean([row['mean_value'] for row in rows]):.1f} | "
                            f"{np.mean([row['mean_return_to_go'] for row in rows]):.1f} |")
            shares.append(f"| mean over {len(rows)} runs{suffix} | " +
                          " | ".join(f"{np.mean([row['fifths'][i]['kept_share'] for row in rows]):.2f}"
                                     for i in range(FIFTHS)) + " |")
    return "\n".join(accepted + [""] + shares) + "\n"


def phi(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two runs' accept (1) / reject (0) decisions on the same transitions: 1 when they keep
    the same actions, 0 when they agree no more than two coin flips of their acceptance rates would."""
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def agreement(results: list[dict], again: dict) -> str:
    """A markdown table: for each N, how far the runs' critics agree on which transitions Eq. 4 keeps (phi over every
    pair of runs on the same data, per task), beside the same critic scored twice with other action samples for V
    (`again`: {N: (result of the first run, that run rescored with another sample seed)}), the noise floor of the
    measure. Agreement near the floor: the runs keep the same actions; near 0: their filters are coin flips."""
    lines = ["Agreement of Eq. 4's decisions (phi: correlation of accept/reject per transition; 1 = the same "
             "transitions kept, 0 = no more alike than coin flips).", "",
             "| N | task | between runs: mean [min, max] over pairs | the first run's critic, other samples for V |",
             "|---|---|---|---|"]
    for length, (first, repeat) in again.items():
        group = [r for r in results if r["snippet_length"] == length and r["dataset"] == first["dataset"]]
        for k, task in enumerate(first["tasks"]):
            pairs = [phi(a["decisions"][:, k], b["decisions"][:, k])
                     for i, a in enumerate(group) for b in group[i + 1:]]
            across = f"{np.mean(pairs):.2f} [{np.min(pairs):.2f}, {np.max(pairs):.2f}] ({len(pairs)} pairs)" \
                if pairs else "one run"
            lines.append(f"| {length} | {task} | {across} | "
                         f"{phi(first['decisions'][:, k], repeat['decisions'][:, k]):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="abm_mpo.py run directories (checkpoint.pt, config.json)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    parser.add_argument("--snippet-lengths", type=int, nargs="+", default=[None], metavar="N",
                        help="score Eq. 4 with each of these snippet lengths, with each run's own critic and policy "
                             "(default: the run's own N)")
    args = parser.parse_args()
    if any(length is not None and length < 1 for length in args.snippet_lengths):
        parser.error(f"--snippet-lengths must be positive, not {args.snippet_lengths}")
    loaded = {run_dir: load_run(run_dir) for run_dir in args.run_dirs}  # once per run, whatever the number of N
    results = [analyse(run_dir, length, loaded[run_dir])
               for length in args.snippet_lengths for run_dir in args.run_dirs]
    first = args.run_dirs[0]  # the noise floor of the agreement: its critic again, with other samples for V
    again = {result["snippet_length"]: (result, analyse(first, result["snippet_length"], loaded[first], seed=1))
             for result in results if result["run"] == str(first)}
    table = report(results) + "\n" + agreement(results, again)
    print(table, end="")
    if args.out:
        args.out.write_text(table)
    if args.json:
        kept = [{key: value for key, value in result.items() if key != "decisions"} for result in results]
        args.json.write_text(json.dumps(kept, indent=2) + "\n")


if __name__ == "__main__":
    main()
