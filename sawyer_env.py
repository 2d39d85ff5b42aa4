"""sawyer_env.py: a simulated Sawyer arm, Robotiq-like gripper, basket and three cubes in MuJoCo.

Implements the robot tasks of "Keep doing what worked" (Siegel et al., ICLR 2020): Section 5.2
(seven stacking tasks, multi-task data with every reward annotated, random task per episode,
robot pose re-randomised every 20 episodes, two new tasks: green cube to the basket's centre
and to a corner) and Appendix C.3 (observations, 5-D velocity actions and their limits, 20 Hz
control, 200-step episodes, termination when the wrist force exceeds 20 N, the reward
functions and the tolerances `stol` (Eq. 13) and `btol` (Eq. 14)). Rewards are pure functions
of one observation, so a stored dataset can be re-labelled with any task (§5.2).
Arm, gripper, sensor, basket and cube numbers: ../shared/sawyer_facts.md, sources in comments.

Differences from the paper:
- The paper's cubes are not specified; here they are 4 cm (rgb_stacking), so the Stack term
  `btol(d_z(green, yellow) + 0.05, 0.01)` uses one cube height, 0.04 m, instead of 0.05 m.
- Lift measures the height of the green cube's bottom face above the basket floor.
- The two new tasks (the paper gives no formula): `center` = stol(d(green, basket centre on
  the floor), 0.02, 0.15), `corner` = stol(d(green, (+0.10, +0.10) corner of the reachable
  floor), 0.02, 0.25); the corner's margin is wider because the cubes start farther from it.
- The 2F-85's four-bar linkage is two coupled slide fingers; the finger action is the rate
  of the gripper's position target (0-255 units/s), the target is kept within 25 units of
  the fingers (bounded unobserved wind-up). Finger angle/velocity are floats, not integers.
- The paper's grasp flag is "binary"; here it has the values of DeepMind's cell: 1 none,
  2 inward, 3 outward grasp, set when both pads touch something other than the gripper and
  the position target is >= 2 units beyond the fingers (the real cell's "command").
- "End effector" in the rewards is the pinch point between the finger pads.
- The wrist force is read once per control step (end of the step), as in the observation.
- The §5.2 protocol (`task="random"`): between the 20-episode robot re-randomisations the
  robot starts where the last episode ended (also re-randomised after a 20 N termination);
  the cubes are dropped afresh every episode. The start yaw of the tool is uniform in +-45 deg.
- The basket walls' centres sit at the basket centre's height (the facts give no height).
- The paper's data came from MPO learners; `scripted_policy` is this project's behaviour
  policy for collecting data quickly (success rates: benchmarks/sawyer_speed.py).

Public API: SawyerEnv(task, render_mode); learner_env, normalise_actions (actions in [-1, 1]);
OBS_INDEX / OBS_DIM / ACT_DIM / ACTION_LOW / ACTION_HIGH / TASKS / NEW_TASKS / ALL_TASKS; named
getters (cube_position, pinch_position, ...); stol, btol, compute_rewards, compute_success,
task_reward, REWARD_FUNCTIONS; scripted_policy, collect_episode, env_spec.

Controller (the paper's cell is not published; sawyer_facts.md): the Cartesian twist of the
pinch point -> joint velocities by damped least squares on the site Jacobian + a null-space
posture term, integrated by position-servo joint actuators over 25 physics steps of 2 ms;
tool z held down by a proportional term; the pinch point cannot leave the workspace box.
"""

import functools
import math

import gymnasium as gym
import mujoco
import numpy as np

# ----------------------------------------------------------------------------------------
# Constants (units in brackets)
# ----------------------------------------------------------------------------------------
CONTROL_TIMESTEP = 0.05  # [s] 20 Hz control (Appendix C.3)
PHYSICS_TIMESTEP = 0.002  # [s] (sawyer_facts.md "Control that matches the real cell")
N_SUBSTEPS = round(CONTROL_TIMESTEP / PHYSICS_TIMESTEP)  # 25 physics steps per action
EPISODE_STEPS = 200  # control steps per episode (§5.2)
ROBOT_RESET_PERIOD = 20  # [episodes] robot pose re-randomised this often in "random" mode (§5.2)
SETTLE_TIME = 0.3  # [s] cubes fall from their drop height and come to rest at reset
MAX_WRIST_FORCE = 20.0  # [N] on any axis of the wrist sensor ends the episode (Appendix C.3)

MAX_LINEAR_SPEED = 0.07  # [m/s] per Cartesian axis (Appendix C.3)
MAX_WRIST_RATE = 1.0  # [rad/s] wrist rotation about the vertical (Appendix C.3)
MAX_FINGER_RATE = 255.0  # [gripper units/s] (Appendix C.3)
ACTION_LOW = np.array([-MAX_LINEAR_SPEED] * 3 + [-MAX_WRIST_RATE, -MAX_FINGER_RATE], np.float32)
ACTION_HIGH = -ACTION_LOW
ACT_DIM = 5  # [vx, vy, vz, wrist rate, finger rate]

# Sawyer arm (URDF sawyer_description/urdf/sawyer_base.urdf.xacro; menagerie sawyer.xml agrees)
JOINT_NAMES = tuple(f"right_j{i}" for i in range(7))
JOINT_VELOCITY_LIMITS = np.array([1.74, 1.328, 1.957, 1.957, 3.485, 3.485, 4.545])  # [rad/s]
JOINT_EFFORT_LIMITS = np.array([80, 80, 40, 40, 9, 9, 9], float)  # [Nm]
# Null-space posture for table work (sawyer_facts.md, from DeepMind's cell) [rad]
POSTURE_REFERENCE = np.array([0.0, -0.5186, -0.5294, 1.2209, 0.4086, 1.0783, 0.0])

# Controller (sawyer_facts.md "Control that matches the real cell")
ACTUATOR_GAIN = 500.0  # [Nm/rad] integrated-velocity joint actuators: bias (0, -500, -50)
ACTUATOR_DAMPING = 50.0  # [Nm s/rad]
DLS_DAMPING = 1e-4  # lambda of the damped least squares J^T (J J^T + lambda I)^-1
POSTURE_GAIN = 0.5  # [1/s] null-space pull toward POSTURE_REFERENCE
ORIENTATION_GAIN = 4.0  # [1/s] proportional term keeping the tool axis pointing down
WRIST_YAW_LIMIT = math.pi / 2  # [rad] heading of the tool x axis from world x (DeepMind cell)
LIMIT_APPROACH_TIME = 0.25  # [s] speed toward a workspace/wrist bound <= distance / this
WORKSPACE_CENTER = np.array([0.6, 0.0, 0.17])  # [m] pinch point workspace (DeepMind cell)
WORKSPACE_HALF = np.array([0.125, 0.125, 0.1])  # [m]

# Gripper: Robotiq 2F-85 as two coupled slide fingers (85 mm stroke)
FINGER_STROKE = 0.0425  # [m] per finger, 0 = open, 0.0425 = closed
GRIPPER_UNITS = 255.0  # finger angle 0 (open) .. 255 (closed)
GRIPPER_WINDUP = 25.0  # [units] position target kept within this of the fingers
GRIPPER_STIFFNESS = 3000.0  # [N/m] finger position servo; 25 units -> 12.5 N squeeze
GRIPPER_FORCE_LIMIT = 30.0  # [N]
GRASP_NONE, GRASP_INWARD, GRASP_OUTWARD = 1.0, 2.0, 3.0  # grasp flag of DeepMind's cell
# Wrist to pinch point: FT300 0.0415 + mounts 0.0108 + gripper 0.1489 [m] (sawyer_facts.md)
FT_SENSOR_LENGTH, MOUNT_LENGTH, GRIPPER_LENGTH = 0.0415, 0.0108, 0.1489
PINCH_OFFSET = FT_SENSOR_LENGTH + MOUNT_LENGTH + GRIPPER_LENGTH  # 0.2012 m along the tool z

# Basket and cubes (rgb_stacking scene, sawyer_facts.md)
BASKET_CENTER = np.array([0.6, 0.0, 0.05])  # [m]
BASKET_FLOOR_HALF = np.array([0.25, 0.25, 0.02])  # [m]
BASKET_WALL_HALF = np.array([0.20, 0.40, 0.005])  # [m] height, length, thickness
BASKET_WALL_OFFSET = 0.28  # [m] from the basket centre
BASKET_WALL_TILT = math.radians(25.5)  # outward
FLOOR_Z = BASKET_CENTER[2] + BASKET_FLOOR_HALF[2]  # [m] top of the basket floor, 0.07
CUBE_SIZE = 0.04  # [m] edge
CUBE_MASS = 0.05  # [kg]
CUBES = ("green", "yellow", "blue")
CUBE_RGBA = {"green": "0.1 0.75 0.2 1", "yellow": "0.95 0.8 0.1 1", "blue": "0.15 0.3 0.9 1"}
CUBE_X_RANGE, CUBE_Y_RANGE, CUBE_DROP_Z = (0.50, 0.70), (-0.10, 0.10), 0.12  # [m]
CUBE_MIN_SPACING = 0.06  # [m] between cube centres at placement (no overlap)
TOOL_X_RANGE, TOOL_Y_RANGE, TOOL_Z_RANGE = (0.5, 0.7), (-0.14, 0.14), (0.22, 0.43)  # [m]
TOOL_YAW_RANGE = (-math.pi / 4, math.pi / 4)  # [rad] our choice; the facts give none

# Tasks (Appendix C.3 in the paper's order, then the two new tasks of §5.2)
TASKS = ("reach", "grasp", "lift", "place_wide", "place_narrow", "stack", "stack_and_leave")
NEW_TASKS = ("center", "corner")
ALL_TASKS = TASKS + NEW_TASKS
CORNER_TARGET = np.array([0.70, 0.10, FLOOR_Z + CUBE_SIZE / 2])  # [m] (+x, +y) corner
CENTER_TARGET = np.array([BASKET_CENTER[0], BASKET_CENTER[1], FLOOR_Z + CUBE_SIZE / 2])
PLACE_NARROW_SUCCESS = 0.005  # [m] success radius for place_narrow, whose stol has eps = 0

# ----------------------------------------------------------------------------------------
# Observation index map (Appendix C.3 list). Positions [m], quaternions (w x y z), linear
# velocities [m/s] then angular [rad/s] in world axes, force [N], torque [Nm] in the sensor
# frame, joint torques [Nm]. Relative cube pose: position and orientation in the pinch frame.
# ----------------------------------------------------------------------------------------
_OBS_LAYOUT = [
    ("joint_pos", 7), ("joint_vel", 7), ("joint_torque", 7),
    ("wrist_pos", 3), ("wrist_quat", 4), ("wrist_vel", 6),
    ("wrist_force", 3), ("wrist_torque", 3),
    ("finger_angle", 1), ("finger_velocity", 1), ("grasp_flag", 1),
] + [(f"{cube}_{part}", size) for cube in CUBES
     for part, size in (("pos", 3), ("quat", 4), ("vel", 6), ("rel_pos", 3), ("rel_quat", 4))]


def _index_map(layout) -> dict:
    """[(name, size), ...] -> {name: slice} laid out back to back"""
    ends = np.cumsum([size for _, size in layout])
    return {name: slice(int(end - size), int(end)) for (name, size), end in zip(layout, ends)}


OBS_INDEX = _index_map(_OBS_LAYOUT)
OBS_DIM = OBS_INDEX[_OBS_LAYOUT[-1][0]].stop  # 103


# ----------------------------------------------------------------------------------------
# Named getters (work on [obs_dim] and [..., obs_dim])
# ----------------------------------------------------------------------------------------
def obs_field(observation: np.ndarray, name: str) -> np.ndarray:
    """the named part of an observation (a view), e.g. obs_field(obs, "joint_pos")"""
    return observation[..., OBS_INDEX[name]]


def cube_position(observation, cube="green"):
    """cube centre in the world frame [m]"""
    return obs_field(observation, f"{cube}_pos")


def cube_relative_position(observation, cube="green"):
    """cube centre in the pinch frame [m]"""
    return obs_field(observation, f"{cube}_rel_pos")


def cube_relative_quaternion(observation, cube="green"):
    """cube orientation in the pinch frame (w x y z)"""
    return obs_field(observation, f"{cube}_rel_quat")


def wrist_position(observation):
    """wrist (hand frame on link 6) in the world frame [m]"""
    return obs_field(observation, "wrist_pos")


def wrist_quaternion(observation):
    """wrist orientation (w x y z); its z axis is the tool axis"""
    return obs_field(observation, "wrist_quat")


def wrist_force(observation):
    """force at the gripper mount in the sensor frame [N], gripper weight cancelled"""
    return obs_field(observation, "wrist_force")


def finger_angle(observation):
    """gripper opening on the 0 (open, 85 mm) .. 255 (closed) scale"""
    return observation[..., OBS_INDEX["finger_angle"].start]


def finger_velocity(observation):
    """change of finger_angle over the last control step [units/step]"""
    return observation[..., OBS_INDEX["finger_velocity"].start]


def grasp_flag(observation):
    """1 no grasp, 2 inward grasp, 3 outward grasp"""
    return observation[..., OBS_INDEX["grasp_flag"].start]


def _norm(v):
    """Euclidean norm over the last axis (np.linalg.norm is slow on small vectors)"""
    return np.sqrt(np.sum(v * v, axis=-1))


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """[..., 4] (w x y z) -> [..., 3, 3]"""
    if q.ndim == 1:  # one quaternion: MuJoCo's routine is ~20x faster than the batched maths
        matrix = np.empty(9)
        mujoco.mju_quat2Mat(matrix, q.astype(np.float64) / _norm(q))
        return matrix.reshape(3, 3)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def tool_axis(observation):
    """tool z axis in world coordinates (third column of the wrist rotation)"""
    q = wrist_quaternion(observation).astype(np.float64)
    q = q / _norm(q)[..., None]
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)


def pinch_position(observation):
    """pinch point between the finger pads = wrist + PINCH_OFFSET along the tool z [m]"""
    return wrist_position(observation) + PINCH_OFFSET * tool_axis(observation)


def wrist_yaw(observation):
    """heading of the tool x axis in the horizontal plane [rad], 0 at the reference"""
    rotation = quat_to_matrix(wrist_quaternion(observation).astype(np.float64))
    return np.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])


def lift_height(observation):
    """height of the green cube's bottom face above the basket floor [m]"""
    return cube_position(observation, "green")[..., 2] - CUBE_SIZE / 2 - FLOOR_Z


# ----------------------------------------------------------------------------------------
# Tolerances and rewards (Appendix C.3)
# ----------------------------------------------------------------------------------------
_STOL_SCALE = math.atanh(math.sqrt(0.95))


def stol(v, eps: float, r: float) -> np.ndarray:
    """Eq. 13: 1 if |v| < eps, else 1 - tanh^2(atanh(sqrt(0.95)) / r * |v|); |v| from zero."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    return np.where(v < eps, 1.0, 1.0 - np.tanh(_STOL_SCALE / r * v) ** 2)


def btol(v, eps: float) -> np.ndarray:
    """Eq. 14: 1 if |v| < eps (strict), else 0."""
    return (np.abs(np.asarray(v, dtype=np.float64)) < eps).astype(np.float64)


def _hover_distance(green, yellow):
    """d(green, yellow + [0, 0, 0.05]) [m]"""
    return _norm(green - yellow - np.array([0.0, 0.0, 0.05]))


def compute_rewards(observation) -> np.ndarray:
    """[..., obs_dim] -> [..., 9] rewards in ALL_TASKS order, each in [0, 1] (Appendix C.3).
    d(a, b) is the Euclidean distance, d_z(a, b) = z_b - z_a; "end effector" = pinch point."""
    obs = np.asarray(observation, dtype=np.float64)
    green, yellow = cube_position(obs, "green"), cube_position(obs, "yellow")
    grasp = btol(grasp_flag(obs) - GRASP_INWARD, 0.5)  # 2. Grasp: the grasp sensor is active
    hover = _hover_distance(green, yellow)
    stack = (btol(_norm(green[..., :2] - yellow[..., :2]), 0.03)  # 6. Stack
             * btol(yellow[..., 2] - green[..., 2] + CUBE_SIZE, 0.01) * (1.0 - grasp))
    rewards = {
        # 1. Reach: stol(d(pinch, green), 0.02, 0.15)
        "reach": stol(_norm(cube_relative_position(obs, "green")), 0.02, 0.15),
        "grasp": grasp,
        # 3. Lift: 0 below 3 cm, 1 above 10 cm, linear in between
        "lift": np.clip((lift_height(obs) - 0.03) / (0.10 - 0.03), 0.0, 1.0),
        "place_wide": stol(hover, 0.01, 0.20),  # 4. stol(d(green, yellow + 5 cm z), 0.01, 0.20)
        "place_narrow": stol(hover, 0.0, 0.01),  # 5. the same with eps 0, margin 0.01
        "stack": stack,
        # 7. Stack and leave: stol(d_z(pinch, green) + 0.10, 0.03, 0.10) * Stack
        "stack_and_leave": stol(green[..., 2] - pinch_position(obs)[..., 2] + 0.10, 0.03, 0.10)
        * stack,
        # new tasks (§5.2): the green cube resting at the basket centre / the corner target
        "center": stol(_norm(green - CENTER_TARGET), 0.02, 0.15),
        "corner": stol(_norm(green - CORNER_TARGET), 0.02, 0.25),
    }
    return np.stack([rewards[task] for task in ALL_TASKS], axis=-1)


def task_reward(observation, task: str) -> np.ndarray:
    """[..., obs_dim] -> [...] reward of one task"""
    return compute_rewards(observation)[..., ALL_TASKS.index(task)]


# one pure function per task: REWARD_FUNCTIONS["stack"](observation) -> [...]
REWARD_FUNCTIONS = {task: functools.partial(task_reward, task=task) for task in ALL_TASKS}


def compute_success(observation, rewards=None) -> np.ndarray:
    """[..., obs_dim] -> [..., 9] bool: the reward is on its top plateau (reach within 2 cm,
    grasp flag, lift above 10 cm, place_wide within 1 cm, place_narrow within 5 mm, stacked and
    released, leave within 3 cm of 10 cm above, center/corner within 2 cm)"""
    green, yellow = cube_position(observation, "green"), cube_position(observation, "yellow")
    rewards = compute_rewards(observation) if rewards is None else rewards
    success = rewards >= 1.0
    narrow = ALL_TASKS.index("place_narrow")
    success[..., narrow] = _hover_distance(green, yellow) < PLACE_NARROW_SUCCESS
    return success


# ----------------------------------------------------------------------------------------
# MuJoCo model (MJCF built here; no assets)
# ----------------------------------------------------------------------------------------
# Arm chain: (body, pos in parent, quat w x y z, joint range [rad], mass [kg], capsule radius
# [m]). Kinematics, ranges and masses: Sawyer URDF sawyer_base.urdf.xacro (menagerie
# rethink_robotics_sawyer/sawyer.xml and robosuite agree); each link's collision capsule runs
# from its origin to its child's origin (radii as dm_robotics robot_arms/sawyer.py, 0.04-0.08).
_ARM_CHAIN = [
    ("l0", "0 0 0.08", "1 0 0 0", (-3.0503, 3.0503), 5.3213, 0.075),
    ("l1", "0.081 0.05 0.237", "0.5 -0.5 0.5 0.5", (-3.8095, 2.2736), 4.505, 0.07),
    ("l2", "0 -0.14 0.1425", "0.7071 0.7071 0 0", (-3.0426, 3.0426), 1.745, 0.06),
    ("l3", "0 -0.042 0.26", "0.7071 -0.7071 0 0", (-3.0439, 3.0439), 2.5097, 0.06),
    ("l4", "0 -0.125 -0.1265", "0.7071 0.7071 0 0", (-2.9761, 2.9761), 1.1136, 0.05),
    ("l5", "0 0.031 0.275", "0.7071 -0.7071 0 0", (-2.9761, 2.9761), 1.5625, 0.05),
    ("l6", "0 -0.11 0.1053", "0.0616248 0.06163 -0.704416 0.704416", (-4.7124, 4.7124),
     0.3292, 0.045),
]
_HAND_POS, _HAND_QUAT = "0 0 0.0245", "0.7071 0 0 0.7071"  # fixed on l6; the wrist frame
_FT300_MASS, _GRIPPER_MASS, _FINGER_MASS = 0.3, 0.8, 0.05  # [kg] 0.8 + 2 x 0.05 = 0.9 kg
PAD_HALF_HEIGHT = 0.0175  # [m] finger pads reach this far below the pinch point
PAD_HALF_THICKNESS = 0.004  # [m] pads' inner faces meet at the pinch point when closed


def _wall_quat(side: str) -> str:
    """orientation of a wall plate (local x = up the wall, local z = its normal) whose top
    leans BASKET_WALL_TILT outward on the given side of the basket"""
    yaw = {"+x": 0.0, "-x": math.pi, "+y": math.pi / 2, "-y": -math.pi / 2}[side]
    # normal (local z) to world +x tipped down by the tilt, so the plate's top leans outward;
    # then turn the plate to its side
    pitch = math.pi / 2 + BASKET_WALL_TILT
    qy = np.array([math.cos(pitch / 2), 0, math.sin(pitch / 2), 0])
    qz = np.array([math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)])
    q = np.empty(4)
    mujoco.mju_mulQuat(q, qz, qy)
    return " ".join(f"{x:.6f}" for x in q)


def _arm_xml() -> tuple:
    """nested arm bodies: (opening tags with the link geoms, matching closing tags)"""
    xml, closing = "", ""
    children = [c[1] for c in _ARM_CHAIN[1:]] + [_HAND_POS]
    for (name, pos, quat, (lo, hi), mass, radius), child in zip(_ARM_CHAIN, children):
        joint = f"right_j{name[1]}"
        xml += (f'<body name="{name}" pos="{pos}" quat="{quat}" gravcomp="1">'
                f'<joint name="{joint}" range="{lo} {hi}"/>'
                f'<geom class="robot" type="capsule" size="{radius}" fromto="0 0 0 {child}" '
                f'mass="{mass}"/>')
        closing += "</body>"
    return xml, closing


def _finger_xml(side: str) -> str:
    """a slide finger: a link and a pad centred on the pinch point, inner face at the stroke"""
    sign = 1 if side == "left" else -1
    pad_y = sign * (FINGER_STROKE + PAD_HALF_THICKNESS)
    return f"""
        <body name="{side}_finger">
          <joint name="{side}_finger" type="slide" axis="0 {-sign} 0" range="0 {FINGER_STROKE}"
                 damping="2" armature="0.05"/>
          <geom class="robot" type="box" size="0.011 0.004 0.03" pos="0 {sign * 0.0505} 0.112"
                mass="{0.4 * _FINGER_MASS}" rgba="0.2 0.2 0.2 1"/>
          <geom name="{side}_pad" class="pad" type="box"
                size="0.011 {PAD_HALF_THICKNESS} {PAD_HALF_HEIGHT}"
                pos="0 {pad_y} {GRIPPER_LENGTH}" mass="{0.6 * _FINGER_MASS}"/>
        </body>"""


def build_mjcf() -> str:
    """The whole scene as an MJCF string."""
    arm_open, arm_close = _arm_xml()
    walls = ""
    for side, (dx, dy) in {"+x": (1, 0), "-x": (-1, 0), "+y": (0, 1), "-y": (0, -1)}.items():
        walls += (f'<geom class="env" type="box" size="{BASKET_WALL_HALF[0]} '
                  f'{BASKET_WALL_HALF[1]} {BASKET_WALL_HALF[2]}" '
                  f'pos="{dx * BASKET_WALL_OFFSET} {dy * BASKET_WALL_OFFSET} 0" '
                  f'quat="{_wall_quat(side)}" rgba="0.55 0.55 0.6 0.5"/>')
    cubes = ""
    half = CUBE_SIZE / 2
    for cube in CUBES:
        cubes += (f'<body name="{cube}" pos="0.6 0 {CUBE_DROP_Z}"><freejoint name="{cube}"/>'
                  f'<geom name="{cube}" type="box" size="{half} {half} {half}" mass="{CUBE_MASS}"'
                  f' rgba="{CUBE_RGBA[cube]}" friction="1 0.005 0.0001"/></body>')
    actuators = "".join(
        f'<general name="{j}" joint="{j}" dyntype="integrator" biastype="affine" '
        f'gainprm="{ACTUATOR_GAIN}" biasprm="0 {-ACTUATOR_GAIN} {-ACTUATOR_DAMPING}" '
        f'actlimited="true" actrange="{lo} {hi}" forcelimited="true" '
        f'forcerange="{-e} {e}"/>'
        for j, (_, _, _, (lo, hi), _, _), e in zip(JOINT_NAMES, _ARM_CHAIN, JOINT_EFFORT_LIMITS))
    return f"""
<mujoco model="sawyer_basket">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{PHYSICS_TIMESTEP}" integrator="implicitfast" cone="elliptic"/>
  <visual><global offwidth="640" offheight="480"/></visual>
  <default>
    <joint damping="1" armature="0.1"/>
    <!-- collision groups: env/cubes collide with everything, robot geoms not with themselves -->
    <default class="robot"><geom contype="2" conaffinity="1" rgba="0.7 0.1 0.1 1"/></default>
    <default class="pad"><geom contype="2" conaffinity="1" friction="1.5 0.005 0.0001"
                               rgba="0.1 0.1 0.1 1"/></default>
    <default class="env"><geom contype="1" conaffinity="1"/></default>
  </default>
  <worldbody>
    <light pos="0.6 0 1.5" dir="0 0 -1" directional="true"/>
    <camera name="front" pos="1.7 0.5 0.9" mode="targetbody" target="basket"/>
    <geom class="env" name="table" type="box" size="0.45 0.6 0.015" pos="0.55 0 0.015"
          rgba="0.45 0.35 0.25 1"/>
    <body name="basket" pos="{BASKET_CENTER[0]} {BASKET_CENTER[1]} {BASKET_CENTER[2]}">
      <geom class="env" name="basket_floor" type="box"
            size="{BASKET_FLOOR_HALF[0]} {BASKET_FLOOR_HALF[1]} {BASKET_FLOOR_HALF[2]}"
            rgba="0.6 0.6 0.65 1"/>
      {walls}
    </body>
    <body name="base">
      <geom class="robot" type="cylinder" size="0.09 0.04" pos="0 0 0.04" mass="2.0687"/>
      {arm_open}
        <body name="hand" pos="{_HAND_POS}" quat="{_HAND_QUAT}" gravcomp="1">
          <site name="wrist"/>
          <geom class="robot" type="cylinder" size="0.0375 {FT_SENSOR_LENGTH / 2}"
                pos="0 0 {FT_SENSOR_LENGTH / 2}" mass="{_FT300_MASS}" rgba="0.3 0.3 0.3 1"/>
          <site name="pinch" pos="0 0 {PINCH_OFFSET}" size="0.005" rgba="1 0 0 0.5"/>
          <body name="gripper" pos="0 0 {FT_SENSOR_LENGTH + MOUNT_LENGTH}">
            <site name="ft_sensor"/>
            <geom class="robot" type="box" size="0.03 0.058 0.045" pos="0 0 0.045"
                  mass="{_GRIPPER_MASS}" rgba="0.2 0.2 0.2 1"/>
            {_finger_xml("left")}
            {_finger_xml("right")}
          </body>
        </body>
      {arm_close}
    </body>
    {cubes}
  </worldbody>
  <equality>
    <joint joint1="right_finger" joint2="left_finger" polycoef="0 1 0 0 0"/>
  </equality>
  <actuator>
    {actuators}
    <position name="fingers" joint="left_finger" kp="{GRIPPER_STIFFNESS}" kv="60"
              ctrlrange="0 {FINGER_STROKE}" forcelimited="true"
              forcerange="{-GRIPPER_FORCE_LIMIT} {GRIPPER_FORCE_LIMIT}"/>
  </actuator>
  <sensor>
    <force name="wrist_force" site="ft_sensor"/>
    <torque name="wrist_torque" site="ft_sensor"/>
  </sensor>
</mujoco>"""


# Tool-down reference orientation: tool z = world -z, tool x = world x (yaw 0)
_TOOL_DOWN = np.diag([1.0, -1.0, -1.0])


def _yaw_rotation(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------
class SawyerEnv(gym.Env):
    """Sawyer + gripper + basket + three cubes; one of ALL_TASKS, or "random" (§5.2 protocol).

    task="random": at each reset a task is drawn uniformly from TASKS (the seven executed
    tasks), the robot pose is re-randomised on the first episode, every ROBOT_RESET_PERIOD
    episodes and after a termination, and otherwise starts where the last episode ended; the
    cubes are dropped afresh every episode. Seed only the first reset: a seeded reset starts
    the protocol again. `reset(options={"task": name})` forces a task,
    `options={"randomize_robot": bool}` forces or skips the robot re-randomisation.
    step() returns the task's reward and info with "rewards" ([9], ALL_TASKS order),
    "successes" ([9] bool), "success", "task", "task_index" and "wrist_force" ([3] N).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": round(1 / CONTROL_TIMESTEP)}

    def __init__(self, task: str = "stack", render_mode=None):
        if task not in ALL_TASKS + ("random",):
            raise ValueError(f"unknown task {task!r}; choose one of {ALL_TASKS} or 'random'")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', not {render_mode!r}")
        self.task_mode, self.render_mode = task, render_mode
        self.task = TASKS[0] if task == "random" else task
        self.model = mujoco.MjModel.from_xml_string(build_mjcf())
        self.data = mujoco.MjData(self.model)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self._renderer = None
        m = self.model
        name2id = lambda kind, name: mujoco.mj_name2id(m, kind, name)  # noqa: E731
        joint_ids = [name2id(mujoco.mjtObj.mjOBJ_JOINT, j) for j in JOINT_NAMES]
        self._arm_qpos = np.array([m.jnt_qposadr[j] for j in joint_ids])
        self._arm_dof = np.array([m.jnt_dofadr[j] for j in joint_ids])
        self._arm_act = np.arange(7)  # first seven actuators, one activation each
        self._finger_qpos = [m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"{s}_finger")]
                             for s in ("left", "right")]
        self._joint_low, self._joint_high = m.jnt_range[joint_ids].T
        self._pinch = name2id(mujoco.mjtObj.mjOBJ_SITE, "pinch")
        self._hand = name2id(mujoco.mjtObj.mjOBJ_BODY, "hand")
        self._cube_body = [name2id(mujoco.mjtObj.mjOBJ_BODY, c) for c in CUBES]
        self._cube_qpos = [m.jnt_qposadr[m.body_jntadr[b]] for b in self._cube_body]
        self._pads = [name2id(mujoco.mjtObj.mjOBJ_GEOM, f"{s}_pad") for s in ("left", "right")]
        gripper_bodies = [name2id(mujoco.mjtObj.mjOBJ_BODY, b)
                          for b in ("gripper", "left_finger", "right_finger")]
        self._is_gripper_geom = np.isin(m.geom_bodyid, gripper_bodies)  # [ngeom] bool
        # gravity on the gripper cancelled by an external force, so the wrist sensor reads 0 N
        # at rest (sawyer_facts.md "Wrist force"; the arm itself uses gravcomp)
        self._gravity_cancel = [(b, -m.body_mass[b] * m.opt.gravity) for b in gripper_bodies]
        force_adr = m.sensor_adr[name2id(mujoco.mjtObj.mjOBJ_SENSOR, "wrist_force")]
        torque_adr = m.sensor_adr[name2id(mujoco.mjtObj.mjOBJ_SENSOR, "wrist_torque")]
        self._force_slice = slice(force_adr, force_adr + 3)
        self._torque_slice = slice(torque_adr, torque_adr + 3)
        self._jacp, self._jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        self._velocity = np.zeros(6)
        self._linear_first = np.array([3, 4, 5, 0, 1, 2])  # MuJoCo's [angular, linear] reordered
        self._episodes_since_robot_reset = None  # None: robot pose not set yet
        self._last_terminated = False
        self._gripper_target = 0.0  # [units]
        self._previous_angle = 0.0
        self._steps = 0

    # --- reset ----------------------------------------------------------------------------
    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        options = options or {}
        if seed is not None:
            self._episodes_since_robot_reset = None
        if options.get("task") is not None:
            if options["task"] not in ALL_TASKS:
                raise ValueError(f"unknown task {options['task']!r}; choose one of {ALL_TASKS}")
            self.task = options["task"]
        elif self.task_mode == "random":
            self.task = TASKS[int(self.np_random.integers(len(TASKS)))]
        randomize = (self.task_mode != "random" or self._episodes_since_robot_reset is None
                     or self._episodes_since_robot_reset >= ROBOT_RESET_PERIOD
                     or self._last_terminated)
        randomize = bool(options.get("randomize_robot", randomize))
        m, d = self.model, self.data
        if randomize or self._episodes_since_robot_reset is None:
            mujoco.mj_resetData(m, d)  # the same starting data for the inverse kinematics
            arm_q, angle = self._random_arm_pose(), 0.0
            self._episodes_since_robot_reset = 0
        else:
            arm_q, angle = d.qpos[self._arm_qpos].copy(), self._finger_angle()
        self._episodes_since_robot_reset += 1
        mujoco.mj_resetData(m, d)
        d.qpos[self._arm_qpos] = arm_q
        d.act[self._arm_act] = arm_q
        d.qpos[self._finger_qpos] = angle / GRIPPER_UNITS * FINGER_STROKE
        self._gripper_target = angle
        d.ctrl[-1] = angle / GRIPPER_UNITS * FINGER_STROKE
        for body, force in self._gravity_cancel:
            d.xfrc_applied[body, :3] = force
        mujoco.mj_kinematics(m, d)
        self._place_cubes(d.site_xpos[self._pinch].copy())
        mujoco.mj_step(m, d, nstep=round(SETTLE_TIME / PHYSICS_TIMESTEP))
        mujoco.mj_forward(m, d)
        self._previous_angle = self._finger_angle()
        self._steps, self._last_terminated = 0, False
        observation = self._observation()
        return observation, {"task": self.task, "task_index": ALL_TASKS.index(self.task)}

    def _random_arm_pose(self) -> np.ndarray:
        """inverse kinematics (damped least squares from the posture reference) for a tool
        pose drawn uniformly from the start box of sawyer_facts.md"""
        for _ in range(20):
            rng = self.np_random
            target = np.array([rng.uniform(*TOOL_X_RANGE), rng.uniform(*TOOL_Y_RANGE),
                               rng.uniform(*TOOL_Z_RANGE)])
            rotation = _yaw_rotation(rng.uniform(*TOOL_YAW_RANGE)) @ _TOOL_DOWN
            q, error = self._inverse_kinematics(target, rotation)
            if error < 1e-3:
                return q
        raise RuntimeError("inverse kinematics failed for 20 start poses")  # invariant

    def _inverse_kinematics(self, target_pos, target_rot, iterations=200):
        m, d = self.model, self.data
        q = POSTURE_REFERENCE.copy()
        error = np.inf
        for _ in range(iterations):
            d.qpos[self._arm_qpos] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            pos, rot = d.site_xpos[self._pinch], d.site_xmat[self._pinch].reshape(3, 3)
            rot_error = 0.5 * sum(np.cross(rot[:, i], target_rot[:, i]) for i in range(3))
            twist = np.concatenate([target_pos - pos, rot_error])
            error = np.linalg.norm(twist)
            if error < 1e-5:
                break
            jac = self._jacobian()
            step = jac.T @ np.linalg.solve(jac @ jac.T + 1e-3 * np.eye(6), twist)
            step += (np.eye(7) - np.linalg.pinv(jac) @ jac) @ (0.1 * (POSTURE_REFERENCE - q))
            q = np.clip(q + step, self._joint_low, self._joint_high)
        return q, error

    def _place_cubes(self, pinch):
        """uniform in the facts' box, centres >= CUBE_MIN_SPACING apart and clear of a low hand"""
        rng, placed = self.np_random, []
        hand_low = pinch[2] < CUBE_DROP_Z + 0.08  # the fingers could reach a dropped cube
        while len(placed) < len(CUBES):
            xy = np.array([rng.uniform(*CUBE_X_RANGE), rng.uniform(*CUBE_Y_RANGE)])
            if any(np.linalg.norm(xy - other) < CUBE_MIN_SPACING for other in placed):
                continue
            if hand_low and np.linalg.norm(xy - pinch[:2]) < 0.1:
                continue
            placed.append(xy)
        for adr, xy in zip(self._cube_qpos, placed):
            yaw = rng.uniform(-math.pi, math.pi)
            self.data.qpos[adr:adr + 7] = [xy[0], xy[1], CUBE_DROP_Z,
                                           math.cos(yaw / 2), 0, 0, math.sin(yaw / 2)]

    # --- step -----------------------------------------------------------------------------
    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACT_DIM,):
            raise ValueError(f"action must have shape ({ACT_DIM},) = [vx, vy, vz, wrist rate, "
                             f"finger rate], got shape {action.shape}")
        action = np.clip(action, ACTION_LOW, ACTION_HIGH)
        d = self.data
        d.ctrl[self._arm_act] = self._joint_velocity_command(action[:3], action[3])
        angle = self._finger_angle()
        self._gripper_target = float(np.clip(self._gripper_target + action[4] * CONTROL_TIMESTEP,
                                             max(0.0, angle - GRIPPER_WINDUP),
                                             min(GRIPPER_UNITS, angle + GRIPPER_WINDUP)))
        d.ctrl[-1] = self._gripper_target / GRIPPER_UNITS * FINGER_STROKE
        mujoco.mj_step(self.model, d, nstep=N_SUBSTEPS)
        mujoco.mj_forward(self.model, d)
        observation = self._observation()
        self._previous_angle = finger_angle(observation)
        self._steps += 1
        rewards = compute_rewards(observation)
        success = compute_success(observation, rewards)
        task_index = ALL_TASKS.index(self.task)
        force = wrist_force(observation).copy()
        terminated = bool(np.any(np.abs(force) > MAX_WRIST_FORCE))
        truncated = self._steps >= EPISODE_STEPS
        self._last_terminated = terminated
        info = {"task": self.task, "task_index": task_index, "rewards": rewards,
                "success": bool(success[task_index]), "successes": success, "wrist_force": force}
        return observation, float(rewards[task_index]), terminated, truncated, info

    def _joint_velocity_command(self, linear_velocity, wrist_rate) -> np.ndarray:
        """Cartesian twist of the pinch point -> joint velocities [rad/s]: damped least squares
        on the site Jacobian + null-space posture term (sawyer_facts.md controller)."""
        d = self.data
        pinch = d.site_xpos[self._pinch]
        rotation = d.site_xmat[self._pinch].reshape(3, 3)
        # workspace box and wrist limit: the speed toward a bound shrinks as (distance /
        # LIMIT_APPROACH_TIME), so the servo lag does not carry past it; when already outside,
        # no motion further out
        low = np.minimum((WORKSPACE_CENTER - WORKSPACE_HALF - pinch) / LIMIT_APPROACH_TIME, 0.0)
        high = np.maximum((WORKSPACE_CENTER + WORKSPACE_HALF - pinch) / LIMIT_APPROACH_TIME, 0.0)
        linear_velocity = np.clip(linear_velocity, low, high)
        yaw = math.atan2(rotation[1, 0], rotation[0, 0])
        wrist_rate = min(max(wrist_rate, min((-WRIST_YAW_LIMIT - yaw) / LIMIT_APPROACH_TIME, 0.0)),
                         max((WRIST_YAW_LIMIT - yaw) / LIMIT_APPROACH_TIME, 0.0))
        # tool z held pointing down: angular velocity rotating tool z toward world -z
        tool_z = rotation[:, 2]  # tool_z x (0, 0, -1) = (-tool_z[1], tool_z[0], 0)
        angular_velocity = np.array([-ORIENTATION_GAIN * tool_z[1], ORIENTATION_GAIN * tool_z[0],
                                     wrist_rate])
        twist = np.concatenate([linear_velocity, angular_velocity])
        jac = self._jacobian()  # [6, 7]
        jac_jac_t = jac @ jac.T
        qd = jac.T @ np.linalg.solve(jac_jac_t + DLS_DAMPING * np.eye(6), twist)
        # null-space projector with the true pseudo-inverse J^T (J J^T)^-1 (J has full row
        # rank inside the workspace; np.linalg.pinv only if it does not)
        posture = POSTURE_GAIN * (POSTURE_REFERENCE - d.qpos[self._arm_qpos])
        try:
            qd += posture - jac.T @ np.linalg.solve(jac_jac_t, jac @ posture)
        except np.linalg.LinAlgError:
            qd += posture - np.linalg.pinv(jac) @ (jac @ posture)
        return qd / max(1.0, np.max(np.abs(qd) / JOINT_VELOCITY_LIMITS))

    def _jacobian(self) -> np.ndarray:
        mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self._pinch)
        return np.concatenate([self._jacp[:, self._arm_dof], self._jacr[:, self._arm_dof]])

    # --- observation ----------------------------------------------------------------------
    def _finger_angle(self) -> float:
        return float(self.data.qpos[self._finger_qpos[0]] / FINGER_STROKE * GRIPPER_UNITS)

    def _grasp_flag(self, angle: float) -> float:
        """2 (inward) / 3 (outward) when both pads touch something other than the gripper
        and the position target is >= 2 units beyond the fingers; 1 otherwise"""
        d = self.data
        command = self._gripper_target - angle
        if d.ncon == 0 or abs(command) < 2.0:
            return GRASP_NONE
        first, second = d.contact.geom1[:d.ncon], d.contact.geom2[:d.ncon]
        outside_first = ~self._is_gripper_geom[first]
        outside_second = ~self._is_gripper_geom[second]
        for pad in self._pads:
            if not np.any(((first == pad) & outside_second) | ((second == pad) & outside_first)):
                return GRASP_NONE
        return GRASP_INWARD if command > 0 else GRASP_OUTWARD

    def _observation(self) -> np.ndarray:
        m, d, index = self.model, self.data, OBS_INDEX
        obs = np.empty(OBS_DIM, np.float64)
        obs[index["joint_pos"]] = d.qpos[self._arm_qpos]
        obs[index["joint_vel"]] = d.qvel[self._arm_dof]
        # motor torque a real arm reports: servo torque + the gravity compensation it carries
        obs[index["joint_torque"]] = d.qfrc_actuator[self._arm_dof] + d.qfrc_gravcomp[self._arm_dof]
        hand_quat = d.xquat[self._hand]
        obs[index["wrist_pos"]] = d.xpos[self._hand]
        obs[index["wrist_quat"]] = hand_quat
        velocity = self._velocity  # [angular, linear] in world axes at the body
        mujoco.mj_objectVelocity(m, d, mujoco.mjtObj.mjOBJ_BODY, self._hand, velocity, 0)
        obs[index["wrist_vel"]] = velocity[self._linear_first]
        obs[index["wrist_force"]] = d.sensordata[self._force_slice]
        obs[index["wrist_torque"]] = d.sensordata[self._torque_slice]
        angle = self._finger_angle()
        obs[index["finger_angle"]] = angle
        obs[index["finger_velocity"]] = angle - self._previous_angle  # [units per control step]
        obs[index["grasp_flag"]] = self._grasp_flag(angle)
        pinch = d.site_xpos[self._pinch]
        hand_rotation = d.xmat[self._hand].reshape(3, 3)
        hand_conjugate, relative_quat = np.empty(4), np.empty(4)
        mujoco.mju_negQuat(hand_conjugate, hand_quat)
        for cube, body in zip(CUBES, self._cube_body):
            position, quat = d.xpos[body], d.xquat[body]
            obs[index[f"{cube}_pos"]] = position
            obs[index[f"{cube}_quat"]] = quat
            mujoco.mj_objectVelocity(m, d, mujoco.mjtObj.mjOBJ_BODY, body, velocity, 0)
            obs[index[f"{cube}_vel"]] = velocity[self._linear_first]
            obs[index[f"{cube}_rel_pos"]] = (position - pinch) @ hand_rotation  # R^T (p - pinch)
            mujoco.mju_mulQuat(relative_quat, hand_conjugate, quat)
            obs[index[f"{cube}_rel_quat"]] = relative_quat
        return obs.astype(np.float32)

    # --- rendering ------------------------------------------------------------------------
    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, 480, 640)
        self._renderer.update_scene(self.data, camera="front")
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def learner_env(task: str = "random", render_mode=None) -> gym.Env:
    """SawyerEnv(task) taking actions in [-1, 1], as the learning scripts do (the action dimensions differ
    in scale by 3600x); `.unwrapped` takes physical actions, normalise_actions maps those onto [-1, 1]."""
    return gym.wrappers.RescaleAction(SawyerEnv(task, render_mode), np.float32(-1), np.float32(1))


def normalise_actions(action: np.ndarray) -> np.ndarray:
    """Physical actions in [ACTION_LOW, ACTION_HIGH] -> [-1, 1], the inverse of learner_env's RescaleAction."""
    action = np.asarray(action, dtype=np.float64)
    return (2.0 * (action - ACTION_LOW) / (ACTION_HIGH - ACTION_LOW) - 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Scripted behaviour policies (for data collection). Stateless: every decision is a function
# of the observation alone (the finger velocity tells whether the gripper was opening), so
# a policy recovers by itself from a dropped cube or a failed grasp.
# ----------------------------------------------------------------------------------------
POLICY_POSITION_GAIN = 5.0  # [1/s] Cartesian P gain toward the current target
POLICY_YAW_GAIN = 4.0  # [1/s] wrist alignment with the green cube's faces
HOVER_HEIGHT = 0.06  # [m] pinch above the green cube before descending
CARRY_CLEARANCE = 0.08  # [m] green cube centre above the yellow cube's while carrying
LIFT_TARGET = 0.12  # [m] lift_height the lift policy aims for (reward 1 above 0.10)
LEAVE_HEIGHT = {"stack": 0.04, "stack_and_leave": 0.10, "center": 0.06, "corner": 0.06}  # [m]
OPEN_ANGLE, RELEASED_ANGLE, FAILED_GRASP_ANGLE = 15.0, 100.0, 230.0  # [gripper units]
ALIGN_XY, ALIGN_YAW, AT_GRASP_Z = 0.012, 0.15, 0.015  # [m], [rad], [m] close the gripper
DESCEND_XY = 0.015  # [m] the open gripper descends onto the cube when this close horizontally
SIDEWAYS_CLEARANCE = 0.04  # [m] pinch above the cube centre before moving sideways (> 3 cm)
PLACE_XY = 0.01  # [m] a carried cube is lowered onto its target when this close horizontally
PLACED_XY, PLACED_Z = 0.015, 0.01  # [m] the cube counts as placed: release, then leave
PLACE_GAP = 0.002  # [m] placing targets sit this far above the surface below
CARRY_MIN_Z = FLOOR_Z + 1.5 * CUBE_SIZE + 0.01  # [m] carried cube clears a resting one by 1 cm
FINGER_CLEARANCE_POINT = 0.05  # [m] open finger pads from the pinch point
FINGER_CLEARANCE = 0.05  # [m] wanted between an open finger and another cube's centre
GENTLE_FORCE = 10.0  # [N] wrist force at which the scripted policy backs off upward
DEFAULT_NOISE = 0.3  # std of the Gaussian action noise as a fraction of the action limits


def _cube_yaw_in_gripper(observation, cube="green"):
    """yaw of the cube's faces about the tool axis [rad], wrapped to [-pi/4, pi/4)"""
    axes = quat_to_matrix(cube_relative_quaternion(observation, cube).astype(np.float64))
    horizontal = axes[:, np.argmin(np.abs(axes[2]))]  # the cube axis most across the tool axis
    yaw = math.atan2(horizontal[1], horizontal[0])
    return (yaw + math.pi / 4) % (math.pi / 2) - math.pi / 4


def _alignment_turn(observation, cube="green"):
    """wrist turn [rad] that squares the fingers to the cube's faces: of the turns 90 deg apart
    that stay inside the wrist yaw limit, the smallest whose fingers clear the other cubes.
    Turning the hand by +a about world z (tool pointing down) raises the cube's yaw in the
    gripper by +a, hence the minus sign."""
    heading = float(wrist_yaw(observation))
    base = -_cube_yaw_in_gripper(observation, cube)
    target = cube_position(observation, cube)[:2].astype(np.float64)
    others = [cube_position(observation, c)[:2] for c in CUBES if c != cube]
    closing = quat_to_matrix(wrist_quaternion(observation).astype(np.float64))[:2, 1]
    best, best_clearance = None, -1.0
    for turn in sorted((base + k * math.pi / 2 for k in (-1, 0, 1, 2)), key=abs):
        if abs(heading + turn) > WRIST_YAW_LIMIT - 0.2:
            continue
        c, s = math.cos(turn), math.sin(turn)
        direction = np.array([c * closing[0] - s * closing[1], s * closing[0] + c * closing[1]])
        fingers = [target + side * FINGER_CLEARANCE_POINT * direction for side in (-1, 1)]
        clearance = min(math.dist(f, o) for f in fingers for o in others)
        if clearance >= FINGER_CLEARANCE:
            return turn
        if clearance > best_clearance:
            best, best_clearance = turn, clearance
    return best if best is not None else base


def _holding_green(observation) -> bool:
    near = np.all(np.abs(cube_relative_position(observation, "green")) < [0.02, 0.03, 0.02])
    return bool(grasp_flag(observation) == GRASP_INWARD and near)


def _green_target(task, observation):
    """where the held green cube should go, and whether to release it there"""
    green, yellow = cube_position(observation, "green"), cube_position(observation, "yellow")
    if task == "lift":
        return np.array([green[0], green[1], FLOOR_Z + CUBE_SIZE / 2 + LIFT_TARGET]), False
    if task in ("place_wide", "place_narrow"):
        return yellow + [0.0, 0.0, 0.05], False
    if task in ("stack", "stack_and_leave"):
        return yellow + [0.0, 0.0, CUBE_SIZE + PLACE_GAP], True
    if task in ("center", "corner"):
        target = (CENTER_TARGET if task == "center" else CORNER_TARGET) + [0.0, 0.0, PLACE_GAP]
        for other in ("yellow", "blue"):  # a cube in the way: put green on top of it
            below = cube_position(observation, other)
            if np.linalg.norm(below[:2] - target[:2]) < CUBE_SIZE:
                target[2] = max(target[2], below[2] + CUBE_SIZE + PLACE_GAP)
        return target, True
    return green.astype(np.float64), False  # grasp: hold it where it is


def _velocity_toward(current, target):
    return np.clip(POLICY_POSITION_GAIN * (np.asarray(target) - current), -MAX_LINEAR_SPEED,
                   MAX_LINEAR_SPEED)


def _clean_action(task, observation) -> np.ndarray:
    """the noiseless scripted action: a priority list of situations read off the observation"""
    pinch = pinch_position(observation.astype(np.float64))
    green = cube_position(observation, "green").astype(np.float64)
    angle, finger_rate = float(finger_angle(observation)), float(finger_velocity(observation))
    velocity, wrist_rate, fingers = np.zeros(3), 0.0, 0.0
    target, release = _green_target(task, observation)
    placed = (release and np.linalg.norm(green[:2] - target[:2]) < PLACED_XY
              and abs(green[2] - target[2]) < PLACED_Z)
    if task != "reach" and _holding_green(observation):
        fingers = MAX_FINGER_RATE
        if placed:  # at the target: open the gripper without moving
            fingers = -MAX_FINGER_RATE
        elif np.linalg.norm(target[:2] - green[:2]) > PLACE_XY:  # carry at a safe height first
            carry = max(target[2], cube_position(observation, "yellow")[2] + CARRY_CLEARANCE)
            move = _velocity_toward(green, [target[0], target[1], carry])
            if green[2] < CARRY_MIN_Z:  # rise above the other cubes first
                move[:2] = 0.0
            velocity = move
        else:
            velocity = _velocity_toward(green, target)
    elif placed:  # released at the target: leave upward once the fingers are clear
        fingers = -MAX_FINGER_RATE
        if angle < RELEASED_ANGLE:
            velocity = _velocity_toward(pinch, [pinch[0], pinch[1], green[2] + LEAVE_HEIGHT[task]])
    else:  # approach the green cube, square to its faces, and grasp it
        xy_error = np.linalg.norm(green[:2] - pinch[:2])
        at_grasp = xy_error < ALIGN_XY and pinch[2] < green[2] + AT_GRASP_Z
        turn = _alignment_turn(observation)
        aligned = abs(turn) < ALIGN_YAW
        wrist_rate = POLICY_YAW_GAIN * turn
        hover = green + [0.0, 0.0, HOVER_HEIGHT]
        if task == "reach":
            fingers = -MAX_FINGER_RATE
            descend = xy_error < DESCEND_XY and aligned
            velocity = _velocity_toward(pinch, green if descend else hover)
        elif at_grasp and angle < FAILED_GRASP_ANGLE and finger_rate >= 0:
            fingers = MAX_FINGER_RATE  # close while centring on the cube
            velocity = _velocity_toward(pinch, green)
        elif at_grasp:  # closed on nothing (or reopening after that): open and back off
            fingers, velocity[2] = -MAX_FINGER_RATE, MAX_LINEAR_SPEED
        elif angle > OPEN_ANGLE:  # open before descending
            fingers = -MAX_FINGER_RATE
            velocity = _velocity_toward(pinch, [pinch[0], pinch[1], max(pinch[2], hover[2])])
        elif xy_error < DESCEND_XY and aligned:
            velocity = _velocity_toward(pinch, green)
        else:
            velocity = _velocity_toward(pinch, hover)
            if pinch[2] < green[2] + SIDEWAYS_CLEARANCE and xy_error > 2 * DESCEND_XY:
                # rise before moving sideways
                velocity[:2] = 0.0
    if np.max(np.abs(wrist_force(observation))) > GENTLE_FORCE:  # pressing on something
        velocity[2] = MAX_LINEAR_SPEED
    return np.concatenate([velocity, [np.clip(wrist_rate, -MAX_WRIST_RATE, MAX_WRIST_RATE),
                                      fingers]])


def scripted_policy(task: str, observation: np.ndarray, rng: np.random.Generator,
                    noise: float = 0.0) -> np.ndarray:
    """Scripted behaviour for one of ALL_TASKS from the observation alone: reach the green
    cube; grasp it; lift it; carry it over yellow (place_*), onto yellow then release (stack;
    and leave upward for stack_and_leave), or to the basket centre/corner. Gaussian noise of
    std `noise` x action limit is added, then the action is clipped. Returns [5] float32."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {ALL_TASKS}")
    action = _clean_action(task, np.asarray(observation))
    if noise > 0:
        action = action + noise * ACTION_HIGH * rng.standard_normal(ACT_DIM)
    return np.clip(action, ACTION_LOW, ACTION_HIGH).astype(np.float32)


def collect_episode(env: SawyerEnv, task, rng: np.random.Generator, noise: float = 0.0,
                    seed=None) -> dict:
    """One episode of the scripted policy. task=None lets the env choose (task="random").
    Returns arrays over the T <= EPISODE_STEPS steps: observation [T, obs_dim] (before the
    action), action [T, act_dim], reward [T, 9] (ALL_TASKS order, of the next observation),
    next_observation [T, obs_dim], discount [T] (0 after a termination), success [T, 9],
    plus task (str), task_index (int, in ALL_TASKS), terminated (bool)."""
    observation, info = env.reset(seed=seed, options={"task": task} if task else None)
    task = info["task"]
    steps = {k: [] for k in ("observation", "action", "reward", "next_observation", "discount",
                             "success")}
    terminated = truncated = False
    while not (terminated or truncated):
        action = scripted_policy(task, observation, rng, noise)
        next_observation, _, terminated, truncated, info = env.step(action)
        for key, value in (("observation", observation), ("action", action),
                           ("reward", info["rewards"]), ("next_observation", next_observation),
                           ("discount", 0.0 if terminated else 1.0),
                           ("success", info["successes"])):
            steps[key].append(value)
        observation = next_observation
    episode = {k: np.asarray(v, dtype=bool if k == "success" else np.float32)
               for k, v in steps.items()}
    episode.update(task=task, task_index=ALL_TASKS.index(task), terminated=bool(terminated))
    return episode


def env_spec() -> dict:
    """JSON-serialisable description of the observation, action and tasks, for dataset
    metadata and checkpoints (everything a policy needs to act on this env)"""
    return {
        "env": "sawyer", "obs_dim": OBS_DIM, "act_dim": ACT_DIM,
        "observation_index": {name: [part.start, part.stop] for name, part in OBS_INDEX.items()},
        "action_names": ["vx", "vy", "vz", "wrist_rate", "finger_rate"],
        "action_low": ACTION_LOW.tolist(), "action_high": ACTION_HIGH.tolist(),
        "tasks": list(ALL_TASKS), "executed_tasks": list(TASKS),
        "control_timestep": CONTROL_TIMESTEP, "episode_steps": EPISODE_STEPS,
        "robot_reset_period": ROBOT_RESET_PERIOD, "max_wrist_force": MAX_WRIST_FORCE,
    }
