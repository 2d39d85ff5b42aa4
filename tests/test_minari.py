"""Minari datasets in and out (README "Minari datasets"): our datasets written by `minari_io.py export` and read
back by `minari_io.py import` give the very arrays of the .npz; a Minari dataset of a gymnasium MuJoCo env, made
here with Minari's own API, trains in every learning script (which converts it through minari_io.py in a
subprocess), evaluates in the env the dataset stores and reports the normalised score; bad input is one sentence.
Nothing is downloaded: MINARI_DATASETS_PATH is a temporary directory, and so is the working directory, where the
scripts keep their .npz copies (datasets/minari/)."""

import json
import os
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

from tests.helpers import ROOT, write_random_dataset

import abm_mpo  # noqa: E402  (tests.helpers puts the repository on sys.path)
import abm_svg
import bcq
import bear
import bm_mpo
import collect
import minari_io
from tools.sync_blocks import BLOCK, reference_blocks

SCRIPTS = {"abm_mpo": abm_mpo, "abm_svg": abm_svg, "bm_mpo": bm_mpo, "bcq": bcq, "bear": bear}
PENDULUM = "InvertedPendulum-v5"  # gymnasium MuJoCo: observation 4, action 1 in [-3, 3]
PENDULUM_KWARGS = {"reset_noise_scale": 0.05}  # not the registered default (0.01): evaluation must keep it


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    """A private Minari root and working directory for the whole file; gymnasium's registry entry of PENDULUM is
    restored after (a learning script registers the stored spec in-process)."""
    root, saved, cwd = tmp_path_factory.mktemp("minari"), os.environ.get("MINARI_DATASETS_PATH"), os.getcwd()
    registered = gym.registry[PENDULUM]
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    os.chdir(tmp_path_factory.mktemp("work"))
    yield root
    os.chdir(cwd)
    gym.registry[PENDULUM] = registered
    if saved is None:
        del os.environ["MINARI_DATASETS_PATH"]
    else:
        os.environ["MINARI_DATASETS_PATH"] = saved


def write_minari(dataset_id, episodes, **kwargs):
    """A Minari dataset made with Minari's own API from episodes {observations [T+1], actions, rewards, ...}."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, **episode) for i, episode in enumerate(episodes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari warns about every optional field left out
        return minari.create_dataset_from_buffers(dataset_id, buffers, algorithm_name="random", **kwargs)


def rollouts(env, count, seed):
    """Episodes of uniformly random actions, with infos as Minari's DataCollector keeps them (T + 1 entries)."""
    rng, episodes = np.random.default_rng(seed), []
    for i in range(count):
        observations = [env.reset(seed=seed + i)[0]]
        actions, rewards, terminations, truncations = [], [], [], []
        while not (terminations[-1:] == [True] or truncations[-1:] == [True]):
            actions.append(rng.uniform(env.action_space.low, env.action_space.high).astype(np.float32))
            observation, reward, terminated, truncated, _ = env.step(actions[-1])
            observations.append(observation)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated or len(rewards) == 40)
        episodes.append({"observations": np.array(observations), "actions": np.array(actions),
                         "rewards": np.array(rewards), "terminations": np.array(terminations),
                         "truncations": np.array(truncations), "infos": {"step": np.arange(len(rewards) + 1)}})
    return episodes


@pytest.fixture(scope="module")
def pendulum(minari_root):
    """`minari:test/pendulum/random-v0`: InvertedPendulum-v5 (non-default kwargs) with reference scores 0..1000."""
    env = gym.make(PENDULUM, **PENDULUM_KWARGS)
    write_minari("test/pendulum/random-v0", rollouts(env, 30, seed=0), env=env, ref_min_score=0.0, ref_max_score=1000.0)
    return "minari:test/pendulum/random-v0"


def import_error(source, env=None) -> str:
    """The one sentence minari_io.py refuses `source` with (what a learning script passes on)."""
    with pytest.raises(minari_io.UserError) as error:
        minari_io.import_dataset(minari_io.Import(source, output="refused.npz", env=env))
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_minari_io_carries_the_shared_blocks():
    reference = reference_blocks()
    copies = {m.group(1): m.group(0) for m in BLOCK.finditer((ROOT / "minari_io.py").read_text())}
    assert {"utilities", "env", "dataset"} <= set(copies)
    assert all(text == reference[name] for name, text in copies.items())


@pytest.mark.slow
@pytest.mark.parametrize("env", ["cartpole-balance", "sawyer"])
def test_round_trip_gives_the_npz_arrays(minari_root, env):
    npz = collect.train(collect.Args(env=env, episodes=2, warmup_steps=10**6, output=f"{env}.npz"))
    minari_io.export_dataset(minari_io.Export(dataset=str(npz), dataset_id=f"test/{env}/roundtrip-v0"))
    copy = minari_io.import_dataset(minari_io.Import(f"minari:test/{env}/roundtrip-v0"))
    assert copy == abm_mpo.minari_npz(f"minari:test/{env}/roundtrip-v0")  # the learning scripts' .npz copy
    with np.load(npz, allow_pickle=False) as original, np.load(copy, allow_pickle=False) as converted:
        keys = set(original.files) - {"metadata"}
        assert keys == set(converted.files) - {"metadata"} and keys >= {"observation", "next_observation", "run_id"}
        for key in keys:
            assert converted[key].dtype == original[key].dtype and np.array_equal(converted[key], original[key]), key
        assert converted["reward"].shape[1] == (7 if env == "sawyer" else 1) and ("task_id" in keys) == (env == "sawyer")
        metadata, ours = json.loads(str(converted["metadata"])), json.loads(str(original["metadata"]))
    assert {key: metadata[key] for key in ours} == ours  # our metadata whole, env alias included
    assert metadata["reference_scores"] == [0.0, 200.0 if env == "sawyer" else 1000.0]  # the return's bounds
    # A learning script without --env takes the dataset's, with that env's networks (Table 5 for sawyer).
    args = abm_mpo.Args(dataset=f"minari:test/{env}/roundtrip-v0")
    assert args.env is None
    made = abm_mpo.make_env(abm_mpo.dataset_env(args))
    assert args.env == env and args.policy_layers == ((200, 300) if env == "sawyer" else (256, 256))
    # Minari's own recovery makes the env the data came from (string entry points), same spaces as ours.
    import minari

    recovered = minari.load_dataset(f"test/{env}/roundtrip-v0").recover_environment()
    inner = made.env if env == "sawyer" else made  # ours rescales sawyer's actions to [-1, 1]
    assert recovered.observation_space.shape == made.observation_space.shape
    assert np.array_equal(recovered.action_space.low, inner.action_space.low)
    assert np.array_equal(recovered.reset(seed=3)[0], inner.reset(seed=3)[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_gymnasium_minari_dataset_trains_and_evaluates_in_its_env(pendulum, tmp_path, name):
    script = SCRIPTS[name]
    args = script.Args(dataset=pendulum, total_steps=2, eval_every=2, eval_episodes=2, batch_size=8,
                       num_action_samples=4, run_dir=str(tmp_path / name))
    summary = script.train(args)
    assert args.env == PENDULUM
    assert summary["final/normalised_return"] == pytest.approx(100 * summary["final/return"] / 1000)
    assert summary["per_task"]["task0"]["normalised_return"] == pytest.approx(summary["final/return"] / 10)
    # Evaluation ran in the env the dataset stores, kwargs included: same returns as in Minari's recovery.
    import minari

    recovered = minari.load_dataset("test/pendulum/random-v0").recover_environment(eval_env=True)
    eval_env = script.make_env(args.env)
    assert {k: v for k, v in eval_env.spec.kwargs.items() if k != "render_mode"} == PENDULUM_KWARGS
    assert recovered.spec.kwargs == PENDULUM_KWARGS
    act = lambda observation: np.array([0.1 * observation[1]], np.float32)  # noqa: E731
    assert script.evaluate(act, eval_env, 2, 100) == script.evaluate(act, recovered, 2, 100)


def test_the_copy_is_made_again_only_when_the_source_changed(pendulum, capsys):
    command = minari_io.Import(pendulum, output="copy.npz")
    for expected in (True, False):
        minari_io.import_dataset(command)
        assert ("Converting" in capsys.readouterr().out) == expected
    data = minari_io.minari_data_dir(pendulum) / "main_data.hdf5"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    minari_io.import_dataset(command)
    assert "Converting" in capsys.readouterr().out


def test_bad_input_is_one_sentence(minari_root, pendulum, tmp_path):
    assert "minari download nobody/nothing-v0" in import_error("minari:nobody/nothing-v0")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not data")
    assert "neither a Minari dataset" in import_error(str(tmp_path / "plain"))
    broken = minari_root / "test" / "broken-v0" / "data"
    broken.mkdir(parents=True)
    (broken / "metadata.json").write_text('{"minari_version": "0.5.4", "data_format": "hdf5"}')
    assert "cannot be read" in import_error("minari:test/broken-v0")
    (broken / "metadata.json").write_text('{"minari_version": "0.5.4", "data_format": "arrow"}')
    assert "only HDF5" in import_error(str(broken.parent))
    assert "spaces do not fit the env" in import_error(pendulum, env="cartpole-balance")  # sizes 4/1 against 5/1

    box = lambda *shape, low=-np.inf, high=np.inf: gym.spaces.Box(low, high, shape, np.float32)  # noqa: E731
    episode = {"observations": np.zeros((6, 5), np.float32), "actions": np.zeros((5, 1), np.float32),
               "rewards": np.ones(5), "terminations": np.zeros(5, bool), "truncations": np.r_[np.zeros(4, bool), True]}
    write_minari("test/wide-v0", [episode], observation_space=box(5), action_space=box(1, low=-2, high=2))
    assert "spaces do not fit the env" in import_error("minari:test/wide-v0", env="cartpole-balance")  # bounds
    assert "stores no environment; pass --env" in import_error("minari:test/wide-v0")
    write_minari("test/nan-v0", [{**episode, "rewards": np.r_[np.ones(4), np.nan]}], observation_space=box(5),
                 action_space=box(1, low=-1, high=1))
    assert "NaN or infinite values in its rewards" in import_error("minari:test/nan-v0", env="cartpole-balance")
    image = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    write_minari("test/image-v0", [{**episode, "observations": np.zeros((6, 8, 8, 3), np.uint8)}],
                 observation_space=image, action_space=box(1, low=-1, high=1))
    assert "flat vectors" in import_error("minari:test/image-v0", env="cartpole-balance")
    write_minari("test/dict-v0", [{**episode, "observations": {"position": np.zeros((6, 5), np.float32)}}],
                 observation_space=gym.spaces.Dict({"position": box(5)}), action_space=box(1, low=-1, high=1))
    assert "flat vectors" in import_error("minari:test/dict-v0", env="cartpole-balance")
    # A learning script passes the importer's sentence on as its own UserError.
    with pytest.raises(bm_mpo.UserError, match=r"^Minari dataset 'nobody/nothing-v0' is not in .*`$"):
        bm_mpo.train(bm_mpo.Args(dataset="minari:nobody/nothing-v0", run_dir=str(tmp_path / "run")))


def test_export_refuses_a_taken_or_malformed_id(minari_root, tmp_path):
    npz = collect.train(collect.Args(env="sawyer", episodes=1, output=str(tmp_path / "data.npz")))
    minari_io.export_dataset(minari_io.Export(dataset=str(npz), dataset_id="test/taken-v0"))
    with pytest.raises(minari_io.UserError, match="cannot write Minari dataset test/taken-v0: .* already exists"):
        minari_io.export_dataset(minari_io.Export(dataset=str(npz), dataset_id="test/taken-v0"))
    with pytest.raises(minari_io.UserError, match="is not a Minari id"):
        minari_io.export_dataset(minari_io.Export(dataset=str(npz), dataset_id="test/unversioned"))


@pytest.mark.slow
def test_command_line_error_and_no_minari_import_in_the_scripts(tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "bm_mpo.py"), "--dataset", "minari:nobody/nothing-v0",
                             "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("bm_mpo.py: error: Minari dataset 'nobody/nothing-v0' is not in")
    code = ("import sys; import abm_mpo, abm_svg, bm_mpo, bcq, bear, collect; "
            "abm_mpo.Args(); bcq.Args(dataset='minari:x-v0'); print('minari' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr
    assert "import minari" not in "".join((ROOT / f"{name}.py").read_text() for name in SCRIPTS)


def test_a_file_at_output_that_is_no_conversion_is_kept_unless_overwrite(pendulum, tmp_path, capsys):
    """Seen by hand in collect.py, the same here: an --output naming a dataset of the user's own was replaced by the
    conversion (anything that was not a conversion of this source was "made again")."""
    theirs = write_random_dataset(tmp_path / "theirs.npz")
    before = theirs.read_bytes()
    with pytest.raises(minari_io.UserError, match=r"theirs.npz exists and is not a conversion of a Minari dataset: "
                                                  r"writing to another --output keeps it, --overwrite replaces it$"):
        minari_io.import_dataset(minari_io.Import(pendulum, output=str(theirs)))
    assert theirs.read_bytes() == before
    minari_io.import_dataset(minari_io.Import(pendulum, output=str(theirs), overwrite=True))
    assert "Converting" in capsys.readouterr().out
    with np.load(theirs) as archive:
        assert "source" in json.loads(str(archive["metadata"]))["minari"]
    # a conversion is only a copy: once its source changes, it is made again without --overwrite
    other = minari_io.minari_data_dir(pendulum) / "main_data.hdf5"
    os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**9))
    minari_io.import_dataset(minari_io.Import(pendulum, output=str(theirs)))
    assert "Converting" in capsys.readouterr().out
