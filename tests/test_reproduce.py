"""benchmarks/reproduce.py: the smoke preset end to end on a local Ray (collections, merges and
learning runs as Ray tasks), a job killed mid-run that the rerun continues with --resume, a failing
job that is reported while the rest finish, and a table and curves whose numbers are those of the
per-run summaries. Plus the grids of the other presets, checked without running them."""

import contextlib
import csv
import dataclasses
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import held_by_another_process

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("ray")
import plot  # noqa: E402
import reproduce  # noqa: E402

SMOKE = reproduce.PRESETS["smoke"]
KILLED = dataclasses.replace(SMOKE, updates=300, eval_every=25)  # a longer run, checkpointed every 25 updates


def run_reproduce(out: Path, work: Path, jobs: list) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(SMOKE, out, work, num_cpus=2, jobs=jobs)
    return printed.getvalue()


def kill_after_checkpoint(job: reproduce.Job, updates_logged: int = 2) -> int:
    """Run a job's command outside Ray and SIGKILL it once it has checkpointed; returns the last
    update in metrics.csv at that moment."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, *job.command[1:]], cwd=ROOT, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = job.run_dir / "metrics.csv", time.time() + 60
    try:
        while time.time() < deadline and process.poll() is None:
            if (job.run_dir / "checkpoint.pt").exists() and metrics.exists() and \
                    len(metrics.read_text().splitlines()) > updates_logged:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with open(metrics) as handle:
        return int(list(csv.DictReader(handle))[-1]["step"])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run 1: the smoke grid plus a job that fails. Then a longer run killed after its first checkpoints,
    and run 2: the grid again (all done) plus the killed run, which must continue."""
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("results")
    grid = reproduce.build_grid(SMOKE, work)
    model = next(job for job in grid if job.kind == "train" and job.labels["env"] != "sawyer")
    broken = dataclasses.replace(model, name="broken", log=work / "logs" / "broken.log", run_dir=work / "runs" / "broken",
                                 command=[*model.command[:-2], "--dataset", str(work / "missing.npz"),
                                          "--run-dir", str(work / "runs" / "broken")])
    started = time.time()
    first = run_reproduce(out, work, grid + [broken])
    first_manifest = json.loads((out / "manifest.json").read_text())
    killed = reproduce.train_job(KILLED, work, "cartpole-balance", "all",
                                 ("full", None), "ABM+MPO", 2)
    killed_at = kill_after_checkpoint(killed)
    second = run_reproduce(out, work, grid + [killed])
    return {"work": work, "out": out, "grid": grid, "broken": broken, "killed": killed, "killed_at": killed_at,
            "first": first, "second": second, "first_manifest": first_manifest,
            "manifest": json.loads((out / "manifest.json").read_text()), "seconds": time.time() - started}


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_smoke_grid_jobs_run_on_ray(smoke):
    statuses = {name: job["status"] for name, job in smoke["first_manifest"]["jobs"].items()}
    assert {statuses[job.name] for job in smoke["grid"]} == {"done"}
    assert all((job.run_dir / "summary.json").exists() for job in smoke["grid"] if job.kind == "train")
    datasets = [job for job in smoke["grid"] if job.name.startswith("dataset-")]
    assert {reproduce.dataset_episodes(job.dataset) for job in datasets} == {SMOKE.collect_episodes, SMOKE.sawyer_episodes}
    log = smoke["grid"][-1].log.read_text()
    assert f"$ {' '.join(smoke['grid'][-1].command)}" in log  # the job ran the command a user would type


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_failing_job_is_reported_and_the_rest_finish(smoke):
    statuses = {name: job["status"] for name, job in smoke["first_manifest"]["jobs"].items()}
    assert statuses["broken"] == "failed"
    assert "failed: broken" in smoke["first"]
    assert str(smoke["work"] / "missing.npz") in smoke["first"]  # its command
    assert "broken.log" in smoke["first"]  # and its log
    assert "does not exist" in smoke["broken"].log.read_text()


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_rerun_skips_finished_runs_and_resumes_the_killed_one(smoke):
    killed, killed_at = smoke["killed"], smoke["killed_at"]
    assert f"{len(smoke['grid'])} already done, 1 to run" in smoke["second"]
    assert 0 < killed_at < KILLED.updates
    log = killed.log.read_text()
    assert f"--resume {killed.run_dir}" in log
    resumed_from = int(log.split("from update ")[1].split(".")[0])
    assert killed_at - KILLED.eval_every <= resumed_from <= killed_at  # the last checkpoint, at most one interval back
    with open(killed.run_dir / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == list(range(KILLED.eval_every, KILLED.updates + 1, KILLED.eval_every))  # every evaluation exactly once
    assert smoke["manifest"]["jobs"][killed.name]["status"] == "done"
    assert len(smoke["manifest"]["sessions"]) == 2


def read_markdown_tables(text: str) -> list[dict]:
    """Each markdown table as {row label: {header: cell}} (a `paper` row is keyed `<label> paper`)."""
    tables, current, headers, last = [], None, None, None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if current is None:
            current, headers = {}, cells
            tables.append(current)
        elif not set(line) <= set("|-"):
            last = f"{last} paper" if cells[0] == "paper" else cells[0]
            current[last] = dict(zip(headers, cells))
    return tables


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_table_numbers_equal_the_run_summaries(smoke):
    out = smoke["out"]
    tables = read_markdown_tables((out / "table.md").read_text())  # Table 6, its IQM and orderings, Table 7
    control, sawyer = tables[0], tables[-1]
    expected = {}
    for folder in (out / "runs").iterdir():
        job, summary = (json.loads((folder / name).read_text()) for name in ("job.json", "summary.json"))
        for task, numbers in summary["per_task"].items():
            row = f"{task} (alone)" if job["env"] == "sawyer" else f"{job['env']} ({job['regime']})"
            cells = expected.setdefault(row, {})
            cells.setdefault(job["column"], []).append(numbers["return"])
            cells.setdefault(job["column"] + " prior", []).append(numbers["prior_return"])
            cells.setdefault("best episode in the data", []).append(numbers["best_episode_return_in_dataset"])
    table = {**control, **sawyer}
    assert set(table) == set(expected)
    for row, cells in expected.items():
        for header, values in cells.items():
            if header == "best episode in the data":
                assert table[row][header] == f"{max(values):.1f}"
            elif header in table[row]:
                assert table[row][header].startswith(f"{np.mean(values):.1f} [") and table[row][header].endswith(
                    f"] ({len(values)})")
                low, high = map(float, table[row][header].split("[")[1].split("]")[0].split(", "))
                assert min(values) - 0.05 <= low <= np.mean(values) + 0.05 <= high + 0.1 <= max(values) + 0.15
    assert table["cartpole-balance (full)"]["ABM+MPO"].endswith("(3)")  # seeds 0, 1 and the resumed seed 2
    assert "BCQ prior" not in table["cartpole-balance (full)"]  # only ABM and BM priors are Table 6 columns
    assert "Budgets:" in (out / "table.md").read_text()


def test_curves_have_a_prior_row_only_where_a_run_has_a_prior(tmp_path):
    """The published cheetah runs: cpu-long's (ABM+MPO and BM+MPO, with priors) and cpu-mpo's (plain MPO, none),
    whose figure once had an empty row for priors."""
    heights = {}
    for preset in ("cpu-long", "cpu-mpo"):
        folders = sorted((ROOT / "results" / preset / "runs").iterdir())[:2]
        figure = plot.plot_panels(plot.collect_panels(folders), tmp_path / f"{preset}.png")
        heights[preset] = int.from_bytes(figure.read_bytes()[20:24], "big")  # the PNG's IHDR height
    assert heights["cpu-mpo"] < 0.7 * heights["cpu-long"], heights


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_report_rewrites_the_table_the_grid_wrote(smoke, tmp_path):
    """--report (no runs) writes table.md again from the published runs and manifest.json: the same bytes, wall
    times included (it used to say "0.0 min this run of the command")."""
    copy = tmp_path / "results"
    shutil.copytree(smoke["out"], copy)
    (copy / "table.md").unlink()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--preset", "smoke", "--report",
                    "--out", str(copy)], check=True, capture_output=True, cwd=ROOT)
    assert (copy / "table.md").read_text() == (smoke["out"] / "table.md").read_text()
    assert smoke["manifest"]["sessions"][-1]["wall_seconds"] > 3  # so the old "0.0 min" would differ


@pytest.mark.slow  # the smoke grid on Ray: ~40 s on 2 idle cores
def test_curves_are_written_from_the_same_runs(smoke, tmp_path):
    out = smoke["out"]
    for env in ("cartpole-balance", "sawyer"):
        assert (out / f"curves_{env}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folders = sorted((out / "runs").iterdir())
    panels = plot.collect_panels(folders, labels=[json.loads((f / "job.json").read_text())["column"] for f in folders])
    for folder in folders:  # the mean of each curve's last 10% of points is the run's final return
        summary, job = (json.loads((folder / name).read_text()) for name in ("summary.json", "job.json"))
        curves = [c for name, by_label in panels.items() for label, cs in by_label.items() if label == job["column"]
                  for c in cs if ("sawyer" in name) == (job["env"] == "sawyer")]
        finals = [np.mean(c.policy[-int(np.ceil(0.1 * len(c.policy))):]) for c in curves]
        assert summary["final/return"] in [pytest.approx(final) for final in finals]
    figure = tmp_path / "mine.png"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot.py"), *map(str, folders[:2]), "--out", str(figure)],
                   check=True, capture_output=True)
    assert figure.stat().st_size > 10_000


def test_every_preset_command_parses_with_its_script():
    """The commands of the cpu, gpu and paper grids (never run in the tests) are valid for their scripts."""
    import tyro

    modules = {}
    for preset in reproduce.PRESETS.values():
        for job in reproduce.build_grid(preset, Path("/tmp/grid")):
            script = job.command[1].removesuffix(".py")
            module = modules.setdefault(script, importlib.import_module(script))
            args = tyro.cli(module.Args, args=job.command[2:])
            if job.kind == "train" and job.labels["column"] == "ABM eps=0":
                assert (args.epsilon, args.snippet_length) == (0.0, 2)
            if job.kind == "train" and job.labels["column"] == "ABM+MPO N=100":
                assert (args.prior, args.snippet_length) == ("abm", 100)


def test_grids_cover_the_paper_columns_and_order_seed_zero_first():
    cpu = [job for job in reproduce.build_grid(reproduce.PRESETS["cpu"], Path("/tmp/grid")) if job.kind == "train"]
    columns = ("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR", "ABM eps=0")
    assert {(j.labels["env"], j.labels["regime"], j.labels["column"]) for j in cpu} == {
        ("cheetah", regime, column) for regime in ("first 20", "all 80") for column in columns}
    assert len(cpu) == 2 * 6 * 5  # regimes x columns x seeds
    walker = [job for job in reproduce.build_grid(reproduce.PRESETS["cpu-walker"], Path("/tmp/grid"))
              if job.kind == "train"]
    assert {(j.labels["env"], j.labels["column"]) for j in walker} == {
        (env, column) for env in ("walker", "sawyer") for column in ("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR")}
    gpu = [job for job in reproduce.build_grid(reproduce.PRESETS["gpu"], Path("/tmp/grid")) if job.kind == "train"]
    assert {j.labels["column"] for j in gpu} == set(reproduce.TABLE_6_ORDER)
    assert {j.labels["env"] for j in gpu} == {"cheetah", "sawyer"}  # the cpu preset's data, and Table 5's networks
    assert {j.labels["task"] for j in gpu if j.labels["env"] == "sawyer"} == {"all"}
    for grid in (cpu, gpu):
        seeds = [job.labels["seed"] for job in grid]
        assert seeds == sorted(seeds)  # every column's seed 0 before any seed 1



@pytest.mark.parametrize("preset, length", [("cpu-snippets", "100"), ("cpu-snippets2", "2")])
def test_the_snippet_presets_change_only_eq4s_snippet_length(preset, length):
    """cpu-snippets and cpu-snippets2 are cpu-long's ABM+MPO column with snippets of 100 and 2: the same data, seeds
    and budgets, so their runs compare with cpu-long's (and cpu-eps0's) seed for seed."""
    def runs(name):
        return [job for job in reproduce.build_grid(reproduce.PRESETS[name], Path("/tmp/grid")) if job.kind == "train"]

    snippets, long = runs(preset), [job for job in runs("cpu-long") if job.labels["column"] == "ABM+MPO"]
    assert [job.labels for job in snippets] == [job.labels for job in long] and len(snippets) == 5
    for new, old in zip(snippets, long):
        added = [flag.replace(preset, "cpu-long") for flag in new.command]
        assert added == [*old.command[:-2], "--snippet-length", length, *old.command[-2:]]


def test_the_quadruped_preset_varies_only_the_snippet_length_between_its_abm_columns():
    """cpu-quadruped's two ABM+MPO columns differ in --snippet-length alone (seed for seed), and its table puts the
    N = 100 column beside ABM+MPO and tests the paper's orderings of the priors with it."""
    jobs = [job for job in reproduce.build_grid(reproduce.PRESETS["cpu-quadruped"], Path("/tmp/grid"))
            if job.kind == "train"]
    assert len(jobs) == 3 * 8 and {job.labels["env"] for job in jobs} == {"quadruped"}
    short = [job for job in jobs if job.labels["column"] == "ABM+MPO"]
    long = [job for job in jobs if job.labels["column"] == "ABM+MPO N=100"]
    for a, b in zip(short, long):
        assert [flag.replace(b.name, a.name) for flag in b.command] == [
            *a.command[:8], "--snippet-length", "100", *a.command[8:]]

    def run(column, seed):
        numbers = {"return": 100.0 * (column != "BM+MPO") + seed, "prior_return": 60.0 + seed,
                   "best_episode_return_in_dataset": 500.0}
        return {"env": "quadruped", "regime": "all 60", "regime_episodes": None, "task": "all", "column": column,
                "summary": {"per_task": {"run": numbers}}}

    columns = ["ABM+MPO", "ABM+MPO N=100", "BM+MPO"]
    rows = reproduce.table_rows([run(c, seed) for c in columns for seed in (0, 1, 2)], columns)
    table = reproduce.markdown_table(rows, columns, reproduce.PAPER_TABLE_6, reproduce.PAPER_TABLE_6_COLUMNS)
    assert table[0].startswith("| task (data) | best episode in the data | ABM+MPO | ABM+MPO prior | ABM+MPO N=100 | "
                               "ABM+MPO N=100 prior | BM+MPO |")
    assert table[3] == "| paper | - | 786.6 | 733.4 | - | - | 710.8 | 398.8 |"  # the paper states no N
    pairs = [line.split(" | ")[1] for line in reproduce.comparisons(rows)[2:]]
    assert "ABM+MPO N=100 prior vs BM+MPO prior" in pairs and "ABM+MPO N=100 vs BM+MPO" in pairs
    assert list(reproduce.COLUMN_ORDER[:3]) == columns


def test_the_paper_row_under_filtered_data_says_the_paper_ran_none():
    def run(regime):
        numbers = {"return": 50.0, "prior_return": 40.0, "best_episode_return_in_dataset": 90.0}
        return {"env": "cheetah", "regime": regime, "regime_episodes": None, "task": "all", "column": "BM+MPO",
                "summary": {"per_task": {"run": numbers}}}

    def paper_row(regime):
        table = reproduce.markdown_table(reproduce.table_rows([run(regime)], ["BM+MPO"]), ["BM+MPO"],
                                         reproduce.PAPER_TABLE_6, reproduce.PAPER_TABLE_6_COLUMNS)
        return table[3]

    assert paper_row("all 80") == "| paper | - | 891.8 | 465.3 |"
    assert paper_row("best 16 of all 80") == "| paper (all its data; it ran no filtered data) | - | 891.8 | 465.3 |"

def test_paper_numbers_transcribed():
    assert all(len(row) == len(reproduce.PAPER_TABLE_6_COLUMNS) for row in reproduce.PAPER_TABLE_6.values())
    assert all(len(row) == len(reproduce.PAPER_TABLE_7_COLUMNS) for row in reproduce.PAPER_TABLE_7.values())
    walker = dict(zip(reproduce.PAPER_TABLE_6_COLUMNS, reproduce.PAPER_TABLE_6["walker"]))
    assert (walker["ABM+MPO"], walker["BM+MPO prior"], walker["ABM eps=0"]) == (843.0, 684.8, 838.1)
    lift = dict(zip(reproduce.PAPER_TABLE_7_COLUMNS, reproduce.PAPER_TABLE_7["lift"]))
    assert (lift["ABM+MPO prior"], lift["BM+MPO prior"], lift["BEAR"]) == (144.9, 122.5, 137.9)


def test_table_reports_the_normalised_score_where_a_dataset_has_reference_scores():
    def run(seed, normalised):
        numbers = {"return": 50.0 + seed, "prior_return": 40.0, "best_episode_return_in_dataset": 90.0}
        if normalised:
            numbers.update(normalised_return=5.0 + seed, normalised_prior_return=4.0)
        return {"env": "walker", "regime": "all", "regime_episodes": None, "task": "all", "column": "ABM+MPO",
                "summary": {"per_task": {"walk": numbers}}}

    with_scores = reproduce.markdown_table(reproduce.table_rows([run(0, True), run(2, True)], ["ABM+MPO"]),
                                           ["ABM+MPO"], {}, ())
    assert "| ABM+MPO | ABM+MPO normalised | ABM+MPO prior | ABM+MPO prior normalised |" in with_scores[0]
    # two seeds 2 apart: the bootstrap's resamples are (50, 50), (50, 52), (52, 52), so the interval is [50, 52]
    assert with_scores[2].endswith("| 51.0 [50.0, 52.0] (2) | 6.0 [5.0, 7.0] (2) | 40.0 [40.0, 40.0] (2) | "
                                   "4.0 [4.0, 4.0] (2) |")
    without = reproduce.markdown_table(reproduce.table_rows([run(0, False)], ["ABM+MPO"]), ["ABM+MPO"], {}, ())
    assert "normalised" not in without[0]


def test_statistics_over_seeds():
    """The interval, IQM and probability-of-improvement arithmetic the results tables rest on."""
    x, y = [10.0, 12.0, 11.0, 13.0, 9.0], [5.0, 6.0, 4.0, 7.0, 5.0]
    low, high = reproduce.bootstrap(lambda v: v.mean(-1), x)
    assert 9.0 <= low < np.mean(x) < high <= 13.0 and (low, high) == reproduce.bootstrap(lambda v: v.mean(-1), x)
    assert reproduce.interquartile_mean([1.0, 2.0, 3.0, 4.0, 100.0]) == 3.0  # the outlying seed is trimmed
    assert reproduce.interquartile_mean([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert reproduce.probability_of_improvement(x, y) == 1.0 and reproduce.probability_of_improvement(y, x) == 0.0
    assert reproduce.probability_of_improvement([1.0, 2.0], [1.0, 2.0]) == 0.5
    lines = reproduce.comparisons({("cheetah (all 80)", "cheetah"): {"best": [200.0], "ABM+MPO": x, "BM+MPO": y,
                                                                     "MPO": x}})
    assert "| ABM+MPO vs BM+MPO | 5.6 [" in lines[2] and "yes, first higher" in lines[2]
    assert "| ABM+MPO vs MPO | 0.0 [" in lines[3] and "| no |" in lines[3]
    alone = reproduce.comparisons({("cheetah (best 16 of all 80)", None): {"best": [300.0], "BM+MPO": x}})
    assert len(alone) == 1 and alone[0].startswith("No pair of the paper's orderings")


@pytest.mark.parametrize("flags, words", [
    (["--out", "/proc/no-such-folder"], "cannot write to /proc/no-such-folder"),
    (["--set", "num_cpus=4", "--num-cpus", "2"], "asks for 4 CPUs per job and this cluster has 2"),
    (["--set", "num_gpus=0.5"], "asks for 0.5 GPU per job"),
    (["--set", "seeds=x"], "'x' is not a tuple"),
    (["--set", "control_columns=ABM+MPO,NOPE"], "unknown column(s) NOPE"),
    (["--set", "updates=0"], "--set updates=0: updates must be > 0"),
    (["--set", "eval_episodes=-2"], "eval_episodes must be > 0"),
    (["--set", "seeds="], "give one or more seeds >= 0"),
    (["--set", "num_gpus=-1"], "num_gpus must be >= 0"),
    (["--set", "best_episodes=-1"], "best_episodes must be >= 0"),
    (["--set", "best_episodes=1"], "learns from the best episodes of published cartpole-balance data and"),
    (["--report"], "holds no finished runs"),  # a folder the preset never wrote to: a traceback before
])
def test_bad_grid_settings_are_one_sentence_before_anything_runs(flags, words, tmp_path):
    """An unsatisfiable resource request used to leave Ray waiting forever; an unwritable folder gave a traceback."""
    command = [sys.executable, "benchmarks/reproduce.py", "--preset", "smoke", "--local", "--work", str(tmp_path / "w"),
               *(["--out", str(tmp_path / "o")] if "--out" not in flags else []), *flags]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode != 0 and words in process.stderr and "Traceback" not in process.stderr, process.stderr
    assert not list((tmp_path / "w").glob("runs/*"))  # nothing started


def test_a_second_grid_on_the_same_folders_is_one_sentence_and_starts_nothing(tmp_path):
    """The same command run again in another terminal while the first runs: every job would start twice, and each
    run would refuse the other's directory (seen: 6 failed jobs in each of two smoke grids). Here a process holds
    --work as a running grid does; once it ends, the grid runs."""
    work, out = tmp_path / "w", tmp_path / "o"
    work.mkdir()
    with held_by_another_process(work):
        with pytest.raises(SystemExit, match=f"another reproduce.py is running on {work}: wait for it"):
            with contextlib.redirect_stdout(io.StringIO()):
                reproduce.reproduce(reproduce.PRESETS["smoke"], out, work, jobs=[], local=True)
        assert not (work / "runs").exists() and not reproduce.HELD
    with contextlib.redirect_stdout(io.StringIO()):
        reproduce.reproduce(reproduce.PRESETS["smoke"], out, work, jobs=[], local=True)
    assert (out / "table.md").exists() and not reproduce.HELD


def test_a_grid_never_mixes_two_datasets_of_one_env(tmp_path):
    """collect.py is not bit-reproducible across machines: a fresh checkout that collected again would continue a
    published grid on other data. Before anything runs: one sentence, for a missing and for a different file."""
    work, out = tmp_path / "work", tmp_path / "results"
    jobs = reproduce.build_grid(SMOKE, work)
    env = next(job.labels["env"] for job in jobs if job.kind == "train")
    dataset = work / "datasets" / f"{env}.npz"
    published = out / "runs" / "earlier-run"
    published.mkdir(parents=True)
    (published / "job.json").write_text(json.dumps({"env": env}))
    recorded = write_random_dataset_bytes(tmp_path / "recorded.npz", seed=0)
    (published / "config.json").write_text(json.dumps({"dataset_sha256": hashlib.sha256(recorded).hexdigest()}))
    with pytest.raises(SystemExit, match=f"holds 1 run.*{env} data.*is missing: put that file back"):
        reproduce.check_datasets(jobs, out, collected=False)
    reproduce.check_datasets(jobs, out, collected=True)  # a dataset still being collected is checked when it is done
    dataset.parent.mkdir(parents=True)
    dataset.write_bytes(write_random_dataset_bytes(tmp_path / "other.npz", seed=1))
    with pytest.raises(SystemExit, match="would mix two datasets"):
        reproduce.check_datasets(jobs, out, collected=True)
    dataset.write_bytes(recorded)
    reproduce.check_datasets(jobs, out, collected=False)  # the recorded data: the grid goes on


def write_random_dataset_bytes(path: Path, seed: int) -> bytes:
    from tests.helpers import write_random_dataset

    return write_random_dataset(path, seed=seed).read_bytes()


def published_elsewhere(tmp_path: Path, episodes: int, length: int = 40, **changes):
    """The smoke preset with `changes`, learning from random cartpole data published in <tmp_path>/elsewhere
    (`datasets_from`, absolute: ROOT / it is itself); returns (preset, the published file)."""
    from tests.helpers import write_random_dataset

    env = SMOKE.control_tasks[0]
    (tmp_path / "elsewhere").mkdir()
    published = write_random_dataset(tmp_path / "elsewhere" / f"{env}.npz", episodes=episodes, length=length, env=env)
    return dataclasses.replace(SMOKE, datasets_from=str(published.parent), **changes), published


def test_a_runs_command_stays_the_same_once_its_dataset_is_a_link(tmp_path):
    """A published dataset is linked into the work folder; the train commands must name the link as before it
    existed, or a killed run's --resume refuses the changed --dataset (seen when the cpu grid was restarted)."""
    work = tmp_path / "work"
    before = [job.command for job in reproduce.build_grid(SMOKE, work) if job.kind == "train"]
    (work / "datasets").mkdir(parents=True)
    for env in {command[command.index("--env") + 1] for command in before}:
        (tmp_path / f"published-{env}.npz").write_bytes(b"")
        (work / "datasets" / f"{env}.npz").symlink_to(tmp_path / f"published-{env}.npz")
    after = [job.command for job in reproduce.build_grid(SMOKE, work) if job.kind == "train"]
    assert after == before


def test_a_preset_can_learn_from_another_presets_published_data(tmp_path):
    """The cpu-critic preset reruns two columns of the cpu grid with one setting changed: it must learn from the
    cpu preset's published file (collecting again gives other data), with the changed flag in every run."""
    import tyro

    import abm_mpo

    critic = reproduce.PRESETS["cpu-critic"]
    assert (ROOT / critic.datasets_from / "cheetah.npz").exists()  # results/cpu/datasets, published in git
    runs = [job for job in reproduce.build_grid(critic, Path("/tmp/grid")) if job.kind == "train"]
    assert len(runs) == 2 * 2 * 5 and {job.labels["column"] for job in runs} == {"ABM+MPO", "BM+MPO"}
    assert {tyro.cli(abm_mpo.Args, args=job.command[2:]).target_update_period for job in runs} == {20}
    dry = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--preset", "cpu-critic", "--dry-run", "--work",
                          str(tmp_path / "dry")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert dry.stdout.startswith("published  dataset-cheetah: python collect.py"), dry.stdout[:300] + dry.stderr
    # A smoke grid whose data is published elsewhere: its dataset is linked from there and nothing is collected.
    env = SMOKE.control_tasks[0]
    preset, published = published_elsewhere(tmp_path, SMOKE.collect_episodes)
    elsewhere = published.parent
    work, out = tmp_path / "work", tmp_path / "results"
    collection = [job for job in reproduce.build_grid(preset, work) if job.name == f"dataset-{env}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(preset, out, work, num_cpus=1, jobs=collection, local=True)
    assert (work / "datasets" / f"{env}.npz").resolve() == (elsewhere / f"{env}.npz").resolve()
    assert f"-> {elsewhere / f'{env}.npz'} (published with the results)" in printed.getvalue()
    assert not (work / "logs" / f"dataset-{env}.log").exists()  # not collected


@pytest.mark.slow  # one smoke learning run (two for the time budget)
def test_a_preset_can_learn_from_the_best_episodes_of_published_data(tmp_path):
    """The cpu-filtered control learns from the best 16 of the cpu preset's 80 episodes. The grid derives that file
    from the published one before it starts, every time, and must get the same bytes again, or a rerun would refuse
    its own runs as learned from other data."""
    filtered = reproduce.PRESETS["cpu-filtered"]
    runs = [job for job in reproduce.build_grid(filtered, Path("/tmp/grid")) if job.kind == "train"]
    assert len(runs) == 5 and {job.labels["column"] for job in runs} == {"BM+MPO"}
    assert {job.command[job.command.index("--dataset") + 1] for job in runs} == {"/tmp/grid/datasets/cheetah-best16.npz"}
    assert {job.labels["regime"] for job in runs} == {"best 16 of all 80"}
    with pytest.raises(SystemExit, match="its regimes must use all episodes"):
        reproduce.build_grid(dataclasses.replace(reproduce.PRESETS["cpu"], best_episodes=16), Path("/tmp/grid"))
    # A smoke grid learning from the best 2 of 4 published episodes of random rewards.
    env = SMOKE.control_tasks[0]
    preset, source = published_elsewhere(tmp_path, 4, length=50, best_episodes=2, sawyer_tasks=())
    with np.load(source) as stored:
        returns = [stored["reward"][stored["episode_id"] == i].sum() for i in range(4)]
    work, out = tmp_path / "work", tmp_path / "results"
    grid = reproduce.build_grid(preset, work)
    jobs = [job for job in grid if job.kind != "train"] + [next(job for job in grid if job.kind == "train")]
    for attempt in range(2):  # the second: the run is done and its data derived again
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            reproduce.reproduce(preset, out, work, num_cpus=1, jobs=jobs, local=True)
        assert f"datasets/{env}-best2.npz: the best 2 of 4 episodes" in printed.getvalue()
    derived = work / "datasets" / f"{env}-best2.npz"
    with np.load(derived) as kept:
        assert np.unique(kept["episode_id"]).tolist() == sorted(np.argsort(returns)[-2:].tolist())
    config = json.loads((out / "runs" / jobs[-1].name / "config.json").read_text())
    assert config["dataset_sha256"] == hashlib.sha256(derived.read_bytes()).hexdigest()
    assert "of which only the best 2 episodes by return" in (out / "table.md").read_text()


@pytest.mark.slow  # one smoke learning run (two for the time budget)
def test_a_time_budget_stops_a_run_and_the_rerun_resumes_it(tmp_path):
    """--time-budget: the run still going at the deadline is stopped, its evaluations so far are kept apart in
    <out>/unfinished (never in the table); the rerun resumes it from its checkpoint, publishes it and drops the
    partial copy, which would otherwise sit beside the finished run."""
    # 2,500 updates, so the run is still going at the 8 s deadline (at 1,000, on a loaded machine, it once finished
    # just as the stop came, which counts as done: the next test)
    preset, _ = published_elsewhere(tmp_path, 4, length=50, updates=2500, eval_every=25, sawyer_tasks=())
    work, out = tmp_path / "work", tmp_path / "results"
    grid = reproduce.build_grid(preset, work)
    job = next(job for job in grid if job.kind == "train")
    jobs = [j for j in grid if j.kind != "train"] + [job]
    with contextlib.redirect_stdout(io.StringIO()):
        reproduce.reproduce(preset, out, work, num_cpus=1, jobs=jobs, local=True, time_budget=8)
    partial = out / "unfinished" / job.name
    assert (partial / "metrics.csv").exists() and "a rerun resumes it" in (partial / "job.json").read_text()
    assert not (out / "runs" / job.name).exists() and (job.run_dir / "checkpoint.pt").exists()
    assert "# stopped by --time-budget" in job.log.read_text()
    with contextlib.redirect_stdout(io.StringIO()):
        reproduce.reproduce(preset, out, work, num_cpus=1, jobs=jobs, local=True)
    assert f"--resume {reproduce.shown(job.run_dir)}" in job.log.read_text()
    assert json.loads((out / "runs" / job.name / "summary.json").read_text())["evaluations"] == 2500 // 25
    with open(out / "runs" / job.name / "metrics.csv") as handle:
        assert int(list(csv.DictReader(handle))[-1]["step"]) == 2500
    assert not partial.exists()


def test_the_shared_start_section_pairs_the_columns_seed_for_seed():
    """table.md's final_eval section: a cell's mean over its seeds, and each ordered pair's paired difference over
    the seeds both columns have, with the seeds where the first is higher, as computed here from the same numbers."""
    finals = {("ABM+MPO", 0): (30.0, 20.0), ("ABM+MPO", 1): (34.0, 26.0), ("ABM+MPO", 2): (31.0, 21.0),
              ("BM+MPO", 0): (25.0, 10.0), ("BM+MPO", 1): (36.0, 12.0), ("BM+MPO", 2): (27.0, 11.0)}

    def run(column, seed, final):
        summary = {"per_task": {}, **({"final_eval": {"episodes": 100, "first_start_seed": 1000,
                                                      "return": final[0], "prior_return": final[1]}} if final else {})}
        return {"env": "quadruped", "regime": "all 60", "column": column, "seed": seed, "summary": summary}

    runs = [run(column, seed, final) for (column, seed), final in finals.items()] + [run("BM+MPO", 3, None)]
    lines = reproduce.final_eval_section(runs, ["ABM+MPO", "ABM+MPO prior", "BM+MPO", "BM+MPO prior"])
    text = "\n".join(lines)
    assert "acted 100 more episodes, episode i from reset(seed=1000 + i)" in text and "6 of 7 runs have it" in text
    cells = next(line for line in lines if line.startswith("| quadruped (all 60) | 31.7"))
    assert cells.removesuffix(" |").split(" | ")[1:5] == [reproduce.mean_std([30.0, 34.0, 31.0]), reproduce.mean_std([20.0, 26.0, 21.0]),
                                       reproduce.mean_std([25.0, 36.0, 27.0]), reproduce.mean_std([10.0, 12.0, 11.0])]
    pairs = {line.split(" | ")[1]: line.split(" | ")[2:] for line in lines if " vs " in line}
    policy = np.array([30.0, 34.0, 31.0]) - np.array([25.0, 36.0, 27.0])  # 5, -2, 4
    assert pairs["ABM+MPO vs BM+MPO"][0].startswith(f"{policy.mean():.1f} [") and pairs["ABM+MPO vs BM+MPO"][1] == "2 of 3"
    assert pairs["ABM+MPO prior vs BM+MPO prior"][1:] == ["3 of 3", "yes |"]  # 10, 14, 10: the interval is [10, 14]
    assert pairs["ABM+MPO prior vs BM+MPO prior"][0] == "11.3 [10.0, 14.0]"
    assert reproduce.final_eval_section([run("BM+MPO", 3, None)], ["BM+MPO"]) == []  # no run has one: no section


@pytest.mark.slow  # one smoke learning run, resumed once to evaluate
def test_a_preset_that_gains_a_final_evaluation_resumes_its_finished_runs_to_give_it(tmp_path):
    """final_eval_episodes added to a preset after its runs finished: the rerun resumes each finished run whose
    checkpoint is here, which only evaluates (metrics.csv and the training's seconds stay), publishes the summary
    with final_eval and puts the section in table.md; a run whose checkpoint is gone stays done, and is named."""
    preset, _ = published_elsewhere(tmp_path, 4, length=50, updates=40, eval_every=20, sawyer_tasks=(),
                                    extra_train_flags=("--eval-max-steps", "30"))
    work, out = tmp_path / "work", tmp_path / "results"
    grid = reproduce.build_grid(preset, work)
    job = next(job for job in grid if job.kind == "train")
    jobs = [j for j in grid if j.kind != "train"] + [job]
    with contextlib.redirect_stdout(io.StringIO()):
        reproduce.reproduce(preset, out, work, num_cpus=1, jobs=jobs, local=True)
    published = out / "runs" / job.name
    metrics, trained = (published / "metrics.csv").read_bytes(), json.loads((published / "job.json").read_text())
    assert "final_eval" not in json.loads((published / "summary.json").read_text()) and trained["seconds"] > 0

    evaluated = dataclasses.replace(preset, final_eval_episodes=2)
    grid = reproduce.build_grid(evaluated, work)
    job = next(job for job in grid if job.kind == "train")
    assert job.command[job.command.index("--final-eval-episodes") + 1] == "2" and not reproduce.is_done(job)
    assert reproduce.job_state(job, evaluated, out) == "evaluate"
    jobs = [j for j in grid if j.kind != "train"] + [job]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(evaluated, out, work, num_cpus=1, jobs=jobs, local=True)
    assert "1 to run" in printed.getvalue() and "has done all its 40 updates: nothing to train" in job.log.read_text()
    final = json.loads((published / "summary.json").read_text())["final_eval"]
    assert final["episodes"] == 2 and final["first_start_seed"] == 1000
    assert (published / "metrics.csv").read_bytes() == metrics
    record = json.loads((published / "job.json").read_text())
    assert record["seconds"] == trained["seconds"] and record["final_eval_seconds"] > 0
    assert record["commit"] == trained["commit"] and record["final_eval_commit"] == reproduce.run_commit(job)
    entry = json.loads((out / "manifest.json").read_text())["jobs"][job.name]
    assert entry["seconds"] == trained["seconds"] and entry["final_eval_seconds"] == record["final_eval_seconds"]
    table = (out / "table.md").read_text()
    assert "## The final checkpoint from shared start states" in table and "1 of 1 runs have it" in table

    printed = io.StringIO()  # done now; and a run that lacks it with no checkpoint here counts as done, named
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(evaluated, out, work, num_cpus=1, jobs=jobs, local=True)
    assert "0 to run" in printed.getvalue() and "lack the preset's final evaluation" not in printed.getvalue()
    assert reproduce.job_state(job, evaluated, out) == "done"
    again = dataclasses.replace(preset, final_eval_episodes=3)
    (job.run_dir / "checkpoint.pt").unlink()
    grid = reproduce.build_grid(again, work)
    jobs = [j for j in grid if j.kind != "train"] + [next(job for job in grid if job.kind == "train")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reproduce.reproduce(again, out, work, num_cpus=1, jobs=jobs, local=True)
    assert "0 to run" in printed.getvalue() and "1 finished run(s) lack the preset's final evaluation" in printed.getvalue()


def test_a_run_that_finished_as_the_time_budget_stopped_it_counts_as_done(tmp_path):
    """The deadline's SIGTERM can reach a run after it wrote summary.json: it is published as done, with no partial
    copy under <out>/unfinished beside it."""
    run_dir, out = tmp_path / "work" / "runs" / "finished", tmp_path / "results"
    code = (f"import json, pathlib, time; d = pathlib.Path({str(run_dir)!r}); d.mkdir(parents=True); "
            "[(d / n).write_text('{}') for n in ('summary.json', 'metrics.csv', 'config.json')]; time.sleep(60)")
    job = reproduce.Job("finished", "train", ["python", "-c", code], tmp_path / "work" / "logs" / "finished.log",
                        run_dir=run_dir, labels={"env": "cartpole-balance", "task": "all", "regime": "full",
                                                 "regime_episodes": None, "column": "ABM+MPO", "seed": 0})
    with contextlib.redirect_stdout(io.StringIO()):
        outcome = reproduce.run_grid([job], SMOKE, num_cpus=1, local=True, deadline=time.time() + 3, out=out)
        reproduce.publish_runs([job], outcome, out)
    assert "stopped by --time-budget" in job.log.read_text()  # the stop did reach it
    assert outcome["finished"]["status"] == "done"
    assert (out / "runs" / "finished" / "summary.json").exists() and not (out / "unfinished" / "finished").exists()


def test_a_grid_with_other_settings_than_its_finished_runs_is_one_sentence_and_starts_nothing(tmp_path):
    """Seen by hand: `--preset cpu --set updates=8000` counted the 60 published 4,000-update runs as done, and the
    table it wrote said 8000 updates; a run started anew would have replaced a published one."""
    import tyro

    import abm_mpo

    work, out = tmp_path / "work", tmp_path / "results"
    job = next(job for job in reproduce.build_grid(SMOKE, work) if job.kind == "train" and job.labels["column"] == "ABM+MPO")
    args = tyro.cli(abm_mpo.Args, args=job.command[2:])
    published = out / "runs" / job.name
    published.mkdir(parents=True)
    (published / "config.json").write_text(json.dumps({"args": json.loads(json.dumps(dataclasses.asdict(args)))}))
    (published / "metrics.csv").write_text(f"step,eval/return\n{args.eval_every},1.0\n{args.total_steps},2.0\n")
    (published / "summary.json").write_text("{}")

    def refusal(preset):
        jobs = [j for j in reproduce.build_grid(preset, work) if j.name == job.name]
        jobs[0].published = published
        try:
            reproduce.check_settings(jobs, out)
        except SystemExit as error:
            return str(error), reproduce.job_state(jobs[0], preset, out)
        return None, reproduce.job_state(jobs[0], preset, out)

    assert refusal(SMOKE) == (None, "done")  # the settings it was made with
    message, state = refusal(reproduce.override(SMOKE, ["batch=7"]))
    assert state == "differs" and message == (
        f"reproduce.py: error: 1 finished run(s) of this grid were made with other settings (first: {job.name}: "
        f"--batch-size {args.batch_size} (this grid: 7)) in {reproduce.shown(out)} or {reproduce.shown(work / 'runs')}; "
        "give this grid its own --out and --work, or move those runs away")
    more = reproduce.override(SMOKE, [f"updates={2 * args.total_steps}", f"eval_every={args.eval_every}"])
    assert f"--total-steps {args.total_steps} (this grid: {2 * args.total_steps})" in refusal(more)[0]
    # a run a resume took to the new total (config.json keeps its first values): its last update counts
    (published / "metrics.csv").write_text(f"step,eval/return\n{args.total_steps},1.0\n{2 * args.total_steps},2.0\n")
    assert refusal(more) == (None, "done")
    with pytest.raises(SystemExit, match="made with other settings"), contextlib.redirect_stdout(io.StringIO()):
        reproduce.reproduce(reproduce.override(SMOKE, ["batch=7"]), out, work, jobs=[
            j for j in reproduce.build_grid(reproduce.override(SMOKE, ["batch=7"]), work) if j.name == job.name],
            local=True)
    assert not (work / "logs" / f"{job.name}.log").exists()  # nothing ran
    # switches read as config.json's booleans, numbers as numbers
    assert reproduce.command_flags(["python", "x.py", "--no-cuda-graph", "--normalize-observations", "--lr", "2e-4"]) \
        == {"lr": ["2e-4"], "cuda_graph": ["False"], "normalize_observations": ["True"]}
    assert reproduce.same_value(["False"], False) and reproduce.same_value(["2e-4"], 0.0002)
    assert not reproduce.same_value(["1"], True) and not reproduce.same_value(["256", "256"], [256])
