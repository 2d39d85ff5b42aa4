"""A user's mistakes and interruptions (issue 22): every bad flag, dataset, run directory and resume is one sentence
on stderr and a non-zero exit, and nothing on disk is lost or half-written. Most cases go through each script's own
`main()` in this process (no training: every check comes before the first update); the interruptions run the
scripts as a user does and stop them with SIGINT, SIGTERM or SIGKILL."""

import contextlib
import csv
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
from tests.helpers import ROOT, SMOKE_ENV, TEST_DEVICE, held_by_another_process, write_random_dataset

SCRIPTS = {"abm_mpo": abm_mpo, "abm_svg": abm_svg, "bm_mpo": bm_mpo, "bcq": bcq, "bear": bear}
TINY = ["--batch-size", "16", "--num-action-samples", "4", "--critic-layers", "32", "32", "--eval-episodes", "1",
        "--eval-max-steps", "5", "--device", "cpu", "--compile", "off"]


def tiny(module) -> list:
    layers = ["--encoder-layers", "32", "--decoder-layers", "32", "--perturbation-layers", "32"] if module is bcq \
        else ["--policy-layers", "32", "32"]
    return [*TINY, *layers, *(["--warmup-steps", "2"] if module is bear else [])]


def run_main(module, *argv, stdout=None) -> tuple[int, str]:
    """`python <script>.py ARGV` in this process: (exit status, stderr); what it prints goes to `stdout` (a StringIO)
    if given. The signal handlers main() installs are put back afterwards."""
    argv = [str(a) for a in argv]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_argv, sys.argv = sys.argv, [f"{module.__name__}.py", *argv]
    stderr, status = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout or io.StringIO()):
            try:
                module.main(module.train, tyro.cli(module.Args, args=argv))
            except SystemExit as exit_:
                if isinstance(exit_.code, str):  # sys.exit("message"): Python prints it to stderr, status 1
                    print(exit_.code, file=sys.stderr)
                status = 1 if isinstance(exit_.code, str) else exit_.code
    finally:
        sys.argv = old_argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return status, stderr.getvalue()


def one_sentence(status, stderr, phrase, script="") -> str:
    """Asserts a failure told in one line that holds `phrase` (an error of `script`, or a stop); returns the line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert status not in (0, None), stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert phrase in lines[0], lines[0]
    assert lines[0].startswith(f"{script}") and ": error: " in lines[0] or status == 130, lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-update bm_mpo run (and its dataset) that the cases below try to damage."""
    folder = tmp_path_factory.mktemp("finished")
    dataset = write_random_dataset(folder / "data.npz")
    status, stderr = run_main(bm_mpo, "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", folder / "run",
                              "--total-steps", "4", "--eval-every", "2", "--checkpoint-every", "2", *tiny(bm_mpo))
    assert status == 0, stderr
    return folder / "run", dataset


# --- flags ------------------------------------------------------------------------------------------------------
BAD_FLAGS = [  # (flags, what the sentence names)
    (["--total-steps", "0"], "--total-steps must be positive, not 0"),
    (["--eval-every", "0"], "--eval-every must be positive"),
    (["--eval-episodes", "0"], "--eval-episodes must be positive"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be zero or more"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--num-action-samples", "0"], "--num-action-samples must be positive"),
    (["--eval-max-steps", "0"], "--eval-max-steps must be positive"),
    (["--final-eval-episodes", "-1"], "--final-eval-episodes must be zero or more"),
    (["--dataset-episodes", "0"], "--dataset-episodes must be positive"),
    (["--seed", "-1"], "--seed must be zero or more"),
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["--discount", "1.5"], "--discount must be at most 1"),
    (["--discount", "-0.1"], "--discount must be zero or more"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be zero or more"),
    (["--critic-layers", "0", "32"], "--critic-layers must be one or more positive layer sizes"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--resume", "somewhere", "--overwrite"], "--overwrite starts a new run and --resume continues one"),
]


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flags,phrase", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_sentence_before_anything_is_written(name, flags, phrase, tmp_path, random_dataset):
    module = SCRIPTS[name]
    status, stderr = run_main(module, "--env", SMOKE_ENV, "--dataset", random_dataset, "--run-dir", tmp_path / "run",
                              *tiny(module), *flags)
    one_sentence(status, stderr, phrase, f"{name}.py")
    assert not (tmp_path / "run").exists()


SCRIPT_FLAGS = [  # the flags one script has
    (abm_mpo, ["--epsilon", "-0.1"], "--epsilon must be zero or more"),
    (abm_mpo, ["--prior", "none", "--epsilon", "0"], "--prior none with --epsilon 0 learns nothing"),
    (abm_mpo, ["--snippet-length", "0"], "--snippet-length must be positive"),
    (abm_mpo, ["--initial-temperature", "0"], "--initial-temperature must be positive"),
    (abm_svg, ["--epsilon", "0"], "--epsilon must be positive"),
    (bm_mpo, ["--target-update-period", "0"], "--target-update-period must be positive"),
    (bcq, ["--target-update-rate", "2"], "--target-update-rate must be at most 1"),
    (bcq, ["--num-eval-samples", "0"], "--num-eval-samples must be positive"),
    (bcq, ["--latent-clip", "0"], "--latent-clip must be positive"),
    (bear, ["--mmd-sigma", "0"], "--mmd-sigma must be positive"),
    (bear, ["--warmup-steps", "-1"], "--warmup-steps must be zero or more"),
    (bear, ["--double-q-lambda", "1.5"], "--double-q-lambda must be at most 1"),
]


@pytest.mark.parametrize("module,flags,phrase", SCRIPT_FLAGS, ids=[f"{m.__name__} {' '.join(f)}" for m, f, _ in SCRIPT_FLAGS])
def test_a_bad_algorithm_flag_is_one_sentence(module, flags, phrase, tmp_path, random_dataset):
    status, stderr = run_main(module, "--env", SMOKE_ENV, "--dataset", random_dataset, "--run-dir", tmp_path / "run",
                              *tiny(module), *flags)
    one_sentence(status, stderr, phrase)
    assert not (tmp_path / "run").exists()


def test_an_env_without_continuous_vector_actions_is_one_sentence(tmp_path, random_dataset):
    status, stderr = run_main(abm_mpo, "--env", "CartPole-v1", "--dataset", random_dataset, *TINY)
    one_sentence(status, stderr, "these scripts learn from flat vectors of real numbers")


def test_a_bad_sawyer_task_is_refused_before_any_data_is_generated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no datasets/sawyer.npz here: the default collection would start
    monkeypatch.setattr(abm_mpo.subprocess, "run", lambda *a, **k: pytest.fail("collect.py was started"))
    one_sentence(*run_main(abm_mpo, "--env", "sawyer", "--task", "juggle", *TINY), "unknown sawyer --task 'juggle'")
    assert not (tmp_path / "datasets").exists()


def test_a_task_the_default_data_will_not_have_is_refused_before_it_is_generated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(abm_mpo.subprocess, "run", lambda *a, **k: pytest.fail("collect.py was started"))
    line = one_sentence(*run_main(abm_mpo, "--env", "cheetah", "--task", "hop", *TINY), "unknown --task 'hop'")
    assert "'cheetah-run'" in line and not (tmp_path / "datasets").exists()


# --- datasets ---------------------------------------------------------------------------------------------------
def damaged(path: Path, change) -> Path:
    with np.load(write_random_dataset(path)) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)
    return path


BAD_DATASETS = [  # (how the arrays are damaged, what the sentence says)
    (lambda a: a.pop("action"), "it lacks some of the arrays"),
    (lambda a: a.update(reward=np.zeros((3, 1), np.float32)), "array 'reward' has shape other than 2-D"),
    (lambda a: a.update(observation=a["observation"][:, :, None]), "array 'observation' has shape other than 2-D"),
    (lambda a: a.update(discount=np.array(["x"] * len(a["discount"]))), "array 'discount' must hold numbers"),
    (lambda a: a.update(episode_id=a["episode_id"] + 0.5), "array 'episode_id' must hold whole numbers"),
    (lambda a: a["reward"].__setitem__(7, np.nan), "array 'reward' contains NaN or infinite values"),
    (lambda a: a["observation"].__setitem__(3, np.inf), "array 'observation' contains NaN or infinite values"),
    (lambda a: a["discount"].__setitem__(5, 2.0), "'discount' must lie in [0, 1]"),
    (lambda a: a.update(step=a["step"] * 2), "consecutive steps"),
    (lambda a: a.update(metadata=np.array("{not json")), "its 'metadata' is not JSON"),
    (lambda a: a.update(metadata=np.array("[1, 2]")), "'metadata' must be a JSON object"),
    (lambda a: a.update(metadata=np.array(json.dumps({"env": SMOKE_ENV, "tasks": "balance"}))), "whose 'tasks' is a list"),
    (lambda a: a.update(metadata=np.array(json.dumps({"env": 3}))), "whose 'env' is a str"),
    (lambda a: a.update(metadata=np.array(json.dumps({"env": SMOKE_ENV, "action_low": "low"}))), "'action_low' is a list"),
    (lambda a: a.update({k: v[:0] for k, v in a.items() if k != "metadata"}), "it holds no transitions"),
    (lambda a: a.update(metadata=np.array(json.dumps({"env": SMOKE_ENV, "tasks": ["a", "b"]}))),
     "metadata names 2 tasks but 'reward' has 1 columns"),
]


@pytest.mark.parametrize("change,phrase", BAD_DATASETS, ids=[phrase for _, phrase in BAD_DATASETS])
@pytest.mark.parametrize("name", ["abm_mpo", "bcq"])  # the two dataset paths: snippets and transitions
def test_a_bad_dataset_is_one_sentence(name, change, phrase, tmp_path):
    path = damaged(tmp_path / "bad.npz", change)
    status, stderr = run_main(SCRIPTS[name], "--env", SMOKE_ENV, "--dataset", path, "--run-dir", tmp_path / "run",
                              *tiny(SCRIPTS[name]))
    line = one_sentence(status, stderr, phrase)
    assert "dataset" in line and not (tmp_path / "run").exists()


def test_more_dataset_episodes_than_the_data_has_is_one_sentence(tmp_path, random_dataset):
    """--dataset-episodes K keeps the first K episodes of each collecting run; a K above every run's count would
    silently learn from all of them under another regime's name (random_dataset: two runs of 3 episodes)."""
    assert len(abm_mpo.load_dataset(random_dataset, 3)["observation"]) == 6 * 40  # all of each run: allowed
    assert len(abm_mpo.load_dataset(random_dataset, 2)["observation"]) == 4 * 40
    line = one_sentence(*run_main(bcq, "--env", SMOKE_ENV, "--dataset", random_dataset, "--dataset-episodes", "4",
                                  "--run-dir", tmp_path / "run", *tiny(bcq)),
                        f"--dataset-episodes 4 asks for more episodes than {random_dataset} has in any collecting run "
                        "(at most 3)", "bcq")
    assert "give at most that" in line and not (tmp_path / "run").exists()


def test_unreadable_files_say_what_they_are(tmp_path):
    random_bytes = tmp_path / "random.npz"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(1000))
    line = one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", random_bytes, *TINY), "cannot be read")
    assert "not an .npz archive" in line and "pickle" not in line
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"observation": [1.0]}))
    line = one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", pickled, *TINY), "cannot be read")
    assert "pickled Python objects, which are never loaded" in line
    objects = tmp_path / "objects.npz"
    np.savez(objects, observation=np.array([{"a": 1}], dtype=object))
    line = one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", objects, *TINY), "cannot be read")
    assert "pickled Python objects" in line
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(write_random_dataset(tmp_path / "whole.npz").read_bytes()[:3000])
    one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", truncated, *TINY), "cannot be read")


def test_the_datasets_env_is_used_without_env_and_checked_with_it(tmp_path):
    walker_data = write_random_dataset(tmp_path / "walker.npz", obs_dim=5, act_dim=1, env="walker")
    line = one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", walker_data, *TINY),
                        "was recorded on 'walker', not on --env 'cartpole-balance'")
    assert "leave --env out" in line
    data = write_random_dataset(tmp_path / "data.npz")  # records cartpole-balance
    status, stderr = run_main(abm_mpo, "--dataset", data, "--run-dir", tmp_path / "run", "--total-steps", "1",
                              *tiny(abm_mpo))
    assert status == 0, stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["env"] == SMOKE_ENV
    status, stderr = run_main(abm_mpo, "--env", "cartpole-balance", "--dataset", data, "--run-dir", tmp_path / "b",
                              "--total-steps", "1", *tiny(abm_mpo))  # the same env by another name is fine
    assert status == 0, stderr


# --- run directories and resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCRIPTS)
def test_a_new_run_never_overwrites_a_run_directory(name, finished_run, tmp_path):
    run_dir, dataset = finished_run
    before = snapshot(run_dir)
    line = one_sentence(*run_main(SCRIPTS[name], "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", run_dir,
                                  *tiny(SCRIPTS[name])), f"run directory {run_dir} is not empty")
    assert f"--resume {run_dir}" in line and "--run-dir" in line and "--overwrite" in line
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_directory_that_cannot_be_made_is_refused_before_any_data(name, tmp_path, monkeypatch):
    """Checked with the flags: without --dataset the data would be a default collection of many minutes first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    monkeypatch.setattr(SCRIPTS[name], "load_data", lambda *a: pytest.fail("the data was read before the check"))
    for run_dir in (blocker, blocker / "run"):
        one_sentence(*run_main(SCRIPTS[name], "--env", SMOKE_ENV, "--run-dir", run_dir, *tiny(SCRIPTS[name])),
                     f"run directory {run_dir} is not writable ({blocker} is a file)", name)
    assert blocker.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_folder_without_a_checkpoint_is_not_offered_to_resume(finished_run, tmp_path):
    """A run killed before its first checkpoint (SIGKILL, the out-of-memory killer) leaves config.json alone: the
    sentence must not send the user to a --resume that cannot work."""
    run_dir, dataset = finished_run
    (tmp_path / "run").mkdir()
    shutil.copy(run_dir / "config.json", tmp_path / "run")
    line = one_sentence(*run_main(bm_mpo, "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", tmp_path / "run",
                                  *tiny(bm_mpo)), "it has no checkpoint to resume", "bm_mpo")
    assert "--resume" not in line and "--overwrite" in line
    assert run_main(bm_mpo, "--resume", tmp_path / "run")[1].count("no config.json and checkpoint.pt") == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_run_directory_in_use_is_refused_before_any_data_and_left_alone(name, finished_run, tmp_path, monkeypatch):
    """Another process holds the run (a run, or a --resume of it, that has not ended): a second --resume, an
    --overwrite or a new run into it would write over its files. Each is one sentence, before the data is read; once
    the holder has ended, the run resumes."""
    run_dir, dataset = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    monkeypatch.setattr(SCRIPTS[name], "load_data", lambda *a: pytest.fail("the data was read before the check"))
    with held_by_another_process(tmp_path / "run"):
        for flags in (["--resume", tmp_path / "run"], ["--run-dir", tmp_path / "run", "--overwrite"],
                      ["--run-dir", tmp_path / "run"]):
            one_sentence(*run_main(SCRIPTS[name], *flags, "--env", SMOKE_ENV, "--dataset", dataset,
                                   *tiny(SCRIPTS[name])), f"run directory {tmp_path / 'run'} is in use by another "
                         "process", name)
    assert snapshot(tmp_path / "run") == before
    if name == "bm_mpo":  # finished_run's script
        monkeypatch.undo()
        status, stderr = run_main(bm_mpo, "--resume", tmp_path / "run", "--total-steps", "6")
        assert status == 0, stderr


def test_a_resume_cannot_shorten_a_run_and_says_when_nothing_is_left_to_train(finished_run, tmp_path):
    run_dir, _ = finished_run
    before = snapshot(run_dir)
    line = one_sentence(*run_main(bm_mpo, "--resume", run_dir, "--total-steps", "2"),
                        f"{run_dir} has done 4 updates, more than --total-steps 2: a run cannot be shortened", "bm_mpo")
    assert "give a larger --total-steps" in line and snapshot(run_dir) == before
    shutil.copytree(run_dir, tmp_path / "run")
    printed = io.StringIO()
    status, stderr = run_main(bm_mpo, "--resume", tmp_path / "run", "--final-eval-episodes", "1", stdout=printed)
    assert status == 0, stderr
    assert f"{tmp_path / 'run'} has done all its 4 updates: nothing to train" in printed.getvalue()
    assert "Resuming" not in printed.getvalue()
    after = snapshot(tmp_path / "run")
    for name in ("checkpoint.pt", "metrics.csv", "policy.pt2"):  # trained nothing, wrote no row
        assert after[Path(name)] == before[Path(name)], name
    assert json.loads(after[Path("summary.json")])["final_eval"]["episodes"] == 1


@pytest.mark.parametrize("temporary,written", [("metrics.tmp", "metrics.csv"), ("policy.tmp", "policy.pt2"),
                                               ("checkpoint.tmp", "checkpoint.pt")])
def test_a_full_disk_stops_the_run_in_one_sentence_and_loses_nothing(temporary, written, finished_run, tmp_path):
    """Each file a run rewrites goes to a temporary file first; here that file is /dev/full, which fails every write
    as a full disk does (ENOSPC). The run stops in one sentence that says how to continue it, the temporary file is
    gone, the last checkpoint and the policy it exported are whole, and the printed command finishes the run."""
    run_dir, _ = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    (tmp_path / "run" / temporary).symlink_to("/dev/full")
    line = one_sentence(*run_main(bm_mpo, "--resume", tmp_path / "run", "--total-steps", "6"),
                        f"cannot write {tmp_path / 'run' / written}: ", "bm_mpo")
    assert "MiB free on its disk" in line, line
    assert line.endswith(f"holds update 4: continue with python bm_mpo.py --resume {tmp_path / 'run'} "
                         "--total-steps 6"), line
    assert not (tmp_path / "run" / temporary).is_symlink()
    after = snapshot(tmp_path / "run")
    assert after[Path("checkpoint.pt")] == before[Path("checkpoint.pt")]
    if written != "checkpoint.pt":  # policy.pt2 is exported before the checkpoint: never behind it
        assert after[Path("policy.pt2")] == before[Path("policy.pt2")]
    status, stderr = run_main(bm_mpo, *shlex.split(line.split("continue with python bm_mpo.py ")[1]))
    assert status == 0, stderr
    assert [row["step"] for row in csv.DictReader((tmp_path / "run" / "metrics.csv").open())] == ["2", "4", "6"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 6


HUGE = str(2**50)  # a batch whose first tensor (its 2**50 sample indices) no memory or address space holds


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_batch_too_big_for_memory_is_one_sentence_and_leaves_no_directory(name, tmp_path, random_dataset):
    """torch's refusal (the CPU allocator's ENOMEM, CUDA's OutOfMemoryError) becomes one sentence that names the
    allocation and the flags that size an update; the new run's directory, with nothing in it, is removed."""
    module = SCRIPTS[name]
    line = one_sentence(*run_main(module, "--env", SMOKE_ENV, "--dataset", random_dataset, "--run-dir",
                                  tmp_path / "run", *tiny(module), "--device", TEST_DEVICE, "--batch-size", HUGE),
                        "out of GPU memory after 0 updates" if TEST_DEVICE == "cuda" else "out of memory after 0 updates",
                        name)
    assert "(an allocation of 8,388,608.0 GiB was refused)" in line or TEST_DEVICE == "cuda", line
    assert f"--batch-size {HUGE} and --num-action-samples 4 set the size of an update" in line, line
    assert not (tmp_path / "run").exists()


def test_running_out_of_memory_keeps_the_checkpoint_and_says_how_to_continue(finished_run, tmp_path, monkeypatch):
    """Memory taken mid-run (other runs on the machine): the checkpoint is kept and the line says how to continue."""
    run_dir, _ = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    monkeypatch.setattr(bm_mpo, "sample_transitions", lambda *_: torch.empty(2**60, dtype=torch.uint8))  # 1 EiB
    line = one_sentence(*run_main(bm_mpo, "--resume", tmp_path / "run", "--total-steps", "6"),
                        "out of memory after 4 updates (an allocation of 1,073,741,824.0 GiB was refused)", "bm_mpo")
    assert line.endswith(f"holds update 4: continue with python bm_mpo.py --resume {tmp_path / 'run'} "
                         "--total-steps 6"), line
    assert snapshot(tmp_path / "run") == before
    # CUDA's message, as torch words it, gives the size in its own units
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 745.06 GiB. GPU 0 has a total capacity of "
                                   "139.81 GiB of which 138.20 GiB is free.")
    assert bm_mpo.out_of_memory(error, bm_mpo.Args()).startswith(
        "out of GPU memory after 0 updates (an allocation of 745.06 GiB was refused): --batch-size 512 ")


def test_overwrite_replaces_a_run_and_nothing_else(tmp_path):
    dataset = write_random_dataset(tmp_path / "data.npz")
    common = ["--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", tmp_path / "run", *tiny(abm_mpo)]
    assert run_main(abm_mpo, *common, "--total-steps", "2", "--eval-every", "1")[0] == 0
    assert run_main(abm_mpo, *common, "--total-steps", "1", "--overwrite")[0] == 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [row["step"] for row in rows] == ["1"]  # the old run's rows are gone, not mixed in
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "run")
    line = one_sentence(*run_main(abm_mpo, *common, "--overwrite"), "--overwrite deletes runs only")
    assert "notes.txt" in line and snapshot(tmp_path / "run") == before


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path, monkeypatch):
    dataset = write_random_dataset(tmp_path / "data.npz")
    real_critic_loss = abm_mpo.critic_loss

    def poisoned(*args, **kwargs):
        loss, info = real_critic_loss(*args, **kwargs)
        return loss * float("nan"), {**info, "losses/critic": loss.detach() * float("nan")}

    monkeypatch.setattr(abm_mpo, "critic_loss", poisoned)
    line = one_sentence(*run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", tmp_path / "run",
                                  "--total-steps", "4", "--eval-every", "2", *tiny(abm_mpo)),
                        "non-finite loss ['losses/critic'] at update 1")
    assert "there was no checkpoint yet" in line and "checkpoint.pt" not in line
    assert f"first checkpoint and evaluation: {tmp_path / 'run'} removed" in line and not (tmp_path / "run").exists()


def ctrl_c_at(module, stop: int):
    """Logger.record of `module` as if Ctrl-C came when update `stop` was about to be recorded."""
    real_record = module.Logger.record

    def record(self, step, metrics):
        if step == stop:
            raise KeyboardInterrupt
        real_record(self, step, metrics)
    return record


def test_a_run_stopped_before_its_first_checkpoint_keeps_its_evaluations(tmp_path, monkeypatch):
    dataset = write_random_dataset(tmp_path / "data.npz")
    monkeypatch.setattr(abm_mpo.Logger, "record", ctrl_c_at(abm_mpo, 5))
    status, stderr = run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", tmp_path / "run",
                              "--eval-every", "2", "--checkpoint-every", "100", *tiny(abm_mpo))
    line = one_sentence(status, stderr, "abm_mpo.py: stopped at update 4")
    assert status == 130 and "cannot be resumed" in line and "metrics.csv keeps its evaluations" in line
    assert [row["step"] for row in csv.DictReader((tmp_path / "run" / "metrics.csv").open())] == ["2", "4"]


def test_a_stopped_resume_says_how_to_continue_it_with_the_flags_it_changed(tmp_path, monkeypatch):
    """config.json keeps a run's first flags, so when a resume that changed some (a longer run, a final evaluation)
    is stopped, its line repeats them: the command it gives continues that resume, not the first run, and it is
    quoted for a shell (a run directory and a flag value with spaces)."""
    dataset, run_dir = write_random_dataset(tmp_path / "data.npz"), tmp_path / "my runs" / "run 1"
    status, stderr = run_main(abm_mpo, "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", run_dir,
                              "--total-steps", "4", "--eval-every", "2", "--checkpoint-every", "2", *tiny(abm_mpo))
    assert status == 0, stderr
    monkeypatch.setattr(abm_mpo.Logger, "record", ctrl_c_at(abm_mpo, 8))
    status, stderr = run_main(abm_mpo, "--resume", run_dir, "--total-steps", "10", "--final-eval-episodes", "1",
                              "--no-cuda-graph", "--wandb-project", "ABM runs", "--eval-every", "2",
                              "--no-track")  # the last two as saved
    line = one_sentence(status, stderr, "abm_mpo.py: stopped at update 7")
    assert line.endswith(f"holds update 6: continue with python abm_mpo.py --resume '{run_dir}' --total-steps 10 "
                         "--final-eval-episodes 1 --no-cuda-graph --wandb-project 'ABM runs'"), line
    monkeypatch.undo()
    status, stderr = run_main(abm_mpo, *shlex.split(line.split("continue with python abm_mpo.py ")[1]))
    assert status == 0, stderr
    assert [row["step"] for row in csv.DictReader((run_dir / "metrics.csv").open())] == ["2", "4", "6", "8", "10"]
    assert json.loads((run_dir / "summary.json").read_text())["final_eval"]["episodes"] == 1


def test_resume_refuses_a_damaged_config_in_one_sentence(finished_run, tmp_path):
    run_dir, dataset = finished_run
    for damage in ("{not json", "[]", json.dumps({"script": "bm_mpo"})):
        copy = tmp_path / f"copy{len(damage)}"
        copy.mkdir()
        for name, data in snapshot(run_dir).items():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(data)
        (copy / "config.json").write_text(damage)
        before = snapshot(copy)
        line = one_sentence(*run_main(bm_mpo, "--resume", copy), "its config.json is damaged")
        assert "fresh --run-dir" in line and snapshot(copy) == before


def test_resume_refuses_another_dataset_and_honours_every_typed_flag(finished_run, tmp_path):
    run_dir, dataset = finished_run
    before = snapshot(run_dir)
    other = write_random_dataset(tmp_path / "other.npz", seed=1)  # same shapes, other numbers
    one_sentence(*run_main(bm_mpo, "--resume", run_dir, "--dataset", other), "--dataset was")
    # --batch-size 512 is the default, but typed: it is refused, not silently replaced by the saved 16
    one_sentence(*run_main(bm_mpo, "--resume", run_dir, "--batch-size", "512"), "--batch-size was 16")
    assert snapshot(run_dir) == before
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    status, stderr = run_main(bm_mpo, "--resume", copy, "--total-steps", "6")  # may change: honoured
    assert status == 0, stderr
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["step"] == 6
    # the dataset file the run names was replaced by other data of the same shapes
    config = json.loads((copy / "config.json").read_text())
    config["args"]["dataset"] = str(other)
    (copy / "config.json").write_text(json.dumps(config))
    before = snapshot(copy)
    line = one_sentence(*run_main(bm_mpo, "--resume", copy, "--total-steps", "8"), "is not the one the run started on")
    assert "SHA-256" in line and snapshot(copy) == before


# --- summaries, progress, warnings ------------------------------------------------------------------------------
def test_summary_json_is_strict_json_and_says_when_a_return_is_missing(tmp_path):
    spec = {"best_episode_return_in_dataset": {"balance": 10.0}}
    with contextlib.redirect_stdout(io.StringIO()):
        summary = abm_mpo.write_summary(tmp_path, [{"step": "2", "eval/return": "nan"}], spec)
    strict = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["final/return"] is None and strict["per_task"]["balance"]["return"] is None
    assert "not a finite number" in strict["note"] and summary["final/return"] is None
    with contextlib.redirect_stdout(io.StringIO()):
        abm_mpo.write_summary(tmp_path, [], spec)
    strict = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert "final/return" not in strict and strict["note"] == "no evaluation ran, so there is no final return"


def test_without_a_terminal_progress_is_a_line_at_a_steady_interval(tmp_path, monkeypatch):
    dataset = write_random_dataset(tmp_path / "data.npz")
    monkeypatch.setattr(bm_mpo, "PROGRESS_SECONDS", 0)  # a line at every update instead of every minute
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # not a terminal: no bar
        bm_mpo.train(tyro.cli(bm_mpo.Args, args=["--env", SMOKE_ENV, "--dataset", str(dataset), "--run-dir",
                                                 str(tmp_path / "run"), "--total-steps", "6", "--eval-every", "3",
                                                 *tiny(bm_mpo)]))
    lines = [line for line in stdout.getvalue().splitlines() if " of 6, " in line]
    assert [line.split("update ")[1].split(" of")[0] for line in lines] == ["1", "2", "3", "4", "5", "6"]
    assert "last evaluation: none yet" in lines[0] and "updates/s" in lines[3]
    assert "last evaluation: return " in lines[3] and ", prior_return " in lines[3]


@pytest.mark.slow
def test_collect_py_without_a_terminal_says_each_episode(tmp_path):
    """The main job's default collection runs 20 minutes with its output in a pipe, where no bar is drawn."""
    command = [sys.executable, str(ROOT / "collect.py"), "--env", SMOKE_ENV, "--output", str(tmp_path / "data.npz"),
               "--episodes", "2", "--warmup-steps", "500", "--steps-per-update", "100", "--batch-size", "16",
               "--policy-layers", "16", "--critic-layers", "16"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"collect {SMOKE_ENV} seed 0: episode")]
    assert [line.split("episode ")[1].split(",")[0] for line in lines] == ["1 of 2", "2 of 2"], result.stdout
    assert "updates, about" in lines[1] and lines[1].endswith("0 min left")


def test_dm_control_warnings_are_shown_once(tmp_path):
    """cheetah's model warns that `settotalmass` is deprecated at every env built: 62 of 77 log lines of a run."""
    code = "import abm_mpo\nfor seed in range(3):\n    abm_mpo.make_env('cheetah').reset(seed=seed)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MUJOCO_GL": "disable"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("settotalmass") == 1, result.stderr


# --- data made on the user's behalf -----------------------------------------------------------------------------
def test_a_stopped_default_collection_is_continued_not_trained_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()
    partial = write_random_dataset(tmp_path / "datasets" / "hopper.npz", env="hopper")
    with np.load(partial) as archive:
        arrays = {key: archive[key] for key in archive.files}
    collection = {"args": {"episodes": 60, "seeds": [0]}}
    arrays["metadata"] = np.array(json.dumps({"env": "hopper", "collection": collection,
                                              "episode_returns": {"hop": [1.0] * 14}}))
    np.savez(partial, **arrays)
    calls = []

    def fake_collect(command, **kwargs):  # collect.py continues from the episodes it has
        calls.append((command, kwargs))
        arrays["metadata"] = np.array(json.dumps({"env": "hopper", "collection": collection,
                                                  "episode_returns": {"hop": [1.0] * 60}}))
        np.savez(partial, **arrays)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(abm_mpo.subprocess, "run", fake_collect)
    from tests.helpers import box_env

    abm_mpo.load_data(abm_mpo.Args(env="hopper"), box_env(), torch.device("cpu"))
    assert len(calls) == 1 and calls[0][1]["preexec_fn"] is abm_mpo.stop_with_parent
    assert "holds 14 of 60 episodes (its collection was stopped)" in capsys.readouterr().out
    abm_mpo.load_data(abm_mpo.Args(env="hopper"), box_env(), torch.device("cpu"))
    assert len(calls) == 1  # complete now


def test_a_child_started_with_stop_with_parent_ends_with_its_parent(tmp_path):
    """`kill -9` of the main job while collect.py made its default data left collect.py running with no parent."""
    code = ("import subprocess, sys, time\nimport abm_mpo\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "preexec_fn=abm_mpo.stop_with_parent)\nprint(child.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    status = Path(f"/proc/{child}/status")
    for _ in range(100):  # gone, or a zombie waiting for init to reap it
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if "\tZ" not in status.read_text().split("State:")[1].split("\n")[0]:
                time.sleep(0.05)
                continue
        break
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


# --- interruptions ----------------------------------------------------------------------------------------------
def start(run_dir: Path, dataset: Path) -> subprocess.Popen:
    """A long bm_mpo run with a row every 2 updates and a checkpoint every 4."""
    command = [sys.executable, str(ROOT / "bm_mpo.py"), "--env", SMOKE_ENV, "--dataset", str(dataset), *tiny(bm_mpo),
               "--eval-every", "2", "--checkpoint-every", "4", "--total-steps", "100000", "--run-dir", str(run_dir)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def tensorboard_steps(run_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stopped_run_says_how_to_continue_and_resumes_with_every_row_once(stop, tmp_path):
    dataset, run_dir = write_random_dataset(tmp_path / "data.npz"), tmp_path / "run"
    process = start(run_dir, dataset)
    deadline = time.time() + 120
    while time.time() < deadline:  # past the second checkpoint, between two evaluations
        rows = (run_dir / "metrics.csv").read_text().count("\n") if (run_dir / "metrics.csv").exists() else 0
        if rows >= 6 and (run_dir / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    one_sentence(*run_main(bm_mpo, "--resume", run_dir), f"run directory {run_dir} is in use", "bm_mpo")  # it runs
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    if stop != signal.SIGKILL:  # one line besides the run's time estimate, exit 130
        lines = [line for line in stderr.splitlines() if line.strip() and "updates/s here" not in line]
        assert process.returncode == 130 and len(lines) == 1, stderr
        assert lines[0].startswith("bm_mpo.py: stopped at update") and "holds update" in lines[0], lines[0]
        assert lines[0].endswith(f"python bm_mpo.py --resume {run_dir}")
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    stopped_at = max(int(row["step"]) for row in csv.DictReader((run_dir / "metrics.csv").open()))
    total = stopped_at + 4
    resumed = subprocess.run([sys.executable, str(ROOT / "bm_mpo.py"), "--resume", str(run_dir), "--total-steps",
                              str(total)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [int(row["step"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]
    assert steps == list(range(2, total + 1, 2)), (saved, steps)  # every row once, none lost
    assert tensorboard_steps(run_dir, "losses/critic") == steps  # TensorBoard: one value per step too


def test_rows_after_a_resume_average_the_updates_they_say(tmp_path, monkeypatch):
    """The row after a resume averages every update since the row before it, also those done before the stop
    (the sums since the last row are in checkpoint.pt): equal to an uninterrupted run's, bit for bit."""
    dataset = write_random_dataset(tmp_path / "data.npz")
    flags = ["--env", SMOKE_ENV, "--dataset", str(dataset), "--total-steps", "8", "--eval-every", "4",
             "--checkpoint-every", "3", *tiny(bm_mpo)]
    with contextlib.redirect_stdout(io.StringIO()):
        bm_mpo.train(tyro.cli(bm_mpo.Args, args=[*flags, "--run-dir", str(tmp_path / "straight")]))
        monkeypatch.setattr(bm_mpo.Logger, "record", ctrl_c_at(bm_mpo, 7))
        with pytest.raises(KeyboardInterrupt):
            bm_mpo.train(tyro.cli(bm_mpo.Args, args=[*flags, "--run-dir", str(tmp_path / "stopped")]))
        monkeypatch.undo()
        assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["step"] == 6
        bm_mpo.train(tyro.cli(bm_mpo.Args, args=["--resume", str(tmp_path / "stopped")]))
    straight, resumed = (list(csv.DictReader((tmp_path / name / "metrics.csv").open())) for name in ("straight", "stopped"))
    assert [row["step"] for row in resumed] == ["4", "8"]
    for a, b in zip(straight, resumed):
        losses = [key for key in a if key.startswith(("losses/", "eval/"))]
        assert losses and {key: a[key] for key in losses} == {key: b[key] for key in losses}


# --- the tools ----------------------------------------------------------------------------------------------------
COLLECT_FLAGS = [
    (["--episodes", "0"], "--episodes must be positive"),
    (["--steps-per-update", "0"], "--steps-per-update must be positive"),
    (["--batch-size", "-3"], "--batch-size must be zero or more"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number"),
    (["--discount", "2"], "--discount must be at most 1"),
    (["--policy-layers", "0"], "--policy-layers must be one or more positive layer sizes"),
    (["--env", "sawyer", "--noise", "-1"], "--noise must be zero or more"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--env", "no-such-env"], "unknown env 'no-such-env'"),
]


@pytest.mark.parametrize("flags,phrase", COLLECT_FLAGS, ids=[" ".join(f) for f, _ in COLLECT_FLAGS])
def test_collect_py_says_one_sentence_for_a_bad_flag_and_writes_nothing(flags, phrase, tmp_path):
    import collect

    output = tmp_path / "data.npz"
    status, stderr = run_main(collect, "--output", output, "--env", SMOKE_ENV, *flags)
    one_sentence(status, stderr, phrase, "collect.py")
    assert not output.exists() and not output.with_suffix(".episodes").exists()


def test_collect_py_on_a_full_disk_says_one_sentence_and_its_rerun_continues(tmp_path):
    """The second episode's file goes to /dev/full, which fails writes as a full disk does: one sentence, the first
    episode and the learner's checkpoint kept, no temporary file left, and the same command then finishes."""
    import collect

    output = tmp_path / "data.npz"
    parts = output.with_suffix(".episodes")
    parts.mkdir()
    (parts / "run000_episode000001.npz.tmp").symlink_to("/dev/full")
    flags = ["--output", output, "--env", SMOKE_ENV, "--episodes", "2", "--warmup-steps", "500", "--steps-per-update",
             "100", "--batch-size", "16", "--policy-layers", "16", "16", "--critic-layers", "16", "16"]
    line = one_sentence(*run_main(collect, *flags), f"cannot write {parts / 'run000_episode000001.npz'}: No space "
                        "left on device", "collect.py")
    assert line.endswith("what was finished is kept: make room and rerun the command to continue"), line
    assert sorted(p.name for p in parts.iterdir()) == ["collection.json", "run000_episode000000.npz",
                                                       "run000_learner.pt"]  # the flags it started with: kept too
    status, stderr = run_main(collect, *flags)
    assert status == 0, stderr
    with np.load(output) as data:
        assert np.unique(data["episode_id"]).tolist() == [0, 1]


def test_a_second_collect_py_on_the_same_dataset_waits_then_continues(tmp_path):
    """Five seeds of a learning script started at once, none with --dataset, each start collect.py for the same
    default data: while one writes it (here a process holding its folder's lock), another says so and waits,
    writing nothing; when the first ends, it continues from what is there."""
    output = tmp_path / "data.npz"
    parts = output.with_suffix(".episodes")
    parts.mkdir()
    with held_by_another_process(parts):
        waiting = subprocess.Popen([sys.executable, str(ROOT / "collect.py"), "--output", str(output), "--env",
                                    SMOKE_ENV, "--episodes", "1", "--warmup-steps", "500", "--policy-layers", "16",
                                    "16", "--critic-layers", "16", "16"], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert waiting.stdout.readline().startswith(f"Another collect.py is writing {parts}: waiting for it")
        time.sleep(1)
        assert waiting.poll() is None and list(parts.iterdir()) == []
    stdout, stderr = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, stderr
    with np.load(output) as data:
        assert np.unique(data["episode_id"]).tolist() == [0]


def test_minari_io_stops_in_one_line_on_ctrl_c(monkeypatch):
    import minari_io

    def interrupted(args):
        raise KeyboardInterrupt

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
            minari_io.main(interrupted, None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert exit_.value.code == 130 and stderr.getvalue().strip() == "test_user_errors.py: stopped" or \
        stderr.getvalue().strip().endswith(": stopped"), stderr.getvalue()


@pytest.mark.slow
def test_ctrl_c_while_the_default_data_is_made_stops_both_and_the_rerun_continues_it(tmp_path):
    """The main job with no dataset runs collect.py; Ctrl-C in the terminal (SIGINT to the whole process group):
    one line from each, no traceback; the rerun continues the stopped collection instead of training on it, and a
    SIGTERM to the main job alone also ends its collect.py."""
    command = [sys.executable, str(ROOT / "abm_mpo.py"), "--env", SMOKE_ENV, *tiny(abm_mpo)]
    episodes = tmp_path / "datasets" / f"{SMOKE_ENV}.episodes"

    def start():
        return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    process, deadline = start(), time.time() + 240
    while not list(episodes.glob("run*_episode*.npz")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if "abm_mpo.py" in line] == ["abm_mpo.py: stopped"], stderr
    assert "rerun the command to continue" in stdout
    process = start()
    announcement = process.stdout.readline()  # printed just before collect.py starts
    assert "(its collection was stopped): generating it" in announcement, announcement
    time.sleep(2)
    process.send_signal(signal.SIGTERM)  # the main job alone: its child must not go on without it
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    for _ in range(100):
        collectors = collect_processes_in(tmp_path)
        if not collectors:
            break
        time.sleep(0.05)
    assert not collectors, "collect.py outlived the main job"


def collect_processes_in(folder: Path) -> list:
    """The collect.py processes running in `folder` (the main job starts it with a path relative to its cwd)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            if "collect.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace") and \
                    os.path.realpath(f"/proc/{pid}/cwd") == str(folder.resolve()):
                found.append(pid)
    return found


REAL_ROBOT_FLAGS = [
    (["--episodes", "0"], "--episodes must be positive, not 0"),
    (["--seed", "-2"], "--seed must be zero or more"),
    (["--deadline", "0"], "--deadline must be positive"),
    (["--deadline", "nan"], "--deadline must be positive"),
    (["--backend", "ros"], "--backend must be sim or intera, not 'ros'"),
    (["--task", "juggle"], "the policy knows the tasks"),
]


@pytest.mark.parametrize("flags,phrase", REAL_ROBOT_FLAGS, ids=[" ".join(f) for f, _ in REAL_ROBOT_FLAGS])
def test_real_robot_py_says_one_sentence_for_a_bad_flag_before_the_arm_moves(flags, phrase, tmp_path):
    import real_robot
    import sawyer_env

    spec = {"env": "sawyer", "obs_dim": sawyer_env.OBS_DIM, "act_dim": sawyer_env.ACT_DIM,
            "tasks": list(sawyer_env.ALL_TASKS), "action_low": [-1.0] * sawyer_env.ACT_DIM,
            "action_high": [1.0] * sawyer_env.ACT_DIM, "env_action_low": sawyer_env.ACTION_LOW.tolist(),
            "env_action_high": sawyer_env.ACTION_HIGH.tolist()}
    net = abm_mpo.GaussianPolicy(sawyer_env.OBS_DIM, sawyer_env.ACT_DIM, (8,), len(sawyer_env.ALL_TASKS), 1)
    abm_mpo.export_policy(abm_mpo.ActingPolicy(net, spec), spec, tmp_path)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_:
        real_robot.main(tyro.cli(real_robot.Args, args=["--policy", str(tmp_path / "policy.pt2"), *flags]))
    line = str(exit_.value.code)
    assert line.startswith("real_robot.py: error: ") and phrase in line and "\n" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.pt2"]  # no log, no results file
