"""ABM+SVG: offline RL with an advantage-weighted behaviour model prior and stochastic value gradient
policy improvement.

Paper: Siegel et al., "Keep doing what worked: behaviour modelling priors for offline
reinforcement learning", ICLR 2020. This file implements Algorithm 1 with
  - policy evaluation by TD(0) with V(s') averaged over M samples of pi_i (Eq. 1),
  - the prior: behaviour model (Eq. 3, `--prior bm`) or advantage-weighted behaviour model with
    unit-step weights on N-step snippet returns (Eq. 4, `--prior abm`),
  - SVG policy improvement (Eq. 6, Appendix B.2): the Lagrangian of Eq. 2,
        max_theta min_{eta > 0} E_s[ E_{a ~ pi_theta}[Q(s, a)] + eta (eps - KL(pi_theta(.|s) || prior(.|s))) ],
    with the reparameterised gradient of Eq. 11, a_j = mu(s) + sigma(s) xi_j, xi_j ~ N(0, I),
    j = 1..M, the KL in closed form for diagonal Gaussians, and eta moved by Adam on
    eta (eps - KL) (Eq. 12), started at 1 and projected to eta >= 0.001 after each step,
  - `--prior none`: plain offline SVG. The KL term then regularises towards pi_i, the target
    policy (the last hard copy of pi_theta, every 200 updates): a trust-region SVG, the
    counterpart of the previous-policy trust region of abm_mpo.py's `--prior none`. Without a KL
    term the Q-gradient alone shrinks sigma to its minimum and chases the critic's extrapolation;
    with pi_i the three Table 6 columns differ only in what the policy is pulled towards, under
    the same eps and eta. There is no prior to evaluate: no `eval/prior_return`.

Differences from the paper (all stated choices where the paper is silent):
  - Q in Eq. 11 is the target critic Q_phi' (Algorithm 1's SVG line), a constant of the policy
    loss, scoring clip(a, low, high) like everywhere in this project (the env clips actions).
    The clip's gradient is zero outside the bounds: the exact gradient of E[Q(s, clip(a))], the
    value the env realises. A sample beyond a bound adds no Q-gradient, so Q moves the mean past a
    bound only while some of its samples still fall inside (a straight-through gradient would
    push on without limit wherever Q still rises at the bound); beyond that only the KL term acts.
  - The prior is a constant in the KL term: it learns from Eq. 3 / Eq. 4 only.
  - The sums over the batch in Eq. 11 and Eq. 12 are means; theta and eta take one simultaneous
    Adam step per batch (eta constant in the policy loss, the KL constant in the eta loss) rather
    than alternating steps. One eta for all tasks.
  - ABM snippets are clipped at the episode end (bootstrapping from the last next-state), and
    the prior loss is the batch mean of weight * log-likelihood.
  - Gradients are clipped at global norm 40 per network (Acme's MPO default).
  - Minimum variance 0.01 (Table 2) is implemented as std = softplus(h) + 0.1.
  - The Lagrange multiplier eta moves by Adam at the paper's rate 2e-4 (paper-literal), so at most
    about 2e-4 per update: from 1 it needs thousands of updates to change by O(1).
  - The ABM prior (Eq. 4) learns from the first transition (s_t, a_t) of each sampled snippet, weighted
    by the return of the full horizon N from t (clipped at the episode end).
  - Networks (Table 2): layer norm then ELU on the first layer, ELU after the others (Acme uses tanh
    after its first-layer layer norm).
  - No `--epsilon 0` variant (the prior alone): use `abm_mpo.py --epsilon 0`.
  - `--env sawyer` (Section 5.2): networks of Table 5 (a torso shared by the tasks, one head per
    task); the learner's actions are normalised to [-1, 1] (the dataset's physical actions are
    rescaled at load time, the env takes them through RescaleAction): the action dimensions differ
    in scale by 3600x, and a minimum std of 0.1 in physical units would swamp the 0.07 m/s ones.
  - Observations are standardised by the dataset's per-dimension mean and std (std floored at 1e-3)
    when `--normalize-observations` is on, the default for `--env sawyer` only: its observation scales
    differ ~2000x. The paper is silent; the statistics are in config.json, checkpoint.pt and policy.pt2,
    whose exported policy takes raw observations.
"""

import copy
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import sawyer_env


@dataclass
class Args:
    env: Optional[str] = None
    """`hopper`, `cheetah`, `walker`, `quadruped` (Control Suite hopper-hop, cheetah-run,
    walker-walk, quadruped-run), any Control Suite `domain-task`, `sawyer` (the simulated Sawyer
    of sawyer_env.py, multi-task, Section 5.2), or a gymnasium id; default: the env a Minari
    --dataset stores, else `hopper`"""
    task: str = "all"
    """reward column(s) of the dataset to learn: one task name, or `all` for every column (sawyer: the
    seven tasks); sawyer's new tasks `center` and `corner` are labelled from the data's s'"""
    dataset: Optional[str] = None
    """dataset path (.npz or a directory of .npy files), `minari:<dataset_id>` or a Minari dataset
    directory (converted once by minari_io.py); default `datasets/<env>.npz`, generated by collect.py
    when missing"""
    dataset_episodes: Optional[int] = None
    """keep only the first K episodes of each collecting run (the paper's low-data regime)"""
    normalize_observations: Optional[bool] = None
    """standardise observations by the dataset's mean and std; None = on for `--env sawyer` (scales
    differ ~2000x), off elsewhere (the paper's Control Suite setting)"""
    seed: int = 0
    """seed of the network initialisation, batch sampling and action sampling"""
    total_steps: int = 1_000_000
    """number of gradient updates"""
    eval_every: int = 10_000
    """gradient updates between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation, for the policy and for the prior"""
    eval_max_steps: Optional[int] = None
    """cut evaluation episodes after this many steps (default: the env's own length, 200 for sawyer)"""
    checkpoint_every: int = 10_000
    """gradient updates between checkpoints"""
    run_dir: Optional[str] = None
    """run directory; default `runs/<script>__<env>__<seed>__<time>`"""
    resume: Optional[str] = None
    """continue the run in this directory from its checkpoint.pt"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16`: the batched Q passes over M sampled actions run their matrix products in bfloat16
    (autocast, float32 weights and losses); fast only on CPUs/GPUs with native bf16"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the update's losses (on CUDA with CUDA graphs); `auto`: on for CUDA, and on a CPU for runs
    of at least 20,000 updates (compiling takes 1-2 min); `off`: the eager code"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "behaviour-priors"
    """Weights & Biases project name"""
    capture_video: bool = False
    """save a video of the first evaluation episode (needs `pip install moviepy`)"""

    # Algorithm specific arguments (defaults: Table 2)
    prior: Literal["abm", "bm", "none"] = "abm"
    """prior the KL term pulls towards: advantage-weighted behaviour model (Eq. 4), behaviour
    model (Eq. 3), or none (plain offline SVG, KL towards the target policy pi_i)"""
    batch_size: int = 512
    """transitions (trajectory snippets) per gradient update and task"""
    num_action_samples: int = 20
    """M, action samples per state for V(s) (Eq. 1) and the value gradient (Eq. 11)"""
    snippet_length: int = 10
    """N, length of the trajectory snippets whose return weights the ABM prior (Eq. 4)"""
    discount: float = 0.99
    """discount factor gamma"""
    learning_rate: float = 2e-4
    """Adam learning rate of the critic, policy and prior"""
    dual_learning_rate: float = 2e-4
    """Adam learning rate of the Lagrange multiplier eta (Eq. 12)"""
    epsilon: float = 0.2
    """bound on KL(pi || prior) in the policy improvement step (Eq. 2, Eq. 6)"""
    initial_multiplier: float = 1.0
    """initial eta, the Lagrange multiplier of the KL constraint (Eq. 6)"""
    target_update_period: int = 200
    """gradient updates between hard copies to the target networks"""
    max_grad_norm: float = 40.0
    """gradient clipping (global norm per network)"""
    policy_layers: Optional[tuple[int, ...]] = None
    """hidden layers of the policy and the prior; default the paper's: 256-256 (Table 1), sawyer 200 -> 300 (Table 5)"""
    critic_layers: Optional[tuple[int, ...]] = None
    """hidden layers of the Q function; default 256-256-256 (Table 1), sawyer 400 -> 400 (Table 5)"""
    shared_layers: int = 1
    """first hidden layers shared by all tasks; the rest are one head per task (Table 5)"""

    def __post_init__(self):
        fill_defaults(self)


# --- shared block: networks ---
class MultiHeadLinear(nn.Module):
    """One linear layer per task head: x [K, N, in] -> [K, N, out], head k for slice k."""

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        layers = [nn.Linear(in_features, out_features) for _ in range(num_heads)]  # PyTorch default init
        self.weight = nn.Parameter(torch.stack([layer.weight.T for layer in layers]))  # [K, in, out]
        self.bias = nn.Parameter(torch.stack([layer.bias for layer in layers])[:, None])  # [K, 1, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class MultiHeadMLP(nn.Module):
    """ELU MLP with layer norm on the first layer (Table 1). The first `shared` hidden layers
    form a torso shared by all tasks, the rest and the output layer are per task (Table 5).
    Input and output are [K, N, features], one slice per task."""

    def __init__(self, in_features: int, hidden: tuple, out_features: int, num_heads: int, shared: int):
        super().__init__()
        assert 1 <= shared <= len(hidden)
        sizes = (in_features, *hidden)
        torso = [nn.Linear(sizes[0], sizes[1]), nn.LayerNorm(sizes[1]), nn.ELU()]
        for i in range(1, shared):
            torso += [nn.Linear(sizes[i], sizes[i + 1]), nn.ELU()]
        self.torso = nn.Sequential(*torso)
        head = []
        for i in range(shared, len(hidden)):
            head += [MultiHeadLinear(num_heads, sizes[i], sizes[i + 1]), nn.ELU()]
        self.head = nn.Sequential(*head, MultiHeadLinear(num_heads, sizes[-1], out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.head[:-1](self.torso(x))
        with torch.autocast(x.device.type, enabled=False):  # output layer in fp32, also under bf16 autocast
            return self.head[-1](hidden.float())


class Critic(nn.Module):
    """Q(s, a) for each task head: observation [K, N, obs], action [K, N, act] -> [K, N]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple, num_heads: int, shared: int):
        super().__init__()
        self.net = MultiHeadMLP(obs_dim + act_dim, hidden, 1, num_heads, shared)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], dim=-1)).squeeze(-1)
# --- end shared block ---


# --- shared block: gaussian policy ---
MIN_STD = 0.1  # Table 1: minimum variance 0.01


class GaussianPolicy(nn.Module):
    """pi(a|s) = N(mu(s), diag(sigma(s)^2)), no tanh on the mean, sigma = softplus + MIN_STD."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple, num_heads: int, shared: int):
        super().__init__()
        self.net = MultiHeadMLP(obs_dim, hidden, 2 * act_dim, num_heads, shared)

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, pre_std = self.net(observation).chunk(2, dim=-1)
        return mean, F.softplus(pre_std) + MIN_STD


def gaussian_log_prob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(action; mean, diag(std^2)), summed over the action dimensions."""
    return (-0.5 * ((action - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p, std_p, mean_q, std_q) -> torch.Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)), in closed form, summed over action dimensions."""
    return (torch.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5).sum(-1)


def sample_actions(mean: torch.Tensor, std: torch.Tensor, num_samples: int,
                   generator: torch.Generator) -> torch.Tensor:
    """M samples from N(mean, std^2): [K, B, act] -> [M, K, B, act]."""
    noise = torch.randn((num_samples, *mean.shape), generator=generator, device=mean.device)
    return mean + std * noise
# --- end shared block ---


# --- shared block: snippets ---
def sample_batch(data: dict, columns: list[int], batch_size: int, snippet_length: int,
                 discount: float, rng: np.random.Generator) -> dict:
    """Draw `batch_size` snippets (s_t, a_t, ..., s_{t+N}) for each task, independently per task.

    Returns arrays [K, B, ...]: the first transition for TD learning (Eq. 1), and for Eq. 4 the
    discounted reward sum of the snippet and the state and discount to bootstrap it with. A
    snippet that reaches the end of its episode stops there and bootstraps from its last s'."""
    num_tasks = len(columns)
    index = rng.integers(0, len(data["observation"]), size=(num_tasks, batch_size))  # [K, B]
    last = data["episode_last"][index][..., None]
    positions = index[..., None] + np.arange(snippet_length)  # [K, B, N]
    valid = positions <= last
    positions = np.minimum(positions, last)
    rewards = data["reward"][positions, np.asarray(columns)[:, None, None]]  # [K, B, N]
    step_discount = np.where(valid, discount * data["discount"][positions], 1.0)
    cumulative = np.cumprod(step_discount, axis=-1)
    weights = np.concatenate([np.ones_like(cumulative[..., :1]), cumulative[..., :-1]], axis=-1) * valid
    batch = {
        "observation": data["observation"][index],
        "action": data["action"][index],
        "reward": rewards[..., 0],
        "discount": data["discount"][index],
        "next_observation": data["next_observation"][index],
        "snippet_return": (weights * rewards).sum(-1),
        "bootstrap_observation": data["next_observation"][positions[..., -1]],
        "bootstrap_discount": cumulative[..., -1],
    }
    return {key: np.asarray(value, dtype=np.float32) for key, value in batch.items()}


def sample_batch_on_device(data: dict, batch_size: int, snippet_length: int, discount: float,
                           generator: torch.Generator, index: Optional[torch.Tensor] = None) -> dict:
    """sample_batch on tensors held on the device (Run.device_data: states standardised, the learned reward
    columns only), indices drawn by `generator`: no host round trip. `index` [K, B]: those snippets instead."""
    num_tasks = data["reward"].shape[1]
    if index is None:
        index = torch.randint(len(data["observation"]), (num_tasks, batch_size), generator=generator,
                              device=generator.device)  # [K, B]
    last = data["episode_last"][index][..., None]
    positions = index[..., None] + torch.arange(snippet_length, device=index.device)  # [K, B, N]
    valid = positions <= last
    positions = torch.minimum(positions, last)
    rewards = data["reward"][positions, torch.arange(num_tasks, device=index.device)[:, None, None]]  # [K, B, N]
    step_discount = torch.where(valid, discount * data["discount"][positions], 1.0)
    cumulative = torch.cumprod(step_discount, dim=-1)
    weights = torch.cat([torch.ones_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1) * valid
    return {"observation": data["observation"][index], "action": data["action"][index], "reward": rewards[..., 0],
            "discount": data["discount"][index], "next_observation": data["next_observation"][index],
            "snippet_return": (weights * rewards).sum(-1),
            "bootstrap_observation": data["next_observation"][positions[..., -1]],
            "bootstrap_discount": cumulative[..., -1]}
# --- end shared block ---


# --- shared block: device data ---
def data_on_device(data: dict, columns: list, mean: list, std: list, device: torch.device,
                   on_cpu: bool = False) -> Optional[dict]:
    """On CUDA, the arrays batches are drawn from as tensors on the GPU (states standardised by `mean` and `std`,
    the learned reward `columns` only), for sample_*_on_device. None on a CPU (unless `on_cpu`: tests), where
    the numpy samplers keep the CPU's numbers bit-identical, and where the arrays would fill more than half
    of the GPU's free memory (batches are then drawn on the host and copied)."""
    keys = ("observation", "action", "reward", "discount", "next_observation", "episode_last")
    size = sum(np.asarray(data[key]).nbytes for key in keys)
    too_big = device.type == "cuda" and size > torch.cuda.mem_get_info(device)[0] / 2
    if (device.type == "cpu" and not on_cpu) or too_big:
        return None
    arrays = {key: torch.as_tensor(np.asarray(data[key], np.int64 if key == "episode_last" else np.float32),
                                   device=device) for key in keys}
    arrays["reward"] = arrays["reward"][:, columns]
    mean, std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    return {**arrays, **{key: (arrays[key] - mean) / std for key in ("observation", "next_observation")}}
# --- end shared block ---


# --- shared block: policy evaluation ---
def q_values(critic: nn.Module, observation: torch.Tensor, actions: torch.Tensor,
             low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q(s, a_j) for M actions per state: [K, B, obs], [M, K, B, act] -> [M, K, B] in float32.
    The env clips actions, so a sampled action is scored at clip(a, low, high). The rows go through
    the critic in chunks (CHUNK_ROWS, a cache size, is with the plumbing); under torch.compile in one
    pass (unrolled chunks multiply the compile time, and the compiler schedules the pass itself)."""
    num_samples, num_tasks, batch, act_dim = actions.shape
    repeated = observation.unsqueeze(1).expand(-1, num_samples, -1, -1).reshape(num_tasks, num_samples * batch, -1)
    flat_actions = actions.clamp(low, high).transpose(0, 1).reshape(num_tasks, num_samples * batch, act_dim)
    rows = num_samples * batch if torch.compiler.is_compiling() else CHUNK_ROWS * torch.get_num_threads()
    chunks = zip(repeated.split(rows, dim=1), flat_actions.split(rows, dim=1))
    q = torch.cat([critic(states, chunk_actions) for states, chunk_actions in chunks], dim=1).float()
    return q.reshape(num_tasks, num_samples, batch).transpose(0, 1)


def critic_loss(q: torch.Tensor, reward: torch.Tensor, discount: torch.Tensor,
                next_value: torch.Tensor, gamma: float) -> tuple[torch.Tensor, dict]:
    # Eq. 1: squared TD(0) error with V(s') = mean_j Q_target(s', a_j), a_j ~ pi_target(.|s').
    target = reward + gamma * discount * next_value
    loss = (q - target).pow(2).mean()
    return loss, {"losses/critic": loss.detach(), "charts/q": q.detach().mean()}
# --- end shared block ---


# --- shared block: behaviour model ---
def behaviour_model_loss(mean: torch.Tensor, std: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Eq. 3: maximise the log-likelihood of every dataset action.
    loss = -gaussian_log_prob(action, mean, std).mean()
    return loss, {"losses/prior": loss.detach()}
# --- end shared block ---


# --- shared block: advantage-weighted behaviour model ---
def advantage_weights(snippet_return: torch.Tensor, bootstrap_discount: torch.Tensor,
                      bootstrap_value: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Eq. 4: f = unit step of R(tau_{t:N}) - V(s_t), R bootstrapped with gamma^N V(s_N).
    advantage = snippet_return + bootstrap_discount * bootstrap_value - value
    return (advantage >= 0).float()


def advantage_weighted_behaviour_model_loss(mean: torch.Tensor, std: torch.Tensor, action: torch.Tensor,
                                            weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Eq. 4: log-likelihood of the dataset actions whose snippet did at least as well as pi_i.
    loss = -(weights * gaussian_log_prob(action, mean, std)).mean()
    return loss, {"losses/prior": loss.detach(), "charts/abm_accepted_fraction": weights.mean()}
# --- end shared block ---


def svg_policy_loss(q: torch.Tensor, kl: torch.Tensor, kl_multiplier: torch.Tensor) -> tuple[torch.Tensor, dict]:
    # Eq. 11: minus the Lagrangian of Eq. 6 for theta. q [M, K, B] = Q(s, mu(s) + sigma(s) xi_j) carries
    # the reparameterised gradient; kl [K, B] = KL(pi_theta(.|s) || prior(.|s)); eta is a constant here.
    expected_q = q.mean()
    loss = -expected_q + kl_multiplier.detach() * kl.mean()
    return loss, {"losses/policy": loss.detach(), "charts/policy_q": expected_q.detach(),
                  "charts/kl": kl.detach().mean()}


def kl_multiplier_loss(kl_multiplier: torch.Tensor, kl: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, dict]:
    # Eq. 12: eta (eps - KL), minimised over eta: eta grows while the KL exceeds eps, shrinks below it.
    loss = kl_multiplier * (epsilon - kl.detach().mean())
    return loss, {"losses/kl_multiplier": loss.detach(), "charts/kl_multiplier": kl_multiplier.detach()}


def project_kl_multiplier(kl_multiplier: nn.Parameter, minimum: float = 1e-3) -> None:
    """Keep eta positive after each Adam step: eta = max(eta, 0.001) (Appendix B.2)."""
    with torch.no_grad():
        kl_multiplier.clamp_(min=minimum)


class Agent(nn.Module):
    """Every learned quantity of Algorithm 1: networks, target networks and the Lagrange multiplier."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, args: Args):
        super().__init__()
        heads = dict(num_heads=num_tasks, shared=args.shared_layers)
        self.critic = Critic(obs_dim, act_dim, args.critic_layers, **heads)
        self.prior = GaussianPolicy(obs_dim, act_dim, args.policy_layers, **heads) if args.prior != "none" else None
        self.policy = GaussianPolicy(obs_dim, act_dim, args.policy_layers, **heads)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)  # pi_i
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)  # Q_phi'
        self.kl_multiplier = nn.Parameter(torch.tensor(args.initial_multiplier))  # eta

    def update_targets(self) -> None:
        self.target_policy.load_state_dict(self.policy.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())

    def networks(self) -> list[nn.Module]:
        return [net for net in (self.critic, self.prior, self.policy) if net is not None]


def make_optimizer(agent: Agent, args: Args) -> torch.optim.Optimizer:
    networks = [p for net in agent.networks() for p in net.parameters()]
    return torch.optim.Adam([{"params": networks, "lr": args.learning_rate},
                             {"params": [agent.kl_multiplier], "lr": args.dual_learning_rate}])


def update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict, args: Args, generator: torch.Generator,
           low: torch.Tensor, high: torch.Tensor, losses: Optional[Callable] = None) -> dict:
    """One step of Algorithm 1 on one batch: the sampling noise, the losses (`losses`: `update_losses`, or its
    compiled form from `compile_losses`), then gradients for Q, prior, policy and eta, and Adam."""
    (num_tasks, batch_size, act_dim), num_samples = batch["action"].shape, args.num_action_samples
    # The noise of the a_j (a_j = mean + std * noise: V samples at the n value states, then the policy's
    # reparameterised samples), drawn in the eager code's order by the explicit generator, outside the losses.
    value_states = 3 if args.prior == "abm" else 1
    noise = [torch.randn((num_samples, num_tasks, n * batch_size, act_dim), generator=generator,
                         device=batch["action"].device) for n in (value_states, 1)]
    loss, metrics = (losses or update_losses)(agent, batch, noise, args, low, high)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for net in agent.networks():
        nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
    optimizer.step()
    project_kl_multiplier(agent.kl_multiplier)
    return metrics


def update_losses(agent: Agent, batch: dict, noise: list, args: Args, low: torch.Tensor,
                  high: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The summed losses of one step of Algorithm 1 and their metrics; pure (no randomness but `noise`), so
    torch.compile can trace it whole."""
    observation, action = batch["observation"], batch["action"]
    batch_size = observation.shape[1]

    with torch.no_grad():
        # Every V(s) = mean_j Q_phi'(s, a_j), a_j ~ pi_i, this step needs, in one critic pass:
        # V(s') for Eq. 1; V(s_t) and V(s_N) for the ABM weights of Eq. 4.
        value_states = [batch["next_observation"]]
        if args.prior == "abm":
            value_states += [observation, batch["bootstrap_observation"]]
        states = torch.cat(value_states, dim=1)  # [K, nB, obs]
        target_mean, target_std = agent.target_policy(states)
        actions = target_mean + target_std * noise[0]  # [M, K, nB, act]
        with autocast(args.precision, observation.device):
            values = q_values(agent.target_critic, states, actions, low, high).mean(0).split(batch_size, dim=1)

    # Policy evaluation (Eq. 1).
    loss, metrics = critic_loss(agent.critic(observation, action.clamp(low, high)), batch["reward"],
                                batch["discount"], values[0], args.discount)

    # Prior learning (Eq. 3 or Eq. 4); the prior is what the KL of Eq. 6 pulls towards.
    if agent.prior is not None:
        prior_mean, prior_std = agent.prior(observation)
        if args.prior == "abm":
            weights = advantage_weights(batch["snippet_return"], batch["bootstrap_discount"], values[2], values[1])
            prior_loss, info = advantage_weighted_behaviour_model_loss(prior_mean, prior_std, action, weights)
        else:
            prior_loss, info = behaviour_model_loss(prior_mean, prior_std, action)
        loss = loss + prior_loss
        metrics.update(info)
        reference_mean, reference_std = prior_mean.detach(), prior_std.detach()
    else:
        with torch.no_grad():
            reference_mean, reference_std = agent.target_policy(observation)

    # Policy improvement by the stochastic value gradient (Eq. 6, 11, 12).
    mean, std = agent.policy(observation)
    policy_actions = mean + std * noise[1]  # [M, K, B, act], reparameterised: differentiable
    with autocast(args.precision, observation.device):
        q = q_values(agent.target_critic, observation, policy_actions, low, high)  # [M, K, B], float32
    kl = gaussian_kl(mean, std, reference_mean, reference_std)  # [K, B]
    policy_loss, info = svg_policy_loss(q, kl, agent.kl_multiplier)
    metrics.update(info)
    multiplier_loss, info = kl_multiplier_loss(agent.kl_multiplier, kl, args.epsilon)
    metrics.update(info)
    loss = loss + policy_loss + multiplier_loss
    return loss, metrics


# --- shared block: compile ---
COMPILE_MIN_STEPS = 20_000  # `--compile auto` on a CPU: runs this long (an hour or more) amortise 1-2 min of compiling


def compile_losses(losses: Callable, args, device: torch.device) -> Callable:
    """`--compile`: an update's loss function through torch.compile (CUDA: mode `reduce-overhead`, CUDA graphs),
    or as it is. The noise it needs is drawn outside it, so the random streams are those of the eager code.
    `auto` compiles on CUDA, and on a CPU for runs of COMPILE_MIN_STEPS updates or more: there whole compiled
    updates measured 0-18% faster in fp32 and 18-43% in bf16 (README "Performance") for 35-90 s of compiling;
    shorter runs (tests, smoke checks) stay eager."""
    if args.compile == "off" or (args.compile == "auto" and device.type != "cuda"
                                 and args.total_steps < COMPILE_MIN_STEPS):
        return losses
    compiled, state = torch.compile(losses, mode="reduce-overhead" if device.type == "cuda" else None), {}

    def call(*inputs):
        if state.get("eager"):
            return losses(*inputs)
        try:
            loss, metrics = compiled(*inputs)
        except Exception as error:  # a compiler failure at the first call (seen: Triton on one GPU): run eager
            if state:
                raise
            print(f"{Path(sys.argv[0]).name}: torch.compile failed ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[-1][:160]}); this run continues eager", file=sys.stderr)
            state["eager"] = True
            return losses(*inputs)
        state["compiled"] = True
        if device.type != "cuda":
            return loss, metrics
        # CUDA graphs reuse their output memory at the next replay (BCQ and BEAR replay three per update): the
        # metrics, read when the run logs, are copied out now; the loss is used (backward) before any replay.
        return loss, {key: value.detach().clone() for key, value in metrics.items()}
    return call
# --- end shared block ---


# --- shared block: final return ---
def final_return(returns: list[float]) -> float:
    # Table 6's protocol: a run's final return is the mean over its last 10% of evaluations.
    return float(np.mean(returns[-max(1, math.ceil(0.1 * len(returns))):]))
# --- end shared block ---


def train(args: Args) -> dict:
    """Algorithm 1 on a fixed dataset; returns the summary written to summary.json."""
    if args.epsilon <= 0:
        raise UserError("--epsilon must be positive; for the prior alone (epsilon 0) use abm_mpo.py --epsilon 0")
    if min(args.total_steps, args.batch_size, args.num_action_samples, args.snippet_length) < 1:
        raise UserError("--total-steps, --batch-size, --num-action-samples and --snippet-length must be positive")
    run = Run(args, "abm_svg")  # checks the env and the dataset, opens the run directory (plumbing, below the banner)

    # Seeding in one place; all later randomness comes from these two generators.
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator(device=run.device).manual_seed(args.seed)
    agent = Agent(run.spec["obs_dim"], run.spec["act_dim"], len(run.tasks), args).to(run.device)
    optimizer = make_optimizer(agent, args)
    actors = {"return": gaussian_mean_actor(agent.policy, len(run.tasks), run.device)}
    if agent.prior is not None:
        actors["prior_return"] = gaussian_mean_actor(agent.prior, len(run.tasks), run.device)
    modules = {"agent": agent, "optimizer": optimizer}
    losses = compile_losses(update_losses, args, run.device)  # --compile

    start = run.start(modules, rng, generator)  # 0, or the checkpoint's step with --resume
    for step in range(start + 1, args.total_steps + 1):
        if run.device_data:  # CUDA: the dataset lives on the GPU and batches are drawn there
            batch = sample_batch_on_device(run.device_data, args.batch_size, args.snippet_length, args.discount,
                                           generator)
        else:
            batch = run.to_device(sample_batch(run.data, run.columns, args.batch_size, args.snippet_length,
                                               args.discount, rng))
        metrics = update(agent, optimizer, batch, args, generator, run.low, run.high, losses)
        if step % args.target_update_period == 0:
            agent.update_targets()
        run.record(step, metrics)  # sums on the device; a non-finite loss stops the run at the next log or checkpoint
        if step % args.eval_every == 0 or step == args.total_steps:
            run.evaluate_and_log(step, actors)
        if step % args.checkpoint_every == 0 or step == args.total_steps:
            run.save(step, modules, rng, generator, policy=PolicyMean(agent.policy))
    return write_summary(run.run_dir, run.finish(), run.spec)


# ==================================================================================================
# TRY NOT TO MODIFY: the plumbing below is the same in every script (utilities, environments, dataset
# files, run directory, checkpoints, logging, export); nothing above the banner needs it to be followed.
# tests/test_shared_blocks.py keeps the copies identical: edit abm_mpo.py, run tools/sync_blocks.py.
# ==================================================================================================


# --- shared block: utilities ---
class UserError(Exception):
    """A problem with the user's input (arguments, files): reported in one sentence, exit 1."""


def main(train_fn: Callable, args) -> None:
    """Run `train_fn(args)`, turning a UserError into one line on stderr and exit status 1. Training needs no
    OpenGL: dm_control gets a renderer (headless EGL) only for --capture-video, else none (MUJOCO_GL=disable:
    nothing is probed, so a machine without libEGL or a display trains, and no GLFW warning is printed)."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl" if getattr(args, "capture_video", False) else "disable")
    try:
        train_fn(args)
    except UserError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available")
    return torch.device(name)


def autocast(precision: str, device: torch.device):
    """`--precision bf16`: matrix products inside run in bfloat16 (float32 weights and accumulation); fp32: no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# State-action rows per critic pass and thread (q_values, TwinCritic): 1024 rows of a 256-unit activation are
# 1 MiB, a core's L2 cache; one pass over all M * B rows is up to 2x slower on a CPU.
CHUNK_ROWS = 1024


def to_torch(batch: dict, device: torch.device) -> dict:
    return {key: torch.as_tensor(value, device=device) for key, value in batch.items()}


def default_dataset_path(env_id: str) -> Path:
    return Path("datasets") / (env_id.replace(":", "_").replace("/", "_") + ".npz")
# --- end shared block ---


# --- shared block: env ---
CONTROL_SUITE_ALIASES = {"hopper": "hopper-hop", "cheetah": "cheetah-run", "walker": "walker-walk",
                         "quadruped": "quadruped-run"}


def control_suite():
    """dm_control's suite (MUJOCO_GL: see main())."""
    try:
        from dm_control import suite
    except (AttributeError, ImportError, RuntimeError) as error:  # MUJOCO_GL=egl without libEGL, for one
        raise UserError(f"dm_control could not load its renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
                        f"{type(error).__name__}); training needs none: leave MUJOCO_GL unset and --capture-video "
                        f"out, or install the renderer's library (libEGL for egl)") from None

    return suite


class ControlSuiteEnv(gym.Env):
    """A Control Suite task as a Gymnasium env: flat float32 observation, clipped actions, time limit = `truncated`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, domain: str, task: str, render_mode: Optional[str] = None):
        self._load = lambda seed: control_suite().load(domain, task, task_kwargs={"random": seed})
        self._env, self.render_mode = self._load(None), render_mode
        low, high = self._env.action_spec().minimum, self._env.action_spec().maximum
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        size = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), dtype=np.float32)

    def _flatten(self, observation) -> np.ndarray:
        return np.concatenate([np.ravel(v) for v in observation.values()]).astype(np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env = self._load(seed)
        return self._flatten(self._env.reset().observation), {}

    def step(self, action):
        time_step = self._env.step(np.clip(action, self.action_space.low, self.action_space.high))
        terminated = time_step.last() and time_step.discount == 0.0
        truncated = time_step.last() and not terminated
        return self._flatten(time_step.observation), float(time_step.reward or 0.0), terminated, truncated, {}

    def render(self):
        return self._env.physics.render(height=240, width=320, camera_id=0)


def make_env(env_id: str, render_mode: Optional[str] = None, task: Optional[str] = None) -> gym.Env:
    """`hopper`-style alias, Control Suite `domain-task`, `sawyer` (sawyer_env.learner_env(task): actions in [-1, 1],
    task None = a random task per episode), or a gymnasium id (`module:EnvId`). env.unwrapped takes physical actions."""
    if env_id == "sawyer":
        if task is not None and task not in sawyer_env.ALL_TASKS:
            raise UserError(f"unknown sawyer task {task!r}: use one of {', '.join(sawyer_env.ALL_TASKS)}")
        return sawyer_env.learner_env(task or "random", render_mode)
    domain, _, task = CONTROL_SUITE_ALIASES.get(env_id, env_id).partition("-")
    if task and (domain, task) in control_suite().ALL_TASKS:
        return ControlSuiteEnv(domain, task, render_mode)
    try:
        return gym.make(env_id, render_mode=render_mode)
    except Exception as error:  # gymnasium raises many types for an unknown or broken id
        raise UserError(f"unknown env {env_id!r}: use hopper, cheetah, walker, quadruped, a Control Suite "
                        f"domain-task such as cartpole-swingup, sawyer, or a gymnasium id ({error})") from None
# --- end shared block ---


# --- shared block: dataset ---
ARRAY_DIMENSIONS = {"observation": 2, "action": 2, "reward": 2, "discount": 1, "episode_id": 1, "step": 1,
                    "next_observation": 2, "run_id": 1, "task_id": 1}  # the first six are required


def ensure_dataset(args) -> Path:
    """The dataset to learn from; the default one is generated by collect.py when missing."""
    path = minari_npz(args.dataset) or Path(args.dataset or default_dataset_path(args.env))
    if args.dataset is None and not path.exists():
        print(f"No dataset at {path}: generating it with `python collect.py --env {args.env}` (default budget, about "
              f"{5 if args.env == 'sawyer' else 20} minutes on 2 CPU cores); pass --dataset PATH to use your own data.",
              flush=True)
        command = [sys.executable, str(Path(__file__).resolve().parent / "collect.py"), "--env", args.env,
                   "--output", str(path)]
        if subprocess.run(command).returncode != 0 or not path.exists():
            raise UserError(f"collect.py failed to generate {path}; see its output above")
    return path


def load_dataset(path: Path, episodes_per_run: Optional[int] = None) -> dict:
    """Load and validate a dataset (README "Datasets"): its arrays (memory-mapped for a directory of .npy files),
    `metadata`, and `episode_last`, the index of the last transition of each transition's episode (for snippets)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset {path} does not exist")
    try:
        if path.is_dir():
            arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in path.glob("*.npy")}
            metadata = json.loads((path / "metadata.json").read_text()) if (path / "metadata.json").exists() else {}
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            metadata = json.loads(str(arrays.pop("metadata", "{}")))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"dataset {path} cannot be read, it is corrupt, truncated or pickled ({reason})") from None
    missing = [key for key in list(ARRAY_DIMENSIONS)[:6] if key not in arrays]
    if missing:
        raise UserError(f"dataset {path} lacks the arrays {missing}; see README 'Datasets'")
    if arrays["reward"].ndim == 1:
        arrays["reward"] = arrays["reward"][:, None]
    size = len(arrays["observation"])
    for key, ndim in ARRAY_DIMENSIONS.items():
        if key in arrays and (arrays[key].ndim != ndim or len(arrays[key]) != size):
            raise UserError(f"dataset {path}: array {key!r} has shape {arrays[key].shape}, expected {ndim} "
                            f"dimension(s) and {size} rows like 'observation'")
    if size == 0:
        raise UserError(f"dataset {path} holds no transitions")
    if "next_observation" in arrays and arrays["next_observation"].shape != arrays["observation"].shape:
        raise UserError(f"dataset {path}: 'next_observation' and 'observation' differ in shape")
    for key in ("observation", "action", "reward", "discount", "next_observation"):
        if key in arrays and not np.isfinite(arrays[key]).all():
            raise UserError(f"dataset {path}: array {key!r} contains NaN or infinite values")
    # Episodes must be stored back to back, steps in order, for snippets (Eq. 4) to exist.
    episode_id, step = np.asarray(arrays["episode_id"]), np.asarray(arrays["step"])
    starts = np.flatnonzero(np.r_[True, episode_id[1:] != episode_id[:-1]])
    if len(np.unique(episode_id)) != len(starts) or np.any(np.diff(step)[episode_id[1:] == episode_id[:-1]] != 1):
        raise UserError(f"dataset {path}: episodes must be stored back to back with consecutive steps")
    keep = np.ones(size, dtype=bool)
    if "next_observation" not in arrays:  # derive s' from the next row; an episode's last row has none
        keep[np.r_[starts[1:] - 1, size - 1]] = False
        arrays["next_observation"] = np.asarray(arrays["observation"])[np.minimum(np.arange(size) + 1, size - 1)]
    if episodes_per_run is not None:  # --dataset-episodes: the first K episodes of each collecting run
        run_of_start = np.asarray(arrays["run_id"])[starts] if "run_id" in arrays else np.zeros(len(starts), int)
        rank = np.zeros(len(starts), dtype=np.int64)
        for run in np.unique(run_of_start):
            rank[run_of_start == run] = np.arange(np.sum(run_of_start == run))
        keep &= np.repeat(rank < episodes_per_run, np.diff(np.r_[starts, size]))
    if not keep.all():
        arrays = {key: np.asarray(value)[keep] for key, value in arrays.items()}
        episode_id, size = arrays["episode_id"], int(keep.sum())
        starts = np.flatnonzero(np.r_[True, episode_id[1:] != episode_id[:-1]])
    lengths = np.diff(np.r_[starts, size])
    return {**arrays, "episode_last": np.repeat(starts + lengths - 1, lengths), "metadata": metadata}


def select_tasks(data: dict, task: str, env_id: Optional[str] = None) -> tuple[list[int], list[str]]:
    """Reward columns to learn: every column for `all`, else the one named `task`; sawyer's new tasks (`center`,
    `corner`, Section 5.2) are labelled from the stored s' and appended to data["reward"] as a new column."""
    names = list(data["metadata"].get("tasks") or [f"task{i}" for i in range(data["reward"].shape[1])])
    if len(names) != data["reward"].shape[1]:
        raise UserError(f"dataset metadata names {len(names)} tasks but 'reward' has {data['reward'].shape[1]} columns")
    if task not in names and env_id == "sawyer" and task in sawyer_env.REWARD_FUNCTIONS:
        reward = sawyer_env.REWARD_FUNCTIONS[task](np.asarray(data["next_observation"])).astype(np.float32)
        data["reward"] = np.concatenate([np.asarray(data["reward"]), reward[:, None]], axis=1)
        names.append(task)
        data["metadata"] = {**data["metadata"], "tasks": names}
    if task != "all" and task not in names:
        raise UserError(f"task {task!r} is not in the dataset; its tasks are {names}")
    return (list(range(len(names))), names) if task == "all" else ([names.index(task)], [task])


def best_episode_returns(data: dict, columns: list[int]) -> list[float]:
    """Best undiscounted episode return in the dataset, for each task column."""
    starts = np.flatnonzero(np.r_[True, data["episode_id"][1:] != data["episode_id"][:-1]])
    returns = np.add.reduceat(np.asarray(data["reward"][:, columns], dtype=np.float64), starts, axis=0)
    return returns.max(axis=0).tolist()
# --- end shared block ---


# --- shared block: minari ---
def minari_npz(dataset: Optional[str]) -> Optional[Path]:
    """Where the .npz copy of a Minari --dataset (`minari:<id>`, or a directory without .npy files) goes, else None."""
    if dataset and (dataset.startswith("minari:") or Path(dataset).is_dir() and not any(Path(dataset).glob("*.npy"))):
        name = dataset.removeprefix("minari:") if dataset.startswith("minari:") else str(Path(dataset).resolve())[1:]
        return Path("datasets", "minari", name + ".npz")
    return None


def minari_env(args) -> gym.Env:
    """make_env(args.env), once `minari_io.py import` (a subprocess: only it imports minari) wrote the .npz copy of a
    Minari --dataset (again if the source changed) and checked --env; left out, --env is the env the dataset stores."""
    if (path := minari_npz(args.dataset)) is not None:
        command = [sys.executable, str(Path(__file__).resolve().parent / "minari_io.py"), "import", args.dataset,
                   "--output", str(path), *(["--env", args.env] if args.env else [])]
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:  # minari_io.py's one sentence
            raise UserError(result.stderr.partition("minari_io.py: error: ")[2].strip() or result.stderr.strip())
        metadata = json.loads(str(np.load(path, allow_pickle=False)["metadata"]))
        args.env = args.env or metadata["env"]
        args.__post_init__()  # fill_defaults: the paper's network sizes for the dataset's env
        if metadata.get("env_spec") and args.env == metadata["env"]:  # the stored kwargs and time limit
            gym.registry[args.env] = gym.envs.registration.EnvSpec.from_json(metadata["env_spec"])
    return make_env(args.env)
# --- end shared block ---


# --- shared block: checkpoint ---
def save_checkpoint(path: Path, modules: dict, rng: np.random.Generator, generator: torch.Generator, **extra) -> None:
    """State dicts only (loadable with weights_only=True): modules, optimisers, random states, `extra`; written
    atomically (a temporary file, then rename), so a crash leaves the previous checkpoint intact."""
    rng_state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "sampling": generator.get_state()}
    torch.save({**{name: module.state_dict() for name, module in modules.items()}, "rng": rng_state, **extra},
               path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def load_checkpoint(path: Path, device: torch.device, modules: dict, rng: np.random.Generator,
                    generator: torch.Generator) -> dict:
    """Restore what save_checkpoint saved; returns the whole state for its extra entries."""
    state = torch.load(path, map_location=device, weights_only=True)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    rng.bit_generator.state = state["rng"]["numpy"]
    torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved them; generator states live on the host
    generator.set_state(state["rng"]["sampling"].cpu())
    return state
# --- end shared block ---


# --- shared block: run directory ---
# Hidden layers of the paper's networks for a field of Args left at None: Tables 1-4 for the Control Suite, Table 5
# for Sawyer, where "a -> b" is a torso of `shared_layers` = 1 layer (a) shared by all tasks, then one head per task (b).
PAPER_LAYERS = {
    "policy_layers": {"default": (256, 256), "sawyer": (200, 300)},  # policy and prior: 200 -> 300
    "critic_layers": {"default": (256, 256, 256), "sawyer": (400, 400)},  # Q: 400 -> 400
    "encoder_layers": {"default": (256, 256), "sawyer": (256, 256, 256)},  # BCQ encoder: 256 -> 256-256
    "decoder_layers": {"default": (256, 256), "sawyer": (256, 256)},  # BCQ decoder: 256-256, no branch
    "perturbation_layers": {"default": (256, 256), "sawyer": (256, 100)},  # BCQ perturbation: 256 -> 100
}


def fill_defaults(args) -> None:
    """Args' fields left at None (Args.__post_init__): the paper's network sizes for `args.env`, and
    --normalize-observations, on for sawyer only (finger angle std ~69 units, cube positions ~0.035 m)."""
    args.env = args.env or (None if minari_npz(args.dataset) else "hopper")  # a Minari dataset's env: minari_env
    for name, sizes in PAPER_LAYERS.items():
        if args.env and hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, sizes["sawyer" if args.env == "sawyer" else "default"])
    if args.env and args.normalize_observations is None:
        args.normalize_observations = args.env == "sawyer"


# Smallest std an observation dimension is divided by: sawyer's yellow cube height has std 3e-5 m in 100 episodes,
# a 1 cm lift would read as 370 stds (10 with the floor); CORL's and TD3+BC's `std + 1e-3` bound it the same way.
OBSERVATION_STD_FLOOR = 1e-3
OBSERVATION_KEYS = ("observation", "next_observation", "bootstrap_observation")  # the batch's states


def observation_statistics(observation: np.ndarray, standardise: bool) -> tuple[list, list]:
    """Per-dimension mean and floored std in float64 chunks (a memory-mapped dataset is never copied whole)."""
    size, dim = observation.shape
    if not standardise:
        return [0.0] * dim, [1.0] * dim
    chunks = [slice(i, i + (1 << 16)) for i in range(0, size, 1 << 16)]
    mean = sum(np.sum(observation[c], axis=0, dtype=np.float64) for c in chunks) / size
    std = np.sqrt(sum(np.sum((observation[c] - mean) ** 2, axis=0) for c in chunks) / size)
    return mean.astype(np.float32).tolist(), np.maximum(std, OBSERVATION_STD_FLOOR).astype(np.float32).tolist()


RESUME_MAY_CHANGE = {"total_steps", "eval_every", "eval_episodes", "eval_max_steps", "checkpoint_every",
                     "device", "compile", "track", "wandb_project", "capture_video"}


def load_saved_config(run_dir: Path, args, script: str) -> None:
    """`--resume RUN_DIR`: arguments left at their defaults take the saved values; others may change only budgets,
    devices and logging (RESUME_MAY_CHANGE)."""
    if not (run_dir / "config.json").exists() or not (run_dir / "checkpoint.pt").exists():
        raise UserError(f"cannot resume {run_dir}: it has no config.json and checkpoint.pt")
    saved = json.loads((run_dir / "config.json").read_text())
    if saved.get("script") != script:
        raise UserError(f"cannot resume {run_dir}: it is a run of {saved.get('script')}, not {script}")
    defaults, changed = asdict(type(args)()), []
    for key, value in asdict(args).items():
        old = saved["args"].get(key, value)
        if key in ("resume", "run_dir") or json.loads(json.dumps(value)) == old:
            continue
        if value == defaults[key]:
            setattr(args, key, tuple(old) if isinstance(value, tuple) else old)
        elif key not in RESUME_MAY_CHANGE:
            changed.append(f"--{key.replace('_', '-')} was {old!r}")
    if changed:
        raise UserError(f"cannot resume {run_dir} with a different configuration: {', '.join(changed)}")


def make_run_dir(args, script: str) -> Path:
    run_dir = Path(args.resume or args.run_dir or f"runs/{script}__{args.env.replace(':', '_')}__{args.seed}__{int(time.time())}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").write_text("")
        (run_dir / ".write_test").unlink()
    except OSError as error:
        raise UserError(f"run directory {run_dir} is not writable ({error.strerror})") from None
    return run_dir


def write_config(run_dir: Path, args, script: str, dataset: Path, spec: dict) -> None:
    import mujoco

    digest = hashlib.sha256()
    for file in sorted(dataset.glob("*")) if dataset.is_dir() else [dataset]:
        with open(file, "rb") as handle:
            hashlib.file_digest(handle, lambda: digest)  # adds the file's bytes to `digest`
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "gymnasium": gym.__version__, "mujoco": mujoco.__version__}
    config = {"script": script, "args": asdict(args), "dataset": str(dataset), "dataset_sha256": digest.hexdigest(),
              "versions": versions, "spec": spec}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


class Run:
    """`Run(args, script)` checks the arguments, the env and the dataset and opens the run directory; its methods
    keep the loop's books: resuming, batches on the device, metrics.csv / TensorBoard / W&B rows, checkpoints."""

    def __init__(self, args, script: str):
        if args.resume:
            load_saved_config(Path(args.resume), args, script)
        if args.eval_max_steps is not None and args.eval_max_steps < 1:
            raise UserError("--eval-max-steps must be positive")
        self.args, self.script = args, script
        self.device, env = pick_device(args.device), minari_env(args)  # checks --env before anything is written
        self.run_dir = make_run_dir(args, script)
        dataset = ensure_dataset(args)
        self.data = data = load_dataset(dataset, args.dataset_episodes)
        (obs_dim,), (act_dim,) = env.observation_space.shape, env.action_space.shape
        if data["observation"].shape[1] != obs_dim or data["action"].shape[1] != act_dim:
            raise UserError(f"dataset {dataset} has observation/action sizes {data['observation'].shape[1]}/"
                            f"{data['action'].shape[1]} but the env has {obs_dim}/{act_dim}; is it for another env?")
        self.columns, self.tasks = select_tasks(data, args.task, args.env)
        (low, high), env_space = (env.action_space.low, env.action_space.high), env.unwrapped.action_space
        env_low, env_high = env_space.low, env_space.high  # the env's own units: physical for sawyer
        stored = [data["metadata"].get(key) for key in ("action_low", "action_high")]  # the dataset's physical bounds
        if None not in stored and not np.allclose(stored, [env_low, env_high]):
            raise UserError(f"dataset {dataset} has action bounds {stored} but {args.env} takes actions in "
                            f"{[env_low.tolist(), env_high.tolist()]}")
        if args.env == "sawyer":  # the dataset's actions are physical, the learner's in [-1, 1]
            data["action"] = sawyer_env.normalise_actions(data["action"])
        mean, std = observation_statistics(data["observation"], args.normalize_observations)
        self.spec = {"obs_dim": obs_dim, "act_dim": act_dim, "tasks": self.tasks, "action_low": low.tolist(),
                     "action_high": high.tolist(), "env_action_low": env_low.tolist(),
                     "env_action_high": env_high.tolist(), "observation_mean": mean, "observation_std": std,
                     "best_episode_return_in_dataset": dict(zip(self.tasks, best_episode_returns(data, self.columns))),
                     "reference_scores": data["metadata"].get("reference_scores")}
        if not args.resume:
            write_config(self.run_dir, args, script, dataset, self.spec)
        self.low, self.high = torch.as_tensor(low, device=self.device), torch.as_tensor(high, device=self.device)
        self.device_data = data_on_device(data, self.columns, mean, std, self.device)  # CUDA: the data on the GPU

    def start(self, modules: dict, rng: np.random.Generator, generator: torch.Generator) -> int:
        """The last update done: 0, or with --resume the checkpoint's (modules and random states restored)."""
        from torch.utils.tensorboard import SummaryWriter

        self.step, self.wandb, self.metrics = 0, None, self.run_dir / "metrics.csv"
        if self.args.resume:
            self.step = load_checkpoint(self.run_dir / "checkpoint.pt", self.device, modules, rng, generator)["step"]
            print(f"Resuming {self.run_dir} from update {self.step}.", flush=True)
        rows = list(csv.reader(self.metrics.read_text().splitlines())) if self.metrics.exists() else []
        rows = rows[:1] + [row for row in rows[1:] if row and int(row[0]) <= self.step]  # rows up to the checkpoint
        self.header = rows[0] if rows else None
        with open(self.metrics, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
        self.writer = SummaryWriter(str(self.run_dir))
        if self.args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs Weights & Biases: pip install wandb") from None
            config = json.loads((self.run_dir / "config.json").read_text())
            self.wandb = wandb.init(project=self.args.wandb_project, config=config, dir=str(self.run_dir),
                                    name=self.run_dir.name, resume="allow")
        self.eval_envs = make_eval_envs(self.args, self.run_dir, self.tasks, self.spec)
        self.mean, self.std = (np.asarray(self.spec[key], np.float32) for key in ("observation_mean", "observation_std"))
        self.sums, self.count, self.clock = {}, 0, time.time()
        self.bad_step, self.bad = torch.tensor(0, device=self.device), torch.tensor(False, device=self.device)
        self.progress = tqdm(initial=self.step, total=self.args.total_steps, desc=self.script, disable=None)
        return self.step

    def to_device(self, batch: dict) -> dict:
        """Standardise the states with --normalize-observations (per batch: a memory-mapped dataset stays on disk)."""
        if self.args.normalize_observations:
            batch = {key: (value - self.mean) / self.std if key in OBSERVATION_KEYS else value
                     for key, value in batch.items()}
        return to_torch(batch, self.device)

    def record(self, step: int, metrics: dict) -> None:
        """Sum the metrics on the device and note there the first update with a non-finite one: no host sync."""
        self.sums = {key: self.sums.get(key, 0.0) + value for key, value in metrics.items()}
        bad = ~torch.isfinite(torch.stack(list(metrics.values()))) if metrics else self.bad
        first = (self.bad_step == 0) & bad.any()
        self.bad_step, self.bad = torch.where(first, step, self.bad_step), torch.where(first, bad, self.bad)
        self.step, self.count, self.keys = step, self.count + 1, list(metrics)
        self.progress.update()

    def check_finite(self) -> None:
        """Before a row or checkpoint is written (one host sync): a non-finite loss stops the run in one sentence."""
        if int(self.bad_step):
            names = [key for key, bad in zip(self.keys, self.bad.tolist()) if bad]
            raise UserError(f"non-finite loss {[k for k in names if k.startswith('losses/')] or names} at update "
                            f"{int(self.bad_step)} (checked at update {self.step}); stopped, "
                            f"{self.run_dir / 'checkpoint.pt'} keeps the last good state")

    def evaluate_and_log(self, step: int, actors: dict) -> None:
        """One row of metrics.csv, TensorBoard and W&B: the losses averaged since the last row, the actors' returns."""
        self.check_finite()
        row = {key: float(value) / self.count for key, value in self.sums.items()}
        row["charts/updates_per_second"] = self.count / (time.time() - self.clock)
        row.update(evaluate_actors(actors, self.eval_envs, self.tasks, self.args.eval_episodes, self.args.seed + 100,
                                   self.args.eval_max_steps))
        with open(self.metrics, "a", newline="") as handle:
            if self.header is None:
                self.header = ["step", *row]
                csv.writer(handle).writerow(self.header)
            csv.writer(handle).writerow([{"step": step, **row}.get(column, "") for column in self.header])
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        self.progress.set_postfix({k[5:]: f"{v:.1f}" for k, v in row.items() if k.startswith("eval/") and k.count("/") == 1})
        self.sums, self.count, self.clock = {}, 0, time.time()

    def save(self, step: int, modules: dict, rng: np.random.Generator, generator: torch.Generator,
             policy: nn.Module) -> None:
        """checkpoint.pt (atomically) and policy.pt2, the acting module `policy` exported."""
        self.check_finite()
        save_checkpoint(self.run_dir / "checkpoint.pt", modules, rng, generator, step=step, spec=self.spec)
        export_policy(policy, self.spec, self.args.env, self.run_dir / "policy.pt2")

    def finish(self) -> list[dict]:
        """Close the progress bar and the writers; returns the evaluations, the rows of metrics.csv."""
        self.progress.close()
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        with open(self.metrics) as handle:
            return list(csv.DictReader(handle))


def write_summary(run_dir: Path, evaluations: list[dict], spec: dict) -> dict:
    """summary.json: the final return (final_return, Table 6) of every `eval/` column, and `per_task` in Table 7's
    layout: per task the final return, the final prior return, the best episode return in the data (`spec`'s)."""
    best_in_data = spec["best_episode_return_in_dataset"]
    summary = {"evaluations": len(evaluations), "best_episode_return_in_dataset": best_in_data}
    for key in [key for key in (evaluations or [{}])[0] if key.startswith("eval/")]:
        returns = [float(row[key]) for row in evaluations if row.get(key)]
        if returns:
            summary["final/" + key.removeprefix("eval/")] = final_return(returns)
    low, high = spec.get("reference_scores") or (None, None)
    for key in [key for key in summary if key.startswith("final/")] if high is not None else []:  # D4RL's score
        summary["final/normalised_" + key.removeprefix("final/")] = 100 * (summary[key] - low) / (high - low)
    summary["per_task"] = {}
    for task, best in best_in_data.items():
        suffix = f"/{task}" if len(best_in_data) > 1 else ""
        summary["per_task"][task] = {name: summary[f"final/{name}{suffix}"] for name in ("return", "prior_return",
                                     "normalised_return", "normalised_prior_return") if f"final/{name}{suffix}" in summary}
        summary["per_task"][task]["best_episode_return_in_dataset"] = best
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary
# --- end shared block ---


# --- shared block: evaluation ---
def evaluate(act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int,
             max_steps: Optional[int] = None) -> list[float]:
    """Undiscounted returns; episode i starts from reset(seed=seed + i), the same states at every evaluation."""
    returns = []
    for episode in range(episodes):
        (observation, _), total, done, steps = env.reset(seed=seed + episode), 0.0, False, 0
        while not done:
            action = np.clip(act(observation), env.action_space.low, env.action_space.high)
            observation, reward, terminated, truncated, _ = env.step(action)
            total, steps = total + float(reward), steps + 1
            done = terminated or truncated or steps == max_steps
        returns.append(total)
    return returns


def evaluate_actors(actors: dict, envs: list, tasks: list, episodes: int, seed: int,
                    max_steps: Optional[int] = None) -> dict:
    """`eval/<name>`: mean return over tasks of each actor, `eval/<name>/<task>`: head k acting in envs[k]."""
    results = {}
    for name, act in actors.items():
        per_task = [np.mean(evaluate(lambda o: act(o, k), envs[k], episodes, seed, max_steps)) for k in range(len(tasks))]
        results[f"eval/{name}"] = float(np.mean(per_task))
        if len(tasks) > 1:
            results.update({f"eval/{name}/{task}": float(value) for task, value in zip(tasks, per_task)})
    return results


def make_eval_envs(args, run_dir: Path, tasks: list, spec: Optional[dict] = None) -> list:
    """One evaluation env per task (sawyer: SawyerEnv(task), else one env for every reward column), with videos
    (--capture-video) and standardised observations (--normalize-observations)."""
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (RecordVideo writes mp4 files with it)
        except ImportError:
            raise UserError("--capture-video needs moviepy: pip install moviepy") from None
    envs = []
    for task in tasks if args.env == "sawyer" else tasks[:1]:
        env = make_env(args.env, "rgb_array" if args.capture_video else None, task if args.env == "sawyer" else None)
        if args.capture_video:
            folder = run_dir / "videos" / task if args.env == "sawyer" and len(tasks) > 1 else run_dir / "videos"
            env = gym.wrappers.RecordVideo(env, str(folder), episode_trigger=lambda i: i % args.eval_episodes == 0,
                                           disable_logger=True)
        if args.normalize_observations and spec is not None:  # the learner's input: (observation - mean) / std
            mean, std = (np.asarray(spec[key], np.float32) for key in ("observation_mean", "observation_std"))
            space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
            env = gym.wrappers.TransformObservation(env, lambda o, m=mean, s=std: (np.asarray(o, np.float32) - m) / s, space)
        envs.append(env)
    return envs if args.env == "sawyer" else envs * len(tasks)
# --- end shared block ---


# --- shared block: gaussian actor ---
def gaussian_mean_actor(net: nn.Module, num_tasks: int, device: torch.device) -> Callable:
    """act(observation, task) = the mean of a Gaussian policy's head for that task, for evaluation."""

    @torch.no_grad()
    def act(observation: np.ndarray, task: int) -> np.ndarray:
        obs = torch.as_tensor(observation, dtype=torch.float32, device=device).expand(num_tasks, 1, -1)
        return net(obs)[0][task, 0].float().cpu().numpy()

    return act


class PolicyMean(nn.Module):
    """The acting module of a Gaussian policy for export: its mean, [K, N, obs] -> [K, N, act]."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.policy(observation)[0]
# --- end shared block ---


# --- shared block: export ---
class ExportedPolicy(nn.Module):
    """observation [B, obs_dim] raw, task_index [B] -> action [B, act_dim] in the env's units, clipped: standardise,
    `actor` [K, B, obs] -> [K, B, act] (one slice per head), map a learner's [low, high] onto [env_low, env_high]."""

    def __init__(self, actor: nn.Module, num_tasks: int, **buffers):
        super().__init__()
        self.actor, self.num_tasks = actor, num_tasks
        self.rescale = buffers["low"] != buffers["env_low"] or buffers["high"] != buffers["env_high"]
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))

    def forward(self, observation: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        observation = (observation - self.observation_mean) / self.observation_std
        actions = self.actor(observation.expand(self.num_tasks, -1, -1))  # [K, B, act]
        action = torch.clamp(actions[task_index, torch.arange(observation.shape[0])], self.low, self.high)  # [B, act]
        if self.rescale:  # env_low + (a + 1) / 2 * (env_high - env_low) for a learner in [-1, 1]
            action = self.env_low + (action - self.low) / (self.high - self.low) * (self.env_high - self.env_low)
        return torch.clamp(action, self.env_low, self.env_high)


def export_policy(actor: nn.Module, spec: dict, env_id: str, path: Path) -> None:
    """policy.pt2, atomically: `torch.export.load(path).module()(observation, task_index)` runs with torch alone;
    the spec it needs (env, sizes, tasks, action bounds, observation statistics) is the extra file "policy.json"."""
    low, high = list(spec["action_low"]), list(spec["action_high"])
    env_low, env_high = list(spec.get("env_action_low", low)), list(spec.get("env_action_high", high))
    mean = list(spec.get("observation_mean", [0.0] * spec["obs_dim"]))
    std = list(spec.get("observation_std", [1.0] * spec["obs_dim"]))
    module = ExportedPolicy(copy.deepcopy(actor).cpu().eval(), len(spec["tasks"]), low=low, high=high, env_low=env_low,
                            env_high=env_high, observation_mean=mean, observation_std=std)
    batch = torch.export.Dim("batch", max=1 << 16)
    example = (torch.zeros(2, spec["obs_dim"]), torch.zeros(2, dtype=torch.int64))
    program = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
    metadata = {"env": env_id, "obs_dim": spec["obs_dim"], "act_dim": spec["act_dim"], "tasks": list(spec["tasks"]),
                "action_low": env_low, "action_high": env_high, "learner_action_low": low, "learner_action_high": high,
                "observation_mean": mean, "observation_std": std,
                "inputs": "observation [B, obs_dim] float32 raw (standardised inside with observation_mean/std), "
                          "task_index [B] int64 (into tasks)",
                "output": "action [B, act_dim] float32 in [action_low, action_high]"}
    temporary = path.with_suffix(".tmp" + path.suffix)  # torch.export.save wants a name ending in .pt2
    torch.export.save(program, temporary, extra_files={"policy.json": json.dumps(metadata)})
    os.replace(temporary, path)
# --- end shared block ---


if __name__ == "__main__":
    main(train, tyro.cli(Args))
