"""Claims of the README about the learning scripts that had no test: Table 6's final-return protocol
with enough evaluations to tell "the last 10%" from "the last one", runs of `--prior none` and
`--epsilon 0`, the refusal of a dataset whose stored action bounds are not the env's, the hard
target copy every 200 updates, the gradient-norm clip at 40, and an interrupted run keeping its last
policy.pt2. Only `train(Args(...))`, the public helpers of tests.conftest and the files of the run
directory (metrics.csv, checkpoint.pt, policy.pt2, summary.json) are used."""

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import abm_mpo
import sawyer_env
from tests.conftest import SMOKE_ENV, write_random_dataset


def tiny(dataset, run_dir, **overrides):
    settings = dict(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(run_dir), batch_size=16, num_action_samples=4,
                    policy_layers=(16, 16), critic_layers=(16, 16), eval_episodes=1, eval_max_steps=10,
                    device="cpu", total_steps=4, eval_every=2, checkpoint_every=2)
    return abm_mpo.Args(**{**settings, **overrides})


def train(args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return abm_mpo.train(args)


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_final_return_is_the_mean_of_the_last_10_percent_of_20_evaluations(random_dataset, tmp_path):
    summary = train(tiny(random_dataset, tmp_path / "run", total_steps=20, eval_every=1, checkpoint_every=20))
    rows = metrics(tmp_path / "run")
    returns = [float(row["eval/return"]) for row in rows]
    assert len(returns) == 20 and summary["evaluations"] == 20
    assert returns[-1] != returns[-2]  # the last two differ, so "the last 10%" is not "the last one"
    assert summary["final/return"] == pytest.approx(np.mean(returns[-2:]), rel=1e-6)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final/return"] == summary["final/return"]


def test_prior_none_is_plain_offline_mpo_with_no_prior_network(random_dataset, tmp_path):
    train(tiny(random_dataset, tmp_path / "run", prior="none"))
    rows = metrics(tmp_path / "run")
    assert [int(row["step"]) for row in rows] == [2, 4] and all(math.isfinite(float(r["eval/return"])) for r in rows)
    assert all(row.get("eval/prior_return", "") == "" for row in rows)  # nothing to evaluate on its own
    assert all(math.isfinite(float(row["losses/policy"])) and float(row["charts/temperature"]) > 0 for row in rows)
    agent = checkpoint(tmp_path / "run")["agent"]
    assert not any(key.startswith("prior.") for key in agent) and any(key.startswith("policy.") for key in agent)


def test_epsilon_zero_evaluates_the_prior_and_trains_no_policy(random_dataset, tmp_path):
    train(tiny(random_dataset, tmp_path / "run", epsilon=0.0))
    rows = metrics(tmp_path / "run")
    assert [int(row["step"]) for row in rows] == [2, 4] and all(math.isfinite(float(r["eval/return"])) for r in rows)
    assert all(math.isfinite(float(row["losses/prior"])) for row in rows)
    agent = checkpoint(tmp_path / "run")["agent"]
    assert any(key.startswith("prior.") for key in agent) and not any(key.startswith("policy.") for key in agent)
    # eval/return is the prior's: the exported policy is the prior's mean
    extra = {"policy.json": ""}
    exported = torch.export.load(str(tmp_path / "run" / "policy.pt2"), extra_files=extra).module()
    net = abm_mpo.Agent(5, 1, 1, tiny(random_dataset, tmp_path / "x", epsilon=0.0)).prior
    net.load_state_dict({key[len("prior."):]: value for key, value in agent.items() if key.startswith("prior.")})
    observation = torch.randn(6, 5)
    with torch.no_grad():
        expected = net(observation[None])[0][0].clamp(-1, 1)
    torch.testing.assert_close(exported(observation, torch.zeros(6, dtype=torch.int64)), expected, rtol=0, atol=1e-6)


def sawyer_dataset(path, action_low, action_high):
    write_random_dataset(path, obs_dim=sawyer_env.OBS_DIM, act_dim=sawyer_env.ACT_DIM, episodes=2, length=20,
                         tasks=sawyer_env.TASKS)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["metadata"] = np.array(json.dumps({"env": "sawyer", "tasks": list(sawyer_env.TASKS),
                                              "action_low": list(action_low), "action_high": list(action_high)}))
    np.savez(path, **arrays)
    return path


def test_a_sawyer_dataset_with_other_action_bounds_is_refused_in_one_sentence(tmp_path):
    wrong = sawyer_dataset(tmp_path / "wrong.npz", [-1.0] * 5, [1.0] * 5)  # normalised, not physical
    with pytest.raises(abm_mpo.UserError) as error:
        train(tiny(wrong, tmp_path / "run", env="sawyer", task="reach"))
    message = str(error.value)
    assert message.startswith(f"dataset {wrong} has action bounds") and "\n" not in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_control_suite_dataset_with_other_action_bounds_is_refused(tmp_path):
    dataset = write_random_dataset(tmp_path / "data.npz")
    with np.load(dataset) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["metadata"] = np.array(json.dumps({"env": SMOKE_ENV, "tasks": ["balance"], "action_low": [-2.0],
                                              "action_high": [2.0]}))  # cartpole takes [-1, 1]
    np.savez(dataset, **arrays)
    with pytest.raises(abm_mpo.UserError, match="action bounds"):
        train(tiny(dataset, tmp_path / "run", total_steps=1, eval_every=1, checkpoint_every=1))


def target_equals_online(agent: dict) -> dict:
    """for the critic and the policy: is every target tensor equal to its online tensor?"""
    equal = {}
    for name in ("critic", "policy"):
        keys = [key for key in agent if key.startswith(f"target_{name}.")]
        assert keys, name
        equal[name] = all(torch.equal(agent[key], agent[key[len("target_"):]]) for key in keys)
    return equal


def test_targets_are_hard_copies_made_every_200_updates(random_dataset, tmp_path):
    run_dir = tmp_path / "run"
    seen = {}
    for steps in (199, 200, 201):
        resume = {} if steps == 199 else {"resume": str(run_dir)}
        train(tiny(random_dataset, run_dir, total_steps=steps, eval_every=1000, checkpoint_every=1000,
                   batch_size=8, num_action_samples=2, **resume))
        state = checkpoint(run_dir)
        assert state["step"] == steps
        seen[steps] = target_equals_online(state["agent"])
    assert seen == {199: {"critic": False, "policy": False}, 200: {"critic": True, "policy": True},
                    201: {"critic": False, "policy": False}}


def test_gradients_are_clipped_at_norm_40_per_network(tmp_path):
    """Adam's first moment after one update is (1 - beta1) g, so the clipped gradient is read back from
    the checkpoint. Rewards and dataset actions scaled by 1e4 make the critic's gradient (TD error)
    and the prior's (likelihood of the unclipped logged actions) far larger than 40; the policy's,
    fitted to samples of the prior, is not. Each network clipped to norm 40 on its own, the joint
    norm lies in [40 sqrt(2), 40 sqrt(3)]; one clip over all networks would give 40, none ~1e4."""
    dataset = write_random_dataset(tmp_path / "data.npz")
    with np.load(dataset) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for key in ("action", "reward"):
        arrays[key] = arrays[key] * 1e4
    np.savez(dataset, **arrays)
    norms = {}
    for clip in (40.0, 1e12):
        run_dir = tmp_path / f"clip{clip:g}"
        train(tiny(dataset, run_dir, total_steps=1, eval_every=1, checkpoint_every=1, max_grad_norm=clip))
        optimizer = checkpoint(run_dir)["optimizer"]
        group = optimizer["param_groups"][0]  # the networks (the duals are the second group)
        beta1 = group["betas"][0]
        first_moments = [optimizer["state"][index]["exp_avg"] for index in group["params"]]
        norms[clip] = float(torch.sqrt(sum((m / (1 - beta1)).pow(2).sum() for m in first_moments)))
    assert norms[1e12] > 1e3  # the test data really produce gradients far above the clip
    assert 40.0 * math.sqrt(2) * (1 - 1e-4) <= norms[40.0] <= 40.0 * math.sqrt(3) * (1 + 1e-4), norms


def test_an_interrupted_run_keeps_its_last_policy(random_dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(tiny(random_dataset, run_dir, total_steps=4))
    last = (run_dir / "policy.pt2").read_bytes()
    write_bytes = Path.write_bytes

    def interrupted_write(self, data):  # Ctrl-C while the step-6 export is being written
        if self.name != "policy.tmp":
            return write_bytes(self, data)
        write_bytes(self, data[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(random_dataset, None, total_steps=8, resume=str(run_dir)))
    assert (run_dir / "policy.pt2").read_bytes() == last and not (run_dir / "policy.tmp").exists()
    extra = {"policy.json": ""}
    exported = torch.export.load(str(run_dir / "policy.pt2"), extra_files=extra).module()
    assert exported(torch.zeros(1, 5), torch.zeros(1, dtype=torch.int64)).shape == (1, 1)
