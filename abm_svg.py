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
  - N = 10 by default (`--snippet-length`): the paper states no N for its ABM columns, only |tau| = 2 for eps = 0,
    where it calls short snippets vital. With abm_mpo.py N = 100 filtered more sharply; its prior beat N = 10's on
    cheetah, and on quadruped by less (README "Longer snippets", "A second task"), so the default stays.
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
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
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
    # --- shared block: args ---
    env: Optional[str] = None
    """`hopper`, `cheetah`, `walker`, `quadruped` (Control Suite hopper-hop, cheetah-run,
    walker-walk, quadruped-run), any Control Suite `domain-task`, `sawyer` (the simulated Sawyer
    of sawyer_env.py, multi-task, Section 5.2), or a gymnasium id; default: the env the --dataset
    records, else `hopper`"""
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
    final_eval_episodes: int = 0
    """after the last update, the final policy (and prior) act this many more episodes, episode i from
    reset(seed=1000 + i) in every run whatever its --seed: summary.json's `final_eval`, a final return whose start
    states are shared by every run (0: none); a finished run gets it with --resume RUN --final-eval-episodes K"""
    checkpoint_every: int = 10_000
    """gradient updates between checkpoints"""
    run_dir: Optional[str] = None
    """run directory; default `runs/<script>__<env>__<seed>__<time>`; one that is not empty is refused"""
    overwrite: bool = False
    """start the new run in --run-dir even though it holds a run: that run's files are deleted first"""
    resume: Optional[str] = None
    """continue the run in this directory from its checkpoint.pt"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`"""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the update's losses; `auto`: on for CUDA, off on a CPU (compiled fp32 updates measured
    0.98-1.18x eager there, README "Performance", for 35-150 s of compiling)"""
    cuda_graph: bool = True
    """on CUDA, record each whole update (batch sampling, losses, backward, clipping, Adam) as one CUDA graph after
    3 eager updates and replay it: one launch per update instead of hundreds; `--no-cuda-graph`: launch each
    kernel (then `--compile` uses torch.compile's own CUDA graphs for the losses)"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`; it syncs the TensorBoard scalars)"""
    wandb_project: str = "behaviour-priors"
    """Weights & Biases project name"""
    capture_video: bool = False
    """save a video of the first evaluation episode (needs `pip install moviepy`)"""
    # --- end shared block ---

    # Algorithm specific arguments (`--env sawyer`: Table 5, set in __post_init__; defaults: Table 2)
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
    policy_layers: tuple[int, ...] = (256, 256)
    """hidden layers of the policy and the prior (Table 1); sawyer: 200 -> 300 (Table 5)"""
    critic_layers: tuple[int, ...] = (256, 256, 256)
    """hidden layers of the Q function (Table 1); sawyer: 400 -> 400 (Table 5)"""
    shared_layers: int = 1
    """first hidden layers shared by all tasks; the rest are one head per task (Table 5)"""

    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """`bf16`: the batched Q passes over M sampled actions run their matrix products in bfloat16 (float32 weights
    and losses); compiled bf16 updates measured 1.5x compiled fp32 on an AVX-512 BF16 CPU (README "Performance");
    `tf32` (CUDA only): every float32 matrix product on TF32 tensor cores (inputs rounded to a 10-bit mantissa)"""

    def __post_init__(self):
        if self.env == "sawyer":  # Table 5's multi-task networks, where the Table 1 sizes were left
            self.policy_layers = (200, 300) if self.policy_layers == (256, 256) else self.policy_layers
            self.critic_layers = (400, 400) if self.critic_layers == (256, 256, 256) else self.critic_layers
        if self.normalize_observations is None:
            self.normalize_observations = self.env == "sawyer"


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
        self.register_buffer("input_mean", torch.zeros(in_features))  # the observation's statistics, set by
        self.register_buffer("input_std", torch.ones(in_features))  # standardise_observations; 0 and 1 elsewhere
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
        hidden = self.head[:-1](self.torso((x - self.input_mean) / self.input_std))
        with torch.autocast(x.device.type, enabled=False):  # output layer in fp32, also under bf16 autocast
            return self.head[-1](hidden.float())


class Critic(nn.Module):
    """Q(s, a) for each task head: observation [K, N, obs], action [K, N, act] -> [K, N]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple, num_heads: int, shared: int):
        super().__init__()
        self.net = MultiHeadMLP(obs_dim + act_dim, hidden, 1, num_heads, shared)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], dim=-1)).squeeze(-1)


def standardise_observations(model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Every network in `model` standardises the observation at the front of its input by `mean` and `std`: the one
    place where it happens, so the policy that is evaluated, checkpointed and exported takes raw observations."""
    with torch.no_grad():
        for net in model.modules():
            if isinstance(net, MultiHeadMLP):
                net.input_mean[: len(mean)], net.input_std[: len(std)] = mean, std
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

# --- end shared block ---


# --- shared block: snippets ---
def sample_batch(data: dict, batch_size: int, snippet_length: int, discount: float, generator: torch.Generator,
                 index: Optional[torch.Tensor] = None) -> dict:
    """Draw `batch_size` snippets (s_t, a_t, ..., s_{t+N}) for each task, independently per task, from `data`
    (tensors on the run's device, one reward column per task), indices from `generator` (`index` [K, B]: those).

    Returns tensors [K, B, ...]: the first transition for TD learning (Eq. 1), and for Eq. 4 the
    discounted reward sum of the snippet and the state and discount to bootstrap it with. A
    snippet that reaches the end of its episode stops there and bootstraps from its last s'."""
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


# --- shared block: policy evaluation ---
# State-action rows per critic pass and thread: 1024 rows of a 256-unit activation are 1 MiB, a core's L2 cache;
# one pass over all M * B rows is up to 2x slower on a CPU.
CHUNK_ROWS = 1024


def q_values(critic: nn.Module, observation: torch.Tensor, actions: torch.Tensor,
             low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Q(s, a_j) for M actions per state: [K, B, obs], [M, K, B, act] -> [M, K, B] in float32.
    The env clips actions, so a sampled action is scored at clip(a, low, high). On a CPU the rows go
    through the critic in chunks of CHUNK_ROWS per thread; on a GPU, and under torch.compile, in one
    pass (chunks would be kernels too small for a GPU; unrolled chunks multiply the compile time)."""
    num_samples, num_tasks, batch, act_dim = actions.shape
    repeated = observation.unsqueeze(1).expand(-1, num_samples, -1, -1).reshape(num_tasks, num_samples * batch, -1)
    flat_actions = actions.clamp(low, high).transpose(0, 1).reshape(num_tasks, num_samples * batch, act_dim)
    one_pass = torch.compiler.is_compiling() or observation.device.type != "cpu"
    rows = num_samples * batch if one_pass else CHUNK_ROWS * torch.get_num_threads()
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
    """Adam, fused: one kernel per step, its step count on the device (so a CUDA graph can record it)."""
    networks = [p for net in agent.networks() for p in net.parameters()]
    return torch.optim.Adam([{"params": networks, "lr": args.learning_rate},
                             {"params": [agent.kl_multiplier], "lr": args.dual_learning_rate}], fused=True)


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
        with torch.autocast(observation.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
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
    with torch.autocast(observation.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        q = q_values(agent.target_critic, observation, policy_actions, low, high)  # [M, K, B], float32
    kl = gaussian_kl(mean, std, reference_mean, reference_std)  # [K, B]
    policy_loss, info = svg_policy_loss(q, kl, agent.kl_multiplier)
    metrics.update(info)
    multiplier_loss, info = kl_multiplier_loss(agent.kl_multiplier, kl, args.epsilon)
    metrics.update(info)
    loss = loss + policy_loss + multiplier_loss
    return loss, metrics


# --- shared block: observation statistics ---
# Smallest std an observation dimension is divided by: sawyer's yellow cube height has std 3e-5 m in 100 episodes,
# a 1 cm lift would read as 370 stds (10 with the floor); CORL's and TD3+BC's `std + 1e-3` bound it the same way.
OBSERVATION_STD_FLOOR = 1e-3


def observation_statistics(observation: torch.Tensor, standardise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and floored std (float64 sums over chunks: a memory-mapped dataset is never copied
    whole); mean 0 and std 1 without --normalize-observations."""
    size, dim = observation.shape
    if not standardise:
        return torch.zeros(dim, device=observation.device), torch.ones(dim, device=observation.device)
    mean = sum(chunk.double().sum(0) for chunk in observation.split(1 << 16)) / size
    std = (sum(((chunk.double() - mean) ** 2).sum(0) for chunk in observation.split(1 << 16)) / size).sqrt()
    return mean.float(), std.clamp(min=OBSERVATION_STD_FLOOR).float()
# --- end shared block ---


# --- shared block: acting policy ---
class ActingPolicy(nn.Module):
    """The policy as it acts, evaluated and exported alike: raw observation [B, obs] and task_index [B] -> action
    [B, act] in the env's units, clipped. `actor` maps [K, B, obs] -> [K, B, act] (a Gaussian policy: its mean);
    a learner acting in [-1, 1] (sawyer) is mapped onto the env's [env_low, env_high]."""

    def __init__(self, actor: nn.Module, spec: dict):
        super().__init__()
        self.actor, self.num_tasks = actor, len(spec["tasks"])
        self.rescale = spec["action_low"] != spec["env_action_low"] or spec["action_high"] != spec["env_action_high"]
        for name in ("action_low", "action_high", "env_action_low", "env_action_high"):
            self.register_buffer(name, torch.tensor(spec[name], dtype=torch.float32))

    def forward(self, observation: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        actions = self.actor(observation.expand(self.num_tasks, -1, -1))
        actions = actions[0] if isinstance(actions, tuple) else actions  # [K, B, act]
        action = actions[task_index, torch.arange(observation.shape[0])].clamp(self.action_low, self.action_high)
        if self.rescale:  # [B, act]
            fraction = (action - self.action_low) / (self.action_high - self.action_low)
            action = self.env_action_low + fraction * (self.env_action_high - self.env_action_low)
        return action
# --- end shared block ---


def train(args: Args) -> dict:
    """Algorithm 1 on a fixed dataset; returns the summary written to summary.json."""
    check_args(args, "abm_svg")  # every flag in range; --resume: the run's saved arguments; a used --run-dir refused
    if args.epsilon <= 0:
        raise UserError("--epsilon must be positive; for the prior alone (epsilon 0) use abm_mpo.py --epsilon 0")
    device = pick_device(args.device, args.precision)
    env = make_env(dataset_env(args))  # checks --env; a Minari --dataset is converted first and names the env
    data, tasks, spec = load_data(args, env, device)  # checked; tensors on the device, one reward column per task
    mean, std = observation_statistics(data["observation"], args.normalize_observations)
    run_dir = make_run_dir(args, "abm_svg", spec)  # config.json

    torch.manual_seed(args.seed)  # seeding in one place: the initial weights here, every later sample from `generator`
    generator = torch.Generator(device).manual_seed(args.seed)
    agent = Agent(spec["obs_dim"], spec["act_dim"], len(tasks), args).to(device)
    standardise_observations(agent, mean, std)
    optimizer = make_optimizer(agent, args)
    low, high = torch.tensor(spec["action_low"], device=device), torch.tensor(spec["action_high"], device=device)
    policies = {"return": ActingPolicy(agent.policy, spec)}  # evaluated here, exported as policy.pt2
    if agent.prior is not None:
        policies["prior_return"] = ActingPolicy(agent.prior, spec)
    losses = compile_losses(update_losses, args, device)  # --compile
    logger, envs = Logger(args, run_dir), make_eval_envs(args, run_dir, tasks)
    modules = {"agent": agent, "optimizer": optimizer, "logger": logger}
    start = load_checkpoint(run_dir, modules, generator, args.total_steps) if args.resume else 0

    def train_step() -> dict:  # one update of Algorithm 1: a batch of snippets, the losses, the gradient steps
        batch = sample_batch(data, args.batch_size, args.snippet_length, args.discount, generator)
        return update(agent, optimizer, batch, args, generator, low, high, losses)
    train_step = record_updates(train_step, agent, generator, args, device)  # on CUDA: one CUDA graph, replayed

    for step in range(start + 1, args.total_steps + 1):
        metrics = train_step()
        if step % args.target_update_period == 0:
            agent.update_targets()
        logger.record(step, metrics)  # sums on the device; a non-finite loss stops the run before the next write
        if step % args.eval_every == 0 or step == args.total_steps:
            logger.check_finite()  # a non-finite loss stops the run before its policy acts or anything is written
            logger.write(step, evaluate_policies(policies, envs, tasks, args))
        if step % args.checkpoint_every == 0 or step == args.total_steps:
            logger.check_finite()
            export_policy(policies["return"], spec, run_dir)  # first: a checkpoint is never ahead of policy.pt2
            save_checkpoint(run_dir, modules, generator, step, spec)
    return write_summary(run_dir, logger.close(), spec, final_evaluation(policies, envs, tasks, args))


# ==================================================================================================
# TRY NOT TO MODIFY: the plumbing every learning script shares, called by name from train() above. Edit it in
# abm_mpo.py, then run tools/sync_blocks.py (tests/test_shared_blocks.py checks that the copies are identical).
# ==================================================================================================


# --- shared block: utilities ---
class UserError(Exception):
    """A problem with the user's input (arguments, files): reported in one sentence, exit status 1."""


class WriteError(UserError):
    """A file of the run could not be written (a full disk, a quota): one sentence, and how to continue the run."""


RUN = {}  # this process's run, for main()'s last line: run_dir, new, step, checkpoint; the flags given; compiling


def release_run_dir() -> None:
    """Lets go of the run directory lock_run_dir holds (RUN["lock"]: its path and descriptor), if any."""
    if RUN.get("lock"):
        os.close(RUN.pop("lock")[1])


def main(train_fn: Callable, args) -> None:
    """`train_fn(args)`: a UserError is one sentence (exit 1); Ctrl-C or SIGTERM one line saying where the run stopped
    and how to continue it (exit 130). A new run that ends with neither a checkpoint nor an evaluation leaves no
    directory behind."""
    if sys.platform.startswith("linux"):  # OpenGL for videos only; with none probed, no libEGL or display is needed
        os.environ.setdefault("MUJOCO_GL", "egl" if getattr(args, "capture_video", False) else "disable")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a background shell ignores Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop: the same as Ctrl-C
    RUN.clear()  # the flags typed: --resume honours or refuses each, even one equal to its default
    RUN["given"] = {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in sys.argv if a[:2] == "--"}
    name, status, line, stopped = Path(sys.argv[0]).name, 0, None, False
    try:
        train_fn(args)
    except UserError as error:
        status, line, stopped = 1, f"{name}: error: {error}", isinstance(error, WriteError)
    except KeyboardInterrupt:
        status, line = 130, f"{name}: stopped" + (f" at update {RUN.get('step', 0):,}" if RUN.get("run_dir") else "")
        stopped = True
    except RuntimeError as error:  # torch.OutOfMemoryError (CUDA), or a CPU allocation the system refused
        if not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        status, line, stopped = 1, f"{name}: error: {out_of_memory(error, args)}", True
    finally:
        run_dir, new, saved = RUN.get("run_dir"), RUN.get("new"), RUN.get("checkpoint")
        if stopped and saved:
            line += (f"; {run_dir / 'checkpoint.pt'} holds update {saved:,}: continue with "
                     + shlex.join(["python", name, "--resume", str(run_dir), *RUN.get("resumed_with", [])]))
        release_run_dir()
        RUN.clear()
    if status and run_dir is not None and new and not saved and run_dir.exists():  # nothing in it can be resumed
        if (run_dir / "metrics.csv").exists():
            line += f" (no checkpoint yet, so it cannot be resumed; {run_dir / 'metrics.csv'} keeps its evaluations)"
        else:
            shutil.rmtree(run_dir)
            line += f" (before the run's first checkpoint and evaluation: {run_dir} removed)"
    if line:
        print(line, file=sys.stderr)
        sys.exit(status)


def out_of_memory(error: RuntimeError, args) -> str:
    """The sentence for an allocation torch could not make. The kernel's OOM killer, which ends a process whose
    allocations each fitted but not together, leaves nothing to catch: the shell's "Killed"."""
    match = re.search(r"tried to allocate (\d+) bytes|Tried to allocate ([\d.]+ \w+)", str(error))  # CPU | CUDA
    size = f"{int(match[1]) / 2**30:,.1f} GiB" if match and match[1] else match[2] if match else "more than was free"
    where = "GPU memory" if isinstance(error, torch.OutOfMemoryError) else "memory"
    line = f"out of {where} after {RUN.get('step', 0):,} updates (an allocation of {size} was refused)"
    if hasattr(args, "batch_size"):
        line += (f": --batch-size {args.batch_size} and --num-action-samples {args.num_action_samples} set the size "
                 "of an update (a new run with smaller ones), or run fewer runs beside this one")
    return line


def stop_with_parent() -> None:
    """Run in a child process before its program: Linux sends it SIGTERM when this process ends, however it ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def pick_device(name: str, precision: str = "fp32") -> torch.device:
    """--device; --precision tf32: TF32 matrix products (CUDA only, PyTorch's default is full fp32)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if precision == "tf32":
        if device.type != "cuda":
            raise UserError("--precision tf32 is a CUDA setting (TF32 tensor cores); on a CPU use fp32 or bf16")
        torch.set_float32_matmul_precision("high")
    return device


def compile_losses(losses: Callable, args, device: torch.device) -> Callable:
    """--compile (`auto`: CUDA only): `losses` through torch.compile (with --no-cuda-graph on CUDA with its own CUDA
    graphs, whose next replay overwrites their outputs, so the metrics are copied out); if the first call fails: one
    line, then eager."""
    if args.compile == "off" or (args.compile == "auto" and device.type != "cuda"):
        return losses
    own_graphs = device.type == "cuda" and not getattr(args, "cuda_graph", False)
    state = {"losses": torch.compile(losses, mode="reduce-overhead" if own_graphs else None), "first": True}

    def call(*inputs):  # -> (loss, ..., metrics)
        if state["first"] and not RUN.get("compiling"):  # the first update waits: say so, once per run
            RUN["compiling"] = True
            print(f"{Path(sys.argv[0]).name}: compiling the losses (torch.compile) before the first update; this takes "
                  f"a minute or two", file=sys.stderr, flush=True)
        try:
            *outputs, metrics = state["losses"](*inputs)
        except Exception as error:  # e.g. Triton's "PassManager::run failed"
            if not state["first"]:
                raise
            print(f"{Path(sys.argv[0]).name}: torch.compile failed ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[-1][:160]}); this run continues eager", file=sys.stderr)
            state["losses"] = losses
            *outputs, metrics = losses(*inputs)
        state["first"] = False
        return *outputs, {key: value.detach().clone() for key, value in metrics.items()} if own_graphs else metrics
    return call


def record_updates(step: Callable, agent: torch.nn.Module, generator: torch.Generator, args, device: torch.device,
                   warmup: int = 3, cuda=torch.cuda) -> Callable:
    """--cuda-graph on CUDA: `step(*key)`, one whole update without a host sync, recorded as one CUDA graph per `key`
    after `warmup` eager calls (real updates, on a side stream) and replayed from then on. `generator` is registered
    with each graph, so every replay draws new batches and noise; the metrics are the graph's outputs, overwritten by
    the next replay (Logger.record reads them first); the Python in `step` runs once, at the recording, so what
    changes between updates must be a tensor or the `key`. A failed recording: one line, then eager. `cuda`: a
    stand-in in the tests."""
    if not args.cuda_graph or device.type != "cuda":
        return step
    graphs, calls, side = {}, {}, cuda.Stream()

    def call(*key):
        if key in graphs:
            graph, outputs = graphs[key]
            if graph is not None:
                graph.replay()
                return outputs
        calls[key] = calls.get(key, 0) + 1
        if calls[key] <= warmup or key in graphs:  # warm-up, or eager after a failed recording
            side.wait_stream(cuda.current_stream())
            with cuda.stream(side):
                outputs = step(*key)
            cuda.current_stream().wait_stream(side)
            return outputs
        graph, flags = cuda.CUDAGraph(), [(p, p.requires_grad) for p in agent.parameters()]
        try:
            graph.register_generator_state(generator)
            with cuda.graph(graph):  # records the kernels; none runs until the replay
                outputs = step(*key)
        except Exception as error:
            for parameter, flag in flags:  # `step` may have stopped between requires_grad_(False) and (True)
                parameter.requires_grad_(flag)
            print(f"{Path(sys.argv[0]).name}: recording the update as a CUDA graph failed ({type(error).__name__}: "
                  f"{str(error).strip().splitlines()[-1][:160]}); this run continues without", file=sys.stderr)
            graphs[key] = (None, None)
            return call(*key)
        graphs[key] = (graph, outputs)
        graph.replay()
        return outputs
    call.recorded = lambda: sum(graph is not None for graph, _ in graphs.values())  # graphs replaying (benchmarks)
    return call
# --- end shared block ---


# --- shared block: env ---
CONTROL_SUITE_ALIASES = {"hopper": "hopper-hop", "cheetah": "cheetah-run", "walker": "walker-walk",
                         "quadruped": "quadruped-run"}


SHOWN = set()  # dm_control's log messages shown so far: it warns of cheetah's `settotalmass` at every env built


def show_once(record: logging.LogRecord) -> bool:
    """A logging filter: each distinct message once."""
    new = record.getMessage() not in SHOWN
    SHOWN.add(record.getMessage())
    return new


def control_suite():
    if show_once not in logging.getLogger("absl").filters:
        logging.getLogger("absl").addFilter(show_once)
    try:  # MUJOCO_GL is set only for --capture-video (main()): training needs no OpenGL
        from dm_control import suite
    except (AttributeError, ImportError, RuntimeError) as error:  # MUJOCO_GL=egl without libEGL, for one
        raise UserError(f"dm_control could not load its renderer (MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
                        f"{type(error).__name__}); training needs none: leave MUJOCO_GL unset and --capture-video "
                        f"out, or install the renderer's library (libEGL for egl)") from None
    return suite


class ControlSuiteEnv(gym.Env):
    """A Control Suite task as a Gymnasium env: observation arrays flattened in dm_control's order (shimmy's adapter
    sorts them by name) as float32, clipped actions, a time limit is `truncated`."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, domain: str, task: str, render_mode: Optional[str] = None):
        self.load = lambda seed: control_suite().load(domain, task, task_kwargs={"random": seed})
        self.render_mode = render_mode
        self.env, spec = self.load(None), self.load(None).action_spec()
        self.action_space = gym.spaces.Box(spec.minimum.astype(np.float32), spec.maximum.astype(np.float32))
        size = sum(int(np.prod(v.shape)) for v in self.env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.env = self.env if seed is None else self.load(seed)
        return np.concatenate([np.ravel(v) for v in self.env.reset().observation.values()], dtype=np.float32), {}

    def step(self, action):
        time_step = self.env.step(np.clip(action, self.action_space.low, self.action_space.high))
        observation = np.concatenate([np.ravel(v) for v in time_step.observation.values()], dtype=np.float32)
        terminated = time_step.last() and time_step.discount == 0.0
        return observation, float(time_step.reward or 0.0), terminated, time_step.last() and not terminated, {}

    def render(self):
        return self.env.physics.render(height=240, width=320, camera_id=0)


def make_env(env_id: str, render_mode: Optional[str] = None, task: Optional[str] = None) -> gym.Env:
    """An alias, a Control Suite `domain-task`, `sawyer` (actions in [-1, 1]; task None: a random task per episode)
    or a gymnasium id (`module:EnvId`); env.unwrapped takes the env's own (physical) actions."""
    if env_id == "sawyer":
        if task is not None and task not in sawyer_env.ALL_TASKS:
            raise UserError(f"unknown sawyer task {task!r}: use one of {', '.join(sawyer_env.ALL_TASKS)}")
        return sawyer_env.learner_env(task or "random", render_mode)
    domain, _, name = CONTROL_SUITE_ALIASES.get(env_id, env_id).partition("-")
    if name and (domain, name) in control_suite().ALL_TASKS:
        return ControlSuiteEnv(domain, name, render_mode)
    try:
        env = gym.make(env_id, render_mode=render_mode)
    except Exception as error:  # gymnasium raises many types for an unknown or broken id
        raise UserError(f"unknown env {env_id!r}: use hopper, cheetah, walker, quadruped, a Control Suite "
                        f"domain-task such as cartpole-swingup, sawyer, or a gymnasium id ({error})") from None
    if not all(isinstance(space, gym.spaces.Box) and len(space.shape) == 1
               for space in (env.observation_space, env.action_space)):
        raise UserError(f"env {env_id!r} has {env.observation_space} observations and {env.action_space} actions; "
                        f"these scripts learn from flat vectors of real numbers (1-D Box spaces) for both")
    return env


def default_dataset(env_id: str) -> Path:
    """Where collect.py writes an env's data when no --output is given, and where the learning scripts look for it."""
    return Path("datasets", env_id.replace(":", "_").replace("/", "_") + ".npz")
# --- end shared block ---


# --- shared block: dataset ---
ARRAY_DIMENSIONS = {"observation": 2, "action": 2, "reward": 2, "discount": 1, "episode_id": 1, "step": 1,
                    "next_observation": 2, "run_id": 1, "task_id": 1}  # the first six are required
WHOLE_NUMBERS = ("episode_id", "step", "run_id", "task_id")
DATASET_RULES = [  # (rule on the arrays a, what the user reads when it fails), checked in order
    (lambda a: all(key in a for key in list(ARRAY_DIMENSIONS)[:6]),
     f"it lacks some of the arrays {list(ARRAY_DIMENSIONS)[:6]}; see README 'Datasets'"),
    *[(lambda a, key=key, ndim=ndim: key not in a or a[key].ndim == ndim and len(a[key]) == len(a["observation"]),
       f"array {key!r} has shape other than {ndim}-D with one row per transition like 'observation'")
      for key, ndim in ARRAY_DIMENSIONS.items()],
    (lambda a: len(a["observation"]) > 0, "it holds no transitions"),
    (lambda a: a.get("next_observation", a["observation"]).shape == a["observation"].shape,
     "'next_observation' and 'observation' differ in shape"),
    *[(lambda a, key=key: key not in a or np.issubdtype(a[key].dtype, np.integer if key in WHOLE_NUMBERS else np.number),
       f"array {key!r} must hold {'whole numbers' if key in WHOLE_NUMBERS else 'numbers'}") for key in ARRAY_DIMENSIONS],
    *[(lambda a, key=key: key not in a or np.isfinite(a[key]).all(), f"array {key!r} contains NaN or infinite values")
      for key in list(ARRAY_DIMENSIONS)[:7]],
    (lambda a: np.all((np.asarray(a["discount"]) >= 0) & (np.asarray(a["discount"]) <= 1)),
     "'discount' must lie in [0, 1] (0 where an episode terminates)"),
    (lambda a: len(np.unique(a["episode_id"])) == len(episode_starts(a["episode_id"]))
     and np.all(np.diff(a["step"])[np.diff(a["episode_id"]) == 0] == 1),
     "episodes must be stored back to back with consecutive steps (snippets for Eq. 4)"),
]


METADATA_TYPES = {"env": str, "tasks": list, "action_low": list, "action_high": list, "reference_scores": list}


def episode_starts(episode_id) -> np.ndarray:
    return np.flatnonzero(np.r_[True, np.asarray(episode_id)[1:] != np.asarray(episode_id)[:-1]])


def load_dataset(path: Path, episodes_per_run: Optional[int] = None) -> dict:
    """A checked dataset (README "Datasets"; a directory of .npy files is memory-mapped) with its `metadata` and
    `episode_last` (each transition's episode's last index); `episodes_per_run`: --dataset-episodes."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset {path} does not exist")
    try:
        if path.is_dir():
            arrays = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in path.glob("*.npy")}
            arrays["metadata"] = (path / "metadata.json").read_text() if (path / "metadata.json").exists() else "{}"
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        metadata = json.loads(str(arrays.pop("metadata", "{}")))
    except json.JSONDecodeError as error:
        raise UserError(f"dataset {path}: its 'metadata' is not JSON ({error})") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "Object arrays" in reason or "pickled" in reason and path.is_file() and path.open("rb").read(1) == b"\x80":
            reason = "it holds pickled Python objects, which are never loaded (allow_pickle=False)"
        elif "pickled" in reason:  # numpy's guess for any file that is neither .npy nor .npz
            reason = "it is not an .npz archive or a directory of .npy files"
        raise UserError(f"dataset {path} cannot be read: {reason}") from None
    for key, kind in METADATA_TYPES.items():
        if not isinstance(metadata, dict) or key in metadata and not isinstance(metadata[key], kind):
            raise UserError(f"dataset {path}: its 'metadata' must be a JSON object whose {key!r} is a "
                            f"{kind.__name__} (README 'Datasets')")
    if "reward" in arrays and arrays["reward"].ndim == 1:
        arrays["reward"] = arrays["reward"][:, None]
    for rule, problem in DATASET_RULES:
        if not rule(arrays):
            raise UserError(f"dataset {path}: {problem}")
    size, starts = len(arrays["observation"]), episode_starts(arrays["episode_id"])
    keep = np.ones(size, dtype=bool)
    if "next_observation" not in arrays:  # derive s' from the next row; an episode's last row has none
        keep[np.r_[starts[1:] - 1, size - 1]] = False
        arrays["next_observation"] = np.asarray(arrays["observation"])[np.minimum(np.arange(size) + 1, size - 1)]
    if episodes_per_run is not None:  # an episode's rank within its collecting run
        run = np.asarray(arrays["run_id"])[starts] if "run_id" in arrays else np.zeros(len(starts), int)
        rank = np.array([np.sum(run[:i] == run[i]) for i in range(len(starts))])
        most = rank.max() + 1  # episodes of the longest collecting run
        if episodes_per_run > most:  # a regime this data does not have: not silently all of it
            raise UserError(f"--dataset-episodes {episodes_per_run} asks for more episodes than {path} has in any "
                            f"collecting run (at most {most}): give at most that, or leave it out for all")
        keep &= np.repeat(rank < episodes_per_run, np.diff(np.r_[starts, size]))
    if not keep.all():
        arrays = {key: np.asarray(value)[keep] for key, value in arrays.items()}
        size, starts = int(keep.sum()), episode_starts(arrays["episode_id"])
    lengths = np.diff(np.r_[starts, size])
    return {**arrays, "episode_last": np.repeat(starts + lengths - 1, lengths), "metadata": metadata}


def select_tasks(data: dict, task: str, env_id: Optional[str] = None) -> tuple[list[int], list[str]]:
    """Reward columns to learn (`all` or one); sawyer's new tasks (Section 5.2) are labelled from s' as a new column."""
    names = list(data["metadata"].get("tasks") or [f"task{i}" for i in range(data["reward"].shape[1])])
    if len(names) != data["reward"].shape[1]:
        raise UserError(f"dataset metadata names {len(names)} tasks but 'reward' has {data['reward'].shape[1]} columns")
    if task not in names and env_id == "sawyer" and task in sawyer_env.REWARD_FUNCTIONS:
        reward = sawyer_env.REWARD_FUNCTIONS[task](np.asarray(data["next_observation"])).astype(np.float32)
        data["reward"], data["metadata"] = np.c_[data["reward"], reward], {**data["metadata"], "tasks": names + [task]}
        names.append(task)
    if task != "all" and task not in names:
        raise UserError(f"task {task!r} is not in the dataset; its tasks are {names}")
    return (list(range(len(names))), names) if task == "all" else ([names.index(task)], [task])


def load_data(args, env: gym.Env, device: torch.device) -> tuple[dict, list[str], dict]:
    """The run's dataset checked against the env (the default one made by collect.py if missing) as tensors on
    `device` (float32 memory-mapped arrays stay on disk on a CPU), its task names, and its spec for config.json."""
    path = minari_npz(args.dataset) or Path(args.dataset or default_dataset(args.env))
    unfinished = unfinished_collection(path) if args.dataset is None else None  # a stopped default one: continued
    if args.dataset is None and not path.exists() or unfinished:
        print(f"{f'{path} holds {unfinished}' if unfinished else f'No dataset at {path}'}: generating it with "
              f"`python collect.py --env {args.env}` (default budget, about {5 if args.env == 'sawyer' else 20} "
              f"minutes on 2 CPU cores); pass --dataset PATH to use your own data.", flush=True)
        command = [sys.executable, str(Path(__file__).resolve().parent / "collect.py"), "--env", args.env, "--output", str(path)]
        if subprocess.run(command, preexec_fn=stop_with_parent).returncode != 0 or not path.exists():
            raise UserError(f"collect.py failed to generate {path}; see its output above")
    data, (obs_dim,), (act_dim,) = load_dataset(path, args.dataset_episodes), env.observation_space.shape, env.action_space.shape
    same = lambda env_id: CONTROL_SUITE_ALIASES.get(env_id, env_id).split(":")[-1]  # noqa: E731
    if data["metadata"].get("env") and same(data["metadata"]["env"]) != same(args.env):
        raise UserError(f"dataset {path} was recorded on {data['metadata']['env']!r}, not on --env {args.env!r}; "
                        f"leave --env out to learn on the dataset's env")
    if data["observation"].shape[1] != obs_dim or data["action"].shape[1] != act_dim:
        raise UserError(f"dataset {path} has observation/action sizes {data['observation'].shape[1]}/"
                        f"{data['action'].shape[1]} but the env has {obs_dim}/{act_dim}; is it for another env?")
    columns, tasks = select_tasks(data, args.task, args.env)
    env_space = env.unwrapped.action_space  # the env's own units: physical for sawyer, whose learner acts in [-1, 1]
    stored = [data["metadata"].get(key) for key in ("action_low", "action_high")]
    if None not in stored and not np.allclose(stored, [env_space.low, env_space.high]):
        raise UserError(f"dataset {path} has action bounds {stored} but {args.env} takes actions in "
                        f"{[env_space.low.tolist(), env_space.high.tolist()]}")
    if args.env == "sawyer":
        data["action"] = sawyer_env.normalise_actions(data["action"])
    data["reward"] = np.asarray(data["reward"][:, columns], np.float32)
    best = np.add.reduceat(data["reward"].astype(np.float64), episode_starts(data["episode_id"]), axis=0).max(0)
    spec = {"env": args.env, "dataset": str(path), "obs_dim": obs_dim, "act_dim": act_dim, "tasks": tasks,
            "action_low": env.action_space.low.tolist(), "action_high": env.action_space.high.tolist(),
            "env_action_low": env_space.low.tolist(), "env_action_high": env_space.high.tolist(),
            "best_episode_return_in_dataset": dict(zip(tasks, best.tolist())),
            "reference_scores": data["metadata"].get("reference_scores")}
    keys = ("observation", "action", "reward", "discount", "next_observation", "episode_last")
    return {key: torch.as_tensor(np.asarray(data[key], None if key == "episode_last" else np.float32),
                                 device=device) for key in keys}, tasks, spec


def stored_metadata(path: Path) -> dict:
    """The metadata a dataset stores, {} where it has none or cannot be read (load_dataset says why)."""
    try:
        if path.is_dir():
            return json.loads((path / "metadata.json").read_text())
        with np.load(path, allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"]))
        return metadata if isinstance(metadata, dict) else {}
    except Exception:  # any reason at all: the dataset's checks report it
        return {}


def unfinished_collection(path: Path) -> Optional[str]:
    """'14 of 60 episodes' where collect.py wrote `path` when stopped before the end, else None."""
    try:
        metadata = stored_metadata(path)
        stored = len(next(iter(metadata["episode_returns"].values())))
        planned = metadata["collection"]["args"]["episodes"] * len(metadata["collection"]["args"]["seeds"])
    except (KeyError, TypeError, AttributeError, StopIteration):
        return None
    return f"{stored} of {planned} episodes (its collection was stopped)" if stored < planned else None


def minari_npz(dataset: Optional[str]) -> Optional[Path]:
    """Where the .npz copy of a Minari --dataset (`minari:<id>`, or a directory without .npy files) goes, else None."""
    if dataset and (dataset.startswith("minari:") or Path(dataset).is_dir() and not any(Path(dataset).glob("*.npy"))):
        name = dataset.removeprefix("minari:") if dataset.startswith("minari:") else str(Path(dataset).resolve())[1:]
        return Path("datasets", "minari", name + ".npz")
    return None


def dataset_env(args) -> str:
    """args.env, once `minari_io.py import` (only it imports minari) has made the .npz copy of a Minari --dataset
    (again if the source changed) and checked --env; left out, --env is the env the dataset stores; given, it must be
    that env."""
    if (path := minari_npz(args.dataset)) is not None:
        command = [sys.executable, str(Path(__file__).resolve().parent / "minari_io.py"), "import", args.dataset,
                   "--output", str(path), *(["--env", args.env] if args.env else [])]
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True, preexec_fn=stop_with_parent)
        if result.returncode != 0:  # minari_io.py's one sentence
            raise UserError(result.stderr.partition("minari_io.py: error: ")[2].strip() or result.stderr.strip())
        metadata = json.loads(str(np.load(path, allow_pickle=False)["metadata"]))
        args.env = args.env or metadata["env"]
        if metadata.get("env_spec") and args.env == metadata["env"]:  # the stored kwargs and time limit
            gym.registry[args.env] = gym.envs.registration.EnvSpec.from_json(metadata["env_spec"])
    elif args.dataset and not args.env:  # load_data checks a given --env against the dataset's
        args.env = stored_metadata(Path(args.dataset)).get("env")
    args.env = args.env or "hopper"
    if args.env == "sawyer" and args.task not in ("all", *sawyer_env.ALL_TASKS):  # before any data is generated
        raise UserError(f"unknown sawyer --task {args.task!r}: use all or one of {', '.join(sawyer_env.ALL_TASKS)}")
    task = CONTROL_SUITE_ALIASES.get(args.env, args.env)  # the one task of the default data collect.py would make
    if args.dataset is None and args.task not in ("all", task) and args.env != "sawyer" and \
            not default_dataset(args.env).exists():
        raise UserError(f"unknown --task {args.task!r}: the default {args.env} data that collect.py makes has the one "
                        f"task {task!r} (or give all)")
    args.__post_init__()  # the defaults that depend on the env
    return args.env
# --- end shared block ---


# --- shared block: flags ---
NUMBER_MAY_BE_ZERO = {"seed", "final_eval_episodes", "shared_layers", "discount", "double_q_lambda", "vae_kl_weight",
                      "perturbation_scale", "mmd_threshold", "warmup_steps", "noise", "epsilon", "epsilon_mean",
                      "epsilon_stddev"}
FLAG_RULES = [  # (rule on a flag's name and value, what the flag must be), checked for every flag in this order
    (lambda key, v: not isinstance(v, float) or math.isfinite(v), "a finite number"),
    (lambda key, v: type(v) not in (int, float) or v >= 0, "zero or more"),
    (lambda key, v: type(v) not in (int, float) or v > 0 or key in NUMBER_MAY_BE_ZERO, "positive"),
    (lambda key, v: not key.endswith("_layers") or type(v) is int or len(v) > 0 and min(v) >= 1,
     "one or more positive layer sizes"),
    (lambda key, v: key not in ("discount", "double_q_lambda", "target_update_rate") or v <= 1, "at most 1"),
]


def check_flags(args) -> None:
    """Every number a flag gives in range, checked where it enters: one sentence naming the flag."""
    for key, value in asdict(args).items():
        for rule, expected in FLAG_RULES:
            if value is not None and not rule(key, value):
                raise UserError(f"--{key.replace('_', '-')} must be {expected}, not {value!r}")
# --- end shared block ---


# --- shared block: run ---
RESUME_MAY_CHANGE = {"total_steps", "eval_every", "eval_episodes", "eval_max_steps", "final_eval_episodes",
                     "checkpoint_every", "device", "compile", "cuda_graph", "track", "wandb_project", "capture_video"}
RUN_FILES = r"(config|summary|metrics|checkpoint|policy)\.tmp|config\.json|summary\.json|metrics\.csv|" \
            r"checkpoint\.pt|policy(\.tmp)?\.pt2|events\.out\.tfevents\..*|videos|wandb"  # what a run writes


def check_args(args, script: str) -> None:
    """Every flag in range; --resume: the run's saved arguments (only RESUME_MAY_CHANGE may differ, and a flag typed
    on the command line is honoured or refused); a new run: a --run-dir that holds a run is refused (--overwrite)."""
    if args.resume and args.overwrite:
        raise UserError("--overwrite starts a new run and --resume continues one: give one of them")
    if args.resume or args.run_dir:  # before the data: a run in use is refused in seconds
        lock_run_dir(Path(args.resume or args.run_dir), hold=False)
    if args.resume:
        load_saved_config(args, script)
    elif args.run_dir and Path(args.run_dir).is_dir() and any(Path(args.run_dir).iterdir()):
        run_dir, files = Path(args.run_dir), sorted(p.name for p in Path(args.run_dir).iterdir())
        if not args.overwrite:
            resume = f"continue its run with --resume {run_dir}" if (run_dir / "checkpoint.pt").exists() else \
                "it has no checkpoint to resume (its run ended before the first)"
            raise UserError(f"run directory {run_dir} is not empty ({', '.join(files[:4])}"
                            f"{', ...' * (len(files) > 4)}); {resume}, choose a new --run-dir, or replace it with "
                            f"--overwrite")
        if any(not re.fullmatch(RUN_FILES, name) for name in files):  # make_run_dir deletes a run's files only
            raise UserError(f"--overwrite deletes runs only, and {run_dir} also holds "
                            f"{[name for name in files if not re.fullmatch(RUN_FILES, name)][:4]}")
    place = Path(args.resume or args.run_dir or "runs").absolute()  # now, not after a default dataset's collection
    while not place.exists():
        place = place.parent
    if not place.is_dir() or not os.access(place, os.W_OK):
        raise UserError(f"run directory {args.resume or args.run_dir or 'runs/...'} is not writable "
                        f"({f'{place} is a file' if not place.is_dir() else f'no write permission in {place}'})")
    check_flags(args)


def load_saved_config(args, script: str) -> None:
    """--resume: flags neither typed nor changed from their defaults take the saved values; only RESUME_MAY_CHANGE
    may differ."""
    run_dir, defaults, changed = Path(args.resume), asdict(type(args)()), []
    if not (run_dir / "config.json").exists() or not (run_dir / "checkpoint.pt").exists():
        raise UserError(f"cannot resume {run_dir}: it has no config.json and checkpoint.pt")
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict) or "dataset_sha256" not in saved:
        raise UserError(f"cannot resume {run_dir}: its config.json is damaged; start a fresh --run-dir")
    if saved.get("script") != script:
        raise UserError(f"cannot resume {run_dir}: it is a run of {saved.get('script')}, not {script}")
    for key, value in asdict(args).items():
        old = saved["args"].get(key, value)
        if key in ("resume", "run_dir") or json.loads(json.dumps(value)) == old:
            continue
        if value == defaults[key] and key not in RUN.get("given", ()):
            setattr(args, key, tuple(old) if isinstance(value, tuple) else old)
        elif key not in RESUME_MAY_CHANGE:
            changed.append(f"--{key.replace('_', '-')} was {old!r}")
        else:  # kept for this resume only (config.json keeps the first values): main()'s stop line repeats it
            name = key.replace("_", "-")
            RUN.setdefault("resumed_with", []).extend(  # shell words
                [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)])
    if changed:
        raise UserError(f"cannot resume {run_dir} with a different configuration: {', '.join(changed)}")


def lock_run_dir(run_dir: Path, hold: bool = True) -> None:
    """Holds the run directory from make_run_dir on (flock on the folder, released however this process ends): a
    second process on the same run (another --resume, an --overwrite) is refused instead of writing over its files.
    check_args only tries it (hold=False): a run it refuses leaves nothing held in this process. A folder that does
    not exist yet holds no run."""
    if os.name != "posix" or not run_dir.is_dir() or RUN.get("lock", (None,))[0] == run_dir.resolve():
        return
    import fcntl

    release_run_dir()  # an earlier run of this process (the tests run several in one)
    RUN["lock"] = (run_dir.resolve(), os.open(run_dir, os.O_RDONLY))
    try:
        fcntl.flock(RUN["lock"][1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        release_run_dir()
        raise UserError(f"run directory {run_dir} is in use by another process (a run or --resume of it that has not "
                        "ended): wait for it or stop it first") from None
    except OSError:  # a file system without locks: the run goes on unguarded
        pass
    if not hold:
        release_run_dir()


def write_atomically(path: Path, data) -> None:
    """`data` (bytes or str) into path.tmp, then renamed onto `path`, so a crash keeps the previous file whole; a
    failed write (a full disk, a quota) removes path.tmp and stops the run in one sentence (WriteError). torch.save
    and torch.export.save write into memory first: on a full disk torch.export.save aborts the process."""
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException as error:  # Ctrl-C too: no temporary file is left behind
        temporary.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        free = shutil.disk_usage(path.parent).free / 2**20
        raise WriteError(f"cannot write {path}: {error.strerror} ({free:,.1f} MiB free on its disk)") from None


def make_run_dir(args, script: str, spec: dict) -> Path:
    """The run directory, checked writable, with config.json (every argument, the dataset's checksum, versions); on
    --resume the dataset is checked against the checksum config.json recorded."""
    import mujoco

    run_dir = Path(args.resume or args.run_dir or f"runs/{script}__{args.env.replace(':', '_')}__{args.seed}__{int(time.time())}")
    RUN.update(run_dir=run_dir, new=not args.resume and (args.overwrite or not run_dir.exists()), checkpoint=0,
               compiling=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ".write_test").write_text("")
        (run_dir / ".write_test").unlink()
    except OSError as error:
        raise UserError(f"run directory {run_dir} is not writable ({error.strerror})") from None
    lock_run_dir(run_dir)
    for name in os.listdir(run_dir) if args.overwrite else []:  # checked by check_args
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    dataset, digest = Path(spec["dataset"]), hashlib.sha256()
    for file in sorted(dataset.glob("*")) if dataset.is_dir() else [dataset]:
        with open(file, "rb") as handle:
            hashlib.file_digest(handle, lambda: digest)  # adds the file's bytes to `digest`
    if args.resume:
        if json.loads((run_dir / "config.json").read_text())["dataset_sha256"] != digest.hexdigest():
            raise UserError(f"cannot resume {run_dir}: dataset {dataset} is not the one the run started on (its "
                            f"SHA-256 differs from config.json's)")
        return run_dir
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "gymnasium": gym.__version__, "mujoco": mujoco.__version__}
    config = {"script": script, "args": asdict(args), "dataset": str(dataset), "dataset_sha256": digest.hexdigest()}
    write_atomically(run_dir / "config.json", json.dumps({**config, "versions": versions, "spec": spec}, indent=2))
    return run_dir


def save_checkpoint(run_dir: Path, modules: dict, generator: torch.Generator, step: int, spec: dict) -> None:
    """checkpoint.pt (weights_only-loadable): the state dicts of `modules`, the random states, the step and the spec
    (sizes, tasks, action bounds); written to a temporary file, then renamed, so a crash keeps the previous one."""
    state = {name: module.state_dict() for name, module in modules.items()}
    rng = {"torch": torch.get_rng_state(), "sampling": generator.get_state()}
    buffer = io.BytesIO()
    torch.save({**state, "rng": rng, "step": step, "spec": spec}, buffer)
    write_atomically(run_dir / "checkpoint.pt", buffer.getvalue())
    RUN["checkpoint"] = step


def load_checkpoint(run_dir: Path, modules: dict, generator: torch.Generator, total_steps: int) -> int:
    """--resume: the state of checkpoint.pt into `modules` and `generator`; returns its update."""
    path = run_dir / "checkpoint.pt"
    try:
        state = torch.load(path, map_location=generator.device, weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state[name] if name != "logger" else {**state.get(name, {}), "step": state["step"]})
        torch.set_rng_state(state["rng"]["torch"].cpu())  # set_state takes the random states on the CPU
        generator.set_state(state["rng"]["sampling"].cpu())
    except (RuntimeError, KeyError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise UserError(f"{path} cannot be resumed: it is damaged or was written by another version of this "
                        f"script ({type(error).__name__}: {str(error).strip().splitlines()[0][:120]}); start a "
                        f"fresh --run-dir") from None
    if state["step"] > total_steps:
        raise UserError(f"{run_dir} has done {state['step']:,} updates, more than --total-steps {total_steps:,}: a run "
                        f"cannot be shortened; give a larger --total-steps to train it further")
    print(f"Resuming {run_dir} from update {state['step']}." if state["step"] < total_steps else
          f"{run_dir} has done all its {total_steps:,} updates: nothing to train, only its final evaluation and "
          f"summary.json are made again (a larger --total-steps trains it further).", flush=True)
    RUN["checkpoint"] = RUN["step"] = state["step"]
    return state["step"]


ESTIMATE_AFTER = (20, 60)  # the run's time estimate: the rate of updates 20-60 of this process
PROGRESS_SECONDS = 60  # with no terminal (a log file, a pipe), a progress line at most this often


class Logger:
    """metrics.csv, TensorBoard (synced by W&B with --track), progress (a bar on a terminal, else a line a minute).
    Metrics are summed on the device, noting the first non-finite update: no host sync until a row or checkpoint is
    written, and a non-finite loss stops the run before either. Its state (the sums since the last row) goes into
    checkpoint.pt; on --resume, rows and TensorBoard values after the checkpoint are dropped: each is written once."""

    def __init__(self, args, run_dir: Path):
        self.run_dir, self.path, self.wandb, self.writer, self.rows = run_dir, run_dir / "metrics.csv", None, None, []
        if args.track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs Weights & Biases: pip install wandb") from None
            self.wandb = wandb.init(project=args.wandb_project, config=json.loads((run_dir / "config.json").read_text()),
                                    dir=str(run_dir), name=run_dir.name, resume="allow", sync_tensorboard=True)
        self.sums, self.keys, self.count, self.clock, self.start = None, [], 0, time.time(), 0
        self.bad_step, self.bad = torch.zeros((), dtype=torch.long), False  # first non-finite update and its metrics
        self.progress = tqdm(total=args.total_steps, desc=run_dir.name, disable=None)
        self.total, self.seen, self.seen_clock, self.started = args.total_steps, 0, 0.0, time.time()
        self.line_clock = self.started
        self.step = self.start  # the last update recorded

    def state_dict(self) -> dict:
        sums = self.sums if self.count else torch.zeros(0)
        return {"sums": sums, "keys": self.keys, "count": self.count, "seconds": time.time() - self.clock}

    def load_state_dict(self, state: dict) -> None:  # --resume: this process continues from update state["step"]
        self.start = self.step = state["step"]
        rows = list(csv.DictReader(self.path.read_text().splitlines())) if self.path.exists() else []
        self.rows = [row for row in rows if int(row["step"]) <= self.start]
        if state.get("count"):
            self.sums, self.keys, self.count = state["sums"], state["keys"], state["count"]
            self.clock = time.time() - state["seconds"]
        self.progress.initial = self.progress.n = self.progress.last_print_n = self.start  # tqdm(initial=start)
        self.progress.refresh()

    def record(self, step: int, metrics: dict) -> None:
        values = torch.stack(list(metrics.values()))  # one tensor: a few kernel launches whatever the metrics
        self.sums = values if self.count == 0 else self.sums + values
        bad = ~torch.isfinite(values)
        first = bad.any() & (self.bad_step == 0)
        self.bad_step, self.bad = torch.where(first, step, self.bad_step), torch.where(first, bad, self.bad)
        self.step, self.count, self.keys, RUN["step"] = step, self.count + 1, list(metrics), step
        self.progress.update()
        self.seen += 1
        if self.seen == ESTIMATE_AFTER[0]:  # past compiling and warm-up
            self.seen_clock = time.time()
        elif self.seen == ESTIMATE_AFTER[1] and step < self.total:  # one line, wherever the output goes
            rate = (ESTIMATE_AFTER[1] - ESTIMATE_AFTER[0]) / (time.time() - self.seen_clock)
            hours = (self.total - step) / rate / 3600
            tqdm.write(f"{Path(sys.argv[0]).name}: {rate:.1f} updates/s here, so the {self.total - step:,} updates "
                       f"left take about {f'{hours:.1f} h' if hours >= 1 else f'{60 * hours:.0f} min'} (evaluations "
                       "not counted)" + ("; every method at a CPU-sized budget: python benchmarks/reproduce.py "
                                         "--preset cpu (README \"Results\")" if hours > 2 else ""), file=sys.stderr)
        if self.progress.disable and time.time() - self.line_clock >= PROGRESS_SECONDS:  # no terminal: a line
            rate = (step - self.start) / (time.time() - self.started)
            last = ", ".join(f"{key[5:]} {float(value):.1f}" for key, value in (self.rows or [{}])[-1].items()
                             if key.startswith("eval/"))
            print(f"{self.run_dir.name}: update {step:,} of {self.total:,}, {rate:.1f} updates/s, about "
                  f"{(self.total - step) / rate / 60:.0f} min left; last evaluation: {last or 'none yet'}", flush=True)
            self.line_clock = time.time()

    def check_finite(self) -> None:
        if int(self.bad_step):
            names = [key for key, bad in zip(self.keys, self.bad.tolist()) if bad]
            kept = f"{self.run_dir / 'checkpoint.pt'} keeps the last good state" if RUN.get("checkpoint") else \
                "there was no checkpoint yet"
            raise UserError(f"non-finite loss {[k for k in names if k.startswith('losses/')] or names} at update "
                            f"{int(self.bad_step)} (checked at update {self.step}); stopped, {kept}")

    def write(self, step: int, evaluation: dict) -> None:  # the metrics' means since the last row, the returns
        self.check_finite()
        row = {"step": step, **{key: value / self.count for key, value in zip(self.keys, self.sums.tolist())},
               "charts/updates_per_second": self.count / (time.time() - self.clock), **evaluation}
        self.rows.append(row)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, list(self.rows[0]), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomically(self.path, text.getvalue())
        if self.writer is None:  # purge_step: TensorBoard drops what an interrupted process wrote after the checkpoint
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir), purge_step=self.start + 1 if self.start else None)
        for key, value in list(row.items())[1:]:
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.progress.set_postfix({k[5:]: f"{v:.1f}" for k, v in row.items() if k.startswith("eval/") and k.count("/") == 1})
        self.sums, self.count, self.clock = None, 0, time.time()

    def close(self) -> list[dict]:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        return list(csv.DictReader(self.path.read_text().splitlines())) if self.path.exists() else []


def write_summary(run_dir: Path, evaluations: list[dict], spec: dict, final: Optional[dict] = None) -> dict:
    """summary.json (strict JSON): per `eval/` column the final return, the mean of its last 10% of evaluations
    (Table 6), and its normalised score where the data has reference scores; `per_task` in Table 7's layout with the
    data's best; `final_eval`, the returns of final_evaluation (--final-eval-episodes). A return that is not a finite
    number is null, with a note saying why."""
    best_in_data, (low, high) = spec["best_episode_return_in_dataset"], spec.get("reference_scores") or (None, None)
    summary, per_task = {"evaluations": len(evaluations), "best_episode_return_in_dataset": best_in_data}, {}
    for key in [key for key in (evaluations or [{}])[0] if key.startswith("eval/")]:
        returns, name = [float(row[key]) for row in evaluations if row.get(key)], key.removeprefix("eval/")
        if returns:
            summary["final/" + name] = float(np.mean(returns[-max(1, math.ceil(0.1 * len(returns))):]))
        if returns and high is not None:  # D4RL's normalised score
            summary["final/normalised_" + name] = 100 * (summary["final/" + name] - low) / (high - low)
    summary = {key: None if isinstance(value, float) and not math.isfinite(value) else value
               for key, value in summary.items()}
    for task, best in best_in_data.items():
        suffix = f"/{task}" if len(best_in_data) > 1 else ""
        per_task[task] = {name: summary[f"final/{name}{suffix}"] for name in ("return", "prior_return",
                          "normalised_return", "normalised_prior_return") if f"final/{name}{suffix}" in summary}
        per_task[task]["best_episode_return_in_dataset"] = best
    summary = {**summary, "per_task": per_task}
    if final:
        summary["final_eval"] = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                                 for key, value in final.items()}
    if not evaluations or None in summary.values() or None in summary.get("final_eval", {}).values():
        summary["note"] = "no evaluation ran, so there is no final return" if not evaluations else \
            "a null final return: an evaluation returned a value that is not a finite number (metrics.csv has them)"
    text = json.dumps(summary, indent=2, allow_nan=False)
    write_atomically(run_dir / "summary.json", text)
    print(text)
    release_run_dir()  # the run is complete
    return summary


def make_eval_envs(args, run_dir: Path, tasks: list) -> list:
    """envs[k] for task k (sawyer: SawyerEnv(task), else one env for every reward column), taking the env's own
    actions (ActingPolicy maps onto them); --capture-video records the first episode of each evaluation."""
    if args.capture_video and importlib.util.find_spec("moviepy") is None:  # RecordVideo writes mp4 with it
        raise UserError("--capture-video needs moviepy: pip install moviepy")
    envs = []
    for task in tasks if args.env == "sawyer" else tasks[:1]:
        env = make_env(args.env, "rgb_array" if args.capture_video else None, task if args.env == "sawyer" else None)
        env = env.unwrapped if args.env == "sawyer" else env  # SawyerEnv, physical actions
        if args.capture_video:
            folder = run_dir / "videos" / task if args.env == "sawyer" and len(tasks) > 1 else run_dir / "videos"
            env = gym.wrappers.RecordVideo(env, str(folder), episode_trigger=lambda i: i % args.eval_episodes == 0,
                                           disable_logger=True)
        envs.append(env)
    return envs if args.env == "sawyer" else envs * len(tasks)


def evaluate(act: Callable, env: gym.Env, episodes: int, seed: int, max_steps: Optional[int] = None) -> list[float]:
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


@torch.no_grad()
def evaluate_policies(policies: dict, envs: list, tasks: list, args, episodes: Optional[int] = None,
                      seed: Optional[int] = None) -> dict:
    """`eval/<name>`: the mean return over tasks of each ActingPolicy, `eval/<name>/<task>`: its head k in envs[k];
    --eval-episodes from reset(seed=--seed + 100 + i), unless `episodes` from reset(seed=seed + i) are asked for."""
    episodes, seed, results = episodes or args.eval_episodes, args.seed + 100 if seed is None else seed, {}
    for name, policy in policies.items():
        device = policy.action_low.device
        act = lambda observation, k: policy(torch.as_tensor(observation, dtype=torch.float32, device=device)[None],
                                            torch.tensor([k], device=device))[0].cpu().numpy()  # noqa: E731
        per_task = [np.mean(evaluate(lambda o: act(o, k), envs[k], episodes, seed, args.eval_max_steps))
                    for k in range(len(tasks))]
        results[f"eval/{name}"] = float(np.mean(per_task))
        results.update({f"eval/{name}/{task}": float(value) for task, value in zip(tasks, per_task) if len(tasks) > 1})
    return results


FINAL_EVAL_SEED = 1000  # --final-eval-episodes: episode i from reset(seed=1000 + i), away from evaluate_policies'
                        # own seed + 100 + i for the seeds a grid uses


def final_evaluation(policies: dict, envs: list, tasks: list, args) -> dict:
    """--final-eval-episodes: each policy's mean return (and per task) in episodes that start from the same states in
    every run, for summary.json's `final_eval`; {} when not asked for."""
    if not args.final_eval_episodes:
        return {}
    print(f"Final evaluation: {args.final_eval_episodes} episodes per policy from reset(seed={FINAL_EVAL_SEED} + i).",
          flush=True)
    results = evaluate_policies(policies, envs, tasks, args, args.final_eval_episodes, FINAL_EVAL_SEED)
    return {"episodes": args.final_eval_episodes, "first_start_seed": FINAL_EVAL_SEED,
            **{key.removeprefix("eval/"): value for key, value in results.items()}}


def export_policy(policy: nn.Module, spec: dict, run_dir: Path) -> None:
    """policy.pt2, atomically: `torch.export.load(path).module()(observation, task_index)` runs the ActingPolicy with
    torch alone; what acting needs beside it (env, sizes, tasks, action bounds) is the extra file "policy.json"."""
    batch = torch.export.Dim("batch", max=1 << 16)
    example = (torch.zeros(2, spec["obs_dim"]), torch.zeros(2, dtype=torch.int64))
    program = torch.export.export(copy.deepcopy(policy).cpu().eval(), example, dynamic_shapes=({0: batch}, {0: batch}))
    metadata = {"env": spec.get("env"), "obs_dim": spec["obs_dim"], "act_dim": spec["act_dim"], "tasks": spec["tasks"],
                "action_low": spec["env_action_low"], "action_high": spec["env_action_high"],
                "inputs": "observation [B, obs_dim] float32 raw, task_index [B] int64 (into tasks)",
                "output": "action [B, act_dim] float32 in [action_low, action_high]"}
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"policy.json": json.dumps(metadata)})
    write_atomically(run_dir / "policy.pt2", buffer.getvalue())
# --- end shared block ---


if __name__ == "__main__":
    main(train, tyro.cli(Args))
