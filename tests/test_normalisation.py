"""--normalize-observations: the dataset's statistics, where the learner sees standardised observations
(batches, evaluation envs, the exported policy), its default per env, and resume refusing a change."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
from tests.helpers import SMOKE_ENV, write_random_dataset

TINY = dict(policy_layers=(16, 16), critic_layers=(16, 16), num_action_samples=2, device="cpu")


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def scaled_dataset(path, scale=(0.01, 1.0, 100.0, 5.0, 2000.0), offset=(3.0, -1.0, 50.0, 0.0, 7.0)):
    """A random dataset whose five observation dimensions have the given std and mean."""
    write_random_dataset(path, episodes=10, length=100)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for key in ("observation", "next_observation"):
        arrays[key] = (arrays[key] * np.float32(scale) + np.float32(offset)).astype(np.float32)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("script", [abm_mpo, abm_svg, bm_mpo, bcq, bear], ids=lambda m: m.__name__)
def test_default_is_on_for_sawyer_and_off_for_the_control_suite(script):
    assert script.Args(env="sawyer").normalize_observations is True
    assert script.Args(env="cheetah").normalize_observations is False
    assert script.Args(env=SMOKE_ENV).normalize_observations is False
    assert script.Args(env="sawyer", normalize_observations=False).normalize_observations is False
    assert script.Args(env="cheetah", normalize_observations=True).normalize_observations is True


def test_statistics_are_numpy_mean_and_std_with_a_floor():
    rng = np.random.default_rng(0)
    observation = (rng.standard_normal((70_000, 4)) * [1e-2, 69.0, 1e-5, 0.0] + [0.1, 5.0, 0.09, 2.0]).astype(np.float32)
    mean, std = abm_mpo.observation_statistics(observation, True)  # 70k rows: two chunks
    np.testing.assert_allclose(mean, observation.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
    expected_std = observation.astype(np.float64).std(0)
    np.testing.assert_allclose(std[:2], expected_std[:2], rtol=1e-6)
    # below the floor (std 1e-5, a constant dimension): divided by 1e-3, not by ~0
    assert std[2:] == [np.float32(abm_mpo.OBSERVATION_STD_FLOOR)] * 2 and expected_std[2] < 1e-4
    assert abm_mpo.observation_statistics(observation, False) == ([0.0] * 4, [1.0] * 4)


def run_capturing_batches(monkeypatch, tmp_path, normalize, batch_size=4096):
    """abm_mpo.train for 2 updates with update() replaced by a recorder of the batches it is given."""
    seen = []

    def record(agent, optimizer, batch, *rest):
        seen.append({key: value.numpy().copy() for key, value in batch.items()})
        return {}

    monkeypatch.setattr(abm_mpo, "update", record)
    dataset = tmp_path / "scaled.npz"
    if not dataset.exists():
        scaled_dataset(dataset)
    args = abm_mpo.Args(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(tmp_path / f"run{normalize}"),
                        batch_size=batch_size, total_steps=2, eval_every=2, checkpoint_every=2, eval_episodes=1,
                        eval_max_steps=2, normalize_observations=normalize, **TINY)
    quiet(abm_mpo.train, args)
    return seen, args, dataset


def test_update_sees_standardised_batches_when_on_and_raw_when_off(monkeypatch, tmp_path):
    on, args, dataset = run_capturing_batches(monkeypatch, tmp_path, True)
    off, _, _ = run_capturing_batches(monkeypatch, tmp_path, False)
    data = abm_mpo.load_dataset(dataset)
    raw = abm_mpo.sample_batch(data, [0], args.batch_size, args.snippet_length, args.discount,
                               np.random.default_rng(args.seed))  # the loop's first draw
    mean, std = (np.asarray(v, np.float32) for v in abm_mpo.observation_statistics(data["observation"], True))
    for key in abm_mpo.OBSERVATION_KEYS:
        np.testing.assert_array_equal(off[0][key], raw[key])
        np.testing.assert_array_equal(on[0][key], (raw[key] - mean) / std)
        flat = on[0][key].reshape(-1, 5)  # 4096 states drawn from 1000: mean ~0, std ~1 per dimension
        assert np.abs(flat.mean(0)).max() < 0.1 and np.abs(flat.std(0) - 1).max() < 0.1
        assert np.abs(off[0][key].reshape(-1, 5).std(0) / np.array([0.01, 1, 100, 5, 2000]) - 1).max() < 0.1
    for key in ("action", "reward", "snippet_return", "discount"):
        np.testing.assert_array_equal(on[0][key], raw[key])
    # the statistics travel with the run: config.json, checkpoint.pt, policy.pt2
    spec = json.loads((tmp_path / "runTrue" / "config.json").read_text())["spec"]
    assert spec["observation_mean"] == mean.tolist() and spec["observation_std"] == std.tolist()
    state = torch.load(tmp_path / "runTrue" / "checkpoint.pt", weights_only=True)
    assert state["spec"]["observation_std"] == std.tolist()
    extra = {"policy.json": ""}
    torch.export.load(str(tmp_path / "runTrue" / "policy.pt2"), extra_files=extra)
    assert json.loads(extra["policy.json"])["observation_mean"] == mean.tolist()
    off_spec = json.loads((tmp_path / "runFalse" / "config.json").read_text())["spec"]
    assert off_spec["observation_mean"] == [0.0] * 5 and off_spec["observation_std"] == [1.0] * 5


def test_exported_policy_standardises_raw_observations_like_the_learner(tmp_path):
    torch.manual_seed(0)
    obs_dim, tasks = 6, 3
    net = abm_mpo.GaussianPolicy(obs_dim, 2, (16, 16), tasks, 1)
    mean = (torch.randn(obs_dim) * 10).tolist()
    std = torch.logspace(-2, 3, obs_dim).tolist()  # 0.01 ... 1000
    spec = {"obs_dim": obs_dim, "act_dim": 2, "tasks": ["a", "b", "c"], "action_low": [-1.0] * 2,
            "action_high": [1.0] * 2, "env_action_low": [-0.5, -200.0], "env_action_high": [0.5, 200.0],
            "observation_mean": mean, "observation_std": std}
    abm_mpo.export_policy(abm_mpo.PolicyMean(net), spec, "test-env", tmp_path / "policy.pt2")
    extra = {"policy.json": ""}
    exported = torch.export.load(str(tmp_path / "policy.pt2"), extra_files=extra).module()
    raw = torch.tensor(mean) + torch.randn(9, obs_dim) * torch.tensor(std)
    task_index = torch.tensor([0, 1, 2] * 3)
    with torch.no_grad():
        standardised = (raw - torch.tensor(mean)) / torch.tensor(std)
        action = net(standardised.expand(tasks, -1, -1))[0][task_index, torch.arange(9)].clamp(-1, 1)
        expected = torch.tensor([-0.5, -200.0]) + (action + 1) / 2 * torch.tensor([1.0, 400.0])
        got = exported(raw, task_index)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    metadata = json.loads(extra["policy.json"])
    assert metadata["observation_mean"] == mean and metadata["observation_std"] == std


def test_eval_envs_return_standardised_observations_when_on(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.standard_normal(abm_mpo.sawyer_env.OBS_DIM).astype(np.float32).tolist()
    std = rng.uniform(0.01, 100, abm_mpo.sawyer_env.OBS_DIM).astype(np.float32).tolist()
    spec = {"observation_mean": mean, "observation_std": std}
    (wrapped,) = abm_mpo.make_eval_envs(abm_mpo.Args(env="sawyer"), tmp_path, ["reach"], spec)
    (unwrapped,) = abm_mpo.make_eval_envs(abm_mpo.Args(env="sawyer", normalize_observations=False), tmp_path,
                                          ["reach"], spec)
    raw_env = abm_mpo.make_env("sawyer", task="reach")
    action = np.full(5, 0.5, np.float32)
    for env in (wrapped, unwrapped, raw_env):
        env.reset(seed=3)
    for _ in range(3):
        raw = raw_env.step(action)[0]
        np.testing.assert_allclose(wrapped.step(action)[0], (raw - np.float32(mean)) / np.float32(std), rtol=1e-6)
        np.testing.assert_array_equal(unwrapped.step(action)[0], raw)
    assert wrapped.observation_space.shape == raw_env.observation_space.shape


def test_resume_with_a_changed_normalisation_is_refused(random_dataset, tmp_path):
    settings = dict(env=SMOKE_ENV, dataset=str(random_dataset), run_dir=str(tmp_path / "run"), batch_size=4,
                    total_steps=1, eval_every=1, checkpoint_every=1, eval_episodes=1, eval_max_steps=1, **TINY)
    quiet(abm_mpo.train, abm_mpo.Args(**settings))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["normalize_observations"] is False
    resume = {**settings, "total_steps": 2, "resume": str(tmp_path / "run")}
    with pytest.raises(abm_mpo.UserError, match="--normalize-observations was False"):
        quiet(abm_mpo.train, abm_mpo.Args(**resume, normalize_observations=True))
    quiet(abm_mpo.train, abm_mpo.Args(**resume))  # the default resolves to the run's setting
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
