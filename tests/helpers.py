"""Helpers the tests import (`from tests.helpers import ...`): the repository root, the smoke env and a
writer of small random datasets. conftest.py holds only pytest's fixtures and session settings."""

import contextlib
import json
import os
import subprocess
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
# Their --compile: `auto` (compiled on CUDA, as a real run); benchmarks/gpu_session.py sets ABM_TEST_COMPILE=off so that
# its test stage fits its budget (each run would compile for tens of seconds), and covers compiling on CUDA in
# tests/test_cuda_graph.py and its speed stages.
TEST_COMPILE = os.environ.get("ABM_TEST_COMPILE", "auto")


def write_random_dataset(path: Path, obs_dim: int = 5, act_dim: int = 1, episodes: int = 6,
                         length: int = 40, seed: int = 0, tasks=("balance",), env: str = SMOKE_ENV) -> Path:
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
        "metadata": np.array(json.dumps({"env": env, "tasks": list(tasks)})),
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


class EmulatedCuda:
    """A stand-in for `torch.cuda` in `record_updates(..., cuda=...)` that records a step the way a CUDA graph does,
    on the CPU: while "capturing", every aten op the step dispatches is run and kept with its argument and output
    tensors; a replay runs those ops again on the same tensors, in order, and copies each result into the recorded
    output, and none of the step's Python. So a step that only works by running its Python each update (a Python
    counter, a value read off a tensor) replays wrong here as it would on a GPU, and a host sync (`.item()`,
    `float(tensor)`) fails the recording as CUDA's stream capture does. Random ops draw again from their generator
    at each replay (as a registered generator advances on CUDA), so a replayed run equals the eager one bit for bit.
    Unlike CUDA, the recording itself runs the step (it is the update the first replay would do, which is skipped).
    Counts `captures`, `replays` and the `generators` registered; `fail_on_capture` raises inside the recording."""

    def __init__(self, fail_on_capture: bool = False):
        import contextlib

        self.captures, self.replays, self.generators, self.fail_on_capture = 0, 0, [], fail_on_capture
        self.capturing = False
        outer = self

        class Stream:
            def wait_stream(self, other):
                pass

        class CUDAGraph:
            def __init__(self):
                self.ops, self.recorded_run_pending = [], True

            def register_generator_state(self, generator):
                outer.generators.append(generator)

            def replay(self):  # the first replay after the recording is the recording's own run, here on the CPU
                outer.replays += 1
                if self.recorded_run_pending:
                    self.recorded_run_pending = False
                else:
                    replay_ops(self.ops)

        @contextlib.contextmanager
        def graph(cuda_graph):
            outer.captures += 1
            outer.capturing = True
            try:
                with OpRecorder(cuda_graph.ops):
                    if outer.fail_on_capture:
                        raise RuntimeError("operation not permitted when stream is capturing")
                    yield
            finally:
                outer.capturing = False

        self.Stream, self.CUDAGraph, self.graph = Stream, CUDAGraph, graph
        self.stream = lambda stream: contextlib.nullcontext()
        self.current_stream = Stream


def _op_recorder_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class OpRecorder(_op_recorder_base()):
    """Runs and keeps (op, args, kwargs, output) of every aten op; a host sync raises, as under stream capture."""

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise RuntimeError(f"{func}: a host sync (.item(), float(), bool() of a tensor) while capturing a graph")
        output = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, output))
        return output


def replay_ops(ops: list) -> None:
    """Runs the recorded ops again on their tensors: an op that mutates its arguments (in place, `out=`) mutates
    them again; a view op is skipped (its output aliases a recorded tensor, already current); any other op's
    result is copied into the output recorded for it, where later ops read it."""
    import torch
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        for func, args, kwargs, output in ops:
            returns = func._schema.returns
            if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
                continue  # a view
            result = func(*args, **kwargs)
            for old, new in zip(tree_flatten(output)[0], tree_flatten(result)[0]):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)


@contextlib.contextmanager
def held_by_another_process(folder: Path):
    """Inside the block another process holds `folder`'s lock (flock), as a running run, collection or grid holds
    its folder; it lets go when the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; handle = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(handle, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate("")
