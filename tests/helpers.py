"""Helpers the tests import (`from tests.helpers import ...`): the repository root, the smoke env and a
writer of small random datasets. conftest.py holds only pytest's fixtures and session settings."""

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOKE_ENV = "cartpole-balance"  # Control Suite, obs 5, action 1; 1000-step episodes

# The device of the end-to-end, resume, export and mechanism tests: `ABM_TEST_DEVICE=cuda python -m pytest tests`
# runs them on the GPU (the dataset then lives on it, batches are drawn there and updates are compiled as a
# real run's would be with --compile auto on CUDA). Unset: cpu.
TEST_DEVICE = os.environ.get("ABM_TEST_DEVICE", "cpu")


def write_random_dataset(path: Path, obs_dim: int = 5, act_dim: int = 1, episodes: int = 6,
                         length: int = 40, seed: int = 0, tasks=("balance",)) -> Path:
    """A small valid dataset of random numbers in the README format (episodes back to back)."""
    rng = np.random.default_rng(seed)
    size = episodes * length
    observation = rng.standard_normal((size, obs_dim)).astype(np.float32)
    arrays = {
        "observation": observation,
        "action": rng.uniform(-1, 1, (size, act_dim)).astype(np.float32),
        "reward": rng.uniform(0, 1, (size, len(tasks))).astype(np.float32),
        "discount": np.ones(size, np.float32),
        "next_observation": np.roll(observation, -1, axis=0),
        "episode_id": np.repeat(np.arange(episodes), length).astype(np.int64),
        "step": np.tile(np.arange(length), episodes).astype(np.int64),
        "run_id": np.repeat(np.arange(episodes) % 2, length).astype(np.int64),
        "metadata": np.array(json.dumps({"env": SMOKE_ENV, "tasks": list(tasks)})),
    }
    np.savez(path, **arrays)
    return path


def tensors(data: dict, columns: list, device: str = "cpu") -> dict:
    """load_dataset's arrays as the tensors load_data gives the samplers (the reward columns `columns`)."""
    import torch

    out = {key: torch.as_tensor(np.asarray(data[key], np.float32), device=device)
           for key in ("observation", "action", "discount", "next_observation")}
    out["reward"] = torch.as_tensor(np.asarray(data["reward"][:, columns], np.float32), device=device)
    return {**out, "episode_last": torch.as_tensor(data["episode_last"], device=device)}


def box_env(obs_dim: int = 5, act_dim: int = 1):
    """An env with nothing but its spaces, for load_data (observation and action sizes, action bounds)."""
    import gymnasium as gym

    env = gym.Env()
    env.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    env.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
    return env


def gaussian_samples(mean, std, num_samples: int, generator):
    """M samples a = mean + std * noise, as the updates draw them: [K, B, act] -> [M, K, B, act]."""
    import torch

    return mean + std * torch.randn((num_samples, *mean.shape), generator=generator, device=mean.device)
