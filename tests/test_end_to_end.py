"""End to end: collect.py and abm_mpo.py as a user runs them, the run directory, resume, and
one-sentence errors for bad input. Budgets are tiny; learning itself is tested elsewhere."""

import contextlib
import csv
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import abm_mpo
import bm_mpo
from tests.helpers import ROOT, SMOKE_ENV, TEST_COMPILE, TEST_DEVICE, write_random_dataset

TINY = ["--batch-size", "16", "--num-action-samples", "4", "--policy-layers", "32", "32",
        "--critic-layers", "32", "32", "--eval-episodes", "1", "--device", TEST_DEVICE,
        "--compile", TEST_COMPILE]


def run_script(script, *arguments, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no MUJOCO_GL: training needs no OpenGL
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, arguments)], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=600)


def tiny_args(module, dataset, run_dir, **overrides):
    settings = dict(env=SMOKE_ENV, dataset=str(dataset), run_dir=str(run_dir), batch_size=16, num_action_samples=4,
                    policy_layers=(32, 32), critic_layers=(32, 32), eval_episodes=1, device=TEST_DEVICE,
                    compile=TEST_COMPILE, total_steps=8, eval_every=4, checkpoint_every=4, target_update_period=3)
    return module.Args(**{**settings, **overrides})


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_smoke_collect_then_abm_mpo_writes_the_whole_run_directory(tmp_path):
    dataset = tmp_path / "cartpole.npz"
    collected = run_script("collect.py", "--env", SMOKE_ENV, "--output", dataset, "--episodes", "2",
                           "--warmup-steps", "500", "--steps-per-update", "100", "--batch-size", "32",
                           "--policy-layers", "32", "32", "--critic-layers", "32", "32")
    assert collected.returncode == 0, collected.stderr
    run_dir = tmp_path / "run"
    result = run_script("abm_mpo.py", "--env", SMOKE_ENV, "--dataset", dataset, "--run-dir", run_dir,
                        "--total-steps", "6", "--eval-every", "3", "--checkpoint-every", "3", *TINY)
    assert result.returncode == 0, result.stderr

    config = json.loads((run_dir / "config.json").read_text())
    assert config["script"] == "abm_mpo" and config["args"]["prior"] == "abm"
    assert config["dataset"] == str(dataset)
    assert config["dataset_sha256"] == hashlib.sha256(dataset.read_bytes()).hexdigest()
    assert {"torch", "numpy", "mujoco", "gymnasium"} <= set(config["versions"])
    rows = read_metrics(run_dir)
    assert [int(row["step"]) for row in rows] == [3, 6]
    for column in ("eval/return", "eval/prior_return", "losses/critic", "losses/prior", "losses/policy",
                   "charts/temperature", "charts/kl_mean", "charts/kl_std", "charts/abm_accepted_fraction"):
        assert all(row[column] != "" for row in rows), column
    # the logged return is the exported final policy's return from the evaluation seed (seed + 100)
    extra = {"policy.json": ""}
    policy = torch.export.load(str(run_dir / "policy.pt2"), extra_files=extra).module()
    act = lambda observation: policy(torch.as_tensor(observation, dtype=torch.float32)[None],  # noqa: E731
                                     torch.zeros(1, dtype=torch.int64))[0].detach().numpy()
    replayed = abm_mpo.evaluate(act, abm_mpo.make_env(SMOKE_ENV), 1, seed=100)[0]
    assert float(rows[-1]["eval/return"]) == pytest.approx(replayed, rel=1e-4)
    assert list(run_dir.glob("events.out.tfevents.*"))
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and {"agent", "optimizer", "rng", "spec"} <= set(state)
    assert not list(run_dir.glob("*.tmp"))
    policy = torch.export.load(str(run_dir / "policy.pt2")).module()  # exported from the run's device, acts on a CPU
    action = policy(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64))
    assert action.shape == (3, 1) and torch.isfinite(action).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    # Final return = mean of the last 10% of evaluations, here the last one of two.
    assert summary["evaluations"] == 2
    assert summary["final/return"] == pytest.approx(float(rows[-1]["eval/return"]))
    assert summary["final/prior_return"] == pytest.approx(float(rows[-1]["eval/prior_return"]))
    with np.load(dataset) as archive:
        episode_returns = np.bincount(archive["episode_id"], weights=archive["reward"][:, 0])
    assert summary["best_episode_return_in_dataset"][SMOKE_ENV] == pytest.approx(episode_returns.max(), rel=1e-5)


@pytest.mark.slow
def test_resume_continues_from_the_saved_step_exactly(random_dataset, tmp_path):
    straight = tiny_args(abm_mpo, random_dataset, tmp_path / "straight")
    quiet(abm_mpo.train, straight)
    first_half = tiny_args(abm_mpo, random_dataset, tmp_path / "resumed", total_steps=4)
    quiet(abm_mpo.train, first_half)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 4
    resumed = tiny_args(abm_mpo, random_dataset, None, resume=str(tmp_path / "resumed"))
    quiet(abm_mpo.train, resumed)

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert b["step"] == 8
    for name, tensor in a["agent"].items():
        assert torch.equal(tensor, b["agent"][name]), name
    rows_a, rows_b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in rows_b] == ["4", "8"]
    for row_a, row_b in zip(rows_a, rows_b):
        assert {k: v for k, v in row_a.items() if k != "charts/updates_per_second"} == \
               {k: v for k, v in row_b.items() if k != "charts/updates_per_second"}


@pytest.mark.slow
def test_resume_with_only_the_run_dir_continues_with_the_saved_configuration(random_dataset, tmp_path):
    quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, tmp_path / "straight"))
    quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, tmp_path / "resumed", total_steps=4))
    quiet(abm_mpo.train, abm_mpo.Args(resume=str(tmp_path / "resumed"), total_steps=8))  # every other flag: saved
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert b["step"] == 8 and all(torch.equal(a["agent"][name], b["agent"][name]) for name in a["agent"])


@pytest.mark.slow
def test_bm_mpo_equals_abm_mpo_with_bm_prior(random_dataset, tmp_path):
    quiet(bm_mpo.train, tiny_args(bm_mpo, random_dataset, tmp_path / "bm_mpo"))
    quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, tmp_path / "abm_mpo", prior="bm"))
    rows_bm, rows_abm = read_metrics(tmp_path / "bm_mpo"), read_metrics(tmp_path / "abm_mpo")
    assert len(rows_bm) == len(rows_abm) == 2
    for row_bm, row_abm in zip(rows_bm, rows_abm):
        for key in row_bm:
            if key.startswith(("losses/", "eval/", "charts/kl", "charts/temperature", "charts/q")):
                assert row_bm[key] == row_abm[key], key


def test_the_bm_prior_does_not_depend_on_the_critic(tmp_path):
    """Eq. 3 never reads Q, and the batches and samples come from one seeded stream whatever the critic does: the BM
    prior of a run is the same bit for bit under another target period (results/cpu-critic's BM priors equal
    results/cpu's, a check that those grids differ only in the critic), while the ABM prior (Eq. 4 reads V) is not.
    Rewards of both signs: with the random dataset's rewards in [0, 1] a fresh critic's V is too small for Eq. 4 to
    reject any snippet, and the ABM prior would be the BM prior too (the cpu grid's case, README "Results")."""
    dataset = write_random_dataset(tmp_path / "signed.npz")
    with np.load(dataset) as stored:
        arrays = {**stored, "reward": stored["reward"] - 0.5}
    np.savez(dataset, **arrays)

    def prior(name, **overrides):
        quiet(abm_mpo.train, tiny_args(abm_mpo, dataset, tmp_path / name, total_steps=12, eval_every=12,
                                       checkpoint_every=12, **overrides))
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["agent"]

    for kind, same in (("bm", True), ("abm", False)):
        slow, fast = (prior(f"{kind}-{period}", prior=kind, target_update_period=period, learning_rate=1e-2)
                      for period in (6, 1))  # a fast-moving critic, copied once or every update
        assert not torch.equal(slow["critic.net.torso.0.weight"], fast["critic.net.torso.0.weight"])
        priors = [key for key in slow if key.startswith("prior.")]
        assert priors and all(torch.equal(slow[key], fast[key]) for key in priors) == same, kind


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(random_dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, run_dir, total_steps=4))
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    metrics = (run_dir / "metrics.csv").read_text()

    real_critic_loss = abm_mpo.critic_loss

    def poisoned(*args, **kwargs):
        loss, info = real_critic_loss(*args, **kwargs)
        return loss * float("nan"), {**info, "losses/critic": loss.detach() * float("nan")}

    monkeypatch.setattr(abm_mpo, "critic_loss", poisoned)
    with pytest.raises(abm_mpo.UserError, match=r"non-finite loss \['losses/critic'\] at update 5") as error:
        quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, None, resume=str(run_dir)))
    assert "\n" not in str(error.value) and "checkpoint.pt keeps the last good state" in str(error.value)
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint
    assert (run_dir / "metrics.csv").read_text() == metrics


def one_line_error(result, phrase):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["abm_mpo.py", "bm_mpo.py", "abm_svg.py", "bcq.py", "bear.py"])
def test_unknown_env_is_one_sentence(script, tmp_path):
    result = run_script(script, "--env", "no-such-env", "--run-dir", tmp_path / "run", *TINY[-2:])
    one_line_error(result, "unknown env 'no-such-env'")
    assert not (tmp_path / "run").exists()  # checked before anything is written


@pytest.mark.slow
def test_bad_dataset_inputs_are_one_sentence(tmp_path):
    result = run_script("abm_mpo.py", "--env", SMOKE_ENV, "--dataset", tmp_path / "absent.npz",
                        "--run-dir", tmp_path / "a", *TINY)
    one_line_error(result, "does not exist")
    other_env = write_random_dataset(tmp_path / "other.npz", obs_dim=3, act_dim=2)
    result = run_script("abm_mpo.py", "--env", SMOKE_ENV, "--dataset", other_env, "--run-dir", tmp_path / "b", *TINY)
    one_line_error(result, "is it for another env")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file at all")
    result = run_script("bm_mpo.py", "--env", SMOKE_ENV, "--dataset", corrupt, "--run-dir", tmp_path / "c", *TINY)
    one_line_error(result, "cannot be read")


@pytest.mark.slow
def test_unwritable_run_dir_is_one_sentence(random_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    result = run_script("abm_mpo.py", "--env", SMOKE_ENV, "--dataset", random_dataset,
                        "--run-dir", blocker / "run", *TINY)
    one_line_error(result, "is not writable")
    assert blocker.read_text() == "keep me"


@pytest.mark.slow
def test_resume_refuses_another_script_or_config(random_dataset, tmp_path):
    run_dir = tmp_path / "run"
    quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, run_dir, total_steps=2))
    checkpoint = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(bm_mpo.UserError, match="it is a run of abm_mpo, not bm_mpo"):
        quiet(bm_mpo.train, tiny_args(bm_mpo, random_dataset, None, resume=str(run_dir)))
    with pytest.raises(abm_mpo.UserError, match="--batch-size was 16"):
        quiet(abm_mpo.train, tiny_args(abm_mpo, random_dataset, None, resume=str(run_dir), batch_size=8))
    assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint


def test_a_run_says_once_how_long_it_will_take(random_dataset, tmp_path):
    """Issue 20: the main job's 1M updates are days on a CPU; after its first updates a run says in one line, also
    in a log file where no progress bar is drawn, how long the rest takes here, and (when it is hours) which
    command gives a CPU-sized run worth looking at."""
    process = run_script("bm_mpo.py", "--env", SMOKE_ENV, "--dataset", random_dataset, "--total-steps", "70",
                         "--eval-every", "70", "--eval-max-steps", "5", *TINY, "--run-dir", tmp_path / "short")
    assert process.returncode == 0, process.stderr[-2000:]
    lines = [line for line in process.stderr.splitlines() if "updates/s here" in line]
    assert len(lines) == 1 and "the 10 updates left take about 0 min" in lines[0], process.stderr[-2000:]
    assert "--preset cpu" not in lines[0]  # minutes, not hours: no advice
    # A long run (checked through the Logger with a fake clock): 40 updates in 1 s, 9,999,940 left.
    logger_line = estimate_line(bm_mpo, total=10_000_000, rate_seconds=1.0)
    assert logger_line.count("\n") == 1 and "40.0 updates/s here, so the 9,999,940 updates left take about 69.4 h" \
        in logger_line and "python benchmarks/reproduce.py --preset cpu" in logger_line
    assert "updates left take about 25 min" in estimate_line(bm_mpo, total=60_060, rate_seconds=1.0)  # 60,000 at 40/s


def estimate_line(module, total: int, rate_seconds: float) -> str:
    """The Logger's estimate for a run of `total` updates whose updates 20-60 took `rate_seconds` (40 updates/s)."""
    import time as clock
    from unittest import mock

    import torch

    logger = object.__new__(module.Logger)
    logger.total, logger.seen, logger.seen_clock, logger.count, logger.sums = total, 0, 0.0, 0, {}
    logger.bad_step, logger.bad, logger.step = torch.zeros((), dtype=torch.long), False, 0
    logger.progress = mock.Mock(disable=False)  # a terminal: the bar, no progress lines
    stderr = io.StringIO()
    now = [1000.0]
    with mock.patch.object(clock, "time", lambda: now[0]), mock.patch("sys.stderr", stderr):
        for step in range(1, 61):
            if step == 60:
                now[0] += rate_seconds
            logger.record(step, {"losses/x": torch.tensor(1.0)})
    return stderr.getvalue()


@pytest.mark.parametrize("damage", ["garbage", "old format"])
def test_a_checkpoint_that_cannot_be_resumed_is_one_sentence(random_dataset, tmp_path, damage):
    """Seen when the redesign added buffers to the networks: --resume of a run written by the earlier code died in a
    25-line traceback from load_state_dict; a damaged file did the same."""
    run_dir = tmp_path / "run"
    first = run_script("bm_mpo.py", "--env", SMOKE_ENV, "--dataset", random_dataset, "--total-steps", "4",
                       "--eval-every", "4", "--eval-max-steps", "5", *TINY, "--run-dir", run_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoint = run_dir / "checkpoint.pt"
    if damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint")
    else:
        import torch

        state = torch.load(checkpoint, weights_only=True)
        state["agent"] = {k: v for k, v in state["agent"].items() if "input_mean" not in k}
        torch.save(state, checkpoint)
    before = checkpoint.read_bytes()
    resumed = run_script("bm_mpo.py", "--resume", run_dir, "--total-steps", "8")
    assert resumed.returncode == 1 and "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
    message = [line for line in resumed.stderr.splitlines() if "error:" in line]
    assert len(message) == 1 and "cannot be resumed" in message[0] and "fresh --run-dir" in message[0]
    assert checkpoint.read_bytes() == before  # nothing overwritten
