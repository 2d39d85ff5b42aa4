"""The GPU path, checked where it can be on a CPU (issue 14): batches drawn from tensors on the device equal
a seed's, and on CUDA the CPU's (one sampler on both); the compiled losses (`--compile on`) of every script equal the eager ones; and, with
CUDA, CPU and CUDA agree. (The device-side non-finite flag is tested end to end in test_end_to_end.py.)

Tolerances, and why: the sampler does the same float32 arithmetic on either device (a cumulative product of
N discounts, one sum of N terms), so its batches agree to 1e-6 relative. torch.compile
fuses and reorders float32 reductions (Inductor's CPU kernels), which moves a loss by a few ulps per update;
over the test's three updates (through Adam) losses and metrics stay within 1e-4 relative or 1e-5 absolute.
Measured: at most 3e-6 relative on every value above 1e-3 in size; the trust-region KLs of MPO (~1e-6, a
difference of nearly equal terms) move by ~2e-8 absolute, which the absolute bound covers. CPU against CUDA
(never run here): other matmul kernels and reduction orders in float32 (TF32 off, PyTorch's default for
matmuls) should move Q values by ~1e-6 relative; the losses are checked to 1e-4 relative and the E-step
weights to 1e-4 absolute."""

import numpy as np
import pytest
import torch

import abm_mpo
import abm_svg
import bcq
import bear
import bm_mpo
from tests.helpers import tensors, write_random_dataset


@pytest.fixture
def data(tmp_path):
    path = write_random_dataset(tmp_path / "data.npz", episodes=5, length=7, tasks=("a", "b"))
    arrays = abm_mpo.load_dataset(path)
    arrays["discount"][[3, 10, 20]] = [0.0, 0.5, 0.0]  # terminal and partial discounts inside snippets
    return arrays


def test_transition_sampler_takes_one_row_and_each_task_its_reward_column(data):
    index = torch.as_tensor(np.random.default_rng(3).integers(0, len(data["observation"]), size=(2, 16)))
    batch = bcq.sample_transitions(tensors(data, [0, 1]), 16, torch.Generator(), index=index)
    for key in ("observation", "action", "discount", "next_observation"):
        torch.testing.assert_close(batch[key], torch.as_tensor(data[key][index.numpy()]), rtol=0, atol=0, msg=key)
    for k in (0, 1):
        assert torch.equal(batch["reward"][k], torch.as_tensor(data["reward"][index[k].numpy(), k]))


@pytest.mark.parametrize("snippet_length", [1, 4, 10])
def test_snippet_sampler_reproduces_under_its_seed_and_keeps_snippets_inside_episodes(data, snippet_length):
    draw = lambda: abm_mpo.sample_batch(tensors(data, [1]), 32, snippet_length, 0.9,  # noqa: E731
                                        torch.Generator().manual_seed(7))
    first, again = draw(), draw()
    assert first["observation"].shape == (1, 32, 5) and first["snippet_return"].shape == (1, 32)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert 0 <= float(first["bootstrap_discount"].min()) and float(first["bootstrap_discount"].max()) <= 0.9 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the one sampler on both devices")
def test_the_sampler_gives_the_same_batch_on_cpu_and_cuda(data):
    index = torch.as_tensor(np.random.default_rng(5).integers(0, len(data["observation"]), size=(2, 16)))
    cpu = abm_mpo.sample_batch(tensors(data, [0, 1]), 16, 4, 0.9, torch.Generator(), index=index)
    cuda = abm_mpo.sample_batch(tensors(data, [0, 1], "cuda"), 16, 4, 0.9, torch.Generator("cuda"), index=index.cuda())
    for key, value in cpu.items():
        torch.testing.assert_close(cuda[key].cpu(), value, rtol=1e-6, atol=1e-6, msg=key)


def test_epsilon_zero_defaults_to_snippets_of_two_steps():
    assert abm_mpo.Args().snippet_length == 10
    assert abm_mpo.Args(epsilon=0.0).snippet_length == 2  # the paper's eps = 0 column, |tau| = 2
    assert abm_mpo.Args(epsilon=0.0, snippet_length=5).snippet_length == 5


# --- compiled against eager losses ---
OBS, ACT = 5, 2
SMALL = dict(policy_layers=(16, 16), critic_layers=(16, 16), batch_size=8, num_action_samples=4, device="cpu")
SCRIPTS = {"abm_mpo": (abm_mpo, {}), "abm_mpo_none": (abm_mpo, {"prior": "none"}),
           "abm_mpo_eps0": (abm_mpo, {"epsilon": 0.0}), "bm_mpo": (bm_mpo, {}), "abm_svg": (abm_svg, {}),
           "bear": (bear, {}), "bear_mmd": (bear, {"divergence": "mmd"}), "bcq": (bcq, {})}


def run_updates(module, overrides: dict, compile: str, batches: list) -> list[dict]:
    torch.manual_seed(0)
    low, high = -torch.ones(ACT), torch.ones(ACT)
    if module is bcq:  # one optimiser per learner, three compiled losses, soft target updates
        fields = {key: value for key, value in SMALL.items() if key != "policy_layers"}
        args = bcq.Args(**fields, encoder_layers=(16, 16), decoder_layers=(16, 16), perturbation_layers=(16, 16),
                        compile=compile)
        agent = bcq.Agent(OBS, ACT, 1, low, high, args)
        optimizers, generator = bcq.make_optimizers(agent, args), torch.Generator().manual_seed(0)
        losses = {name: bcq.compile_losses(getattr(bcq, f"{name}_step_loss"), args, torch.device("cpu"))
                  for name in ("vae", "critic", "actor")}
        rows = []
        for batch in batches:
            rows.append({key: float(value) for key, value in bcq.update(agent, optimizers, batch, args, generator,
                                                                        losses).items()})
            agent.update_targets(args.target_update_rate)
        return rows
    args = module.Args(**SMALL, **overrides, compile=compile)
    if module is bear:  # one optimiser per learner, two compiled losses; past the warm-up (the Q term on)
        agent = bear.Agent(OBS, ACT, 1, low, high, args)
        optimizers, generator = bear.make_optimizers(agent, args), torch.Generator().manual_seed(0)
        losses = {name: bear.compile_losses(fn, args, torch.device("cpu"))
                  for name, fn in (("critic", bear.critic_step_loss), ("actor", bear.actor_step_loss))}
        return [{key: float(value) for key, value in bear.update(agent, optimizers, batch, args, generator,
                                                                 False, losses).items()} for batch in batches]
    agent = module.Agent(OBS, ACT, 1, args)
    optimizer = module.make_optimizer(agent, args)
    generator = torch.Generator().manual_seed(0)
    losses = module.compile_losses(module.update_losses, args, torch.device("cpu"))
    return [{key: float(value) for key, value in module.update(agent, optimizer, batch, args, generator, low,
                                                               high, losses).items()} for batch in batches]


@pytest.mark.slow  # torch.compile took 4-145 s per script (cold cache) on the loaded 2-core CPU
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_compiled_losses_equal_the_eager_losses(name, data):
    module, overrides = SCRIPTS[name]
    data = {**data, "observation": data["observation"][:, :OBS], "action": np.tile(data["action"], (1, ACT))}
    data["next_observation"] = data["next_observation"][:, :OBS]
    generator = torch.Generator().manual_seed(0)
    batches = [abm_mpo.sample_batch(tensors(data, [0]), 8, 3, 0.99, generator) for _ in range(3)]
    torch._dynamo.reset()
    eager, compiled = run_updates(module, overrides, "off", batches), run_updates(module, overrides, "on", batches)
    auto, on = abm_mpo.Args(compile="auto"), abm_mpo.Args(compile="on")
    assert abm_mpo.compile_losses(abm_mpo.update_losses, auto, torch.device("cpu")) is abm_mpo.update_losses
    assert abm_mpo.compile_losses(abm_mpo.update_losses, on, torch.device("cpu")) is not abm_mpo.update_losses
    for eager_row, compiled_row in zip(eager, compiled):
        assert compiled_row == pytest.approx(eager_row, rel=1e-4, abs=1e-5)


# --- CPU against CUDA ---
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compares CPU and GPU on the same weights")
def test_cpu_and_cuda_losses_and_e_step_weights_agree(data):
    args = abm_mpo.Args(**{**SMALL, "batch_size": 32, "num_action_samples": 20})
    torch.manual_seed(0)
    agent = abm_mpo.Agent(OBS, ACT, 1, args)
    data = {**data, "observation": data["observation"][:, :OBS], "action": np.tile(data["action"], (1, ACT))}
    data["next_observation"] = data["next_observation"][:, :OBS]
    batch = abm_mpo.sample_batch(tensors(data, [0]), 32, 3, 0.99, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn((20, 1, 3 * 32, ACT), generator=generator), torch.randn((20, 1, 32, ACT), generator=generator)]
    results = {}
    for device in ("cpu", "cuda"):
        moved = {key: value.to(device) for key, value in batch.items()}
        on_device = abm_mpo.Agent(OBS, ACT, 1, args).to(device)
        on_device.load_state_dict(agent.state_dict())
        low, high = -torch.ones(ACT, device=device), torch.ones(ACT, device=device)
        loss, metrics = abm_mpo.update_losses(on_device, moved, [n.to(device) for n in noise], args, low, high)
        with torch.no_grad():
            actions = moved["observation"].new_zeros(()) + noise[1].to(device)  # [M, K, B, act], same for both
            q = abm_mpo.q_values(on_device.target_critic, moved["observation"], actions, low, high)
            weights = abm_mpo.e_step_weights(q, on_device.temperature)
        results[device] = (float(loss), {key: float(value) for key, value in metrics.items()}, weights.cpu())
    (cpu_loss, cpu_metrics, cpu_weights), (gpu_loss, gpu_metrics, gpu_weights) = results["cpu"], results["cuda"]
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert gpu_metrics == pytest.approx(cpu_metrics, rel=1e-4, abs=1e-6)
    assert (gpu_weights - cpu_weights).abs().max() < 1e-4


def test_a_compiler_failure_at_the_first_call_continues_eager_in_one_line(monkeypatch, capsys):
    """Seen on an H200 (torch 2.11, Triton 3.6): Triton failed to compile one kernel of abm_svg --prior none, and
    the run died. The wrapper runs such a run eager instead, saying so once; a failure after a successful compiled
    call is an error of the run, not of the compiler, and is raised."""
    calls = []

    def broken_compile(function, mode=None):
        def compiled(*inputs):
            calls.append("compiled")
            raise RuntimeError("PassManager::run failed")
        return compiled
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(abm_mpo, "RUN", {})  # a fresh process: the "compiling" line not said yet

    def losses(x):
        calls.append("eager")
        return (x * 2).sum(), {"charts/x": x.mean()}
    call = abm_mpo.compile_losses(losses, abm_mpo.Args(compile="on"), torch.device("cpu"))
    x = torch.arange(4.0)
    assert [call(x)[0].item(), call(x)[0].item()] == [12.0, 12.0]
    assert calls == ["compiled", "eager", "eager"]  # compiled once, then eager for good
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "compiling the losses (torch.compile) before the first update" in err  # no bar
    assert "torch.compile failed (RuntimeError: PassManager::run failed)" in err.splitlines()[1]


def test_with_the_whole_update_recorded_the_losses_compile_without_graphs_of_their_own(monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: modes.append(mode) or function)
    for cuda_graph in (True, False):
        abm_mpo.compile_losses(abm_mpo.update_losses, abm_mpo.Args(cuda_graph=cuda_graph), torch.device("cuda"))
    assert modes == [None, "reduce-overhead"]  # a graph cannot be recorded inside another


def test_compiled_metrics_are_copied_out_of_the_graphs_output_memory(monkeypatch):
    """With --no-cuda-graph, torch.compile's CUDA graphs reuse their output memory at the next replay, and BCQ and
    BEAR replay three graphs per update before the run reads the metrics (seen on an H200: "accessing tensor output
    of CUDAGraphs that has been overwritten"). The wrapper hands back copies of the metrics; the loss keeps its
    graph for backward."""
    monkeypatch.setattr(torch, "compile", lambda function, mode=None: function)
    shared = torch.zeros(())  # stands for a graph's static output buffer

    def losses(x):
        shared.copy_(x.sum())
        return (x ** 2).sum(), {"charts/sum": shared}
    args = abm_mpo.Args(compile="on", cuda_graph=False)  # torch.compile's own graphs, not the whole update's
    call = abm_mpo.compile_losses(losses, args, torch.device("cuda"))  # tensors stay on the CPU
    x = torch.ones(3, requires_grad=True)
    loss, first = call(x)
    call(torch.full((3,), 5.0))  # the next replay overwrites the buffer
    assert first["charts/sum"].item() == 3.0 and first["charts/sum"].data_ptr() != shared.data_ptr()
    loss.backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("device,expected_passes", [("cpu", 4), ("meta", 1)])
def test_the_q_pass_is_chunked_for_a_cpus_cache_and_one_pass_elsewhere(device, expected_passes, monkeypatch):
    """Chunks of CHUNK_ROWS x threads rows suit a CPU core's L2 cache; on a GPU they would be kernels too small
    for it (40 passes of 1,024 rows for ABM+MPO's 40,960; "meta" stands in for a GPU here)."""
    monkeypatch.setattr(abm_mpo, "CHUNK_ROWS", 8)
    monkeypatch.setattr(bear, "CHUNK_ROWS", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    passes = []

    class Critic(torch.nn.Module):
        def forward(self, observation, action):
            passes.append(observation.shape[1])
            return observation.sum(-1, keepdim=True) + action.sum(-1, keepdim=True)

    observation = torch.zeros(1, 8, OBS, device=device)  # [K, B, obs]
    actions = torch.zeros(4, 1, 8, ACT, device=device)  # [M, K, B, act]: 32 rows
    low, high = -torch.ones(ACT, device=device), torch.ones(ACT, device=device)
    twin = bear.TwinCritic(OBS, ACT, (4,), 1, 1).to(device)
    q = abm_mpo.q_values(Critic(), observation, actions, low, high)
    assert q.shape == (4, 1, 8) and passes == [32 // expected_passes] * expected_passes
    twin_passes = []
    monkeypatch.setattr(twin.q1, "forward", lambda o, a: twin_passes.append(o.shape[1]) or o[..., :1].sum(-1))
    monkeypatch.setattr(twin.q2, "forward", lambda o, a: o[..., :1].sum(-1))
    twin(torch.zeros(1, 32, OBS, device=device), actions.reshape(1, 32, ACT))
    assert twin_passes == [32 // expected_passes] * expected_passes
