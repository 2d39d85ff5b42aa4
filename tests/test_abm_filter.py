"""benchmarks/abm_filter.py: what an ABM prior keeps. With a critic that scores every action at the same Q = c, Eq. 4's
advantage of a snippet of constant reward r is (1 - gamma^n) (r / (1 - gamma) - c): an episode is kept whole when
r >= c (1 - gamma) and dropped whole otherwise, whatever the snippet length n. The tool must find exactly that, per
episode and per fifth of the episodes ranked by return, from a real abm_mpo.py run directory."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, SMOKE_ENV, TEST_DEVICE, write_random_dataset

sys.path.insert(0, str(ROOT / "benchmarks"))
import abm_filter  # noqa: E402
import abm_mpo  # noqa: E402

LEVELS = [0.3, 0.6, 0.1, 0.5, 0.2, 0.4]  # the constant reward of episodes 0..5 (out of order on purpose)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filter")
    path = write_random_dataset(folder / "levels.npz", episodes=len(LEVELS), length=30)
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["reward"] = np.repeat(np.array(LEVELS, np.float32), 30)[:, None]
    np.savez(path, **arrays)
    args = abm_mpo.Args(env=SMOKE_ENV, dataset=str(path), run_dir=str(folder / "run"), batch_size=16,
                        num_action_samples=4, policy_layers=(32, 32), critic_layers=(32, 32), eval_episodes=1,
                        eval_max_steps=5, device=TEST_DEVICE, compile="off", total_steps=3, eval_every=3,
                        checkpoint_every=3, snippet_length=4)
    abm_mpo.train(args)
    return folder / "run"


def constant_critic(agent, value: float) -> None:
    """Every Q(s, a) of the target critic becomes `value`: zero weights, the output layer's bias `value`."""
    parameters = list(agent.target_critic.named_parameters())
    with torch.no_grad():
        for _, parameter in parameters:
            parameter.zero_()
        [bias for name, bias in parameters if name.endswith("bias")][-1].fill_(value)


def load_with_constant_critic(monkeypatch, reward: float) -> None:
    """abm_filter.load_run gives every run a critic of Q = reward / (1 - gamma) everywhere (constant_critic)."""
    real = abm_filter.load_run

    def with_constant_critic(path):
        loaded = real(path)
        constant_critic(loaded[4], reward / (1 - loaded[0].discount))
        return loaded

    monkeypatch.setattr(abm_filter, "load_run", with_constant_critic)


def test_the_filter_keeps_the_episodes_whose_reward_beats_the_critic(run_dir):
    args, data, tasks, spec, agent, step = abm_filter.load_run(run_dir)
    assert (step, tasks, args.snippet_length) == (3, ["balance"], 4)
    threshold = 0.35  # between the levels 0.3 and 0.4
    constant_critic(agent, threshold / (1 - args.discount))
    weights = abm_filter.score(args, data, spec, agent)["weight"][:, 0]
    expected = np.repeat([level >= threshold for level in LEVELS], 30).astype(np.float32)
    np.testing.assert_array_equal(weights, expected)
    # A critic below every level keeps everything (the cpu grid's case: V far below its fixed point).
    constant_critic(agent, 0.05 / (1 - args.discount))
    assert abm_filter.score(args, data, spec, agent)["weight"].mean() == 1.0


def test_fifths_and_rank_correlation_of_a_real_run(run_dir, monkeypatch):
    load_with_constant_critic(monkeypatch, 0.35)
    result = abm_filter.analyse(run_dir)
    task = result["tasks"]["balance"]
    assert (result["episodes"], result["transitions"], result["prior"]) == (6, 180, "abm")
    assert task["accepted"] == pytest.approx(0.5)
    # 6 episodes in 5 fifths: the two lowest (0.1, 0.2) first, then one each
    assert [f["accepted"] for f in task["fifths"]] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # what the prior imitates: the three kept episodes, 30 transitions each, a third of the kept data apiece
    assert [f["kept_share"] for f in task["fifths"]] == pytest.approx([0.0, 0.0, 1 / 3, 1 / 3, 1 / 3])
    assert [f["episode_return"] for f in task["fifths"]] == pytest.approx([30 * 0.15, 30 * 0.3, 30 * 0.4, 30 * 0.5, 30 * 0.6])
    # ranks of the returns 0..5 against the accepted fractions' tied ranks (1, 1, 1, 4, 4, 4)
    assert task["rank_correlation"] == pytest.approx(np.corrcoef(np.arange(6), [1, 1, 1, 4, 4, 4])[0, 1])
    assert task["mean_value"] == pytest.approx(35.0, rel=1e-5)
    assert task["between_episodes"] == pytest.approx(1.0)  # whole episodes kept or dropped: no variance inside one
    table = abm_filter.report([result, result])
    assert re.search(r"\| 0\.00 \([45]\) \| 0\.00 \(9\) \| 1\.00 \(12\) \| 1\.00 \(15\) \| 1\.00 \(18\) \| 0\.88 \|", table)
    assert "| mean ± std over 2 runs | | 0.50 ± 0.00 |" in table and "| 0.88 ± 0.00 | 1.00 ± 0.00 |" in table
    assert "| mean over 2 runs | 0.00 | 0.00 | 0.33 | 0.33 | 0.33 |" in table


def test_returns_to_go_stop_at_each_episode_end():
    reward = np.array([[1.0], [1.0], [1.0], [2.0], [2.0]])
    episode_last = np.array([2, 2, 2, 4, 4])
    to_go = abm_filter.returns_to_go(reward, np.ones(5), episode_last, gamma=0.5)
    np.testing.assert_allclose(to_go[:, 0], [1.75, 1.5, 1.0, 3.0, 2.0])


def test_ranks_share_ties_and_spearman_reads_order():
    np.testing.assert_array_equal(abm_filter.ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0.0, 2.5, 1.0])
    assert abm_filter.spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 90.0])) == pytest.approx(1.0)
    assert abm_filter.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(abm_filter.spearman(np.array([1.0, 2.0]), np.array([1.0, 1.0])))


def test_a_folder_that_is_not_an_abm_mpo_run_is_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="is not a run directory with config.json and checkpoint.pt"):
        abm_filter.load_run(tmp_path)


def test_snippet_length_decides_how_much_of_the_logged_rewards_the_filter_reads(run_dir, monkeypatch):
    """Reward 1 at each episode's last step, 0 before it, and a constant critic of V = 1 (gamma = 0.99): a snippet of
    one step has advantage r_t - (1 - gamma) V, so only the last steps pass (1 in 30); a snippet of 30 reaches the
    episode's end from every step t and has advantage gamma^(m-1) - (1 - gamma^m) V with m = 30 - t steps left, at
    least 0.747 - 0.260 > 0, so every step passes. The same checkpoint, scored with the two N."""
    real = abm_filter.load_run

    def with_reward_at_the_end(path):
        args, data, tasks, spec, agent, step = real(path)
        constant_critic(agent, 1.0)
        last = data["episode_last"] == torch.arange(len(data["episode_last"]))
        data["reward"] = last.float()[:, None]
        return args, data, tasks, spec, agent, step

    monkeypatch.setattr(abm_filter, "load_run", with_reward_at_the_end)
    assert abm_mpo.Args().discount == 0.99
    short, long = abm_filter.analyse(run_dir, 1), abm_filter.analyse(run_dir, 30)
    assert (short["snippet_length"], long["snippet_length"]) == (1, 30)
    assert short["tasks"]["balance"]["accepted"] == pytest.approx(1 / 30)
    assert short["tasks"]["balance"]["between_episodes"] == pytest.approx(0.0, abs=1e-12)  # 1 of 30 in every episode
    assert long["tasks"]["balance"]["accepted"] == 1.0
    assert abm_filter.analyse(run_dir)["snippet_length"] == 4  # the run's own N
    table = abm_filter.report([short, short, long, long])
    assert table.count("| mean ± std over 2 runs N = 1 | | 0.03 ± 0.00 |") == 1
    assert table.count("| mean ± std over 2 runs N = 30 | | 1.00 ± 0.00 |") == 1
    assert "| run N = 1 | 3 |" in table and "| mean over 2 runs N = 30 |" in table


def test_a_snippet_length_below_one_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["abm_filter.py", "somewhere", "--snippet-lengths", "10", "0"])
    with pytest.raises(SystemExit) as stopped:
        abm_filter.main()
    assert stopped.value.code == 2
    assert "--snippet-lengths must be positive" in capsys.readouterr().err


def test_a_run_whose_data_moved_or_changed_is_one_sentence(run_dir, tmp_path, monkeypatch):
    """config.json names the data relative to where the run started: found from another directory when that was the
    repository's root; else, or when the file's bytes differ from the checksum the run recorded, one sentence."""
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    data = Path(config["spec"]["dataset"])
    (tmp_path / "root" / "datasets").mkdir(parents=True)
    (tmp_path / "root" / "datasets" / "levels.npz").write_bytes(data.read_bytes())
    config["spec"]["dataset"] = "datasets/levels.npz"  # as a run started in the root names it
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(abm_filter, "ROOT", tmp_path / "root")
    assert abm_filter.load_run(copy)[1]["observation"].shape[0] == 180  # found under the root
    monkeypatch.setattr(abm_filter, "ROOT", tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match=r"^abm_filter.py: error: .*run: dataset datasets/levels.npz does not exist "
                                         r"\(config.json names it relative to the directory the run started in\)$"):
        abm_filter.load_run(copy)
    config["dataset_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(abm_filter, "ROOT", tmp_path / "root")
    with pytest.raises(SystemExit, match="is not the data .* learned from"):
        abm_filter.load_run(copy)


def test_a_run_loaded_once_is_scored_with_each_n_and_keeps_its_own(run_dir):
    """main() loads each run once for all --snippet-lengths: scoring it with another N must not change the run's
    own N for the next call."""
    loaded = abm_filter.load_run(run_dir)
    assert abm_filter.analyse(run_dir, 30, loaded)["snippet_length"] == 30
    assert abm_filter.analyse(run_dir, None, loaded)["snippet_length"] == 4
    assert loaded[0].snippet_length == 4


def test_agreement_is_one_for_the_same_decisions_and_near_zero_for_coin_flips():
    rng = np.random.default_rng(0)
    flips = (rng.random((2, 20000)) < 0.4).astype(np.float32)
    assert abm_filter.phi(flips[0], flips[0]) == pytest.approx(1.0)
    assert abs(abm_filter.phi(flips[0], flips[1])) < 0.03  # two independent filters of the same rate
    assert np.isnan(abm_filter.phi(np.ones(5), flips[0, :5]))  # one that keeps everything decides nothing
    runs = [{"snippet_length": 2, "dataset": "d.npz", "tasks": {"run": {}}, "decisions": d[:, None]}
            for d in (flips[0], flips[0], flips[1])]
    table = abm_filter.agreement(runs, {2: (runs[0], runs[1])})
    pairs = [1.0, abm_filter.phi(flips[0], flips[1]), abm_filter.phi(flips[0], flips[1])]
    assert f"| 2 | run | {np.mean(pairs):.2f} [{min(pairs):.2f}, 1.00] (3 pairs) | 1.00 |" in table


def test_main_reports_the_agreement_of_the_runs_and_its_noise_floor(run_dir, monkeypatch, capsys, tmp_path):
    """With a critic that scores every action alike, V does not depend on the action samples: the same run scored
    twice, and two copies of one run, keep exactly the same transitions."""
    load_with_constant_critic(monkeypatch, 0.35)
    monkeypatch.setattr(sys, "argv", ["abm_filter.py", str(run_dir), str(run_dir), "--json", str(tmp_path / "f.json")])
    abm_filter.main()
    assert "| 4 | balance | 1.00 [1.00, 1.00] (1 pairs) | 1.00 |" in capsys.readouterr().out
    assert "decisions" not in json.loads((tmp_path / "f.json").read_text())[0]  # arrays stay out of the JSON
