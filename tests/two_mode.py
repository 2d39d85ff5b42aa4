"""A one-step task whose logged data holds two action modes: the paper's central case in miniature.

Every episode is one step: observe s ~ U[-1, 1]^2, act a in [-1, 1], get r = exp(-((a - 0.5) / 0.2)^2)
and the episode terminates. The good mode is a = +0.5 (r = 1), the bad mode a = -0.5 (r ~ 0).
`make_two_mode_dataset` logs, for the same states, half good and half bad actions: a behaviour
model fits the average of both (mean near 0, r ~ 0.002), an advantage-weighted one the good mode.
"""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np

GOOD_ACTION, BAD_ACTION, REWARD_WIDTH = 0.5, -0.5, 0.2


def reward(action: np.ndarray) -> np.ndarray:
    return np.exp(-(((np.asarray(action)[..., 0] - GOOD_ACTION) / REWARD_WIDTH) ** 2))


class TwoModeEnv(gym.Env):
    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._state = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self._state.copy(), {}

    def step(self, action):
        return self._state.copy(), float(reward(np.clip(action, -1, 1))), True, False, {}


gym.register("TwoMode-v0", entry_point=TwoModeEnv)
ENV_ID = "tests.two_mode:TwoMode-v0"


def make_two_mode_dataset(path: Path, episodes: int = 4000, noise: float = 0.05, seed: int = 0) -> Path:
    """One-step episodes; each state is logged twice, once with a good and once with a bad action."""
    rng = np.random.default_rng(seed)
    states = rng.uniform(-1, 1, (episodes // 2, 2)).astype(np.float32)
    observation = np.repeat(states, 2, axis=0)
    modes = np.tile([GOOD_ACTION, BAD_ACTION], episodes // 2)
    action = (modes + noise * rng.standard_normal(len(modes)))[:, None].astype(np.float32)
    arrays = {
        "observation": observation,
        "action": action,
        "reward": reward(action)[:, None].astype(np.float32),
        "discount": np.zeros(len(action), np.float32),  # every episode terminates after one step
        "next_observation": observation.copy(),
        "episode_id": np.arange(len(action), dtype=np.int64),
        "step": np.zeros(len(action), np.int64),
        "metadata": np.array(json.dumps({"env": ENV_ID, "tasks": ["two_mode"]})),
    }
    np.savez(path, **arrays)
    return path
