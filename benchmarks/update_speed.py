"""Gradient updates per second of every learning script at the paper's settings, on this CPU (and GPU).

    python benchmarks/update_speed.py            # full run (a few minutes on 2 cores)
    python benchmarks/update_speed.py --quick    # fewer updates and repeats, a smoke check
    python benchmarks/update_speed.py --compile off on --baseline ''   # eager and compiled rows (`--compile`)
    python benchmarks/update_speed.py --concurrent 1 2 4 8 --scripts abm_mpo:abm   # runs packed on one device
    python benchmarks/update_speed.py --devices cuda --compile off on --graph off on   # CUDA: + whole-update graphs

Synthetic data with hopper's sizes (observation 15, action 4, one task; no env, no dataset file),
batch 512, M = 20 (BCQ: 10, its paper's value), Table 1 networks (policy/prior 256-256, critic
256-256-256). What is timed is one whole update as train() runs it: a batch drawn on the device by the
script's own sampler, `update()`, and BCQ's soft target update (a baseline revision: its `update()` on
pre-sampled batches). Every configuration (script x threads x precision) is measured `--repeats` times,
interleaved round-robin so that load from other processes hits all of them alike; the table gives
the median and the min-max of updates/s over the repeats.

Also measured and printed: the machine's fp32 and bf16 matmul rate (1024^3 products) per thread
count; the FLOPs of one update (torch.utils.flop_counter.FlopCounterMode, forward + backward) and the
aten ops it dispatches eager with its Q passes unchunked as on a GPU (each a kernel launch on CUDA, what
`--graph on` replays as one graph),
and the achieved GFLOP/s = FLOPs x updates/s; the baseline = each script as it was before the
speed work (git revision `--baseline`, default the commit this work started from), fp32, timed
interleaved with the current code ("x baseline" column). bf16 is skipped when the CPU has no
native bf16 matrix product (its bf16 matmul rate below half its fp32 rate): then autocast
emulates it and an update takes seconds. `--force-bf16` times it anyway. `--compile off on` adds a row per
script with its losses through torch.compile (the scripts' `--compile on`); the compile time is printed,
not timed. `--graph off on` adds, on CUDA, rows with the whole update recorded as one CUDA graph and replayed
(the scripts' `--cuda-graph`, their default on CUDA; "off" rows are `--no-cuda-graph`). On a machine with CUDA every configuration is also timed on
the GPU (`--devices`; the device is synchronised before and after each measurement). `--concurrent N ...`
instead times N processes updating at once on the same device (for packing runs per GPU) and reports their
total updates/s. Writes benchmarks/results/update_speed.json.
"""

import argparse
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import abm_mpo  # noqa: E402
import abm_svg  # noqa: E402
import bcq  # noqa: E402
import bear  # noqa: E402
import bm_mpo  # noqa: E402
import sawyer_env  # noqa: E402

OBS_DIM, ACT_DIM = 15, 4  # hopper-hop; `--sizes 17 6` for cheetah-run (the GPU session's data)
SAWYER_DIMS = (sawyer_env.OBS_DIM, sawyer_env.ACT_DIM, len(sawyer_env.TASKS))  # --task all (Table 5 networks)
BASELINE_REVISION = "8c1079a"  # main before issue 7 (the speed work)
WARM_UP = 5  # untimed updates per configuration: compiling, and a recorded CUDA graph (after 3 eager updates)


def machine() -> dict:
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            flags = line
            break
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512f": " avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version()}


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def synthetic_data(size: int = 100_000, episode_length: int = 1000, seed: int = 0, dims: tuple = ()) -> dict:
    """Arrays as load_dataset returns them: random transitions, episodes of `episode_length` steps;
    `dims` = (obs, act, tasks), default (OBS_DIM, ACT_DIM, 1)."""
    obs_dim, act_dim, tasks = dims or (OBS_DIM, ACT_DIM, 1)
    rng = np.random.default_rng(seed)
    observation = rng.standard_normal((size, obs_dim)).astype(np.float32)
    starts = np.arange(0, size, episode_length)
    return {"observation": observation, "action": rng.uniform(-1, 1, (size, act_dim)).astype(np.float32),
            "reward": rng.uniform(0, 1, (size, tasks)).astype(np.float32), "discount": np.ones(size, np.float32),
            "next_observation": np.roll(observation, -1, axis=0),
            "episode_last": np.repeat(np.minimum(starts + episode_length, size) - 1, episode_length)[:size]}


def load_baseline(revision: str, script: str):
    """`script`.py at git `revision` as a module, or None (with the reason) when git cannot show it."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{script}.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return None, f"git show {revision}:{script}.py failed ({getattr(error, 'stderr', error)!s:.100})"
    path = Path(tempfile.mkdtemp()) / f"{script}_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"{script}_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, None


def make_update(module, precision: str, seed: int = 0, compile: str = "off", device: str = "cpu",
                graph: bool = False, **overrides):
    """(args, step) for one script with its paper defaults, on `device`: `step()` is one whole update as train()
    runs it (a batch drawn on the device by the script's own sampler from synthetic data, the update, BCQ's soft
    target update), returning its metrics. `compile` "on": its losses through torch.compile, as the script's
    --compile on (scripts without a compiled path: None); `graph`: the whole step recorded as one CUDA graph, as
    --cuda-graph (CUDA only; without it, compiled losses use torch.compile's own CUDA graphs, as --no-cuda-graph).
    `precision` "tf32" is fp32 with TF32 matrix products (`set_precision`); overrides `env="sawyer"` gives Table
    5's multi-task networks for SAWYER_DIMS. A baseline revision (before the one sampler) times its update on
    four pre-sampled batches in turn."""
    fields = {"device": device, **overrides}
    obs_dim, act_dim, num_tasks = SAWYER_DIMS if overrides.get("env") == "sawyer" else (OBS_DIM, ACT_DIM, 1)
    if precision == "bf16":
        fields["precision"] = precision
    if compile != "off":
        if not hasattr(module, "compile_losses"):
            return None, None
        fields["compile"] = compile
    current = hasattr(module, "record_updates")
    if current:
        fields["cuda_graph"] = graph
    elif graph:
        return None, None
    args = module.Args(**fields)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    low, high = -torch.ones(act_dim, device=device), torch.ones(act_dim, device=device)
    data = on_device(synthetic_data(dims=(obs_dim, act_dim, num_tasks)), device)
    if hasattr(module, "sample_batch"):
        sample = lambda: module.sample_batch(data, args.batch_size, args.snippet_length, args.discount,  # noqa: E731
                                             generator)
    else:
        sample = lambda: module.sample_transitions(data, args.batch_size, generator)  # noqa: E731
    if not current:  # a baseline revision: its own update on pre-sampled batches
        batches = itertools.cycle([abm_mpo.sample_batch(data, args.batch_size, abm_mpo.Args().snippet_length, 0.99,
                                                        generator) for _ in range(4)])
        sample = lambda: next(batches)  # noqa: E731
    if hasattr(module, "make_optimizers"):  # bcq, bear: one optimiser per learner
        agent = module.Agent(obs_dim, act_dim, num_tasks, low, high, args).to(device)
        optimizers = module.make_optimizers(agent, args)
        if hasattr(args, "latent_size"):  # bcq
            losses = {name: module.compile_losses(getattr(module, f"{name}_step_loss"), args, torch.device(device))
                      for name in ("vae", "critic", "actor")} if hasattr(module, "compile_losses") else None

            def step():
                if losses is None:  # a baseline revision from before --compile
                    metrics = module.update(agent, optimizers, sample(), args, generator)
                else:
                    metrics = module.update(agent, optimizers, sample(), args, generator, losses)
                agent.update_targets(args.target_update_rate)
                return metrics
        else:
            losses = {name: module.compile_losses(getattr(module, f"{name}_step_loss"), args, torch.device(device))
                      for name in ("critic", "actor")} if hasattr(module, "compile_losses") else None

            def step():  # past the warm-up: the actor's Q term is on
                if losses is None:  # a baseline revision from before --compile (it took the step number)
                    return module.update(agent, optimizers, sample(), args, generator, args.warmup_steps + 1)
                return module.update(agent, optimizers, sample(), args, generator, False, losses)
    else:
        agent = module.Agent(obs_dim, act_dim, num_tasks, args).to(device)
        optimizer = module.make_optimizer(agent, args)
        if hasattr(module, "compile_losses"):
            losses = module.compile_losses(module.update_losses, args, torch.device(device))

            def step():
                return module.update(agent, optimizer, sample(), args, generator, low, high, losses)
        else:  # a baseline revision from before --compile
            def step():
                return module.update(agent, optimizer, sample(), args, generator, low, high)
    if current:
        step = module.record_updates(step, agent, generator, args, torch.device(device))
    return args, step


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def set_precision(precision: str) -> None:
    """TF32 matrix products on CUDA for the "tf32" rows only (PyTorch's default, and the scripts', is off)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def flops_key(row: str) -> str:
    """The row a configuration's FLOPs are counted for: its script, with " sawyer" for the multi-task sizes."""
    if row.startswith("baseline"):
        return row
    words = row.split(" ")
    return words[0] + (" sawyer" if "sawyer" in words else "")


def dims_of(row: str) -> tuple:
    return SAWYER_DIMS if row.endswith(" sawyer") else (OBS_DIM, ACT_DIM, 1)


def worker_command(options, row: str, device: str, compile: str, precision: str, *extra, graph: str = "") -> list:
    return [sys.executable, __file__, "--worker", row, "--seconds", str(options.seconds), "--devices", device,
            "--compile", compile, "--graph", graph or options.graph[-1], "--precisions", precision,
            "--sizes", str(OBS_DIM), str(ACT_DIM), *extra]


def warm_compile_cache(options, rows: dict, device: str, extra: list = ()) -> float:
    """`--warm-cache`: one process per compiled configuration, all at once, each compiling its update and
    exiting; the timed process then finds Inductor's on-disk caches filled and compiles in seconds. `extra`:
    rows compiled in fp32 only and not timed (`--warm-extra`)."""
    start = time.perf_counter()
    configurations = [(row, precision) for row in rows for precision in options.precisions]
    configurations += [(row, "fp32") for row in extra if (row, "fp32") not in configurations]
    workers = [subprocess.Popen(worker_command(options, row, device, "on", precision, "--warm-only"),
                                stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
               for row, precision in configurations]
    failed = sum(worker.wait() != 0 for worker in workers)
    seconds = time.perf_counter() - start
    print(f"compile caches warmed by {len(workers)} processes in {seconds:.0f} s ({failed} failed)",
          file=sys.stderr, flush=True)
    return seconds


def concurrent(options, rows: dict) -> list[dict]:
    """`--concurrent N ...`: N worker processes (this file with --worker) update at once on each device; the
    total updates/s of the N, each timed over `--seconds` after its warm-up."""
    results = []
    for device in options.devices:
        for row in rows:
            for count in options.concurrent:
                barrier = tempfile.mkdtemp(prefix="update_speed_barrier_")
                command = worker_command(options, row, device, options.compile[-1], options.precisions[0],
                                         "--barrier", barrier, str(count))
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
                workers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(count)]
                outputs = [worker.communicate()[0].split() for worker in workers]
                if any(worker.returncode != 0 or not output for worker, output in zip(workers, outputs)):
                    print(f"| {row} | {device} | {count} | failed | exit codes {[w.returncode for w in workers]} |",
                          flush=True)
                    continue
                rates = [float(output[-1]) for output in outputs]
                results.append({"script": row, "device": device, "runs": count, "updates_per_second_total": sum(rates),
                                "per_run": rates, "compile": options.compile[-1], "graph": options.graph[-1],
                                "precision": options.precisions[0], "load_average": load_average()})
                print(f"| {row} | {device} | {count} | {sum(rates):.2f} | {', '.join(f'{r:.2f}' for r in rates)} |",
                      flush=True)
    return results


def worker(options, rows: dict) -> None:
    """One process of --concurrent: warm up, wait at the barrier until all `count` workers are warm (so they
    time the same window), then print the updates/s of `--seconds` of updates. `--warm-only`: stop after the
    warm-up (which compiles), for --warm-cache."""
    device, (module, overrides) = options.devices[0], rows[options.worker]
    set_precision(options.precisions[0])
    update = make_update(module, options.precisions[0], compile=options.compile[-1], device=device,
                         graph=options.graph[-1] == "on", **overrides)[1]
    for _ in range(WARM_UP):  # compiles; records the CUDA graphs
        update()
    if options.graph[-1] == "on" and not getattr(update, "recorded", lambda: 0)():
        sys.exit(f"{options.worker}: its update was not recorded as a CUDA graph (the reason is on stderr above)")
    synchronise(device)
    if options.warm_only:
        return
    if options.barrier:
        folder, count = Path(options.barrier[0]), int(options.barrier[1])
        (folder / str(os.getpid())).touch()
        while len(list(folder.iterdir())) < count:
            time.sleep(0.01)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < options.seconds:
        update()
        count += 1
        if count % 10 == 0:
            synchronise(device)
    synchronise(device)
    print(count / (time.perf_counter() - start))


def on_device(data: dict, device: str) -> dict:
    """synthetic_data as load_data gives it to the samplers: tensors on `device`."""
    return {key: torch.as_tensor(value, device=device) for key, value in data.items()}


def cuda_matmul_tflops(dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """The GPU's matrix-product rate on random data (the ceiling the update's achieved rate is read against)."""
    a, b = torch.randn(size, size, device="cuda", dtype=dtype), torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def matmul_gflops(dtype: torch.dtype, threads: int, size: int = 1024, budget: float = 1.0) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - start < budget:
        a @ b
        count += 1
        if time.perf_counter() - start > 4 * budget:
            break
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


class OpCounter(TorchDispatchMode):
    """Counts the aten ops one update dispatches: on CUDA each is (at least) one kernel launch, ~5-10 us of host time
    in eager mode, which one CUDA graph replay of the whole update replaces (`--graph on`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def update_flops(update) -> tuple[int, int]:
    """The FLOPs (forward + backward) and the aten ops of one update, its Q passes unchunked as on a GPU (on a
    CPU they run in chunks of CHUNK_ROWS x threads rows, each chunk a few more ops; the FLOPs are the same)."""
    modules = [module for module in (abm_mpo, abm_svg, bm_mpo, bcq, bear) if hasattr(module, "CHUNK_ROWS")]
    saved = [module.CHUNK_ROWS for module in modules]
    try:
        for module in modules:
            module.CHUNK_ROWS = 1 << 30
        with FlopCounterMode(display=False) as counter, OpCounter() as ops:
            update()
    finally:
        for module, value in zip(modules, saved):
            module.CHUNK_ROWS = value
    return counter.get_total_flops(), ops.count


def chunk_sweep(options, sizes=(256, 512, 1024, 4096, 1 << 20)) -> list[dict]:
    """abm_mpo:abm updates/s against the rows per critic pass (1 << 20: one pass over all rows)."""
    default = abm_mpo.CHUNK_ROWS
    updates = {size: make_update(abm_mpo, "fp32", prior="abm")[1] for size in sizes}
    samples = {(size, threads): [] for size in sizes for threads in options.threads}
    try:
        for repeat in range(options.repeats):
            for (size, threads), values in samples.items():
                abm_mpo.CHUNK_ROWS = size
                torch.set_num_threads(threads)
                updates[size]()
                start = time.perf_counter()
                for _ in range(options.updates):
                    updates[size]()
                values.append(options.updates / (time.perf_counter() - start))
    finally:
        abm_mpo.CHUNK_ROWS = default
    return [{"chunk_rows": size, "threads": threads, "samples": values} for (size, threads), values in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 updates x 2 repeats per configuration")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved measurements per configuration")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"],
                        help="tf32: fp32 with TF32 matrix products, CUDA only")
    parser.add_argument("--sizes", type=int, nargs=2, default=[OBS_DIM, ACT_DIM], metavar=("OBS", "ACT"),
                        help="observation and action size of the Control Suite rows (default hopper's; cheetah: 17 6)")
    parser.add_argument("--multitask", nargs="*", default=None, metavar="ROW",
                        help="also time these rows (none named: every row) with sawyer --task all sizes and Table 5's "
                             "multi-task networks")
    parser.add_argument("--warm-cache", action="store_true",
                        help="compile every compiled row in parallel processes first, filling Inductor's caches")
    parser.add_argument("--warm-extra", nargs="*", default=[], metavar="ROW",
                        help="with --warm-cache, also compile these rows without timing them (e.g. abm_mpo:bm "
                             "abm_mpo:none abm_svg:bm abm_svg:none abm_mpo:eps0: every Table 6 column's update)")
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scripts", nargs="+", default=None, help="subset of the rows, e.g. abm_mpo:abm bear")
    parser.add_argument("--baseline", default=BASELINE_REVISION, help="git revision of the baseline scripts; '' = none")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without native bf16 matmul")
    parser.add_argument("--chunk-sweep", action="store_true",
                        help="also time abm_mpo:abm (fp32) at other CHUNK_ROWS, the rows per critic pass")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                        help="eager (off) and/or compiled (on) rows, the scripts' --compile")
    parser.add_argument("--graph", nargs="+", default=["off"], choices=["off", "on"],
                        help="rows without (off) and/or with (on) the whole update recorded as one CUDA graph, the "
                             "scripts' --no-cuda-graph / --cuda-graph (CUDA devices only)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--concurrent", type=int, nargs="+", default=None,
                        help="time this many processes updating at once per device (e.g. 1 2 4 8), then stop")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per --concurrent worker")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "update_speed.json"))
    options = parser.parse_args()
    globals().update(OBS_DIM=options.sizes[0], ACT_DIM=options.sizes[1])
    if options.quick:
        options.updates, options.repeats = 2, 2
    rows = {"abm_mpo:abm": (abm_mpo, {"prior": "abm"}), "abm_mpo:bm": (abm_mpo, {"prior": "bm"}),
            "abm_mpo:none": (abm_mpo, {"prior": "none"}), "bm_mpo": (bm_mpo, {}),
            "abm_svg:abm": (abm_svg, {"prior": "abm"}), "bcq": (bcq, {}), "bear": (bear, {})}
    extra = {"abm_svg:bm": (abm_svg, {"prior": "bm"}), "abm_svg:none": (abm_svg, {"prior": "none"}),
             "abm_mpo:eps0": (abm_mpo, {"prior": "abm", "epsilon": 0.0, "snippet_length": 2})}  # --warm-extra only
    rows.update({f"{name} sawyer": (module, {**overrides, "env": "sawyer"}) for name, (module, overrides) in rows.items()})
    if options.worker:
        return worker(options, {**rows, **extra})
    multitask = options.multitask if options.multitask else list(rows) if options.multitask == [] else []
    rows = {name: row for name, row in rows.items() if name.removesuffix(" sawyer") in multitask
            or not name.endswith(" sawyer")}
    if options.scripts:
        rows = {name: row for name, row in rows.items() if name.removesuffix(" sawyer") in options.scripts}
    if options.concurrent:
        print(f"# Concurrent runs: {machine()['cpu']}, load average {load_average()}, {options.seconds} s each\n")
        print("| script | device | runs | total updates/s | per run |\n|---|---|---|---|---|")
        set_precision(options.precisions[0])
        results = concurrent(options, rows)
        output = Path(options.output).with_name("update_speed_concurrent.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
        return print(f"\nwrote {output}")

    info = machine()
    print(f"# Update speed: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"(CPU capability {info['torch_cpu_capability']}, avx512_bf16: {info['avx512_bf16']}, "
          f"amx_bf16: {info['amx_bf16']})")
    print(f"load average at start: {load_average()}\n")

    rates = {f"{dtype}/{threads}": matmul_gflops(getattr(torch, {'fp32': 'float32', 'bf16': 'bfloat16'}[dtype]), threads)
             for dtype in ("fp32", "bf16") for threads in options.threads}
    rates.update({f"tf32/{threads}": rates[f"fp32/{threads}"] for threads in options.threads})  # no TF32 on a CPU
    if any(device.startswith("cuda") for device in options.devices):
        info["gpu"] = torch.cuda.get_device_name()
        for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16)):
            set_precision(precision)
            rates[f"cuda/{precision}"] = 1e3 * cuda_matmul_tflops(dtype)  # GFLOP/s, like the CPU's
        set_precision("fp32")
        print(f"GPU {info['gpu']}: matmul 8192^3 " + ", ".join(f"{p} {rates[f'cuda/{p}'] / 1e3:.0f} TFLOP/s"
                                                              for p in ("fp32", "tf32", "bf16")))
    print("| matmul 1024^3 | " + " | ".join(f"{t} thread(s)" for t in options.threads) + " |")
    print("|---|" + "---|" * len(options.threads))
    for dtype in ("fp32", "bf16"):
        print(f"| {dtype} GFLOP/s | " + " | ".join(f"{rates[f'{dtype}/{t}']:.1f}" for t in options.threads) + " |")
    native_bf16 = all(rates[f"bf16/{t}"] >= 0.5 * rates[f"fp32/{t}"] for t in options.threads)
    on_gpu_only = all(device.startswith("cuda") for device in options.devices)
    precisions = [p for p in options.precisions
                  if p == "fp32" or (p == "tf32" and on_gpu_only) or (p == "bf16" and (native_bf16 or on_gpu_only
                                                                                         or options.force_bf16))]
    if "bf16" in options.precisions and "bf16" not in precisions:
        print("\nbf16 skipped: this CPU has no native bf16 matrix product (bf16 matmul below half the fp32 "
              "rate), so an update under autocast would take seconds; --force-bf16 times it anyway.")

    batch_size = abm_mpo.Args().batch_size
    if options.warm_cache and "on" in options.compile:
        for device in options.devices:
            warm_compile_cache(options, {row: r for row, r in rows.items() if hasattr(r[0], "compile_losses")}, device,
                               [name for name in options.warm_extra if name in {**rows, **extra}])

    configurations = {}  # name -> (row, threads, precision, update, device)
    for row, (module, overrides) in rows.items():
        for precision in precisions:
            for threads in options.threads:
                for compile, graph, device in itertools.product(options.compile, options.graph, options.devices):
                    if device != "cpu" and threads != options.threads[0]:
                        continue  # a GPU row is timed once, at the first thread count
                    if graph == "on" and not device.startswith("cuda"):
                        continue  # CUDA graphs: CUDA only
                    set_precision(precision)
                    update = make_update(module, precision, compile=compile, device=device, graph=graph == "on",
                                         **overrides)[1]
                    name = " ".join([row] + ["compiled"] * (compile == "on") + ["graphed"] * (graph == "on")
                                    + [device] * (device != "cpu"))
                    if update is not None:
                        configurations[f"{name}/{precision}/{threads}"] = (name, threads, precision, update, device)
        baseline, reason = load_baseline(options.baseline, module.__name__) if options.baseline else (None, "")
        if baseline is None:
            print(f"baseline of {row} not measured: {reason or 'no --baseline'}")
            continue
        for threads in options.threads:
            configurations[f"baseline {row}/fp32/{threads}"] = (
                f"baseline {row}", threads, "fp32", make_update(baseline, "fp32", **overrides)[1], "cpu")

    torch.set_num_threads(1)
    flops, ops = {}, {}
    for name, (row, threads, precision, update, device) in list(configurations.items()):
        base = flops_key(row)
        set_precision(precision)
        start = time.perf_counter()
        try:
            if base not in flops:
                flops[base], ops[base] = update_flops(update)  # also the warm-up of this configuration
            for _ in range(WARM_UP):  # compiles the compiled rows; records the CUDA graphs
                update()
            if " graphed" in row and not update.recorded():
                raise RuntimeError("its update was not recorded as a CUDA graph (the reason is on stderr above)")
            synchronise(device)
        except Exception as error:  # one failing configuration (a compile error, say) must not lose the others
            print(f"{name}: dropped, its warm-up failed: {type(error).__name__}: {str(error).splitlines()[0]:.200}",
                  file=sys.stderr, flush=True)
            del configurations[name]
            continue
        if " compiled" in row:
            print(f"{name}: compiled in {time.perf_counter() - start:.1f} s (first 2 updates)", file=sys.stderr,
                  flush=True)
    flops.update({row: flops[flops_key(row)] for _, (row, *_rest) in configurations.items() if row not in flops})
    ops.update({row: ops[flops_key(row)] for _, (row, *_rest) in configurations.items() if row not in ops})

    def measure(name: str, warm_up: int = 0) -> None:
        row, threads, precision, update, device = configurations[name]
        torch.set_num_threads(threads)
        set_precision(precision)
        for _ in range(warm_up):
            update()
        synchronise(device)
        start = time.perf_counter()
        for _ in range(options.updates):
            update()
        synchronise(device)
        samples[name].append(options.updates / (time.perf_counter() - start))

    # Compiled CUDA rows replay CUDA graphs. Interleaved round-robin with other compiled functions in one process,
    # ABM+MPO measured 41 updates/s on an H200, against 312 in a process of its own (--concurrent 1), consistent with
    # PyTorch's CUDA-graph trees re-warming at each switch: each such row is timed in one block after a warm-up.
    blocked = [name for name, (row, *_rest, device) in configurations.items()
               if " compiled" in row and " graphed" not in row and device != "cpu"]
    samples = {name: [] for name in configurations}
    loads = []
    for repeat in range(options.repeats):
        loads.append(load_average())
        for name in configurations:
            if name not in blocked:
                measure(name)
        print(f"repeat {repeat + 1}/{options.repeats} done, load average {loads[-1]}", file=sys.stderr, flush=True)
    for name in blocked:
        for repeat in range(options.repeats):
            measure(name, warm_up=3 if repeat == 0 else 0)
    loads.append(load_average())

    sweep = chunk_sweep(options) if options.chunk_sweep else []

    results = []
    for name, (row, threads, precision, _, device) in configurations.items():
        values = samples[name]
        median = statistics.median(values)
        results.append({"script": row, "device": device, "threads": threads, "precision": precision,
                        "updates_per_second": median,
                        "min": min(values), "max": max(values), "samples": values,
                        "gflop_per_update": flops[row] / 1e9, "achieved_gflops": flops[row] * median / 1e9,
                        "aten_ops_per_update": ops[row],
                        "matmul_gflops": rates[f"cuda/{precision}" if device.startswith("cuda") else f"{precision}/{threads}"]})

    print(f"\nbatch {batch_size}, M = 20 (BCQ 10), {options.updates} updates x {options.repeats} interleaved repeats; "
          f"load average per repeat: {', '.join(loads)}\n")
    print("| script | precision | threads | updates/s median | min-max | GFLOP/update | achieved GFLOP/s | "
          "matmul GFLOP/s | aten ops/update (eager) | x baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["script"].removeprefix("baseline "), r["threads"]): r["updates_per_second"]
            for r in results if r["script"].startswith("baseline ")}
    for r in results:
        key = (r["script"], r["threads"])
        ratio = f"{r['updates_per_second'] / base[key]:.2f}" if key in base else ""
        print(f"| {r['script']} | {r['precision']} | {r['threads']} | {r['updates_per_second']:.2f} | "
              f"{r['min']:.2f}-{r['max']:.2f} | {r['gflop_per_update']:.2f} | {r['achieved_gflops']:.1f} | "
              f"{r['matmul_gflops']:.1f} | {r['aten_ops_per_update']} | {ratio} |")

    if sweep:
        print("\n| abm_mpo:abm fp32, CHUNK_ROWS | threads | updates/s median | min-max |\n|---|---|---|---|")
        for entry in sweep:
            print(f"| {entry['chunk_rows']} | {entry['threads']} | {statistics.median(entry['samples']):.2f} | "
                  f"{min(entry['samples']):.2f}-{max(entry['samples']):.2f} |")

    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": info, "load_average": loads, "matmul_gflops": rates,
                                  "native_bf16": native_bf16, "updates": options.updates,
                                  "repeats": options.repeats, "baseline_revision": options.baseline,
                                  "results": results, "chunk_sweep": sweep}, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
