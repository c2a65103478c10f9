"""The trainer: the whole curriculum on a tiny config, exact resume, and failure handling."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from microforge_jax import checkpoint, train_lib
from microforge_jax.config import load_config

TINY = (
    "image_size=32",
    "model.latent_channels=4",
    "model.vae.channels=(8,16)",
    "model.vae.downsample_factor=4",
    "model.backbone.depth=2",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=1",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.text.max_length=40",
    "train.vae.disc_start=1",
    "train.vae.disc_channels=8",
    "train.vae.scale_batches=1",
    "log_every=1",
    "checkpoint_every=2",
)


def _config(*overrides, steps=2, batch=8):
    per_stage = [
        f"train.{s}.{k}={v}" for s in ("vae", "flow", "edit") for k, v in (("steps", steps), ("batch_size", batch))
    ]
    return load_config("nano", TINY + tuple(per_stage) + tuple(overrides))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    summary = train_lib.train_and_evaluate(_config(), workdir)
    return workdir, summary


def test_curriculum_trains_every_stage(finished_run):
    workdir, summary = finished_run
    assert checkpoint.latest_steps(workdir) == {"vae": 2, "flow": 2, "edit": 2}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for stage in ("vae", "flow", "edit"):
        losses = [r["train/loss"] for r in lines if r["stage"] == stage]
        assert len(losses) == 2 and all(np.isfinite(losses)), stage
    assert any("train/psnr" in r for r in lines if r["stage"] == "vae")
    assert any((workdir / "tensorboard").iterdir())


def test_latent_scale_and_shift_are_measured_into_config_json(finished_run):
    workdir, _ = finished_run
    saved = checkpoint.read_run_config(workdir)
    assert saved.model.vae.scaling_factor != 1.0 and saved.model.vae.shift_factor != 0.0
    assert saved.model.text.embed_dim == 384  # resolved from MiniLM's config.json


def test_load_run_returns_ema_params_for_inference(finished_run):
    workdir, _ = finished_run
    config, params = checkpoint.load_run(workdir)
    assert set(params) == {"vae", "denoiser"}
    leaves = jax.tree.leaves(params["denoiser"])
    assert leaves and all(len(x.devices()) == 1 for x in leaves)
    # The edit stage started from the flow model, so its EMA differs from a fresh init but is
    # close to flow's (two small steps at a low learning rate).
    flow = checkpoint.restore_stage_params(workdir, "flow", ("ema_params",))["ema_params"]["denoiser"]
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(flow), leaves)]
    assert max(diffs) < 0.05


def test_rerunning_a_finished_run_changes_nothing(finished_run, capsys):
    workdir, _ = finished_run
    before = sorted(p.name for p in (workdir / "checkpoints" / "flow").iterdir())
    train_lib.train_and_evaluate(_config(), workdir)
    assert "already trained" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "checkpoints" / "flow").iterdir()) == before


def test_a_run_refuses_another_model_config(finished_run):
    workdir, _ = finished_run
    with pytest.raises(checkpoint.RunError, match="model.backbone.depth is 2 in the saved run but 3"):
        train_lib.train_and_evaluate(_config("model.backbone.depth=3"), workdir)


def test_config_for_run_resumes_with_the_runs_own_config(finished_run):
    workdir, _ = finished_run
    config, path = train_lib.config_for_run(None, ["train.flow.steps=7"], str(workdir))
    assert path == workdir and config.model.backbone.depth == 2 and config.train.flow.steps == 7


def test_sigterm_then_resume_is_exact(tmp_path, monkeypatch):
    """SIGTERM after two of four steps saves and exits; resuming == four steps straight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = _config("stages=('vae',)", steps=4)
    train_lib.train_and_evaluate(config, straight)

    real_install = checkpoint.install_sigterm_handler

    def install_and_kill_after_two_steps(ckpt):
        event = real_install(ckpt)
        calls = {"n": 0}

        class Probe:  # the loop checks `is_set()` once per dispatched step
            def is_set(self):
                calls["n"] += 1
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # the real handler sets the real event
                return event.is_set()

        return Probe()

    monkeypatch.setattr(checkpoint, "install_sigterm_handler", install_and_kill_after_two_steps)
    with pytest.raises(SystemExit) as exit_info:
        train_lib.train_and_evaluate(config, resumed)
    assert exit_info.value.code == 143
    assert checkpoint.latest_steps(resumed) == {"vae": 2}
    monkeypatch.undo()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    train_lib.train_and_evaluate(config, resumed)
    a = checkpoint.restore_stage_params(straight, "vae")
    b = checkpoint.restore_stage_params(resumed, "vae")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # ... and training did move the parameters.
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(a["ema_params"])))


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(train_lib.TrainingError, match=r"non-finite loss .* at step 1"):
        train_lib.train_and_evaluate(_config("stages=('vae',)", "train.vae.l1_weight=nan"), tmp_path)
