"""benchmarks/compare.py: table cells of different results folders, compared as reproduce.py compares columns. Runs
are written by hand (job.json and summary.json, as reproduce.py publishes them) with final returns chosen so that
the means, differences and probabilities are known without the code under test."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402  (it imports reproduce.py's statistics; Ray is imported only when a grid runs)


def publish(folder, column, seed, policy, prior, regime="all 80", final=None):
    run = folder / "runs" / f"{regime}-{column}-seed{seed}".replace(" ", "")
    run.mkdir(parents=True)
    run.joinpath("job.json").write_text(json.dumps({"env": "cheetah", "task": "all", "regime": regime,
                                                    "regime_episodes": None, "column": column, "seed": seed}))
    numbers = {"return": policy, "prior_return": prior, "best_episode_return_in_dataset": 300.0}
    shared = {"final_eval": {"episodes": 50, "first_start_seed": 1000, "return": final[0], "prior_return": final[1]}} \
        if final else {}
    run.joinpath("summary.json").write_text(json.dumps({"per_task": {"run": numbers}, **shared}))


@pytest.fixture
def folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, (policy, prior) in enumerate([(100.0, 10.0), (120.0, 12.0), (140.0, 14.0)]):
        publish(a, "BM+MPO", seed, policy, prior)
    for seed, (policy, prior) in enumerate([(1.0, 20.0), (2.0, 10.0), (3.0, 30.0)]):
        publish(b, "ABM+MPO", seed, policy, prior)
        publish(b, "ABM+MPO", seed, policy + 1, prior, regime="first 20")
    return a, b


def test_cells_and_their_differences(folders):
    a, b = folders
    text = compare.report([compare.cell(f"{a}:BM+MPO"), compare.cell(f"{b}:ABM+MPO@cheetah (all 80)")])
    assert f"| {a}: BM+MPO (cheetah (all 80)) | 120.0 [" in text
    assert f"| {b}: ABM+MPO (cheetah (all 80)) | 2.0 [" in text
    # every seed of the first beats every seed of the second: P = 1 in every resample; the difference 120 - 2
    assert "| 118.0 [" in text and "| yes, first higher | 1.00 [1.00, 1.00] |" in text
    text = compare.report([compare.cell(f"{a}:BM+MPO prior"), compare.cell(f"{b}:ABM+MPO prior@cheetah (all 80)")])
    # priors 10, 12, 14 against 20, 10, 30: 12 - 20; of the 9 pairs, 12 > 10 and 14 > 10 win and 10 = 10 ties
    assert "| -8.0 [" in text and "| no | 0.28 [" in text


def test_a_cell_that_does_not_exist_is_one_sentence(folders, tmp_path):
    a, b = folders
    with pytest.raises(SystemExit, match=r"several rows in .*add one of @cheetah \(all 80\), @cheetah \(first 20\)"):
        compare.cell(f"{b}:ABM+MPO")
    with pytest.raises(SystemExit, match=r"no row 'cheetah \(first 40\)'"):
        compare.cell(f"{b}:ABM+MPO@cheetah (first 40)")
    with pytest.raises(SystemExit, match=r"has no column 'MPO' \(its columns: BM\+MPO, BM\+MPO prior\)"):
        compare.cell(f"{a}:MPO")
    with pytest.raises(SystemExit, match="holds no published runs"):
        compare.cell(f"{tmp_path / 'none'}:MPO")
    with pytest.raises(SystemExit, match="give FOLDER:COLUMN"):
        compare.cell(str(a))


def test_the_command_line_writes_the_command_with_the_table(folders, tmp_path):
    a, b = folders
    out = tmp_path / "cmp.md"
    result = subprocess.run([sys.executable, "benchmarks/compare.py", f"{a}:BM+MPO prior",
                             f"{b}:ABM+MPO prior@cheetah (first 20)", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = out.read_text()
    assert written.startswith(f'Command: `python benchmarks/compare.py "{a}:BM+MPO prior" "{b}:ABM+MPO prior@')
    assert result.stdout in written
    alone = subprocess.run([sys.executable, "benchmarks/compare.py", f"{a}:BM+MPO"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert alone.returncode == 2 and "give at least two cells" in alone.stderr


def test_final_eval_cells_pair_seed_for_seed(tmp_path):
    """--final-eval: the runs' final_eval, each pair over the seeds both cells have (seed 3 only in the first)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed, final in enumerate([(50.0, 30.0), (60.0, 41.0), (70.0, 32.0), (80.0, 80.0)]):
        publish(a, "ABM+MPO", seed, 1.0, 1.0, final=final)
    for seed, final in enumerate([(40.0, 20.0), (62.0, 30.0), (55.0, 30.0)]):
        publish(b, "BM+MPO", seed, 1.0, 1.0, final=final)
    first, second = compare.cell(f"{a}:ABM+MPO prior", final_eval=True), compare.cell(f"{b}:BM+MPO prior", True)
    assert first[1] == {0: 30.0, 1: 41.0, 2: 32.0, 3: 80.0} and second[1] == {0: 20.0, 1: 30.0, 2: 30.0}
    text = compare.report([first, second], final_eval=True)
    # prior differences on seeds 0-2: 10, 11, 2; the bootstrap's means lie within [2, 11]
    assert "| 7.7 [" in text and "| 3 of 3 | yes |" in text
    policies = compare.report([compare.cell(f"{a}:ABM+MPO", True), compare.cell(f"{b}:BM+MPO", True)], True)
    assert "| 7.7 [" in policies and "| 2 of 3 |" in policies  # 10, -2, 15
    publish(tmp_path / "plain", "BM+MPO", 0, 1.0, 1.0)
    with pytest.raises(SystemExit, match="have no final_eval .*without --final-eval"):
        compare.cell(f"{tmp_path / 'plain'}:BM+MPO", final_eval=True)


def test_against_first_pairs_the_first_cell_with_each_other_only(folders, tmp_path):
    a, b = folders
    cells = [compare.cell(f"{a}:BM+MPO"), compare.cell(f"{a}:BM+MPO prior"),
             compare.cell(f"{b}:ABM+MPO@cheetah (all 80)")]
    rows = [line for line in compare.report(cells, against_first=True).splitlines() if line.count("|") == 6]
    pairs = [tuple(part.strip() for part in line.split("|")[1:3]) for line in rows[2:]]
    assert pairs == [(f"{a}: BM+MPO (cheetah (all 80))", f"{a}: BM+MPO prior (cheetah (all 80))"),
                     (f"{a}: BM+MPO (cheetah (all 80))", f"{b}: ABM+MPO (cheetah (all 80))")]
    assert "| 108.0 [" in rows[2] and "| 118.0 [" in rows[3]  # 120 - 12 and 120 - 2
    every = [line for line in compare.report(cells).splitlines() if line.count("|") == 6]
    assert len(every) == 2 + 3  # without it, all three pairs
