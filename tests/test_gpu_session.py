"""benchmarks/gpu_session.py rehearsed on the CPU (`--device cpu --rehearsal`): every stage of the one GPU call
runs its real commands at tiny sizes, so that a typo, a wrong path or a missing output is found here and not
in the 15 minutes of a lent GPU. Checked: each stage ends "ok", writes its files, the results grid is sized
from the speed the stage measured, and the archive unpacks into results/gpu/ as the README says."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.helpers import ROOT, write_random_dataset

pytestmark = pytest.mark.slow


def test_rehearsal_runs_every_stage_and_packs_results_gpu(tmp_path):
    dataset = write_random_dataset(tmp_path / "cheetah.npz", obs_dim=17, act_dim=6, episodes=4, length=50)
    arrays = dict(np.load(dataset))
    arrays["metadata"] = np.array(json.dumps({"env": "cheetah", "tasks": ["run"]}))
    np.savez(dataset, **arrays)
    out, results = tmp_path / "out", tmp_path / "results" / "gpu"
    command = [sys.executable, "benchmarks/gpu_session.py", "--device", "cpu", "--rehearsal", "--out", str(out),
               "--results-dir", str(results), "--work", str(tmp_path / "work"), "--dataset", str(dataset),
               "--wheels", str(tmp_path / "no-wheels"), "--total", "500"]
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    summary = (out / "summary.md").read_text()
    for stage in ("versions", "speed-eager", "speed-compiled", "speed-concurrent", "tests", "results"):
        assert f"| {stage} | ok |" in summary, summary
    assert (out / "session.log").stat().st_size > 1000
    # the random rehearsal data is not the cpu grid's: said, so the two tables are not read as one experiment
    assert "| results: data | cheetah.npz sha256 " in summary and "NOT the cpu grid's data" in summary, summary

    unpacked = tmp_path / "unpacked"
    with tarfile.open(out / "gpu_session.tar.gz") as archive:
        assert all(name.startswith("results/gpu") for name in archive.getnames())
        archive.extractall(unpacked, filter="data")
    gpu = unpacked / "results" / "gpu"
    for name in ("table.md", "manifest.json", "session.md", "session.log", "versions.json", "tests/junit.xml",
                 "tests/pytest.txt", "speed/update_speed_eager.json", "speed/update_speed_compiled.json",
                 "speed/update_speed_concurrent.json", "speed/results_sizing.json"):
        assert (gpu / name).stat().st_size > 0, name

    eager = json.loads((gpu / "speed" / "update_speed_eager.json").read_text())["results"]
    compiled = json.loads((gpu / "speed" / "update_speed_compiled.json").read_text())["results"]
    assert {r["script"] for r in eager} == {"bm_mpo", "bm_mpo sawyer"}  # the Table 5 multi-task row too
    assert [r["script"] for r in compiled] == ["bm_mpo compiled"]
    assert all(r["updates_per_second"] > 0 for r in eager + compiled)
    concurrent = json.loads((gpu / "speed" / "update_speed_concurrent.json").read_text())["results"]
    assert [r["runs"] for r in concurrent] == [1, 2] and all(len(r["per_run"]) == r["runs"] for r in concurrent)

    sizing = json.loads((gpu / "speed" / "results_sizing.json").read_text())
    two = concurrent[1]  # the rehearsal's results stage runs 2 at once: sized by the speed of 2 packed runs
    assert sizing["per_run_updates_per_second_packed"] == pytest.approx(two["updates_per_second_total"] / 2)
    assert 20 <= sizing["updates"] <= 40 and sizing["updates"] % 10 == 0
    runs = sorted(p.name for p in (gpu / "runs").iterdir())
    assert runs == ["cheetah-all80-ABM_MPO-seed0", "sawyer-all-ABM_MPO-seed0"]
    config = json.loads((gpu / "runs" / runs[0] / "config.json").read_text())
    assert config["args"]["total_steps"] == sizing["updates"]
    junit = (gpu / "tests" / "junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit and 'tests="0"' not in junit
