"""minari_io.py: Minari datasets in and out (Minari is Farama's offline-RL format, the successor of D4RL).

`import`: a Minari dataset -> the .npz format of the README ("Datasets"). The learning scripts run it themselves, as
a subprocess, for `--dataset minari:<id>` or a Minari dataset directory, so that only this file imports minari. Each
episode's observations s_0..s_T become `observation` s_0..s_{T-1} and `next_observation` s_1..s_T, `terminations`
give discount 0 (`truncations` are time limits, the discount stays 1), rewards [T] become [T, 1] (multi-task [T, K]
stay), episodes stay in their stored order (Eq. 4's snippets), `infos` `episode_id`, `step`, `run_id`, `task_id` are
kept. The metadata says what a learning script needs: `env` (our alias for a dataset this file exported, else the
gymnasium id of the stored eval/env spec, with `env_spec`, its JSON, so evaluation uses the stored kwargs and time
limit), `reference_scores` [ref_min_score, ref_max_score] where the dataset has them, `action_low`/`action_high`,
and `source`, the data files' sizes and modification times: an output made from an unchanged source is kept, one made
from another source is made again, and any other file at --output (a dataset of the user's own) only with --overwrite.

`export`: a dataset of ours (collect.py's Control Suite or Sawyer data) -> a Minari dataset in the Minari root, every
array kept (`import` gives it back identically) and the .npz metadata whole as the entry `abm_metadata`. Minari
stores the env as a gymnasium EnvSpec with a string entry point: Control Suite tasks as
`ControlSuite/<domain>-<task>-v0` made by `minari_io:ControlSuiteEnv`, the Sawyer as `Sawyer/multitask-v0` made by
`sawyer_env:SawyerEnv` (physical action units, as in the data), so `recover_environment()` works where this
repository is importable. Reference scores: --ref-min-score/--ref-max-score, by default for Control Suite and Sawyer
data the bounds of the episode return, 0 and the episode length (rewards are in [0, 1] per step).

  python minari_io.py export --dataset datasets/sawyer.npz --dataset-id abm/sawyer/scripted-v0
  python minari_io.py import minari:abm/sawyer/scripted-v0 --output datasets/minari/abm/sawyer/scripted-v0.npz
"""

import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional, Union

import gymnasium as gym
import numpy as np
import torch
import tyro

import sawyer_env


@dataclass
class Import:
    """Convert a Minari dataset to the .npz format of the learning scripts."""

    source: tyro.conf.Positional[str]
    """`minari:<dataset_id>` (in MINARI_DATASETS_PATH, default ~/.minari/datasets) or a Minari dataset directory"""
    output: Optional[str] = None
    """the .npz to write; default datasets/minari/<id>.npz; kept when it was made from the unchanged source"""
    env: Optional[str] = None
    """check that this env (a learning script's --env) fits the dataset's observation and action spaces"""
    overwrite: bool = False
    """replace an --output file that is not a conversion of a Minari dataset (refused without this flag)"""


@dataclass
class Export:
    """Write a dataset of this project as a Minari dataset in the Minari root."""

    dataset: str
    """the dataset to write, in this project's format (.npz or a directory of .npy files)"""
    dataset_id: str
    """the Minari id to write it under, `(namespace/)name-v<version>`, e.g. `abm/sawyer/scripted-v0`"""
    ref_min_score: Optional[float] = None
    """return of the normalised score's 0 (default: 0 for Control Suite and Sawyer data, else none)"""
    ref_max_score: Optional[float] = None
    """return of the normalised score's 100 (default: the episode length for Control Suite and Sawyer data)"""
    author: Optional[str] = None
    """author name stored in the Minari metadata"""
    author_email: Optional[str] = None
    """author contact stored in the Minari metadata"""
    code_permalink: Optional[str] = None
    """link to the code (e.g. a commit of this repository) that made the data"""


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



MINARI_INFOS = ("episode_id", "step", "run_id", "task_id")  # per-step arrays of ours that Minari keeps in `infos`
FLOAT_ARRAYS = ("observation", "next_observation", "action", "reward", "discount")


def minari_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def minari_data_dir(source: str) -> Path:
    """The directory holding a Minari dataset's metadata.json and data: `minari:<id>` looked up in the Minari root,
    or a dataset directory (`<root>/<id>`) or its `data` directory."""
    if source.startswith("minari:"):
        dataset_id = source.removeprefix("minari:")
        path = minari_root() / dataset_id
        if not dataset_id or not (path / "data" / "metadata.json").exists():
            raise UserError(f"Minari dataset {dataset_id!r} is not in {minari_root()} (MINARI_DATASETS_PATH); "
                            f"download it first with `minari download {dataset_id}`")
    else:
        path = Path(source)
    path = path / "data" if (path / "data" / "metadata.json").is_file() else path
    try:
        metadata = json.loads((path / "metadata.json").read_text())
        assert isinstance(metadata, dict) and "minari_version" in metadata
    except (OSError, ValueError, AssertionError):
        raise UserError(f"{source} is neither a Minari dataset (no data/metadata.json of Minari) "
                        f"nor a directory of .npy files") from None
    if metadata.get("data_format", "hdf5") != "hdf5":
        raise UserError(f"Minari dataset {source} is stored as {metadata['data_format']}; only HDF5 datasets "
                        f"(minari[hdf5], the format `minari download` gives) are read")
    return path


def stored_env_spec(metadata: dict) -> Optional[gym.envs.registration.EnvSpec]:
    """The env a Minari dataset stores for evaluation (eval_env_spec, else env_spec), as a gymnasium EnvSpec."""
    text = metadata.get("eval_env_spec") or metadata.get("env_spec")
    if not text:
        return None
    for old in ('"order_enforce": true,', '"apply_api_compatibility": false,', '"autoreset": false, '):
        text = text.replace(old, "")  # fields of older gymnasium specs, dropped as minari itself does
    return gym.envs.registration.EnvSpec.from_json(text)


def per_step(value, length: int) -> np.ndarray:
    """A per-step info of an episode of `length` transitions: Minari's DataCollector keeps length + 1 (one per
    observation, the reset's first); entry t belongs to the transition from s_t."""
    value = np.asarray(value)
    if len(value) not in (length, length + 1):
        raise ValueError(f"an info of {len(value)} entries in an episode of {length} steps")
    return value[:length]


def source_signature(data_dir: Path) -> dict:
    """What tells a changed source: the data directory and each file's size and modification time."""
    files = sorted(path for path in data_dir.rglob("*") if path.is_file())
    return {"path": str(data_dir.resolve()),
            "files": {str(f.relative_to(data_dir)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def read_minari(source: str, data_dir: Path) -> tuple[dict, dict]:
    """A Minari dataset as the .npz arrays and metadata (see the module docstring)."""
    import minari

    try:
        dataset = minari.MinariDataset(data_dir)
        for name, space in (("observation", dataset.observation_space), ("action", dataset.action_space)):
            if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
                raise UserError(f"Minari dataset {source} has a {space} {name} space; the networks take "
                                f"flat vectors (a one-dimensional Box), not images or dictionaries")
        episodes = []
        for index, episode in enumerate(dataset.iterate_episodes()):
            length, observations = len(episode.rewards), np.asarray(episode.observations, np.float32)
            if len(observations) != length + 1:
                raise ValueError(f"episode {episode.id} has {len(observations)} observations for {length} steps")
            infos = episode.infos or {}
            arrays = {"observation": observations[:-1], "next_observation": observations[1:],
                      "action": np.asarray(episode.actions, np.float32),
                      "reward": np.asarray(episode.rewards, np.float32).reshape(length, -1),
                      "discount": 1.0 - np.asarray(episode.terminations, np.float32),
                      "episode_id": np.full(length, index, np.int64), "step": np.arange(length, dtype=np.int64)}
            arrays.update({key: per_step(infos[key], length).astype(np.int64) for key in MINARI_INFOS if key in infos})
            episodes.append(arrays)
        if not episodes:
            raise ValueError("it holds no episodes")
        arrays = {key: np.concatenate([e[key] for e in episodes]) for key in episodes[0]}
        metadata = json.loads((data_dir / "metadata.json").read_text())
        spec = stored_env_spec(metadata)
    except UserError:
        raise
    except Exception as error:  # h5py, minari, gymnasium and numpy raise many types for a broken dataset
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"Minari dataset {source} cannot be read ({reason})") from None
    for key in FLOAT_ARRAYS:
        if not np.isfinite(arrays[key]).all():
            raise UserError(f"Minari dataset {source} has NaN or infinite values in its {key}s")
    ours = json.loads(metadata.get("abm_metadata", "{}"))  # the .npz metadata of a dataset `export` wrote
    references = [metadata.get("ref_min_score"), metadata.get("ref_max_score")]
    out = {"env": spec.id if spec else None, "env_spec": spec.to_json() if spec and not ours else None,
           "action_low": dataset.action_space.low.tolist(), "action_high": dataset.action_space.high.tolist(), **ours,
           "reference_scores": None if None in references or references[0] == references[1] else references,
           "minari": {"dataset_id": dataset.id, "source": source_signature(data_dir),
                      **{key: metadata[key] for key in ("algorithm_name", "author", "code_permalink") if key in metadata}}}
    return arrays, out


def check_env(metadata: dict, source: str, env_id: str) -> None:
    """--env must fit the dataset: its observation size, action size and action bounds (the env's own units)."""
    if metadata.get("env_spec") and env_id == metadata["env"]:  # the stored kwargs, as the learning scripts make it
        gym.registry[env_id] = gym.envs.registration.EnvSpec.from_json(metadata["env_spec"])
    env = make_env(env_id)
    low, high = env.unwrapped.action_space.low, env.unwrapped.action_space.high  # the env's (physical) bounds
    stored_low, stored_high = np.asarray(metadata["action_low"]), np.asarray(metadata["action_high"])
    fits = env.observation_space.shape == (metadata["obs_dim"],) and stored_low.shape == low.shape
    if not (fits and np.allclose(stored_low, low) and np.allclose(stored_high, high)):
        bounds = lambda low, high: f"{np.round(low, 4).tolist()}..{np.round(high, 4).tolist()}"  # noqa: E731
        raise UserError(f"Minari dataset {source} has observations of size {metadata['obs_dim']} and actions in "
                        f"{bounds(stored_low, stored_high)}, but env {env_id} has observations of shape "
                        f"{env.observation_space.shape} and actions in {bounds(low, high)}; its spaces do not fit the env")


def import_dataset(args: Import) -> Path:
    """Write args.source as .npz (unless args.output already holds it from the unchanged source); returns its path."""
    data_dir = minari_data_dir(args.source)
    output = Path(args.output or minari_npz(args.source) or minari_npz(str(data_dir)))
    metadata = None
    if output.exists():
        try:
            with np.load(output, allow_pickle=False) as archive:
                metadata = json.loads(str(archive["metadata"]))
            converted = "source" in metadata["minari"]
        except Exception:  # not a conversion of ours: perhaps data of the user's own, which nothing could make again
            converted = False
        if not converted and not args.overwrite:
            raise UserError(f"{output} exists and is not a conversion of a Minari dataset: writing to another --output "
                            "keeps it, --overwrite replaces it")
        if not converted or metadata["minari"]["source"] != source_signature(data_dir):
            metadata = None  # made again: from another source, or a source that changed since
    if metadata is None:
        print(f"Converting Minari dataset {args.source} to {output} (once; kept while the source is unchanged).",
              flush=True)
        arrays, metadata = read_minari(args.source, data_dir)
        metadata["obs_dim"] = arrays["observation"].shape[1]
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.with_name(f"{output.name}.{os.getpid()}.tmp.npz")
        np.savez(temporary, **arrays, metadata=np.array(json.dumps(metadata)))
        os.replace(temporary, output)  # atomic: runs converting the same dataset at once see whole files
    if args.env:
        check_env(metadata, args.source, args.env)
    elif not metadata.get("env"):
        raise UserError(f"Minari dataset {args.source} stores no environment; pass --env")
    return output


def minari_env_spec(env_id: str) -> gym.envs.registration.EnvSpec:
    """The gymnasium EnvSpec, with a string entry point, of the env a dataset of ours was collected in."""
    if env_id == "sawyer":
        return gym.envs.registration.EnvSpec("Sawyer/multitask-v0", "sawyer_env:SawyerEnv", kwargs={"task": "random"})
    env = make_env(env_id)
    if isinstance(env, ControlSuiteEnv):
        domain, _, task = CONTROL_SUITE_ALIASES.get(env_id, env_id).partition("-")
        return gym.envs.registration.EnvSpec(f"ControlSuite/{domain}-{task}-v0", "minari_io:ControlSuiteEnv",
                                             kwargs={"domain": domain, "task": task})
    if env.spec is None or not isinstance(env.spec.entry_point, str):
        raise UserError(f"env {env_id} has no string entry point, which Minari needs to store it")
    return env.spec


def episode_buffers(data: dict) -> list:
    """One Minari EpisodeBuffer per episode of the dataset arrays (see the module docstring)."""
    from minari.data_collector import EpisodeBuffer

    episode_id = np.asarray(data["episode_id"])
    starts = np.flatnonzero(np.r_[True, episode_id[1:] != episode_id[:-1]])
    buffers = []
    for index, (start, end) in enumerate(zip(starts, np.r_[starts[1:], len(episode_id)])):
        rows = slice(start, end)
        observation, next_observation = np.asarray(data["observation"][rows]), np.asarray(data["next_observation"][rows])
        if not np.array_equal(observation[1:], next_observation[:-1]):
            raise UserError(f"episode {episode_id[start]} of the dataset has a next_observation that is not the next "
                            f"step's observation; Minari stores one observation sequence per episode")
        reward = np.asarray(data["reward"][rows])
        terminated = np.asarray(data["discount"][rows]) == 0
        truncated = np.zeros_like(terminated)
        truncated[-1] = not terminated[-1]  # an episode that ends without terminating ends by a time limit
        infos = {key: np.r_[data[key][rows], data[key][end - 1]] for key in MINARI_INFOS if key in data}  # T + 1
        buffers.append(EpisodeBuffer(
            id=index, observations=np.concatenate([observation, next_observation[-1:]]),
            actions=np.asarray(data["action"][rows]), rewards=reward[:, 0] if reward.shape[1] == 1 else reward,
            terminations=terminated, truncations=truncated, infos=infos))
    return buffers


def export_dataset(args: Export) -> Path:
    """Write args.dataset as the Minari dataset args.dataset_id; returns its data directory."""
    import minari
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(args.dataset_id)
    except (ValueError, TypeError):  # TypeError: no version
        raise UserError(f"--dataset-id {args.dataset_id!r} is not a Minari id: (namespace/)name-v<version>") from None
    data = load_dataset(Path(args.dataset))
    metadata = data["metadata"]
    if not np.isin(data["discount"], (0.0, 1.0)).all():
        raise UserError(f"dataset {args.dataset} has discounts other than 0 and 1, which Minari's terminations cannot hold")
    env_id = metadata.get("env")
    if not env_id:
        raise UserError(f"dataset {args.dataset} names no env in its metadata ('env'), which Minari stores")
    spec = minari_env_spec(env_id)
    env = gym.make(spec)
    if data["observation"].shape[1:] != env.observation_space.shape or data["action"].shape[1:] != env.action_space.shape:
        raise UserError(f"dataset {args.dataset} has observation/action sizes {data['observation'].shape[1]}/"
                        f"{data['action'].shape[1]} but {spec.id} has {env.observation_space.shape}/{env.action_space.shape}")
    stored = [metadata.get("action_low"), metadata.get("action_high")]
    if None not in stored and not np.allclose(stored, [env.action_space.low, env.action_space.high]):
        raise UserError(f"dataset {args.dataset} has action bounds {stored} but {spec.id} takes "
                        f"{[env.action_space.low.tolist(), env.action_space.high.tolist()]}")
    ref_min, ref_max = args.ref_min_score, args.ref_max_score
    bounded = env_id == "sawyer" or spec.entry_point == "minari_io:ControlSuiteEnv"  # rewards in [0, 1] per step
    if ref_min is None and ref_max is None and bounded:
        ref_min, ref_max = 0.0, float(np.max(data["episode_last"] - np.arange(len(data["episode_last"])) + 1))
    if (ref_min is None) != (ref_max is None):
        raise UserError("give both --ref-min-score and --ref-max-score, or neither")
    collection = metadata.get("collection", {})
    requirements = [f"{name}=={importlib.metadata.version(name)}" for name in ("mujoco", "dm_control")
                    if name == "mujoco" or env_id != "sawyer"]
    description = (f"Made by collect.py of the reference implementation of 'Keep doing what worked' (Siegel et al., "
                   f"ICLR 2020): {collection.get('method', 'unknown collection')}. Tasks {metadata.get('tasks')}; "
                   f"the full metadata is the JSON entry `abm_metadata`.")
    if bounded and args.ref_min_score is None:
        description += " ref_min_score/ref_max_score are the bounds of the episode return (rewards in [0, 1] per step)."
    try:  # an id already taken is refused by minari before it writes anything
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # minari warns about every optional field left out
            dataset = minari.create_dataset_from_buffers(
                args.dataset_id, episode_buffers(data), env=spec,
                algorithm_name=collection.get("method", "").split(",")[0] or None,
                author=args.author, author_email=args.author_email, code_permalink=args.code_permalink,
                ref_min_score=ref_min, ref_max_score=ref_max, description=description, requirements=requirements)
    except ValueError as error:
        raise UserError(f"cannot write Minari dataset {args.dataset_id}: {str(error).splitlines()[0]}") from None
    dataset.storage.update_metadata({"abm_metadata": json.dumps(metadata)})
    data_dir = Path(dataset.storage.data_path)
    print(f"Wrote Minari dataset {args.dataset_id} to {data_dir.parent}: {dataset.total_episodes} episodes, "
          f"{dataset.total_steps} steps, env {spec.id}" + (f", reference scores {ref_min}..{ref_max}" if ref_max else ""))
    return data_dir


def run(command: Union[Import, Export]) -> Path:
    return import_dataset(command) if isinstance(command, Import) else export_dataset(command)


if __name__ == "__main__":
    main(run, tyro.cli(Union[Annotated[Import, tyro.conf.subcommand("import")],
                               Annotated[Export, tyro.conf.subcommand("export")]]))
