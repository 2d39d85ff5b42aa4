"""bear.py: KL and MMD estimators, the actor loss, the Lagrange multiplier, a run and its resume."""

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import bear
from tests.helpers import SMOKE_ENV


def tiny_args(tmp_path, dataset, **overrides) -> bear.Args:
    args = bear.Args(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(tmp_path / "run"), total_steps=4,
                     eval_every=2, checkpoint_every=2, eval_episodes=1, batch_size=16, num_action_samples=3,
                     warmup_steps=2, target_update_period=2, policy_layers=(32, 32), critic_layers=(32, 32),
                     device="cpu")
    return replace(args, **overrides)


def test_gaussian_kl_to_prior_matches_the_closed_form_and_a_monte_carlo_estimate():
    mean, std = torch.tensor([[[0.0, 1.0], [0.5, -0.5]]]), torch.tensor([[[1.0, 0.5], [0.2, 2.0]]])  # [1, 2, 2]
    prior_mean, prior_std = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]), torch.tensor([[[2.0, 0.5], [1.0, 1.0]]])
    kl = bear.gaussian_kl(mean, std, prior_mean, prior_std)
    for b in range(2):
        expected = 0.0
        for d in range(2):
            m, s = mean[0, b, d].item(), std[0, b, d].item()
            pm, ps = prior_mean[0, b, d].item(), prior_std[0, b, d].item()
            expected += math.log(ps / s) + (s * s + (m - pm) ** 2) / (2 * ps * ps) - 0.5
        assert kl[0, b].item() == pytest.approx(expected, rel=1e-6)
    # state 0 by hand: log 2 + (1 + 1) / 8 - 0.5 in dim 0, 0 in dim 1.
    assert kl[0, 0].item() == pytest.approx(math.log(2) - 0.25, rel=1e-6)
    # Monte Carlo: E_{a ~ pi}[log pi(a) - log prior(a)] over 400k samples.
    generator = torch.Generator().manual_seed(0)
    samples = mean + std * torch.randn((400_000, 1, 2, 2), generator=generator)
    log_ratio = bear.gaussian_log_prob(samples, mean, std) - bear.gaussian_log_prob(samples, prior_mean, prior_std)
    assert torch.allclose(log_ratio.mean(0), kl, atol=0.02)


def explicit_mmd(x: np.ndarray, y: np.ndarray, kernel) -> float:
    """sqrt(mean k(x_i, x_j) + mean k(y_i, y_j) - 2 mean k(x_i, y_j) + 1e-6) by explicit loops."""
    def mean_kernel(a, b):
        return sum(kernel(a[i], b[j]) for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))
    return math.sqrt(mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y) + 1e-6)


@pytest.mark.parametrize("name", ["laplacian", "gaussian"])
def test_mmd_matches_explicit_double_sums(name):
    sigma = 0.7
    kernels = {"laplacian": lambda a, b: math.exp(-np.abs(a - b).sum() / (2 * sigma)),
               "gaussian": lambda a, b: math.exp(-((a - b) ** 2).sum() / (2 * sigma))}
    estimator = bear.mmd_laplacian if name == "laplacian" else bear.mmd_gaussian
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1, 2, 3)).astype(np.float32)  # [N, K, B, act]: two states
    y = (rng.normal(size=(4, 1, 2, 3)) + np.array([0.0, 1.5])[None, None, :, None]).astype(np.float32)
    mmd = estimator(torch.from_numpy(x), torch.from_numpy(y), sigma)
    assert mmd.shape == (1, 2)
    for b in range(2):
        expected = explicit_mmd(x[:, 0, b], y[:, 0, b], kernels[name])
        assert mmd[0, b].item() == pytest.approx(expected, rel=1e-5)
    assert mmd[0, 1] > mmd[0, 0]  # the second state's samples are further apart
    same = estimator(torch.from_numpy(x), torch.from_numpy(x), sigma)
    assert torch.allclose(same, torch.full_like(same, 1e-3), rtol=1e-3)  # only the sqrt(1e-6)


def test_mmd_one_pair_by_hand():
    x, y = torch.tensor([[[[0.0, 0.0]]]]), torch.tensor([[[[1.0, -1.0]]]])  # one sample each
    # Laplacian, sigma 1: 1 + 1 - 2 exp(-2 / 2); Gaussian: 1 + 1 - 2 exp(-2 / 2) too (|d|^2 = 2).
    expected = math.sqrt(2 - 2 * math.exp(-1) + 1e-6)
    assert bear.mmd_laplacian(x, y, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert bear.mmd_gaussian(x, y, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_bear_actor_loss_by_hand():
    # Q_1 of two samples: 1 and 3 (mean 2); Q_2: 0 and 5 (mean 2.5) -> min of the means = 2.
    q = torch.tensor([[[[1.0]], [[3.0]]], [[[0.0]], [[5.0]]]])  # [2, M=2, K=1, B=1]
    divergence, multiplier = torch.tensor([[0.5]], requires_grad=True), torch.tensor(2.0, requires_grad=True)
    loss, _ = bear.bear_actor_loss(q, divergence, multiplier, warmup=False)
    assert loss.item() == pytest.approx(2.0 * 0.5 - 2.0)
    loss.backward()
    assert multiplier.grad is None and divergence.grad.item() == pytest.approx(2.0)
    warmup_loss, _ = bear.bear_actor_loss(q, divergence, multiplier, warmup=True)
    assert warmup_loss.item() == pytest.approx(1.0)


def make_agent(divergence: str, learning_rate: float) -> tuple[bear.Agent, torch.optim.Optimizer]:
    args = bear.Args(divergence=divergence, dual_learning_rate=learning_rate, policy_layers=(8,), critic_layers=(8,))
    agent = bear.Agent(2, 1, 1, -torch.ones(1), torch.ones(1), args)
    return agent, bear.make_optimizers(agent, args)["multiplier"]


def run_multiplier(divergence: str, value: float, threshold: float, steps: int, learning_rate: float = 0.01) -> float:
    agent, optimizer = make_agent(divergence, learning_rate)
    for _ in range(steps):
        bear.update_multiplier(agent, optimizer, torch.full((1, 4), value), threshold)
    return agent.multiplier().item()


def test_kl_multiplier_rises_when_violated_falls_when_satisfied_and_keeps_its_floor():
    # Adam with a constant-sign gradient moves the parameter by the learning rate (0.01) per step.
    assert run_multiplier("kl", value=1.0, threshold=0.2, steps=10) == pytest.approx(1.1, abs=1e-4)
    assert run_multiplier("kl", value=0.0, threshold=0.2, steps=10) == pytest.approx(0.9, abs=1e-4)
    assert run_multiplier("kl", value=0.0, threshold=0.2, steps=30, learning_rate=0.1) == pytest.approx(bear.MIN_MULTIPLIER)


def test_mmd_multiplier_moves_in_log_space_within_the_original_clamp():
    assert run_multiplier("mmd", value=1.0, threshold=0.05, steps=10) == pytest.approx(math.exp(0.1), abs=1e-3)
    assert run_multiplier("mmd", value=0.0, threshold=0.05, steps=10) == pytest.approx(math.exp(-0.1), abs=1e-3)
    # In log space the gradient shrinks with alpha, so Adam slows down on the way to the floor.
    assert run_multiplier("mmd", value=0.0, threshold=0.05, steps=300, learning_rate=0.1) == pytest.approx(
        math.exp(-5.0), rel=1e-5)
    assert run_multiplier("mmd", value=1.0, threshold=0.05, steps=150, learning_rate=0.1) == pytest.approx(
        math.exp(10.0), rel=1e-5)


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_smoke_run_writes_every_file_and_resumes(tmp_path, random_dataset):
    args = tiny_args(tmp_path, random_dataset)
    summary = bear.train(args)
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "bear" and config["args"]["divergence"] == "kl"
    rows = read_metrics(run_dir)
    assert [int(row["step"]) for row in rows] == [2, 4]
    for key in ("eval/return", "eval/prior_return", "losses/critic", "losses/prior", "losses/actor",
                "charts/q", "charts/kl", "charts/multiplier"):
        assert np.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["charts/multiplier"]) >= bear.MIN_MULTIPLIER
    assert list(run_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert {"agent", "prior_optimizer", "critic_optimizer", "policy_optimizer", "multiplier_optimizer",
            "rng"} <= set(checkpoint)
    assert "lagrange_parameter" in checkpoint["agent"]
    saved_summary = json.loads((run_dir / "summary.json").read_text())
    assert saved_summary["final/return"] == pytest.approx(float(rows[-1]["eval/return"]))
    assert summary == saved_summary

    # Resume to 6 updates: continues at update 5 and matches an uninterrupted 6-update run exactly.
    bear.train(replace(args, resume=str(run_dir), total_steps=6))
    assert [int(row["step"]) for row in read_metrics(run_dir)] == [2, 4, 6]
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 6
    bear.train(tiny_args(tmp_path, random_dataset, run_dir=str(tmp_path / "straight"), total_steps=6))
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    for name, tensor in straight["agent"].items():
        assert torch.equal(tensor, resumed["agent"][name]), name


@pytest.mark.slow
def test_smoke_mmd_run(tmp_path, random_dataset):
    bear.train(tiny_args(tmp_path, random_dataset, divergence="mmd", kernel="gaussian", total_steps=2))
    row = read_metrics(tmp_path / "run")[-1]
    assert np.isfinite(float(row["charts/mmd"])) and np.isfinite(float(row["eval/return"]))
    assert math.exp(-5.0) <= float(row["charts/multiplier"]) <= math.exp(10.0)


def test_unknown_env_is_a_user_error(tmp_path, random_dataset):
    with pytest.raises(bear.UserError, match="unknown env") as error:
        bear.train(tiny_args(tmp_path, random_dataset, env="no-such-env"))
    assert "\n" not in str(error.value)


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(bear.UserError, match="does not exist") as error:
        bear.train(tiny_args(tmp_path, tmp_path / "missing.npz"))
    assert "\n" not in str(error.value)
