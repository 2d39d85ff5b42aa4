"""Training needs no OpenGL: with libEGL hidden (bind-mounted over by /dev/null in a private mount namespace, as
on a minimal container or the GPU machine this project was first run on) a short training run of every learning
script succeeds, because no rendering backend is chosen unless --capture-video asks for one. Skipped where the
test cannot make a mount namespace (not root, no unshare) or the machine has no libEGL to hide."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, write_random_dataset

HIDE_EGL = """for f in $(ldconfig -p | grep -i 'libEGL' | sed 's/.*=> //'); do
  mount --bind /dev/null "$(readlink -f "$f")" || exit 99
done
exec "$@"
"""


def in_namespace_without_egl(*command, env=None):
    return subprocess.run(["unshare", "-m", "sh", "-c", HIDE_EGL, "hide-egl", *command], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def no_egl():
    if not shutil.which("unshare") or "libEGL" not in subprocess.run(["ldconfig", "-p"], capture_output=True,
                                                                      text=True).stdout:
        pytest.skip("needs unshare and a libEGL to hide")
    probe = in_namespace_without_egl(sys.executable, "-c", "import os; os.environ['MUJOCO_GL'] = 'egl'; "
                                                          "from dm_control import suite")
    if probe.returncode == 99 or "unshare:" in probe.stderr:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()[:200]}")
    # The hidden library is what breaks an EGL import: the situation the scripts must survive.
    assert probe.returncode != 0 and "eglQueryString" in probe.stderr, probe.stderr[-500:]


@pytest.mark.parametrize("script", ["abm_mpo.py", "bcq.py"])  # the env block is one shared block in all five
def test_training_runs_with_libegl_hidden(no_egl, script, tmp_path):
    dataset = write_random_dataset(tmp_path / "data.npz")
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    env["OMP_NUM_THREADS"] = "1"
    process = in_namespace_without_egl(
        sys.executable, script, "--env", "cartpole-balance", "--dataset", str(dataset), "--total-steps", "4",
        "--batch-size", "8", "--num-action-samples", "2", "--eval-every", "4", "--eval-episodes", "1",
        "--eval-max-steps", "10", "--critic-layers", "16", "16", "--device", "cpu", "--run-dir", str(tmp_path / "run"),
        env=env)
    assert process.returncode == 0, process.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["per_task"]["balance"]["return"] >= 0.0
