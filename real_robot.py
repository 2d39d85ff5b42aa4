"""real_robot.py: the Sawyer tasks of sawyer_env.py on a real arm (paper §5.3, Appendix C.3).

`RealSawyerEnv` is a gymnasium.Env with exactly sawyer_env's observation and action spaces, index
map and reward functions (imported, not copied), stepped at 20 Hz through a `Backend`:
  - `SimBackend`: sawyer_env's MuJoCo physics (tests, dry runs of the whole pipeline);
  - `InteraBackend`: a real Sawyer through the Intera SDK (`intera_interface`, `rospy`), a Robotiq
    2F-85 gripper and FT300 wrist sensor over their ROS drivers, cube poses from a tracker.
Every command passes through `SafetyLayer` whatever the backend; every episode is logged in the
dataset format of the learning scripts (`EpisodeLog`). The command line evaluates an exported
policy (policy.pt2, written by every learning script) and writes the returns per task (Figure 5):

    python real_robot.py --policy runs/<run>/policy.pt2 --task stack --episodes 50 --backend sim

Safety layer (every step, whatever the backend):
  1. a non-finite action, or one beyond ABSURD_FACTOR x its limit, is a broken policy: stop,
     the episode ends, logged and flagged incomplete; so is invalid state (a non-finite
     observation, a wrist quaternion of norm far from 1), which could not bound a command;
  2. the action is clipped to the Appendix C.3 limits (0.07 m/s, 1 rad/s, 255 units/s);
  3. a Cartesian velocity component that would carry the pinch point out of the workspace box
     (sawyer_env.WORKSPACE_CENTER +- WORKSPACE_HALF) within one control step is zeroed, and so is
     a wrist rate turning past sawyer_env.WRIST_YAW_LIMIT;
  4. a wrist force of magnitude above 20 N stops the arm and terminates the episode (an MDP
     termination, discount 0, logged complete with end "wrist_force"). Appendix C.3 says "on any
     axis"; the magnitude implies it and also stops a diagonal push (34.6 N passes per axis). On the
     real arm every sensor reading is checked as it arrives and stops the arm at once; a NaN
     reading, or a force sensor or joint-state stream silent for SENSOR_TIMEOUT, is a fault;
  5. control deadline: a step (observation read -> next command sent: rewards, checks, log writes
     and the policy) longer than 50 ms sends a zero-velocity command instead of the late action and
     is counted; MAX_CONSECUTIVE_MISSES (3) in a row (150 ms without a fresh command) end the
     episode, stopped and flagged incomplete; a control period that overran is flagged and counted;
  6. any exception (backend, policy, logging) and Ctrl-C, SIGTERM or SIGHUP send a stop command
     first; the episode in progress is logged and flagged incomplete, earlier episodes are
     untouched. The first signal stops the arm at once (a move home too) and ends the run after
     logging (exit status 128 + the signal: 130 for Ctrl-C); a second one raises.
A backend starts stopped, and a stop latches: no velocity command leaves until a move home has
succeeded and a new command has passed the safety layer.

Conventions invented here (the paper's cell is not published; change them in InteraConfig):
  - Cube poses arrive as geometry_msgs/PoseStamped in the robot base frame (= sawyer_env's world
    frame) on `/cube_tracker/<cube>/pose`; velocities are finite differences between control
    steps; a cube not seen keeps its last pose with zero velocity.
  - The FT300 wrench (`robotiq_ft_wrench`, geometry_msgs/WrenchStamped) is taken as given in the
    sawyer_env sensor frame (axes of the hand frame) and zeroed at every move home, only when it
    reads at most TARE_MAX_FORCE (no contact); otherwise the move home fails.
  - The move home is the SDK's joint-position move at HOME_SPEED_RATIO, aborted at its next 100 Hz
    check by a stop (signal, force, silent sensor) or a collision; not arriving within 15 s fails.
  - The Intera endpoint (`right_hand`) is sawyer_env's wrist frame; the base frame is its world frame.
  - Cartesian velocities become joint velocities with sawyer_env's own controller (damped least
    squares on the MuJoCo model's Jacobian at the measured joint angles, tool held pointing down,
    null-space posture), recomputed and re-sent at 100 Hz on a fixed schedule; a zero command, and
    a held command older than COMMAND_TIMEOUT (watchdog), are sent as exactly zero joint velocity
    (not the controller's orientation and posture terms); the SDK's command timeout is kept at
    COMMAND_TIMEOUT (also when stopping) so a dead process leaves the arm holding position.
  - The gripper's velocity action becomes the position target clip(gPO + v * 0.05, 0, 255)
    (sawyer_facts.md); a stop leaves the gripper's last target (a held cube is not dropped).
  - Between episodes the arm moves to a start pose drawn like sawyer_env's (same distribution,
    same seed); the cubes stay where they are (an operator or a reset routine moves them).

Episode log (`EpisodeLog`): one file per episode in `<log>.episodes/`, written atomically when the
episode ends (and every second while it runs, as a flagged `.partial` file), then the whole log
`<log>.npz` rewritten atomically (unique temporary file, fsync, rename, fsync of the folder) and
rebuilt from the episode files at every start; episode numbers are reserved, so two processes on
one log never write the same file. It loads with the learning scripts' load_dataset. Per transition:
`observation`, `action` = the command the arm executed (after the safety layer, and the time
average over the step when the watchdog or a stop zeroed it: the truth for learning),
`policy_action` = what the policy asked, `reward` = all nine task rewards of the next
observation (sawyer_env.compute_rewards), `discount` (0 after a 20 N stop), `next_observation`,
`episode_id`, `step`, `safety_flags` (bit mask, SAFETY_FLAGS). Per episode, in the metadata: task,
seed, steps, returns of every task, `end` ("time_limit", "wrist_force", "aborted"), `reason`,
`complete` (False only for aborted episodes), deadline misses, overruns; `incomplete_episodes`
lists them. The results file of the command line is added to by a rerun, never overwritten.
"""

import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import gymnasium as gym
import mujoco
import numpy as np
import torch
import tyro

import sawyer_env
from sawyer_env import (ACT_DIM, ACTION_HIGH, ACTION_LOW, ALL_TASKS, CONTROL_TIMESTEP, CUBES, EPISODE_STEPS,
                        JOINT_NAMES, MAX_WRIST_FORCE, OBS_DIM, OBS_INDEX, TASKS, WORKSPACE_CENTER, WORKSPACE_HALF,
                        WRIST_YAW_LIMIT, compute_rewards, compute_success)

# ----------------------------------------------------------------------------------------
# Constants (units in brackets)
# ----------------------------------------------------------------------------------------
DEADLINE = CONTROL_TIMESTEP  # [s] observation read -> next command sent longer than this is a missed deadline
MAX_CONSECUTIVE_MISSES = 3  # missed deadlines in a row that end the episode (150 ms unattended)
ABSURD_FACTOR = 10.0  # an action beyond 10x its limit is a broken policy, not an eager one
RESEND_RATE = 100.0  # [Hz] joint velocity commands re-sent this often (sawyer_facts.md: >= 100 Hz)
COMMAND_TIMEOUT = 2 * CONTROL_TIMESTEP  # [s] a held command older than this becomes zero velocity
SENSOR_TIMEOUT = 2 * CONTROL_TIMESTEP  # [s] a force or joint-state stream silent this long is a fault
QUAT_NORM_TOLERANCE = 0.1  # a wrist quaternion whose norm is off 1 by more is invalid state
HOME_SPEED_RATIO = 0.2  # fraction of the joints' maximum speed for the move home (the SDK keeps the last one set)
HOME_TIMEOUT = 15.0  # [s] the SDK's move_to_joint_positions timeout
HOME_TOLERANCE = 0.02  # [rad] largest joint error accepted at the end of the move home
TARE_MAX_FORCE = 5.0  # [N] magnitude above which the wrist is touching something: the sensor is not zeroed
GRIPPER_SPEED, GRIPPER_FORCE = 255, 150  # Robotiq rSP, rFR fields (0-255)
ZERO_ACTION = np.zeros(ACT_DIM)
SAFETY_FLAGS = {"clipped": 1, "workspace": 2, "wrist_limit": 4, "deadline_missed": 8, "wrist_force": 16,
                "overrun": 32, "watchdog": 64}
GRASP_FROM_GOBJ = {0: 1.0, 1: 3.0, 2: 2.0, 3: 1.0}  # Robotiq gOBJ -> grasp flag (sawyer_facts.md)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class RobotError(Exception):
    """A problem the user can fix (missing SDK, bad policy file): reported in one sentence, exit 1."""


# ----------------------------------------------------------------------------------------
# Safety layer
# ----------------------------------------------------------------------------------------
class SafetyLayer:
    """Checks and filters every command (module docstring, items 1-4); pure, no state."""

    def __init__(self, absurd_factor: float = ABSURD_FACTOR, max_force: float = MAX_WRIST_FORCE):
        self.absurd_factor, self.max_force = absurd_factor, max_force

    def action_fault(self, action: np.ndarray) -> Optional[str]:
        """why the action must not be executed at all, or None"""
        if action.shape != (ACT_DIM,):
            return f"action has shape {action.shape}, expected ({ACT_DIM},)"
        if not np.all(np.isfinite(action)):
            return f"non-finite action {action.tolist()}"
        if np.any(np.abs(action) > self.absurd_factor * ACTION_HIGH):
            return f"absurd action {action.tolist()} (beyond {self.absurd_factor:g}x the limits {ACTION_HIGH.tolist()})"
        return None

    def state_fault(self, observation: np.ndarray) -> Optional[str]:
        """why the observation cannot be trusted to filter a command (NaN, no valid wrist orientation), or None"""
        observation = np.asarray(observation, np.float64)
        if not np.all(np.isfinite(observation)):
            bad = [name for name, index in OBS_INDEX.items() if not np.all(np.isfinite(observation[index]))]
            return f"invalid robot state: non-finite {', '.join(bad)}"
        norm = float(np.linalg.norm(observation[OBS_INDEX["wrist_quat"]]))
        if abs(norm - 1.0) > QUAT_NORM_TOLERANCE:
            return f"invalid robot state: wrist quaternion of norm {norm:.3f}"
        return None

    def filter(self, action: np.ndarray, observation: np.ndarray) -> tuple[np.ndarray, int]:
        """clip to the limits, zero what would leave the workspace or turn past the wrist limit;
        returns (command [5], SAFETY_FLAGS bits). Invalid state gives zero velocity."""
        command = np.clip(action, ACTION_LOW, ACTION_HIGH)
        flags = SAFETY_FLAGS["clipped"] if np.any(command != action) else 0
        if self.state_fault(observation) is not None:  # the caller aborts; never let a command through
            return ZERO_ACTION.copy(), flags | SAFETY_FLAGS["workspace"] | SAFETY_FLAGS["wrist_limit"]
        pinch = sawyer_env.pinch_position(observation.astype(np.float64))
        ahead = pinch + command[:3] * CONTROL_TIMESTEP
        leaving = ((ahead > WORKSPACE_CENTER + WORKSPACE_HALF) & (command[:3] > 0)) | (
            (ahead < WORKSPACE_CENTER - WORKSPACE_HALF) & (command[:3] < 0))
        if np.any(leaving):
            command[:3][leaving] = 0.0
            flags |= SAFETY_FLAGS["workspace"]
        yaw = float(sawyer_env.wrist_yaw(observation.astype(np.float64))) + command[3] * CONTROL_TIMESTEP
        if abs(yaw) > WRIST_YAW_LIMIT and yaw * command[3] > 0:
            command[3] = 0.0
            flags |= SAFETY_FLAGS["wrist_limit"]
        return command, flags

    def force_fault(self, force) -> Optional[str]:
        """why a wrist force reading [3] (N, or an observation holding one) must stop the arm, or None.
        The limit is on the magnitude: Appendix C.3 states 20 N "on any axis", which lets 34.6 N
        through along a diagonal of the sensor's axes; |f| > 20 N implies it, so every stop the
        paper makes is made here too (README "Real robot")."""
        force = np.asarray(force, np.float64)
        force = sawyer_env.wrist_force(force) if force.shape == (OBS_DIM,) else force
        if force.shape != (3,) or not np.all(np.isfinite(force)):
            return f"invalid wrist force reading {force.tolist()}"
        magnitude = float(np.linalg.norm(force))
        if magnitude > self.max_force:
            return (f"wrist force {magnitude:.1f} N (x {force[0]:+.1f}, y {force[1]:+.1f}, z {force[2]:+.1f}) "
                    f"exceeds {self.max_force:g} N")
        return None


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------
class Backend:
    """What RealSawyerEnv needs from a robot. `stop()` latches: no velocity command leaves until
    `move_home()` has completed and a new command is sent. Subclasses implement the underscored
    methods."""

    name = "backend"

    def __init__(self):
        self.stopped, self.stop_count, self.stop_reason = True, 0, ""  # nothing moves before the first home move
        self.overruns, self._stops_before_home = 0, 0
        self._held, self._held_at, self._zeroed_at = ZERO_ACTION.copy(), 0.0, None

    def move_home(self, seed: Optional[int]) -> np.ndarray:
        """move to a start pose (seeded), tare the wrist sensor; returns the first observation. The stop
        latch stays set during the move and is cleared only when it succeeded; a stop during the move
        (Ctrl-C, a force or collision fault) aborts it with RobotError."""
        self._stops_before_home = self.stop_count
        self.stopped = True
        observation = self._move_home(seed)
        self.stopped = False
        return observation

    def home_interrupted(self) -> Optional[str]:
        """during _move_home: why a stop came since the move began (abort the move), or None"""
        return (self.stop_reason or "stopped") if self.stop_count != self._stops_before_home else None

    def send_command(self, command: np.ndarray) -> None:
        """hold [vx, vy, vz, wrist rate, finger rate] (physical units) until the next command"""
        command = ZERO_ACTION.copy() if self.stopped else np.asarray(command, np.float64).copy()
        self._held, self._held_at, self._zeroed_at = command, time.monotonic(), None
        self._send(command)
        if self.stopped and self._zeroed_at is None:  # a stop from another thread came in between
            self._zeroed_at = self._held_at

    def executed_command(self) -> tuple[np.ndarray, bool]:
        """the held command as executed since it was sent: the arm part is the time average of
        the velocity held (zero after a stop or a watchdog zeroing); returns (command, zeroed)"""
        executed = self._held.copy()
        if self._zeroed_at is None:
            return executed, False
        elapsed = time.monotonic() - self._held_at
        executed[:4] *= min(max((self._zeroed_at - self._held_at) / elapsed, 0.0), 1.0) if elapsed > 0 else 0.0
        return executed, True

    def stop(self, reason: str = "") -> None:
        """zero velocity now; idempotent, safe after an error, inside a signal handler and from a
        sensor thread"""
        self.stopped = True
        self.stop_count += 1
        self.stop_reason = reason
        if self._zeroed_at is None:
            self._zeroed_at = time.monotonic()
        self._stop()

    def wait_for_next_step(self) -> bool:
        """let one control period (50 ms) pass; True when the step overran its period"""
        raise NotImplementedError

    def read_observation(self) -> np.ndarray:
        """[OBS_DIM] float32 in sawyer_env's layout"""
        raise NotImplementedError

    def check_fault(self) -> Optional[str]:
        """a problem the robot reports (collision, dead command thread, silent sensor), or None"""
        return None

    def force_fault(self) -> Optional[str]:
        """a wrist force over the limit seen by the backend since the last step (every sensor
        reading, not only the one in the observation), or None"""
        return None

    def close(self) -> None:
        self.stop("closed")

    def _move_home(self, seed):
        raise NotImplementedError

    def _send(self, command):
        raise NotImplementedError

    def _stop(self):
        raise NotImplementedError


class SimBackend(Backend):
    """sawyer_env's physics as the robot: a control period is one SawyerEnv.step of the held
    command. Records every command the physics executed (`executed`), for tests."""

    name = "sim"

    def __init__(self, env: Optional[sawyer_env.SawyerEnv] = None):
        super().__init__()
        self.env = env or sawyer_env.SawyerEnv(task=TASKS[0])  # its task is irrelevant: we compute every reward
        self._command, self._observation, self.executed = ZERO_ACTION.copy(), None, []

    def _move_home(self, seed):
        self._command = ZERO_ACTION.copy()
        self._observation, _ = self.env.reset(seed=seed)
        return self._observation.copy()

    def _send(self, command):
        self._command = command.copy()

    def _stop(self):
        self._command = ZERO_ACTION.copy()

    def wait_for_next_step(self):
        self.executed.append(self._command.copy())
        self._observation = self.env.step(self._command)[0]
        return False

    def executed_command(self):
        return self.executed[-1].copy(), False

    def read_observation(self):
        return self._observation.copy()

    def close(self):
        super().close()
        self.env.close()


class _Kinematics:
    """sawyer_env's Cartesian velocity controller evaluated at measured joint angles. Its MuJoCo
    model is only used for kinematics; each thread owns its own instance (the command thread one,
    the home move another), so no physics state is shared between threads."""

    def __init__(self):
        self.env = sawyer_env.SawyerEnv(task=TASKS[0])

    def joint_velocities(self, joint_angles: np.ndarray, twist: np.ndarray) -> np.ndarray:
        env = self.env
        env.data.qpos[env._arm_qpos] = joint_angles
        mujoco.mj_kinematics(env.model, env.data)
        mujoco.mj_comPos(env.model, env.data)
        return env._joint_velocity_command(twist[:3], float(twist[3]))  # the simulation's own controller

    def start_pose(self, seed: Optional[int]) -> np.ndarray:
        """joint angles of a start pose drawn exactly like sawyer_env's (tool box, yaw, IK)"""
        self.env.reset(seed=seed)
        return self.env.data.qpos[self.env._arm_qpos].copy()


@dataclass
class InteraConfig:
    """ROS names and rates of the real cell. Those marked "convention" are this file's choice."""

    limb: str = "right"
    joint_state_topic: str = "robot/joint_states"  # Intera SDK (sensor_msgs/JointState); watched for staleness
    gripper_status_topic: str = "Robotiq2FGripperRobotInput"  # robotiq_2f_gripper_control defaults
    gripper_command_topic: str = "Robotiq2FGripperRobotOutput"
    wrench_topic: str = "robotiq_ft_wrench"  # robotiq_ft_sensor default (geometry_msgs/WrenchStamped)
    wrench_zero_service: str = "robotiq_ft_sensor_acc"
    cube_pose_topic: str = "/cube_tracker/{cube}/pose"  # convention: PoseStamped in the base frame
    resend_rate: float = RESEND_RATE
    message_timeout: float = 5.0  # [s] wait for the first message of every topic


class InteraBackend(Backend):
    """A real Sawyer through the Intera SDK, Robotiq 2F-85 and FT300 over ROS (conventions: module
    docstring). Imports rospy/intera_interface lazily: nothing here is needed for the simulation.

    Threads: the caller's (steps, home moves), the command thread (re-sends the held command at
    100 Hz, watches the sensors' ages) and rospy's callbacks (every wrench reading is checked there
    and stops the arm at once). They share only `_lock`-guarded fields, never a MuJoCo model."""

    name = "intera"

    def __init__(self, config: InteraConfig = InteraConfig(), start_thread: bool = True):
        super().__init__()
        try:
            import intera_interface
            import rospy
            from geometry_msgs.msg import PoseStamped, WrenchStamped
            from robotiq_2f_gripper_control.msg import Robotiq2FGripper_robot_input as GripperStatus
            from robotiq_2f_gripper_control.msg import Robotiq2FGripper_robot_output as GripperCommand
            from robotiq_ft_sensor.srv import sensor_accessor, sensor_accessorRequest
            from sensor_msgs.msg import JointState
        except ImportError as error:
            raise RobotError(f"--backend intera needs rospy, the Intera SDK (intera_interface) and the Robotiq "
                             f"drivers from a sourced ROS workspace, which are not importable here ({error})") from None
        self.rospy, self.config, self._GripperCommand = rospy, config, GripperCommand
        if not rospy.core.is_initialized():
            rospy.init_node("real_robot", anonymous=True, disable_signals=True)  # our signal handler stops the arm
        intera_interface.RobotEnable().enable()
        self.limb = intera_interface.Limb(config.limb)
        self.limb.set_command_timeout(COMMAND_TIMEOUT)
        self.joint_names = [name.replace("right", config.limb, 1) for name in JOINT_NAMES]
        self.kinematics, self._home_kinematics = _Kinematics(), _Kinematics()  # one per thread
        self.safety = SafetyLayer()
        self._lock = threading.RLock()  # RLock: stop() may run in a signal handler while the lock is held
        self._latest, self._received = {}, {}  # topic key -> latest message, time.monotonic() it arrived
        self._force_event = self._sensor_fault = None
        self._cubes_before, self._finger_before = {}, None
        self._twist, self._sent_at, self._approved, self._next_tick = np.zeros(4), -math.inf, False, None
        self.watchdog_zeroed = 0
        self.thread_error = None
        rospy.Subscriber(config.joint_state_topic, JointState, self._store("joint_states"), queue_size=1)
        rospy.Subscriber(config.gripper_status_topic, GripperStatus, self._store("gripper"), queue_size=1)
        rospy.Subscriber(config.wrench_topic, WrenchStamped, self._on_wrench, queue_size=1)
        for cube in CUBES:
            rospy.Subscriber(config.cube_pose_topic.format(cube=cube), PoseStamped, self._store(cube), queue_size=1)
        self._gripper = rospy.Publisher(config.gripper_command_topic, GripperCommand, queue_size=1)
        self._zero_wrench = lambda: rospy.ServiceProxy(config.wrench_zero_service, sensor_accessor)(
            sensor_accessorRequest(command_id=sensor_accessorRequest.COMMAND_SET_ZERO))
        self._wait_for_messages()  # the gripper is activated by the first move home, not here: activating
        # a 2F-85 makes it open and close fully, which is motion before an episode
        self._shutdown = threading.Event()
        self._thread = threading.Thread(target=self._resend_loop, daemon=True) if start_thread else None
        if self._thread is not None:
            self._thread.start()

    # --- ROS plumbing ---------------------------------------------------------------------
    def _store(self, key: str) -> Callable:
        def callback(message):
            with self._lock:
                self._latest[key], self._received[key] = message, time.monotonic()
        return callback

    def _on_wrench(self, message) -> None:
        """every FT300 reading: stored, and checked at once (a NaN or a force over the limit stops the arm)"""
        self._store("wrench")(message)
        force = message.wrench.force
        fault = self.safety.force_fault([force.x, force.y, force.z])
        if fault is None:
            return
        with self._lock:
            if fault.startswith("invalid"):
                self._sensor_fault = self._sensor_fault or fault
            else:
                self._force_event = self._force_event or fault
        self.stop(fault)

    def _wait_for_messages(self) -> None:
        deadline = time.monotonic() + self.config.message_timeout
        needed = ["joint_states", "gripper", "wrench", *CUBES]
        while time.monotonic() < deadline and not all(key in self._latest for key in needed):
            time.sleep(0.01)
        missing = [key for key in needed if key not in self._latest]
        if missing:
            raise RobotError(f"no message within {self.config.message_timeout:g} s for {missing}; are the robot, "
                             f"gripper, force sensor and cube tracker nodes running (InteraConfig topics)?")

    def _check_streams(self, now: float) -> Optional[str]:
        """a silent force sensor or joint-state stream is a fault: stop the arm (the last reading
        would otherwise be used for the rest of the run)"""
        for key, what in (("wrench", "wrist force sensor"), ("joint_states", "joint state stream")):
            age = now - self._received.get(key, -math.inf)
            if age > SENSOR_TIMEOUT:
                fault = f"no {what} reading for {1000 * age:.0f} ms (limit {1000 * SENSOR_TIMEOUT:.0f} ms)"
                with self._lock:
                    self._sensor_fault = self._sensor_fault or fault
                if not self.stopped:
                    self.stop(fault)
                return fault
        return None

    def _publish_gripper(self, position: int) -> None:
        self._gripper.publish(self._GripperCommand(rACT=1, rGTO=1, rATR=0, rPR=int(np.clip(position, 0, 255)),
                                                   rSP=GRIPPER_SPEED, rFR=GRIPPER_FORCE))

    def _joint_angles(self) -> np.ndarray:
        angles = self.limb.joint_angles()
        return np.array([angles[name] for name in self.joint_names])

    def _force(self) -> np.ndarray:
        with self._lock:
            force = self._latest["wrench"].wrench.force
        return np.array([force.x, force.y, force.z], np.float64)

    # --- commands -------------------------------------------------------------------------
    def resend_once(self, now: Optional[float] = None) -> Optional[np.ndarray]:
        """one re-send of the held Cartesian command as joint velocities at the current joint
        angles. Nothing is sent while stopped, homing, or before a command was approved since the
        last stop or home move (the arm holds position); a zero command, or one older than
        COMMAND_TIMEOUT (watchdog), is sent as exactly zero joint velocity, never the controller's
        orientation and posture terms. Returns the joint velocities sent, or None."""
        now = time.monotonic() if now is None else now
        self._check_streams(now)
        with self._lock:
            if self.stopped or not self._approved:
                return None
            twist = self._twist.copy()
            if now - self._sent_at > COMMAND_TIMEOUT and np.any(twist):
                twist[:] = 0.0
                self._twist = twist.copy()
                self.watchdog_zeroed += 1
                if self._zeroed_at is None:
                    self._zeroed_at = self._sent_at + COMMAND_TIMEOUT
            if np.any(twist):
                velocities = self.kinematics.joint_velocities(self._joint_angles(), twist)
            else:
                velocities = np.zeros(len(self.joint_names))
            self.limb.set_joint_velocities(dict(zip(self.joint_names, velocities.tolist())))
        return velocities

    def _resend_loop(self) -> None:
        """re-send at a fixed rate: the schedule advances by one period whatever the work took"""
        period = 1.0 / self.config.resend_rate
        tick = time.monotonic()
        try:
            while not self._shutdown.is_set():
                self.resend_once()
                tick += period
                delay = tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:  # the work overran the period: resume the schedule from now
                    tick = time.monotonic()
        except Exception as error:  # reported through check_fault; the SDK timeout holds the arm
            self.thread_error = f"command thread died: {type(error).__name__}: {error}"

    def _send(self, command):
        with self._lock:
            self._twist, self._sent_at, self._approved = command[:4].copy(), time.monotonic(), not self.stopped
            if not self.stopped:
                position = float(self._latest["gripper"].gPO) + command[4] * CONTROL_TIMESTEP
                self._publish_gripper(int(round(position)))

    def _stop(self):
        with self._lock:
            self._twist, self._approved = np.zeros(4), False
            self.limb.set_joint_velocities(dict.fromkeys(self.joint_names, 0.0))
            self.limb.exit_control_mode(timeout=COMMAND_TIMEOUT)  # position mode: hold where it is

    def _move_home(self, seed):
        """joint-space move to the start pose at HOME_SPEED_RATIO, aborted at once by a stop (Ctrl-C,
        force, collision, silent sensor); failure, collision or the SDK timeout is a RobotError. The
        sensor is zeroed only when its reading shows no contact."""
        target = self._home_kinematics.start_pose(seed)  # this thread's own model
        with self._lock:
            self._twist, self._approved = np.zeros(4), False
            self._force_event = self._sensor_fault = None
        self.limb.exit_control_mode(timeout=COMMAND_TIMEOUT)
        self.limb.set_joint_position_speed(HOME_SPEED_RATIO)
        why = []

        def abort_move():  # called by the SDK at 100 Hz while it moves
            reason = self.home_interrupted() or self._check_streams(time.monotonic())
            if reason is None and self.limb.has_collided():
                reason = "the Intera SDK reports a collision"
            if reason is not None:
                why.append(reason)
            return reason is not None

        self.limb.move_to_joint_positions(dict(zip(self.joint_names, target.tolist())), timeout=HOME_TIMEOUT,
                                          test=abort_move)
        if not why and self.limb.has_collided():
            why.append("the Intera SDK reports a collision")
        error = float(np.max(np.abs(self._joint_angles() - target)))
        if not why and error > HOME_TOLERANCE:
            why.append(f"the start pose was not reached within {HOME_TIMEOUT:g} s (joint error {error:.3f} rad)")
        if why:
            self._stop()
            raise RobotError(f"the move home failed: {why[0]}; the arm holds where it is")
        self._publish_gripper(0)  # activate (rACT=1) and open
        self.rospy.sleep(0.5)  # let the arm and the gripper settle before taring
        reason = self.home_interrupted() or self._check_streams(time.monotonic())
        force = self._force()
        if reason is None and not np.linalg.norm(force) <= TARE_MAX_FORCE:
            reason = (f"the wrist reads {np.linalg.norm(force):.1f} N at the start pose (over {TARE_MAX_FORCE:g} N: "
                      f"touching something), so the force sensor was not zeroed")
        if reason is not None:
            self._stop()
            raise RobotError(f"the move home failed: {reason}; the arm holds where it is")
        self._zero_wrench()
        with self._lock:
            self._cubes_before, self._finger_before = {}, None
            self._force_event = None
        self._next_tick = None
        return self.read_observation()

    def wait_for_next_step(self):
        now = time.monotonic()
        if self._next_tick is None:
            self._next_tick = now
        self._next_tick += CONTROL_TIMESTEP
        if self._next_tick > now:
            time.sleep(self._next_tick - now)
            return False
        self.overruns += 1  # the step overran its period: count it and restart the clock
        self._next_tick = now
        return True

    def check_fault(self):
        self._check_streams(time.monotonic())
        if self.thread_error:
            return self.thread_error
        with self._lock:
            if self._sensor_fault:
                return self._sensor_fault
        if self.limb.has_collided():
            return "the Intera SDK reports a collision"
        return None

    def force_fault(self):
        with self._lock:
            return self._force_event

    def close(self):
        super().close()
        self._shutdown.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    # --- observation ----------------------------------------------------------------------
    def read_observation(self):
        index, obs = OBS_INDEX, np.zeros(OBS_DIM, np.float64)
        velocities, efforts = self.limb.joint_velocities(), self.limb.joint_efforts()
        obs[index["joint_pos"]] = self._joint_angles()
        obs[index["joint_vel"]] = [velocities[name] for name in self.joint_names]
        obs[index["joint_torque"]] = [efforts[name] for name in self.joint_names]
        pose, twist = self.limb.endpoint_pose(), self.limb.endpoint_velocity()
        p, q = pose["position"], pose["orientation"]
        obs[index["wrist_pos"]] = [p.x, p.y, p.z]
        obs[index["wrist_quat"]] = [q.w, q.x, q.y, q.z]  # ROS (x y z w) -> sawyer_env (w x y z)
        obs[index["wrist_vel"]] = [twist["linear"].x, twist["linear"].y, twist["linear"].z,
                                   twist["angular"].x, twist["angular"].y, twist["angular"].z]
        with self._lock:
            latest = dict(self._latest)
        wrench = latest["wrench"].wrench
        obs[index["wrist_force"]] = [wrench.force.x, wrench.force.y, wrench.force.z]
        obs[index["wrist_torque"]] = [wrench.torque.x, wrench.torque.y, wrench.torque.z]
        angle = float(latest["gripper"].gPO)
        obs[index["finger_angle"]] = angle
        obs[index["finger_velocity"]] = 0.0 if self._finger_before is None else angle - self._finger_before
        obs[index["grasp_flag"]] = GRASP_FROM_GOBJ.get(int(latest["gripper"].gOBJ), 1.0)
        self._finger_before = angle
        hand_quat = obs[index["wrist_quat"]] / np.linalg.norm(obs[index["wrist_quat"]])
        hand_rotation = sawyer_env.quat_to_matrix(hand_quat)
        pinch = sawyer_env.pinch_position(obs)
        hand_conjugate, relative = np.empty(4), np.empty(4)
        mujoco.mju_negQuat(hand_conjugate, hand_quat)
        for cube in CUBES:
            stamped = latest[cube]
            stamp = stamped.header.stamp.to_sec()
            position = np.array([stamped.pose.position.x, stamped.pose.position.y, stamped.pose.position.z])
            o = stamped.pose.orientation
            quat = np.array([o.w, o.x, o.y, o.z]) / math.sqrt(o.w ** 2 + o.x ** 2 + o.y ** 2 + o.z ** 2)
            obs[index[f"{cube}_pos"]] = position
            obs[index[f"{cube}_quat"]] = quat
            obs[index[f"{cube}_vel"]] = _finite_difference_velocity(self._cubes_before.get(cube), (stamp, position, quat))
            self._cubes_before[cube] = (stamp, position, quat)
            obs[index[f"{cube}_rel_pos"]] = (position - pinch) @ hand_rotation  # R^T (p - pinch), as sawyer_env
            mujoco.mju_mulQuat(relative, hand_conjugate, quat)
            obs[index[f"{cube}_rel_quat"]] = relative
        return obs.astype(np.float32)


def _finite_difference_velocity(before, now) -> np.ndarray:
    """[linear, angular] world-axes velocity between two (stamp, position, quat) poses; zero when
    there is no earlier pose or the pose was not updated"""
    if before is None or now[0] <= before[0]:
        return np.zeros(6)
    dt = now[0] - before[0]
    rotation = np.empty(3)
    mujoco.mju_subQuat(rotation, now[2], before[2])  # body-frame rotation vector from before to now
    return np.concatenate([(now[1] - before[1]) / dt, sawyer_env.quat_to_matrix(before[2]) @ rotation / dt])


# ----------------------------------------------------------------------------------------
# Episode log in the dataset format
# ----------------------------------------------------------------------------------------
def _write_npz(path: Path, arrays: dict) -> None:
    _write_durably(path, lambda handle: np.savez(handle, **arrays))


class EpisodeLog:
    """Episodes in the dataset format (README "Datasets"), written one at a time: each finished or
    aborted episode goes atomically to `<path stem>.episodes/episode_NNNNNN.npz` (itself a valid
    dataset), then `<path>` (.npz, every episode of the directory) is rewritten atomically; a new
    log on the same path appends. The episode in progress is also saved every PARTIAL_EVERY steps
    as `episode_NNNNNN.partial.npz`, flagged incomplete, so even a killed process (no exception
    handler ran) keeps all but its last second; the next log on that path consolidates it."""

    ARRAYS = ("observation", "action", "policy_action", "reward", "discount", "next_observation", "safety_flags")
    SHAPES = {"observation": (OBS_DIM,), "action": (ACT_DIM,), "policy_action": (ACT_DIM,),
              "reward": (len(ALL_TASKS),), "discount": (), "next_observation": (OBS_DIM,), "safety_flags": ()}
    PARTIAL_EVERY = 20  # [steps] 1 s of control

    def __init__(self, path, collection: Optional[dict] = None):
        self.path = Path(path)
        self.parts = self.path.with_suffix(".episodes")
        self.parts.mkdir(parents=True, exist_ok=True)
        self.collection = collection or {}
        self._rows, self._record = None, None
        # <path> may be stale (a process killed mid-episode or during the rewrite): rebuild it from
        # the episode files, which are the truth
        self.consolidate()

    def _files(self) -> dict[int, Path]:
        """episode number -> its file (the final one when a partial one is also left over)"""
        files = {}
        for file in sorted(self.parts.glob("episode_*.npz"), key=lambda f: f.name.endswith(".partial.npz"), reverse=True):
            files[int(file.name[len("episode_"):].split(".")[0])] = file
        return dict(sorted(files.items()))

    @property
    def in_progress(self) -> bool:
        return self._record is not None

    def begin(self, task: str, seed: Optional[int]) -> None:
        assert not self.in_progress
        self._record = {"episode": self._reserve_number(), "task": task, "seed": seed, "started": time.time()}
        self._rows = {key: [] for key in self.ARRAYS}

    def _reserve_number(self) -> int:
        """the next episode number, reserved by creating `episode_NNNNNN.reserved` exclusively, so
        that two processes on one log never write the same episode file"""
        taken = [int(f.name[len("episode_"):].split(".")[0]) for f in self.parts.glob("episode_*.reserved")]
        number = max([*self._files(), *taken], default=-1) + 1
        while True:
            try:
                os.close(os.open(self.parts / f"episode_{number:06d}.reserved", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return number
            except FileExistsError:
                number += 1

    def add(self, **row) -> None:
        for key in self.ARRAYS:
            self._rows[key].append(row[key])
        steps = len(self._rows["observation"])
        if steps % self.PARTIAL_EVERY == 0:
            self._write(dict(self._record), "aborted", f"the process ended during the episode (saved at step {steps})",
                        False, partial=True)

    def end(self, end: str, reason: str, complete: bool, **extra) -> dict:
        """write the episode; end is "time_limit", "wrist_force" or "aborted" (complete=False)"""
        record = self._write(self._record, end, reason, complete, **extra)
        self.parts.joinpath(f"episode_{record['episode']:06d}.partial.npz").unlink(missing_ok=True)
        self.parts.joinpath(f"episode_{record['episode']:06d}.reserved").unlink(missing_ok=True)
        self._rows, self._record = None, None
        self.consolidate()
        return record

    def _write(self, record: dict, end: str, reason: str, complete: bool, partial: bool = False, **extra) -> dict:
        steps = len(self._rows["observation"])
        dtype = lambda key: np.int64 if key == "safety_flags" else np.float32  # noqa: E731
        arrays = {key: np.asarray(self._rows[key], dtype(key)).reshape(steps, *self.SHAPES[key]) for key in self.ARRAYS}
        arrays["episode_id"] = np.full(steps, record["episode"], np.int64)
        arrays["step"] = np.arange(steps, dtype=np.int64)
        record.update(steps=steps, end=end, reason=reason, complete=complete,
                      returns=dict(zip(ALL_TASKS, map(float, arrays["reward"].sum(0)))), **extra)
        arrays["metadata"] = np.array(json.dumps(self._metadata([record])))
        name = f"episode_{record['episode']:06d}" + (".partial" if partial else "")
        _write_npz(self.parts / f"{name}.npz", arrays)
        return record

    def _metadata(self, records: list) -> dict:
        return {"env": "sawyer", "tasks": list(ALL_TASKS), "spec": sawyer_env.env_spec(),
                "collection": {"method": "real_robot.py", **self.collection},
                "safety_flags": SAFETY_FLAGS, "episodes": records,
                "incomplete_episodes": [r["episode"] for r in records if not r["complete"]],
                "episode_returns": {task: [r["returns"][task] for r in records] for task in ALL_TASKS}}

    def consolidate(self) -> None:
        """rewrite `path` from every episode file (episodes with no transition are in metadata only)"""
        episodes, records = [], []
        for file in self._files().values():
            try:
                with np.load(file, allow_pickle=False) as archive:
                    episode = {key: archive[key] for key in archive.files}
            except FileNotFoundError:  # a partial file another process on this log just replaced
                continue
            records += json.loads(str(episode.pop("metadata")))["episodes"]
            episodes.append(episode)
        if sum(len(e["step"]) for e in episodes) == 0:
            return  # load_dataset refuses a dataset without transitions
        arrays = {key: np.concatenate([e[key] for e in episodes]) for key in episodes[0]}
        arrays["metadata"] = np.array(json.dumps(self._metadata(records)))
        _write_npz(self.path, arrays)


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------
class RealSawyerEnv(gym.Env):
    """sawyer_env's tasks on a Backend, every command through SafetyLayer, every episode logged.

    step() returns the task's reward and info with "rewards" ([9], ALL_TASKS order), "successes",
    "success", "task", "task_index", "wrist_force", "safety_flags", "deadline_missed" and, when the
    episode was cut short, "aborted" (the reason; truncated is then True)."""

    metadata = {"render_modes": [], "render_fps": round(1 / CONTROL_TIMESTEP)}

    def __init__(self, backend: Backend, task: str = "stack", log: Optional[EpisodeLog] = None,
                 safety: Optional[SafetyLayer] = None, deadline: float = DEADLINE,
                 max_consecutive_misses: int = MAX_CONSECUTIVE_MISSES, episode_steps: int = EPISODE_STEPS):
        if task not in ALL_TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {ALL_TASKS}")
        self.backend, self.task, self.log, self.safety = backend, task, log, safety or SafetyLayer()
        self.deadline, self.max_consecutive_misses, self.episode_steps = deadline, max_consecutive_misses, episode_steps
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.interrupted = False
        self._observation, self._observed_at, self._running = None, 0.0, False
        self.last_episode = None  # record of the last episode that ended

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        if self._running:
            self.abort("reset before the episode ended")
        if (options or {}).get("task") is not None:
            if options["task"] not in ALL_TASKS:
                raise ValueError(f"unknown task {options['task']!r}; choose one of {ALL_TASKS}")
            self.task = options["task"]
        try:
            observation = self.backend.move_home(seed)
        except BaseException:
            self._safe_stop()
            raise
        self._steps, self._misses, self._consecutive_misses, self._overruns, self._running = 0, 0, 0, 0, True
        self._returns = np.zeros(len(ALL_TASKS))
        if self.log is not None:
            self.log.begin(self.task, seed)
        self._observation, self._observed_at = observation, time.perf_counter()
        return observation.copy(), {"task": self.task, "task_index": ALL_TASKS.index(self.task)}

    def step(self, action):
        assert self._running, "call reset() first"
        try:
            return self._step(action)
        except BaseException as error:  # Ctrl-C without our handler, backend, SDK or disk errors
            if self._running:
                self.abort(f"{type(error).__name__}: {error}")
            else:
                self._safe_stop()
            raise

    def _step(self, action):
        if self.interrupted:
            return self._aborted_step(f"interrupted ({self.interrupted})")
        policy_action = np.asarray(action, dtype=np.float64)
        fault = self.safety.action_fault(policy_action) or self.safety.state_fault(self._observation)
        if fault is not None:
            return self._aborted_step(fault)
        command, flags = self.safety.filter(policy_action, self._observation)
        # the whole step counts: everything since the observation was read (rewards, fault checks,
        # log writes, the policy, the filter), not only the policy
        latency = time.perf_counter() - self._observed_at
        missed = latency > self.deadline
        if missed:
            self._misses += 1
            self._consecutive_misses += 1
            if self._consecutive_misses >= self.max_consecutive_misses:
                return self._aborted_step(f"{self._consecutive_misses} control deadlines missed in a row "
                                          f"(last step {1000 * latency:.0f} ms > {1000 * self.deadline:.0f} ms)")
            command, flags = ZERO_ACTION.copy(), SAFETY_FLAGS["deadline_missed"]
        else:
            self._consecutive_misses = 0
        self.backend.send_command(command)
        if self.backend.wait_for_next_step():
            self._overruns += 1
            flags |= SAFETY_FLAGS["overrun"]
        observation = self.backend.read_observation()
        self._observed_at = time.perf_counter()
        executed, zeroed = self.backend.executed_command()  # what the arm did, watchdog and stops included
        if zeroed:
            flags |= SAFETY_FLAGS["watchdog"]
        backend_fault = self.backend.check_fault()
        state_fault = self.safety.state_fault(observation)
        if state_fault is not None:  # an invalid observation is not logged as a transition
            return self._aborted_step(backend_fault or state_fault)
        rewards = compute_rewards(observation)
        task_index = ALL_TASKS.index(self.task)
        force_fault = self.backend.force_fault() or self.safety.force_fault(observation)
        terminated = force_fault is not None
        if terminated:
            self._safe_stop(force_fault)
            flags |= SAFETY_FLAGS["wrist_force"]
        self._steps += 1
        self._returns += rewards
        truncated = self._steps >= self.episode_steps
        if self.log is not None:
            self.log.add(observation=self._observation, action=executed, policy_action=policy_action,
                         reward=rewards, discount=0.0 if terminated else 1.0, next_observation=observation,
                         safety_flags=flags)
        info = {"task": self.task, "task_index": task_index, "rewards": rewards,
                "successes": compute_success(observation, rewards), "wrist_force": sawyer_env.wrist_force(observation).copy(),
                "safety_flags": flags, "deadline_missed": missed, "executed": executed}
        info["success"] = bool(info["successes"][task_index])
        self._observation = observation
        if backend_fault is not None:
            info["episode"] = self.abort(backend_fault)
            info["aborted"], truncated = backend_fault, True
        elif terminated:
            info["episode"] = self._finish("wrist_force", force_fault, complete=True)
        elif truncated:
            self._safe_stop("episode end")
            info["episode"] = self._finish("time_limit", "", complete=True)
        return observation.copy(), float(rewards[task_index]), terminated, truncated, info

    def abort(self, reason: str) -> dict:
        """stop the arm and end the episode in progress as incomplete (logged, flagged)"""
        self._safe_stop(reason)
        return self._finish("aborted", reason, complete=False) if self._running else {"reason": reason}

    def request_stop(self, reason: str = "SIGINT") -> None:
        """from a signal handler: stop the arm now, end the episode at the next step"""
        self.interrupted = reason
        self._safe_stop(f"interrupted ({reason})")

    def _aborted_step(self, reason: str):
        record = self.abort(reason)
        info = {"task": self.task, "task_index": ALL_TASKS.index(self.task), "aborted": reason, "episode": record,
                "rewards": np.zeros(len(ALL_TASKS)), "deadline_missed": False, "safety_flags": 0}
        return self._observation.copy(), 0.0, False, True, info

    def _safe_stop(self, reason: str = "") -> None:
        try:
            self.backend.stop(reason)
        except BaseException as error:  # keep going: the episode must still be logged
            print(f"real_robot.py: stop command failed ({type(error).__name__}: {error})", file=sys.stderr)

    def _finish(self, end: str, reason: str, complete: bool) -> dict:
        self._running = False
        record = {"task": self.task, "steps": self._steps, "end": end, "reason": reason, "complete": complete,
                  "deadline_misses": self._misses, "overruns": self._overruns,
                  "returns": dict(zip(ALL_TASKS, map(float, self._returns)))}
        if self.log is not None:
            record = self.log.end(end, reason, complete, deadline_misses=self._misses, overruns=self._overruns,
                                  backend=self.backend.name)
        self.last_episode = record
        return record

    def close(self):
        if self._running:
            self.abort("closed")
        self._safe_stop("closed")


@contextmanager
def stop_on_signals(env: RealSawyerEnv):
    """Ctrl-C, SIGTERM and SIGHUP (an ssh session dropping) alike: the first stops the arm at once
    (a move home included), ends the episode at its next step and the run after it. A second one
    raises KeyboardInterrupt (which still stops the arm and logs the episode)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if env.interrupted:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        env.request_stop(name)
        try:  # after SIGHUP the terminal may be gone
            print(f"\nreal_robot.py: {name}, arm stopped; ending the episode ({name} or Ctrl-C again to force).",
                  file=sys.stderr)
        except OSError:
            pass

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


# ----------------------------------------------------------------------------------------
# Exported policies and the evaluation command
# ----------------------------------------------------------------------------------------
def load_policy(path) -> tuple[Callable[[np.ndarray, int], np.ndarray], dict]:
    """policy.pt2 written by a learning script's export_policy -> (act(observation, task_index), spec).
    Refuses, in one sentence, a file that is not such a policy or does not fit sawyer_env."""
    path = Path(path)
    if not path.is_file():
        raise RobotError(f"policy {path} does not exist; a learning script writes runs/<run>/policy.pt2")
    extra = {"policy.json": ""}
    export_log = logging.getLogger("torch.export")  # it logs a traceback before raising on a foreign file
    level = export_log.level
    try:
        export_log.setLevel(logging.CRITICAL)
        module = torch.export.load(str(path), extra_files=extra).module()
        spec = json.loads(extra["policy.json"])
        assert all(key in spec for key in ("env", "obs_dim", "act_dim", "tasks", "action_low", "action_high"))
    except Exception as error:
        raise RobotError(f"cannot load policy {path}: it is not a policy.pt2 written by a learning script "
                         f"({type(error).__name__})") from None
    finally:
        export_log.setLevel(level)
    if (spec["obs_dim"], spec["act_dim"]) != (OBS_DIM, ACT_DIM):
        raise RobotError(f"policy {path} takes observations/actions of size {spec['obs_dim']}/{spec['act_dim']}, "
                         f"the Sawyer has {OBS_DIM}/{ACT_DIM}; was it trained on another env ({spec['env']})?")
    if not (np.allclose(spec["action_low"], ACTION_LOW) and np.allclose(spec["action_high"], ACTION_HIGH)):
        raise RobotError(f"policy {path} outputs actions in [{spec['action_low']}, {spec['action_high']}], not the "
                         f"Sawyer's physical limits; re-export it with env_action_low/high in its spec")

    @torch.no_grad()
    def act(observation: np.ndarray, task_index: int) -> np.ndarray:
        obs = torch.as_tensor(np.asarray(observation, np.float32))[None]
        return module(obs, torch.tensor([task_index], dtype=torch.int64))[0].numpy()

    return act, spec


def _write_durably(path: Path, write: Callable) -> None:
    """write(handle) to a temporary file of a name no other process uses, fsync, rename over `path`,
    fsync the directory: after a crash `path` is the old or the new file, never a mix or nothing"""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _previous_results(output: Optional[Path], tasks: list) -> dict:
    """the results already in `output` (a rerun continues them, it never overwrites them)"""
    if output is None or not output.exists():
        return {"returns": {}, "episodes": [], "aborted": 0, "runs": []}
    try:
        previous = json.loads(output.read_text())
        assert isinstance(previous["returns"], dict) and isinstance(previous["episodes"], list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise RobotError(f"{output} exists but is not a results file of real_robot.py; move it away or pass "
                         f"another --output") from None
    previous.setdefault("runs", [])
    previous.setdefault("aborted", 0)
    return previous


def run_evaluation(env: RealSawyerEnv, act: Callable, policy_tasks: list, tasks: list, episodes: int, seed: int,
                   output: Optional[Path] = None, header: Optional[dict] = None) -> dict:
    """`episodes` test episodes per task; returns (and writes to `output` after every episode) the
    returns of complete episodes per task, and every episode's record, added to those an earlier run
    left in `output`. Stops at Ctrl-C/SIGTERM/SIGHUP and at an exception (after stopping the arm and
    logging the episode); a policy fault ends its episode only."""
    results = _previous_results(output, tasks)
    results.update(header or {})
    results["runs"].append({**(header or {}), "started_at_episode": len(results["episodes"])})
    for task in tasks:
        results["returns"].setdefault(task, [])
    results.pop("interrupted", None), results.pop("error", None)

    def save():
        if output is not None:
            _write_durably(output, lambda handle: handle.write(json.dumps(results, indent=1).encode()))

    with stop_on_signals(env):
        try:
            for task in tasks:
                task_index = policy_tasks.index(task)
                for episode in range(episodes):
                    observation, _ = env.reset(seed=seed + len(results["episodes"]), options={"task": task})
                    done = False
                    while not done:
                        observation, _, terminated, truncated, info = env.step(act(observation, task_index))
                        done = terminated or truncated
                    record = info["episode"]
                    results["episodes"].append(record)
                    if record.get("complete"):
                        results["returns"][task].append(record["returns"][task])
                    else:
                        results["aborted"] += 1
                        print(f"real_robot.py: {task} episode {episode} aborted: {record['reason']}", file=sys.stderr)
                    if env.interrupted:
                        results["interrupted"] = env.interrupted
                    save()
                    if env.interrupted:
                        return results
        except BaseException as error:
            if env._running:  # the policy (or anything outside env.step) raised mid-episode
                env.abort(f"{type(error).__name__}: {error}")
            if env.last_episode is not None and not any(e is env.last_episode for e in results["episodes"]):
                results["episodes"].append(env.last_episode)  # the episode the error cut short
                results["aborted"] += 1
            if env.interrupted and not isinstance(error, KeyboardInterrupt):  # e.g. a move home stopped by Ctrl-C
                results["interrupted"] = env.interrupted
                save()
                return results
            results["error"] = f"{type(error).__name__}: {error}"
            save()
            raise
    save()
    return results


@dataclass
class Args:
    policy: str
    """policy.pt2 exported by a learning script (runs/<run>/policy.pt2)"""
    task: str = "stack"
    """task to evaluate (one of the policy's tasks), or `all` for each of the seven tasks of §5.2"""
    episodes: int = 50
    """test episodes per task"""
    backend: str = "sim"
    """`sim` (sawyer_env's physics) or `intera` (a real Sawyer through the Intera SDK and ROS)"""
    seed: int = 0
    """seed of the start poses (episode i starts from seed + i)"""
    output: Optional[str] = None
    """returns per task (JSON); default `<policy dir>/eval_<backend>_<task>.json`"""
    log: Optional[str] = None
    """episode log in the dataset format; default `<policy dir>/log_<backend>.npz` (appends)"""
    deadline: float = DEADLINE
    """[s] control deadline of one policy step"""


def main(args: Args) -> dict:
    # One thread: a small network gains nothing from more, and on a busy 2-core machine two threads
    # made single-observation calls take 44 ms (median) instead of 0.7 ms, missing the 50 ms deadline.
    torch.set_num_threads(1)
    try:
        act, spec = load_policy(args.policy)
        tasks = [t for t in TASKS if t in spec["tasks"]] if args.task == "all" else [args.task]
        missing = [t for t in tasks if t not in spec["tasks"]]
        if missing or not tasks:
            raise RobotError(f"the policy knows the tasks {spec['tasks']}, not {missing or args.task!r}")
        if args.backend not in ("sim", "intera"):
            raise RobotError(f"--backend must be sim or intera, not {args.backend!r}")
        checks = (("--episodes", args.episodes, args.episodes >= 1, "positive"), ("--seed", args.seed, args.seed >= 0,
                  "zero or more"), ("--deadline", args.deadline, 0 < args.deadline < float("inf"), "positive"))
        for flag, value, valid, expected in checks:
            if not valid:  # a NaN --deadline fails too
                raise RobotError(f"{flag} must be {expected}, not {value!r}")
        folder = Path(args.policy).resolve().parent
        output = Path(args.output or folder / f"eval_{args.backend}_{args.task}.json")
        _previous_results(output, tasks)  # refuse a file we would not append to, before the arm moves
        backend = SimBackend() if args.backend == "sim" else InteraBackend()
        try:
            log = EpisodeLog(args.log or folder / f"log_{args.backend}.npz",
                             {"backend": args.backend, "policy": str(args.policy), "seed": args.seed})
        except OSError as error:
            backend.close()
            raise RobotError(f"cannot write the episode log ({error})") from None
    except RobotError as error:
        sys.exit(f"real_robot.py: error: {error}")
    env = RealSawyerEnv(backend, tasks[0], log=log, deadline=args.deadline)
    header = {"policy": str(args.policy), "policy_env": spec["env"], "backend": args.backend,
              "episodes_per_task": args.episodes, "seed": args.seed, "log": str(log.path)}
    try:
        results = run_evaluation(env, act, spec["tasks"], tasks, args.episodes, args.seed, output, header)
    except Exception as error:
        sys.exit(f"real_robot.py: error: {type(error).__name__}: {error}; the arm was stopped, the episode "
                 f"logged as incomplete in {log.path}, the results so far are in {output}")
    finally:
        env.close()
        backend.close()
    summary = {task: {"episodes": len(r), "mean": float(np.mean(r)) if r else None} for task, r in results["returns"].items()}
    print(json.dumps({"returns": summary, "aborted": results["aborted"], "output": str(output), "log": str(log.path)}, indent=1))
    if results.get("interrupted"):  # the shell's status for the signal (130 for Ctrl-C); results and log are complete
        sys.exit(128 + signal.Signals[results["interrupted"]].value)
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
