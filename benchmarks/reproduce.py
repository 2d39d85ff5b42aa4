"""Reproduce the paper's Table 6 (Control Suite) and Table 7 (Sawyer) grid with one command, on Ray.

    python benchmarks/reproduce.py --preset smoke|cpu|gpu|paper [--address ADDR] [--out results/<preset>]
                                   [--work runs/reproduce/<preset>]

1. Datasets the paper's way (§5.1, §5.2): one `collect.py` job per task and collecting seed (an
   online MPO run storing every transition; Sawyer: noisy scripted policies), then one job per
   task that merges the seeds' episode files into one dataset (`collect.py` with all the seeds,
   which finds every episode done and only writes the file).
2. The grid: every column of the preset on every task, data regime (`--dataset-episodes`, the first
   K episodes of each collecting run) and seed, one learning-script job each.
3. `<out>/table.md` in the paper's layout (mean +- std over seeds, the best episode in the data,
   the paper's number beside ours), `<out>/curves_*.png`, `<out>/runs/*` (each run's
   summary.json, metrics.csv, config.json and job.json, what the table is built from) and
   `<out>/manifest.json` (budgets, machine, wall time, every command).

Every job is a Ray task (`ray.init()` starts a local instance; `--address` joins a cluster whose
nodes see this checkout at the same path) with its CPU and GPU share declared, and runs the
script's own command line, exactly what a user would type, as a subprocess whose output goes to
`<work>/logs/<job>.log`. Reruns skip finished runs (summary.json present) and finished datasets,
continue interrupted runs with `--resume` (from their last checkpoint) and interrupted collections
(collect.py redoes its unfinished episode files). A failed job is reported with its command and log
and does not stop the others; jobs that needed its output are reported as skipped.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from best_episodes import write_best_episodes  # noqa: E402  (benchmarks/best_episodes.py)
from plot import collect_panels, plot_panels  # noqa: E402  (benchmarks/plot.py, the same drawing for users)

ROOT = Path(__file__).resolve().parent.parent

# The paper's numbers, transcribed from paper.md (Appendix D.3). Table 6: final episode return on the
# Control Suite when learning from 10k episodes (mean over the final 10% of evaluations). Columns:
# ABM+MPO, its prior, BM+MPO, its prior, MPO, ABM+SVG, BM+SVG, SVG, BCQ, BEAR, ABM (eps = 0, |tau| = 2).
PAPER_TABLE_6_COLUMNS = ("ABM+MPO", "ABM+MPO prior", "BM+MPO", "BM+MPO prior", "MPO", "ABM+SVG", "BM+SVG", "SVG",
                         "BCQ", "BEAR", "ABM eps=0")
PAPER_TABLE_6 = {  # Table 6, 10k-episode regime
    "cheetah": (907.4, 888.7, 891.8, 465.3, 496.2, 920.7, 924.1, 726.1, 914.9, 843, 884.3),
    "hopper": (539.3, 454.8, 453.8, 237.2, 599.2, 651.6, 634.7, 544.1, 341.2, 425, 451.8),
    "quadruped": (786.6, 733.4, 710.8, 398.8, 465.6, 856.5, 818.7, 472.7, 621.4, 674, 733.6),
    "walker": (843.0, 835.9, 817.7, 684.8, 891.9, 896.5, 895.6, 891.0, 869.5, 814, 838.1),
}
# Table 7: returns per simulated Sawyer task (all seven learned together, one multi-task run).
PAPER_TABLE_7_COLUMNS = ("ABM+MPO", "ABM+MPO prior", "BM+MPO", "BM+MPO prior", "MPO", "BCQ", "BEAR")
PAPER_TABLE_7 = {
    "reach": (182.3, 180.8, 178.3, 172.9, 178.3, 172.6, 176.9),
    "grasp": (123.7, 111.7, 114.6, 89.1, 86.0, 104.7, 116.3),
    "lift": (147.1, 144.9, 144.2, 122.5, 121.4, 126.4, 137.9),
    "place_wide": (137.9, 122.3, 124.4, 67.2, 98.0, 68.0, 93.2),
    "place_narrow": (126.3, 106.1, 111.3, 46.7, 65.3, 58.3, 64.1),
    "stack": (109.9, 78.8, 86.9, 20.1, 17.5, 39.3, 67.8),
    "stack_and_leave": (77.9, 47.3, 53.5, 3.5, 0.2, 5.2, 34.6),  # "Full Task"
}


@dataclass(frozen=True)
class Column:
    """A column of Table 6/7: a learning script and its flags; `prior` adds the prior's own return."""

    script: str
    flags: tuple = ()
    prior: bool = False


COLUMNS = {
    "ABM+MPO": Column("abm_mpo.py", ("--prior", "abm"), prior=True),
    "BM+MPO": Column("abm_mpo.py", ("--prior", "bm"), prior=True),
    "MPO": Column("abm_mpo.py", ("--prior", "none")),
    # The SVG priors are not in Table 6; their own returns are shown beside the MPO priors' (the same Eq. 3/4 loss).
    "ABM+SVG": Column("abm_svg.py", ("--prior", "abm"), prior=True),
    "BM+SVG": Column("abm_svg.py", ("--prior", "bm"), prior=True),
    "SVG": Column("abm_svg.py", ("--prior", "none")),
    "BCQ": Column("bcq.py"),
    "BEAR": Column("bear.py", ("--divergence", "kl")),
    # The paper's "ABM (eps = 0, |tau| = 2)": no policy improvement, snippets of length 2.
    "ABM eps=0": Column("abm_mpo.py", ("--prior", "abm", "--epsilon", "0", "--snippet-length", "2")),
    # Not in the paper, which states no N for its ABM columns: Eq. 4's snippets as long as the discount's horizon,
    # 1 / (1 - gamma) = 100 (the cpu-snippets preset found them sharper than the scripts' default of 10 on cheetah).
    "ABM+MPO N=100": Column("abm_mpo.py", ("--prior", "abm", "--snippet-length", "100"), prior=True),
}
TABLE_6_ORDER = ("ABM+MPO", "BM+MPO", "MPO", "ABM+SVG", "BM+SVG", "SVG", "BCQ", "BEAR", "ABM eps=0")
# The tables' column order: Table 6's, with this project's own columns beside the paper's they vary.
COLUMN_ORDER = ("ABM+MPO", "ABM+MPO N=100", *TABLE_6_ORDER[1:])


@dataclass(frozen=True)
class Preset:
    """The grid's budgets. Control Suite: `control_tasks` x `regimes` x `control_columns` x `seeds`;
    Sawyer: `sawyer_tasks` (values of --task) x `sawyer_columns` x `seeds`."""

    name: str
    purpose: str
    control_tasks: tuple
    collect_episodes: int  # per collecting run (paper: 10,000)
    collect_seeds: tuple  # one collecting run each (paper: 5)
    collect_flags: tuple  # collect.py's learner: update ratio, batch
    regimes: tuple  # (label, K): learn from the first K episodes of each collecting run (None: all)
    control_columns: tuple
    sawyer_tasks: tuple
    sawyer_episodes: int  # per collecting seed
    sawyer_columns: tuple
    seeds: tuple  # seeds of the learning runs
    updates: int
    batch: int
    sawyer_updates: int
    sawyer_batch: int
    action_samples: int  # M
    eval_every: int
    eval_episodes: int
    sawyer_eval_every: int
    num_cpus: float = 1.0  # Ray resources per job
    num_gpus: float = 0.0
    extra_train_flags: tuple = ()  # flags added to every learning run (smoke: shortened evaluation episodes)
    datasets_from: str = ""  # learn from the data published in this folder (from the repository root); no collecting
    best_episodes: int = 0  # Control Suite: learn from only this many of the highest-return episodes (best_episodes.py)
    differences: tuple = ()  # settings that differ from the paper, named in the table header
    # Every run's final policy and prior also act this many episodes from start states shared by every run and seed
    # (the scripts' --final-eval-episodes, summary.json's final_eval): table.md's paired section. 0: none.
    final_eval_episodes: int = 0
    run_here: str = ""


PAPER_SCALE = ("Table 6: 10k episodes per task from each of 5 collecting runs, 1M updates, batch 512, M = 20; "
               "learning seeds not stated in the paper (5 here)")

PRESETS = {
    "smoke": Preset(
        name="smoke", purpose="plumbing check for tests and CI, seconds per job; its numbers mean nothing",
        control_tasks=("cartpole-balance",), collect_episodes=2, collect_seeds=(0,),
        collect_flags=("--steps-per-update", "50", "--warmup-steps", "500", "--batch-size", "32",
                       "--num-action-samples", "4", "--policy-layers", "32", "32", "--critic-layers", "32", "32"),
        regimes=(("full", None),), control_columns=("ABM+MPO", "BCQ"),
        sawyer_tasks=("lift",), sawyer_episodes=8, sawyer_columns=("ABM+MPO",),
        seeds=(0, 1), updates=20, batch=16, sawyer_updates=10, sawyer_batch=16, action_samples=4,
        eval_every=10, eval_episodes=1, sawyer_eval_every=10,
        extra_train_flags=("--eval-max-steps", "30"),
        differences=("every budget is tiny; cartpole-balance instead of the paper's tasks",
                     "evaluation episodes cut at 30 steps"),
        run_here="by tests/test_reproduce.py"),
    "cpu": Preset(
        name="cpu", purpose="a grid built to decide the paper's orderings on a 2-core CPU: cheetah (where Table 6's "
                            "columns differ most), two data regimes, 5 seeds, final returns over 10 evaluation "
                            "episodes; about 5 hours of the 2 cores, runnable in pieces (finished runs are kept in "
                            "results/cpu/runs and skipped; every run reads results/cpu/datasets/cheetah.npz)",
        # One collecting MPO run of 80 episodes (collect.py at 1 update per step, batch 64): returns 6.1 in the first
        # episode, 316.2 in the last, best 322.5 (results/cpu/collection.json). The file is published with the
        # results (12 MB) because collect.py is not bit-reproducible across machines: the first grid's data (best
        # 227.2) was not kept, and that grid (results/cpu-2026-12-04) cannot be continued.
        control_tasks=("cheetah",), collect_episodes=80, collect_seeds=(0,),
        collect_flags=("--steps-per-update", "1", "--batch-size", "64"),
        regimes=(("first 20", 20), ("all 80", None)),
        control_columns=("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR", "ABM eps=0"),
        sawyer_tasks=(), sawyer_episodes=0, sawyer_columns=(),
        # Pilot (runs/pilot, seed 0, all 80 episodes, batch 128, 5 episodes every 400 updates): ABM+MPO's policy
        # reached 112 at 400 updates and stayed within 84-147 to 5,600; MPO stayed at 0-9 to 8,000: flat by 2,000, it
        # seemed; the cpu-long preset found ABM+MPO, BM+MPO and both priors 2-4x higher at 40,000.
        seeds=(0, 1, 2, 3, 4), updates=4000, batch=128, sawyer_updates=0, sawyer_batch=0, action_samples=20,
        eval_every=200, eval_episodes=5, sawyer_eval_every=1, num_cpus=1.0,
        differences=("cheetah only (Table 6 has hopper, quadruped and walker too)",
                     "data: 1 collecting run of 80 episodes (paper: 5 runs of 10k), collect.py at 1 update per step "
                     "with batch 64; regimes: its first 20 episodes (paper: 2k) and all 80 (paper: 10k)",
                     "4,000 updates (paper: 1M), batch 128 (paper: 512); the pilot's curves looked flat from about 2,000, "
                     "but at 40,000 updates every column tried was 2-4x higher (cpu-long preset)",
                     "5 evaluation episodes every 200 updates (paper: 10 every 10k); final return = mean of the last "
                     "10% of evaluations, i.e. the last 2 (10 episodes)",
                     "columns ABM+SVG, BM+SVG and SVG left out (the gpu preset runs them)",
                     "BEAR's warm-up 2% of the updates, as the original's 20k of 1M (80 here)"),
        run_here="on this project's 2-core CPU, in pieces (results accumulate in results/cpu)"),
    "cpu-walker": Preset(
        name="cpu-walker", purpose="a subset that answers the question on a 2-core CPU in about 100 minutes "
                            "(at most 3 hours, over several runs of the command)",
        control_tasks=("walker",), collect_episodes=50, collect_seeds=(0,),
        # 1 update per environment step, batch 64: the walker learner goes from ~31 to ~200 within
        # ~23 episodes (measured); the default 1 per 8 steps does not learn in 44 episodes.
        collect_flags=("--steps-per-update", "1", "--batch-size", "64"),
        regimes=(("all 50", None),), control_columns=("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR"),
        # Sawyer reach, the densest task: lift was tried first and scored 0.0 for the ABM+MPO policy and
        # prior after 4,000 updates at batch 64 (seed 0, this preset's first run), as stack did after 6,000;
        # the sparse tasks need the gpu preset's budgets.
        sawyer_tasks=("reach",), sawyer_episodes=500, sawyer_columns=("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR"),
        seeds=(0, 1, 2), updates=4000, batch=128, sawyer_updates=3000, sawyer_batch=64, action_samples=20,
        eval_every=400, eval_episodes=3, sawyer_eval_every=400,
        differences=("walker only (no cheetah, hopper, quadruped), one data regime",
                     "data: 1 collecting run of 50 episodes (paper: 5 runs of 10k), collect.py at 1 update "
                     "per step with batch 64",
                     "4,000 updates walker / 3,000 Sawyer (paper: 1M), batch 128 walker / 64 Sawyer (paper: 512)",
                     "3 evaluation episodes every 400 updates (paper: 10 every 10k); final return = mean of "
                     "the last 10% of evaluations, i.e. the last one",
                     "Sawyer: one task learned alone (reach) from 500 noisy scripted episodes, not the "
                     "paper's learner data or seven-task run",
                     "columns ABM+SVG, BM+SVG, SVG and ABM eps=0 left out",
                     "BEAR's warm-up 2% of the updates, as the original's 20k of 1M (80 here)"),
        run_here="on this project's 2-core CPU (2026-11, results/cpu-walker: the first CPU table, which could not tell the columns apart)"),
    "gpu": Preset(
        name="gpu", purpose="the Table 6 columns on the cpu preset's cheetah data and Sawyer --task all, in the "
                            "results stage of one prepared call on one H200 with 16 CPU cores "
                            "(benchmarks/gpu_session.py sizes the updates from the speed it measured there)",
        # The cpu preset's cheetah dataset, carried to the GPU machine (gpu_session.py links it here).
        control_tasks=("cheetah",), collect_episodes=80, collect_seeds=(0,),
        collect_flags=("--steps-per-update", "1", "--batch-size", "64"),
        regimes=(("all 80", None),), control_columns=TABLE_6_ORDER,
        # Sawyer: collected on the GPU machine's CPUs (about a minute), all seven tasks learned together.
        sawyer_tasks=("all",), sawyer_episodes=60, sawyer_columns=("ABM+MPO", "BM+MPO", "MPO"),
        seeds=(0, 1, 2), updates=20000, batch=512, sawyer_updates=3000, sawyer_batch=512, action_samples=20,
        eval_every=2000, eval_episodes=5, sawyer_eval_every=1000, num_cpus=1.0, num_gpus=0.0625,
        differences=("cheetah only, with the cpu preset's data: 1 collecting run of 80 episodes (paper: 5 runs of "
                     "10k), collect.py at 1 update per step with batch 64",
                     "updates per run set by gpu_session.py from the measured speed (see the budgets line; "
                     "paper: 1M), batch 512 and M = 20 as in the paper; 10 evaluations of 5 episodes",
                     "Sawyer: 60 noisy scripted episodes (not the paper's learner data), fewer updates, 3 evaluations",
                     "BEAR's warm-up 2% of the updates, as the original's 20k of 1M"),
        run_here="benchmarks/gpu_session.py on one H200 (see results/gpu/session.md)"),
    "paper": Preset(
        name="paper", purpose="the paper's scale; documentation of what full reproduction takes, never run here",
        control_tasks=("cheetah", "hopper", "quadruped", "walker"), collect_episodes=10000,
        collect_seeds=(0, 1, 2, 3, 4), collect_flags=("--steps-per-update", "1"),
        regimes=(("2k", 2000), ("10k", None)), control_columns=TABLE_6_ORDER,
        sawyer_tasks=("all", "center", "corner"), sawyer_episodes=10000,
        sawyer_columns=("ABM+MPO", "BM+MPO", "MPO", "BCQ", "BEAR"),
        seeds=(0, 1, 2, 3, 4), updates=1_000_000, batch=512, sawyer_updates=1_000_000, sawyer_batch=512,
        action_samples=20, eval_every=10000, eval_episodes=10, sawyer_eval_every=10000, num_cpus=2.0, num_gpus=0.25,
        differences=("Sawyer data from noisy scripted policies, not the paper's learners",),
        run_here="never (1M updates per run: days per run on a CPU)"),
}
# Two tests of why the cpu grid tied the ABM and BM priors: its data, seeds and budgets, one thing changed each.
PRESETS["cpu-critic"] = dataclasses.replace(
    PRESETS["cpu"], name="cpu-critic",
    purpose="a test of why the cpu grid did not separate the ABM and BM priors: the same data, budgets and seeds, "
            "with the target networks copied every 20 updates instead of 200, so the critic gets 10x the Bellman "
            "backups in 4,000 updates; ABM+MPO and BM+MPO only, about 40 minutes of the 2 cores",
    # Why: in the cpu grid the mean Q on a batch was 2.3-2.4 after 4,000 updates (copies every 200) and still rising
    # by 0.5-0.6 per 1,000, while the data's mean discounted return-to-go is 11.4 (abm_filter.py). With V that
    # small, Eq. 4's advantage is mostly the snippet's (non-negative) rewards, and the ABM prior accepted 82-89% of
    # the data (charts/abm_accepted_fraction): nearly a BM prior. Pilot (runs/pilot-critic, seed 0, all 80, copies
    # every 20): Q 1.3 at 400 updates, 9.4 at 2,400; accepted fraction 0.84 -> 0.60.
    control_columns=("ABM+MPO", "BM+MPO"), extra_train_flags=("--target-update-period", "20"),
    datasets_from="results/cpu/datasets",
    # Added after its 20 runs had finished (their checkpoints still here): its grid left the priors' ordering to one
    # seed on all 80 episodes; 50 episodes from shared start states each, as cpu-long's.
    final_eval_episodes=50,
    differences=("the cpu preset's settings and data (results/cpu/datasets/cheetah.npz), and:",
                 "target networks copied every 20 updates (paper and cpu preset: 200)",
                 "columns ABM+MPO and BM+MPO (with their priors) only"),
    run_here="on this project's 2-core CPU (results/cpu-critic)")
# The first lines of the differences of the presets that change one thing of cpu-long's.
LONG_DATA = "the cpu preset's data (results/cpu/datasets/cheetah.npz), batch and M, and:"
LONG_BUDGETS = ("40,000 updates (paper: 1M), 5 evaluation episodes every 2,000; final return = mean of the last 2 "
                "evaluations (10 episodes)")
PRESETS["cpu-long"] = dataclasses.replace(
    PRESETS["cpu"], name="cpu-long",
    purpose="the other test of the cpu grid's tie between the ABM and BM priors: the paper's target copies every 200 "
            "updates, 10x the updates (40,000) so the critic gets the backups cpu-critic gives it in 4,000; ABM+MPO "
            "and BM+MPO on all 80 episodes, 5 seeds, about 130 minutes of the 2 cores (an ABM+MPO run takes about 33 "
            "minutes of one core, a BM+MPO run about 18)",
    regimes=(("all 80", None),), control_columns=("ABM+MPO", "BM+MPO"), seeds=(0, 1, 2, 3, 4), updates=40000,
    eval_every=2000, datasets_from="results/cpu/datasets",
    # Added after its runs (and those of cpu-filtered and cpu-snippets, which inherit it) had finished, their
    # checkpoints still here: the 50 shared start states of final_eval.py's cheetah evaluation, now in each table.md.
    final_eval_episodes=50,
    differences=(LONG_DATA,
                 "40,000 updates (paper: 1M; cpu preset: 4,000), 5 evaluation episodes every 2,000; final return = "
                 "mean of the last 2 evaluations (10 episodes)",
                 "all 80 episodes only; columns ABM+MPO and BM+MPO (with their priors) only"),
    run_here="on this project's 2-core CPU (results/cpu-long)")
# A control for both: how much any filter can gain on this data, with no critic at all.
PRESETS["cpu-filtered"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-filtered",
    purpose="a control for the ABM prior: BM+MPO, with its BM prior, learned from only the best 16 of the 80 "
            "episodes by logged return (filtered behaviour cloning, '%BC'), at cpu-long's budgets; 5 seeds, about "
            "90 minutes of one core",
    # Why: abm_filter.py found Eq. 4 keeping 28% of the worst fifth of the episodes and 62% of the best fifth
    # (cpu-long's critics), and the ABM prior no better than the BM prior. A BM prior on the best fifth alone is the
    # filter that knows the returns: if it beats the BM prior on all 80, filtering can pay on this data and Eq. 4
    # filters too softly; if not, the data leaves no room for the ABM prior at this budget. It did beat it, by 49.8
    # [21.9, 76.5] (README "A control: what a filter that knows the returns gains").
    control_columns=("BM+MPO",), best_episodes=16,
    differences=(LONG_DATA,
                 "only its best 16 episodes by return (204.6 to 322.5; all 80: mean 127.2), chosen with "
                 "benchmarks/best_episodes.py: not in the paper",
                 LONG_BUDGETS,
                 "column BM+MPO (with its prior) only"),
    run_here="on this project's 2-core CPU (results/cpu-filtered)")
# Does Eq. 4 filter softly because its snippets are short? The paper gives no N for its ABM columns (only |tau| = 2
# for "ABM eps=0", where it calls short snippets vital); these scripts default to 10.
PRESETS["cpu-snippets"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-snippets",
    purpose="ABM+MPO at cpu-long's budgets with Eq. 4's snippets 100 steps long instead of 10, to test whether "
            "longer snippets make the ABM prior filter the data as a return filter does; 5 seeds, about 100 minutes "
            "of the 2 cores",
    # Why: abm_filter.py --snippet-lengths on cpu-long's five final ABM+MPO checkpoints (the same critics and policies
    # scored with other N, before this preset ran; results/cpu-long/abm_filter_snippets.md): the imitated mix holds
    # 0.12 from the worst fifth of the episodes and 0.28 from the best at N = 10, but 0.06 and 0.41 at N = 100. At
    # N = 1 the test is nearly a coin flip in every fifth (0.42-0.55 accepted): the logged rewards carry the signal,
    # and V's differences between s_t and s_N carry mostly the critic's noise. 100 = 1 / (1 - gamma), the discount's
    # horizon, the one N tried. Result: the ABM prior beat cpu-long's BM prior by 39.5 [15.1, 63.4] (README "Longer
    # snippets").
    control_columns=("ABM+MPO",), extra_train_flags=("--snippet-length", "100"),
    differences=(LONG_DATA,
                 "Eq. 4's snippets 100 steps long (these scripts' default and cpu-long: 10; the paper states none but "
                 "2 for ABM eps=0)",
                 LONG_BUDGETS,
                 "column ABM+MPO (with its prior) only; compare with cpu-long's BM+MPO (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-snippets)")
# What made cpu-eps0's prior good: eps = 0 or N = 2? "ABM eps=0" (snippets of 2, no policy improvement) was level
# with cpu-long's ABM+MPO prior (snippets of 10) from the shared start states, 24.2 [-24.9, 69.5], and ahead in the
# grid, 51.0 [11.8, 89.5]; the two columns differ in both. ABM+MPO at N = 2 differs from ABM eps=0 in eps alone, and
# from cpu-long's (N = 10) and cpu-snippets' (N = 100) ABM+MPO in N alone: the third N on one curve.
PRESETS["cpu-snippets2"] = dataclasses.replace(
    PRESETS["cpu-snippets"], name="cpu-snippets2",
    purpose="ABM+MPO at cpu-long's budgets with Eq. 4's snippets 2 steps long, to separate cpu-eps0's two changes "
            "(eps = 0 and N = 2) and to give Eq. 4's snippet length a third point (2, 10, 100); 5 seeds, about 115 "
            "minutes of the 2 cores, three runs at a time",
    # Timing (this 2-core AMD EPYC with AVX-512 and bf16, one thread each, the two side by side, 600 updates at batch
    # 128, M = 20): ABM+MPO 18.3 updates/s at N = 2, 18.4 at N = 10. Set before any run of this preset. Prediction
    # from abm_filter.py on cpu-long's critics (results/cpu-long/abm_filter_snippets.md): at N = 1 the test is nearly
    # a coin flip (0.42 of the worst fifth accepted, 0.55 of the best), so a prior near the BM prior, unless eps = 0
    # was what lifted cpu-eps0's. Result: the prior level with the BM prior (7.6 [-28.9, 48.4]) and with ABM eps=0
    # (-20.5 [-64.9, 9.7]) from the shared start states; the policy ahead of BM+MPO (87.0 [47.4, 119.8]) and ABM
    # eps=0 (77.2 [27.1, 109.7]) (README "Snippets of 2 with policy improvement").
    extra_train_flags=("--snippet-length", "2"),
    differences=(LONG_DATA,
                 "Eq. 4's snippets 2 steps long (cpu-long: 10, cpu-snippets: 100; cpu-eps0's ABM eps=0: 2)",
                 LONG_BUDGETS,
                 "column ABM+MPO (with its prior) only; compare with cpu-eps0's ABM eps=0, cpu-long's ABM+MPO and BM+MPO "
                 "and cpu-snippets' ABM+MPO (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-snippets2)")
# The SVG columns, never run on a CPU before: does ABM+SVG beat plain (trust-region) SVG as in Table 6 (cheetah: 920.7
# against 726.1), and does the SVG step learn what the MPO step learns from the same prior (cpu-long's seeds, data and
# budgets, so compare.py --final-eval pairs ABM+SVG with cpu-long's ABM+MPO seed for seed)?
PRESETS["cpu-svg"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-svg",
    purpose="ABM+SVG (with its prior) and plain SVG at cpu-long's budgets and data, 5 seeds, to pair with cpu-long's "
            "ABM+MPO and BM+MPO; about 170 minutes of the 2 cores (an ABM+SVG run about 41 minutes of one core, an "
            "SVG run about 26), runnable in pieces",
    # Timing (this 2-core AMD EPYC, one thread each, the two side by side, 600 updates at batch 128, M = 20): ABM+SVG
    # 18.3 updates/s, SVG 29.2; cpu-long's ABM+MPO about 20. Columns and budgets set before any run of this preset.
    control_columns=("ABM+SVG", "SVG"),
    differences=(LONG_DATA,
                 LONG_BUDGETS,
                 "columns ABM+SVG (with its prior, which Table 6 does not list) and SVG only; BM+SVG left out; "
                 "compare with cpu-long's ABM+MPO and BM+MPO (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-svg)")
# Plain offline MPO at cpu-long's budgets: the cpu grid stopped it at 4,000 updates (1.8 on all 80), where the
# README read "plain offline MPO fails, as in the paper"; plain SVG (cpu-svg) was as flat at 2,000 updates and then
# climbed to 58.5-178.0 by 40,000. Does plain MPO also learn late, or does it stay where the paper's MPO column
# (cheetah: 496.2 against ABM+MPO's 907.4) puts it, far below the prior-regularised columns?
PRESETS["cpu-mpo"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-mpo",
    purpose="plain offline MPO (--prior none) at cpu-long's budgets and data, 5 seeds, to pair with cpu-long's "
            "ABM+MPO and BM+MPO and cpu-svg's SVG; about 75 minutes of the 2 cores (a run about 25 minutes of one "
            "core)",
    # Timing (this 2-core AMD EPYC, one thread each, the two side by side, 600 updates at batch 128, M = 20): MPO
    # 39.7 updates/s, BM+MPO 38.7 (cpu-long's BM+MPO runs took 1,552 s for 40,000 updates with evaluations).
    # Column and budgets set before any run of this preset. Result: it learns, late (0-3 at 4,000 updates, 55-202 at
    # 40,000), below ABM+MPO (148.9 [78.8, 193.5] from the shared start states) and BM+MPO (README "Plain MPO at
    # 40,000 updates").
    control_columns=("MPO",),
    differences=(LONG_DATA,
                 LONG_BUDGETS,
                 "column MPO only; compare with cpu-long's ABM+MPO and BM+MPO (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-mpo)")
# The paper's simplest variant at cpu-long's budgets: ABM with epsilon = 0 (no policy improvement: the policy is the
# ABM prior, the critic learns the prior's Q) and snippets of 2 steps. Appendix: it "roughly recovers the performance
# of the ABM prior when trained together with MPO" (Table 6 cheetah: 884.3 against the ABM+MPO prior's 888.7). The
# cpu grid ran it at 4,000 updates only (76.2 on all 80, where the ABM+MPO prior had 73.7).
PRESETS["cpu-eps0"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-eps0",
    purpose="ABM with epsilon = 0 and snippets of 2 (the paper's 'ABM (eps = 0, |tau| = 2)') at cpu-long's budgets "
            "and data, 5 seeds, to pair with cpu-long's ABM+MPO prior; about 70 minutes of the 2 cores, three runs "
            "at a time (a run about 26 minutes of one core)",
    # Timing (this 2-core AMD EPYC, one thread, nothing beside it, 600 updates at batch 128, M = 20): 28.6 updates/s.
    # Column and budgets set before any run of this preset. Result: level with the ABM+MPO prior from the shared start
    # states (24.2 [-24.9, 69.5]), below ABM+MPO (-59.2 [-89.9, -22.7]) (README "ABM with epsilon = 0").
    control_columns=("ABM eps=0",),
    differences=(LONG_DATA, LONG_BUDGETS,
                 "column ABM eps=0 only; compare with cpu-long's ABM+MPO prior (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-eps0)")
# The last Table 6 column at cpu-long's budgets: BM+SVG. Table 6 has it level with ABM+SVG (cheetah: 924.1 against
# 920.7) where BM+MPO and ABM+MPO are also level (891.8, 907.4); here ABM+MPO beat BM+MPO by 69.0 [43.2, 93.8] from the
# shared start states (cpu-long). Does the SVG step close that gap, as in the paper, or does the ABM prior's lead hold
# under SVG too (cpu-svg's ABM+SVG, the same seeds)?
PRESETS["cpu-bmsvg"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-bmsvg",
    purpose="BM+SVG (with its BM prior) at cpu-long's budgets and data, 5 seeds, to pair with cpu-svg's ABM+SVG and "
            "SVG and cpu-long's BM+MPO; about 95 minutes of the 2 cores, three runs at a time (a run about 35 "
            "minutes of one core)",
    # Timing (this 2-core AMD EPYC, one thread each, the two side by side, 600 updates at batch 128, M = 20): BM+SVG
    # 19.5 updates/s, ABM+SVG 12.3 (cpu-svg's ABM+SVG runs took 2,310 s for 40,000 updates with evaluations, on an
    # earlier machine). Column and budgets set before any run of this preset. Result: ahead of BM+MPO on the same,
    # bit-identical BM prior (27.8 [23.1, 32.4] from the shared start states), behind ABM+SVG (67.0 [40.4, 98.6]),
    # where Table 6 has the SVG columns level (README "BM+SVG").
    control_columns=("BM+SVG",),
    differences=(LONG_DATA, LONG_BUDGETS,
                 "column BM+SVG only; compare with cpu-svg's ABM+SVG and SVG and cpu-long's BM+MPO (the same seeds and "
                 "budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-bmsvg)")
# BCQ at cpu-long's budgets: the cheetah table at 40,000 updates (results/cheetah_40k.md) has every Table 6 column but
# BCQ and BEAR, which the cpu grid ran to 4,000 updates only. There BCQ led every column on all 80 episodes (79.5
# against ABM+MPO's 59.0), and Table 6 has them level on cheetah (914.9 against 907.4). Is that lead a short budget's,
# or does BCQ keep up with ABM+MPO over 40,000 updates?
PRESETS["cpu-bcq"] = dataclasses.replace(
    PRESETS["cpu-long"], name="cpu-bcq",
    purpose="BCQ (M = 10, Table 3) at cpu-long's budgets and data, 5 seeds, to pair with cpu-long's ABM+MPO and "
            "BM+MPO; about 75 minutes of the 2 cores, three runs at a time (a run about 27 minutes of one core)",
    # Timing (this 2-core AMD EPYC, one thread each, the two side by side, 600 updates at batch 128): BCQ 28.4
    # updates/s, BEAR (M = 20) 12.5, so a BEAR column at these budgets would take about 2.5 hours of the 2 cores: left
    # out. Column and budgets set before any run of this preset. Prediction, written before the runs: level with
    # ABM+MPO from the shared start states (the paired interval holds 0), as in Table 6. Result: level (3.6 [-45.7,
    # 55.0]), ahead of BM+MPO (72.6 [35.1, 108.3], 5 of 5 seeds) (README "BCQ at 40,000 updates").
    control_columns=("BCQ",),
    differences=(LONG_DATA, LONG_BUDGETS,
                 "column BCQ only (its policy and its VAE's actions as the prior); compare with cpu-long's ABM+MPO and "
                 "BM+MPO (the same seeds and budgets)"),
    run_here="on this project's 2-core CPU (results/cpu-bcq)")
# The second task for both findings: the paper's other task where the ABM prior beats the BM prior most (Table 6
# quadruped: 733.4 against 398.8), and the question cpu-snippets left: is N = 100 better than 10 off cheetah too?
PRESETS["cpu-quadruped"] = Preset(
    name="cpu-quadruped",
    purpose="the ABM prior at Eq. 4's default snippets (10) and at 100, against the BM prior, on quadruped (Table 6's "
            "other task where the ABM prior beats the BM prior by most); 8 seeds at 20,000 updates, about 1.7 "
            "hours of the 2 cores per 4 seeds, and 15 min for the collecting",
    # Why quadruped: cheetah alone decided the N question (cpu-snippets), on one dataset from one learner. Timing
    # (this 2-core AMD EPYC, one thread each, beside collect.py): quadruped ABM+MPO at batch 128, M = 20 ran 17
    # updates/s and an evaluation episode (policy or prior) took 0.34 s, so a 20,000-update run takes about 21 minutes;
    # 40,000 as cpu-long would not fit one session.
    # The rule for the scripts' default N, set before any of these runs finished: it becomes 100 if the N = 100 prior
    # beats the N = 10 prior here with a 95% interval above 0 (on cheetah: 58.3 [27.6, 88.0]) both in the grid's final
    # returns (compare.py) and in final_eval.py's 100 episodes from start states shared by every run; otherwise 10.
    # Result: 10.2 [2.4, 17.9] from the shared start states, -5.9 [-66.2, 56.7] in the grid, so N stays 10; both ABM
    # priors beat the BM prior from the shared start states (README "A second task").
    control_tasks=("quadruped",), collect_episodes=60, collect_seeds=(0,),
    collect_flags=("--steps-per-update", "1", "--batch-size", "64"),
    regimes=(("all 60", None),), control_columns=("ABM+MPO", "ABM+MPO N=100", "BM+MPO"),
    sawyer_tasks=(), sawyer_episodes=0, sawyer_columns=(),
    # Seeds 4-7 added on 2026-12-07 after seeds 0-3 had been read: 4 seeds give a bootstrap 4 values to resample, so
    # the intervals above are optimistic. Whatever the 8 seeds say is reported beside the 4-seed reading; the rule for
    # the default N above is not changed. Result over 8: the N = 100 prior minus the N = 10 prior is 8.9 [4.9, 13.1]
    # from the shared start states (8 of 8 seeds) and 5.5 [-40.8, 50.5] in the grid, so N stays 10.
    seeds=(0, 1, 2, 3, 4, 5, 6, 7), updates=20000, batch=128, sawyer_updates=0, sawyer_batch=0, action_samples=20,
    eval_every=1000, eval_episodes=5, sawyer_eval_every=1,
    # Added after the 12 runs had finished (their checkpoints still here, so the grid resumed each to evaluate): the
    # grid's final return (10 episodes from start states that follow the seed) could not separate the priors, which
    # final_eval.py's 100 episodes from shared start states did.
    final_eval_episodes=100,
    differences=("quadruped only",
                 "data: 1 collecting run of 60 episodes (paper: 5 runs of 10k), collect.py at 1 update per step "
                 "with batch 64 (its defaults)",
                 "20,000 updates (paper: 1M), batch 128 (paper: 512), 8 seeds; 5 evaluation episodes every 1,000; "
                 "final return = mean of the last 10% of evaluations, i.e. the last 2 (10 episodes)",
                 "column ABM+MPO N=100 (Eq. 4's snippets 100 steps long) is not in the paper, which states no N",
                 "columns ABM+MPO, ABM+MPO N=100 and BM+MPO (with their priors) only"),
    run_here="on this project's 2-core CPU (results/cpu-quadruped)")


# ----------------------------------------------------------------------------------------------
# The grid: one Job per collection, merge and learning run
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str  # also the file name of its log and run directory
    kind: str  # "collect", "merge" or "train"
    command: list  # what a user would type, run from the repository root
    log: Path
    needs: tuple = ()  # names of the jobs whose output it reads
    run_dir: Optional[Path] = None  # train
    dataset: Optional[Path] = None  # collect, merge: the file it writes
    episodes: int = 0  # collect, merge: the episodes that file must hold when done
    links: tuple = ()  # merge: the seeds' part directories to link into the merged one
    labels: dict = field(default_factory=dict)  # train: env, task, regime, column, seed
    published: Optional[Path] = None  # train: <out>/runs/<job>, where a finished run's small files are kept


def shown(path: Path) -> str:
    """A path as the command line shows it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def collection_jobs(env: str, preset: Preset, episodes: int, flags: tuple, work: Path) -> list[Job]:
    """One collect.py job per collecting seed (each its own part directory), then a merge into one dataset
    (collect.py with every seed, over links to the seeds' episode files); one seed writes the dataset itself."""
    merged = work / "datasets" / f"{env}.npz"
    command = ["python", "collect.py", "--env", env, "--seeds", *map(str, preset.collect_seeds), "--episodes",
               str(episodes), *flags, "--output", shown(merged)]
    if len(preset.collect_seeds) == 1:
        return [Job(f"dataset-{env}", "collect", command, work / "logs" / f"dataset-{env}.log", dataset=merged,
                    episodes=episodes)]
    jobs = []
    for seed in preset.collect_seeds:
        output = work / "datasets" / env / f"seed{seed}.npz"
        jobs.append(Job(f"collect-{env}-seed{seed}", "collect",
                        ["python", "collect.py", "--env", env, "--seeds", str(seed), "--episodes", str(episodes),
                         *flags, "--output", shown(output)],
                        work / "logs" / f"collect-{env}-seed{seed}.log", dataset=output, episodes=episodes))
    jobs.append(Job(f"dataset-{env}", "merge", command, work / "logs" / f"dataset-{env}.log",
                    needs=tuple(job.name for job in jobs), dataset=merged,
                    episodes=episodes * len(preset.collect_seeds),
                    links=tuple(job.dataset.with_suffix(".episodes") for job in jobs)))
    return jobs


def train_job(preset: Preset, work: Path, env: str, task: str, regime: tuple, column: str, seed: int) -> Job:
    sawyer = env == "sawyer"
    label, episodes = regime
    best = f"-best{preset.best_episodes}" if preset.best_episodes and not sawyer else ""  # its derived data
    label = f"best {preset.best_episodes} of {label}" if best else label
    parts = (env, task) if sawyer else (env, label)
    name = "-".join([*parts, column, f"seed{seed}"]).replace(" ", "").replace("+", "_").replace("=", "")
    run_dir = work / "runs" / name
    command = ["python", COLUMNS[column].script, "--env", env, *(["--task", task] if sawyer else []),
               # the link's path, never its target's: the command must not change once the link to a published
               # dataset exists (--resume compares it); with best_episodes, the file derived from it
               "--dataset", f"{shown(work / 'datasets')}/{env}{best}.npz",
               *(["--dataset-episodes", str(episodes)] if episodes else []),
               *COLUMNS[column].flags, "--seed", str(seed),
               "--total-steps", str(preset.sawyer_updates if sawyer else preset.updates),
               "--batch-size", str(preset.sawyer_batch if sawyer else preset.batch),
               # BCQ keeps its own M = 10 (Table 3) unless the preset asks for fewer
               "--num-action-samples", str(min(preset.action_samples, 10) if column == "BCQ" else preset.action_samples),
               *bear_warmup(preset, sawyer, column),
               "--eval-every", str(preset.sawyer_eval_every if sawyer else preset.eval_every),
               "--checkpoint-every", str(preset.sawyer_eval_every if sawyer else preset.eval_every),
               "--eval-episodes", str(preset.eval_episodes),
               *(["--final-eval-episodes", str(preset.final_eval_episodes)] if preset.final_eval_episodes else []),
               *preset.extra_train_flags, "--run-dir", shown(run_dir)]
    return Job(name, "train", command, work / "logs" / f"{name}.log", needs=(f"dataset-{env}",), run_dir=run_dir,
               labels={"env": env, "task": task, "regime": label if not sawyer else "", "regime_episodes": episodes,
                       "column": column, "seed": seed})


def bear_warmup(preset: Preset, sawyer: bool, column: str) -> list:
    """BEAR's warm-up (20k updates of the actor matching the prior, 2% of the original 1M) scaled to the
    preset's updates, so a short run is not all warm-up."""
    updates = preset.sawyer_updates if sawyer else preset.updates
    return ["--warmup-steps", str(updates // 50)] if column == "BEAR" and updates < 1_000_000 else []


def build_grid(preset: Preset, work: Path) -> list[Job]:
    """Collections first, then the learning runs in the order that informs soonest: seed 0 of every
    column on every task before seed 1; within a seed, the largest data regime first."""
    if preset.best_episodes and any(episodes for _, episodes in preset.regimes):
        raise SystemExit(f"reproduce.py: error: preset {preset.name} keeps the best {preset.best_episodes} episodes "
                         f"of all its data; its regimes must use all episodes (None), not the first K")
    jobs = []
    for env in preset.control_tasks:
        jobs += collection_jobs(env, preset, preset.collect_episodes, preset.collect_flags, work)
    if preset.sawyer_tasks:
        jobs += collection_jobs("sawyer", preset, preset.sawyer_episodes, (), work)
    regimes = sorted(preset.regimes, key=lambda regime: -(regime[1] or float("inf")))
    for seed in preset.seeds:
        for regime in regimes:
            for env in preset.control_tasks:
                for column in preset.control_columns:
                    jobs.append(train_job(preset, work, env, "all", regime, column, seed))
        for task in preset.sawyer_tasks:
            for column in preset.sawyer_columns:
                jobs.append(train_job(preset, work, "sawyer", task, ("", None), column, seed))
    return jobs


def published_datasets(out: Path) -> dict:
    """env -> {dataset sha256: [run names]} of the runs already published in <out>/runs (their config.json)."""
    found: dict = {}
    for config_path in sorted((out / "runs").glob("*/config.json")):
        try:
            config = json.loads(config_path.read_text())
            job = json.loads((config_path.parent / "job.json").read_text())
        except (OSError, ValueError):
            continue
        found.setdefault(job.get("env"), {}).setdefault(config.get("dataset_sha256"), []).append(config_path.parent.name)
    return found


# Flags of a run's command that may differ from a finished run's config.json: where its files live, what a resume
# may add (the final evaluation, checkpoints), and where the updates run.
SETTINGS_MAY_DIFFER = {"run_dir", "dataset", "resume", "final_eval_episodes", "checkpoint_every", "device", "compile"}


def command_flags(command: list) -> dict:
    """{flag name: its words} of a learning script's command: `--total-steps 40000` -> {"total_steps": ["40000"]};
    a switch (tyro's `--x` / `--no-x`) -> {"x": ["True"]} / {"x": ["False"]}."""
    flags, name = {}, None
    for word in command[2:]:
        if word.startswith("--"):
            name = word[2:].replace("-", "_")
            flags[name] = []
        elif name:
            flags[name].append(word)
    switches = {name[3:] if name.startswith("no_") else name: [str(not name.startswith("no_"))]
                for name, words in flags.items() if not words}
    return {**{name: words for name, words in flags.items() if words}, **switches}


def same_value(words: list, value) -> bool:
    """Whether a command's words give config.json's value (numbers compared as numbers: 2e-4 is 0.0002)."""
    values = value if isinstance(value, list) else [value]
    if len(words) != len(values):
        return False
    for word, value in zip(words, values):
        try:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (float(word) == float(value) if number else word == str(value)):
                return False
        except ValueError:
            return False
    return True


def shown_value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def settings_differ(job: Job, folder: Path) -> list[str]:
    """How the finished run in `folder` was made otherwise than `job`'s command asks: its config.json's first values
    of every flag the command gives (but SETTINGS_MAY_DIFFER), and its last update (metrics.csv: a resume may have
    taken it further), as '--flag 4000 (this grid: 8000)'."""
    try:
        made = json.loads((folder / "config.json").read_text())["args"]
        with open(folder / "metrics.csv") as handle:
            steps = [line.split(",", 1)[0] for line in handle.readlines()[1:]]
        made["total_steps"] = int(steps[-1]) if steps else made["total_steps"]
    except (OSError, ValueError, KeyError):
        return []  # nothing recorded to compare (check_datasets and the table read what there is)
    return [f"--{name.replace('_', '-')} {shown_value(made[name])} (this grid: {' '.join(words)})"
            for name, words in command_flags(job.command).items()
            if name not in SETTINGS_MAY_DIFFER and name in made and not same_value(words, made[name])]


def published_under(jobs: list, out: Path) -> list:
    """`jobs`, each learning run's `published` set to <out>/runs/<job>, where its finished files are kept."""
    for job in jobs:
        if job.kind == "train":
            job.published = out / "runs" / job.name
    return jobs


def check_settings(jobs: list, out: Path) -> None:
    """SystemExit, in one sentence, when a finished run of the grid (in <out>/runs or its run directory) was made with
    other settings than its job asks for now (`--set updates=8000`, an edited preset): it would count as done and
    the table would state budgets its runs did not have, or a new run would replace it."""
    differ = [(job, changes) for job in jobs if job.kind == "train"
              for folder in (job.published, job.run_dir) if folder and (folder / "summary.json").exists()
              if (changes := settings_differ(job, folder))]
    if differ:
        job, changes = differ[0]
        runs = len({job.name for job, _ in differ})
        raise SystemExit(f"reproduce.py: error: {runs} finished run(s) of this grid were made with other settings "
                         f"(first: {job.name}: {', '.join(changes)}) in {shown(out)} or {shown(job.run_dir.parent)}; "
                         f"give this grid its own --out and --work, or move those runs away")


def check_datasets(jobs: list, out: Path, collected: bool) -> None:
    """One dataset per env for a grid's runs: SystemExit, in one sentence, when a run would learn from data other
    than the runs already published in <out>/runs did. collect.py is not bit-reproducible across machines and
    thread counts (the cpu preset's cheetah data, collected again on 2026-12-06, came out with another sha256
    and best return 322.5 against 227.2), so a fresh checkout that collects again gets other data. Before the
    grid (`collected` False) a missing dataset stops it too, before half an hour of collecting."""
    published = published_datasets(out)
    for env in sorted({job.labels["env"] for job in jobs if job.kind == "train"}):
        if env not in published:
            continue
        path = train_dataset(next(job for job in jobs if job.kind == "train" and job.labels["env"] == env))
        recorded, runs = next(iter(published[env])), sum(published[env].values(), [])
        if not path.exists():
            if collected:
                continue
            raise SystemExit(f"reproduce.py: error: {shown(out / 'runs')} holds {len(runs)} run(s) on {env} data with "
                             f"sha256 {recorded[:12]}... and {shown(path)} is missing: put that file back (collecting "
                             f"it again gives other data on another machine), or choose another --out for new data")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in published[env]:
            raise SystemExit(f"reproduce.py: error: {shown(path)} (sha256 {digest[:12]}...) is not the {env} data "
                             f"that the {len(runs)} run(s) in {shown(out / 'runs')} learned from (sha256 "
                             f"{recorded[:12]}...); their results and new ones would mix two datasets: put the "
                             f"recorded file back, or choose another --out for the new data")


def published_data(preset: Preset, out: Path) -> Path:
    """The folder of the datasets published with the results: <out>/datasets, or the preset's `datasets_from`."""
    return ROOT / preset.datasets_from if preset.datasets_from else out / "datasets"


def train_dataset(job: Job) -> Path:
    """The dataset a train job's command reads (its --dataset), from the repository root."""
    path = Path(job.command[job.command.index("--dataset") + 1])
    return path if path.is_absolute() else ROOT / path


def derive_best_episodes(preset: Preset, jobs: list, work: Path) -> None:
    """Each Control Suite run's dataset, <work>/datasets/<env>-best<N>.npz (train_job names it), from the published
    <env>.npz, before the grid: the same bytes on every machine and every rerun (benchmarks/best_episodes.py), so
    the runs' recorded sha256 still holds."""
    outputs = {job.labels["env"]: train_dataset(job) for job in jobs
               if job.kind == "train" and job.labels["env"] != "sawyer"}
    for env, output in sorted(outputs.items()):
        source = work / "datasets" / f"{env}.npz"
        if not source.exists():
            raise SystemExit(f"reproduce.py: error: preset {preset.name} learns from the best episodes of published "
                             f"{env} data and {shown(source)} is missing: set its datasets_from, or run the preset "
                             f"that collects the data first")
        try:
            record = write_best_episodes(source, output, preset.best_episodes)
        except ValueError as error:
            raise SystemExit(f"reproduce.py: error: {shown(source)}: {error}") from None
        print(f"dataset: {shown(output)}: the best {record['episodes']} of {record['of']} episodes of "
              f"{shown(source)} (returns {record['lowest_kept_return']:.1f} to {record['highest_return']:.1f})",
              flush=True)


def dataset_episodes(path: Path) -> int:
    """Episodes in a dataset file (0 when missing or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            episode_id = data["episode_id"]
            return int(len(np.unique(episode_id)))
    except (OSError, KeyError, ValueError, EOFError):
        return 0


def is_done(job: Job) -> bool:
    """A run is done when its summary is in its run directory or published under <out>/runs (committed: so a
    fresh checkout on another machine continues the grid instead of restarting it), and holds the final evaluation
    its command asks for (--final-eval-episodes) unless its checkpoint is not here to give it: a finished run that
    lacks it is resumed, which only evaluates (a preset that gained final_eval_episodes after its runs finished)."""
    if job.kind != "train":
        return dataset_episodes(job.dataset) >= job.episodes
    found = finished_summaries(job)
    if not found:
        return False
    return any(not lacks_final_eval(job, path) for path in found) or not (job.run_dir / "checkpoint.pt").exists()


def finished_summaries(job: Job) -> list[Path]:
    """A train job's summary.json files that exist: in its run directory, and published under <out>/runs."""
    return [folder / "summary.json" for folder in (job.run_dir, job.published)
            if folder is not None and (folder / "summary.json").exists()]


def job_state(job: Job, preset: Preset, out: Path) -> str:
    """--dry-run's word for a job: differs (finished with other settings: the grid would refuse to start), done,
    evaluate (finished, its final evaluation to add), published (a dataset in <out>/datasets) or todo."""
    if job.kind == "train" and any(settings_differ(job, summary.parent) for summary in finished_summaries(job)):
        return "differs"
    if is_done(job):
        return "done"
    if job.kind == "train" and finished_summaries(job):
        return "evaluate"
    return "published" if job.dataset and (published_data(preset, out) / job.dataset.name).exists() else "todo"


def lacks_final_eval(job: Job, summary: Path) -> bool:
    """Whether the finished run's summary.json lacks the final evaluation the job's command asks for."""
    if "--final-eval-episodes" not in job.command:
        return False
    episodes = int(job.command[job.command.index("--final-eval-episodes") + 1])
    try:
        return json.loads(summary.read_text()).get("final_eval", {}).get("episodes") != episodes
    except (OSError, ValueError):
        return True


def prepare_command(job: Job) -> list:
    """The command to run now: with `--resume RUN_DIR` when an interrupted run left a checkpoint;
    a run directory without one is started again from scratch."""
    if job.kind != "train" or not job.run_dir.exists():
        return job.command
    if (job.run_dir / "checkpoint.pt").exists() and (job.run_dir / "config.json").exists():
        return [*job.command, "--resume", shown(job.run_dir)]
    shutil.rmtree(job.run_dir)
    return job.command


# ----------------------------------------------------------------------------------------------
# One job on a Ray worker: the command as a subprocess, its output appended to the job's log
# ----------------------------------------------------------------------------------------------
SKIPPED = -1000  # return code of a job whose inputs failed
STOPPED = -1001  # return code of a job stopped at --time-budget's deadline (a rerun resumes it)
RUNNING: set = set()  # --local: the job processes of this process, stopped when the grid is interrupted


def _die_with_parent() -> None:
    """Linux: the job's process gets SIGTERM when the Ray worker running it dies (a cancelled or
    interrupted grid), so no orphan keeps computing; its last checkpoint is resumed on the rerun."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_job(command: list, log: str, cwd: str, threads: int, links: list, merged: str, deadline: float,
            *needed: int) -> dict:
    """Runs on a Ray worker. `needed` are the results of the jobs this one reads (Ray waits for them);
    `deadline` (seconds since the epoch, 0 = none): past it the command gets SIGTERM (status "stopped")."""
    start = time.time()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        if any(result["returncode"] != 0 for result in needed):
            handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} skipped: a job it needs failed\n")
            return {"returncode": SKIPPED, "seconds": 0.0}
        if links:  # merge: every seed's finished episode files (symlinks) in the merged dataset's part directory
            parts = Path(merged).with_suffix(".episodes")
            parts.mkdir(parents=True, exist_ok=True)
            for source in map(Path, links):
                for file in source.iterdir():
                    target = parts / file.name
                    if not target.is_symlink() and not target.exists():
                        target.symlink_to(os.path.relpath(file, parts))
        handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()}\n# commit {git_commit()}\n"
                     f"$ {shlex.join(command)}\n")
        handle.flush()
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([sys.executable, *command[1:]], cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=environment, preexec_fn=_die_with_parent)
        RUNNING.add(process)
        stopped = False
        while process.poll() is None:
            if deadline and time.time() > deadline and not stopped:  # --time-budget: stop it, resume it next time
                process.terminate()
                stopped = True
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            time.sleep(0.2)
        RUNNING.discard(process)
        handle.write(f"# {'stopped by --time-budget, ' if stopped else ''}exit code {process.returncode} after "
                     f"{time.time() - start:.0f} s\n")
    return {"returncode": STOPPED if stopped else process.returncode, "seconds": time.time() - start}


# ----------------------------------------------------------------------------------------------
# Without Ray (`--local`): the few calls of Ray's API that `follow` makes, on threads of this process
# ----------------------------------------------------------------------------------------------
class LocalCluster:
    """`ray.remote(f).options(...).remote(*args)`, `wait`, `get`, `cancel` and `cluster_resources` for one machine
    without Ray (the GPU call's machine has none): each job is a thread that waits for the futures among its
    arguments (the jobs it needs) and then runs `f`, which runs the job's command as a subprocess. `follow`
    keeps at most `slots + 1` learning runs in flight, as it does on Ray."""

    def __init__(self, num_cpus: Optional[int] = None):
        import concurrent.futures

        self.futures = concurrent.futures
        self.cpus = num_cpus or os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4 * self.cpus + 8)
        self.slots = threading.BoundedSemaphore(self.cpus)  # at most num_cpus commands at once, as Ray's resources
        self.closed = False

    def cluster_resources(self) -> dict:
        gpus = 0
        if shutil.which("nvidia-smi"):
            query = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
            gpus = sum(line.startswith("GPU ") for line in query.stdout.splitlines())
        return {"CPU": float(self.cpus), "GPU": float(gpus)}

    def remote(self, function):
        cluster = self

        class Remote:
            def options(self, **_resources):
                return self

            def remote(self, *args):
                def call():
                    inputs = [a.result() if isinstance(a, cluster.futures.Future) else a for a in args]
                    with cluster.slots:
                        if cluster.closed:  # interrupted while this job waited for a slot
                            return {"returncode": STOPPED, "seconds": 0.0}
                        return function(*inputs)
                return cluster.pool.submit(call)
        return Remote()

    def wait(self, futures: list, num_returns: int = 1, timeout: Optional[float] = None):
        done, _ = self.futures.wait(futures, timeout=timeout, return_when=self.futures.FIRST_COMPLETED)
        done = [f for f in futures if f in done]
        return done, [f for f in futures if f not in done]

    def get(self, future):
        return future.result()

    def cancel(self, future, force: bool = False) -> None:
        """Interrupted: no waiting job starts, and every running job's process is stopped (SIGTERM; a rerun resumes
        it from its last checkpoint)."""
        self.closed = True
        future.cancel()
        for process in list(RUNNING):
            process.terminate()


# ----------------------------------------------------------------------------------------------
# The driver: submit everything to Ray, follow progress, then publish
# ----------------------------------------------------------------------------------------------
def run_grid(jobs: list[Job], preset: Preset, address: Optional[str] = None, num_cpus: Optional[int] = None,
             local: bool = False, deadline: float = 0.0, out: Optional[Path] = None) -> dict:
    """Run every unfinished job on Ray (or, `local`, on threads of this process); returns name -> {"status",
    "seconds", "returncode"}. Past `deadline` (epoch seconds, 0 = none) no job starts and running ones stop."""
    if local:
        return follow(jobs, preset, LocalCluster(num_cpus), deadline, out)
    import ray

    if __name__ != "__main__":  # imported (tests): ship run_job by value, workers need not import this file
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        import plot

        ray.cloudpickle.register_pickle_by_value(plot)
    local = {} if address else {"num_cpus": num_cpus, "object_store_memory": 200 * 2**20}  # jobs pass no data
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **local)
    try:
        return follow(jobs, preset, ray, deadline, out)
    finally:
        ray.shutdown()


def follow(jobs: list[Job], preset: Preset, ray, deadline: float = 0.0, out: Optional[Path] = None) -> dict:
    """Collections go to Ray at once (a merge waits on its seeds' results through Ray). Learning runs go
    to Ray once their dataset exists, in the grid's order, keeping at most `slots + 1` jobs in flight
    (Ray's "limit pending tasks" pattern with ray.wait): so seed 0 of every column runs before seed 1
    instead of in the order the datasets happened to finish."""
    resources = ray.cluster_resources()
    if preset.num_gpus and not resources.get("GPU"):
        raise SystemExit(f"reproduce.py: error: preset {preset.name} asks for {preset.num_gpus} GPU per job and this "
                         f"cluster has no GPU (--set num_gpus=0 runs it without)")
    if preset.num_cpus > resources.get("CPU", 0):  # Ray would wait for such a worker forever
        raise SystemExit(f"reproduce.py: error: preset {preset.name} asks for {preset.num_cpus:g} CPUs per job and this cluster has "
                         f"{resources.get('CPU', 0):g}: give --num-cpus at least {preset.num_cpus:g} or "
                         f"--set num_cpus=...")
    remote = ray.remote(run_job)
    slots = max(1, int(resources.get("CPU", 1) // max(preset.num_cpus, 1e-9)))
    threads = max(1, int(preset.num_cpus))
    outcome, refs, submitted = {}, {}, {}
    todo = []
    for job in jobs:
        if is_done(job):
            outcome[job.name] = {"status": "done before", "seconds": 0.0, "returncode": 0}
        else:
            todo.append(job)
    print(f"{len(jobs)} jobs: {len(outcome)} already done, {len(todo)} to run, {slots} at a time "
          f"(Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)", flush=True)
    unevaluated = [job.name for job in jobs if job.name in outcome and job.kind == "train" and
                   all(lacks_final_eval(job, path) for path in finished_summaries(job))]
    if unevaluated:
        print(f"{len(unevaluated)} finished run(s) lack the preset's final evaluation and their checkpoints are not "
              f"here to give it (e.g. {unevaluated[0]}): table.md's shared-start section leaves them out", flush=True)
    pending: dict = {}  # ObjectRef -> job name

    def submit(job: Job) -> None:
        command = prepare_command(job)
        needed = [refs[name] for name in job.needs if name in refs and name not in outcome]
        submitted[job.name] = (job, command, job.log.stat().st_size if job.log.exists() else 0)
        refs[job.name] = remote.options(num_cpus=preset.num_cpus, num_gpus=preset.num_gpus, name=job.name,
                                        max_retries=0).remote(
            command, str(job.log), str(ROOT), threads, [str(p) for p in job.links],
            str(job.dataset) if job.dataset else "", deadline, *needed)
        pending[refs[job.name]] = job.name

    for job in [job for job in todo if job.kind != "train"]:
        submit(job)
    queue = [job for job in todo if job.kind == "train"]
    start, last_print, checked = time.time(), 0.0, set()
    try:
        while pending or queue:
            if deadline and time.time() > deadline and queue:  # --time-budget spent: start nothing more
                for job in queue:
                    outcome[job.name] = {"status": "not started", "seconds": 0.0, "returncode": None,
                                         "command": shlex.join(job.command), "log": shown(job.log)}
                print(f"time budget spent: {len(queue)} job(s) not started (a rerun starts them)", flush=True)
                queue.clear()
            for job in list(queue):  # the grid's order, among the runs whose dataset is ready
                if sum(1 for name in pending.values() if submitted[name][0].kind != "merge") > slots:
                    break
                states = [outcome.get(name, {}).get("status") for name in job.needs]
                if any(state in ("failed", "skipped") for state in states):
                    queue.remove(job)
                    outcome[job.name] = {"status": "skipped", "seconds": 0.0, "returncode": SKIPPED,
                                         "command": shlex.join(job.command), "log": shown(job.log)}
                    print(f"skipped: {job.name} (its dataset failed)", flush=True)
                elif all(state in ("done", "done before") for state in states):
                    if out is not None and job.labels["env"] not in checked:  # its dataset was just collected
                        check_datasets([job], out, collected=True)
                        checked.add(job.labels["env"])
                    queue.remove(job)
                    submit(job)
            if not pending:  # nothing runs and nothing could start: the rest need jobs outside the grid
                for job in queue:
                    outcome[job.name] = {"status": "skipped", "seconds": 0.0, "returncode": SKIPPED,
                                         "command": shlex.join(job.command), "log": shown(job.log)}
                    print(f"skipped: {job.name} (needs {', '.join(job.needs)}, which did not run)", flush=True)
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=20)
            for ref in ready:
                name = pending.pop(ref)
                job, command, _ = submitted[name]
                try:
                    result = ray.get(ref)
                except Exception as error:  # the worker died: report it like a failed command
                    result = {"returncode": None, "seconds": 0.0, "error": str(error).splitlines()[0]}
                code = result["returncode"]
                status = {0: "done", SKIPPED: "skipped", STOPPED: "stopped"}.get(code, "failed")
                if status == "stopped" and job.kind == "train" and is_done(job):  # it finished as the stop came
                    status = "done"
                outcome[name] = {"status": status, "seconds": result["seconds"], "returncode": code,
                                 "command": shlex.join(command), "log": shown(job.log)}
                if status == "done" and job.kind == "train" and out is not None:
                    publish_run(job, outcome, out)  # at once: a grid stopped later keeps it
                line = f"{status}: {name} ({result['seconds']:.0f} s)"
                if status == "failed":
                    line += f", exit code {code}\n    command: {shlex.join(command)}\n    log: {shown(job.log)}"
                print(progress_line(outcome, submitted, pending, queue, slots, time.time() - start) + "  " + line,
                      flush=True)
                last_print = time.time()
            if not ready and time.time() - last_print > 120:
                print(progress_line(outcome, submitted, pending, queue, slots, time.time() - start), flush=True)
                last_print = time.time()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        for ref, name in pending.items():
            outcome[name] = {"status": "stopped", "seconds": 0.0, "returncode": None,
                             "command": shlex.join(submitted[name][1]), "log": shown(submitted[name][0].log)}
        print("\nInterrupted: finished runs are kept; rerun the same command to continue "
              "(interrupted runs resume from their last checkpoint).", flush=True)
        raise Interrupted(outcome) from None
    return outcome


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the grid: carries what finished, so the table and manifest are still written."""

    def __init__(self, outcome: dict):
        super().__init__("interrupted")
        self.outcome = outcome


def progress_line(outcome: dict, submitted: dict, pending: dict, queue: list, slots: int, elapsed: float) -> str:
    """[done/total, running, failed] and an ETA from the mean duration of this session's finished jobs."""
    names = set(pending.values())
    running = sum(1 for name in names if submitted[name][0].log.exists()
                  and submitted[name][0].log.stat().st_size > submitted[name][2])
    counts = {status: sum(1 for o in outcome.values() if o["status"] == status)
              for status in ("done", "done before", "failed", "skipped", "stopped")}
    durations = {}
    for name, result in outcome.items():
        if result["status"] == "done" and name in submitted:
            durations.setdefault(submitted[name][0].kind, []).append(result["seconds"])
    remaining = 0.0
    for kind in [submitted[name][0].kind for name in names] + [job.kind for job in queue]:
        known = durations.get(kind) or []
        remaining += np.mean(known) if known else float("nan")
    eta = remaining / slots
    stopped = f", {counts['stopped']} stopped" if counts["stopped"] else ""
    eta_text = "ETA once a job of each kind has finished" if np.isnan(eta) else f"ETA {eta / 60:.0f} min"
    total = len(outcome) + len(names) + len(queue)
    return (f"[{counts['done'] + counts['done before']}/{total} done, {running} running, {counts['failed']} failed, "
            f"{counts['skipped']} skipped{stopped}; {elapsed / 60:.0f} min, {eta_text}]")


# ----------------------------------------------------------------------------------------------
# Publishing: per-run summaries, table.md, curves, manifest
# ----------------------------------------------------------------------------------------------
def publish_run(job: Job, outcome: dict, out: Path) -> Optional[Path]:
    """One finished run's small files to <out>/runs/<job>, with job.json (labels, command, and the wall seconds and
    commit of the session that ran it: a later session that finds it done keeps them; one that only added its final
    evaluation adds its own as final_eval_seconds and final_eval_commit)."""
    if not (job.run_dir / "summary.json").exists():
        return None
    target = out / "runs" / job.name
    target.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "unfinished" / job.name, ignore_errors=True)  # its partial copy, from a stopped session
    before = json.loads((target / "job.json").read_text()) if (target / "job.json").exists() else {}
    evaluated_only = bool(before.get("seconds")) and lacks_final_eval(job, target / "summary.json")
    for name in ("summary.json", "metrics.csv", "config.json"):
        shutil.copyfile(job.run_dir / name, target / name)
    seconds = outcome.get(job.name, {}).get("seconds") or None
    if evaluated_only:  # published before without its final evaluation: this session only added that
        record = {"seconds": before["seconds"], "commit": before.get("commit"), "final_eval_seconds": seconds,
                  "final_eval_commit": run_commit(job)}
    elif "final_eval_seconds" in before:  # that run again (publish_runs at the session's end): keep both
        record = {key: before.get(key) for key in ("seconds", "commit", "final_eval_seconds", "final_eval_commit")}
    else:
        record = {"seconds": seconds or before.get("seconds"), "commit": run_commit(job)}
    (target / "job.json").write_text(json.dumps({**job.labels, "command": shlex.join(job.command),
                                                 "log": shown(job.log), **record}, indent=2))
    return target


def run_commit(job: Job) -> str:
    """The code a run finished with: the last commit its log names (a grid, and a resumed run, can span commits)."""
    try:
        lines = job.log.read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split()[-1] for line in reversed(lines) if line.startswith("# commit ")),
                "not recorded (its log predates commit lines)")


def publish_runs(jobs: list[Job], outcome: dict, out: Path) -> list[Path]:
    """Copy each finished run's small files (summary.json, metrics.csv, config.json) and its job.json
    (command, grid labels) to <out>/runs/<job>; the table and curves are built from these copies."""
    copies = [target for job in jobs if job.kind == "train" and (target := publish_run(job, outcome, out))]
    for job in jobs:  # runs stopped (--time-budget, Ctrl-C): their evaluations so far, apart from the table's runs
        metrics = job.run_dir / "metrics.csv" if job.run_dir else None
        if outcome.get(job.name, {}).get("status") == "stopped" and metrics and metrics.exists():
            target = out / "unfinished" / job.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(metrics, target / "metrics.csv")
            (target / "job.json").write_text(json.dumps({**job.labels, "command": shlex.join(job.command),
                                                         "status": "stopped before it finished (--time-budget "
                                                                   "or an interrupt); a rerun resumes it"}, indent=2))
    return copies


def load_published(out: Path) -> list[dict]:
    """Every published run: job.json's labels with the summary's per-task numbers."""
    runs = []
    for folder in sorted((out / "runs").glob("*")):
        if (folder / "job.json").exists() and (folder / "summary.json").exists():
            runs.append({**json.loads((folder / "job.json").read_text()),
                         "summary": json.loads((folder / "summary.json").read_text()), "folder": folder})
    return runs


# ----------------------------------------------------------------------------------------------
# Statistics over seeds (the approach of Agarwal et al. 2021, "Deep RL at the edge of the statistical
# precipice", and its library rliable, written out here for one task at a time: a stratified bootstrap
# resamples the seeds of each cell independently)
# ----------------------------------------------------------------------------------------------
BOOTSTRAP_SAMPLES = 10_000
# The orderings the paper reports (Table 6), each (better, worse): read with a 95% interval of the difference.
ORDERED_PAIRS = (("ABM+MPO prior", "BM+MPO prior"), ("ABM+MPO", "BM+MPO"), ("ABM+MPO", "MPO"), ("ABM+MPO", "BCQ"),
                 ("ABM+MPO", "BEAR"), ("ABM+SVG", "SVG"),
                 # the same orderings with Eq. 4's snippets of 100 (cpu-quadruped)
                 ("ABM+MPO N=100 prior", "BM+MPO prior"), ("ABM+MPO N=100", "BM+MPO"))
# This project's own question, not an ordering of the paper's (which states no N): is N = 100 better than N = 10?
PROJECT_PAIRS = (("ABM+MPO N=100 prior", "ABM+MPO prior"), ("ABM+MPO N=100", "ABM+MPO"))


def pair_label(better: str, worse: str) -> str:
    return f"{better} vs {worse}" + (" (not in the paper)" if (better, worse) in PROJECT_PAIRS else "")


def bootstrap(statistic, *groups, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of `statistic(*groups)` with each group's seeds resampled with replacement."""
    rng = np.random.default_rng(seed)
    draws = [np.asarray(g, float)[rng.integers(0, len(g), (samples, len(g)))] for g in groups]
    values = statistic(*draws)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def interquartile_mean(values, axis=-1):
    """Mean of the middle 50% of the values (rliable's IQM): robust to one outlying seed."""
    values = np.sort(np.asarray(values, float), axis=axis)
    n = values.shape[axis]
    low, high = int(np.floor(0.25 * n)), int(np.ceil(0.75 * n))
    return np.take(values, range(low, max(high, low + 1)), axis=axis).mean(axis=axis)


def probability_of_improvement(x, y):
    """P(X > Y) + P(X = Y) / 2 over all pairs of a seed of X and a seed of Y (the Mann-Whitney statistic)."""
    x, y = np.asarray(x, float)[..., :, None], np.asarray(y, float)[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-2, -1))


def mean_std(values: list) -> str:
    """A table cell: mean over seeds, its 95% stratified-bootstrap interval, and the number of seeds."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (1)"
    low, high = bootstrap(lambda v: v.mean(-1), values)
    return f"{np.mean(values):.1f} [{low:.1f}, {high:.1f}] ({len(values)})"


def difference_cells(x, y) -> str:
    """Three table cells for seeds x against seeds y: the difference of means [95% CI], whether that interval
    excludes 0, and the probability of improvement [95% CI] (also benchmarks/compare.py's)."""
    low, high = bootstrap(lambda a, b: a.mean(-1) - b.mean(-1), x, y)
    p_low, p_high = bootstrap(probability_of_improvement, x, y)
    verdict = "yes, first higher" if low > 0 else "yes, second higher" if high < 0 else "no"
    return (f"{np.mean(x) - np.mean(y):.1f} [{low:.1f}, {high:.1f}] | {verdict} | "
            f"{probability_of_improvement(x, y):.2f} [{p_low:.2f}, {p_high:.2f}]")


def comparisons(rows: dict) -> list[str]:
    """For each row (task and data regime) and each ordered pair present: the difference of means with its 95%
    interval, whether the interval excludes zero, and the probability of improvement with its interval."""
    lines = ["| task (data) | pair (paper: first > second) | difference of means [95% CI] | interval excludes 0 | "
             "P(first > second) [95% CI] | seeds |", "|---|---|---|---|---|---|"]
    for (label, _), row in rows.items():
        for better, worse in ORDERED_PAIRS + PROJECT_PAIRS:
            x, y = row.get(better, []), row.get(worse, [])
            if len(x) < 2 or len(y) < 2:
                continue
            lines.append(f"| {label} | {pair_label(better, worse)} | {difference_cells(x, y)} | {len(x)}, {len(y)} |")
    if len(lines) == 2:  # a control preset (one column) or a single seed: an empty table would say nothing
        return ["No pair of the paper's orderings has two or more seeds in both of its columns here; "
                "`benchmarks/compare.py` compares cells of different presets."]
    return lines


def paired(x: dict, y: dict) -> str:
    """Table cells for two cells' {seed: return}: the mean over their common seeds of x - y [95% interval, seeds
    resampled], how many of those seeds x is higher, and whether the interval excludes 0 (also final_eval.py's)."""
    seeds = sorted(set(x) & set(y))
    difference = np.array([x[s] - y[s] for s in seeds])
    wins = f"{int((difference > 0).sum())} of {len(seeds)}"
    if len(seeds) < 2:
        return f"{difference.mean():.1f} (one seed) | {wins} | -"
    low, high = bootstrap(lambda d: d.mean(-1), difference)
    return f"{difference.mean():.1f} [{low:.1f}, {high:.1f}] | {wins} | {'yes' if low > 0 or high < 0 else 'no'}"


def final_eval_rows(runs: list[dict]) -> dict:
    """Control Suite runs' final_eval as {row label: {column or "<column> prior": {seed: return}}}, the rows labelled
    as table_rows labels them."""
    rows: dict = {}
    for run in runs:
        final, label = run["summary"].get("final_eval") or {}, f"{run['env']} ({run['regime']})"
        for name, suffix in (("return", ""), ("prior_return", " prior")):
            if final.get(name) is not None and (not suffix or COLUMNS[run["column"]].prior):
                rows.setdefault(label, {}).setdefault(run["column"] + suffix, {})[run["seed"]] = final[name]
    return rows


def final_eval_section(runs: list[dict], headers: list[str]) -> list[str]:
    """table.md's section on the runs' final_eval (--final-eval-episodes): every run's final policy and prior from the
    same start states, each cell's mean over seeds, and the ordered pairs paired seed for seed."""
    evaluated = [run for run in runs if run["summary"].get("final_eval")]
    if not evaluated:
        return []
    rows = final_eval_rows(evaluated)
    episodes = sorted({run["summary"]["final_eval"]["episodes"] for run in evaluated})
    first = sorted({run["summary"]["final_eval"]["first_start_seed"] for run in evaluated})
    shown_headers = [h for h in headers if any(h in row for row in rows.values())]
    lines = ["## The final checkpoint from shared start states (`--final-eval-episodes`)", "",
             f"After its last update each run's final policy and prior acted {' or '.join(map(str, episodes))} more "
             f"episodes, episode i from reset(seed={' or '.join(map(str, first))} + i) in every run whatever its seed "
             "(summary.json's `final_eval`). Not the paper's protocol, which the table above follows: a measure "
             "whose start states are the same for every run, so that seeds differ only by what they learned. "
             f"{len(evaluated)} of {len(runs)} runs have it.", "",
             "| task (data) | " + " | ".join(shown_headers) + " |", "|---|" + "---|" * len(shown_headers)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(mean_std(list(row.get(h, {}).values())) for h in shown_headers)
                     + " |")
    lines += ["", "Pairs, seed for seed: the mean over the seeds both columns have of first - second (the same seed, "
                  "the same start states) [95% interval, seeds resampled].", "",
              "| task (data) | pair (paper: first > second) | paired difference [95% CI] | first higher | "
              "interval excludes 0 |", "|---|---|---|---|---|"]
    for label, row in rows.items():
        for better, worse in ORDERED_PAIRS + PROJECT_PAIRS:
            if set(row.get(better, {})) & set(row.get(worse, {})):
                lines.append(f"| {label} | {pair_label(better, worse)} | {paired(row[better], row[worse])} |")
    return lines + [""]


def iqm_table(rows: dict, headers: list[str]) -> list[str]:
    lines = ["| task (data) | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for (label, _), row in rows.items():
        cells = []
        for header in headers:
            values = row.get(header, [])
            if len(values) < 2:
                cells.append("-")
                continue
            low, high = bootstrap(interquartile_mean, values)
            cells.append(f"{interquartile_mean(values):.1f} [{low:.1f}, {high:.1f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def final_window_error(runs: list[dict]) -> Optional[float]:
    """The standard error of one run's final return from evaluation noise: each run's final return averages the
    evaluations in its last 10%; the spread of those evaluations, pooled over runs, divided by sqrt(their count)."""
    variances, counts = [], []
    for run in runs:
        metrics = run["folder"] / "metrics.csv"
        if not metrics.exists():
            continue
        import csv

        returns = [float(r["eval/return"]) for r in csv.DictReader(metrics.open()) if r.get("eval/return")]
        window = returns[-max(1, int(np.ceil(0.1 * len(returns)))):]
        if len(window) >= 2:
            variances.append(np.var(window, ddof=1))
            counts.append(len(window))
    if not variances:
        return None
    return float(np.sqrt(np.mean(variances) / np.mean(counts)))


def table_rows(runs: list[dict], columns: list[str]) -> dict:
    """(row label, paper key) -> {"best": [...], column or "<column> prior": [values over seeds]}."""
    rows = {}
    for run in runs:
        for task, numbers in run["summary"]["per_task"].items():
            if run["env"] == "sawyer":
                key = (f"{task} ({'all seven' if run['task'] == 'all' else 'alone'})", task if run["task"] == "all" else None)
            else:
                key = (f"{run['env']} ({run['regime']})", run["env"] if not run["regime_episodes"] else None)
            row = rows.setdefault(key, {"best": []})
            row["best"].append(numbers["best_episode_return_in_dataset"])
            if "return" in numbers:
                row.setdefault(run["column"], []).append(numbers["return"])
            if COLUMNS[run["column"]].prior and "prior_return" in numbers:
                row.setdefault(f"{run['column']} prior", []).append(numbers["prior_return"])
            for name, suffix in (("normalised_return", ""), ("normalised_prior_return", " prior")):
                if name in numbers:  # a Minari dataset's reference scores: 100 (R - R_min) / (R_max - R_min)
                    row.setdefault(f"{run['column']}{suffix} normalised", []).append(numbers[name])
    return rows


def markdown_table(rows: dict, columns: list[str], paper: dict, paper_columns: tuple) -> list[str]:
    headers = [c for column in columns for c in ([column, f"{column} prior"] if COLUMNS[column].prior else [column])]
    headers = [c for h in headers for c in [h, f"{h} normalised"] if c == h or any(c in row for row in rows.values())]
    lines = ["| task (data) | best episode in the data | " + " | ".join(headers) + " |",
             "|---|---|" + "---|" * len(headers)]
    for (label, paper_key), row in rows.items():
        lines.append(f"| {label} | {max(row['best']):.1f} | " + " | ".join(mean_std(row.get(h, [])) for h in headers) + " |")
        if paper_key in paper:
            numbers = dict(zip(paper_columns, paper[paper_key]))
            name = "paper (all its data; it ran no filtered data)" if "(best " in label else "paper"  # best_episodes
            lines.append(f"| {name} | - | " + " | ".join(f"{numbers[h]:g}" if h in numbers else "-" for h in headers)
                         + " |")
    return lines


def write_table(preset: Preset, out: Path, wall: dict) -> Path:
    runs = load_published(out)
    control = [r for r in runs if r["env"] != "sawyer"]
    sawyer = [r for r in runs if r["env"] == "sawyer"]
    lines = [f"# Results: preset `{preset.name}`", "",
             f"Command: `python benchmarks/reproduce.py --preset {preset.name}`. {preset.purpose}.", "",
             "Cells: final return, mean over seeds [95% confidence interval of the mean: stratified bootstrap over "
             f"seeds, {BOOTSTRAP_SAMPLES} resamples] (n seeds); final = mean of the last 10% of "
             "evaluations (the paper's protocol). `prior` = the prior run on its own. The `paper` row is the "
             "paper's number for the same column (Table 6: 10k-episode regime; Table 7: seven-task run).", "",
             "Budgets: " + budgets_text(preset), "",
             "**Settings that differ from the paper:**", *[f"- {d}" for d in preset.differences], "",
             f"Wall time: {wall['this_run_minutes']:.1f} min this run of the command, "
             f"{wall['total_minutes']:.1f} min over all runs of it. Machine: {machine()['cpu']}, "
             f"GPU: {machine()['gpu']}.", ""]
    if control:
        columns = [c for c in COLUMN_ORDER if any(r["column"] == c for r in control)]
        rows = table_rows(control, columns)
        headers = [h for c in columns for h in ([c, f"{c} prior"] if COLUMNS[c].prior else [c])]
        error = final_window_error(control)
        lines += ["## Control Suite (Table 6 layout)", "",
                  *markdown_table(rows, columns, PAPER_TABLE_6, PAPER_TABLE_6_COLUMNS), "",
                  "### Interquartile mean over seeds [95% CI]", "", *iqm_table(rows, headers), "",
                  "### The paper's orderings", "",
                  "Difference of the two columns' means over seeds and the probability that a seed of the first "
                  "beats a seed of the second, each with a 95% stratified-bootstrap interval.", "",
                  *comparisons(rows), "",
                  (f"Evaluation noise: the standard error of one run's final return, from the spread of the "
                   f"evaluations in each run's final 10% window pooled over runs, is {error:.1f}." if error is not None
                   else "Evaluation noise: no run has two evaluations in its final window."), ""]
        figure = interval_plot(rows, headers, out / "intervals.png")
        if figure:
            lines += [f"Final returns per column with 95% intervals: `{figure.name}`.", ""]
        lines += final_eval_section(control, headers)
    if sawyer:
        columns = [c for c in COLUMN_ORDER if any(r["column"] == c for r in sawyer)]
        lines += ["## Simulated Sawyer (Table 7 layout)", "",
                  *markdown_table(table_rows(sawyer, columns), columns, PAPER_TABLE_7, PAPER_TABLE_7_COLUMNS), ""]
    lines += ["Learning curves: " + ", ".join(f"`{p.name}`" for p in sorted(out.glob("curves_*.png"))), "",
              "Per-run numbers: `runs/<job>/summary.json` (and `metrics.csv`, `config.json`, `job.json` "
              "with the exact command)."]
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def interval_plot(rows: dict, headers: list[str], path: Path) -> Optional[Path]:
    """One panel per task and data regime: each column's mean final return over seeds with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, row) for (label, _), row in rows.items() if any(len(row.get(h, [])) >= 2 for h in headers)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(headers) + 1.5), squeeze=False)
    for axis, (label, row) in zip(axes[0], panels):
        shown_headers = [h for h in headers if len(row.get(h, [])) >= 2]
        for y, header in enumerate(shown_headers):
            values = row[header]
            low, high = bootstrap(lambda v: v.mean(-1), values)
            axis.plot([low, high], [y, y], color="tab:blue", linewidth=3, alpha=0.5)
            axis.plot([np.mean(values)], [y], "o", color="tab:blue")
            axis.plot(values, [y] * len(values), "|", color="black", alpha=0.6)
        axis.set_yticks(range(len(shown_headers)), shown_headers)
        axis.invert_yaxis()
        axis.set_title(label)
        axis.set_xlabel("final return (mean, 95% CI; ticks: seeds)")
        axis.axvline(max(row["best"]), color="grey", linestyle="--", linewidth=1)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_curves(out: Path) -> list[Path]:
    """One PNG per environment: every task (and data regime) a panel, every column a curve."""
    runs = load_published(out)
    figures = []
    for env in sorted({r["env"] for r in runs}):
        chosen = [r for r in runs if r["env"] == env]
        panels = collect_panels([r["folder"] for r in chosen], labels=[r["column"] for r in chosen])
        for panel in panels.values():  # the paper's column order in the legend
            ordered = {c: panel[c] for c in COLUMN_ORDER if c in panel}
            panel.clear()
            panel.update(ordered)
        figures.append(plot_panels(panels, out / f"curves_{env}.png", title=f"{env}: return against updates"))
    return figures


def budgets_text(preset: Preset) -> str:
    control = (f"Control Suite {', '.join(preset.control_tasks)}: {len(preset.collect_seeds)} collecting run(s) x "
               f"{preset.collect_episodes} episodes (collect.py {' '.join(preset.collect_flags)}), regimes "
               + ", ".join(f"{label} (--dataset-episodes {k})" if k else f"{label} (all episodes)" for label, k in preset.regimes)
               + (f", of which only the best {preset.best_episodes} episodes by return are learned from "
                  f"(benchmarks/best_episodes.py)" if preset.best_episodes else "")
               + f"; {preset.updates} updates, batch {preset.batch}")
    sawyer = (f"Sawyer --task {', '.join(preset.sawyer_tasks)}: {preset.sawyer_episodes} scripted episodes per "
              f"collecting seed; {preset.sawyer_updates} updates, batch {preset.sawyer_batch}") if preset.sawyer_tasks else ""
    extra = f"; every run with {' '.join(preset.extra_train_flags)}" if preset.extra_train_flags else ""
    extra += (f"; then {preset.final_eval_episodes} episodes of the final policy and prior from start states shared "
              "by every run (--final-eval-episodes)") if preset.final_eval_episodes else ""
    return (". ".join(part for part in (control, sawyer) if part) + f". M = {preset.action_samples}, "
            f"{len(preset.seeds)} seed{'s' * (len(preset.seeds) != 1)} ({', '.join(map(str, preset.seeds))}), evaluation every {preset.eval_every} "
            f"updates{f' (Sawyer {preset.sawyer_eval_every})' if sawyer else ''} with {preset.eval_episodes} episodes"
            f"{extra}; Ray: {preset.num_cpus:g} CPU{f', {preset.num_gpus:g} GPU' if preset.num_gpus else ''} per job. "
            f"Paper: {PAPER_SCALE}.")


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    gpu = "none"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = ", ".join(query.stdout.split("\n")[:-1]) or "none"
    return {"cpu": f"{cpu}, {os.cpu_count()} logical cores", "gpu": gpu, "python": platform.python_version()}


def git_commit() -> str:
    query = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return query.stdout.strip() or "unknown"


def write_manifest(preset: Preset, out: Path, jobs: list[Job], outcome: dict, started: float) -> dict:
    """manifest.json: budgets, machine, the wall time of every run of the command, every job's command."""
    path = out / "manifest.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    sessions = previous.get("sessions", []) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                                                "wall_seconds": round(time.time() - started, 1),
                                                "commit": git_commit(), "machine": machine()}]
    try:
        import ray

        executor = f"ray {ray.__version__}"
    except ImportError:
        executor = "local (--local, no Ray installed)"
    manifest = {"preset": asdict(preset), "budgets": budgets_text(preset), "executor": executor,
                "sessions": sessions, "total_wall_seconds": round(sum(s["wall_seconds"] for s in sessions), 1),
                "jobs": {job.name: manifest_entry(job, outcome, previous.get("jobs", {}).get(job.name), out)
                         for job in jobs}}
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_entry(job: Job, outcome: dict, before: Optional[dict], out: Path) -> dict:
    """A job's line in manifest.json: this session's outcome, or the earlier one for a job found done; for a run this
    session only evaluated, the training's seconds and the evaluation's, as its published job.json has them."""
    status = outcome.get(job.name, {}).get("status")
    if status == "done before" and before:
        return before
    entry = {"kind": job.kind, "command": shlex.join(job.command), "log": shown(job.log),
             **outcome.get(job.name, {"status": "not run"})}
    published = out / "runs" / job.name / "job.json"
    record = json.loads(published.read_text()) if status == "done" and published.exists() else {}
    if "final_eval_seconds" in record:
        entry = {**entry, "seconds": record.get("seconds"), "final_eval_seconds": record["final_eval_seconds"]}
    return entry


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


HELD: list = []  # the folders this process's grid holds (flock), released when reproduce() returns


def hold(folders) -> None:
    """One grid at a time per --out and --work: a second reproduce.py on them (the command run again in another
    terminal) would start every job a second time, and each job's run would refuse the other's directory."""
    if os.name != "posix":
        return
    import fcntl

    for folder in dict.fromkeys(Path(folder).resolve() for folder in folders):  # --out and --work may be one folder
        HELD.append(os.open(folder, os.O_RDONLY))
        try:
            fcntl.flock(HELD[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"reproduce.py: error: another reproduce.py is running on {shown(folder)}: wait for it "
                             f"to end or stop it (a rerun resumes its runs), or give other --out and --work") from None
        except OSError:  # a file system without locks: unguarded
            pass


def reproduce(preset: Preset, out: Path, work: Path, address: Optional[str] = None, num_cpus: Optional[int] = None,
              jobs: Optional[list] = None, local: bool = False, time_budget: float = 0.0) -> Path:
    """The whole pipeline; returns the path of table.md. `jobs` replaces the preset's grid (tests); `local`:
    without Ray; `time_budget` (seconds, 0 = none): jobs still running then are stopped, the rest not started,
    and the table is written from the runs that finished."""
    started = time.time()
    # Ctrl-C, kill, or a background shell's ignored SIGINT: cancel the jobs cleanly (the caller's handlers come back)
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _reproduce(preset, out, work, address, num_cpus, jobs, started, local,
                          started + time_budget if time_budget else 0.0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        while HELD:
            os.close(HELD.pop())


def _reproduce(preset: Preset, out: Path, work: Path, address: Optional[str], num_cpus: Optional[int],
               jobs: Optional[list], started: float, local: bool = False, deadline: float = 0.0) -> Path:
    jobs = build_grid(preset, work) if jobs is None else jobs
    for folder in (out, work / "logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".write_test").touch()
            (folder / ".write_test").unlink()
        except OSError as error:
            raise SystemExit(f"reproduce.py: error: cannot write to {folder} ({error.strerror}); "
                             f"choose another --out or --work") from None
    hold((out, work))
    print(f"Preset {preset.name}: {preset.purpose}.\nBudgets: {budgets_text(preset)}", flush=True)
    published_under(jobs, out)
    check_settings(jobs, out)
    published = published_data(preset, out)
    for job in jobs:  # a published dataset (<out>/datasets/<env>.npz or datasets_from's) is the one the grid uses
        committed = published / job.dataset.name if job.dataset else None
        if committed and committed.exists() and job.dataset.parent == work / "datasets" and not job.dataset.exists():
            job.dataset.parent.mkdir(parents=True, exist_ok=True)
            job.dataset.symlink_to(committed.resolve())
            print(f"dataset: {shown(job.dataset.parent)}/{job.dataset.name} -> {shown(committed)} (published with "
                  f"the results)", flush=True)
    if preset.best_episodes:
        derive_best_episodes(preset, jobs, work)
    check_datasets(jobs, out, collected=False)
    try:
        outcome, interrupted = run_grid(jobs, preset, address, num_cpus, local, deadline, out), False
    except Interrupted as stop:
        outcome, interrupted = stop.outcome, True
    publish_runs(jobs, outcome, out)
    manifest = write_manifest(preset, out, jobs, outcome, started)
    write_curves(out)
    table = write_table(preset, out, {"this_run_minutes": manifest["sessions"][-1]["wall_seconds"] / 60,
                                      "total_minutes": manifest["total_wall_seconds"] / 60})
    failed = {name: o for name, o in outcome.items() if o["status"] in ("failed", "skipped", "stopped", "not started")}
    if failed:
        print(f"\n{len(failed)} job(s) did not finish (rerun the command to retry or resume them):")
        for name, o in failed.items():
            print(f"- {o['status']}: {name}\n    command: {o['command']}\n    log: {o['log']}")
    print(f"\nTable: {shown(table)}", flush=True)
    if interrupted:
        raise SystemExit(130)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True,
                        help="smoke: seconds per job (tests); cpu: ~100 min on 2 cores; gpu: <= 20 min on one "
                             "H100 + 16 CPUs; paper: the paper's scale (documentation)")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--out", type=Path, default=None, help="published results (default: results/<preset>)")
    parser.add_argument("--work", type=Path, default=None,
                        help="datasets, run directories and logs, kept out of git (default: runs/reproduce/<preset>)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print every job's command and whether it is done")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write table.md, the curves and the interval plot from results/<preset>/runs")
    parser.add_argument("--local", action="store_true",
                        help="run the jobs as subprocesses of this process, without Ray (at most --num-cpus at once)")
    parser.add_argument("--time-budget", type=float, default=0.0, metavar="MINUTES",
                        help="stop after this long: running jobs are stopped (a rerun resumes them from their last "
                             "checkpoint), no new one starts, and the table is written from the finished runs")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="change preset fields for this run, e.g. updates=20000 seeds=0,1 "
                             "control_columns=ABM+MPO,BCQ (the table states the budgets it ran with)")
    args = parser.parse_args()
    try:
        preset = override(PRESETS[args.preset], args.set)
    except ValueError as error:
        parser.error(str(error))
    if args.time_budget < 0 or (args.num_cpus is not None and args.num_cpus < 1):
        parser.error("--time-budget must be >= 0 and --num-cpus >= 1")
    out = args.out or ROOT / "results" / preset.name
    work = args.work or ROOT / "runs" / "reproduce" / preset.name
    if args.dry_run:
        for job in published_under(build_grid(preset, work), out):
            print(f"{job_state(job, preset, out)}  {job.name}: {shlex.join(job.command)}")
        return
    if args.report:
        # runs made with other settings: the table would state budgets they did not have
        check_settings(published_under(build_grid(preset, work), out), out)
        published = len(load_published(out))
        if not published:
            raise SystemExit(f"reproduce.py: error: --report: {shown(out)} holds no finished runs "
                             f"({shown(out)}/runs/*/summary.json): run the preset first, or give the --out it wrote to")
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
        write_curves(out)
        last = (manifest.get("sessions") or [{}])[-1].get("wall_seconds", 0.0)  # the table the last grid wrote, again
        table = write_table(preset, out, {"this_run_minutes": last / 60,
                                          "total_minutes": manifest.get("total_wall_seconds", 0.0) / 60})
        return print(f"Table: {shown(table)} (from {published} published runs)")
    reproduce(preset, out, work, args.address, args.num_cpus, local=args.local, time_budget=60 * args.time_budget)


# Preset fields that `--set` must keep above zero.
POSITIVE_FIELDS = ("collect_episodes", "updates", "batch", "action_samples", "eval_every", "eval_episodes",
                   "num_cpus", "sawyer_episodes", "sawyer_updates", "sawyer_batch", "sawyer_eval_every")


def override(preset: Preset, assignments: list) -> Preset:
    """`--set FIELD=VALUE ...`: a copy of `preset` with those fields changed, each VALUE read as the field's type
    (tuples comma-separated); `updates` and `sawyer_updates` keep the preset's number of evaluations."""
    changes, fields = {}, asdict(preset)
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        if name not in fields or name == "name":
            raise ValueError(f"--set {assignment}: no preset field {name!r} (fields: {', '.join(fields)})")
        current = fields[name]
        try:
            if isinstance(current, (tuple, list)):
                kind = type(current[0]) if current and not isinstance(current[0], (tuple, list)) else str
                changes[name] = tuple(kind(v) for v in value.split(",") if v)
            else:
                changes[name] = type(current)(value) if current is not None else value
        except ValueError:
            raise ValueError(f"--set {assignment}: {value!r} is not a {type(current).__name__}") from None
    for updates, every in (("updates", "eval_every"), ("sawyer_updates", "sawyer_eval_every")):
        if updates in changes and every not in changes:
            evaluations = max(1, getattr(preset, updates) // getattr(preset, every))
            changes[every] = max(1, changes[updates] // evaluations)
    unknown = [c for c in changes.get("control_columns", ()) + changes.get("sawyer_columns", ()) if c not in COLUMNS]
    if unknown:
        raise ValueError(f"--set: unknown column(s) {', '.join(unknown)} (columns: {', '.join(COLUMNS)})")
    changed = dataclasses.replace(preset, **changes)
    for name in changes:  # out of range: one sentence now, not a failed job per run in the logs later
        value = getattr(changed, name)
        if name in POSITIVE_FIELDS and not value > 0 or name in ("num_gpus", "best_episodes") and value < 0:
            raise ValueError(f"--set {name}={value:g}: {name} must be {'> 0' if name in POSITIVE_FIELDS else '>= 0'}")
        if name in ("seeds", "collect_seeds") and (not value or min(value) < 0):
            raise ValueError(f"--set {name}: give one or more seeds >= 0, comma-separated")
        if name == "regimes":
            raise ValueError("--set regimes: data regimes are (label, episodes) pairs; edit the preset in "
                             "benchmarks/reproduce.py instead")
    return changed


if __name__ == "__main__":
    main()
