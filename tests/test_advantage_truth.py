"""benchmarks/advantage_truth.py: Eq. 4's decisions against the simulator's advantages. Its premise is that a cheetah
observation sets the simulator's state: from a logged s_t, the logged a_t must give back the logged s_{t+1} and r_t."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import abm_mpo  # noqa: E402
import advantage_truth  # noqa: E402

CHEETAH = ROOT / "results" / "cpu" / "datasets" / "cheetah.npz"  # the cpu preset's published data


@pytest.fixture(scope="module")
def logged():
    with np.load(CHEETAH) as data:
        rows = np.random.default_rng(0).choice(len(data["action"]), 40, replace=False)
        return {key: data[key][rows] for key in ("observation", "action", "reward", "next_observation")}


def test_a_logged_state_set_in_the_simulator_gives_back_the_logged_step(logged):
    env = abm_mpo.make_env("cheetah")
    for observation, action, reward, following in zip(*logged.values()):
        advantage_truth.set_state(env, observation)
        next_observation, step_reward, *_ = env.step(action)
        np.testing.assert_allclose(next_observation, following, atol=1e-4)
        assert step_reward == pytest.approx(float(reward[0]), abs=1e-5)


def test_a_rollout_takes_its_first_action_then_the_policys_mean(logged):
    envs, gamma = [abm_mpo.make_env("cheetah") for _ in range(2)], 0.9
    still = lambda obs: (torch.zeros(*obs.shape[:-1], 6), torch.ones(*obs.shape[:-1], 6))  # noqa: E731
    observation, action = logged["observation"][0], logged["action"][0]
    one = advantage_truth.rollout_returns(envs[:1], still, observation, action[None], 1, gamma)
    assert one[0] == pytest.approx(float(logged["reward"][0][0]), abs=1e-5)  # H = 1: the logged reward itself
    other = np.full(6, 0.5, np.float32)
    three = advantage_truth.rollout_returns(envs, still, observation, np.stack([action, other]), 3, gamma)
    for returned, first in zip(three, (action, other)):  # the same by hand: first action, then zeros twice
        env = abm_mpo.make_env("cheetah")
        advantage_truth.set_state(env, observation)
        rewards = [env.step(a)[1] for a in (first, np.zeros(6), np.zeros(6))]
        assert returned == pytest.approx(rewards[0] + gamma * rewards[1] + gamma ** 2 * rewards[2], abs=1e-6)


def test_rates_sort_the_decisions_against_the_truth():
    truth = np.array([1.0, -1.0, 2.0, -2.0])
    halves = advantage_truth.rates(truth, np.array([1.0, 1.0, -1.0, -1.0]))
    assert (halves["kept"], halves["better_among_kept"], halves["better_among_dropped"], halves["accuracy"]) == \
        (0.5, 0.5, 0.5, 0.5)
    assert halves["phi"] == pytest.approx(0.0, abs=1e-12)
    right = advantage_truth.rates(truth, 3 * truth)
    assert (right["better_among_kept"], right["better_among_dropped"], right["accuracy"]) == (1.0, 0.0, 1.0)
    assert right["phi"] == pytest.approx(1.0) and right["rank_correlation"] == pytest.approx(1.0)


def test_a_run_on_a_task_whose_state_is_not_restorable_is_one_sentence(tmp_path):
    loaded = (SimpleNamespace(env="walker"), {}, ["walker-walk"], {}, None, 0)
    with pytest.raises(SystemExit, match="learned on walker; only cheetah-run sets its simulator"):
        advantage_truth.measure(tmp_path, loaded, np.arange(3), [2], 5, 2, 0)


@pytest.mark.slow  # a 2-update cheetah run, then its rollouts
def test_main_writes_the_table_and_every_number(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    abm_mpo.train(abm_mpo.Args(env="cheetah", dataset=str(CHEETAH), run_dir=str(run_dir), total_steps=2,
                               eval_every=2, checkpoint_every=2, eval_episodes=1, eval_max_steps=5, batch_size=8,
                               num_action_samples=4, policy_layers=(16,), critic_layers=(16,), compile="off"))
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["advantage_truth.py", str(run_dir), "--transitions", "6", "--horizon", "4",
                                      "--samples", "2", "--snippet-lengths", "2", "10",
                                      "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "t.json")])
    advantage_truth.main()
    table = (tmp_path / "t.md").read_text()
    assert table in capsys.readouterr().out
    assert [line.split(" |")[0] for line in table.splitlines() if line.startswith("| critic") or
            line.startswith("| N =")] == ["| critic alone (N = 0)", "| N = 2", "| N = 10"]
    saved = json.loads((tmp_path / "t.json").read_text())[0]
    assert "the policy's own mean action beats V in" in table
    assert len(saved["truth"]) == len(saved["mean_action"]) == len(saved["rows"]) == 6 and set(saved["filters"]) == {
        "critic alone (N = 0)", "N = 2", "N = 10"}
    kept = np.mean(np.array(saved["filters"]["N = 2"]) >= 0)
    assert f"| N = 2 | {kept:.2f} ± 0.00 |" in table
