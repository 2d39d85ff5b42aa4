"""benchmarks/best_episodes.py: the data of the filtered behaviour-cloning control. Episodes of known returns, stored
out of order and with different lengths: the tool must keep exactly the N best whole episodes in their stored order,
write the same bytes every time, and give a file the learning scripts load."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, write_random_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import abm_mpo  # noqa: E402
import best_episodes  # noqa: E402

LENGTHS = [30, 10, 20, 40, 10]  # episode i has LENGTHS[i] steps of reward LEVELS[i]
LEVELS = [0.2, 0.9, 0.5, 0.5, 0.1]  # returns 6, 9, 10, 20, 1: episodes 3, 2, 1 best; 0 and 4 worst


def levels_dataset(path):
    """A README-format dataset whose episode i has LENGTHS[i] steps of constant reward LEVELS[i]."""
    size = sum(LENGTHS)
    rng = np.random.default_rng(0)
    arrays = {
        "observation": rng.standard_normal((size, 5)).astype(np.float32),
        "action": rng.uniform(-1, 1, (size, 1)).astype(np.float32),
        "reward": np.repeat(np.array(LEVELS, np.float32), LENGTHS)[:, None],
        "discount": np.ones(size, np.float32),
        "episode_id": np.repeat(np.arange(len(LENGTHS)), LENGTHS).astype(np.int64),
        "step": np.concatenate([np.arange(n) for n in LENGTHS]).astype(np.int64),
        "metadata": np.array(json.dumps({"env": "cartpole-balance", "tasks": ["balance"], "transitions": size})),
    }
    np.savez(path, **arrays)
    return path, arrays


def test_the_best_whole_episodes_are_kept_in_their_stored_order(tmp_path):
    source, arrays = levels_dataset(tmp_path / "levels.npz")
    output = tmp_path / "best3.npz"
    record = best_episodes.write_best_episodes(source, output, 3)
    with np.load(output, allow_pickle=False) as kept:
        assert kept["episode_id"].tolist() == [1] * 10 + [2] * 20 + [3] * 40  # returns 9, 10, 20
        rows = np.r_[30:100]  # episodes 1, 2, 3 are stored in rows 30..99
        for key in ("observation", "action", "reward", "step"):
            np.testing.assert_array_equal(kept[key], arrays[key][rows])
        metadata = json.loads(str(kept["metadata"]))
    assert metadata["transitions"] == 70 and metadata["tasks"] == ["balance"]
    assert metadata["selected_from"] == record
    assert (record["episodes"], record["of"], record["task"]) == (3, 5, "balance")
    assert record["lowest_kept_return"] == pytest.approx(9.0) and record["highest_return"] == pytest.approx(20.0)
    assert record["mean_return_kept"] == pytest.approx(13.0) and record["mean_return_all"] == pytest.approx(46 / 5)
    assert record["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    # The learning scripts read it as any dataset of 3 episodes: without next_observation each episode's last row
    # has no s' and is dropped (10 + 20 + 40 - 3 rows), and every transition's episode ends inside its episode.
    data = abm_mpo.load_dataset(output)
    assert len(data["observation"]) == 67 and data["episode_last"][[0, 9, 28, 66]].tolist() == [8, 27, 66, 66]


def test_ties_keep_the_earlier_episode(tmp_path):
    source, _ = levels_dataset(tmp_path / "levels.npz")
    with np.load(source) as stored:
        arrays = dict(stored)
    arrays["reward"] = (arrays["step"] == 0).astype(np.float32)[:, None]  # every return exactly 1
    selected, record = best_episodes.select_best(arrays, 2)
    assert np.unique(selected["episode_id"]).tolist() == [0, 1] and record["lowest_kept_return"] == pytest.approx(1.0)


def test_the_same_input_gives_the_same_bytes(tmp_path):
    """reproduce.py derives the file again on every run and machine; the runs' recorded sha256 must still hold."""
    source = write_random_dataset(tmp_path / "random.npz", episodes=6, length=25)
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    best_episodes.write_best_episodes(source, first, 4)
    second.write_bytes(b"an older file")
    best_episodes.write_best_episodes(source, second, 4)
    assert first.read_bytes() == second.read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    best_episodes.write_best_episodes(source, second, 3)
    assert first.read_bytes() != second.read_bytes()


def test_multi_task_data_is_ranked_by_the_task_asked_for(tmp_path):
    source = write_random_dataset(tmp_path / "two.npz", episodes=4, length=10, tasks=("a", "b"))
    with np.load(source) as stored:
        arrays = dict(stored)
    arrays["reward"] = np.repeat(np.array([[1, 4], [2, 3], [3, 2], [4, 1]], np.float32), 10, axis=0)
    np.savez(source, **arrays)
    with pytest.raises(ValueError, match="has 2 reward columns .*give --task"):
        best_episodes.write_best_episodes(source, tmp_path / "out.npz", 1)
    assert best_episodes.write_best_episodes(source, tmp_path / "out.npz", 1, task="b")["highest_return"] == 40.0
    with np.load(tmp_path / "out.npz") as kept:
        assert np.unique(kept["episode_id"]).tolist() == [0]
    assert best_episodes.write_best_episodes(source, tmp_path / "out.npz", 1, task="a")["highest_return"] == 40.0
    with np.load(tmp_path / "out.npz") as kept:
        assert np.unique(kept["episode_id"]).tolist() == [3]


@pytest.mark.parametrize("arguments, words", [
    (["{src}", "{out}", "--episodes", "0"], "--episodes 0: the dataset holds 5 episodes; choose 1 to 5"),
    (["{src}", "{out}", "--episodes", "6"], "--episodes 6: the dataset holds 5 episodes"),
    (["{src}", "{src}", "--episodes", "2"], "the output would overwrite the source"),
    (["{tmp}", "{out}", "--episodes", "2"], "is not a file"),
    (["{src}", "{out}", "--episodes", "2", "--task", "run"], "--task run: not in"),
    (["{noids}", "{out}", "--episodes", "1"], "it lacks the array(s) ['episode_id'], which rank its episodes"),
])
def test_bad_input_is_one_sentence(tmp_path, arguments, words):
    source, _ = levels_dataset(tmp_path / "levels.npz")
    np.savez(tmp_path / "no_ids.npz", observation=np.zeros((3, 2)), reward=np.zeros(3))
    values = {"src": str(source), "out": str(tmp_path / "out.npz"), "tmp": str(tmp_path),
              "noids": str(tmp_path / "no_ids.npz")}
    result = subprocess.run([sys.executable, "benchmarks/best_episodes.py", *(a.format(**values) for a in arguments)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out.npz").exists()


def test_the_command_line_reports_what_it_kept(tmp_path):
    source, _ = levels_dataset(tmp_path / "levels.npz")
    result = subprocess.run([sys.executable, "benchmarks/best_episodes.py", str(source), str(tmp_path / "out.npz"),
                             "--episodes", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "the best 2 of 5 episodes by return on balance (kept 10.0 to 20.0, mean 15.0; all episodes: mean 9.2)" \
        in result.stdout
