"""MPO and ABM pieces of abm_mpo.py against values computed by hand (Appendix B.1, Eq. 4, 7-10)."""

import math

import numpy as np
import pytest
import torch

import abm_mpo as m


def q_column(*values):
    """Q of M samples at one state, shaped [M, K=1, B=1] like the update's e-step Q."""
    return torch.tensor(values, dtype=torch.float64)[:, None, None]


def test_temperature_dual_value_and_gradient():
    # g(eta) = eta * eps + eta * log((1/M) sum_j exp(Q_j / eta)), Q = (1, 2, 3), eta = 2, eps = 0.1
    q = q_column(1.0, 2.0, 3.0)
    eta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss, _ = m.temperature_dual_loss(q, eta, epsilon=0.1)
    log_mean_exp = math.log((math.exp(0.5) + math.exp(1.0) + math.exp(1.5)) / 3)
    assert loss.item() == pytest.approx(0.2 + 2 * log_mean_exp, rel=1e-12)
    # dg/deta = eps + log mean exp(Q/eta) - sum_j w_j Q_j / eta, w = softmax(Q/eta)
    loss.backward()
    w = np.exp([0.5, 1.0, 1.5]) / np.exp([0.5, 1.0, 1.5]).sum()
    assert eta.grad.item() == pytest.approx(0.1 + log_mean_exp - (w @ [1.0, 2.0, 3.0]) / 2, rel=1e-12)


def test_temperature_dual_includes_minus_log_m():
    # With equal Q values the sample estimate of E[exp(Q/eta)] is exp(Q/eta): g = eta * (eps + Q / eta).
    q = q_column(*[4.0] * 20)
    loss, _ = m.temperature_dual_loss(q, torch.tensor(3.0, dtype=torch.float64), epsilon=0.1)
    assert loss.item() == pytest.approx(0.3 + 4.0, rel=1e-12)


def test_temperature_dual_minimum_is_where_the_kl_reaches_epsilon():
    # At the minimiser of g, KL(q || uniform over the samples) = eps (Eq. 7-9).
    q = q_column(0.0, 1.0, 2.0, 5.0)

    def gradient(value: float) -> float:  # dg/deta by autograd; g is convex, so bisect its root
        eta = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        m.temperature_dual_loss(q, eta, epsilon=0.1)[0].backward()
        return eta.grad.item()

    low, high = 0.01, 100.0
    assert gradient(low) < 0 < gradient(high)
    for _ in range(100):
        low, high = (low, (low + high) / 2) if gradient((low + high) / 2) > 0 else ((low + high) / 2, high)
    eta = torch.tensor(low, dtype=torch.float64)
    w = m.e_step_weights(q, eta).flatten()
    kl_to_uniform = float((w * torch.log(w * len(w))).sum())
    assert kl_to_uniform == pytest.approx(0.1, abs=1e-9)


def test_e_step_weights_are_a_softmax_over_the_samples():
    q = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[4.0, 3.0]]], dtype=torch.float64)  # [M=3, K=1, B=2]
    w = m.e_step_weights(q, torch.tensor(0.5, dtype=torch.float64))
    first = np.exp([2.0, 4.0, 8.0]) / np.exp([2.0, 4.0, 8.0]).sum()
    second = np.exp([0.0, 0.0, 6.0]) / np.exp([0.0, 0.0, 6.0]).sum()
    np.testing.assert_allclose(w[:, 0, 0].numpy(), first, rtol=1e-12)
    np.testing.assert_allclose(w[:, 0, 1].numpy(), second, rtol=1e-12)


def test_gaussian_kl_closed_form():
    # KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2
    kl = m.gaussian_kl(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0]))
    assert kl.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    # Two dimensions: the KL is the sum of the per-dimension KLs.
    kl2 = m.gaussian_kl(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]),
                        torch.tensor([2.0, 1.0]))
    assert kl2.item() == pytest.approx(kl.item(), rel=1e-6)


def test_decoupled_kl_terms():
    # target N(mu_t = 0, sigma_t = 1), online N(mu = 0.3, sigma = 2), one action dimension, two states.
    target_mean, target_std = torch.zeros(2, 1), torch.ones(2, 1)
    mean, std = torch.full((2, 1), 0.3), torch.full((2, 1), 2.0)
    kl_mean, kl_std = m.decoupled_kl(target_mean, target_std, mean, std)
    # Mean part: KL(N(0, 1) || N(0.3, 1)) = 0.3^2 / 2.
    assert kl_mean.item() == pytest.approx(0.045, rel=1e-6)
    # Covariance part: KL(N(0, 1) || N(0, 2^2)) = log 2 + 1/8 - 1/2.
    assert kl_std.item() == pytest.approx(math.log(2) + 0.125 - 0.5, rel=1e-6)


def test_weighted_mle_multipliers_grow_when_the_trust_region_is_violated():
    # KL_mean = 0.045 > eps_mean = 5e-3: d(loss)/d(alpha_mean) = eps - KL < 0, so Adam raises alpha.
    # KL_std = 0 < eps_std: d(loss)/d(alpha_std) = eps_std > 0, so alpha_std falls.
    actions = torch.zeros(4, 1, 2, 1)
    weights = torch.full((4, 1, 2), 0.25)
    alpha_mean = torch.tensor(1.0, requires_grad=True)
    alpha_std = torch.tensor(1.0, requires_grad=True)
    target_mean, target_std = torch.zeros(1, 2, 1), torch.ones(1, 2, 1)
    mean = torch.full((1, 2, 1), 0.3, requires_grad=True)
    loss, metrics = m.weighted_mle_loss(actions, weights, mean, target_std.clone(), target_mean, target_std,
                                        alpha_mean, alpha_std, 5e-3, 1e-5)
    loss.backward()
    assert metrics["charts/kl_mean"].item() == pytest.approx(0.045, rel=1e-5)
    assert alpha_mean.grad.item() == pytest.approx(5e-3 - 0.045, rel=1e-5)
    assert alpha_std.grad.item() == pytest.approx(1e-5, rel=1e-4)
    # The policy's gradient: weighted likelihood pulls the mean to the samples (at 0) and the
    # penalty alpha * KL_mean pulls it to the target mean (also 0): both push the mean down.
    assert mean.grad.sum().item() > 0


def test_weighted_mle_likelihood_is_sum_over_samples_mean_over_states():
    actions = torch.tensor([0.0, 1.0])[:, None, None, None]  # [M=2, K=1, B=1, act=1]
    weights = torch.tensor([0.75, 0.25])[:, None, None]
    zero, one = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    _, metrics = m.weighted_mle_loss(actions, weights, zero, one, zero, one, torch.tensor(0.0),
                                     torch.tensor(0.0), 0.0, 0.0)
    # -(0.75 * 2 * log N(0; 0, 1) + 0.25 * 2 * log N(1; 0, 1)): the mean and covariance parts each
    # contribute one log-likelihood, both evaluated here at the same Gaussian.
    log_n0, log_n1 = -0.5 * math.log(2 * math.pi), -0.5 - 0.5 * math.log(2 * math.pi)
    assert metrics["losses/policy"].item() == pytest.approx(-(1.5 * log_n0 + 0.5 * log_n1), rel=1e-6)


def test_project_duals_keeps_them_at_least_0_001():
    temperature = torch.nn.Parameter(torch.tensor(-5.0))
    multiplier = torch.nn.Parameter(torch.tensor(0.0))
    untouched = torch.nn.Parameter(torch.tensor(2.5))
    m.project_duals(temperature, multiplier, untouched)
    assert temperature.item() == pytest.approx(1e-3)
    assert multiplier.item() == pytest.approx(1e-3)
    assert untouched.item() == 2.5


def test_advantage_weights_are_a_unit_step_of_the_snippet_advantage():
    # R + gamma^N V(s_N) - V(s_t) for three snippets: 1 + 0.5 * 2 - 1.5 = 0.5 (kept),
    # 1 + 0.5 * 2 - 2.5 = -0.5 (dropped), 0 + 0 * 9 - 0 = 0 (kept: the step is >= 0).
    weights = m.advantage_weights(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.5, 0.5, 0.0]),
                                  torch.tensor([2.0, 2.0, 9.0]), torch.tensor([1.5, 2.5, 0.0]))
    assert weights.tolist() == [1.0, 0.0, 1.0]


def test_abm_loss_ignores_the_actions_with_zero_weight():
    mean, std = torch.zeros(1, 2, 1, requires_grad=True), torch.ones(1, 2, 1)
    action = torch.tensor([[[1.0], [-1.0]]])
    loss, metrics = m.advantage_weighted_behaviour_model_loss(mean, std, action, torch.tensor([[1.0, 0.0]]))
    loss.backward()
    # Only the first state's action pulls: d/dmu of -(1/2) log N(1; mu, 1) at mu = 0 is -1/2.
    assert mean.grad[0, :, 0].tolist() == pytest.approx([-0.5, 0.0])
    assert metrics["charts/abm_accepted_fraction"].item() == 0.5


def test_critic_loss_uses_the_discounted_target():
    loss, _ = m.critic_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.0]),
                            torch.tensor([2.0, 7.0]), gamma=0.5)
    # targets: 0.5 + 0.5 * 2 = 1.5 and 1.0 (terminal); errors -0.5 and 1.0.
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
