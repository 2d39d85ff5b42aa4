"""The one prepared GPU call: correctness, speed and a results slice on one GPU in at most 9 minutes.

On the GPU machine, from the repository root of a fresh copy of the working tree (README "The GPU call"):

    python3 benchmarks/gpu_session.py                       # $OUT gets session.log, summary.md, gpu_session.tar.gz
    tar -xzf gpu_session.tar.gz                             # here: unpacks into results/gpu/

Rehearsal on a CPU, with tiny budgets (tests/test_gpu_session.py runs it):

    python benchmarks/gpu_session.py --device cpu --rehearsal --out /tmp/gpu_out

Stages, each a subprocess under its own time limit (its flag below), so that one that fails or hangs loses
only itself; every line of their output goes to the terminal and to `<out>/session.log`:

1. install: the carried wheels (`.whl/`, made by benchmarks/gpu_wheels.sh) into a private folder on
   PYTHONPATH; the GPU, driver, Python, torch and CUDA versions, and an import of every dependency.
2. speed, with the GPU to itself: benchmarks/update_speed.py at the paper's settings (batch 512, M = 20,
   Table 1 networks at cheetah's sizes, Table 5 multi-task networks at Sawyer --task all's sizes), each row
   one whole update as a run does it (batch sampling on the GPU included):
   a. eager, fp32 / TF32 / bf16, all five scripts, each without and with the whole update recorded as one
      CUDA graph (`--no-cuda-graph` / `--cuda-graph`, the scripts' default on CUDA);
   b. compiled and recorded (`--compile on --cuda-graph`, what `--compile auto` runs on CUDA), fp32, after
      compiling every configuration in parallel processes once to fill Inductor's caches;
   c. 1, 4, 8 and 16 ABM+MPO runs updating at once on the one GPU (total updates/s), in the results
      stage's configuration (`--results-compile`, recorded, fp32);
   d. d3rlpy's BCQ and BEAR beside ours (benchmarks/peer_d3rlpy.py), only when its wheels were carried;
   e. compiled and recorded in TF32 and bf16 (the first speed stage to go when time is short).
3. tests and results, side by side (neither is timed, so they share the machine):
   - the GPU tests with ABM_TEST_DEVICE=cuda and ABM_TEST_COMPILE=off: end to end, resume, export,
     mechanism, compiled-vs-eager, CPU-vs-CUDA, real CUDA graphs (ABM+MPO compiled inside one) and CUDA's
     out-of-memory error as one sentence;
     pass/fail counts in the summary, junit XML in the archive;
   - benchmarks/reproduce.py --preset gpu --local: the Table 6 columns on the cpu preset's cheetah data
     (carried) and Sawyer --task all, each run `--compile off` (`--results-compile`: 20 processes compiling
     at once took the whole stage in the first call) with its update recorded as a CUDA graph, the updates per
     run sized from stage 2c's measured speed so that the grid ends inside the stage's budget
     (`--time-budget` stops and keeps whatever is left).
4. pack: results/gpu/ (table.md, curves, per-run files, manifest.json, speed/*.json, tests/, session.md,
   session.log) into `<out>/gpu_session.tar.gz`.

Speed runs before the tests because its numbers need an idle GPU; the tests and the results grid need no
timing and share the rest of the call. Budgets are seconds of wall time; the whole call stops by `--total`.
Nothing here imports torch: this driver runs under the machine's python3 before the wheels are installed.
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHEETAH = ("17", "6")  # observation and action size of cheetah-run, the results stage's data
SCRIPTS = ("abm_mpo:abm", "bm_mpo", "abm_svg:abm", "bcq", "bear")


class Session:
    """Runs the stages, tees their output, keeps each stage's status and seconds, and the call's clock."""

    def __init__(self, options):
        self.options, self.start = options, time.time()
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = Path(options.results_dir)
        (self.results / "speed").mkdir(parents=True, exist_ok=True)
        (self.results / "tests").mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "session.log", "a", buffering=1)
        self.stages = []  # (name, status, seconds, note)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # no MUJOCO_GL: nothing here renders

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.start:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self) -> float:
        return self.options.total - (time.time() - self.start)

    def run(self, name: str, command: list, budget: float, env: dict = None, log_name: str = "",
            keep: float = 0.0) -> int:
        """`command` with at most `budget` seconds, less if the call's total is nearer (`keep`: seconds to leave
        for later stages); its process group is killed at the limit. A stage with under 15 s left is skipped.
        Returns the exit code (124 at the limit, 127 when it could not start, 125 when skipped)."""
        budget = min(budget, self.left() - self.options.pack_reserve - keep)
        if budget < 15:
            self.say(f"stage {name}: skipped, {max(budget, 0):.0f} s left for it")
            self.stages.append((name, "skipped (no time left)", 0.0))
            return 125
        self.say(f"stage {name}: {shlex.join(map(str, command))}  (limit {budget:.0f} s)")
        started = time.time()
        extra = open(self.results / log_name, "w") if log_name else None
        try:
            process = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env or self.env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as error:
            self.stages.append((name, f"could not start: {error}", 0.0))
            return 127

        def pump():
            for line in process.stdout:
                self.log.write(line)
                print(line, end="", flush=True)
                if extra:
                    extra.write(line)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            code = 124
        reader.join(timeout=5)
        if extra:
            extra.close()
        seconds = time.time() - started
        status = "ok" if code == 0 else "time limit" if code == 124 else f"exit code {code}"
        self.stages.append((name, status, seconds))
        self.say(f"stage {name}: {status} after {seconds:.0f} s")
        return code


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def rate(results: dict, script: str, compiled: bool, precision: str = "fp32", graphed: bool = False) -> float:
    """Median updates/s of one row of an update_speed.py JSON (0 when it was not measured)."""
    for row in results.get("results", []):
        words = row["script"].split(" ")
        if (words[0] == script.split(" ")[0] and ("sawyer" in words) == ("sawyer" in script)
                and ("compiled" in words) == compiled and ("graphed" in words) == graphed
                and row["precision"] == precision):
            return row["updates_per_second"]
    return 0.0


def size_results(session: Session, budget: float) -> tuple[list, dict]:
    """`--set` assignments for reproduce.py: the updates per run that the measured speed affords in `budget`
    seconds, with the jobs run `--results-slots` at a time (a wave each), and what the sizing read."""
    options, speed = session.options, session.results / "speed"
    concurrent = read_json(speed / "update_speed_concurrent.json").get("results", [])
    packed = [r for r in concurrent if r["runs"] >= min(options.results_slots, max([r["runs"] for r in concurrent] or [0]))]
    per_run = min((r["updates_per_second_total"] / r["runs"] for r in packed), default=0.0)
    compiled = options.results_compile == "on"
    single = read_json(speed / ("update_speed_compiled.json" if compiled else "update_speed_eager.json"))
    graphed = options.device != "cpu"  # the results' runs record their update as a CUDA graph (on CUDA)
    control = rate(single, "abm_mpo:abm", compiled, graphed=graphed)
    sawyer = rate(single, "abm_mpo:abm sawyer", compiled, graphed=graphed)
    if not per_run:  # stage 2c failed: the single-run speed, shared by the packed runs
        per_run = control / options.results_slots if control else options.fallback_rate
    jobs = len(options.seeds.split(",")) * (len(options.columns.split(",")) + len(options.sawyer_columns.split(",")))
    waves = math.ceil(jobs / options.results_slots)
    training = max(0.0, budget - options.wave_overhead * waves) / waves
    updates = int(options.speed_margin * per_run * training) // options.round_to * options.round_to
    updates = max(options.min_updates, min(options.max_updates, updates))
    # Sawyer's runs start after its collection and evaluate 7 tasks: `--sawyer-overhead` seconds outside updates.
    ratio = sawyer / control if control and sawyer else 0.1  # a multi-task update's cost against a cheetah one's
    sawyer_updates = min(updates * ratio, options.speed_margin * per_run * ratio * (budget - options.sawyer_overhead))
    sawyer_updates = max(options.min_updates // 4, int(sawyer_updates) // options.round_to * options.round_to)
    sizing = {"per_run_updates_per_second_packed": per_run, "jobs": jobs, "slots": options.results_slots,
              "waves": waves, "training_seconds_per_wave": training, "updates": updates,
              "sawyer_updates": sawyer_updates, "single_run_rates_from": "compiled" if compiled else "eager",
              "abm_mpo_single": control, "abm_mpo_sawyer_single": sawyer}
    assignments = [f"updates={updates}", f"sawyer_updates={sawyer_updates}", f"seeds={options.seeds}",
                   f"control_columns={options.columns}", f"sawyer_columns={options.sawyer_columns}",
                   "extra_train_flags=" + ",".join(["--compile", options.results_compile, *options.train_flags]),
                   *options.results_set]
    return assignments, sizing


def same_data(dataset: Path, collection: Path) -> str:
    """Whether the carried dataset is the one the cpu grid learned from (its sha256 in results/cpu/collection.json):
    collect.py is not bit-reproducible across machines, so GPU and CPU tables compare only on the same file."""
    try:
        digest = hashlib.sha256(dataset.read_bytes()).hexdigest()
    except OSError:
        return f"data: no carried dataset at {dataset}"
    recorded = read_json(collection).get("sha256", "")
    verdict = "the cpu grid's data" if digest == recorded else (
        f"NOT the cpu grid's data (sha256 {recorded[:12]}... in {collection.name}): compare the tables only in kind"
        if recorded else f"no record of the cpu grid's data in {collection}")
    return f"data: {dataset.name} sha256 {digest[:12]}..., {verdict}"


def test_counts(junit: Path) -> dict:
    """passed / failed / errors / skipped from pytest's junit XML."""
    import xml.etree.ElementTree as ElementTree

    try:
        suites = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the GPU call) or cpu (the rehearsal)")
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results" / "gpu_session")),
                        help="where session.log, summary.md and the archive go (default $OUT on the GPU machine)")
    parser.add_argument("--results-dir", default=str(ROOT / "results" / "gpu"),
                        help="the results folder the archive is made of (unpacks as results/gpu/)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "reproduce" / "gpu"), help="reproduce.py's --work")
    parser.add_argument("--dataset", default=str(ROOT / "results" / "cpu" / "datasets" / "cheetah.npz"),
                        help="the cheetah dataset of the cpu preset, in git (linked into --work)")
    parser.add_argument("--cpu-collection", default=str(ROOT / "results" / "cpu" / "collection.json"),
                        help="the cpu grid's record of its dataset (sha256), to say whether the carried data is it")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="carried wheels (benchmarks/gpu_wheels.sh)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="tiny budgets for a CPU: one script, a few updates, two learning runs")
    parser.add_argument("--total", type=float, default=540, help="the whole call")
    parser.add_argument("--install", type=float, default=60)
    parser.add_argument("--speed-eager", type=float, default=90)
    parser.add_argument("--speed-compiled", type=float, default=110)
    parser.add_argument("--speed-compiled-tf32-bf16", type=float, default=60, help="the compiled TF32 and bf16 rows")
    parser.add_argument("--speed-concurrent", type=float, default=75)
    parser.add_argument("--peer", type=float, default=40)
    parser.add_argument("--tests", type=float, default=200)
    parser.add_argument("--results", type=float, default=360, help="at most; in practice what is left of --total")
    parser.add_argument("--results-reserve", type=float, default=200,
                        help="seconds the speed stages leave for the tests and results (a speed stage that would eat "
                             "into them is cut short or skipped, the TF32/bf16 one first)")
    parser.add_argument("--pack-reserve", type=float, default=10, help="seconds kept for packing at the end")
    parser.add_argument("--results-slots", type=int, default=20, help="learning runs at once in the results stage")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--columns", default="ABM+MPO,BM+MPO,MPO,ABM+SVG,BM+SVG,SVG,BCQ,BEAR,ABM eps=0")
    parser.add_argument("--sawyer-columns", default="ABM+MPO")
    parser.add_argument("--results-set", nargs="*", default=[], help="more reproduce.py --set assignments")
    parser.add_argument("--results-compile", default="off", choices=["off", "on"],
                        help="--compile of the results' runs (each records its update as a CUDA graph either way)")
    parser.add_argument("--train-flags", nargs="*", default=[], help="more flags for every results run")
    parser.add_argument("--wave-overhead", type=float, default=90,
                        help="seconds a wave of runs spends outside its updates (start, compile, evaluations)")
    parser.add_argument("--sawyer-overhead", type=float, default=170,
                        help="seconds a Sawyer run spends outside its updates (collection, start, 7-task evaluations)")
    parser.add_argument("--speed-margin", type=float, default=0.6, help="fraction of the measured speed planned on")
    parser.add_argument("--fallback-rate", type=float, default=50.0, help="updates/s per run when nothing was measured")
    parser.add_argument("--round-to", type=int, default=1000)
    parser.add_argument("--min-updates", type=int, default=2000)
    parser.add_argument("--max-updates", type=int, default=200_000)
    options = parser.parse_args()
    if options.rehearsal:  # every stage's commands, at sizes a 2-core CPU runs in about three minutes
        options.round_to, options.min_updates, options.max_updates = 10, 20, 40
        options.seeds, options.columns, options.sawyer_columns = "0", "ABM+MPO", "ABM+MPO"
        options.results_slots = 2
        options.results_set = ["num_gpus=0", "collect_episodes=4", "batch=16", "sawyer_batch=16", "action_samples=4",
                               "eval_episodes=1", "sawyer_episodes=8", *options.results_set]
        options.train_flags = ["--eval-max-steps", "30", *options.train_flags]
    session = Session(options)
    python, device, results = sys.executable, options.device, session.results
    session.say(f"GPU session on {device}: total budget {options.total:.0f} s, out {session.out}")

    # 1. install and versions
    wheels = sorted(Path(options.wheels).glob("*.whl"))
    if wheels and device != "cpu":
        site = Path("/tmp/gpu_session_site")
        session.run("install", [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--upgrade", "--target", site, *wheels], options.install)
        session.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), session.env.get("PYTHONPATH")]))
    else:
        session.say(f"stage install: skipped ({'no wheels in ' + options.wheels if not wheels else 'CPU rehearsal'})")
    versions = ("import json, platform, torch, numpy, mujoco, dm_control, gymnasium, tyro; "
                "cuda = torch.cuda.is_available(); "
                "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if cuda else None, "
                "'numpy': numpy.__version__, 'mujoco': mujoco.__version__, 'gymnasium': gymnasium.__version__}))")
    session.run("versions", [python, "-c", versions], 60, log_name="versions.json")
    probe = ("from dm_control import suite; env = suite.load('cartpole', 'balance'); "
             "print('rendered', env.physics.render(16, 16).shape)")
    if session.run("egl-probe", [python, "-c", probe], 60, env={**session.env, "MUJOCO_GL": "egl"}) != 0:
        session.say("MUJOCO_GL=egl failed (no libEGL?): no videos on this machine; training needs no OpenGL")
    if shutil.which("nvidia-smi"):
        session.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                   "clocks.max.sm,power.limit", "--format=csv"], 20, log_name="nvidia_smi.csv")

    # 2. speed, with the machine to ourselves
    speed = [python, "benchmarks/update_speed.py", "--devices", device, "--threads", "1", "--baseline", "",
             "--sizes", *CHEETAH]
    scripts = ["bm_mpo"] if options.rehearsal else list(SCRIPTS)
    timing = ["--updates", "2", "--repeats", "1"] if options.rehearsal else ["--updates", "50", "--repeats", "3"]
    recorded = "off" if device == "cpu" else "on"  # the whole update as one CUDA graph: CUDA only
    graphs = ["--graph", "off", *([recorded] if recorded == "on" else [])]  # eager rows: without and with it
    session.run("speed-eager", [*speed, "--compile", "off", *graphs, "--precisions", "fp32", "tf32", "bf16",
                                "--scripts", *scripts, "--multitask", *([] if options.rehearsal else ["abm_mpo:abm"]),
                                *(timing if options.rehearsal else ["--updates", "30", "--repeats", "2"]),
                                "--output", results / "speed" / "update_speed_eager.json"], options.speed_eager,
                keep=options.results_reserve)
    # Compiled and recorded (--compile auto on CUDA), in two calls so that a slow second one cannot lose the first:
    # fp32 (the five scripts, and ABM+MPO at Sawyer's sizes), then TF32 and bf16 last of all.
    session.run("speed-compiled", [*speed, "--compile", "on", "--graph", recorded, "--warm-cache", "--scripts",
                                   *scripts, "--precisions", "fp32",
                                   *([] if options.rehearsal else ["--multitask", "abm_mpo:abm"]), *timing,
                                   "--output", results / "speed" / "update_speed_compiled.json"],
                options.speed_compiled, keep=options.results_reserve)
    counts = ["1", "2"] if options.rehearsal else ["1", "4", "8", "16"]
    session.run("speed-concurrent", [*speed, "--compile", options.results_compile, "--graph", recorded,
                                     "--precisions", "fp32", "--scripts", scripts[0], "--concurrent", *counts,
                                     "--seconds", "1" if options.rehearsal else "3",
                                     "--output", results / "speed" / "update_speed.json"], options.speed_concurrent,
                keep=options.results_reserve)
    check = subprocess.run([python, "-c", "import d3rlpy"], cwd=ROOT, env=session.env, capture_output=True)
    if check.returncode == 0:
        session.run("speed-peer", [python, "benchmarks/peer_d3rlpy.py", "--device", device, "--threads", "1",
                                   *(["--quick"] if options.rehearsal else ["--updates", "20", "--repeats", "2"]),
                                   "--output", results / "speed" / "peer_d3rlpy.json"], options.peer,
                    keep=options.results_reserve)
    else:
        session.say("stage speed-peer: skipped (d3rlpy is not importable: its wheels were not carried)")

    if not options.rehearsal:  # last of the speed stages: the one to go when time is short
        session.run("speed-compiled-tf32-bf16", [*speed, "--compile", "on", "--graph", recorded, "--warm-cache",
                                                 "--scripts", *scripts, "--precisions", "tf32", "bf16", *timing,
                                                 "--output", results / "speed" / "update_speed_compiled_tf32_bf16.json"],
                    options.speed_compiled_tf32_bf16, keep=options.results_reserve)

    # 3. tests and results side by side
    budget = max(30.0, min(options.results, session.left() - options.pack_reserve - 20))
    assignments, sizing = size_results(session, budget)
    (results / "speed" / "results_sizing.json").write_text(json.dumps(sizing, indent=2) + "\n")
    session.say(f"results sized from the measured speed: {json.dumps(sizing)}")
    work = Path(options.work)
    (work / "datasets").mkdir(parents=True, exist_ok=True)
    carried, linked = Path(options.dataset), work / "datasets" / "cheetah.npz"
    if carried.exists() and not linked.exists():
        linked.symlink_to(carried.resolve())
    elif not carried.exists():
        session.say(f"no carried cheetah dataset at {carried}: the results stage collects one (slow)")
    data_note = same_data(carried, Path(options.cpu_collection))
    session.say(data_note)
    tests_env = {**session.env, "ABM_TEST_DEVICE": device, "ABM_TEST_COMPILE": "off"}
    xdist = subprocess.run([python, "-c", "import xdist"], cwd=ROOT, env=session.env, capture_output=True).returncode == 0
    test_files = ["tests/test_gpu_path.py", "-k", "sampler"] if options.rehearsal else [
        "tests/test_cuda_graph.py", "tests/test_gpu_path.py", "tests/test_end_to_end.py", "tests/test_mechanism.py",
        "tests/test_user_errors.py::test_a_batch_too_big_for_memory_is_one_sentence_and_leaves_no_directory",
        "-k", "not compiled_losses_equal"]  # that one compiles on the CPU only: minutes, nothing about the GPU
    test_command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *test_files,
                    *(["-n", "4"] if xdist and not options.rehearsal else []),
                    "--junitxml", results / "tests" / "junit.xml"]
    reproduce_command = [python, "benchmarks/reproduce.py", "--preset", "gpu", "--local",
                         "--num-cpus", str(options.results_slots), "--time-budget", f"{(budget - 20) / 60:.2f}",
                         "--out", results, "--work", work, "--set", *assignments]
    outcome = {}
    threads = [threading.Thread(target=lambda: outcome.setdefault("tests", session.run(
                   "tests", test_command, options.tests, env=tests_env, log_name="tests/pytest.txt"))),
               threading.Thread(target=lambda: outcome.setdefault("results", session.run(
                   "results", reproduce_command, budget)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # 4. summary and archive
    tests = test_counts(results / "tests" / "junit.xml")
    eager = read_json(results / "speed" / "update_speed_eager.json")
    compiled = read_json(results / "speed" / "update_speed_compiled.json")
    extra = read_json(results / "speed" / "update_speed_compiled_tf32_bf16.json")
    compiled.setdefault("results", []).extend(extra.get("results", []))
    concurrent = read_json(results / "speed" / "update_speed_concurrent.json").get("results", [])
    manifest = read_json(results / "manifest.json")
    done = sum(1 for job in manifest.get("jobs", {}).values()
               if job.get("status") in ("done", "done before") and job.get("kind") == "train")
    trains = sum(1 for job in manifest.get("jobs", {}).values() if job.get("kind") == "train")
    lines = [f"# GPU session ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(session.start))})", "",
             f"Command: `python3 benchmarks/gpu_session.py{' --device ' + device if device != 'cuda' else ''}`"
             f"{' (rehearsal)' if options.rehearsal else ''}; device: {read_json(results / 'versions.json')}", "",
             "| stage | status | seconds |", "|---|---|---|",
             *[f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in session.stages], "",
             "| measure | value |", "|---|---|"]
    for script in (*scripts, "abm_mpo:abm sawyer"):
        for precision in ("fp32", "tf32", "bf16"):
            values = [rate(eager, script, False, precision), rate(eager, script, False, precision, graphed=True),
                      rate(compiled, script, True, precision, graphed=True)]
            if any(values):
                lines.append(f"| {script} {precision} updates/s, eager / eager graphed / compiled graphed | "
                             + " / ".join(f"{v:.0f}" if v else "-" for v in values) + " |")
    lines += [f"| {r['runs']} runs at once, total updates/s | {r['updates_per_second_total']:.0f} |" for r in concurrent]
    lines += [f"| tests passed / failed / errors / skipped | {tests.get('passed', '-')} / {tests.get('failures', '-')} "
              f"/ {tests.get('errors', '-')} / {tests.get('skipped', '-')} |",
              f"| results: learning runs finished / in the grid | {done} / {trains} |",
              f"| results: updates per run (Control Suite / Sawyer) | {sizing['updates']} / {sizing['sawyer_updates']} |",
              f"| results: {data_note.split(': ', 1)[0]} | {data_note.split(': ', 1)[1]} |",
              f"| wall time of the call | {time.time() - session.start:.0f} s |"]
    summary = "\n".join(lines) + "\n"
    (session.out / "summary.md").write_text(summary)
    (results / "session.md").write_text(summary)
    session.log.flush()
    shutil.copyfile(session.out / "session.log", results / "session.log")
    archive = session.out / "gpu_session.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(results, arcname="results/gpu")
    session.say(f"archive {archive} ({archive.stat().st_size / 1e6:.1f} MB): unpack with tar -xzf in the repository root")
    print("\n" + summary, flush=True)


if __name__ == "__main__":
    main()
