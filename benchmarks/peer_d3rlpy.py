"""Time per update of d3rlpy's BCQ and BEAR next to this project's bcq.py and bear.py, interleaved
in one process, on the same synthetic hopper-sized data (observation 15, action 4), batch 512 and
network sizes (actor/imitator 256-256, twin critic 256-256-256).

d3rlpy is never a dependency of this project: run this in a venv of its own that reuses the
installed torch (`--system-site-packages`, and `torch==2.13.0` pinned so that pip does not pull a
CUDA build of torch):

    python -m venv --system-site-packages /tmp/d3rlpy-venv
    /tmp/d3rlpy-venv/bin/pip install torch==2.13.0 d3rlpy==2.8.1
    /tmp/d3rlpy-venv/bin/python benchmarks/peer_d3rlpy.py [--quick]

What is matched and what cannot be: batch size, hidden sizes, two critics, M = 10 target samples
for BCQ (its paper's value, ours too) and M = 20 for BEAR. d3rlpy's encoders offer no ELU, so
theirs use ReLU (cheaper than ours' ELU) and no layer norm on the first layer; its BEAR imitator is a VAE and its constraint an MMD over
`n_mmd_action_samples` (4) samples with a one-sample actor loss, where ours is a Gaussian prior,
a closed-form KL and an actor loss over M = 20 samples; ours therefore does more work per BEAR
update. Warm-up phases are skipped on both sides (the full losses are timed).
The FLOPs of one update of each (FlopCounterMode, forward + backward) are printed beside the
times. Writes benchmarks/results/peer_d3rlpy.json.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_speed as us  # noqa: E402  (also puts the repository on sys.path)


def d3rlpy_update(name: str, data: dict, batch_size: int, device: str = "cpu"):
    import d3rlpy

    actor = d3rlpy.models.VectorEncoderFactory(hidden_units=[256, 256])
    critic = d3rlpy.models.VectorEncoderFactory(hidden_units=[256, 256, 256])
    common = dict(batch_size=batch_size, actor_encoder_factory=actor, critic_encoder_factory=critic,
                  imitator_encoder_factory=actor, n_critics=2)
    if name == "bcq":
        config = d3rlpy.algos.BCQConfig(**common, n_action_samples=10)
    else:
        config = d3rlpy.algos.BEARConfig(**common, n_target_samples=20, warmup_steps=0)
    algo = config.create(device=f"{device}:0")
    size = len(data["observation"])
    terminals = np.zeros(size, np.float32)
    timeouts = np.zeros(size, np.float32)
    timeouts[data["episode_last"] == np.arange(size)] = 1.0
    dataset = d3rlpy.dataset.MDPDataset(observations=data["observation"], actions=data["action"],
                                        rewards=data["reward"], terminals=terminals, timeouts=timeouts)
    algo.build_with_dataset(dataset)
    batches = [dataset.sample_transition_batch(batch_size) for _ in range(4)]
    count = [0]

    def update():
        count[0] += 1
        return algo.update(batches[count[0] % len(batches)])

    return update, {"config": type(config).__name__, "d3rlpy": d3rlpy.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 updates x 2 repeats")
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both libraries on the same device)")
    parser.add_argument("--output", default=str(us.ROOT / "benchmarks" / "results" / "peer_d3rlpy.json"))
    options = parser.parse_args()
    if options.quick:
        options.updates, options.repeats = 2, 2
    try:
        import d3rlpy  # noqa: F401
    except ImportError as error:
        sys.exit(f"peer_d3rlpy.py: d3rlpy is not importable ({error}); see this file's docstring for its venv")

    data = us.synthetic_data()
    batch_size = us.bcq.Args().batch_size
    device = options.device
    if device != "cpu":
        options.threads = options.threads[:1]
    updates, versions = {}, {}
    for name, module in (("bcq", us.bcq), ("bear", us.bear)):
        updates[f"ours {name}"] = us.make_update(module, "fp32", device=device)[1]
        if device.startswith("cuda"):  # ours as a run does it there: the whole update one CUDA graph (--cuda-graph)
            updates[f"ours graphed {name}"] = us.make_update(module, "fp32", device=device, graph=True)[1]
        updates[f"d3rlpy {name}"], versions[name] = d3rlpy_update(name, data, batch_size, device)
    torch.set_num_threads(1)
    flops = {name: us.update_flops(update)[0] for name, update in updates.items()}  # also the warm-up

    where = torch.cuda.get_device_name() if device.startswith("cuda") else us.machine()["cpu"]
    print(f"# d3rlpy vs ours per update, both eager on {device} (and ours graphed on CUDA): {where}, "
          f"torch {torch.__version__}, {versions}")
    samples = {(name, threads): [] for name in updates for threads in options.threads}
    loads = [us.load_average()]
    for repeat in range(options.repeats):
        for threads in options.threads:
            torch.set_num_threads(threads)
            for name, update in updates.items():
                us.synchronise(device)
                start = time.perf_counter()
                for _ in range(options.updates):
                    update()
                us.synchronise(device)
                samples[(name, threads)].append(options.updates / (time.perf_counter() - start))
        loads.append(us.load_average())
        print(f"repeat {repeat + 1}/{options.repeats}, load average {loads[-1]}", file=sys.stderr, flush=True)

    print(f"\nbatch {batch_size}, {options.updates} updates x {options.repeats} interleaved repeats, "
          f"load average: {', '.join(loads)}\n")
    print("| algorithm | threads | ours updates/s (min-max) | d3rlpy updates/s (min-max) | ours / d3rlpy | "
          "GFLOP/update ours, d3rlpy |")
    print("|---|---|---|---|---|---|")
    results = []
    for name, variant in [(name, variant) for name in ("bcq", "bear") for variant in ("ours", "ours graphed")
                          if (f"{variant} {name}", options.threads[0]) in samples]:
        for threads in options.threads:
            ours, theirs = samples[(f"{variant} {name}", threads)], samples[(f"d3rlpy {name}", threads)]
            ratio = statistics.median(ours) / statistics.median(theirs)
            gflop = (flops[f"ours {name}"] / 1e9, flops[f"d3rlpy {name}"] / 1e9)
            print(f"| {name}{' (ours graphed)' * (variant != 'ours')} | {threads} | "
                  f"{statistics.median(ours):.2f} ({min(ours):.2f}-{max(ours):.2f}) | {statistics.median(theirs):.2f} ({min(theirs):.2f}-{max(theirs):.2f}) | {ratio:.2f} | "
                  f"{gflop[0]:.2f}, {gflop[1]:.2f} |")
            results.append({"algorithm": name, "variant": variant, "threads": threads, "ours": ours, "d3rlpy": theirs,
                            "ratio": ratio, "gflop_per_update": {"ours": gflop[0], "d3rlpy": gflop[1]}})
    output = Path(options.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"versions": versions, "device": where, "load_average": loads, "results": results},
                                 indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
