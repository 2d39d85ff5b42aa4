"""Keep only the N highest-return episodes of a dataset: the data of a filtered behaviour-cloning control.

    python benchmarks/best_episodes.py results/cpu/datasets/cheetah.npz best16.npz --episodes 16
    python bm_mpo.py --dataset best16.npz          # its prior: a BM prior fitted to the best 16 episodes only

The ABM prior (Eq. 4) filters the logged actions by a learned critic's advantage. Filtering whole episodes by
their logged return is the hand-made version of the same idea (Chen et al. 2021 call it "%BC"): a BM prior fitted
to the best fifth of the episodes shows how much a filter can gain on given data, without a critic. The new file
keeps every array of the old one for the chosen episodes, in their old order, and records in its metadata where
it came from (`selected_from`). The same input and N give the same bytes on any machine (fixed zip timestamps),
so results learned from it can be checked against it by sha256, as reproduce.py does.
"""

import argparse
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np


def episode_returns(episode_id: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each episode, its undiscounted return) for episodes stored back to back."""
    starts = np.flatnonzero(np.r_[True, episode_id[1:] != episode_id[:-1]])
    return starts, np.add.reduceat(reward.astype(np.float64), starts)


def select_best(arrays: dict, episodes: int, column: int = 0) -> tuple[dict, dict]:
    """The rows of the `episodes` highest-return episodes (reward column `column`; ties: the earlier episode),
    in their stored order, and a record of the choice; 0-d arrays (metadata) are kept as they are."""
    reward = np.asarray(arrays["reward"])
    reward = reward[:, column] if reward.ndim == 2 else reward
    starts, returns = episode_returns(np.asarray(arrays["episode_id"]), reward)
    if not 0 < episodes <= len(starts):
        raise ValueError(f"--episodes {episodes}: the dataset holds {len(starts)} episodes; choose 1 to {len(starts)}")
    chosen = np.sort(np.argsort(-returns, kind="stable")[:episodes])
    lengths = np.diff(np.r_[starts, len(reward)])
    rows = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in chosen])
    record = {"episodes": episodes, "of": len(starts), "ranked_by": "undiscounted return",
              "lowest_kept_return": float(returns[chosen].min()), "highest_return": float(returns.max()),
              "mean_return_kept": float(returns[chosen].mean()), "mean_return_all": float(returns.mean())}
    return {key: np.asarray(value)[rows] if np.ndim(value) else value for key, value in arrays.items()}, record


def write_npz(path: Path, arrays: dict) -> None:
    """np.savez's format with fixed timestamps and member order: identical input, identical bytes; written to a
    temporary name first, so a stopped write never leaves a half file under `path`."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arrays[key]), allow_pickle=False)
    partial.replace(path)


def write_best_episodes(source: Path, output: Path, episodes: int, task: Optional[str] = None) -> dict:
    """Read `source` (an .npz dataset), write its `episodes` best episodes to `output`; returns the record."""
    source = Path(source)
    with np.load(source, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    missing = [key for key in ("reward", "episode_id") if key not in arrays]
    if missing:
        raise ValueError(f"it lacks the array(s) {missing}, which rank its episodes (README 'Datasets')")
    metadata = json.loads(str(arrays.pop("metadata", "{}")))
    columns = 1 if arrays["reward"].ndim == 1 else arrays["reward"].shape[1]
    tasks = metadata.get("tasks") or [f"task{i}" for i in range(columns)]
    if task is None and len(tasks) > 1:
        raise ValueError(f"{source} has {len(tasks)} reward columns ({', '.join(tasks)}): give --task")
    if task is not None and task not in tasks:
        raise ValueError(f"--task {task}: not in {source} (its tasks: {', '.join(tasks)})")
    column = tasks.index(task) if task else 0
    selected, record = select_best(arrays, episodes, column)
    record = {**record, "task": tasks[column], "source": source.name,
              "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    if "transitions" in metadata:
        metadata["transitions"] = len(selected["episode_id"])
    selected["metadata"] = np.asarray(json.dumps({**metadata, "selected_from": record}))
    write_npz(output, selected)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="dataset (.npz) to choose from")
    parser.add_argument("output", type=Path, help="where the new dataset (.npz) goes")
    parser.add_argument("--episodes", type=int, required=True, help="how many of the best episodes to keep")
    parser.add_argument("--task", default=None, help="rank by this reward column (needed when there are several)")
    args = parser.parse_args()
    if not args.source.is_file():
        parser.error(f"{args.source} is not a file (a directory of .npy files: np.savez it into one .npz first)")
    if args.output.resolve() == args.source.resolve():
        parser.error("the output would overwrite the source; give another path")
    try:
        record = write_best_episodes(args.source, args.output, args.episodes, args.task)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        parser.error(f"{args.source}: {error}")
    print(f"{args.output}: the best {record['episodes']} of {record['of']} episodes by return on {record['task']} "
          f"(kept {record['lowest_kept_return']:.1f} to {record['highest_return']:.1f}, mean "
          f"{record['mean_return_kept']:.1f}; all episodes: mean {record['mean_return_all']:.1f})")


if __name__ == "__main__":
    main()
