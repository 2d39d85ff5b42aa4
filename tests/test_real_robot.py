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

SAWYER_SPEC = {"obs_dim": OBS_DIM, "act_dim": 5, "tasks": list(ALL_TASKS), "action_low": [-1.0] * 5,
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
    abm_mpo.export_policy(abm_mpo.PolicyMean(net), SAWYER_SPEC, "sawyer", path)
    return path, net


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def acting_modules():
    """each script's acting module, built the way its train() builds it (tiny layers)"""
    obs_dim, act_dim, tasks = 6, 2, 3
    low, high = torch.full((act_dim,), -0.3), torch.full((act_dim,), 0.3)
    tiny = dict(policy_layers=(16, 16), critic_layers=(16, 16))
    modules = {}
    for script in (abm_mpo, bm_mpo, abm_svg):
        agent = script.Agent(obs_dim, act_dim, tasks, script.Args(**tiny))
        policy = agent.evaluated_policy() if script is abm_mpo else agent.policy
        modules[script.__name__] = script.PolicyMean(policy)
    modules["bear"] = bear.PolicyMean(bear.Agent(obs_dim, act_dim, tasks, low, high, bear.Args(**tiny)).policy)
    bcq_args = bcq.Args(encoder_layers=(16, 16), decoder_layers=(16, 16), perturbation_layers=(16, 16),
                        critic_layers=(16, 16), latent_size=4)
    modules["bcq"] = bcq.FixedLatentActor(bcq.Agent(obs_dim, act_dim, tasks, low, high, bcq_args), 10, seed=100)
    spec = {"obs_dim": obs_dim, "act_dim": act_dim, "tasks": ["a", "b", "c"], "action_low": [-0.3] * act_dim,
            "action_high": [0.3] * act_dim}
    return modules, spec


def test_exported_policy_equals_the_in_process_module_for_every_script(tmp_path):
    torch.manual_seed(0)
    modules, spec = acting_modules()
    observation = 3 * torch.randn(7, spec["obs_dim"])
    task_index = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    for name, module in modules.items():
        script = sys.modules[name]
        path = tmp_path / f"{name}.pt2"
        script.export_policy(module, spec, "test-env", path)
        exported, metadata = load_exported(path)
        with torch.no_grad():
            expected = module(observation.expand(3, -1, -1))[task_index, torch.arange(7)].clamp(-0.3, 0.3)
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
    actor = modules["bcq"]
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
    assert metadata["action_low"] == ACTION_LOW.tolist() and metadata["learner_action_low"] == [-1.0] * 5
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
    assert safety.force_fault(forced) == "wrist force -20.5 N on axis y exceeds 20 N"


class FaultyBackend(SimBackend):
    """SimBackend that raises, or adds a force spike, at a given step of a given episode"""

    def __init__(self, fault=None, episode=1, step=5):
        super().__init__()
        self.fault, self.fault_episode, self.fault_step = fault, episode, step
        self.episodes, self.steps = -1, 0

    def _move_home(self, seed):
        self.episodes, self.steps = self.episodes + 1, 0
        return super()._move_home(seed)

    def wait_for_next_step(self):
        armed = self.episodes == self.fault_episode and self.steps == self.fault_step
        self.steps += 1
        if armed and self.fault == "raise":
            raise RuntimeError("joint state stream lost")
        super().wait_for_next_step()
        if armed and self.fault == "force":
            self._observation[OBS_INDEX["wrist_force"].start + 2] = 25.0


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


FAULTS = {  # fault: (raises, end, reason fragment, steps logged in the faulty episode)
    "raise": (RuntimeError, "aborted", "RuntimeError: joint state stream lost", 5),
    "policy_raise": (ValueError, "aborted", "ValueError: policy crashed", 5),
    "sleep": (None, "aborted", "3 control deadlines missed in a row", 7),
    "force": (None, "wrist_force", "wrist force +25.0 N on axis z exceeds 20 N", 6),
    "absurd": (None, "aborted", "absurd action [1000000.0", 5),
    "nan": (None, "aborted", "non-finite action [0.0, nan", 5),
    "sigint": (None, "aborted", "interrupted (SIGINT)", 5),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_stops_the_arm_and_logs_the_partial_episode_flagged(fault, tmp_path, capsys):
    raises, end, reason, steps = FAULTS[fault]
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
    assert backend.stopped and backend.stop_count >= 2  # stopped after episode 0 and at the fault
    stopped_at = len(backend.executed) if end == "aborted" else None
    assert backend.executed[20:stopped_at]  # the faulty episode ran before the fault
    data = abm_mpo.load_dataset(tmp_path / "log.npz")
    episodes = data["metadata"]["episodes"]
    assert [e["steps"] for e in episodes[:2]] == [20, steps] and episodes[0]["complete"]
    assert data["metadata"]["incomplete_episodes"] == ([] if end == "wrist_force" else [1])
    np.testing.assert_array_equal(np.bincount(data["episode_id"])[:2], [20, steps])
    np.testing.assert_allclose(data["reward"], compute_rewards(data["next_observation"]), atol=1e-6)
    assert np.all(np.abs(data["action"]) <= ACTION_HIGH + 1e-6)  # nothing absurd reached the backend
    if raises or fault == "sigint":  # the run ends; a policy fault ends its episode only
        assert len(results["episodes"]) == 2 and results.get("error", "interrupted")
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
    states come from `sim` (a SawyerEnv after reset), so observations can be compared with it."""
    rec, subscribers = Recorder(), {}
    d, m = sim.data, sim.model
    hand = sim._hand
    state = {"q": d.qpos[sim._arm_qpos].copy(), "collided": False, "gPO": 100, "gOBJ": 2, "stamp": 10.0}

    def cube_message(cube):
        body = sim._cube_body[sawyer_env.CUBES.index(cube)]
        w, x, y, z = d.xquat[body]
        stamp = message(to_sec=lambda t=state["stamp"]: t)
        return message(header=message(stamp=stamp), pose=message(position=point(*d.xpos[body]),
                                                                   orientation=message(x=x, y=y, z=z, w=w)))

    def deliver():
        for topic, callback in subscribers.items():
            if "Gripper" in topic:
                callback(message(gPO=state["gPO"], gOBJ=state["gOBJ"]))
            elif "wrench" in topic:
                callback(message(wrench=message(force=point(1, 2, 3), torque=point(0.1, 0.2, 0.3))))
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

        def exit_control_mode(self):
            rec.record("exit_control_mode")

        def move_to_joint_positions(self, positions):
            rec.record("move_to_joint_positions", dict(positions))

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


def test_intera_backend_without_the_sdk_is_one_sentence():
    with pytest.raises(RobotError, match=r"^--backend intera needs rospy, the Intera SDK \(intera_interface\)"):
        real_robot.InteraBackend(start_thread=False)


def test_intera_backend_drives_the_right_arm_by_joint_velocities_and_the_gripper(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim_observation, _ = sim.reset(seed=3)
    rec, state, deliver = fake_ros(monkeypatch, sim)
    backend = real_robot.InteraBackend(start_thread=False)
    assert rec.named("Limb") == [("right",)] and rec.named("enable") == [()]
    assert rec.named("init_node")[0][1]["disable_signals"] is True
    assert rec.named("set_command_timeout") == [(real_robot.COMMAND_TIMEOUT,)]
    assert {t for (t,) in rec.named("subscribe")} == {"Robotiq2FGripperRobotInput", "robotiq_ft_wrench",
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
    now = time.monotonic()
    velocities = backend.resend_once(now)
    (sent,) = rec.named("set_joint_velocities")[-1]
    assert list(sent) == list(sawyer_env.JOINT_NAMES)
    np.testing.assert_allclose(list(sent.values()), velocities)
    jacobian_position = np.zeros((3, sim.model.nv))
    mujoco.mj_forward(sim.model, sim.data)
    mujoco.mj_jacSite(sim.model, sim.data, jacobian_position, None, sim._pinch)
    np.testing.assert_allclose(jacobian_position[:, sim._arm_dof] @ velocities, [0.07, 0.0, -0.03], atol=2e-3)
    assert np.all(np.abs(velocities) <= sawyer_env.JOINT_VELOCITY_LIMITS + 1e-9)
    # watchdog: a command older than COMMAND_TIMEOUT is not re-sent; zero Cartesian velocity is
    stale = backend.resend_once(now + real_robot.COMMAND_TIMEOUT + 0.01)
    np.testing.assert_allclose(jacobian_position[:, sim._arm_dof] @ stale, 0.0, atol=2e-3)
    assert backend.watchdog_zeroed == 1

    # stop: zero joint velocities at once, position mode, and nothing more until the next move home
    publishes = len(rec.named("publish"))
    backend.stop()
    assert rec.named("set_joint_velocities")[-1] == (dict.fromkeys(sawyer_env.JOINT_NAMES, 0.0),)
    assert rec.calls[-1] == ("exit_control_mode",)
    backend.send_command(np.array([0.07, 0.0, 0.0, 0.0, 255.0]))
    assert backend.resend_once() is None and len(rec.named("publish")) == publishes
    assert backend.check_fault() is None
    state["collided"] = True
    assert backend.check_fault() == "the Intera SDK reports a collision"


def test_intera_backend_paces_the_control_loop_at_20_hz(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim.reset(seed=0)
    fake_ros(monkeypatch, sim)
    backend = real_robot.InteraBackend(start_thread=False)
    backend.move_home(seed=0)
    start = time.monotonic()
    for _ in range(4):
        backend.wait_for_next_step()
    assert 0.19 <= time.monotonic() - start < 0.3 and backend.overruns == 0


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


def test_intera_command_thread_resends_at_about_100_hz_and_stops_with_close(monkeypatch):
    sim = sawyer_env.SawyerEnv("reach")
    sim.reset(seed=0)
    rec, _, _ = fake_ros(monkeypatch, sim)
    backend = real_robot.InteraBackend()
    backend.move_home(seed=0)
    backend.send_command(np.array([0.0, 0.0, 0.05, 0.0, 0.0]))
    time.sleep(0.2)
    sent = len(rec.named("set_joint_velocities"))
    backend.close()
    assert 5 <= sent <= 25 and backend.thread_error is None  # 20 at 100 Hz; loose for a loaded machine
    assert not backend._thread.is_alive() and rec.calls[-1] == ("exit_control_mode",)


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
