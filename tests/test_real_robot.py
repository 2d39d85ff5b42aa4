"""real_robot.py: exported policies, the sim backend end to end, the safety layer under injected
faults, the episode log read back by load_dataset, and the Intera backend against a recording
stand-in for rospy / intera_interface / the Robotiq drivers. Nothing here touches ROS or hardware."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import mujoco
import numpy as np
import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
import real_robot
import sawyer_env
from real_robot import EpisodeLog, RealSawyerEnv, RobotError, SafetyLayer, SimBackend, run_evaluation
from sawyer_env import ACTION_HIGH, ACTION_LOW, ALL_TASKS, OBS_DIM, OBS_INDEX, compute_rewards
from tests.conftest import write_random_dataset

SAWYER_SPEC = {"env": "sawyer", "obs_dim": OBS_DIM, "act_dim": 5, "tasks": list(ALL_TASKS), "action_low": [-1.0] * 5,
               "action_high": [1.0] * 5, "env_action_low": ACTION_LOW.tolist(), "env_action_high": ACTION_HIGH.tolist()}


def load_exported(path):
    extra = {"policy.json": ""}
    return torch.export.load(str(path), extra_files=extra).module(), json.loads(extra["policy.json"])


@pytest.fixture(scope="module")
def sawyer_policy(tmp_path_factory):
    """a freshly built multi-task Gaussian policy (learner in [-1, 1]) exported for the Sawyer"""
    torch.manual_seed(0)
    net = abm_mpo.GaussianPolicy(OBS_DIM, 5, (32, 32), len(ALL_TASKS), 1)
    path = tmp_path_factory.mktemp("policy") / "policy.pt2"
    abm_mpo.export_policy(abm_mpo.ActingPolicy(net, SAWYER_SPEC), SAWYER_SPEC, path.parent)
    return path, net


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def acting_modules():
    """each script's acting module, built the way its train() builds it (tiny layers)"""
    obs_dim, act_dim, tasks = 6, 2, 3
    low, high = torch.full((act_dim,), -0.3), torch.full((act_dim,), 0.3)
    tiny = dict(policy_layers=(16, 16), critic_layers=(16, 16))
    spec = {"env": "test-env", "obs_dim": obs_dim, "act_dim": act_dim, "tasks": ["a", "b", "c"],
            **{key: [-0.3] * act_dim for key in ("action_low", "env_action_low")},
            **{key: [0.3] * act_dim for key in ("action_high", "env_action_high")}}
    actors = {}
    for script in (abm_mpo, bm_mpo, abm_svg):
        agent = script.Agent(obs_dim, act_dim, tasks, script.Args(**tiny))
        actors[script.__name__] = agent.evaluated_policy() if script is abm_mpo else agent.policy
    actors["bear"] = bear.BearActor(bear.Agent(obs_dim, act_dim, tasks, low, high, bear.Args(**tiny)), 10, seed=100)
    bcq_args = bcq.Args(encoder_layers=(16, 16), decoder_layers=(16, 16), perturbation_layers=(16, 16),
                        critic_layers=(16, 16), latent_size=4)
    actors["bcq"] = bcq.FixedLatentActor(bcq.Agent(obs_dim, act_dim, tasks, low, high, bcq_args), 10, seed=100)
    return {name: sys.modules[name].ActingPolicy(actor, spec) for name, actor in actors.items()}, spec


def test_exported_policy_equals_the_in_process_module_for_every_script(tmp_path):
    torch.manual_seed(0)
    modules, spec = acting_modules()
    observation = 3 * torch.randn(7, spec["obs_dim"])
    task_index = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    for name, module in modules.items():
        script = sys.modules[name]
        (tmp_path / name).mkdir()
        script.export_policy(module, spec, tmp_path / name)
        exported, metadata = load_exported(tmp_path / name / "policy.pt2")
        with torch.no_grad():
            actions = module.actor(observation.expand(3, -1, -1))
            actions = actions[0] if isinstance(actions, tuple) else actions
            expected = actions[task_index, torch.arange(7)].clamp(-0.3, 0.3)
            got = exported(observation, task_index)
            single = exported(observation[:1], task_index[:1])  # batch of one: the robot's case
        assert got.shape == (7, 2) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(single, expected[:1], rtol=0, atol=1e-6, msg=name)
        assert float((expected.abs() == 0.3).float().mean()) > 0 or name == "bcq"  # clipping was exercised
        assert metadata == {**metadata, "env": "test-env", "obs_dim": 6, "act_dim": 2, "tasks": ["a", "b", "c"],
                            "action_low": [-0.3, -0.3], "action_high": [0.3, 0.3]}


def test_bcq_export_is_deterministic_and_picks_the_q_argmax_of_its_frozen_latents():
    torch.manual_seed(1)
    modules, spec = acting_modules()
    actor = modules["bcq"].actor
    observation = torch.randn(3, 4, spec["obs_dim"])
    torch.testing.assert_close(actor(observation), actor(observation), rtol=0, atol=0)
    # by hand for one state and task: decode every frozen latent, perturb, score with Q_1
    state = observation[1, 2].expand(3, 10, -1)
    candidates = actor.perturbation(state, actor.vae.decode(state, actor.latent.expand(3, -1, -1)))  # [K, M, act]
    best = actor.q1(state, candidates)[1].argmax()
    torch.testing.assert_close(actor(observation)[1, 2], candidates[1, best])


def test_export_maps_a_learner_in_unit_bounds_to_the_env_bounds(sawyer_policy):
    path, net = sawyer_policy
    exported, metadata = load_exported(path)
    assert metadata["action_low"] == ACTION_LOW.tolist() and metadata["action_high"] == ACTION_HIGH.tolist()
    observation = 5 * torch.randn(6, OBS_DIM)
    task_index = torch.arange(6)
    with torch.no_grad():
        unit = net(observation.expand(len(ALL_TASKS), -1, -1))[0][task_index, torch.arange(6)].clamp(-1, 1)
        got = exported(observation, task_index)
    low, high = torch.as_tensor(ACTION_LOW), torch.as_tensor(ACTION_HIGH)
    torch.testing.assert_close(got, low + (unit + 1) / 2 * (high - low))
    assert torch.all(got <= high) and torch.all(got >= low)


def test_exported_policy_runs_without_the_project_code(sawyer_policy, tmp_path):
    path, _ = sawyer_policy
    exported, _ = load_exported(path)
    observation = torch.linspace(-1, 1, OBS_DIM)[None]
    expected = exported(observation, torch.tensor([5]))[0].tolist()
    code = ("import json, sys, torch; extra = {'policy.json': ''}; "
            f"m = torch.export.load({str(path)!r}, extra_files=extra).module(); "
            f"print(json.dumps(m(torch.linspace(-1, 1, {OBS_DIM})[None], torch.tensor([5]))[0].tolist())); "
            "assert not any(name in sys.modules for name in ('abm_mpo', 'sawyer_env', 'real_robot'))")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == pytest.approx(expected, abs=1e-6)


def test_a_training_run_exports_the_policy_of_its_final_checkpoint(tmp_path):
    dataset = write_random_dataset(tmp_path / "pendulum.npz", obs_dim=3, act_dim=1, episodes=4, length=30)
    data = np.load(dataset)
    arrays = {key: data[key] for key in data.files}
    arrays["metadata"] = np.array(json.dumps({"env": "Pendulum-v1", "tasks": ["swingup"]}))
    np.savez(dataset, **arrays)
    run_dir = tmp_path / "run"
    args = bm_mpo.Args(env="Pendulum-v1", dataset=str(dataset), run_dir=str(run_dir), batch_size=8,
                       num_action_samples=3, policy_layers=(16, 16), critic_layers=(16, 16), eval_episodes=1,
                       device="cpu", total_steps=3, eval_every=3, checkpoint_every=2)
    bm_mpo.train(args)
    exported, metadata = load_exported(run_dir / "policy.pt2")
    assert metadata["env"] == "Pendulum-v1" and metadata["tasks"] == ["swingup"]
    assert metadata["action_low"] == [-2.0] and metadata["action_high"] == [2.0]
    agent = bm_mpo.Agent(3, 1, 1, args)
    agent.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["agent"])
    observation = 4 * torch.randn(5, 3)
    with torch.no_grad():
        expected = agent.policy(observation[None])[0][0].clamp(-2, 2)
    torch.testing.assert_close(exported(observation, torch.zeros(5, dtype=torch.int64)), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sim backend end to end, and the log read back by the learning scripts
# ---------------------------------------------------------------------------------------------
def test_sim_backend_runs_an_exported_policy_and_the_log_loads_back(sawyer_policy, tmp_path):
    act, spec = real_robot.load_policy(sawyer_policy[0])
    log = EpisodeLog(tmp_path / "log.npz", {"backend": "sim"})
    env = RealSawyerEnv(SimBackend(), "stack", log=log, deadline=10.0)  # timing is tested on its own below
    output = tmp_path / "returns.json"
    results = run_evaluation(env, act, spec["tasks"], ["stack", "lift"], 1, seed=3, output=output)
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert [len(results["returns"][task]) for task in ("stack", "lift")] == [1, 1] and results["aborted"] == 0

    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    assert data["observation"].shape == (400, OBS_DIM) and data["next_observation"].shape == (400, OBS_DIM)
    assert data["action"].shape == (400, 5) and data["reward"].shape == (400, len(ALL_TASKS))
    assert data["metadata"]["tasks"] == list(ALL_TASKS)
    np.testing.assert_array_equal(data["episode_id"], np.repeat([0, 1], 200))
    np.testing.assert_array_equal(data["step"], np.tile(np.arange(200), 2))
    np.testing.assert_allclose(data["reward"], compute_rewards(data["next_observation"]), atol=1e-6)
    np.testing.assert_array_equal(data["observation"][1:200], data["next_observation"][:199])
    assert np.all(data["discount"] == 1.0)
    # the policy's own outputs (the exported program) were logged, and executed after the safety layer
    expected = np.stack([act(o, ALL_TASKS.index("stack")) for o in data["observation"][:20]])
    np.testing.assert_allclose(data["policy_action"][:20], expected, atol=1e-6)
    assert np.all(data["action"] >= ACTION_LOW - 1e-7) and np.all(data["action"] <= ACTION_HIGH + 1e-7)
    executed = np.asarray(env.backend.executed, np.float32)
    np.testing.assert_array_equal(executed, data["action"])
    episodes = data["metadata"]["episodes"]
    assert [(e["task"], e["steps"], e["end"], e["complete"]) for e in episodes] == [
        ("stack", 200, "time_limit", True), ("lift", 200, "time_limit", True)]
    assert results["returns"]["lift"][0] == pytest.approx(float(data["reward"][200:, ALL_TASKS.index("lift")].sum()), abs=1e-4)
    assert env.backend.stop_count >= 2  # a stop at the end of every episode


def test_log_appends_across_runs_and_each_episode_file_is_a_dataset(tmp_path):
    policy = lambda observation, task: np.array([0.02, 0.0, 0.0, 0.0, 0.0])  # noqa: E731
    for run in range(2):
        env = RealSawyerEnv(SimBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=5)
        run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 1, seed=run)
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    np.testing.assert_array_equal(data["episode_id"], np.repeat([0, 1], 5))
    part = abm_mpo.load_dataset(tmp_path / "log.episodes" / "episode_000001.npz")
    np.testing.assert_array_equal(part["observation"], data["observation"][5:])


# ---------------------------------------------------------------------------------------------
# Safety layer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def start_observation():
    env = sawyer_env.SawyerEnv("reach")
    return env.reset(seed=0)[0]


def test_safety_layer_clips_and_zeroes_what_would_leave_the_workspace(start_observation):
    safety = SafetyLayer()
    command, flags = safety.filter(np.array([0.5, -0.01, 0.03, -3.0, 300.0]), start_observation)
    np.testing.assert_allclose(command, [0.07, -0.01, 0.03, -1.0, 255.0])
    assert flags == real_robot.SAFETY_FLAGS["clipped"]
    # move the pinch point onto the top face of the workspace box: upward motion is zeroed, downward kept
    observation = start_observation.copy()
    pinch = sawyer_env.pinch_position(observation.astype(np.float64))
    top = sawyer_env.WORKSPACE_CENTER[2] + sawyer_env.WORKSPACE_HALF[2]
    observation[OBS_INDEX["wrist_pos"].start + 2] += top - pinch[2] - 0.001
    command, flags = safety.filter(np.array([0.05, 0.0, 0.05, 0.0, 0.0]), observation)
    np.testing.assert_allclose(command, [0.05, 0.0, 0.0, 0.0, 0.0])
    assert flags == real_robot.SAFETY_FLAGS["workspace"]
    command, _ = safety.filter(np.array([0.0, 0.0, -0.05, 0.0, 0.0]), observation)
    assert command[2] == pytest.approx(-0.05)
    assert safety.action_fault(np.array([1e6, 0, 0, 0, 0])).startswith("absurd action")
    assert safety.action_fault(np.array([0.69, 0, 0, 9.9, -2549.0])) is None  # < 10x the limits
    forced = start_observation.copy()
    forced[OBS_INDEX["wrist_force"]] = [0.0, -20.5, 3.0]
    assert safety.force_fault(forced) == "wrist force 20.7 N (x +0.0, y -20.5, z +3.0) exceeds 20 N"


@pytest.mark.parametrize("axis", range(3))
@pytest.mark.parametrize("side", (-1, 1))
def test_every_face_of_the_workspace_box_stops_outward_motion_only(start_observation, axis, side):
    safety = SafetyLayer()
    observation = start_observation.copy()
    pinch = sawyer_env.pinch_position(observation.astype(np.float64))
    face = sawyer_env.WORKSPACE_CENTER[axis] + side * sawyer_env.WORKSPACE_HALF[axis]
    observation[OBS_INDEX["wrist_pos"].start + axis] += face - pinch[axis] - side * 0.001  # 1 mm inside the face
    assert np.all(np.abs(sawyer_env.pinch_position(observation.astype(np.float64)) - sawyer_env.WORKSPACE_CENTER)
                  <= sawyer_env.WORKSPACE_HALF)
    outward = np.zeros(5)
    outward[axis] = side * 0.05  # 2.5 mm in a step: would cross the face
    command, flags = safety.filter(outward, observation)
    assert command[axis] == 0.0 and flags == real_robot.SAFETY_FLAGS["workspace"]
    slow = outward.copy()
    slow[axis] = side * 0.01  # 0.5 mm in a step: stays inside
    assert safety.filter(slow, observation)[0][axis] == pytest.approx(side * 0.01)
    assert safety.filter(-outward, observation)[0][axis] == pytest.approx(-side * 0.05)  # inward kept


@pytest.mark.parametrize("side", (-1, 1))
def test_the_wrist_stops_at_plus_minus_90_degrees_and_may_turn_back(side):
    env = sawyer_env.SawyerEnv("reach")
    env.reset(seed=0)
    safety = SafetyLayer()
    # turn the hand about the vertical so that the tool's heading is 1 degree short of +-90
    yaw = sawyer_env.wrist_yaw(env._observation().astype(np.float64))
    turn = side * (np.pi / 2 - np.radians(1)) - yaw
    hand = env._hand
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, (rotation @ sawyer_env.quat_to_matrix(env.data.xquat[hand])).ravel())
    observation = env._observation()
    observation[OBS_INDEX["wrist_quat"]] = quat
    heading = side * (np.pi / 2 - np.radians(1))
    assert sawyer_env.wrist_yaw(observation.astype(np.float64)) == pytest.approx(heading, abs=1e-4)
    command, flags = safety.filter(np.array([0, 0, 0, side * 1.0, 0]), observation)  # 2.9 degrees in a step: past 90
    assert command[3] == 0.0 and flags == real_robot.SAFETY_FLAGS["wrist_limit"]
    assert safety.filter(np.array([0, 0, 0, side * 0.3, 0]), observation)[0][3] == pytest.approx(side * 0.3)  # 0.86 deg
    assert safety.filter(np.array([0, 0, 0, -side * 1.0, 0]), observation)[0][3] == pytest.approx(-side * 1.0)


def test_the_20_newton_stop_is_on_the_force_magnitude_and_a_nan_reading_is_a_fault(start_observation):
    safety = SafetyLayer()
    assert safety.force_fault([12.0, 12.0, 12.0]).startswith("wrist force 20.8 N")  # every axis under 20 N
    assert safety.force_fault([11.0, 11.0, 11.0]) is None  # 19.1 N
    assert safety.force_fault([np.nan, 30.0, 0.0]).startswith("invalid wrist force reading")
    observation = start_observation.copy()
    observation[OBS_INDEX["wrist_force"]] = [np.nan, 30.0, 0.0]
    assert "wrist_force" in safety.state_fault(observation)


@pytest.mark.parametrize("quat", ([np.nan, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]))
def test_invalid_wrist_orientation_is_a_fault_and_lets_no_command_through(start_observation, quat):
    safety = SafetyLayer()
    observation = start_observation.copy()
    observation[OBS_INDEX["wrist_quat"]] = quat
    observation[OBS_INDEX["wrist_pos"].start + 2] = 10.0  # 10 m up: far outside the box
    assert safety.state_fault(observation).startswith("invalid robot state")
    command, _ = safety.filter(np.array([0.07, 0.07, 0.07, 1.0, 0.0]), observation)
    np.testing.assert_array_equal(command[:4], 0.0)
    backend = FaultyBackend("quat", episode=0, step=3)
    backend.bad_quat = quat
    env = RealSawyerEnv(backend, "reach", deadline=10.0)
    env.reset(seed=0)
    for step in range(5):
        _, _, _, truncated, info = env.step(np.array([0.02, 0.0, 0.0, 0.5, 0.0]))
        if truncated:
            break
    assert step == 3 and info["aborted"].startswith("invalid robot state")  # the step after the bad reading
    assert len(backend.executed) == 4 and backend.stopped  # no command went out once the state was invalid


class FaultyBackend(SimBackend):
    """SimBackend that raises, or adds a force spike, at a given step of a given episode"""

    def __init__(self, fault=None, episode=1, step=5):
        super().__init__()
        self.fault, self.fault_episode, self.fault_step = fault, episode, step
        self.episodes, self.steps, self.stops_at = -1, 0, []  # (episode, steps taken) at every stop
        self.executed_in = []  # the episode of every executed command

    def _move_home(self, seed):
        self.episodes, self.steps = self.episodes + 1, 0
        return super()._move_home(seed)

    def wait_for_next_step(self):
        armed = self.episodes == self.fault_episode and self.steps == self.fault_step
        self.steps += 1
        if armed and self.fault == "raise":
            raise RuntimeError("joint state stream lost")
        super().wait_for_next_step()
        self.executed_in.append(self.episodes)
        if armed and self.fault == "force":
            self._observation[OBS_INDEX["wrist_force"].start + 2] = 25.0
        if armed and self.fault == "quat":
            self._observation[OBS_INDEX["wrist_quat"]] = self.bad_quat
        return False

    def stop(self, reason=""):
        self.stops_at.append((self.episodes, self.steps))
        super().stop(reason)


def faulty_policy(fault, backend, fault_episode=1, fault_step=5):
    """a constant gentle action, except at fault_step of fault_episode (and after it, for sleeps)"""

    def act(observation, task):
        if backend.episodes == fault_episode and backend.steps >= fault_step:
            if fault == "nan":
                return np.array([0.0, np.nan, 0.0, 0.0, 0.0])
            if fault == "absurd":
                return np.array([1e6, 0.0, 0.0, 0.0, 0.0])
            if fault == "sleep":
                time.sleep(0.08)
            if fault == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            if fault == "policy_raise":
                raise ValueError("policy crashed")
        return np.array([0.01, 0.0, -0.01, 0.2, 50.0])

    return act


FAULTS = {  # fault: (raises, end, reason fragment, steps logged in the faulty episode, backend steps at the stop)
    "raise": (RuntimeError, "aborted", "RuntimeError: joint state stream lost", 5, 6),
    "policy_raise": (ValueError, "aborted", "ValueError: policy crashed", 5, 5),
    "sleep": (None, "aborted", "3 control deadlines missed in a row", 7, 7),
    "force": (None, "wrist_force", "wrist force 25.0 N (x +0.0, y +0.0, z +25.0) exceeds 20 N", 6, 6),
    "absurd": (None, "aborted", "absurd action [1000000.0", 5, 5),
    "nan": (None, "aborted", "non-finite action [0.0, nan", 5, 5),
    "sigint": (None, "aborted", "interrupted (SIGINT)", 5, 5),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_stops_the_arm_and_logs_the_partial_episode_flagged(fault, tmp_path, capsys):
    raises, end, reason, steps, stopped_at_step = FAULTS[fault]
    backend = FaultyBackend(fault if fault in ("raise", "force") else None)
    env = RealSawyerEnv(backend, "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=20)
    act = faulty_policy(fault, backend)
    output = tmp_path / "returns.json"
    if raises:
        with pytest.raises(raises):
            run_evaluation(env, act, list(ALL_TASKS), ["reach"], 3, seed=0, output=output)
    else:
        run_evaluation(env, act, list(ALL_TASKS), ["reach"], 3, seed=0, output=output)
    results = json.loads(output.read_text())
    faulty = results["episodes"][1]
    assert (faulty["end"], faulty["steps"]) == (end, steps) and reason in faulty["reason"]
    assert faulty["complete"] == (end == "wrist_force")  # a 20 N stop is an MDP termination, not a crash
    # the first stop of the faulty episode is at the fault itself (not at a later episode end)
    assert backend.stops_at[0] == (0, 20)
    assert min(s for e, s in backend.stops_at if e == 1) == stopped_at_step
    assert backend.executed_in.count(1) == stopped_at_step - (fault == "raise")  # nothing ran after the fault
    executed = np.asarray(backend.executed)  # nothing absurd reached the physics
    assert np.all(np.isfinite(executed)) and np.all(np.abs(executed) <= ACTION_HIGH + 1e-6)
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    episodes = data["metadata"]["episodes"]
    assert [e["steps"] for e in episodes[:2]] == [20, steps] and episodes[0]["complete"]
    assert data["metadata"]["incomplete_episodes"] == ([] if end == "wrist_force" else [1])
    np.testing.assert_array_equal(np.bincount(data["episode_id"])[:2], [20, steps])
    np.testing.assert_allclose(data["reward"], compute_rewards(data["next_observation"]), atol=1e-6)
    assert np.all(np.abs(data["action"]) <= ACTION_HIGH + 1e-6)  # nothing absurd reached the backend
    if raises:  # the run ends; a policy fault ends its episode only
        assert len(results["episodes"]) == 2 and results["error"] == f"{raises.__name__}: {reason.split(': ')[1]}"
        assert "interrupted" not in results
    elif fault == "sigint":
        assert len(results["episodes"]) == 2 and results["interrupted"] == "SIGINT" and "error" not in results
    else:
        assert len(results["episodes"]) == 3 and results["episodes"][2]["complete"]
    if fault == "force":
        assert data["discount"][steps + 19] == 0.0 and data["safety_flags"][steps + 19] == real_robot.SAFETY_FLAGS["wrist_force"]
    if fault == "sleep":  # steps 5 and 6 missed the deadline: zero velocity was executed and flagged
        assert faulty["deadline_misses"] == 3
        np.testing.assert_array_equal(data["action"][25:27], 0.0)
        np.testing.assert_array_equal(data["safety_flags"][25:27], real_robot.SAFETY_FLAGS["deadline_missed"])
    if fault in ("absurd", "nan", "sleep"):
        assert "aborted" in capsys.readouterr().err


def test_a_single_missed_deadline_sends_zero_velocity_and_the_episode_goes_on():
    env = RealSawyerEnv(SimBackend(), "reach", episode_steps=4, deadline=0.05)
    observation, _ = env.reset(seed=0)
    action = np.array([0.05, 0.0, 0.0, 0.0, 0.0])
    env.step(action)
    time.sleep(0.08)
    _, _, _, truncated, info = env.step(action)
    assert info["deadline_missed"] and not truncated
    _, _, _, _, info = env.step(action)
    _, _, _, truncated, info = env.step(action)
    assert truncated and info["episode"]["deadline_misses"] == 1 and info["episode"]["complete"]
    np.testing.assert_array_equal(np.asarray(env.backend.executed)[:, 0], [0.05, 0.0, 0.05, 0.05])


# ---------------------------------------------------------------------------------------------
# Intera backend against a recording stand-in
# ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, *call):
        self.calls.append(call)

    def named(self, name):
        return [call[1:] for call in self.calls if call[0] == name]


def message(**fields):
    return types.SimpleNamespace(**fields)


def point(x, y, z):
    return message(x=float(x), y=float(y), z=float(z))


def fake_ros(monkeypatch, sim: sawyer_env.SawyerEnv):
    """rospy, intera_interface and the Robotiq drivers, recording every call; the arm and cube
    states come from `sim` (a SawyerEnv after reset), so observations can be compared with it.
    `state` drives the stand-in: "force" (the FT300 reading), "collided", "stuck" (the home move
    never arrives), "during_move" (callables run at each 100 Hz cycle of the home move)."""
    rec, subscribers = Recorder(), {}
    d, m = sim.data, sim.model
    hand = sim._hand
    state = {"q": d.qpos[sim._arm_qpos].copy(), "collided": False, "gPO": 100, "gOBJ": 2, "stamp": 10.0,
             "force": (1.0, 2.0, 3.0), "stuck": False, "during_move": []}

    def cube_message(cube):
        body = sim._cube_body[sawyer_env.CUBES.index(cube)]
        w, x, y, z = d.xquat[body]
        stamp = message(to_sec=lambda t=state["stamp"]: t)
        return message(header=message(stamp=stamp), pose=message(position=point(*d.xpos[body]),
                                                                   orientation=message(x=x, y=y, z=z, w=w)))

    def deliver(only=None):
        for topic, callback in subscribers.items():
            if only is not None and only not in topic:
                continue
            if "Gripper" in topic:
                callback(message(gPO=state["gPO"], gOBJ=state["gOBJ"]))
            elif "wrench" in topic:
                callback(message(wrench=message(force=point(*state["force"]), torque=point(0.1, 0.2, 0.3))))
            elif "joint_states" in topic:
                callback(message(name=list(sawyer_env.JOINT_NAMES), position=list(state["q"])))
            else:
                callback(cube_message(topic.split("/")[2]))

    class Subscriber:
        def __init__(self, topic, kind, callback, queue_size=None):
            rec.record("subscribe", topic)
            subscribers[topic] = callback
            deliver()

    class Publisher:
        def __init__(self, topic, kind, queue_size=None):
            self.topic = topic

        def publish(self, msg):
            rec.record("publish", self.topic, msg)

    rospy = types.ModuleType("rospy")
    rospy.core = message(is_initialized=lambda: False)
    rospy.init_node = lambda name, **kw: rec.record("init_node", name, kw)
    rospy.Subscriber, rospy.Publisher = Subscriber, Publisher
    rospy.ServiceProxy = lambda name, kind: (lambda request: rec.record("service", name, request.command_id))
    rospy.sleep = lambda seconds: None

    class Limb:
        """the calls of intera_interface.Limb this file uses, with the SDK's semantics where they matter"""

        def __init__(self, name):
            rec.record("Limb", name)

        def joint_angles(self):
            return dict(zip(sawyer_env.JOINT_NAMES, state["q"]))

        def joint_velocities(self):
            return dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0)

        def joint_efforts(self):
            return dict.fromkeys(sawyer_env.JOINT_NAMES, 1.5)

        def endpoint_pose(self):
            w, x, y, z = d.xquat[hand]
            return {"position": point(*d.xpos[hand]), "orientation": message(x=x, y=y, z=z, w=w)}

        def endpoint_velocity(self):
            return {"linear": point(0, 0, 0), "angular": point(0, 0, 0)}

        def set_command_timeout(self, timeout):
            rec.record("set_command_timeout", timeout)

        def set_joint_velocities(self, velocities):
            rec.record("set_joint_velocities", dict(velocities))

        def set_joint_positions(self, positions):
            rec.record("set_joint_positions", dict(positions))

        def set_joint_position_speed(self, speed=0.3):
            rec.record("set_joint_position_speed", speed)

        def exit_control_mode(self, timeout=0.2):  # the SDK sets the command timeout here too
            rec.record("exit_control_mode")
            self.set_command_timeout(timeout)

        def move_to_joint_positions(self, positions, timeout=15.0, threshold=0.008726646, test=None):
            """the SDK's loop at 100 Hz: stop on a collision, on test() or on arrival; otherwise re-send
            the target (and move 0.05 rad per joint toward it unless stuck); silent on a timeout"""
            rec.record("move_to_joint_positions", dict(positions))
            target = np.array([positions[name] for name in sawyer_env.JOINT_NAMES])
            for _ in range(int(timeout * 100)):
                for hook in state["during_move"]:
                    hook()
                if self.has_collided() or (callable(test) and test()) or np.all(np.abs(state["q"] - target) < threshold):
                    return
                self.set_joint_positions(positions)
                if not state["stuck"]:
                    state["q"] = state["q"] + np.clip(target - state["q"], -0.05, 0.05)

        def has_collided(self):
            return state["collided"]

    intera = types.ModuleType("intera_interface")
    intera.Limb = Limb
    intera.RobotEnable = lambda: message(enable=lambda: rec.record("enable"))

    class Msg:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Request(Msg):
        COMMAND_SET_ZERO = 8

    modules = {"rospy": rospy, "intera_interface": intera}
    for name, attributes in (("geometry_msgs.msg", {"PoseStamped": Msg, "WrenchStamped": Msg}),
                             ("sensor_msgs.msg", {"JointState": Msg}),
                             ("robotiq_2f_gripper_control.msg", {"Robotiq2FGripper_robot_input": Msg,
                                                                 "Robotiq2FGripper_robot_output": Msg}),
                             ("robotiq_ft_sensor.srv", {"sensor_accessor": Msg, "sensor_accessorRequest": Request})):
        package = types.ModuleType(name.split(".")[0])
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        package.__dict__[name.split(".")[1]] = module
        modules.update({name.split(".")[0]: package, name: module})
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return rec, state, deliver


class FakeTime:
    """a clock for real_robot's `time`: sleep() advances it (and runs `on_sleep` every 10 ms of it)"""

    def __init__(self, start=1000.0):
        self.now, self.on_sleep = start, None

    def monotonic(self):
        return self.now

    perf_counter = monotonic

    def time(self):
        return self.now

    def advance(self, seconds, step=0.01):
        end = self.now + seconds
        while self.now < end - 1e-12:
            self.now = min(self.now + step, end)
            if self.on_sleep is not None:
                self.on_sleep()

    def sleep(self, seconds):
        self.advance(seconds)


def test_intera_backend_without_the_sdk_is_one_sentence():
    with pytest.raises(RobotError, match=r"^--backend intera needs rospy, the Intera SDK \(intera_interface\)"):
        real_robot.InteraBackend(start_thread=False)


def test_intera_backend_drives_the_right_arm_by_joint_velocities_and_the_gripper(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim_observation, _ = sim.reset(seed=3)
    rec, state, deliver = fake_ros(monkeypatch, sim)
    clock = FakeTime()
    monkeypatch.setattr(real_robot, "time", clock)
    backend = real_robot.InteraBackend(start_thread=False)
    assert rec.named("Limb") == [("right",)] and rec.named("enable") == [()]
    assert rec.named("init_node")[0][1]["disable_signals"] is True
    assert rec.named("set_command_timeout") == [(real_robot.COMMAND_TIMEOUT,)]
    assert {t for (t,) in rec.named("subscribe")} == {"robot/joint_states", "Robotiq2FGripperRobotInput", "robotiq_ft_wrench",
                                                       "/cube_tracker/green/pose", "/cube_tracker/yellow/pose",
                                                       "/cube_tracker/blue/pose"}

    # move home: the start pose sawyer_env draws for the same seed, gripper opened, sensor tared
    observation = backend.move_home(seed=3)
    (target,) = rec.named("move_to_joint_positions")[0]
    assert list(target) == list(sawyer_env.JOINT_NAMES)
    np.testing.assert_allclose(list(target.values()), sim.data.qpos[sim._arm_qpos], atol=1e-12)
    assert rec.named("publish")[-1][1].rPR == 0 and rec.named("service") == [("robotiq_ft_sensor_acc", 8)]

    # the observation has sawyer_env's layout and conventions (quaternion order, relative poses)
    for name in ("joint_pos", "wrist_pos", "wrist_quat", "green_pos", "green_quat", "green_rel_pos",
                 "green_rel_quat", "blue_rel_pos", "yellow_rel_quat"):
        np.testing.assert_allclose(observation[OBS_INDEX[name]], sim_observation[OBS_INDEX[name]], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(observation[OBS_INDEX["wrist_force"]], [1, 2, 3])
    np.testing.assert_allclose(observation[OBS_INDEX["joint_torque"]], 1.5)
    assert sawyer_env.finger_angle(observation) == 100 and sawyer_env.grasp_flag(observation) == 2.0
    np.testing.assert_allclose(compute_rewards(observation)[:1], compute_rewards(sim_observation)[:1], atol=1e-5)
    state["gPO"], state["gOBJ"], state["stamp"] = 110, 1, 10.05
    sim.data.qpos[sim._cube_qpos[0]] += 0.01  # green moves 1 cm in x within 50 ms
    mujoco.mj_kinematics(sim.model, sim.data)
    deliver()
    observation = backend.read_observation()
    assert sawyer_env.finger_velocity(observation) == 10 and sawyer_env.grasp_flag(observation) == 3.0
    np.testing.assert_allclose(observation[OBS_INDEX["green_vel"]], [0.2, 0, 0, 0, 0, 0], atol=1e-4)

    # a Cartesian command becomes right_j* velocities that move the pinch point at that velocity
    backend.send_command(np.array([0.07, 0.0, -0.03, 0.0, 255.0]))
    assert rec.named("publish")[-1][1].rPR == 123  # 110 + 255 units/s x 0.05 s, rounded
    velocities = backend.resend_once()
    (sent,) = rec.named("set_joint_velocities")[-1]
    assert list(sent) == list(sawyer_env.JOINT_NAMES)
    np.testing.assert_allclose(list(sent.values()), velocities)
    jacobian_position = np.zeros((3, sim.model.nv))
    mujoco.mj_forward(sim.model, sim.data)
    mujoco.mj_jacSite(sim.model, sim.data, jacobian_position, None, sim._pinch)
    np.testing.assert_allclose(jacobian_position[:, sim._arm_dof] @ velocities, [0.07, 0.0, -0.03], atol=2e-3)
    assert np.all(np.abs(velocities) <= sawyer_env.JOINT_VELOCITY_LIMITS + 1e-9)
    # watchdog: a command older than COMMAND_TIMEOUT is not re-sent; exactly zero joint velocity is
    clock.advance(real_robot.COMMAND_TIMEOUT + 0.01)
    deliver()  # the sensors are alive
    stale = backend.resend_once()
    np.testing.assert_array_equal(stale, 0.0)
    assert rec.named("set_joint_velocities")[-1] == (dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0),)
    assert backend.watchdog_zeroed == 1

    # stop: zero joint velocities at once, position mode, and nothing more until the next move home
    publishes = len(rec.named("publish"))
    backend.stop()
    assert rec.named("set_joint_velocities")[-1] == (dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0),)
    assert rec.calls[-2:] == [("exit_control_mode",), ("set_command_timeout", real_robot.COMMAND_TIMEOUT)]
    backend.send_command(np.array([0.07, 0.0, 0.0, 0.0, 255.0]))
    assert backend.resend_once() is None and len(rec.named("publish")) == publishes
    assert backend.check_fault() is None
    state["collided"] = True
    assert backend.check_fault() == "the Intera SDK reports a collision"


def test_intera_backend_paces_the_control_loop_at_20_hz(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim.reset(seed=0)
    fake_ros(monkeypatch, sim)
    clock = FakeTime()
    monkeypatch.setattr(real_robot, "time", clock)
    backend = real_robot.InteraBackend(start_thread=False)
    backend.move_home(seed=0)
    start = clock.now
    assert [backend.wait_for_next_step() for _ in range(4)] == [False] * 4
    assert clock.now - start == pytest.approx(0.2, abs=1e-9) and backend.overruns == 0
    clock.now += 0.03  # work of 30 ms: the tick absorbs it
    assert backend.wait_for_next_step() is False and clock.now - start == pytest.approx(0.25, abs=1e-9)
    clock.now += 0.07  # work of 70 ms: an overrun, counted, and the schedule restarts from now
    assert backend.wait_for_next_step() is True and backend.overruns == 1


def test_real_env_has_sawyer_env_spaces_and_passes_the_gymnasium_checker():
    from gymnasium.utils.env_checker import check_env

    env = RealSawyerEnv(SimBackend(), "stack")
    sim = env.backend.env
    assert env.observation_space == sim.observation_space and env.action_space == sim.action_space
    with pytest.warns(UserWarning, match="infinity"):  # unbounded observations, as sawyer_env's
        check_env(env, skip_render_check=True)
    env.reset(seed=0)
    _, reward, _, _, info = env.step(np.zeros(5))
    assert reward == info["rewards"][ALL_TASKS.index("stack")] and info["rewards"].shape == (len(ALL_TASKS),)


def intera_backend(monkeypatch, seed=0, start_thread=False, tilt=0.0):
    """an InteraBackend on the stand-in and a fake clock; tilt [rad] turns joint 5 from the start pose"""
    sim = sawyer_env.SawyerEnv("reach")
    sim.reset(seed=seed)
    if tilt:
        sim.data.qpos[sim._arm_qpos[5]] += tilt
        mujoco.mj_forward(sim.model, sim.data)
    rec, state, deliver = fake_ros(monkeypatch, sim)
    clock = FakeTime()
    monkeypatch.setattr(real_robot, "time", clock)
    return real_robot.InteraBackend(start_thread=start_thread), rec, state, deliver, clock


def test_intera_command_thread_resends_at_exactly_100_hz_whatever_its_work_takes(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    backend.move_home(seed=0)
    backend.send_command(np.array([0.0, 0.0, 0.05, 0.0, 0.0]))
    send = backend.limb.set_joint_velocities

    def slow_send(velocities):  # each re-send takes 4 ms
        send(velocities)
        clock.now += 0.004

    backend.limb.set_joint_velocities = slow_send
    start, before = clock.now, len(rec.named("set_joint_velocities"))

    def tick():
        deliver()  # the sensors publish
        if clock.now - start >= 1.0 - 1e-9:
            backend._shutdown.set()

    clock.on_sleep = tick
    backend._resend_loop()  # the command thread's body, on the fake clock
    assert len(rec.named("set_joint_velocities")) - before == 100 and backend.thread_error is None


def test_nothing_moves_the_arm_before_an_episode_starts_and_close_ends_the_thread(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim.reset(seed=0)
    rec, _, _ = fake_ros(monkeypatch, sim)
    backend = real_robot.InteraBackend()  # command thread running, on the real clock
    time.sleep(0.15)
    assert backend.resend_once() is None
    assert rec.named("set_joint_velocities") == [] and rec.named("set_joint_positions") == []
    assert rec.named("publish") == []  # no gripper command either (activating a 2F-85 moves its fingers)
    backend.close()
    assert not backend._thread.is_alive() and backend.thread_error is None
    assert rec.calls[-2:] == [("exit_control_mode",), ("set_command_timeout", real_robot.COMMAND_TIMEOUT)]


@pytest.mark.parametrize("tilt", (0.0, 0.5))
def test_a_zero_or_stale_command_is_exactly_zero_joint_velocity(monkeypatch, tilt):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch, tilt=tilt)
    backend.move_home(seed=0)
    state["q"][5] += tilt  # the measured arm is tilted from the tool-down start pose
    deliver()
    backend.send_command(np.zeros(5))  # what a missed deadline sends
    np.testing.assert_array_equal(backend.resend_once(), 0.0)
    backend.send_command(np.array([0.0, 0.0, 0.03, 0.0, 0.0]))
    assert np.any(backend.resend_once() != 0.0)
    clock.advance(real_robot.COMMAND_TIMEOUT + 0.01, step=0.05)
    deliver()
    np.testing.assert_array_equal(backend.resend_once(), 0.0)  # the watchdog: not the posture/orientation terms
    assert rec.named("set_joint_velocities")[-1] == (dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0),)


def test_no_command_leaves_between_a_stop_and_the_next_approved_command(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    backend.move_home(seed=0)
    backend.send_command(np.array([0.05, 0.0, 0.0, 0.0, 0.0]))
    assert backend.resend_once() is not None
    backend.stop()
    stopped_at = len(rec.calls)
    resent = []
    state["during_move"].append(lambda: resent.append(backend.resend_once()))  # the thread runs during the move
    backend.move_home(seed=1)
    resent.append(backend.resend_once())  # after the move, before the next command
    assert resent and all(r is None for r in resent)
    assert [c for c in rec.calls[stopped_at:] if c[0] == "set_joint_velocities"] == []
    backend.send_command(np.array([0.05, 0.0, 0.0, 0.0, 0.0]))
    assert backend.resend_once() is not None


def test_the_command_thread_and_the_home_move_use_separate_physics_state(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    used = {"resend": set(), "home": set()}
    joint_velocities, start_pose = real_robot._Kinematics.joint_velocities, real_robot._Kinematics.start_pose
    monkeypatch.setattr(real_robot._Kinematics, "joint_velocities",
                        lambda self, *a: used["resend"].add(id(self.env.data)) or joint_velocities(self, *a))
    monkeypatch.setattr(real_robot._Kinematics, "start_pose",
                        lambda self, *a: used["home"].add(id(self.env.data)) or start_pose(self, *a))
    for seed in range(2):
        backend.move_home(seed=seed)
        backend.send_command(np.array([0.05, 0.0, 0.0, 0.0, 0.0]))
        backend.resend_once()
    assert used["resend"] and used["home"] and not used["resend"] & used["home"]


def test_the_home_move_sets_its_speed_watches_the_arm_and_keeps_the_command_timeout(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    backend.move_home(seed=0)
    calls = [c[0] for c in rec.calls]
    assert rec.named("set_joint_position_speed") == [(real_robot.HOME_SPEED_RATIO,)]
    assert calls.index("set_joint_position_speed") < calls.index("move_to_joint_positions")
    backend.stop()
    backend.move_home(seed=1)
    assert {t for (t,) in rec.named("set_command_timeout")} == {real_robot.COMMAND_TIMEOUT}  # never the SDK's 0.2 s


@pytest.mark.parametrize("failure", ("collision", "stuck", "force"))
def test_a_failed_home_move_stops_and_is_reported_in_one_sentence(monkeypatch, failure):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    backend.move_home(seed=0)
    backend.stop()
    cycles = []

    def during_move():
        cycles.append(1)
        if len(cycles) == 3:
            if failure == "collision":
                state["collided"] = True
            if failure == "force":
                state["force"] = (0.0, 0.0, 25.0)
                deliver("wrench")

    state["during_move"].append(during_move)
    state["stuck"] = failure == "stuck"
    with pytest.raises(RobotError) as error:
        backend.move_home(seed=1)
    message = str(error.value)
    assert message.startswith("the move home failed: ") and message.count(". ") == 0 and "\n" not in message
    expected = {"collision": "collision", "stuck": "not reached within 15 s", "force": "wrist force 25.0 N"}
    assert expected[failure] in message
    assert len(cycles) == (1500 if failure == "stuck" else 3)  # stopped at the fault, not after the SDK's 15 s
    assert backend.stopped and rec.named("service") == [("robotiq_ft_sensor_acc", 8)]  # not zeroed again
    assert rec.calls[-2:] == [("exit_control_mode",), ("set_command_timeout", real_robot.COMMAND_TIMEOUT)]


def test_the_force_sensor_is_not_zeroed_while_the_wrist_touches_something(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    state["force"] = (0.0, 9.0, 12.0)  # 15 N contact: zeroing it would move the 20 N stop to 35 N
    deliver("wrench")
    with pytest.raises(RobotError, match="reads 15.0 N at the start pose .* not zeroed"):
        backend.move_home(seed=0)
    assert rec.named("service") == [] and backend.stopped
    state["force"] = (0.5, 0.5, 0.5)
    deliver("wrench")
    backend.move_home(seed=0)
    assert rec.named("service") == [("robotiq_ft_sensor_acc", 8)] and not backend.stopped


def test_the_first_ctrl_c_stops_the_home_move_and_ends_the_run(monkeypatch, tmp_path):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    cycles = []

    def during_move():
        cycles.append(1)
        if len(cycles) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    state["during_move"].append(during_move)
    clock.on_sleep = deliver
    env = RealSawyerEnv(backend, "reach", log=EpisodeLog(tmp_path / "log.npz"))
    policy = lambda observation, task: np.zeros(5)  # noqa: E731
    results = run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 2, seed=5, output=tmp_path / "r.json")
    assert results["interrupted"] == "SIGINT" and "error" not in results
    assert len(cycles) == 3  # the SDK's move loop ended at its next check
    stop = [c[0] for c in rec.calls].index("set_joint_velocities")  # the stop sent by the signal handler
    assert rec.calls[stop + 1] == ("exit_control_mode",)
    after = [c for c in rec.calls[stop:] if c[0] in ("set_joint_positions", "set_joint_velocities")]
    assert all(c == ("set_joint_velocities", dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0)) for c in after)
    assert rec.named("service") == [] and backend.stopped


def test_every_force_reading_is_checked_and_stops_the_arm_at_once(monkeypatch):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    env = RealSawyerEnv(backend, "reach", deadline=10.0)
    env.reset(seed=0)
    clock.on_sleep = deliver  # the sensors publish at 100 Hz while the control loop waits
    env.step(np.array([0.0, 0.0, -0.02, 0.0, 0.0]))
    state["force"] = (0.0, 0.0, 25.0)  # one reading between two control steps...
    deliver("wrench")
    assert backend.stopped and rec.calls[-2:] == [("exit_control_mode",), ("set_command_timeout", 0.1)]
    state["force"] = (0.0, 0.0, 1.0)  # ...then back under the limit before the next observation
    _, _, terminated, _, info = env.step(np.array([0.0, 0.0, -0.02, 0.0, 0.0]))
    assert terminated and info["episode"]["end"] == "wrist_force" and "25.0 N" in info["episode"]["reason"]
    assert info["wrist_force"][2] == pytest.approx(1.0)


@pytest.mark.parametrize("fault", ("nan", "silent_force", "silent_joints"))
def test_a_nan_or_silent_sensor_is_a_fault_that_stops_the_arm(monkeypatch, fault):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    env = RealSawyerEnv(backend, "reach", deadline=10.0)
    env.reset(seed=0)
    clock.on_sleep = deliver
    env.step(np.array([0.0, 0.0, -0.02, 0.0, 0.0]))
    if fault == "nan":
        clock.on_sleep = None
        state["force"] = (np.nan, 30.0, 0.0)
        deliver("wrench")
        expected = "invalid wrist force reading [nan, 30.0, 0.0]"
    else:  # the driver stays alive but stops publishing (FT300 serial link lost)
        alive = ("Gripper", "cube", "joint_states" if fault == "silent_force" else "wrench")
        clock.on_sleep = lambda: [deliver(topic) for topic in alive]
        clock.advance(0.15)
        backend.resend_once()  # the command thread notices
        expected = "no wrist force sensor reading" if fault == "silent_force" else "no joint state stream reading"
    assert backend.stopped
    _, _, terminated, truncated, info = env.step(np.array([0.0, 0.0, -0.02, 0.0, 0.0]))
    assert truncated and not terminated and info["aborted"].startswith(expected)
    assert info["episode"]["complete"] is False


def test_a_killed_process_keeps_its_last_saved_second_flagged_incomplete(tmp_path):
    policy = lambda observation, task: np.array([0.02, 0.0, 0.0, 0.0, 0.0])  # noqa: E731
    env = RealSawyerEnv(SimBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=30)
    run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 1, seed=0)
    env.reset(seed=1)
    for _ in range(EpisodeLog.PARTIAL_EVERY + 5):  # then the process "dies": no handler, no end()
        env.step(policy(None, 0))
    assert (tmp_path / "log.episodes" / "episode_000001.partial.npz").exists()
    EpisodeLog(tmp_path / "log.npz")  # the next run on the same log
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    np.testing.assert_array_equal(np.bincount(data["episode_id"]), [30, EpisodeLog.PARTIAL_EVERY])
    last = data["metadata"]["episodes"][1]
    assert (last["complete"], last["steps"]) == (False, 20) and "process ended" in last["reason"]
    assert data["metadata"]["incomplete_episodes"] == [1]


# ---------------------------------------------------------------------------------------------
# Signals, deadline, overruns, what is logged, and the log's durability
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signame", ("SIGTERM", "SIGHUP"))
def test_sigterm_and_sighup_stop_the_arm_like_ctrl_c(tmp_path, no_default_signal_handlers, signame):
    number = getattr(signal, signame)
    backend = FaultyBackend()
    env = RealSawyerEnv(backend, "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=20, deadline=10.0)

    def act(observation, task):
        if backend.episodes == 1 and backend.steps == 5:
            os.kill(os.getpid(), number)
        return np.array([0.01, 0.0, -0.01, 0.2, 50.0])

    results = run_evaluation(env, act, list(ALL_TASKS), ["reach"], 3, seed=0, output=tmp_path / "r.json")
    assert signal.getsignal(number) is no_default_signal_handlers  # restored after the run
    assert results["interrupted"] == signame and len(results["episodes"]) == 2
    assert results["episodes"][1]["reason"] == f"interrupted ({signame})" and results["episodes"][1]["steps"] == 5
    assert min(s for e, s in backend.stops_at if e == 1) == 5  # stopped in the handler, at the step it came


def test_the_deadline_times_the_whole_step_not_only_the_policy(monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(real_robot, "time", clock)
    env = RealSawyerEnv(SimBackend(), "reach", episode_steps=5)
    env.reset(seed=0)
    action = np.array([0.05, 0.0, 0.0, 0.0, 0.0])
    real_add = real_robot.compute_rewards

    def slow_rewards(observation):  # reward computation and log writes after the read take 60 ms
        clock.now += 0.06
        return real_add(observation)

    monkeypatch.setattr(real_robot, "compute_rewards", slow_rewards)
    infos = [env.step(action)[4] for _ in range(2)]
    assert [i["deadline_missed"] for i in infos] == [False, True]  # the policy itself took no time
    np.testing.assert_array_equal(env.backend.executed[-1], 0.0)  # the late command was replaced by zero


def test_control_loop_overruns_are_flagged_and_counted_in_the_log(tmp_path):
    class OverrunningBackend(SimBackend):
        def wait_for_next_step(self):
            super().wait_for_next_step()
            return len(self.executed) in (2, 3)

    env = RealSawyerEnv(OverrunningBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=4,
                        deadline=10.0)
    run_evaluation(env, lambda o, t: np.zeros(5), list(ALL_TASKS), ["reach"], 1, seed=0)
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    assert data["metadata"]["episodes"][0]["overruns"] == 2
    np.testing.assert_array_equal(data["safety_flags"] & real_robot.SAFETY_FLAGS["overrun"], [0, 32, 32, 0])


def test_the_logged_action_is_what_the_arm_executed_watchdog_included(monkeypatch, tmp_path):
    backend, rec, state, deliver, clock = intera_backend(monkeypatch)
    env = RealSawyerEnv(backend, "reach", log=EpisodeLog(tmp_path / "log.npz"), deadline=10.0, episode_steps=2)
    env.reset(seed=0)

    def thread_tick():  # the command thread and the sensors, every 10 ms of the fake clock
        deliver()
        backend.resend_once()

    clock.on_sleep = thread_tick
    wait = backend.wait_for_next_step
    slow = {"on": True}

    def stalled_wait():  # the first control period stretches to 150 ms (a stalled process)
        if slow.pop("on", False):
            clock.advance(0.15)
            return True
        return wait()

    backend.wait_for_next_step = stalled_wait
    command = np.array([0.03, 0.0, 0.0, 0.0, 100.0])
    _, _, _, _, info = env.step(command)
    assert info["safety_flags"] & real_robot.SAFETY_FLAGS["watchdog"] and backend.watchdog_zeroed == 1
    # held for the 100 ms of COMMAND_TIMEOUT out of 150 ms, zero after; the gripper target was sent
    np.testing.assert_allclose(info["executed"], [0.02, 0.0, 0.0, 0.0, 100.0], atol=1e-9)
    env.step(command)
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    np.testing.assert_allclose(data["action"], [[0.02, 0.0, 0.0, 0.0, 100.0], command], atol=1e-7)
    np.testing.assert_allclose(data["policy_action"], [command, command])


def test_log_writes_fsync_the_directory_after_the_rename(tmp_path, monkeypatch):
    import stat

    synced_dirs, fsync = [], os.fsync
    monkeypatch.setattr(real_robot.os, "fsync", lambda fd: (synced_dirs.append(os.fstat(fd).st_mode), fsync(fd))[1])
    env = RealSawyerEnv(SimBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=3)
    synced_dirs.clear()
    run_evaluation(env, lambda o, t: np.zeros(5), list(ALL_TASKS), ["reach"], 1, seed=0, output=tmp_path / "r.json")
    kinds = ["dir" if stat.S_ISDIR(mode) else "file" for mode in synced_dirs]
    # the episode file, the whole log, the results after the episode and at the end: each file, then its folder
    assert kinds == ["file", "dir"] * 4


def test_a_stale_whole_log_is_rebuilt_by_the_next_run(tmp_path):
    policy = lambda observation, task: np.zeros(5)  # noqa: E731
    env = RealSawyerEnv(SimBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=3)
    run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 1, seed=0)
    stale = (tmp_path / "log.npz").read_bytes()
    run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 1, seed=1)
    (tmp_path / "log.npz").write_bytes(stale)  # killed during the rewrite after episode 1: only episode 0
    EpisodeLog(tmp_path / "log.npz")  # the next run, no .partial file anywhere
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    np.testing.assert_array_equal(np.bincount(data["episode_id"]), [3, 3])


def test_two_processes_on_one_log_never_write_the_same_file(tmp_path):
    first, second = EpisodeLog(tmp_path / "log.npz"), EpisodeLog(tmp_path / "log.npz")
    first.begin("reach", 0)
    second.begin("reach", 1)
    assert first._record["episode"] != second._record["episode"]
    other = tmp_path / "log.npz.tmp"  # another process's temporary file, mid-write (the old fixed name)
    other.write_bytes(b"half written")
    for log in (first, second):
        for _ in range(2):
            log.add(observation=np.zeros(OBS_DIM), action=np.zeros(5), policy_action=np.zeros(5),
                    reward=np.zeros(len(ALL_TASKS)), discount=1.0, next_observation=np.zeros(OBS_DIM), safety_flags=0)
        log.end("time_limit", "", True)
    assert other.read_bytes() == b"half written" and not list(tmp_path.glob(".*.tmp"))
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    np.testing.assert_array_equal(np.bincount(data["episode_id"]), [2, 2])


def test_a_rerun_adds_to_the_results_file_instead_of_overwriting_it(tmp_path):
    output = tmp_path / "eval.json"
    policy = lambda observation, task: np.zeros(5)  # noqa: E731
    for run in range(2):
        env = RealSawyerEnv(SimBackend(), "reach", log=EpisodeLog(tmp_path / "log.npz"), episode_steps=3)
        run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 2, seed=0, output=output, header={"run": run})
    results = json.loads(output.read_text())
    assert len(results["returns"]["reach"]) == 4 and len(results["episodes"]) == 4
    assert [(r["run"], r["started_at_episode"]) for r in results["runs"]] == [(0, 0), (1, 2)]
    assert [e["seed"] for e in results["episodes"]] == [0, 1, 2, 3]  # new start poses, not the same four again
    output.write_text("not json")
    with pytest.raises(RobotError, match="not a results file"):
        run_evaluation(env, policy, list(ALL_TASKS), ["reach"], 1, seed=0, output=output)
    assert output.read_text() == "not json"


@pytest.fixture
def no_default_signal_handlers():
    """SIGTERM and SIGHUP raise in the test instead of killing pytest, should real_robot not handle them"""
    def unhandled(signum, frame):
        raise RuntimeError(f"{signal.Signals(signum).name} reached the default handler")

    numbers = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP")]
    previous = {number: signal.signal(number, unhandled) for number in numbers}
    yield unhandled
    for number, handler in previous.items():
        signal.signal(number, handler)


@pytest.mark.parametrize("signame, status", (("SIGINT", 130), ("SIGTERM", 143)))
def test_main_exits_with_the_shells_status_for_the_signal(tmp_path, monkeypatch, no_default_signal_handlers,
                                                          signame, status):
    calls = []

    def act(observation, task_index):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, signame))
        return np.zeros(5)

    monkeypatch.setattr(real_robot, "load_policy", lambda path: (act, {**SAWYER_SPEC, "env": "sawyer"}))
    args = real_robot.Args(policy=str(tmp_path / "policy.pt2"), task="reach", episodes=2, deadline=10.0)
    with pytest.raises(SystemExit) as exit_:
        real_robot.main(args)
    assert exit_.value.code == status
    results = json.loads((tmp_path / "eval_sim_reach.json").read_text())
    assert results["interrupted"] == signame and results["episodes"][0]["steps"] == 2


def test_a_file_that_is_not_a_policy_is_one_sentence(tmp_path):
    not_policy = tmp_path / "checkpoint.pt"
    torch.save({"agent": {"w": torch.zeros(2)}}, not_policy)
    result = subprocess.run([sys.executable, "real_robot.py", "--policy", str(not_policy), "--episodes", "1"],
                            capture_output=True, text=True, cwd=os.path.dirname(real_robot.__file__), timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("real_robot.py: error: cannot load policy")
