"""benchmarks/final_eval.py: a finished run's policy and prior, acting again from chosen start states. Given the start
states the run's own last evaluation used, the tool must find exactly the returns the run logged; and every run it
evaluates meets the same start states, so runs that differ only in their seed pair up seed for seed."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, SMOKE_ENV, TEST_DEVICE, write_random_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import final_eval  # noqa: E402
import abm_mpo  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("final_eval")
    data = write_random_dataset(folder / "data.npz", episodes=4, length=30)
    made = {}
    for prior in ("abm", "bm"):
        for seed in (0, 1):
            args = abm_mpo.Args(env=SMOKE_ENV, dataset=str(data), run_dir=str(folder / f"{prior}{seed}"), prior=prior,
                                seed=seed, batch_size=16, num_action_samples=4, policy_layers=(32, 32),
                                critic_layers=(32, 32), eval_episodes=2, eval_max_steps=20, device=TEST_DEVICE,
                                compile="off", total_steps=4, eval_every=4, checkpoint_every=4, snippet_length=3)
            abm_mpo.train(args)
            made[prior, seed] = folder / f"{prior}{seed}"
    return made


def last_evaluation(run_dir):
    rows = [row for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("eval/return")]
    return float(rows[-1]["eval/return"]), float(rows[-1]["eval/prior_return"])


def test_the_runs_own_start_states_give_back_its_logged_returns(runs):
    for (prior, seed), run_dir in runs.items():
        # the run evaluated its 2 episodes from reset(seed=seed + 100 + i) with the same weights as checkpoint.pt
        result = final_eval.evaluate_run(run_dir, episodes=2, seed=seed + 100)
        policy, prior_return = last_evaluation(run_dir)
        assert result["step"] == result["total_steps"] == 4
        assert np.mean(result["policy"]) == pytest.approx(policy, abs=1e-6)
        assert np.mean(result["prior"]) == pytest.approx(prior_return, abs=1e-6)
        assert result["cell"] == ("ABM+MPO N=3" if prior == "abm" else "BM+MPO") and result["seed"] == seed


def test_every_run_meets_the_same_start_states(runs):
    """The same checkpoint twice: the same returns, episode for episode; another seed's run, from the same start
    states, acts differently but is scored on the same episodes."""
    first = final_eval.evaluate_run(runs["abm", 0], episodes=3, seed=7)
    again = final_eval.evaluate_run(runs["abm", 0], episodes=3, seed=7)
    assert first["policy"] == again["policy"] and first["prior"] == again["prior"] and len(first["policy"]) == 3
    elsewhere = final_eval.evaluate_run(runs["abm", 0], episodes=3, seed=8)
    assert elsewhere["policy"][:2] == first["policy"][1:]  # episode i starts from reset(seed=SEED + i)


def test_the_report_pairs_cells_seed_for_seed(runs, tmp_path):
    out, data = tmp_path / "eval.md", tmp_path / "eval.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "final_eval.py"), *map(str, runs.values()),
                    "--episodes", "2", "--out", str(out), "--json", str(data)], check=True, capture_output=True)
    results = json.loads(data.read_text())["runs"]
    means = {(r["cell"], r["seed"]): (np.mean(r["policy"]), np.mean(r["prior"])) for r in results}
    text = out.read_text()
    assert text.startswith("Command: `python benchmarks/final_eval.py ")
    line = next(row for row in text.splitlines() if row.startswith("| ABM+MPO N=3 prior | BM+MPO prior |"))
    difference = np.mean([means["ABM+MPO N=3", s][1] - means["BM+MPO", s][1] for s in (0, 1)])
    assert line.split(" | ")[2].startswith(f"{difference:.1f} [")
    wins = sum(means["ABM+MPO N=3", s][1] > means["BM+MPO", s][1] for s in (0, 1))
    assert f"| {wins} of 2 |" in line
    cell = next(row for row in text.splitlines() if row.startswith("| BM+MPO | "))
    assert f"0: {means['BM+MPO', 0][0]:.1f}, 1: {means['BM+MPO', 1][0]:.1f}" in cell


def test_a_folder_that_is_not_an_abm_mpo_run_gets_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "final_eval.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"final_eval.py: error: {tmp_path} is not a run directory")


def test_an_evaluation_in_pieces_reports_as_one(runs, tmp_path):
    """Two --json pieces combined with --from-json give the report of one command over every run; a piece that met
    other start states is refused in one sentence."""
    script = [sys.executable, str(ROOT / "benchmarks" / "final_eval.py")]
    dirs = [str(path) for path in runs.values()]
    for name, part in (("one", dirs[:2]), ("two", dirs[2:]), ("all", dirs)):
        subprocess.run([*script, *part, "--episodes", "2", "--json", str(tmp_path / f"{name}.json"),
                        "--out", str(tmp_path / f"{name}.md")], check=True, capture_output=True)
    subprocess.run([*script, "--from-json", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--episodes", "2",
                    "--out", str(tmp_path / "joined.md")], check=True, capture_output=True)
    body = lambda name: (tmp_path / name).read_text().split("\n", 2)[2]  # noqa: E731  (after the command line)
    assert body("joined.md") == body("all.md") and "| BM+MPO prior |" in body("joined.md")
    refused = subprocess.run([*script, "--from-json", str(tmp_path / "one.json"), "--episodes", "3"],
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "evaluated --episodes 2 --seed 1000, not --episodes 3 --seed 1000" in refused.stderr


def test_a_pair_with_one_common_seed_fills_the_same_columns():
    """One seed in common: the difference, the win count and '-' for the interval, in the table's column order."""
    assert final_eval.paired({0: 5.0, 1: 9.0}, {0: 2.0, 2: 1.0}) == "3.0 (one seed) | 1 of 1 | -"
    assert final_eval.paired({0: 5.0, 1: 9.0}, {0: 2.0, 1: 1.0}).endswith("| 2 of 2 | yes")
