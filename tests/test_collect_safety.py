"""collect.py's crash and Ctrl-C promises (README "Datasets"): a killed collection resumes with the
learner's state and gives the data of a run that never stopped; Ctrl-C writes the consolidated file
of what was finished; a Sawyer crash loses at most the block in progress, redone bit-identically.
Only the command line, collect.train(collect.Args(...)) and the files written are used."""

import contextlib
import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import collect
import sawyer_env
from tests.conftest import ROOT, SMOKE_ENV
from tests.helpers import write_random_dataset

ARRAYS = ("observation", "action", "reward", "discount", "next_observation", "episode_id", "step")
LEARNER = ["--warmup-steps", "500", "--steps-per-update", "100", "--batch-size", "32",
           "--policy-layers", "32", "32", "--critic-layers", "32", "32"]


def command(output, episodes):
    return [sys.executable, str(ROOT / "collect.py"), "--env", SMOKE_ENV, "--output", str(output),
            "--episodes", str(episodes), *LEARNER]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def interrupt_after_episodes(output, episodes, wanted, signum):
    """start the collection, send `signum` once `wanted` episode files exist; returns the process"""
    parts = output.with_suffix(".episodes")
    process = subprocess.Popen(command(output, episodes), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(parts.glob("run*_episode*.npz"))) < wanted and process.poll() is None:
        assert time.monotonic() < deadline, "collection too slow"
        time.sleep(0.05)
    process.send_signal(signum)
    process.stdout, process.stderr = process.communicate(timeout=300)
    return process


def load(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in ARRAYS}


@pytest.mark.slow
def test_a_killed_collection_resumes_with_the_learners_state(tmp_path):
    straight = tmp_path / "straight.npz"
    assert subprocess.run(command(straight, 3), cwd=ROOT, env=environment(), capture_output=True,
                          timeout=600).returncode == 0
    resumed = tmp_path / "resumed.npz"
    killed = interrupt_after_episodes(resumed, 3, 1, signal.SIGKILL)  # no handler runs: a crash
    assert killed.returncode == -signal.SIGKILL
    done = len(list(resumed.with_suffix(".episodes").glob("run*_episode*.npz")))
    assert 1 <= done < 3 and not resumed.exists()
    rerun = subprocess.run(command(resumed, 3), cwd=ROOT, env=environment(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    a, b = load(straight), load(resumed)
    assert len(np.unique(a["episode_id"])) == 3
    for key in ARRAYS:  # the episodes after the kill are those of the learner that never stopped
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_a_kill_between_the_first_episode_and_the_first_checkpoint_is_redone(tmp_path):
    """Seen in a loaded suite run: SIGKILL after run000_episode000000.npz was written but before run000_learner.pt;
    the rerun refused the folder ("has episodes of seed 0 but no run000_learner.pt")."""
    straight = tmp_path / "straight.npz"
    assert subprocess.run(command(straight, 2), cwd=ROOT, env=environment(), capture_output=True,
                          timeout=600).returncode == 0
    killed = tmp_path / "killed.npz"
    killed.with_suffix(".episodes").mkdir()
    first = "run000_episode000000.npz"
    shutil.copyfile(straight.with_suffix(".episodes") / first, killed.with_suffix(".episodes") / first)
    rerun = subprocess.run(command(killed, 2), cwd=ROOT, env=environment(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    a, b = load(straight), load(killed)
    for key in ARRAYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_writes_the_consolidated_file_of_the_finished_episodes(tmp_path, signum):
    output = tmp_path / "data.npz"
    process = interrupt_after_episodes(output, 50, 1, signum)
    assert process.returncode == 130
    assert "Traceback" not in process.stderr and "rerun the command to continue" in process.stdout
    files = sorted(output.with_suffix(".episodes").glob("run*_episode*.npz"))
    data = load(output)
    assert len(np.unique(data["episode_id"])) == len(files) >= 1
    first = np.load(files[0])
    np.testing.assert_array_equal(data["observation"][: len(first["observation"])], first["observation"])


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


@pytest.fixture
def small_sawyer_blocks(monkeypatch):
    """Blocks of 2 episodes of 20 steps instead of 20 of 200, so a crash in the second block is cheap;
    the protocol's re-randomisation period and the block size stay the same number"""
    monkeypatch.setattr(sawyer_env, "ROBOT_RESET_PERIOD", 2)
    monkeypatch.setattr(sawyer_env, "EPISODE_STEPS", 20)


def sawyer_args(output, episodes=4):
    return collect.Args(env="sawyer", output=str(output), episodes=episodes)


@pytest.mark.parametrize("interruption", (RuntimeError, KeyboardInterrupt))
def test_a_sawyer_crash_loses_at_most_one_block_and_the_rerun_redoes_it_exactly(
        tmp_path, monkeypatch, small_sawyer_blocks, interruption):
    straight = tmp_path / "straight.npz"
    quiet(collect.train, sawyer_args(straight))
    real_episode, calls = sawyer_env.collect_episode, []

    def crashing_episode(*args, **kwargs):  # the 4th episode (the second of block 1) fails mid-way
        calls.append(1)
        if len(calls) == 4:
            raise interruption("crash")
        return real_episode(*args, **kwargs)

    monkeypatch.setattr(sawyer_env, "collect_episode", crashing_episode)
    output = tmp_path / "data.npz"
    with pytest.raises(SystemExit if interruption is KeyboardInterrupt else RuntimeError) as error:
        quiet(collect.train, sawyer_args(output))
    blocks = sorted(output.with_suffix(".episodes").glob("run*_block*.npz"))
    assert [f.name for f in blocks] == ["run000_block00000.npz"]  # block 1 lost, block 0 kept
    if interruption is KeyboardInterrupt:  # Ctrl-C: exit 130 and the consolidated file of block 0
        assert error.value.code == 130
        data = load(output)
        assert len(np.unique(data["episode_id"])) == 2
    else:
        assert not output.exists()
    monkeypatch.setattr(sawyer_env, "collect_episode", real_episode)
    quiet(collect.train, sawyer_args(output))
    a, b = load(straight), load(output)
    for key in ARRAYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_sigint_stops_a_collection_started_with_sigint_ignored(tmp_path):
    """A shell starts background jobs with SIGINT ignored (then Python installs no KeyboardInterrupt handler): seen
    when this suite ran under `nohup bash -c ... &`, where the collection above ran all 50 episodes. collect.py
    restores the handler, so `kill -INT` still writes what is finished."""
    output = tmp_path / "data.npz"
    parts = output.with_suffix(".episodes")
    process = subprocess.Popen(command(output, 50), cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while not list(parts.glob("run*_episode*.npz")) and process.poll() is None:
        assert time.monotonic() < deadline, "collection too slow"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=300)
    assert process.returncode == 130 and output.exists()


# A rerun continues the collection in <output>.episodes and rewrites <output> from it: what it must not lose or mix.

def files_of(output):
    """Every file of the dataset and its episode folder, with its bytes."""
    paths = [output, *sorted(output.with_suffix(".episodes").glob("*"))] if output.exists() else []
    return {path.name: path.read_bytes() for path in paths}


def test_a_dataset_its_episode_folder_did_not_write_is_kept_unless_overwrite(tmp_path, small_sawyer_blocks):
    """Seen by hand: `collect.py --output` naming a published dataset (80 episodes, no episode folder) replaced it
    with the new collection's one episode."""
    output = write_random_dataset(tmp_path / "theirs.npz", episodes=6)
    before = output.read_bytes()
    with pytest.raises(collect.UserError, match=r"theirs.npz holds 6 episodes and .*theirs.episodes only 0: "
                                                r"rewriting it from them would lose 6; .*--overwrite"):
        quiet(collect.train, sawyer_args(output, episodes=2))
    assert output.read_bytes() == before
    assert not output.with_suffix(".episodes").exists()  # refused before anything was written
    text = tmp_path / "notes.npz"
    text.write_text("not a dataset")
    with pytest.raises(collect.UserError, match="notes.npz exists and is not a dataset of this project"):
        quiet(collect.train, sawyer_args(text, episodes=2))
    assert text.read_text() == "not a dataset"
    quiet(collect.train, dataclasses.replace(sawyer_args(output, episodes=2), overwrite=True))
    with np.load(output) as archive:
        assert len(np.unique(archive["episode_id"])) == 2


def test_a_rerun_with_other_data_flags_is_refused_and_changes_nothing(tmp_path, small_sawyer_blocks):
    """Seen by hand: a rerun with another --env into a cheetah collection's output replaced its dataset with the
    new env's (Sawyer) or died in a traceback (walker's learner shapes); other learner flags would have continued
    the collection with them, under the metadata of the last run only."""
    output = tmp_path / "data.npz"
    quiet(collect.train, sawyer_args(output, episodes=2))
    before = files_of(output)
    assert "collection.json" in before
    with pytest.raises(collect.UserError, match=r"data.episodes holds a collection made with --noise 0.3; rerun "
                                                r"with the flags it started with"):
        quiet(collect.train, dataclasses.replace(sawyer_args(output, episodes=4), noise=0.1))
    with pytest.raises(collect.UserError, match="made with --env sawyer"):
        quiet(collect.train, collect.Args(env=SMOKE_ENV, output=str(output), episodes=3))
    assert files_of(output) == before
    # a folder from before collection.json: the flags in the dataset's metadata decide
    output.with_suffix(".episodes").joinpath("collection.json").unlink()
    with pytest.raises(collect.UserError, match="made with --noise 0.3"):
        quiet(collect.train, dataclasses.replace(sawyer_args(output, episodes=4), noise=0.1))
    # what a rerun may change: more episodes (and a learner flag, which a Sawyer collection does not use)
    quiet(collect.train, dataclasses.replace(sawyer_args(output, episodes=4), batch_size=8))
    with np.load(output) as archive:
        assert len(np.unique(archive["episode_id"])) == 4


@pytest.mark.slow
def test_a_rerun_of_a_control_suite_collection_with_another_learner_flag_is_one_sentence(tmp_path):
    output = tmp_path / "data.npz"
    assert subprocess.run(command(output, 1), cwd=ROOT, env=environment(), capture_output=True,
                          timeout=600).returncode == 0
    before = files_of(output)
    changed = [*command(output, 2), "--discount", "0.9"]
    rerun = subprocess.run(changed, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1
    assert rerun.stderr.strip().splitlines()[-1] == (
        f"collect.py: error: {output.with_suffix('.episodes')} holds a collection made with --discount 0.99; rerun "
        "with the flags it started with to continue it (only --episodes, --seeds and --device may change), or write "
        "to another --output")
    assert files_of(output) == before
