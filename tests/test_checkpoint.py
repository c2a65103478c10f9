"""Checkpoints on 8 fake CPU devices: sharded round trip, load_run, config compatibility, errors."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from microforge_jax import checkpoint
from microforge_jax.checkpoint import RunError, StageCheckpointer
from microforge_jax.sharding import make_mesh


def _config(**model) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "t"
    c.num_steps = 10
    c.model = ml_collections.ConfigDict({"latent_channels": 4, "vae": {"channels": (8, 16), "scaling_factor": 1.0}})
    c.model.update(model)
    c.sharding = ml_collections.ConfigDict({"rules": (("batch", ("data", "fsdp")), ("embed", "fsdp"))})
    return c


def _state(params, seed):
    """A train state as the trainer saves it; ema_params differ from params."""
    rng = np.random.default_rng(seed)
    ema = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    opt_state = optax.adam(1e-3).init(params)
    return {"step": jnp.int32(seed), "params": params, "ema_params": ema, "opt_state": opt_state}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root with its (mtime_ns, size): a write anywhere shows up."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    st = root.stat()
    out["."] = (st.st_mtime_ns, st.st_size)
    return out


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(("data", "fsdp"), (4, 2))


@pytest.fixture(scope="module")
def sharded_params(mesh):
    """A tiny two-model tree, sharded over (data=4, fsdp=2) and partly replicated."""
    s_fsdp = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
    s_both = NamedSharding(mesh, PartitionSpec("data", "fsdp"))
    s_rep = NamedSharding(mesh, PartitionSpec())
    rng = np.random.default_rng(0)
    put = lambda shape, s: jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.float32), s)
    return {
        "denoiser": {"dense": {"kernel": put((8, 4), s_both), "bias": put((4,), s_rep)}},
        "text": {"embed": put((6, 4), s_fsdp)},
    }


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, sharded_params):
    """A run dir: config.json, a "vae" stage (ema_params = the VAE tree), a "flow" stage (named trees)."""
    workdir = tmp_path_factory.mktemp("run")
    config = _config()
    checkpoint.save_run_config(workdir, config)
    vae_params = {"encoder": {"conv": {"kernel": jnp.arange(24.0).reshape(2, 3, 4)}}}
    with StageCheckpointer(workdir, "vae") as ckpt:
        ckpt.save(3, _state(vae_params, 3))
    with StageCheckpointer(workdir, "flow") as ckpt:
        ckpt.save(5, _state(sharded_params, 4))
        ckpt.save(7, _state(sharded_params, 7))
    return workdir, config, vae_params


def test_sharded_round_trip(tmp_path, mesh, sharded_params):
    states = {step: _state(sharded_params, step) for step in (2, 4)}
    with StageCheckpointer(tmp_path, "flow", max_to_keep=3) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state)
        assert not ckpt.save(4, states[4], force=True)  # already saved: a no-op, not an error
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [2, 4]

    # Restore with the training shardings (a fresh manager, as when resuming).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states[4])
    with StageCheckpointer(tmp_path, "flow") as ckpt:
        restored = ckpt.restore(None, abstract)
        older = ckpt.restore(2, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(states[4])
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states[4])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert int(older["step"]) == 2
    assert not np.array_equal(np.asarray(older["ema_params"]["text"]["embed"]), restored["ema_params"]["text"]["embed"])
    kernel = restored["params"]["denoiser"]["dense"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec("data", "fsdp") and len(kernel.addressable_shards) == 8

    # Written on 8 devices, restored onto one.
    one = SingleDeviceSharding(jax.devices()[0])
    abstract_1 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), states[4])
    with StageCheckpointer(tmp_path, "flow") as ckpt:
        single = ckpt.restore(4, abstract_1)
    for got, want in zip(jax.tree.leaves(single), jax.tree.leaves(states[4])):
        assert got.sharding == one
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_max_to_keep_and_interval(tmp_path):
    with StageCheckpointer(tmp_path, "vae", max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(s, {"step": jnp.int32(s)}) for s in range(1, 7)]
        assert ckpt.save(7, {"step": jnp.int32(7)}, force=True)
        ckpt.wait_until_finished()
        # Orbax always saves the first step a manager sees, then every save_interval_steps.
        assert saved == [True, True, False, True, False, True]
        assert ckpt.all_steps() == [6, 7]
    assert checkpoint.latest_steps(tmp_path) == {"vae": 7}


def test_load_run_returns_ema_on_one_device(fake_run, sharded_params):
    workdir, config, vae_params = fake_run
    before = _snapshot(workdir)
    loaded_config, params = checkpoint.load_run(workdir)
    assert _snapshot(workdir) == before  # reads only
    assert loaded_config.to_dict() == checkpoint.read_run_config(workdir).to_dict()
    assert loaded_config.model.vae.channels == (8, 16) and loaded_config.num_steps == 10
    assert set(params) == {"vae", "denoiser", "text"}
    assert checkpoint.latest_steps(workdir) == {"vae": 3, "flow": 7}

    want = {"vae": _state(vae_params, 3)["ema_params"], **_state(sharded_params, 7)["ema_params"]}
    not_ema = {"vae": vae_params, **sharded_params}
    for got, ema, raw in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(not_ema)):
        assert len(got.devices()) == 1 and isinstance(got.sharding, SingleDeviceSharding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ema))
        assert not np.array_equal(np.asarray(got), np.asarray(raw))
    assert jax.tree.structure(params) == jax.tree.structure(want)


def test_load_run_and_restore_take_a_relative_workdir(fake_run, monkeypatch):
    """`--workdir runs/nano` is relative; Orbax itself refuses relative paths."""
    workdir, _, _ = fake_run
    monkeypatch.chdir(workdir.parent)
    _, params = checkpoint.load_run(workdir.name)
    assert set(params) == {"vae", "denoiser", "text"}
    restored = checkpoint.restore_stage_params(workdir.name, "flow", ("ema_params",))
    assert jax.tree.leaves(restored)


def test_load_run_edit_overrides_flow(tmp_path, sharded_params):
    checkpoint.save_run_config(tmp_path, _config())
    with StageCheckpointer(tmp_path, "flow") as ckpt:
        ckpt.save(1, _state(sharded_params, 1))
    edit_denoiser = {"dense": {"kernel": jnp.ones((2, 2))}}
    with StageCheckpointer(tmp_path, "edit") as ckpt:
        ckpt.save(9, {"step": jnp.int32(9), "ema_params": {"denoiser": edit_denoiser}})
    _, params = checkpoint.load_run(tmp_path)
    assert set(params) == {"denoiser", "text"}  # no "vae" stage here
    np.testing.assert_array_equal(params["denoiser"]["dense"]["kernel"], np.ones((2, 2)))
    want_text = _state(sharded_params, 1)["ema_params"]["text"]["embed"]
    np.testing.assert_array_equal(params["text"]["embed"], np.asarray(want_text))


def _one_line_error(workdir: Path, match: str) -> str:
    with pytest.raises(RunError, match=match) as info:
        checkpoint.load_run(workdir)
    message = str(info.value)
    assert "\n" not in message and str(workdir) in message
    return message


def test_load_run_errors(tmp_path, fake_run):
    _one_line_error(tmp_path / "nope", "does not exist")
    assert not (tmp_path / "nope").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(empty, "no config.json")
    assert list(empty.iterdir()) == []

    only_config = tmp_path / "only_config"
    checkpoint.save_run_config(only_config, _config())
    before = _snapshot(only_config)
    _one_line_error(only_config, "no checkpoints")
    assert _snapshot(only_config) == before


# Orbax leaves a background asyncio callback behind when a read fails; harmless, reported by pytest.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["array_data", "metadata", "no_state"])
def test_load_run_corrupt_checkpoint(tmp_path, fake_run, damage):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(fake_run[0], workdir)
    state_dir = workdir / "checkpoints" / "flow" / "7" / "state"
    if damage == "array_data":  # truncated array chunks: a crash mid-copy, a full disk
        chunks = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
        assert chunks
        for p in chunks:
            p.write_bytes(b"")
    elif damage == "metadata":
        (state_dir / "_METADATA").write_text("{")
    else:
        shutil.rmtree(state_dir)
    before = _snapshot(workdir)
    message = _one_line_error(workdir, "cannot be read|incomplete")
    assert str(workdir / "checkpoints" / "flow" / "7") in message
    assert _snapshot(workdir) == before


def test_unfinished_save_is_ignored(tmp_path, fake_run):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(fake_run[0], workdir)
    # A save killed mid-write leaves only Orbax's temporary directory.
    (workdir / "checkpoints" / "flow" / "9.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    assert checkpoint.latest_steps(workdir) == {"vae": 3, "flow": 7}
    _, params = checkpoint.load_run(workdir)
    assert set(params) == {"vae", "denoiser", "text"}


def test_real_config_round_trip(tmp_path):
    from microforge_jax.config import ModelConfig, load_config

    config = load_config("nano")
    checkpoint.save_run_config(tmp_path, config)
    back = checkpoint.read_run_config(tmp_path)
    assert back.to_dict() == config.to_dict()
    assert ModelConfig.from_config(back) == ModelConfig.from_config(config)
    checkpoint.check_compatible(back, config)
    with pytest.raises(RunError, match="model.backbone.depth"):
        checkpoint.check_compatible(back, load_config("nano", ["model.backbone.depth=2"]))


def test_a_run_saved_before_a_key_existed_resumes_with_its_old_value():
    from microforge_jax.config import ModelConfig, load_config

    old = load_config("nano", ["model.backbone.patch_size=1"])
    with old.unlocked():
        del old.model.backbone["patch_size"]  # config.json of a run saved before patch_size existed
    assert ModelConfig.from_config(old).backbone.patch_size == 1
    checkpoint.check_compatible(old, load_config("nano", ["model.backbone.patch_size=1"]))
    with pytest.raises(RunError, match="patch_size is 1 in the saved run but 2"):
        checkpoint.check_compatible(old, load_config("nano"))

    # Every key added since: a run saved without it resumes under today's default config.
    old = load_config("nano")
    with old.unlocked():
        del old.model.backbone["source_positions"]
    assert ModelConfig.from_config(old).backbone.source_positions == "grid"
    checkpoint.check_compatible(old, load_config("nano"))
    with pytest.raises(RunError, match="source_positions is 'grid' in the saved run but 'aligned'"):
        checkpoint.check_compatible(old, load_config("nano", ["model.backbone.source_positions=aligned"]))


def test_run_config_round_trip_is_atomic(tmp_path):
    config = _config()
    path = checkpoint.save_run_config(tmp_path, config)
    checkpoint.save_run_config(tmp_path, config)  # overwriting leaves no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert json.loads(path.read_text())["model"]["vae"]["channels"] == [8, 16]
    back = checkpoint.read_run_config(tmp_path)
    assert back.model.vae.channels == (8, 16)  # tuples come back as declared
    assert back.sharding.rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"))
    checkpoint.check_compatible(back, config)


def test_check_compatible():
    saved = _config()
    checkpoint.check_compatible(saved, _config())
    trained_longer = _config()
    trained_longer.num_steps = 1000
    checkpoint.check_compatible(saved, trained_longer)  # training keys may change
    measured = _config()
    measured.model.vae.scaling_factor = 0.37  # measured after the VAE stage and saved
    checkpoint.check_compatible(measured, _config())
    with pytest.raises(RunError, match=r"checkpoint from another config: model\.latent_channels is 4 .* 8"):
        checkpoint.check_compatible(saved, _config(latent_channels=8))
    with pytest.raises(RunError, match=r"model\.vae\.channels"):
        checkpoint.check_compatible(saved, _config(vae={"channels": (8, 32), "scaling_factor": 1.0}))
    with pytest.raises(RunError, match=r"model\.extra is absent"):
        checkpoint.check_compatible(saved, _config(extra=1))


def test_restore_missing_iterator_state(tmp_path):
    with StageCheckpointer(tmp_path, "vae") as ckpt:
        ckpt.save(1, {"step": jnp.int32(1)})
        ckpt.wait_until_finished()
        with pytest.raises(RunError, match="no data iterator state"):
            ckpt.restore(1, {"step": jax.ShapeDtypeStruct((), jnp.int32)}, data_iterator=iter([]))
    with pytest.raises(RunError, match="no checkpoint to restore"):
        StageCheckpointer(tmp_path, "edit").restore(None, {})
    with pytest.raises(ValueError, match="unknown stage"):
        StageCheckpointer(tmp_path, "nope")


def test_sigterm_sets_the_stop_event(tmp_path):
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with StageCheckpointer(tmp_path, "vae") as ckpt:
            event = checkpoint.install_sigterm_handler(ckpt)
            assert not event.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            assert event.is_set() and ckpt.stop_requested is event
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_agree_to_stop_in_one_process_is_the_local_flag():
    """One process: every step answers with its own flag (no collective); `every` only spaces multi-host checks."""
    assert jax.process_count() == 1
    for step in (1, 2, 3, None):
        assert checkpoint.agree_to_stop(True, step, every=10) is True
        assert checkpoint.agree_to_stop(False, step, every=10) is False


def test_load_run_of_a_resumable_run_logs_no_orbax_warnings(tmp_path, caplog):
    """A run saved with its data iterator loads without Orbax's "found but could not be restored" noise."""
    import grain

    checkpoint.save_run_config(tmp_path, _config())
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(it)
    with StageCheckpointer(tmp_path, "vae") as ckpt:
        state = _state({"w": jnp.ones((2,))}, 2)
        ckpt.save(2, state, data_iterator=it)
    caplog.clear()
    with caplog.at_level("WARNING"):
        _, params = checkpoint.load_run(tmp_path)
    assert (tmp_path / "checkpoints" / "vae" / "2" / checkpoint.DATA_ITEM).is_dir()  # the item that used to warn
    np.testing.assert_array_equal(params["vae"]["w"], state["ema_params"]["w"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
