"""--final-eval-episodes: after the last update every learning script acts again with its final policy (and prior)
from start states shared by every run, reset(seed=1000 + i), and writes the returns to summary.json's `final_eval`.
A run whose own evaluations start from those very states (--seed 900: reset(seed=900 + 100 + i)) must find the same
returns there as in its last evaluation; a finished run gets the same numbers later with --resume, changing nothing
else."""

import dataclasses
import importlib
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, SMOKE_ENV, TEST_COMPILE, TEST_DEVICE, write_random_dataset
from tests.test_end_to_end import quiet, read_metrics

sys.path.insert(0, str(ROOT / "benchmarks"))  # final_eval.py
pytestmark = pytest.mark.slow  # each test trains (a few updates, about 2 s a run)
SCRIPTS = ["abm_mpo", "bm_mpo", "abm_svg", "bcq", "bear"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_random_dataset(tmp_path_factory.mktemp("final_evaluation") / "data.npz", episodes=4, length=30)


def tiny(module, dataset, run_dir, **overrides):
    """Small networks (each script's own *_layers flags) and 20-step evaluation episodes."""
    fields = {field.name for field in dataclasses.fields(module.Args)}
    sizes = {name: (32, 32) for name in fields if name.endswith("_layers") and name != "shared_layers"}
    settings = dict(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(run_dir), batch_size=16, num_action_samples=4,
                    eval_episodes=2, eval_max_steps=20, device=TEST_DEVICE, compile=TEST_COMPILE, total_steps=6,
                    eval_every=3, checkpoint_every=3, **sizes)
    return module.Args(**{**settings, **overrides})


@pytest.mark.parametrize("script", SCRIPTS)
def test_final_evaluation_from_the_runs_own_start_states_repeats_its_last_evaluation(script, dataset, tmp_path):
    module = importlib.import_module(script)
    summary = quiet(module.train, tiny(module, dataset, tmp_path / "run", seed=900, final_eval_episodes=2))
    last = read_metrics(tmp_path / "run")[-1]
    final = summary["final_eval"]
    assert final["episodes"] == 2 and final["first_start_seed"] == module.FINAL_EVAL_SEED == 1000
    names = [key.removeprefix("eval/") for key in last if key.startswith("eval/")]
    assert sorted(names) == sorted(key for key in final if key.endswith("return"))  # the policy and, where run, the prior
    for name in names:
        assert final[name] == pytest.approx(float(last["eval/" + name]), abs=1e-6), name


def test_final_eval_py_finds_the_same_returns_from_the_same_start_states_whatever_the_seed(dataset, tmp_path):
    """benchmarks/final_eval.py, its own acting loop over the checkpoint, from reset(seed=1000 + i): the numbers each
    run wrote, for two seeds; the runs' own evaluations (reset(seed=seed + 100 + i)) met other states."""
    import abm_mpo
    import final_eval

    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        final = quiet(abm_mpo.train, tiny(abm_mpo, dataset, run_dir, seed=seed, final_eval_episodes=2))["final_eval"]
        again = final_eval.evaluate_run(run_dir, episodes=2, seed=1000)
        assert final["return"] == pytest.approx(np.mean(again["policy"]), abs=1e-6)
        assert final["prior_return"] == pytest.approx(np.mean(again["prior"]), abs=1e-6)
        assert final["return"] != pytest.approx(float(read_metrics(run_dir)[-1]["eval/return"]), abs=1e-6)


def test_a_finished_run_gets_its_final_evaluation_with_resume_and_nothing_else_changes(dataset, tmp_path):
    import abm_mpo

    fresh = quiet(abm_mpo.train, tiny(abm_mpo, dataset, tmp_path / "fresh", final_eval_episodes=2))
    quiet(abm_mpo.train, tiny(abm_mpo, dataset, tmp_path / "later"))
    before = {name: (tmp_path / "later" / name).read_bytes() for name in ("metrics.csv", "config.json", "checkpoint.pt")}
    plain = (tmp_path / "later" / "summary.json").read_text()
    assert "final_eval" not in plain
    resumed = quiet(abm_mpo.train, abm_mpo.Args(resume=str(tmp_path / "later"), final_eval_episodes=2))
    assert resumed["final_eval"] == fresh["final_eval"]  # the same weights, the same start states
    assert {key: value for key, value in resumed.items() if key != "final_eval"} == \
           {key: value for key, value in fresh.items() if key != "final_eval"}
    for name, content in before.items():
        assert (tmp_path / "later" / name).read_bytes() == content, name
    assert torch.load(tmp_path / "later" / "checkpoint.pt", weights_only=True)["step"] == 6
