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
    mean, std = abm_mpo.observation_statistics(torch.as_tensor(observation), True)  # 70k rows: two chunks
    np.testing.assert_allclose(mean.numpy(), observation.astype(np.float64).mean(0), rtol=1e-6, atol=1e-9)
    expected_std = observation.astype(np.float64).std(0)
    np.testing.assert_allclose(std[:2].numpy(), expected_std[:2], rtol=1e-6)
    # below the floor (std 1e-5, a constant dimension): divided by 1e-3, not by ~0
    assert std[2:].tolist() == [np.float32(abm_mpo.OBSERVATION_STD_FLOOR)] * 2 and expected_std[2] < 1e-4
    mean, std = abm_mpo.observation_statistics(torch.as_tensor(observation), False)
    assert mean.tolist() == [0.0] * 4 and std.tolist() == [1.0] * 4


@pytest.mark.parametrize("normalize", [True, False])
def test_every_network_standardises_with_the_datasets_statistics_and_the_checkpoint_keeps_them(tmp_path, normalize):
    dataset = scaled_dataset(tmp_path / "scaled.npz")
    args = abm_mpo.Args(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(tmp_path / "run"), batch_size=16,
                        total_steps=2, eval_every=2, checkpoint_every=2, eval_episodes=1, eval_max_steps=2,
                        normalize_observations=normalize, **TINY)
    quiet(abm_mpo.train, args)
    observation = abm_mpo.load_dataset(dataset)["observation"].astype(np.float64)
    mean = observation.mean(0) if normalize else np.zeros(5)
    std = np.maximum(observation.std(0), abm_mpo.OBSERVATION_STD_FLOOR) if normalize else np.ones(5)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["agent"]
    buffers = [key for key in state if key.endswith("input_mean")]
    assert len(buffers) == 5  # critic, target critic, prior, policy, target policy
    for key in buffers:
        np.testing.assert_allclose(state[key][:5].numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[key.replace("mean", "std")][:5].numpy(), std, rtol=1e-5)
        assert state[key][5:].abs().sum() == 0  # the critic's action part is left as it is


def test_exported_policy_standardises_raw_observations_like_the_learner(tmp_path):
    torch.manual_seed(0)
    obs_dim, tasks = 6, 3
    net = abm_mpo.GaussianPolicy(obs_dim, 2, (16, 16), tasks, 1)
    mean, std = torch.randn(obs_dim) * 10, torch.logspace(-2, 3, obs_dim)  # std 0.01 ... 1000
    spec = {"env": "test-env", "obs_dim": obs_dim, "act_dim": 2, "tasks": ["a", "b", "c"], "action_low": [-1.0] * 2,
            "action_high": [1.0] * 2, "env_action_low": [-0.5, -200.0], "env_action_high": [0.5, 200.0]}
    raw = mean + torch.randn(9, obs_dim) * std
    task_index = torch.tensor([0, 1, 2] * 3)
    with torch.no_grad():
        action = net(((raw - mean) / std).expand(tasks, -1, -1))[0][task_index, torch.arange(9)].clamp(-1, 1)
    expected = torch.tensor([-0.5, -200.0]) + (action + 1) / 2 * torch.tensor([1.0, 400.0])
    abm_mpo.standardise_observations(net, mean, std)
    abm_mpo.export_policy(abm_mpo.ActingPolicy(net, spec), spec, tmp_path)
    exported = torch.export.load(str(tmp_path / "policy.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(raw, task_index), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(abm_mpo.ActingPolicy(net, spec)(raw, task_index), expected, rtol=1e-5, atol=1e-5)


def test_eval_envs_return_raw_observations(tmp_path):
    (env,) = abm_mpo.make_eval_envs(abm_mpo.Args(env="sawyer"), tmp_path, ["reach"])
    raw_env = abm_mpo.make_env("sawyer", task="reach").unwrapped
    action = np.full(5, 0.01, np.float32)
    np.testing.assert_array_equal(env.reset(seed=3)[0], raw_env.reset(seed=3)[0])
    for _ in range(3):
        np.testing.assert_array_equal(env.step(action)[0], raw_env.step(action)[0])


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
