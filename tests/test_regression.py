"""Nothing learned may change: a short fixed-seed run of every learning script gives the numbers recorded in
tests/regression.json: every metrics.csv value except the timing column, and the sum of every checkpointed
weight tensor of the agent. Recorded once from the redesign of issue 21 (one torch sampler: its random stream
differs from the numpy sampler of the fixtures before it, so they were re-recorded; that learning did not change
in distribution is shown by tests/test_mechanism.py, the two-mode data checks and 3-seed walker runs before and
after, README "Testing"). Equivalent command line, OMP_NUM_THREADS=1, e.g.
  python abm_mpo.py --env cartpole-balance --dataset random.npz --batch-size 16 --policy-layers 32 32
      --critic-layers 32 32 --eval-episodes 1 --eval-max-steps 30 --device cpu --eval-every 4
      --checkpoint-every 4 --seed 3 --num-action-samples 4 --target-update-period 3 --total-steps 8
on tests.helpers.write_random_dataset(random.npz) (bcq: no --policy-layers, --num-action-samples or
--target-update-period, with --encoder-layers/--decoder-layers/--perturbation-layers 32 32). The tolerance
(1e-5 relative) allows another CPU's floating-point rounding (AVX2 or AVX-512), not another algorithm: a
changed target copy period, loss term or sampling order moves these numbers by far more."""

import contextlib
import csv
import io
import json

import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
from tests.helpers import ROOT, SMOKE_ENV, write_random_dataset

RECORDED = json.loads((ROOT / "tests" / "regression.json").read_text())
COMMON = dict(env=SMOKE_ENV, batch_size=16, critic_layers=(32, 32), eval_episodes=1, eval_max_steps=30,
              device="cpu", eval_every=4, checkpoint_every=4, seed=3, total_steps=8)
MPO = dict(policy_layers=(32, 32), num_action_samples=4, target_update_period=3)
RUNS = {
    "abm_mpo": (abm_mpo, MPO),
    "abm_mpo_none": (abm_mpo, {**MPO, "prior": "none"}),
    "abm_mpo_eps0": (abm_mpo, {**MPO, "epsilon": 0.0, "snippet_length": 10}),  # recorded when N was 10 for eps 0 too
    "bm_mpo": (bm_mpo, MPO),
    "abm_svg": (abm_svg, MPO),
    "bcq": (bcq, dict(encoder_layers=(32, 32), decoder_layers=(32, 32), perturbation_layers=(32, 32))),
    "bear": (bear, dict(policy_layers=(32, 32), target_update_period=3)),
    "bear_mmd": (bear, dict(policy_layers=(32, 32), target_update_period=3, divergence="mmd")),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_fixed_seed_run_matches_the_recorded_numbers(name, tmp_path):
    module, overrides = RUNS[name]
    dataset = write_random_dataset(tmp_path / "random.npz")
    args = module.Args(**COMMON, **overrides, dataset=str(dataset), run_dir=str(tmp_path / "run"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        module.train(args)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [{key: float(value) for key, value in row.items() if key != "charts/updates_per_second" and value != ""}
                for row in csv.DictReader(handle)]
    expected = RECORDED[name]
    assert [row.keys() for row in rows] == [row.keys() for row in expected["metrics"]]
    for row, recorded in zip(rows, expected["metrics"]):
        assert row == pytest.approx(recorded, rel=1e-5, abs=1e-6)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["agent"]
    sums = {key: float(value.double().sum()) for key, value in state.items() if value.is_floating_point()}
    assert sums.keys() == expected["weights"].keys()
    assert sums == pytest.approx(expected["weights"], rel=1e-5, abs=1e-5)
