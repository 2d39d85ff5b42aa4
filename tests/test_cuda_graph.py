"""The whole update as one CUDA graph (`record_updates`, `--cuda-graph`), checked on the CPU with
tests.helpers.EmulatedCuda: it records a step's aten ops as a CUDA graph records its kernels and replays them
without the step's Python. A script's training run with every update after the warm-up replayed must equal its
eager run exactly (metrics.csv and checkpoint.pt): the replayed step then reads nothing from Python that changes
between updates (a step counter, a value read off a tensor), takes no host sync, draws its batches and noise anew
from the run's generator each update, and hands the logger its metrics before the next replay overwrites them.
On a GPU (`ABM_TEST_DEVICE=cuda`), the last test records real CUDA graphs."""

import contextlib
import csv
import io

import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
from tests.helpers import SMOKE_ENV, TEST_DEVICE, EmulatedCuda, write_random_dataset

COMMON = dict(env=SMOKE_ENV, batch_size=16, critic_layers=(32, 32), eval_episodes=1, eval_max_steps=20,
              device="cpu", eval_every=5, checkpoint_every=5, seed=1, total_steps=10)
MPO = dict(policy_layers=(32, 32), num_action_samples=4, target_update_period=3)
RUNS = {
    "abm_mpo": (abm_mpo, MPO),
    "abm_mpo_none": (abm_mpo, {**MPO, "prior": "none"}),
    "abm_mpo_eps0": (abm_mpo, {**MPO, "epsilon": 0.0}),
    "bm_mpo": (bm_mpo, MPO),
    "abm_svg": (abm_svg, MPO),
    "bcq": (bcq, dict(encoder_layers=(32, 32), decoder_layers=(32, 32), perturbation_layers=(32, 32))),
    # warm-up ends at update 6 of 10: one graph for the warm-up phase (its Q term off), one after
    "bear": (bear, dict(policy_layers=(32, 32), target_update_period=3, warmup_steps=6)),
}


def train(module, overrides: dict, run_dir, dataset, cuda=None, seen: dict = None) -> tuple[list, dict, str]:
    """One tiny run on the CPU; with `cuda`, record_updates acts as on a GPU with that stand-in (and `seen` gets
    the run's agent). Returns the metrics rows (timing column dropped), the checkpointed agent and what the run
    wrote to stderr."""
    if cuda is not None:
        original = module.record_updates

        def record_updates(step, agent, generator, args, device):
            (seen if seen is not None else {})["agent"] = agent
            return original(step, agent, generator, args, torch.device("cuda"), cuda=cuda)
        module.record_updates = record_updates
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            module.train(module.Args(**{**COMMON, **overrides}, dataset=str(dataset), run_dir=str(run_dir)))
    finally:
        if cuda is not None:
            module.record_updates = original
    with open(run_dir / "metrics.csv") as handle:
        rows = [{key: value for key, value in row.items() if key != "charts/updates_per_second"}
                for row in csv.DictReader(handle)]
    return rows, torch.load(run_dir / "checkpoint.pt", weights_only=True)["agent"], stderr.getvalue()


def assert_same_run(first, second) -> None:
    (rows, agent, _), (other_rows, other_agent, _) = first, second
    assert rows == other_rows  # every logged value, as text: bit for bit
    assert agent.keys() == other_agent.keys()
    for key, value in agent.items():
        assert torch.equal(value, other_agent[key]), key


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_replaying_its_recorded_update_equals_the_eager_run(name, tmp_path):
    module, overrides = RUNS[name]
    dataset = write_random_dataset(tmp_path / "random.npz")
    cuda = EmulatedCuda()
    eager = train(module, overrides, tmp_path / "eager", dataset)
    graphed = train(module, overrides, tmp_path / "graphed", dataset, cuda)
    assert_same_run(eager, graphed)
    phases = 2 if module is bear else 1  # BEAR: one graph per phase, each after its own 3 eager updates
    assert cuda.captures == phases and len(cuda.generators) == phases
    assert cuda.replays == COMMON["total_steps"] - 3 * phases
    assert graphed[2] == ""  # nothing on stderr: no failed recording


def test_the_emulation_catches_a_step_that_needs_its_python_each_update(tmp_path):
    """The check above can fail: a step that reads a Python counter replays the first value forever."""
    calls, weight = [0], torch.zeros(())

    def step():
        calls[0] += 1
        weight.add_(calls[0])  # a Python number baked into the recorded op
        return {"weight": weight}

    cuda = EmulatedCuda()
    replayed = abm_mpo.record_updates(step, torch.nn.Linear(1, 1), torch.Generator(),
                                      abm_mpo.Args(), torch.device("cuda"), cuda=cuda)
    for _ in range(6):
        replayed()
    assert float(weight) == 1 + 2 + 3 + 4 + 4 + 4  # eager would give 21: the recording froze the 4
    with pytest.raises(RuntimeError, match="host sync"):  # and a host sync fails the recording
        with cuda.graph(cuda.CUDAGraph()):
            float(weight * 2)


def test_a_failed_recording_is_one_line_and_the_run_goes_on_eager(tmp_path):
    dataset = write_random_dataset(tmp_path / "random.npz")
    module, overrides = RUNS["abm_mpo"]
    eager = train(module, overrides, tmp_path / "eager", dataset)
    failed = train(module, overrides, tmp_path / "failed", dataset, EmulatedCuda(fail_on_capture=True))
    assert_same_run(eager, failed)
    lines = failed[2].strip().splitlines()
    assert len(lines) == 1 and "recording the update as a CUDA graph failed" in lines[0], failed[2]


def test_a_recording_that_fails_while_the_critic_is_frozen_leaves_it_trainable(tmp_path, monkeypatch):
    """BCQ freezes its critic around the actor's loss; a recording that fails there must not leave it frozen,
    or the eager updates that follow would stop training the critic."""
    dataset = write_random_dataset(tmp_path / "random.npz")
    module, overrides = RUNS["bcq"]
    eager = train(module, overrides, tmp_path / "eager", dataset)
    cuda, actor_loss = EmulatedCuda(), bcq.actor_step_loss

    def fails_when_recorded(*inputs):
        if cuda.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return actor_loss(*inputs)

    monkeypatch.setattr(bcq, "actor_step_loss", fails_when_recorded)
    seen = {}
    failed = train(module, overrides, tmp_path / "failed", dataset, cuda, seen)
    assert "recording the update as a CUDA graph failed" in failed[2] and cuda.captures == 1
    assert all(p.requires_grad for p in seen["agent"].critic.parameters())
    # (On the CPU the failed recording ran the step up to the actor's loss, which CUDA would not: so this run's
    # numbers are not the eager run's, unlike a recording that fails before its first op, tested above.)
    assert len(failed[0]) == len(eager[0]) and failed[0][-1].keys() == eager[0][-1].keys()


def test_a_run_resumes_with_the_other_cuda_graph_setting(tmp_path):
    """--cuda-graph is how an update is launched, not what it computes: a run may resume with it switched."""
    dataset = write_random_dataset(tmp_path / "random.npz")
    module, overrides = RUNS["abm_mpo"]
    train(module, {**overrides, "total_steps": 5}, tmp_path / "run", dataset)
    args = module.Args(resume=str(tmp_path / "run"), cuda_graph=False, total_steps=10)
    module.load_saved_config(args, "abm_mpo")  # raises UserError for a setting that may not change
    assert args.cuda_graph is False and args.batch_size == COMMON["batch_size"]


def test_no_recording_on_a_cpu_or_with_no_cuda_graph():
    step = lambda: {}  # noqa: E731
    assert abm_mpo.record_updates(step, torch.nn.Linear(1, 1), torch.Generator(), abm_mpo.Args(),
                                  torch.device("cpu")) is step
    assert abm_mpo.record_updates(step, torch.nn.Linear(1, 1), torch.Generator(), abm_mpo.Args(cuda_graph=False),
                                  torch.device("cuda"), cuda=EmulatedCuda()) is step


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="records real CUDA graphs: ABM_TEST_DEVICE=cuda on a GPU")
@pytest.mark.parametrize("name,compile", [("abm_mpo", "auto"), ("bcq", "off"), ("bear", "off")])
def test_on_cuda_a_recorded_run_repeats_exactly_and_keeps_the_unrecorded_runs_columns(name, compile, tmp_path):
    """Real graphs (ABM+MPO with its losses compiled inside, as --compile auto runs on CUDA): two recorded runs
    of a seed agree exactly and record without a failure. Against --no-cuda-graph only the columns and finite
    values are compared: a registered generator's random stream is offset differently once replays start."""
    module, overrides = RUNS[name]
    dataset = write_random_dataset(tmp_path / "random.npz")
    on_cuda = {**overrides, "device": "cuda", "compile": compile}
    first = train(module, on_cuda, tmp_path / "first", dataset)
    second = train(module, on_cuda, tmp_path / "second", dataset)
    plain = train(module, {**on_cuda, "cuda_graph": False, "compile": "off"}, tmp_path / "plain", dataset)
    assert_same_run(first, second)
    assert "CUDA graph failed" not in first[2] and "torch.compile failed" not in first[2], first[2]
    assert [row.keys() for row in first[0]] == [row.keys() for row in plain[0]]
    for row in first[0] + plain[0]:
        assert all(value not in ("nan", "inf", "-inf") for value in row.values()), row
