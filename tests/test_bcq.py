"""bcq.py: the VAE, the perturbation bound, the soft clipped double-Q target, a run and its resume."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import bcq
from tests.helpers import SMOKE_ENV


def tiny_args(tmp_path, dataset, **overrides) -> bcq.Args:
    args = bcq.Args(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(tmp_path / "run"), total_steps=4,
                    eval_every=2, checkpoint_every=2, eval_episodes=1, batch_size=16, num_action_samples=3,
                    num_eval_samples=3, latent_size=4, encoder_layers=(32, 32), decoder_layers=(32, 32), perturbation_layers=(32, 32),
                    critic_layers=(32, 32), device="cpu")
    return replace(args, **overrides)


def test_vae_reconstructs_structured_actions():
    # Data with a = tanh(s W): a deterministic function of the state, so a good G(a|s) samples
    # it almost exactly even with the latent ignored.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.5]])

    def draw(size):
        state = torch.rand(1, size, 3, generator=generator) * 2 - 1
        return state, torch.tanh(state @ weights)

    vae = bcq.VAE(3, 2, latent_size=8, hidden=(32, 32), num_heads=1, shared=1, low=-torch.ones(2),
                  high=torch.ones(2), latent_clip=0.5)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    test_state, test_action = draw(1000)

    def sample_error() -> float:
        with torch.no_grad():
            return (vae.sample(test_state, generator) - test_action).pow(2).mean().item()

    initial = sample_error()
    for _ in range(800):
        state, action = draw(128)
        mean, std = vae.encode(state, action)
        latent = mean + std * torch.randn(mean.shape, generator=generator)
        loss, metrics = bcq.vae_loss(vae.decode(state, latent), action, mean, std, kl_weight=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = sample_error()
    assert initial > 0.2
    assert final < 0.01, f"VAE samples miss the data actions by MSE {final:.4f}"
    assert final < initial / 20
    assert metrics["losses/vae_reconstruction"] < 0.02


def test_vae_loss_matches_formula():
    reconstruction, action = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 0.0]])
    mean, std = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]])
    # mse = (0.25 + 1) / 2; KL elements: -0.5 * (1 + 0 - 1 - 1) = 0.5 and -0.5 * (1 + log 4 - 0 - 4).
    expected_kl = (0.5 + -0.5 * (1 + np.log(4.0) - 4)) / 2
    loss, _ = bcq.vae_loss(reconstruction, action, mean, std, kl_weight=0.5)
    assert loss.item() == pytest.approx(0.625 + 0.5 * expected_kl, rel=1e-6)


def test_perturbation_stays_within_a_quarter_of_the_action_range():
    torch.manual_seed(0)
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])  # half ranges 2 and 0.5
    model = bcq.PerturbationModel(3, 2, hidden=(32, 32), num_heads=1, shared=1, low=low, high=high, scale=0.25)
    with torch.no_grad():  # saturate the tanh: the perturbation reaches its bound
        for parameter in model.net.head.parameters():
            parameter.mul_(1e3)
    center = (low + high) / 2
    observation = torch.cat([torch.full((1, 50, 3), 1e6), torch.full((1, 50, 3), -1e6),
                             torch.randn(1, 100, 3) * 1e3], dim=1)
    action = center.expand(1, 200, 2)
    perturbation = (model(observation, action) - action).abs()  # [1, 200, 2]
    bound = 0.25 * (high - low) / 2  # [0.5, 0.125]
    assert torch.all(perturbation <= bound + 1e-6)
    assert torch.all(perturbation.amax(dim=(0, 1)) > 0.99 * bound)
    # From the edge of the action box the perturbed action stays inside it.
    edge = torch.stack([low, high])[torch.randint(0, 2, (1, 200, 2)), torch.arange(2)]
    perturbed = model(observation, edge)
    assert torch.all(perturbed >= low) and torch.all(perturbed <= high)


def test_clipped_double_q_target_matches_hand_computation():
    # next_q[i, j, k, b]: critic i, sampled action j, task k, state b.
    next_q = torch.tensor([
        [[[1.0, 5.0]], [[3.0, 0.0]], [[2.0, -1.0]]],
        [[[2.0, 4.0]], [[1.0, 2.0]], [[6.0, -3.0]]],
    ])  # [2, 3, 1, 2]
    reward, discount = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.0]])
    gamma, lam = 0.9, 0.75
    expected = []
    for b in range(2):
        mixed = []
        for j in range(3):
            q1, q2 = next_q[0, j, 0, b].item(), next_q[1, j, 0, b].item()
            mixed.append(lam * min(q1, q2) + (1 - lam) * max(q1, q2))
        expected.append(reward[0, b].item() + gamma * discount[0, b].item() * max(mixed))
    # by hand: state 0: mixed = [1.25, 1.5, 3.0] -> 0.5 + 0.9 * 3.0 = 3.2; state 1 is terminal -> 1.0
    assert expected == pytest.approx([3.2, 1.0])
    target, _ = bcq.clipped_double_q_target(next_q, reward, discount, gamma, lam)
    assert target[0].tolist() == pytest.approx(expected)


def test_update_targets_the_clipped_double_q_value_of_a_stub_critic():
    # A stub target critic with known values: Q'_1 = 1 + a, Q'_2 = 2 * a (one action dim, a in [-1, 1]).
    args = bcq.Args(batch_size=4, num_action_samples=5, latent_size=2, encoder_layers=(8,), decoder_layers=(8,), perturbation_layers=(8,),
                    critic_layers=(8,), learning_rate=0.0)  # lr 0: nothing moves
    torch.manual_seed(0)
    agent = bcq.Agent(2, 1, 1, -torch.ones(1), torch.ones(1), args)

    class StubCritic(torch.nn.Module):
        def forward(self, observation, action):
            return torch.stack([1 + action[..., 0], 2 * action[..., 0]])

    agent.target_critic = StubCritic()
    batch = {"observation": torch.randn(1, 4, 2), "next_observation": torch.randn(1, 4, 2),
             "action": torch.zeros(1, 4, 1), "reward": torch.ones(1, 4), "discount": torch.ones(1, 4)}
    generator = torch.Generator().manual_seed(1)
    metrics = bcq.update(agent, bcq.make_optimizers(agent, args), batch, args, generator)
    # Replay the sampled next actions with the same generator state to compute the target by hand.
    generator = torch.Generator().manual_seed(1)
    latent_mean, latent_std = agent.vae.encode(batch["observation"], batch["action"])
    torch.randn(latent_mean.shape, generator=generator)  # the VAE step's reparameterisation noise
    with torch.no_grad():
        states = bcq.repeat_states(batch["next_observation"], 5)
        actions = agent.target_perturbation(states, agent.vae.sample(states, generator))[..., 0]  # [1, 20]
    q1, q2 = 1 + actions, 2 * actions
    mixed = (0.75 * torch.minimum(q1, q2) + 0.25 * torch.maximum(q1, q2)).reshape(5, 4)  # [M, B]
    expected = 1 + 0.99 * mixed.max(0).values
    assert metrics["charts/target_q"].item() == pytest.approx(expected.mean().item(), rel=1e-5)


def read_metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_smoke_run_writes_every_file_and_resumes(tmp_path, random_dataset):
    args = tiny_args(tmp_path, random_dataset)
    summary = bcq.train(args)
    run_dir = tmp_path / "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "bcq" and config["args"]["num_eval_samples"] == 3
    rows = read_metrics(run_dir)
    assert [int(row["step"]) for row in rows] == [2, 4]
    for key in ("eval/return", "eval/prior_return", "losses/critic", "losses/vae", "losses/actor", "charts/q"):
        assert np.isfinite(float(rows[-1][key])), key
    assert list(run_dir.glob("events.out.tfevents.*"))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 4
    assert {"agent", "vae_optimizer", "critic_optimizer", "perturbation_optimizer", "rng"} <= set(checkpoint)
    saved_summary = json.loads((run_dir / "summary.json").read_text())
    assert saved_summary["final/return"] == pytest.approx(float(rows[-1]["eval/return"]))
    assert summary == saved_summary

    # Resume to 6 updates: continues at update 5 and matches an uninterrupted 6-update run exactly.
    bcq.train(replace(args, resume=str(run_dir), total_steps=6))
    assert [int(row["step"]) for row in read_metrics(run_dir)] == [2, 4, 6]
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 6
    bcq.train(tiny_args(tmp_path, random_dataset, run_dir=str(tmp_path / "straight"), total_steps=6))
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    for name, tensor in straight["agent"].items():
        assert torch.equal(tensor, resumed["agent"][name]), name


def test_unknown_env_is_a_user_error(tmp_path, random_dataset):
    with pytest.raises(bcq.UserError, match="unknown env") as error:
        bcq.train(tiny_args(tmp_path, random_dataset, env="no-such-env"))
    assert "\n" not in str(error.value)


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(bcq.UserError, match="does not exist") as error:
        bcq.train(tiny_args(tmp_path, tmp_path / "missing.npz"))
    assert "\n" not in str(error.value)
