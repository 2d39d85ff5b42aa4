"""The Sawyer multi-task path (Section 5.2, Table 5): collect.py --env sawyer, rewards of the new
tasks recomputed from the data, normalised actions, one head per task, per-task evaluation."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import collect
import sawyer_env as se

pytestmark = pytest.mark.slow  # every test here trains or collects for seconds


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


@pytest.fixture(scope="module")
def sawyer_data(tmp_path_factory):
    """Two episodes, then a rerun asking for three: the rerun redoes the unfinished block."""
    path = tmp_path_factory.mktemp("sawyer") / "sawyer.npz"
    quiet(collect.train, collect.Args(env="sawyer", episodes=2, output=str(path)))
    with np.load(path, allow_pickle=False) as archive:
        first = {key: archive[key] for key in archive.files}
    quiet(collect.train, collect.Args(env="sawyer", episodes=3, output=str(path)))
    return path, first


def test_collect_sawyer_annotates_all_seven_rewards_of_the_next_observation(sawyer_data):
    path, _ = sawyer_data
    data = abm_mpo.load_dataset(path)
    metadata = data["metadata"]
    assert metadata["env"] == "sawyer" and metadata["tasks"] == list(se.TASKS)
    assert len(np.unique(data["episode_id"])) == 3 and len(data["reward"]) == len(data["observation"])
    assert data["reward"].shape[1] == 7
    expected = se.compute_rewards(data["next_observation"])[:, :7]
    np.testing.assert_allclose(data["reward"], expected, atol=1e-6)
    # task_id: the acting task, constant within an episode, the same as the metadata's list
    task_id = data["task_id"]
    assert task_id.min() >= 0 and task_id.max() < 7
    starts = np.flatnonzero(np.r_[True, np.diff(data["episode_id"]) != 0])
    assert [se.TASKS[k] for k in task_id[starts]] == metadata["episode_tasks"]
    assert all(len(np.unique(ids)) == 1 for ids in np.split(task_id, starts[1:]))
    # physical actions, inside the bounds stored in the metadata, which are the env's
    assert metadata["action_low"] == se.ACTION_LOW.tolist() and metadata["action_high"] == se.ACTION_HIGH.tolist()
    assert np.all(data["action"] >= se.ACTION_LOW) and np.all(data["action"] <= se.ACTION_HIGH)
    assert np.abs(data["action"][:, 4]).max() > 1.0  # the finger rate is in gripper units, not normalised
    returns = metadata["episode_returns"]["stack"]
    assert returns == pytest.approx(np.add.reduceat(data["reward"][:, 5].astype(np.float64), starts).tolist())
    assert sum(rate["episodes"] for rate in metadata["success_rates"].values()) == 3


def test_collect_sawyer_rerun_redoes_the_unfinished_block_exactly(sawyer_data):
    path, first = sawyer_data
    with np.load(path, allow_pickle=False) as archive:
        second = {key: archive[key] for key in archive.files}
    rows = len(first["action"])
    assert len(second["action"]) > rows
    for key in ("observation", "action", "reward", "next_observation", "task_id", "episode_id"):
        np.testing.assert_array_equal(second[key][:rows], first[key], err_msg=key)


def test_collect_sawyer_refuses_to_mix_noise_levels(sawyer_data):
    with pytest.raises(collect.UserError, match="noise"):
        quiet(collect.train, collect.Args(env="sawyer", episodes=3, output=str(sawyer_data[0]), noise=0.1))


def test_new_tasks_are_labelled_from_the_stored_next_observation(sawyer_data):
    data = abm_mpo.load_dataset(sawyer_data[0])
    for task in ("center", "corner"):
        columns, names = abm_mpo.select_tasks(data, task, "sawyer")
        assert names == [task] and data["reward"].shape[1] == columns[0] + 1
        np.testing.assert_allclose(data["reward"][:, columns[0]],
                                   se.REWARD_FUNCTIONS[task](data["next_observation"]), atol=1e-6)
    assert abm_mpo.select_tasks(data, "stack", "sawyer") == ([5], ["stack"])
    assert abm_mpo.select_tasks(abm_mpo.load_dataset(sawyer_data[0]), "all", "sawyer")[1] == list(se.TASKS)
    with pytest.raises(abm_mpo.UserError):
        abm_mpo.select_tasks(abm_mpo.load_dataset(sawyer_data[0]), "center", "hopper")


def test_action_normalisation_round_trip():
    env = abm_mpo.make_env("sawyer", task="stack")
    low, high = env.unwrapped.action_space.low, env.unwrapped.action_space.high
    np.testing.assert_array_equal(low, se.ACTION_LOW)
    assert env.action_space.low.tolist() == [-1.0] * 5 and env.action_space.high.tolist() == [1.0] * 5
    physical = np.random.default_rng(0).uniform(se.ACTION_LOW, se.ACTION_HIGH, (100, 5)).astype(np.float32)
    learner = se.normalise_actions(physical)
    assert learner.min() >= -1 and learner.max() <= 1
    np.testing.assert_array_equal(se.normalise_actions(np.stack([low, high])), [[-1] * 5, [1] * 5])
    # the convention of an exported policy, and the wrapper the learners act through, both invert it
    np.testing.assert_allclose(low + (learner + 1) / 2 * (high - low), physical, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack([env.action(a) for a in learner]), physical, rtol=1e-5, atol=1e-5)


def test_table5_networks_are_built_for_sawyer():
    obs, act, tasks = se.OBS_DIM, se.ACT_DIM, len(se.TASKS)
    args = abm_mpo.Args(env="sawyer")
    assert (args.policy_layers, args.critic_layers, args.shared_layers) == ((200, 300), (400, 400), 1)
    assert abm_mpo.Args(env="hopper").policy_layers == (256, 256)
    assert abm_mpo.Args(env="sawyer", policy_layers=(64,)).policy_layers == (64,)
    agent = abm_mpo.Agent(obs, act, tasks, args)

    def shapes(net):  # torso: (in, out) of nn.Linear; heads: [K, in, out] of MultiHeadLinear
        torso = [tuple(m.weight.shape[::-1]) for m in net.torso if isinstance(m, torch.nn.Linear)]
        heads = [tuple(m.weight.shape) for m in net.head if type(m).__name__ == "MultiHeadLinear"]
        return torso, heads

    for policy in (agent.policy, agent.prior):
        assert shapes(policy.net) == ([(obs, 200)], [(tasks, 200, 300), (tasks, 300, 2 * act)])
    assert shapes(agent.critic.net) == ([(obs + act, 400)], [(tasks, 400, 400), (tasks, 400, 1)])

    bcq_args = bcq.Args(env="sawyer")
    bounds = torch.full((act,), -1.0), torch.full((act,), 1.0)
    bcq_agent = bcq.Agent(obs, act, tasks, *bounds, bcq_args)
    latent = bcq_args.latent_size
    assert shapes(bcq_agent.vae.encoder) == ([(obs + act, 256)], [(tasks, 256, 256), (tasks, 256, 256),
                                                                  (tasks, 256, 2 * latent)])
    assert shapes(bcq_agent.vae.decoder) == ([(obs + latent, 256), (256, 256)], [(tasks, 256, act)])
    assert shapes(bcq_agent.perturbation.net) == ([(obs + act, 256)], [(tasks, 256, 100), (tasks, 100, act)])
    assert shapes(bcq_agent.critic.q1.net) == ([(obs + act, 400)], [(tasks, 400, 400), (tasks, 400, 1)])


def test_one_eval_env_per_task(tmp_path):
    args = abm_mpo.Args(env="sawyer")
    envs = abm_mpo.make_eval_envs(args, tmp_path, list(se.TASKS) + ["center"])
    assert [env.unwrapped.task for env in envs] == list(se.TASKS) + ["center"]


@pytest.mark.parametrize("module", [abm_mpo, abm_svg, bcq, bear], ids=lambda m: m.__name__)
def test_smoke_sawyer_all_tasks_writes_per_task_metrics_and_table(module, sawyer_data, tmp_path):
    small = {"policy_layers": (16, 16), "critic_layers": (16, 16)}
    if module is bcq:
        small = {"encoder_layers": (16, 16), "decoder_layers": (16,), "perturbation_layers": (16, 16),
                 "critic_layers": (16, 16), "latent_size": 4, "num_eval_samples": 2}
    if module is not bcq:
        small["num_action_samples"] = 4
    args = module.Args(env="sawyer", task="all", dataset=str(sawyer_data[0]), run_dir=str(tmp_path / "run"),
                       batch_size=8, total_steps=2, eval_every=2, checkpoint_every=2, eval_episodes=1,
                       eval_max_steps=5, device="cpu", **small)
    summary = quiet(module.train, args)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    for task in se.TASKS:
        for name in ("return", "prior_return"):
            value = float(rows[0][f"eval/{name}/{task}"])
            assert 0.0 <= value <= 5.0  # rewards are in [0, 1], 5 steps
        if module in (abm_mpo, abm_svg):  # the policy mean is both evaluated and exported: replay it
            # (BCQ and BEAR evaluate a sampled argmax/max, which the exported deterministic policy is not)
            assert float(rows[0][f"eval/return/{task}"]) == pytest.approx(
                replay_exported(tmp_path / "run" / "policy.pt2", task, steps=5), rel=1e-4, abs=1e-6)
    assert float(rows[0]["eval/return"]) == pytest.approx(np.mean([float(rows[0][f"eval/return/{t}"]) for t in se.TASKS]))
    data = abm_mpo.load_dataset(sawyer_data[0])
    best = np.add.reduceat(data["reward"].astype(np.float64), abm_mpo.episode_starts(data["episode_id"]), axis=0).max(0)
    assert list(summary["per_task"]) == list(se.TASKS)
    for task, best_return in zip(se.TASKS, best):
        row = summary["per_task"][task]
        assert row["return"] == pytest.approx(float(rows[0][f"eval/return/{task}"]))
        assert row["best_episode_return_in_dataset"] == pytest.approx(best_return)
    spec = json.loads((tmp_path / "run" / "config.json").read_text())["spec"]
    assert spec["action_low"] == [-1.0] * 5 and spec["env_action_high"] == se.ACTION_HIGH.tolist()


def replay_exported(path, task, steps, seed=100):
    """return of the exported policy (physical units) on SawyerEnv(task) from reset(seed), `steps` steps"""
    extra = {"policy.json": ""}
    policy = torch.export.load(str(path), extra_files=extra).module()
    task_index = torch.tensor([json.loads(extra["policy.json"])["tasks"].index(task)])
    env = se.SawyerEnv(task)
    observation, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(steps):
        action = policy(torch.as_tensor(observation)[None], task_index)[0].detach().numpy()
        observation, reward, *_ = env.step(action)
        total += reward
    return total


def test_smoke_sawyer_new_task_learns_and_evaluates_on_its_own_env(sawyer_data, tmp_path):
    args = abm_mpo.Args(env="sawyer", task="corner", dataset=str(sawyer_data[0]), run_dir=str(tmp_path / "run"),
                        batch_size=8, num_action_samples=4, total_steps=2, eval_every=2, checkpoint_every=2,
                        eval_episodes=1, eval_max_steps=5, device="cpu", policy_layers=(16, 16),
                        critic_layers=(16, 16))
    summary = quiet(abm_mpo.train, args)
    data = abm_mpo.load_dataset(sawyer_data[0])
    corner = se.REWARD_FUNCTIONS["corner"](data["next_observation"])
    starts = np.flatnonzero(np.r_[True, np.diff(data["episode_id"]) != 0])
    assert summary["per_task"]["corner"]["best_episode_return_in_dataset"] == pytest.approx(
        np.add.reduceat(corner, starts).max(), rel=1e-5)
    # the final return is the exported policy's replayed on SawyerEnv from the evaluation seed
    assert summary["final/return"] == pytest.approx(replay_exported(tmp_path / "run" / "policy.pt2", "corner", 5),
                                                    rel=1e-4, abs=1e-6)


def test_smoke_sawyer_run_resumes_with_the_paper_default_networks(sawyer_data, tmp_path):
    """Network sizes left at None are filled in before config.json is written, so a resume with the
    same flags sees the same configuration."""
    settings = dict(env="sawyer", task="reach", dataset=str(sawyer_data[0]), run_dir=str(tmp_path / "run"),
                    batch_size=4, num_action_samples=2, total_steps=1, eval_every=1, checkpoint_every=1,
                    eval_episodes=1, eval_max_steps=2, device="cpu")
    quiet(abm_mpo.train, abm_mpo.Args(**settings))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["args"]["policy_layers"] == [200, 300] and config["args"]["critic_layers"] == [400, 400]
    quiet(abm_mpo.train, abm_mpo.Args(**{**settings, "total_steps": 2, "resume": str(tmp_path / "run")}))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["spec"]["env_action_low"] == se.ACTION_LOW.tolist()
