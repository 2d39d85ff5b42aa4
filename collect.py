"""collect.py: make offline datasets the way the paper did (Sections 5.1 and 5.2).

An online MPO learning run (Abdolmaleki et al. 2018) on a Control Suite task that stores every
transition it generates, early random-looking episodes and later good ones alike, for one or
more seeds. The result is the dataset format of the README ("Datasets"): flat arrays with
episodes back to back, `run_id` = the collecting seed, and a JSON `metadata` string.

Crash safety: each finished episode is written at once, atomically, to
`<output>.episodes/run<seed>_episode<n>.npz`, together with the learner's checkpoint. A
crash or Ctrl-C loses at most the episode in progress; rerunning the same command resumes
every seed where it stopped (learner, replay and random state), and new seeds or more
episodes append to the dataset. The consolidated `<output>` is rewritten at the end. A rerun
with other flags than those the collection started with (`<output>.episodes/collection.json`)
is refused, and an `<output>` holding episodes that its episode folder does not is replaced
only with `--overwrite`: nothing collected is mixed up or lost.

`--env sawyer` (Section 5.2): multi-task data on the simulated Sawyer of sawyer_env.py. Each
episode runs the scripted behaviour policy of a task drawn at random (of the seven), with
Gaussian action noise (`--noise`, a fraction of each action limit), the robot pose re-randomised
every 20 episodes; every transition carries all seven task rewards (`reward [T, 7]`, computed
from s_{t+1}), `task_id [T]` says whose policy acted, actions are stored in physical units with
their bounds in the metadata. Episodes are written in blocks of 20, each block starting from a
seeded reset, so a crash loses at most the block in progress and a rerun redoes it exactly.

Differences from the paper: the Sawyer data comes from noisy scripted policies, not from MPO
learners (the paper's data), so it lacks the learners' early poor episodes; its mix of good and
bad actions per task comes from the noise and from the other tasks' policies acting in the same
states (500 episodes by default, 4-6 minutes on 2 CPU cores). The Control Suite default
budget (60 episodes, one seed, one update per environment step, batch 64) is tiny next to the
paper's, yet its learner improves within it (README "Making them": times and returns per task);
the paper used 10,000 episodes and 5 seeds (`--episodes 10000 --seeds 0 1 2 3 4`). The
online MPO duals use Acme's learning rate 1e-2 so the temperature adapts within a short run.
"""

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

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
    env: str = "hopper"
    """`hopper`, `cheetah`, `walker`, `quadruped` (Control Suite hopper-hop, cheetah-run,
    walker-walk, quadruped-run), any Control Suite `domain-task`, `sawyer` (the simulated Sawyer
    of sawyer_env.py, multi-task, Section 5.2), or a gymnasium id"""
    output: Optional[str] = None
    """dataset file to write; default `datasets/<env>.npz`"""
    overwrite: bool = False
    """replace an --output file that holds episodes its episode folder does not (another dataset, or one whose
    `<output>.episodes` was deleted): refused without this flag"""
    seeds: tuple[int, ...] = (0,)
    """one collecting run per seed (an online MPO run; for sawyer a scripted-policy run)"""
    episodes: Optional[int] = None
    """episodes per seed; default 60 for a Control Suite task, 500 for sawyer (paper: 10,000)"""
    noise: float = sawyer_env.DEFAULT_NOISE
    """sawyer: std of the Gaussian noise on the scripted actions, as a fraction of the action limits"""
    steps_per_update: int = 1
    """environment steps between gradient updates (1, as the paper's learners: at 8 a walker learner stayed at
    27-50 over 44 episodes; at 1 it went from 31 to 429 in 50)"""
    warmup_steps: int = 2_000
    """transitions in the replay before the first update"""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu` or `cuda`"""

    # Online MPO arguments
    batch_size: int = 64
    """transitions per gradient update (64: with one update per step, a short run's learner improves within
    tens of episodes on walker and cheetah)"""
    num_action_samples: int = 20
    """M, action samples per state"""
    replay_size: int = 2_000_000
    """transitions kept in the online replay (Table 1)"""
    discount: float = 0.99
    """discount factor gamma"""
    learning_rate: float = 2e-4
    """Adam learning rate of the critic and the policy"""
    dual_learning_rate: float = 1e-2
    """Adam learning rate of the temperature and the trust-region multipliers"""
    epsilon: float = 0.1
    """KL bound of the E-step (Eq. 7-9)"""
    epsilon_mean: float = 5e-3
    """trust-region bound on the KL of the policy mean"""
    epsilon_stddev: float = 1e-5
    """trust-region bound on the KL of the policy covariance"""
    initial_temperature: float = 3.0
    """initial eta"""
    initial_multiplier: float = 1.0
    """initial alpha of the trust-region multipliers"""
    target_update_period: int = 200
    """gradient updates between hard copies to the target networks"""
    max_grad_norm: float = 40.0
    """gradient clipping (global norm per network)"""
    policy_layers: tuple[int, ...] = (256, 256)
    """hidden layers of the policy"""
    critic_layers: tuple[int, ...] = (256, 256, 256)
    """hidden layers of the Q function"""
    shared_layers: int = 1
    """first hidden layers shared by all tasks (one task here)"""

    def __post_init__(self):
        if self.episodes is None:
            self.episodes = SAWYER_EPISODES if self.env == "sawyer" else 60


class UserError(Exception):
    """A problem with the user's input (arguments, files): reported in one sentence, exit 1."""


def main(train_fn: Callable, args) -> None:
    """Run `train_fn(args)`, turning a UserError into one line on stderr and exit status 1. Training needs no
    OpenGL: dm_control gets a renderer (headless EGL) only for --capture-video, else none (MUJOCO_GL=disable:
    nothing is probed, so a machine without libEGL or a display trains, and no GLFW warning is printed)."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl" if getattr(args, "capture_video", False) else "disable")
    # Ctrl-C (SIGINT) writes the finished episodes even when a shell started this in the background, with SIGINT
    # ignored (Python then installs no KeyboardInterrupt handler): `kill -INT` works there too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop (or the main job's end): the same
    try:
        train_fn(args)
    except UserError as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None


def autocast(precision: str, device: torch.device):
    """`--precision bf16`: matrix products inside run in bfloat16 (float32 weights and accumulation); fp32: no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# State-action rows per critic pass and thread (q_values, TwinCritic): 1024 rows of a 256-unit activation are
# 1 MiB, a core's L2 cache; one pass over all M * B rows is up to 2x slower on a CPU.
CHUNK_ROWS = 1024


def to_torch(batch: dict, device: torch.device) -> dict:
    return {key: torch.as_tensor(value, device=device) for key, value in batch.items()}


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


def save_checkpoint(path: Path, modules: dict, rng: np.random.Generator, generator: torch.Generator, **extra) -> None:
    """State dicts only (loadable with weights_only=True): modules, optimisers, random states, `extra`; written
    atomically (a temporary file, then rename), so a crash leaves the previous checkpoint intact."""
    rng_state = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(), "sampling": generator.get_state()}
    buffer = io.BytesIO()  # torch.save into memory: its own writer on a full disk is a C++ error, not an OSError
    torch.save({**{name: module.state_dict() for name, module in modules.items()}, "rng": rng_state, **extra}, buffer)
    write_atomically(path, lambda handle: handle.write(buffer.getvalue()))


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


# --- shared block: mpo ---
def temperature_dual_loss(q: torch.Tensor, temperature: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, dict]:
    # Eq. 9 (with the -log M of the sample estimate), minimised over eta:
    # g(eta) = eta * epsilon + eta * mean_s [logsumexp_j(Q(s, a_j) / eta) - log M],  q: [M, K, B].
    log_mean_exp = torch.logsumexp(q / temperature, dim=0) - math.log(q.shape[0])
    loss = temperature * epsilon + temperature * log_mean_exp.mean()
    return loss, {"losses/temperature": loss.detach(), "charts/temperature": temperature.detach()}


def e_step_weights(q: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    # Eq. 7: the non-parametric policy on the M samples, q(a_j|s) = softmax_j(Q(s, a_j) / eta).
    return torch.softmax(q / temperature, dim=0)


def decoupled_kl(target_mean, target_std, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(pi_target || pi) split into a mean part, N(mu, sigma_target), and a covariance part,
    N(mu_target, sigma); both averaged over states."""
    kl_mean = gaussian_kl(target_mean, target_std, mean, target_std).mean()
    kl_std = gaussian_kl(target_mean, target_std, target_mean, std).mean()
    return kl_mean, kl_std


def weighted_mle_loss(actions, weights, mean, std, target_mean, target_std,
                      multiplier_mean, multiplier_std, epsilon_mean, epsilon_std) -> tuple[torch.Tensor, dict]:
    # Eq. 10: weighted maximum likelihood of the E-step samples under a trust region
    # KL(pi_target || pi) < eps, decoupled into mean and covariance. actions [M, K, B, act].
    log_prob_mean = gaussian_log_prob(actions, mean, target_std)  # [M, K, B]
    log_prob_std = gaussian_log_prob(actions, target_mean, std)
    likelihood = -(weights * (log_prob_mean + log_prob_std)).sum(0).mean()
    kl_mean, kl_std = decoupled_kl(target_mean, target_std, mean, std)
    policy_loss = likelihood + multiplier_mean.detach() * kl_mean + multiplier_std.detach() * kl_std
    multiplier_loss = multiplier_mean * (epsilon_mean - kl_mean.detach()) + multiplier_std * (epsilon_std - kl_std.detach())
    metrics = {"losses/policy": likelihood.detach(), "charts/kl_mean": kl_mean.detach(),
               "charts/kl_std": kl_std.detach(), "charts/multiplier_mean": multiplier_mean.detach(),
               "charts/multiplier_std": multiplier_std.detach()}
    return policy_loss + multiplier_loss, metrics


def project_duals(*duals: nn.Parameter, minimum: float = 1e-3) -> None:
    """Keep temperature and multipliers positive after each Adam step: x = max(x, 0.001)."""
    with torch.no_grad():
        for dual in duals:
            dual.clamp_(min=minimum)
# --- end shared block ---


class Agent(nn.Module):
    """Online MPO: policy, critic, their targets, temperature and trust-region multipliers."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args):
        super().__init__()
        self.policy = GaussianPolicy(obs_dim, act_dim, args.policy_layers, 1, args.shared_layers)
        self.critic = Critic(obs_dim, act_dim, args.critic_layers, 1, args.shared_layers)
        self.target_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.temperature = nn.Parameter(torch.tensor(args.initial_temperature))
        self.multiplier_mean = nn.Parameter(torch.tensor(args.initial_multiplier))
        self.multiplier_std = nn.Parameter(torch.tensor(args.initial_multiplier))

    def update_targets(self) -> None:
        self.target_policy.load_state_dict(self.policy.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())

    def duals(self) -> list[nn.Parameter]:
        return [self.temperature, self.multiplier_mean, self.multiplier_std]


class Replay:
    """Ring buffer of the run's transitions; batches come out as [1, B, ...] (one task)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        self.arrays = {
            "observation": np.zeros((capacity, obs_dim), np.float32),
            "action": np.zeros((capacity, act_dim), np.float32),
            "reward": np.zeros(capacity, np.float32),
            "discount": np.zeros(capacity, np.float32),
            "next_observation": np.zeros((capacity, obs_dim), np.float32),
        }
        self.capacity, self.size, self.cursor = capacity, 0, 0

    def add(self, episode: dict) -> None:
        rows = (self.cursor + np.arange(len(episode["action"]))) % self.capacity
        for key, array in self.arrays.items():
            array[rows] = episode[key].reshape(len(rows), *array.shape[1:])
        self.cursor = int(rows[-1] + 1) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict:
        index = rng.integers(0, self.size, size=(1, batch_size))
        return {key: array[index] for key, array in self.arrays.items()}


def update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict, args: Args,
           generator: torch.Generator, low: torch.Tensor, high: torch.Tensor) -> dict:
    """One online MPO step: TD(0) critic (Eq. 1), E-step on samples of the target policy
    (Eq. 7, 9), weighted maximum likelihood under the decoupled trust region (Eq. 10)."""
    observation, batch_size = batch["observation"], batch["observation"].shape[1]
    with torch.no_grad():
        states = torch.cat([batch["next_observation"], observation], dim=1)  # [1, 2B, obs]
        target_mean, target_std = agent.target_policy(states)
        actions = sample_actions(target_mean, target_std, args.num_action_samples, generator)
        q = q_values(agent.target_critic, states, actions, low, high)  # [M, 1, 2B]
    loss, metrics = critic_loss(agent.critic(observation, batch["action"].clamp(low, high)),
                                batch["reward"], batch["discount"], q[:, :, :batch_size].mean(0), args.discount)
    e_step_q, e_step_actions = q[:, :, batch_size:], actions[:, :, batch_size:]
    temperature_loss, info = temperature_dual_loss(e_step_q, agent.temperature, args.epsilon)
    metrics.update(info)
    weights = e_step_weights(e_step_q, agent.temperature.detach())
    mean, std = agent.policy(observation)
    policy_loss, info = weighted_mle_loss(e_step_actions, weights, mean, std, target_mean[:, batch_size:],
                                          target_std[:, batch_size:], agent.multiplier_mean,
                                          agent.multiplier_std, args.epsilon_mean, args.epsilon_stddev)
    metrics.update(info)
    loss = loss + temperature_loss + policy_loss
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss in online MPO")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for net in (agent.policy, agent.critic):
        nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
    optimizer.step()
    project_duals(*agent.duals())
    return metrics


def write_atomically(path: Path, write: Callable) -> None:
    """write(handle) into path.tmp, then renamed onto `path`, so a crash keeps the previous file whole; a failed write
    (a full disk, a quota) removes path.tmp and is one sentence: what was finished is kept, and a rerun continues."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror} ({shutil.disk_usage(path.parent).free / 2**20:,.1f} "
                        "MiB free on its disk); what was finished is kept: make room and rerun the command to "
                        "continue") from None


def episode_files(parts: Path, seed: Optional[int] = None) -> list[Path]:
    pattern = f"run{seed:03d}_episode*.npz" if seed is not None else "run*_episode*.npz"
    return sorted(parts.glob(pattern))


def run_episode(env: gym.Env, agent: Agent, seed: int, generator: torch.Generator, device: torch.device) -> dict:
    """One episode with actions sampled from the current policy; the stored actions are the
    unclipped samples (the env clips them)."""
    observation, _ = env.reset(seed=seed)
    rows = {key: [] for key in ("observation", "action", "reward", "discount", "next_observation")}
    done = False
    while not done:
        with torch.no_grad():
            obs = torch.as_tensor(observation, device=device).reshape(1, 1, -1)
            action = sample_actions(*agent.policy(obs), 1, generator)[0, 0, 0].cpu().numpy()
        next_observation, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (observation, action, reward, 0.0 if terminated else 1.0, next_observation)):
            rows[key].append(value)
        observation, done = next_observation, terminated or truncated
    episode = {key: np.asarray(value, dtype=np.float32) for key, value in rows.items()}
    episode["reward"] = episode["reward"][:, None]  # [T, K=1]
    episode["step"] = np.arange(len(episode["action"]), dtype=np.int64)
    return episode


def collect_seed(args: Args, seed: int, parts: Path, device: torch.device) -> None:
    """One online MPO run; resumes from its last finished episode when its files exist."""
    env = make_env(args.env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low = torch.as_tensor(env.action_space.low, device=device)
    high = torch.as_tensor(env.action_space.high, device=device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    agent = Agent(obs_dim, act_dim, args).to(device)
    optimizer = torch.optim.Adam([
        {"params": [*agent.policy.parameters(), *agent.critic.parameters()], "lr": args.learning_rate},
        {"params": agent.duals(), "lr": args.dual_learning_rate}])
    replay = Replay(obs_dim, act_dim, args.replay_size)
    learner_file = parts / f"run{seed:03d}_learner.pt"
    done_files = episode_files(parts, seed)
    updates, env_steps = 0, 0
    if done_files and not learner_file.exists():  # killed between its first episode and first checkpoint
        done_files = []  # all redone from the seed: the same episodes, written again
    if done_files:
        state = load_checkpoint(learner_file, device, {"agent": agent, "optimizer": optimizer}, rng, generator)
        updates, env_steps = state["updates"], state["env_steps"]
        done_files = done_files[: state["episodes"]]  # an episode written after the last checkpoint is redone
        for file in done_files:
            with np.load(file, allow_pickle=False) as episode:
                replay.add({key: episode[key] for key in episode.files})
    first = len(done_files)
    progress = tqdm(range(first, args.episodes), initial=first, total=args.episodes,
                    desc=f"collect {args.env} seed {seed}", disable=None, dynamic_ncols=True)
    started = time.time()
    for index in progress:
        episode = run_episode(env, agent, int(rng.integers(2**31)), generator, device)
        replay.add(episode)
        length = len(episode["action"])
        # Updates owed for the steps of this episode (done between episodes: same count, simpler).
        owed = (env_steps + length) // args.steps_per_update - env_steps // args.steps_per_update
        env_steps += length
        if replay.size >= args.warmup_steps:
            for _ in range(owed):
                batch = to_torch(replay.sample(args.batch_size, rng), device)
                try:
                    update(agent, optimizer, batch, args, generator, low, high)
                except FloatingPointError as error:
                    raise UserError(f"{error} (seed {seed}, episode {index}); episodes written so far are kept") from None
                updates += 1
                if updates % args.target_update_period == 0:
                    agent.update_targets()
        arrays = {**episode, "run_id": np.int64(seed)}
        write_atomically(parts / f"run{seed:03d}_episode{index:06d}.npz", lambda handle: np.savez(handle, **arrays))
        save_checkpoint(learner_file, {"agent": agent, "optimizer": optimizer}, rng, generator,
                        updates=updates, env_steps=env_steps, episodes=index + 1)
        progress.set_postfix(episode_return=f"{episode['reward'].sum():.1f}", updates=updates)
        if progress.disable:  # no terminal (a log file, the main job's pipe): a line per episode instead of the bar
            left = (time.time() - started) / (index + 1 - first) * (args.episodes - index - 1)
            print(f"collect {args.env} seed {seed}: episode {index + 1} of {args.episodes}, return "
                  f"{episode['reward'].sum():.1f}, {updates:,} updates, about {left / 60:.0f} min left", flush=True)


def read_parts(files: list) -> list[dict]:
    """The arrays of each finished episode (or Sawyer block) file, in order."""
    parts = []
    for file in files:
        with np.load(file, allow_pickle=False) as archive:
            parts.append({key: archive[key] for key in archive.files})
    return parts


def consolidate(parts: Path, output: Path, args: Args, task: str) -> dict:
    """Concatenate every finished episode into the dataset file, written atomically."""
    files = episode_files(parts)
    if not files:
        raise UserError(f"no finished episode in {parts}; nothing to write")
    episodes = read_parts(files)
    lengths = [len(e["action"]) for e in episodes]
    arrays = {key: np.concatenate([e[key] for e in episodes]) for key in
              ("observation", "action", "reward", "discount", "next_observation", "step")}
    arrays["episode_id"] = np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)
    arrays["run_id"] = np.repeat(np.array([int(e["run_id"]) for e in episodes], dtype=np.int64), lengths)
    env = make_env(args.env)
    metadata = {
        "env": args.env,
        "tasks": [task],
        "observation_dim": int(arrays["observation"].shape[1]),
        "action_dim": int(arrays["action"].shape[1]),
        "action_low": env.action_space.low.tolist(),
        "action_high": env.action_space.high.tolist(),
        "transitions": int(sum(lengths)),
        "collection": {"method": "online MPO, every transition stored (paper Section 5.1)",
                       "seeds": sorted({int(e["run_id"]) for e in episodes}), "args": asdict(args)},
        "episode_returns": {task: [float(e["reward"].sum()) for e in episodes]},
    }
    arrays["metadata"] = np.array(json.dumps(metadata))
    write_atomically(output, lambda handle: np.savez(handle, **arrays))
    return metadata


SAWYER_EPISODES = 500  # default budget for --env sawyer: 100k transitions, 4-6 minutes on 2 shared CPU cores
SAWYER_ARRAYS = ("observation", "action", "reward", "discount", "next_observation", "step", "task_id")


def sawyer_block_files(parts: Path, seed: Optional[int] = None) -> list[Path]:
    pattern = f"run{seed:03d}_block*.npz" if seed is not None else "run*_block*.npz"
    return sorted(parts.glob(pattern))


def collect_sawyer_block(seed: int, block: int, count: int, noise: float) -> dict:
    """`count` episodes of the Section 5.2 protocol (SawyerEnv("random"): a task drawn from the seven
    per episode) from one seeded reset, so the block's robot pose is fresh and the block can be redone
    exactly. Rewards are those of the seven executed tasks, of s_{t+1}; actions in physical units."""
    env = sawyer_env.SawyerEnv("random")
    rng = np.random.default_rng([seed, block])
    episodes = []
    for index in range(count):
        reset_seed = int(rng.integers(2**31)) if index == 0 else None  # later resets continue the protocol
        episode = sawyer_env.collect_episode(env, None, rng, noise, seed=reset_seed)
        length = len(episode["action"])
        episode["reward"] = episode["reward"][:, : len(sawyer_env.TASKS)]  # [T, 7]
        episode["step"] = np.arange(length, dtype=np.int64)
        episode["task_id"] = np.full(length, episode["task_index"], dtype=np.int64)
        episodes.append(episode)
    arrays = {key: np.concatenate([e[key] for e in episodes]) for key in SAWYER_ARRAYS}
    arrays["episode_length"] = np.array([len(e["action"]) for e in episodes], dtype=np.int64)
    return arrays


def collect_sawyer(args: Args, seed: int, parts: Path) -> None:
    """One scripted-policy run of `args.episodes` episodes in blocks of ROBOT_RESET_PERIOD, each block
    written atomically; finished blocks are kept, a block holding fewer episodes than wanted is redone."""
    period = sawyer_env.ROBOT_RESET_PERIOD
    blocks = math.ceil(args.episodes / period)
    progress = tqdm(total=args.episodes, desc=f"collect sawyer seed {seed}", disable=None, dynamic_ncols=True)
    for block in range(blocks):
        count = min(period, args.episodes - block * period)
        file = parts / f"run{seed:03d}_block{block:05d}.npz"
        if file.exists():
            with np.load(file, allow_pickle=False) as archive:
                if float(archive["noise"]) != args.noise:
                    raise UserError(f"{file} was collected with --noise {float(archive['noise'])}; rerun with that "
                                    f"noise or write to another --output")
                if len(archive["episode_length"]) >= count:
                    progress.update(count)
                    continue
        arrays = {**collect_sawyer_block(seed, block, count, args.noise), "run_id": np.int64(seed),
                  "noise": np.float64(args.noise)}
        write_atomically(file, lambda handle: np.savez(handle, **arrays))
        progress.update(count)
        if progress.disable:  # no terminal: a line per block of episodes instead of the bar
            print(f"collect sawyer seed {seed}: {min((block + 1) * period, args.episodes)} of {args.episodes} "
                  f"episodes", flush=True)
    progress.close()


def success_rates(episode_task: np.ndarray, success: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                  tasks: list) -> dict:
    """Per task, over the episodes its scripted policy ran: the fraction that ended in success
    (last step, as benchmarks/sawyer_speed.py) and the fraction that reached it at any step."""
    last = success[starts + lengths - 1]  # [episodes, 9]
    ever = np.logical_or.reduceat(success, starts, axis=0)
    rates = {}
    for k, task in enumerate(tasks):
        mine = episode_task == k
        rates[task] = {"episodes": int(mine.sum()),
                       "success_at_end": float(last[mine, k].mean()) if mine.any() else None,
                       "success_at_any_step": float(ever[mine, k].mean()) if mine.any() else None}
    return rates


def consolidate_sawyer(parts: Path, output: Path, args: Args) -> dict:
    """Concatenate every finished block (seed by seed, block by block) into the dataset file."""
    files = sawyer_block_files(parts)
    if not files:
        raise UserError(f"no finished block in {parts}; nothing to write")
    blocks = read_parts(files)
    arrays = {key: np.concatenate([b[key] for b in blocks]) for key in SAWYER_ARRAYS}
    lengths = np.concatenate([b["episode_length"] for b in blocks])
    arrays["episode_id"] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    arrays["run_id"] = np.repeat(np.concatenate([np.full(len(b["episode_length"]), int(b["run_id"]))
                                                 for b in blocks]), lengths).astype(np.int64)
    tasks = list(sawyer_env.TASKS)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    episode_task = arrays["task_id"][starts]
    returns = np.add.reduceat(arrays["reward"].astype(np.float64), starts, axis=0)  # [episodes, 7]
    success = sawyer_env.compute_success(arrays["next_observation"])[:, : len(tasks)]
    metadata = {
        "env": "sawyer",
        "tasks": tasks,
        "observation_dim": int(arrays["observation"].shape[1]),
        "action_dim": int(arrays["action"].shape[1]),
        "action_low": sawyer_env.ACTION_LOW.tolist(),
        "action_high": sawyer_env.ACTION_HIGH.tolist(),
        "action_units": "physical: vx, vy, vz [m/s], wrist rate [rad/s], finger rate [gripper units/s]",
        "transitions": int(lengths.sum()),
        "collection": {"method": "sawyer_env scripted behaviour policies with Gaussian action noise, a random "
                                 "task per episode, robot pose re-randomised every 20 episodes (paper Section 5.2)",
                       "noise": args.noise, "seeds": sorted({int(b["run_id"]) for b in blocks}),
                       "args": asdict(args)},
        "sawyer": sawyer_env.env_spec(),
        "episode_tasks": [tasks[k] for k in episode_task],
        "episode_returns": {task: returns[:, k].tolist() for k, task in enumerate(tasks)},
        "success_rates": success_rates(episode_task, success, starts, lengths, tasks),
    }
    arrays["metadata"] = np.array(json.dumps(metadata))
    write_atomically(output, lambda handle: np.savez(handle, **arrays))
    return metadata


def train(args: Args) -> Path:
    """Collect every seed, then write the consolidated dataset; returns its path."""
    check_flags(args)  # every number in range
    device = pick_device(args.device)
    make_env(args.env)  # validates --env before anything is written
    output = Path(args.output) if args.output else default_dataset(args.env)
    parts = output.with_suffix(".episodes")
    new = not parts.exists()
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {parts} ({error.strerror})") from None
    with one_writer(parts):
        try:
            check_rerun(args, output, parts)
        except UserError:
            if new and not any(parts.iterdir()):
                parts.rmdir()  # refused before anything was written: leave no folder behind
            raise
        return collect_all(args, output, parts, device)


# Flags a rerun may change: more episodes or seeds append; the device runs the same updates elsewhere. A Sawyer
# collection has no learner: only its env and noise shape its data (a Control Suite one: every other flag but noise).
RERUN_MAY_CHANGE = {"output", "overwrite", "seeds", "episodes", "device"}
SAWYER_DATA_FLAGS = {"env", "noise"}


def check_rerun(args: Args, output: Path, parts: Path) -> None:
    """A rerun continues the collection in `parts`, then rewrites `output` from it. Refused in one sentence: other
    flags than those the collection started with (`parts/collection.json`; for a folder from before it, the flags in
    the dataset's metadata), which would mix two collections under the last one's name; and an existing `output`
    holding more episodes than `parts` (another dataset, or one whose episode folder was deleted), which the rewrite
    would lose, unless --overwrite. Records the flags of a new collection."""
    flags = {key: value for key, value in json.loads(json.dumps(asdict(args))).items()
             if (key in SAWYER_DATA_FLAGS if args.env == "sawyer" else key not in RERUN_MAY_CHANGE | {"noise"})}
    record = parts / "collection.json"
    held, metadata = dataset_episodes(output)
    finished = finished_episodes(parts)
    if finished and record.exists():
        started = json.loads(record.read_text())
    elif finished:
        started = metadata.get("collection", {}).get("args", {})
    else:
        started = {}  # nothing collected yet: a new collection, whatever an earlier start recorded
    changed = [key for key in flags if key in started and started[key] != flags[key]]
    if changed:
        was = ", ".join(f"--{key.replace('_', '-')} {shown_flag(started[key])}" for key in changed)
        raise UserError(f"{parts} holds a collection made with {was}; rerun with the flags it started with to continue "
                        f"it (only --episodes, --seeds and --device may change), or write to another --output")
    if held is not None and (held < 0 or held > finished) and not args.overwrite:
        what = (f"holds {held} episodes and {parts} only {finished}: rewriting it from them would lose {held - finished}"
                if held >= 0 else "exists and is not a dataset of this project: this collection would replace it")
        raise UserError(f"{output} {what}; write to another --output, or pass --overwrite to replace it")
    if not finished:
        write_atomically(record, lambda handle: handle.write(json.dumps(flags, indent=1).encode()))


def shown_flag(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def dataset_episodes(output: Path) -> tuple[Optional[int], dict]:
    """The episode count and metadata ({} without one) of the dataset file at `output`: None when there is none, -1
    when the file is not a dataset of this project."""
    if not output.exists():
        return None, {}
    try:
        with np.load(output, allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"])) if "metadata" in archive.files else {}
            return len(np.unique(archive["episode_id"])), metadata
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return -1, {}


def finished_episodes(parts: Path) -> int:
    """Episodes written to `parts` so far: one per episode file, those of every Sawyer block."""
    blocks = 0
    for file in sawyer_block_files(parts):
        with np.load(file, allow_pickle=False) as archive:
            blocks += len(archive["episode_length"])
    return len(episode_files(parts)) + blocks


@contextlib.contextmanager
def one_writer(parts: Path):
    """One collect.py at a time writes a dataset (flock on its episode folder): another one, such as the default
    data of five seeds of a learning script started at once, waits, then continues from what the first wrote, so
    nothing is collected twice and no file is written by two processes."""
    handle = os.open(parts, os.O_RDONLY)
    try:
        if os.name == "posix":
            import fcntl

            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"Another collect.py is writing {parts}: waiting for it to end, then continuing from what it "
                      "wrote.", flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: unguarded
                pass
        yield
    finally:
        os.close(handle)


def collect_all(args: Args, output: Path, parts: Path, device: torch.device) -> Path:
    """Every seed's episodes (continuing from those already in `parts`), then the consolidated dataset."""
    start = time.time()
    if args.env == "sawyer":
        try:
            for seed in args.seeds:
                collect_sawyer(args, seed, parts)
        except KeyboardInterrupt:
            if sawyer_block_files(parts):
                consolidate_sawyer(parts, output, args)
                print(f"\nInterrupted: finished blocks written to {output}; rerun the command to continue.")
            raise SystemExit(130) from None
        metadata = consolidate_sawyer(parts, output, args)
        rates = ", ".join(f"{task} {rate['success_at_end']:.2f}" for task, rate in metadata["success_rates"].items()
                          if rate["success_at_end"] is not None)
        print(f"Wrote {output}: {len(metadata['episode_tasks'])} episodes, {metadata['transitions']} transitions, "
              f"success at the episode end per executed task: {rates}; {time.time() - start:.0f} s.")
        return output
    task = CONTROL_SUITE_ALIASES.get(args.env, args.env)
    try:
        for seed in args.seeds:
            collect_seed(args, seed, parts, device)
    except KeyboardInterrupt:
        if episode_files(parts):
            consolidate(parts, output, args, task)
            print(f"\nInterrupted: finished episodes written to {output}; rerun the command to continue.")
        raise SystemExit(130) from None
    metadata = consolidate(parts, output, args, task)
    returns = metadata["episode_returns"][task]
    print(f"Wrote {output}: {len(returns)} episodes, {metadata['transitions']} transitions, returns first/last/best {returns[0]:.1f}/{returns[-1]:.1f}/{max(returns):.1f}, "
          f"{time.time() - start:.0f} s.")
    return output


if __name__ == "__main__":
    main(train, tyro.cli(Args))
