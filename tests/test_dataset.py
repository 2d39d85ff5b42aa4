"""The dataset format of the README: collect.py writes it, load_dataset reads and validates it,
sample_batch cuts trajectory snippets out of it (Eq. 4)."""

import contextlib
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import abm_mpo as m
import collect
from tests.helpers import SMOKE_ENV, box_env, tensors, write_random_dataset


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two collecting runs (seeds 0 and 1) of two 1000-step cartpole episodes each, tiny learner."""
    output = tmp_path_factory.mktemp("collect") / "cartpole.npz"
    args = collect.Args(env=SMOKE_ENV, output=str(output), seeds=(0, 1), episodes=2, warmup_steps=500,
                        steps_per_update=200, batch_size=32, policy_layers=(32, 32), critic_layers=(32, 32),
                        device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        collect.train(args)
    return output, args


def episode_arrays(parts):
    files = sorted(parts.glob("run*_episode*.npz"))
    episodes = []
    for file in files:
        with np.load(file, allow_pickle=False) as archive:
            episodes.append({key: archive[key] for key in archive.files})
    return files, episodes


@pytest.mark.slow
def test_collect_round_trips_through_the_loader(collected):
    output, _ = collected
    data = m.load_dataset(output)
    files, episodes = episode_arrays(output.with_suffix(".episodes"))
    assert [f.name for f in files] == ["run000_episode000000.npz", "run000_episode000001.npz",
                                       "run001_episode000000.npz", "run001_episode000001.npz"]
    for key in ("observation", "action", "reward", "discount", "next_observation", "step"):
        np.testing.assert_array_equal(data[key], np.concatenate([e[key] for e in episodes]), err_msg=key)
    assert data["observation"].shape == (4000, 5) and data["action"].shape == (4000, 1)
    assert data["reward"].shape == (4000, 1) and data["observation"].dtype == np.float32
    assert data["episode_id"].tolist() == np.repeat(np.arange(4), 1000).tolist()
    assert data["run_id"].tolist() == np.repeat([0, 0, 1, 1], 1000).tolist()
    # Inside an episode s'_t is s_{t+1}; episodes end by time limit, so the discount stays 1.
    same = data["episode_id"][1:] == data["episode_id"][:-1]
    np.testing.assert_array_equal(data["next_observation"][:-1][same], data["observation"][1:][same])
    assert (data["discount"] == 1).all()
    metadata = data["metadata"]
    assert metadata["env"] == SMOKE_ENV and metadata["tasks"] == [SMOKE_ENV]
    assert metadata["transitions"] == 4000 and metadata["collection"]["seeds"] == [0, 1]
    returns = [float(e["reward"].sum()) for e in episodes]
    assert metadata["episode_returns"][SMOKE_ENV] == pytest.approx(returns)


@pytest.mark.slow
def test_dataset_episodes_keeps_the_first_episodes_of_each_run(collected):
    output, _ = collected
    data = m.load_dataset(output, episodes_per_run=1)
    assert np.unique(data["episode_id"]).tolist() == [0, 2]  # episode 0 of run 0, episode 0 of run 1
    assert np.unique(data["run_id"]).tolist() == [0, 1] and len(data["observation"]) == 2000


@pytest.mark.slow
def test_collect_rerun_appends_and_keeps_finished_episodes(collected, tmp_path):
    output, args = collected
    copy = tmp_path / "cartpole.npz"
    parts = copy.with_suffix(".episodes")
    parts.mkdir()
    for file in output.with_suffix(".episodes").iterdir():
        (parts / file.name).write_bytes(file.read_bytes())
    before = {f.name: f.read_bytes() for f in parts.glob("run*_episode*.npz")}
    args3 = collect.Args(**{**vars(args), "output": str(copy), "episodes": 3})
    with contextlib.redirect_stdout(io.StringIO()):
        collect.train(args3)
    after = {f.name: f.read_bytes() for f in parts.glob("run*_episode*.npz")}
    assert set(after) == set(before) | {"run000_episode000002.npz", "run001_episode000002.npz"}
    assert all(after[name] == content for name, content in before.items())
    data = m.load_dataset(copy)
    assert len(data["observation"]) == 6000 and data["run_id"].tolist() == np.repeat([0, 0, 0, 1, 1, 1], 1000).tolist()


def test_directory_of_npy_files_is_memory_mapped(random_dataset, tmp_path):
    reference = m.load_dataset(random_dataset)
    folder = tmp_path / "restorer"
    folder.mkdir()
    with np.load(random_dataset, allow_pickle=False) as archive:
        for key in archive.files:
            if key != "metadata":
                np.save(folder / f"{key}.npy", archive[key])
        (folder / "metadata.json").write_text(str(archive["metadata"]))
    data = m.load_dataset(folder)
    assert isinstance(data["observation"], np.memmap)
    for key in ("observation", "action", "reward", "next_observation", "episode_last"):
        np.testing.assert_array_equal(data[key], reference[key])
    assert data["metadata"] == reference["metadata"]


def refuse(path, match):
    with pytest.raises(m.UserError, match=match) as error:
        m.load_dataset(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    refuse(path, "cannot be read")


def test_truncated_file_is_refused(random_dataset, tmp_path):
    path = tmp_path / "truncated.npz"
    path.write_bytes(random_dataset.read_bytes()[: random_dataset.stat().st_size // 2])
    refuse(path, "cannot be read")


def test_pickled_file_is_refused(random_dataset, tmp_path):
    path = tmp_path / "pickled.npz"
    with np.load(random_dataset, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["observation"] = np.array([object()] * 240, dtype=object)  # needs pickle to load
    np.savez(path, **arrays)
    refuse(path, "pickled")


@pytest.mark.parametrize("key, value, match", [
    ("action", np.zeros((239, 1), np.float32), "'action' has shape"),
    ("observation", np.zeros(240, np.float32), "'observation'"),
    ("reward", np.full((240, 1), np.nan, np.float32), "NaN"),
    ("step", np.zeros(240, np.int64), "back to back"),
    ("episode_id", np.tile([0, 1], 120).astype(np.int64), "back to back"),
])
def test_malformed_arrays_are_refused(random_dataset, tmp_path, key, value, match):
    with np.load(random_dataset, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays[key] = value
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    refuse(path, match)


def test_missing_arrays_and_files_are_refused(random_dataset, tmp_path):
    with np.load(random_dataset, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "discount"}
    path = tmp_path / "nodiscount.npz"
    np.savez(path, **arrays)
    refuse(path, "lacks some of the arrays")
    refuse(tmp_path / "absent.npz", "does not exist")


def test_next_observation_is_derived_when_absent(random_dataset, tmp_path):
    with np.load(random_dataset, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files if k != "next_observation"}
    path = tmp_path / "derived.npz"
    np.savez(path, **arrays)
    data = m.load_dataset(path)
    # 6 episodes of 40 steps: each episode's last row has no successor and is dropped.
    assert len(data["observation"]) == 6 * 39
    np.testing.assert_array_equal(data["next_observation"][:39], arrays["observation"][1:40])


def snippet_dataset(tmp_path):
    """Episode 0: rewards 1..5, terminal at its last step. Episode 1: rewards 10, 20, ends by time
    limit. Observation i holds i, next_observation i holds 100 + i."""
    index = np.arange(7, dtype=np.float32)[:, None]
    arrays = {"observation": index, "next_observation": 100 + index, "action": np.zeros((7, 1), np.float32),
              "reward": np.array([[1, -1], [2, -2], [3, -3], [4, -4], [5, -5], [10, -10], [20, -20]], np.float32),
              "discount": np.array([1, 1, 1, 1, 0, 1, 1], np.float32),
              "episode_id": np.array([0, 0, 0, 0, 0, 1, 1], np.int64),
              "step": np.array([0, 1, 2, 3, 4, 0, 1], np.int64),
              "metadata": np.array(json.dumps({"tasks": ["up", "down"]}))}
    np.savez(tmp_path / "snippets.npz", **arrays)
    return m.load_dataset(tmp_path / "snippets.npz")


def test_snippet_returns_by_hand(tmp_path):
    data = snippet_dataset(tmp_path)
    batch = m.sample_batch(tensors(data, [0]), batch_size=300, snippet_length=3, discount=0.5,
                           generator=torch.Generator().manual_seed(0))
    batch = {key: value.numpy() for key, value in batch.items()}
    # start index: (snippet return, bootstrap discount, bootstrap observation), gamma = 0.5, N = 3
    expected = {
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.125, 102),
        1: (2 + 0.5 * 3 + 0.25 * 4, 0.125, 103),
        2: (3 + 0.5 * 4 + 0.25 * 5, 0.0, 104),  # the snippet reaches the terminal step
        3: (4 + 0.5 * 5, 0.0, 104),  # clipped at the episode end
        4: (5, 0.0, 104),
        5: (10 + 0.5 * 20, 0.25, 106),  # time-limit end: bootstrap from the last s'
        6: (20, 0.5, 106),
    }
    starts = batch["observation"][0, :, 0].astype(int)
    assert set(starts.tolist()) == set(expected)
    for start, (ret, disc, obs) in expected.items():
        rows = starts == start
        assert batch["snippet_return"][0, rows] == pytest.approx(ret)
        assert batch["bootstrap_discount"][0, rows] == pytest.approx(disc)
        assert (batch["bootstrap_observation"][0, rows, 0] == obs).all()
        assert (batch["reward"][0, rows] == data["reward"][start, 0]).all()


def test_each_task_gets_its_own_reward_column_and_samples(tmp_path):
    data = snippet_dataset(tmp_path)
    batch = m.sample_batch(tensors(data, [0, 1]), batch_size=50, snippet_length=2, discount=1.0,
                           generator=torch.Generator().manual_seed(1))
    batch = {key: value.numpy() for key, value in batch.items()}
    assert batch["observation"].shape == (2, 50, 1) and batch["snippet_return"].shape == (2, 50)
    starts = batch["observation"][..., 0].astype(int)
    assert (batch["reward"][0] == data["reward"][starts[0], 0]).all()
    assert (batch["reward"][1] == data["reward"][starts[1], 1]).all()
    assert (batch["reward"][1] < 0).all() and not (starts[0] == starts[1]).all()
    assert m.select_tasks(data, "down") == ([1], ["down"])
    with pytest.raises(m.UserError, match="not in the dataset"):
        m.select_tasks(data, "sideways")


def test_smoke_dataset_writer_is_valid(tmp_path):
    data = m.load_dataset(write_random_dataset(tmp_path / "r.npz", episodes=3, length=10))
    assert data["episode_last"].tolist() == np.repeat([9, 19, 29], 10).tolist()


def test_a_missing_default_dataset_is_generated_by_collect_py_and_announced(tmp_path, monkeypatch, capsys):
    """`--env hopper` with no file prepared: one log line, then `collect.py --env hopper --output
    datasets/hopper.npz` as a subprocess (replaced here by a stand-in that writes a dataset)."""
    monkeypatch.chdir(tmp_path)
    commands = []

    def fake_collect(command, **kwargs):
        commands.append(command)
        write_random_dataset(tmp_path / command[command.index("--output") + 1], env="hopper")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(m.subprocess, "run", fake_collect)
    (tmp_path / "datasets").mkdir()
    path = Path(m.load_data(m.Args(env="hopper"), box_env(), torch.device("cpu"))[2]["dataset"])
    assert path == Path("datasets") / "hopper.npz" and path.exists()
    assert len(commands) == 1 and Path(commands[0][1]).name == "collect.py"
    assert commands[0][2:] == ["--env", "hopper", "--output", str(path)]
    announcement = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(announcement) == 1 and "collect.py --env hopper" in announcement[0] and "--dataset" in announcement[0]
    assert m.load_data(m.Args(env="hopper"), box_env(), torch.device("cpu"))[2]["dataset"] == str(path)
    assert len(commands) == 1  # present now: not regenerated


def test_a_failed_collection_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(m.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1))
    with pytest.raises(m.UserError, match="collect.py failed to generate"):
        m.load_data(m.Args(env="hopper"), box_env(), torch.device("cpu"))
