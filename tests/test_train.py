"""The trainer: the whole curriculum on a tiny config, exact resume, and failure handling."""

import json
import os
import signal
import types

import jax
import numpy as np
import pytest
from helpers import tiny_config

from microforge_jax import checkpoint, train_lib

_config = tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = _config("eval_every=1", "sample_every=1", "final_eval.num=4", "final_eval.steps=2", "final_eval.edits=2")
    summary = train_lib.train_and_evaluate(config, workdir)
    return workdir, summary


def test_curriculum_trains_every_stage(finished_run):
    workdir, summary = finished_run
    assert checkpoint.latest_steps(workdir) == {"vae": 2, "flow": 2, "edit": 2}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for stage in ("vae", "flow", "edit"):
        losses = [r["train/loss"] for r in lines if r["stage"] == stage and "train/loss" in r]
        assert len(losses) == 2 and all(np.isfinite(losses)), stage
    assert any("train/psnr" in r for r in lines if r["stage"] == "vae")
    assert any((workdir / "tensorboard").iterdir())


def test_validation_losses_and_sample_grids(finished_run):
    from PIL import Image

    workdir, _ = finished_run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for stage, width in (("flow", 4 * 32), ("edit", 8 * 32)):
        val = [r for r in lines if r["stage"] == stage and "val/loss" in r]
        assert [r["step"] for r in val] == [1, 2], stage  # eval_every=1, and once at the end
        for r in val:
            per_t = [r[f"val/loss_t{t}"] for t in ("0.1", "0.3", "0.5", "0.7", "0.9")]
            assert all(np.isfinite(per_t)) and np.isclose(r["val/loss"], np.mean(per_t), rtol=1e-5)
        for step in (1, 2):  # sample_every=1: a grid after each step (flow 2x4, edit sources above edits)
            assert Image.open(workdir / "samples" / f"{stage}_{step}.png").size == (width, 64)


def test_init_from_starts_from_another_runs_ema(finished_run, tmp_path):
    source, _ = finished_run
    workdir = tmp_path / "finetune"
    # No "vae" stage: the source's VAE (and its latent scale/shift) is copied in.
    config = train_lib.prepare_run(_config("stages=('flow',)", f"init_from={source}", steps=0), workdir)
    assert checkpoint.latest_steps(workdir) == {"vae": 2}
    assert config.model.vae.scaling_factor == checkpoint.read_run_config(source).model.vae.scaling_factor
    mesh, rules = train_lib._mesh(config)
    vae = checkpoint.restore_stage_params(workdir, "vae", ("ema_params",))["ema_params"]
    ema = train_lib.run_flow_stage("flow", config, workdir, mesh, rules, vae)  # 0 steps: the initial state
    want = checkpoint.restore_stage_params(source, "flow", ("ema_params",))["ema_params"]
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_refuses_another_model_config(finished_run, tmp_path):
    source, _ = finished_run
    with pytest.raises(checkpoint.RunError, match=r"model.backbone.depth is 2 in the --init_from run .* but 3"):
        train_lib.prepare_run(_config("model.backbone.depth=3", f"init_from={source}"), tmp_path)
    assert not (tmp_path / "config.json").exists()  # refused before anything is written


def test_the_run_ends_with_shapes_eval(finished_run):
    """train -> checkpoint -> sample -> evaluate, as `python train.py` does for nano."""
    workdir, summary = finished_run
    saved = json.loads((workdir / "eval.json").read_text())
    assert saved["generation"]["num_images"] == 4 and 0.0 <= saved["generation"]["all"] <= 1.0
    assert np.isfinite(saved["vae_psnr_db"]) and saved["edit"]["num"] == 2
    assert summary["eval"]["settings"]["steps"] == 2
    assert (workdir / "eval_grid.png").is_file()


def test_latent_scale_and_shift_are_measured_into_config_json(finished_run):
    workdir, _ = finished_run
    saved = checkpoint.read_run_config(workdir)
    assert saved.model.vae.scaling_factor != 1.0 and saved.model.vae.shift_factor != 0.0
    assert saved.model.text.embed_dim == 384  # resolved from MiniLM's config.json


def test_a_vae_checkpoint_without_config_json_gets_its_latent_stats_measured(finished_run, tmp_path):
    """A run directory put together by hand (the VAE checkpoints copied, no config.json): the flow
    stage measures the latent scale/shift instead of training on raw latents (scale 1, shift 0)."""
    import shutil

    source, _ = finished_run
    workdir = tmp_path / "handmade"
    shutil.copytree(source / "checkpoints" / "vae", workdir / "checkpoints" / "vae")
    train_lib.train_and_evaluate(_config("stages=('flow',)", steps=0), workdir)
    got, want = checkpoint.read_run_config(workdir).model.vae, checkpoint.read_run_config(source).model.vae
    assert got.scaling_factor != 1.0 and got.shift_factor != 0.0
    np.testing.assert_allclose(
        [got.scaling_factor, got.shift_factor], [want.scaling_factor, want.shift_factor], rtol=1e-5
    )


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


# ----------------------------------------------------------------------------- steps: accumulation, bf16, remat


def _flow_step_setup(redraw, *overrides, batch=4):
    """A redrawn tiny flow model, its train state, one batch and the frozen inputs (no text encoder)."""
    import jax.numpy as jnp
    import ml_collections

    from microforge_jax import optim, train_steps
    from microforge_jax.config import ModelConfig
    from microforge_jax.models.denoiser import Text, build_denoiser
    from microforge_jax.models.vae import build_vae

    # One block keeps the compiles short; the planner (and its self-conditioning split) stays on.
    config = _config(
        "model.backbone.depth=1", "train.flow.warmup_steps=0", "train.flow.caption_dropout=0.5", *overrides
    )
    cfg = ModelConfig.from_config(config)
    den, vae = build_denoiser(cfg), build_vae(cfg)
    rng = np.random.default_rng(0)
    m, e, side = 40, 384, config.image_size // cfg.vae.downsample_factor
    text = Text(
        jnp.asarray(rng.standard_normal((batch, m, e)), jnp.float32),
        jnp.ones((batch, m), bool),
        jnp.asarray(rng.standard_normal((batch, e)), jnp.float32),
    )
    z, t = jnp.zeros((batch, side, side, cfg.latent_channels)), jnp.zeros((batch,))
    image = jnp.asarray(rng.uniform(-1, 1, (batch, config.image_size, config.image_size, 3)), jnp.float32)
    # Jitted inits: eager Flax inits cost seconds op by op; compiled ones hit the persistent cache.
    params = redraw({"denoiser": jax.jit(den.init)(jax.random.key(0), z, t, text)}, seed=0)
    frozen = {
        "vae": redraw(jax.jit(vae.init)(jax.random.key(1), image), seed=1),
        "empty_text": Text(jnp.zeros((1, m, e)), jnp.ones((1, m), bool), jnp.zeros((1, e))),
    }
    batch_ = {"image": image, "text_tokens": text.tokens, "text_mask": text.mask, "text_pooled": text.pooled}

    def run(grad_accum: int):
        hp = ml_collections.ConfigDict({**config.train.flow.to_dict(), "grad_accum": grad_accum})
        tx = optim.make_optimizer(hp)
        spec = train_steps.FlowStep(den, vae, tx, hp, diversity_weight=0.01)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}
        step = jax.jit(lambda s, b, r, f: train_steps.flow_train_step(spec, s, b, r, f))
        return step(state, batch_, jax.random.key(3), frozen)

    return run, params


def test_grad_accum_gives_the_one_batch_update(redraw, relerr):
    run, before = _flow_step_setup(redraw)
    (one, m1), (two, m2) = run(1), run(2)
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
    assert relerr(flat(one["params"]), flat(before)) > 1e-6  # the step did move the parameters
    assert relerr(flat(two["params"]), flat(one["params"])) <= 1e-5
    assert relerr(m2["train/grad_norm"], m1["train/grad_norm"]) <= 1e-5
    assert relerr(m2["train/loss"], m1["train/loss"]) <= 1e-5


def test_bf16_compute_keeps_fp32_master_weights(redraw):
    run, _ = _flow_step_setup(redraw, "model.dtype=bfloat16")
    state, metrics = run(2)
    for key in ("params", "ema_params", "opt_state"):
        floats = [x for x in jax.tree.leaves(state[key]) if np.issubdtype(np.asarray(x).dtype, np.floating)]
        assert floats and all(x.dtype == np.float32 for x in floats), key
    assert metrics["train/loss"].dtype == np.float32 and np.isfinite(float(metrics["train/loss"]))
    assert np.isfinite(float(metrics["train/grad_norm"]))


def test_remat_keeps_parameter_names_and_gradients(redraw, relerr):
    import jax.numpy as jnp

    from microforge_jax.config import ModelConfig
    from microforge_jax.models.denoiser import Text, build_denoiser

    plain = build_denoiser(ModelConfig.from_config(_config("model.backbone.depth=1")))
    remat = build_denoiser(ModelConfig.from_config(_config("model.backbone.depth=1", "model.backbone.remat=True")))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    text = Text(
        jnp.asarray(rng.standard_normal((2, 40, 384)), jnp.float32), jnp.ones((2, 40), bool), jnp.ones((2, 384))
    )
    init = lambda model: jax.jit(model.init)(jax.random.key(0), z, t, text)
    shapes = lambda model: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(lambda: init(model)))
    assert shapes(plain) == shapes(remat)  # same names, shapes and dtypes: the checkpoints are interchangeable
    params = redraw(init(plain))
    uncond = Text(jnp.zeros_like(text.tokens), text.mask, jnp.zeros_like(text.pooled))
    v, _ = plain.apply(params, z, t, text)
    v_uncond, _ = plain.apply(params, z, t, uncond)
    assert float(jnp.std(v)) > 0 and relerr(v_uncond, v) > 1e-3  # non-degenerate and conditioned

    def grads(model):
        loss = lambda p: jnp.sum(jnp.square(model.apply(p, z, t, text)[0]))
        g = jax.jit(jax.grad(loss))(params)
        # Normwise over the whole tree: some leaves' true gradient is zero (a bias before a norm),
        # and a leaf of pure rounding noise has no meaningful relative error of its own.
        return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])

    assert relerr(grads(remat), grads(plain)) <= 1e-5


# ----------------------------------------------------------------------------- cached latents


def test_cached_latents_give_the_same_losses_and_hit_from_the_second_epoch(tmp_path, redraw, capsys, monkeypatch):
    """A folder of 16 images, batch 8: steps 3-4 are the second epoch, served from the latent cache."""
    import jax.numpy as jnp
    from PIL import Image

    from microforge_jax.config import ModelConfig
    from microforge_jax.models.vae import build_vae

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    monkeypatch.setattr(train_lib, "_periodic", lambda *a, **kw: None)  # no validation loss / sample grid
    monkeypatch.setattr(checkpoint.StageCheckpointer, "save", lambda *a, **kw: False)  # no checkpoints (seconds each)
    base = ("data.source=folder", f"data.path={folder}", "stages=('flow',)", "train.flow.warmup_steps=0")
    # The smallest denoiser (shorter compiles): what is tested is the latents it is given.
    base += ("model.backbone.depth=1", "model.backbone.use_planner=False", "model.backbone.use_shared_attn=False")
    base += ("checkpoint_every=100",)
    losses, vae_params = {}, None
    for cached in (False, True):
        workdir = tmp_path / f"cached_{cached}"
        config = train_lib.prepare_run(_config(*base, f"train.flow.cache_latents={cached}", steps=4, batch=8), workdir)
        if vae_params is None:  # one redrawn (non-degenerate) VAE for both runs
            vae = build_vae(ModelConfig.from_config(config))
            image = jnp.zeros((1, 32, 32, 3))
            vae_params = jax.device_get(redraw(jax.jit(vae.init)(jax.random.key(0), image), seed=3))
        mesh, rules = train_lib._mesh(config)
        train_lib.run_flow_stage("flow", config, workdir, mesh, rules, vae_params)
        lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        losses[cached] = [r["train/loss"] for r in lines if "train/loss" in r]
    out = capsys.readouterr().out
    # Epoch 1 (steps 1-2): 16 images encoded; epoch 2 (steps 3-4): all 16 from the cache.
    assert "[flow] latent cache: 16 images cached, 16/32 lookups hit" in out, out
    assert len(losses[True]) == 4 and len(set(losses[True])) == 4
    err = float(np.max(np.abs(np.subtract(losses[True], losses[False])) / np.abs(losses[False])))
    print(f"\ncached vs encoded latents, flow losses: max relative difference {err:.1e}")
    assert err <= 1e-5, (losses[True], losses[False])


def test_flow_objects_p_shapes_the_training_scenes_not_the_validation_ones():
    from microforge_jax.eval.shapes_eval import detect_objects  # noqa: PLC0415

    config = _config("image_size=64", "train.flow.objects_p=(1.0,0.0,0.0)", batch=16)
    hp = config.train.flow
    counts = lambda batch: [
        len(detect_objects(np.rint((im + 1.0) * 127.5).astype(np.uint8))) for im in batch["image"]
    ]  # fmt: skip
    assert counts(next(iter(train_lib._stage_data(config, "flow", hp)))) == [1] * 16
    assert len(set(counts(next(iter(train_lib._stage_data(config, "flow", hp, split="val")))))) > 1
    # other stages (no such key) keep the world's own mix
    assert len(set(counts(next(iter(train_lib._stage_data(config, "vae", config.train.vae)))))) > 1


def test_edit_step_generate_term_trains_text_to_image_on_the_targets(redraw, relerr):
    """`train.edit.generate_weight`: loss = edit flow loss + w * a caption-conditioned, source-free loss."""
    import jax.numpy as jnp
    import ml_collections

    from microforge_jax import optim, train_steps
    from microforge_jax.config import ModelConfig
    from microforge_jax.models.denoiser import Text, build_denoiser
    from microforge_jax.models.vae import build_vae

    config = _config("model.backbone.depth=1", "train.edit.warmup_steps=0")
    cfg = ModelConfig.from_config(config)
    den, vae = build_denoiser(cfg), build_vae(cfg)
    rng = np.random.default_rng(0)
    b, m, e, side = 4, 40, 384, config.image_size // cfg.vae.downsample_factor
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    image = lambda: jnp.asarray(rng.uniform(-1, 1, (b, config.image_size, config.image_size, 3)), jnp.float32)
    z = jnp.zeros((b, side, side, cfg.latent_channels))
    text = Text(arr(b, m, e), jnp.ones((b, m), bool), arr(b, e))
    params = redraw(
        {"denoiser": jax.jit(den.init)(jax.random.key(0), z, jnp.zeros((b,)), text, source_BxhxwxC=z)}, seed=0
    )
    target = image()
    frozen = {
        "vae": redraw(jax.jit(vae.init)(jax.random.key(1), target), seed=1),
        "empty_text": Text(jnp.zeros((1, m, e)), jnp.ones((1, m), bool), jnp.zeros((1, e))),
    }
    batch = {
        "image": target, "source": image(), "task": jnp.full((b,), 1, jnp.int32),
        "text_tokens": text.tokens, "text_mask": text.mask, "text_pooled": text.pooled,
        "gen_text_tokens": arr(b, m, e), "gen_text_mask": jnp.ones((b, m), bool), "gen_text_pooled": arr(b, e),
    }  # fmt: skip

    def step(weight):
        hp = ml_collections.ConfigDict({**config.train.edit.to_dict(), "generate_weight": weight})
        tx = optim.make_optimizer(hp)
        spec = train_steps.FlowStep(den, vae, tx, hp, diversity_weight=0.01)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}
        return jax.jit(lambda bt: train_steps.flow_train_step(spec, state, bt, jax.random.key(3), frozen)[1])

    with_gen, without = step(0.5), step(0.0)
    m1, m0 = with_gen(batch), without({k: v for k, v in batch.items() if not k.startswith("gen_")})
    assert "train/generate_loss" in m1 and "train/generate_loss" not in m0
    assert relerr(m1["train/flow_loss"], m0["train/flow_loss"]) <= 1e-6  # the edit term is unchanged
    expected = m1["train/flow_loss"] + 0.5 * m1["train/generate_loss"] + 0.01 * m1["train/plan_diversity"]
    assert relerr(m1["train/loss"], expected) <= 1e-6
    assert float(m1["train/grad_norm"]) != float(m0["train/grad_norm"])
    # The generate term sees the targets and the captions, never the source.
    other_source = with_gen({**batch, "source": image()})
    assert float(other_source["train/generate_loss"]) == float(m1["train/generate_loss"])
    assert float(other_source["train/flow_loss"]) != float(m1["train/flow_loss"])
    other_caption = with_gen({**batch, "gen_text_pooled": arr(b, e), "gen_text_tokens": arr(b, m, e)})
    assert float(other_caption["train/generate_loss"]) != float(m1["train/generate_loss"])
    assert float(other_caption["train/flow_loss"]) == float(m1["train/flow_loss"])


# ----------------------------------------------------------------------------- the flow step's batch split

# A stand-in denoiser makes what the step hands the model observable (and costs no model compile):
# caption dropout, the self-conditioning pass, the diversity term and the EMA, on a batch large
# enough for binomial bounds on the dropped / self-conditioned fractions.
PROBE_B, PROBE_M, PROBE_E, PROBE_K, PROBE_D = 4096, 3, 4, 2, 3


class _ProbeDenoiser:
    """Two scalar parameters: the first pass's plan is `a * tokens[:, :K, :D]`, the main pass's plan
    `b * tokens[:, :K, :D]` plus the previous plan where `has_prev`, its velocity `b * z_t` plus the
    plan's mean. `a` reaches the loss only through the previous plan. Each call records its inputs."""

    def __init__(self):
        self.cfg = types.SimpleNamespace(backbone=types.SimpleNamespace(use_planner=True))
        self.calls: list[tuple[str, dict]] = []

    def plan(self, *args, **kwargs):  # only passed as `method=` to `apply`
        raise NotImplementedError

    def _record(self, kind: str, **arrays) -> None:
        jax.debug.callback(lambda **xs: self.calls.append((kind, {k: np.asarray(x) for k, x in xs.items()})), **arrays)

    def apply(self, params, z_t, t, text, *, method=None, prev_plan_BxKxD=None, has_prev_B=None, **_):
        import jax.numpy as jnp

        seen = {"tokens": text.tokens, "mask": text.mask, "pooled": text.pooled}
        base = text.tokens[:, :PROBE_K, :PROBE_D]
        if method is not None:
            plan = params["a"] * base
            self._record("first", plan=plan, **seen)
            return plan
        prev = jnp.where(has_prev_B[:, None, None], prev_plan_BxKxD, 0.0)
        plan = params["b"] * base + prev
        self._record("main", plan=plan, prev=prev_plan_BxKxD, has_prev=has_prev_B, **seen)
        return params["b"] * z_t + plan.mean((1, 2))[:, None, None, None], plan


@pytest.fixture(scope="module")
def probed_steps():
    """Three jitted flow steps of the probe: (what each step's calls saw, batch, empty text, hp,
    states, metrics per step)."""
    import jax.numpy as jnp
    import ml_collections

    from microforge_jax import optim, train_steps
    from microforge_jax.models.denoiser import Text

    config = _config("train.flow.warmup_steps=0")
    hp = ml_collections.ConfigDict({**config.train.flow.to_dict(), "ema_decay": 0.999})
    assert (hp.caption_dropout, hp.self_cond_prob) == (0.1, 0.5)
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    b, m, e = PROBE_B, PROBE_M, PROBE_E
    batch = {
        "latent_mean": arr(b, 2, 2, 1), "latent_logvar": jnp.full((b, 2, 2, 1), -2.0),
        "text_tokens": arr(b, m, e), "text_mask": jnp.ones((b, m), bool), "text_pooled": arr(b, e),
    }  # fmt: skip
    empty = Text(arr(1, m, e), jnp.asarray([[True, True, False]]), arr(1, e))
    probe, tx = _ProbeDenoiser(), optim.make_optimizer(hp)
    spec = train_steps.FlowStep(probe, None, tx, hp, diversity_weight=0.01)
    params = {"denoiser": {"a": jnp.float32(0.7), "b": jnp.float32(0.3)}}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}
    step = jax.jit(lambda s, bt, r, f: train_steps.flow_train_step(spec, s, bt, r, f))
    states, metrics, seen = [state], [], []
    for _ in range(3):
        state, metric = step(state, batch, jax.random.key(5), {"vae": None, "empty_text": empty})
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(metric))
        jax.effects_barrier()
        assert sorted(kind for kind, _ in probe.calls) == ["first", "main"]  # one pass each
        seen.append(dict(probe.calls))
        probe.calls.clear()
    return seen, jax.device_get(batch), jax.device_get(empty), hp, states, metrics


def _within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4.0 * np.sqrt(n * p * (1.0 - p))  # 4 sigma: fails with probability 6e-5


def test_caption_dropout_gives_the_dropped_rows_exactly_the_empty_prompt(probed_steps):
    steps, batch, empty, hp, _, _ = probed_steps
    dropped_rows = []
    for calls in steps:
        seen = calls["main"]
        for key in ("tokens", "mask", "pooled"):  # the self-conditioning pass sees the same text
            np.testing.assert_array_equal(calls["first"][key], seen[key])
        rows = lambda x: x.reshape(len(x), -1)  # the empty prompt's one row broadcasts
        is_empty = {k: (rows(seen[k]) == rows(getattr(empty, k))).all(1) for k in ("tokens", "mask", "pooled")}
        is_caption = {k: (rows(seen[k]) == rows(batch[f"text_{k}"])).all(1) for k in ("tokens", "mask", "pooled")}
        dropped = is_empty["tokens"]
        for k in ("tokens", "pooled"):  # every row is wholly its caption or wholly the empty prompt
            np.testing.assert_array_equal(is_empty[k], dropped)
            np.testing.assert_array_equal(is_caption[k], ~dropped)
        np.testing.assert_array_equal(is_empty["mask"], dropped)  # the captions' masks are all True
        count = int(dropped.sum())
        print(f"caption dropout {hp.caption_dropout}: {count} of {PROBE_B} rows dropped")
        assert _within_binomial(count, PROBE_B, hp.caption_dropout)
        dropped_rows.append(dropped)
    assert not np.array_equal(dropped_rows[0], dropped_rows[1])  # drawn afresh at each step


def test_self_conditioning_feeds_the_stopped_first_pass_to_the_has_prev_rows(probed_steps):
    steps, _, _, hp, states, _ = probed_steps
    for calls in steps:
        # The previous plan is the first pass's (of each row, with no previous plan of its own) ...
        np.testing.assert_array_equal(calls["main"]["prev"], calls["first"]["plan"])
        has_prev = calls["main"]["has_prev"]
        assert has_prev.dtype == bool
        count = int(has_prev.sum())
        print(f"self-conditioning {hp.self_cond_prob}: {count} of {PROBE_B} rows given a previous plan")
        assert _within_binomial(count, PROBE_B, hp.self_cond_prob)
    # ... behind a stopped gradient: `a` reaches the loss only through it, so Adam never moves it.
    for before, after in zip(states[:-1], states[1:], strict=True):
        assert after["params"]["denoiser"]["a"] == before["params"]["denoiser"]["a"]
        assert after["params"]["denoiser"]["b"] != before["params"]["denoiser"]["b"]


def test_plan_diversity_term_is_the_hand_computed_one(probed_steps):
    """Mean squared cosine similarity between the distinct plan tokens of each row, weighted into the loss."""
    steps, *_, metrics = probed_steps
    for calls, metric in zip(steps, metrics, strict=True):
        plan = calls["main"]["plan"].astype(np.float64)
        unit = plan / (np.linalg.norm(plan, axis=-1, keepdims=True) + 1e-6)
        pairs = [(i, j) for i in range(PROBE_K) for j in range(PROBE_K) if i != j]
        want = sum((row[i] @ row[j]) ** 2 for row in unit for i, j in pairs) / (PROBE_B * len(pairs))
        err = abs(float(metric["train/plan_diversity"]) - want) / want
        print(f"plan diversity {want:.6f}, the step's differs by {err:.1e}")
        assert err <= 1e-6  # 2e-8 measured
        want_loss = metric["train/flow_loss"] + 0.01 * want
        np.testing.assert_allclose(metric["train/loss"], want_loss, rtol=1e-6)


def test_plan_diversity_loss_of_known_plans():
    """Four tokens (12 ordered pairs) in 4-d, where the squared cosines are known by hand."""
    from microforge_jax.models.planner import plan_diversity_loss

    e = np.eye(4, dtype=np.float32)
    angle = np.pi / 3  # cos^2 = 1/4
    cases = {
        "orthogonal": (5.0 * e, 0.0),
        "two pairs": (np.stack([e[0], 3.0 * e[0], e[1], -e[1]]), 4 / 12),  # cos^2 = 1 in 4 ordered pairs
        "60 degrees": (np.stack([2.0 * e[0], np.cos(angle) * e[0] + np.sin(angle) * e[1], e[2], e[3]]), 0.5 / 12),
        "collapsed": (np.tile([[1.0, -2.0, 3.0, 0.5]], (4, 1)), 1.0),
    }
    loss = jax.jit(plan_diversity_loss)
    for name, (plan, want) in cases.items():
        np.testing.assert_allclose(float(loss(plan[None].astype(np.float32))), want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_flow_step_ema_is_the_running_mean_of_the_updated_parameters(probed_steps):
    """From a step-0 state, the EMA after k steps is the mean of the k updated parameters (warm-up)."""
    *_, states, _ = probed_steps
    values = [float(s["params"]["denoiser"]["b"]) for s in states[1:]]
    assert len(set(values)) == 3
    for k, s in enumerate(states[1:], start=1):
        np.testing.assert_allclose(s["ema_params"]["denoiser"]["b"], np.mean(values[:k], dtype=np.float64), rtol=1e-6)
    assert states[1]["ema_params"]["denoiser"]["b"] == values[0]  # the first update replaces the init exactly


def test_attribute_alignment_joins_the_flow_loss_and_trains_only_through_its_weight(redraw, relerr):
    """loss = flow + 0.01 diversity + w * attribute; the probe's gradient reaches the backbone's early
    blocks, and the probe's tree is training-only (checkpoint.ATTRIBUTE_HEAD)."""
    import jax.numpy as jnp
    import ml_collections

    from microforge_jax import checkpoint, losses, optim, train_steps
    from microforge_jax.config import ModelConfig
    from microforge_jax.models.denoiser import Text, build_denoiser
    from microforge_jax.models.vae import build_vae

    config = _config("model.backbone.depth=2", "train.flow.warmup_steps=0", "train.flow.attribute_block=0")
    cfg = ModelConfig.from_config(config)
    den, vae = build_denoiser(cfg), build_vae(cfg)
    b, m, e, side = 4, 40, 384, config.image_size // cfg.vae.downsample_factor
    rng = np.random.default_rng(0)
    text = Text(jnp.asarray(rng.standard_normal((b, m, e)), jnp.float32), jnp.ones((b, m), bool), jnp.zeros((b, e)))
    image = jnp.asarray(rng.uniform(-1, 1, (b, config.image_size, config.image_size, 3)), jnp.float32)
    head = losses.AttributeHead(cfg.backbone.dim)
    params = {
        "denoiser": jax.jit(den.init)(jax.random.key(0), jnp.zeros((b, side, side, 4)), jnp.zeros(b), text),
        checkpoint.ATTRIBUTE_HEAD: head.init(jax.random.key(2), jnp.zeros((1, 1, cfg.backbone.dim))),
    }
    params = redraw(params, seed=0)
    frozen = {
        "vae": redraw(jax.jit(vae.init)(jax.random.key(1), image), seed=1),
        "empty_text": Text(jnp.zeros((1, m, e)), jnp.ones((1, m), bool), jnp.zeros((1, e))),
    }
    attrs = np.zeros((b, 9, 2), np.int32)
    attrs[:, 4] = (3, 2)
    attrs[1, 0] = (5, 7)
    batch = {"image": image, "text_tokens": text.tokens, "text_mask": text.mask, "text_pooled": text.pooled}
    batch["attrs"] = jnp.asarray(attrs)

    def run(weight):
        hp = ml_collections.ConfigDict({**config.train.flow.to_dict(), "attribute_weight": weight})
        tx = optim.make_optimizer(hp)
        spec = train_steps.FlowStep(den, vae, tx, hp, diversity_weight=0.01, attribute_head=head)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params, "opt_state": tx.init(params)}
        return jax.jit(lambda s: train_steps.flow_train_step(spec, s, batch, jax.random.key(3), frozen))(state)

    (with_attr, m1), (without, m0) = run(0.5), run(0.0)
    assert float(m1["train/attribute_loss"]) > 0
    expected = m1["train/flow_loss"] + 0.01 * m1["train/plan_diversity"] + 0.5 * m1["train/attribute_loss"]
    assert relerr(m1["train/loss"], expected) < 1e-6
    # Same noise and times: the flow term is unchanged, the total and block 0's update are not.
    assert relerr(m1["train/flow_loss"], m0["train/flow_loss"]) < 1e-6
    assert relerr(m0["train/loss"], m0["train/flow_loss"] + 0.01 * m0["train/plan_diversity"]) < 1e-6
    leaf = lambda s: np.asarray(s["params"]["denoiser"]["params"]["backbone"]["block0"]["ffn"]["fc1"]["kernel"])
    assert relerr(leaf(with_attr), leaf(without)) > 1e-6
    head_moved = lambda s: np.asarray(s["params"][checkpoint.ATTRIBUTE_HEAD]["params"]["fc2"]["kernel"])
    before = np.asarray(params[checkpoint.ATTRIBUTE_HEAD]["params"]["fc2"]["kernel"])
    assert relerr(head_moved(with_attr), before) > 1e-6


def test_pretrained_vae_weights_round_trip_into_a_new_run(finished_run, tmp_path, capsys):
    """vae_weights from a run -> `train.vae.pretrained` of a new run: its finished VAE checkpoint holds exactly
    those weights and config.json their latent scale/shift; a file for another VAE is one ConfigError line."""
    from microforge_jax import vae_weights
    from microforge_jax.config import ConfigError

    workdir, _ = finished_run
    path = tmp_path / "vae.safetensors"
    assert vae_weights.main(["--workdir", str(workdir), "--out", str(path)]) == 0
    source_config, source = checkpoint.load_run(workdir)
    new = tmp_path / "new"
    train_lib.train_and_evaluate(_config("stages=('vae',)", f"train.vae.pretrained={path}"), new)
    config, params = checkpoint.load_run(new)
    assert checkpoint.latest_steps(new) == {"vae": 2}
    for a, b in zip(jax.tree.leaves(params["vae"]), jax.tree.leaves(source["vae"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert config.model.vae.scaling_factor == source_config.model.vae.scaling_factor != 1.0
    assert config.model.vae.shift_factor == source_config.model.vae.shift_factor
    assert "weights from" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="do not fit"):
        train_lib.train_and_evaluate(
            _config("stages=('vae',)", f"train.vae.pretrained={path}", "model.vae.channels=(8,32)"), tmp_path / "c"
        )
    with pytest.raises(ConfigError, match="not found"):
        train_lib.train_and_evaluate(_config("stages=('vae',)", "train.vae.pretrained=nope.st"), tmp_path / "d")
    assert not (tmp_path / "d" / "checkpoints" / "vae").exists()


def test_high_resolution_flow_stage_starts_from_the_flow_weights_at_a_larger_size(finished_run, tmp_path):
    """flow_hr: the flow again at train.flow_hr.image_size, from the flow stage's EMA; sample grids at that size."""
    import shutil

    from PIL import Image

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    hr = ("train.flow_hr.steps=2", "train.flow_hr.batch_size=8", "train.flow_hr.image_size=64", "sample_every=1")
    config = _config("stages=('vae','flow','flow_hr')", "final_eval.num=0", *hr)
    train_lib.train_and_evaluate(config, workdir)
    assert checkpoint.latest_steps(workdir)["flow_hr"] == 2
    flow = checkpoint.restore_stage_params(workdir, "flow", ("ema_params",))["ema_params"]["denoiser"]
    high = checkpoint.restore_stage_params(workdir, "flow_hr", ("ema_params",))["ema_params"]["denoiser"]
    diffs = [
        float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(flow), jax.tree.leaves(high))
    ]
    assert 0 < max(diffs) < 0.05  # started from the flow model, then trained
    with Image.open(sorted((workdir / "samples").glob("flow_hr_*.png"))[-1]) as grid:
        low = Image.open(sorted((workdir / "samples").glob("flow_*.png"))[0])
        assert grid.size[0] == 2 * low.size[0]  # the same grid layout at twice the image size
    _, params = checkpoint.load_run(workdir)  # merged flow -> flow_hr -> edit
    edit = checkpoint.restore_stage_params(workdir, "edit", ("ema_params",))["ema_params"]["denoiser"]
    for a, b in zip(jax.tree.leaves(params["denoiser"]), jax.tree.leaves(edit), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stages_must_keep_the_curriculum_order(tmp_path):
    from microforge_jax.config import ConfigError

    with pytest.raises(ConfigError, match="curriculum's order"):
        train_lib.prepare_run(_config("stages=('vae','edit','flow')"), tmp_path)
    with pytest.raises(ConfigError, match="unknown stage"):
        train_lib.prepare_run(_config("stages=('vae','flow_high')"), tmp_path)
    with pytest.raises(ConfigError, match="flow_hr.image_size"):
        train_lib.prepare_run(_config("stages=('vae','flow','flow_hr')", "train.flow_hr.image_size=60"), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
