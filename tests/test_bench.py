"""The benchmark command (`python -m microforge_jax.bench`) and its side-by-side comparisons.

A shrunken nano config (2 blocks of width 64, an f4 VAE, 16 px) keeps compiles short; every
comparison runs on redrawn parameters (`compare.init_params`), so outputs have spread.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see bench/__main__.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from microforge_jax.bench import compare  # noqa: E402
from microforge_jax.bench.__main__ import main  # noqa: E402
from microforge_jax.config import ModelConfig, load_config  # noqa: E402
from microforge_jax.export import torch_model as tm  # noqa: E402
from microforge_jax.models.vae import build_vae  # noqa: E402

SMALL = [
    "model.backbone.depth=2",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=1",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.latent_channels=4",
    "model.text.embed_dim=48",
    "model.text.max_length=16",
    "model.vae.channels=(8,16)",
    "train.vae.pretrained=",  # train the tiny VAE (the shipped nano weights do not fit it)
    "model.vae.downsample_factor=4",
    "model.vae.scaling_factor=0.5",
    "model.vae.shift_factor=0.2",
]
SIZE = 16


@pytest.fixture(scope="module")
def config():
    return load_config("nano", SMALL)


def test_quick_command_prints_the_table(capsys):
    sets = [a for kv in SMALL for a in ("--set", kv)]
    rc = main(["--quick", "--parts", "sampling,train", "--size", str(SIZE), *sets])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| part | case | impl | median ms | compile s | ratio | note |" in out
    assert "nproc" in out and "jax 0." in out and "torch 2." in out and "date:" in out
    table = out.split("Markdown for BENCHMARKS.md:")[1]
    rows = [
        line.split(" | ") for line in table.splitlines() if line.startswith("| sampling") or line.startswith("| train")
    ]
    impls = {(r[0].strip("| "), r[2]) for r in rows}
    for expected in [
        ("sampling", "torch vs JAX outputs"),
        ("sampling", "JAX jit (lax.scan + decode)"),
        ("sampling", "torch eager (token loop)"),  # the mirror's own eager scan
        ("sampling", "torch eager (C++ scan)"),  # the JAX CPU kernel plugged into the mirror (g++ is here)
        ("sampling", "JAX: FLOP rate"),
        ("train", "JAX jit (flow_train_step, donated)"),
    ]:
        assert expected in impls, f"missing row {expected} in:\n{table}"
    train_forms = {i.rsplit(" (", 1)[-1] for p, i in impls if p == "train" and i.startswith("torch eager")}
    assert train_forms == {"token loop)", "C++ scan)"}
    for r in rows:  # the timed rows have a number, and exactly one torch form per part is the baseline
        if r[2].startswith(("JAX jit", "torch eager")):
            assert float(r[3]) > 0
    for part in ("sampling", "train"):
        assert sum(r[0].strip("| ") == part and "(the baseline)" in r[6] for r in rows) == 1, part


def test_unknown_part_is_one_clear_error(capsys):
    assert main(["--parts", "sampling,nope"]) == 2
    assert "unknown part(s) nope" in capsys.readouterr().err


def test_torch_and_jax_samplers_compute_the_same_thing(config):
    cfg = ModelConfig.from_config(config)
    params = compare.init_params(cfg, SIZE, seed=3)
    # Batch 1 and 2 steps, as the --quick command: the same program, so the compilation cache hits.
    pair = compare.SamplerPair(config, params, 1, SIZE, 2)
    agree = pair.agreement()
    print(agree)
    assert agree["image_std"] > 1e-2, "degenerate images: the comparison would be vacuous"
    assert agree["image_rel"] < 1e-4 and agree["latent_rel"] < 1e-4
    # The output depends on the conditioning (cond != uncond), so the agreement is not vacuous.
    other = compare._fake_text(1, cfg.text.max_length, cfg.backbone.text_dim, 9)
    a = pair.jax_fn(*pair.jax_args()).latent_BxhxwxC
    b = pair.jax_fn(params, other, pair.uncond, pair.noise, jnp.float32(pair.scale)).latent_BxhxwxC
    assert compare.normwise(b, a) > 1e-3


def test_flop_count_matches_counted_layers(config, monkeypatch):
    """The hand count of the sampler's FLOPs against counted work: every Linear, Conv2d and attention
    product the PyTorch mirror runs (one denoiser row), and XLA's cost analysis of the VAE decode
    (convs only: nothing there is a loop)."""
    cfg = ModelConfig.from_config(config)
    h = SIZE // cfg.vae.downsample_factor
    params = compare.init_params(cfg, SIZE)
    model = compare.torch_model(config, params)
    macs = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Linear):
            macs.append(inputs[0].numel() // module.in_features * module.in_features * module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * module.in_channels // module.groups * k)

    attention = tm.dot_product_attention

    def counted_attention(q, k, v, mask=None):
        macs.append(2 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] * q.shape[3])  # logits, probs @ v
        return attention(q, k, v, mask)

    monkeypatch.setattr(tm, "dot_product_attention", counted_attention)
    for m in model.denoiser.modules():
        m.register_forward_hook(count)
    text = tuple(
        torch.from_numpy(np.array(x)) for x in compare._fake_text(1, cfg.text.max_length, cfg.backbone.text_dim, 1)
    )
    z = torch.randn(1, cfg.latent_channels, h, h)
    plan = torch.randn(1, cfg.planner.num_tokens, cfg.backbone.dim)
    with torch.no_grad():
        model.denoiser(z, torch.ones(1), *text, plan, torch.ones(1, dtype=torch.bool))
    hand = compare.denoiser_flops(cfg, (h, h))
    print(f"denoiser dense: hand {hand['dense']:.4g}, counted {2 * sum(macs):.4g}")
    assert hand["dense"] == pytest.approx(2 * sum(macs), rel=1e-9)

    vae = build_vae(cfg)
    zj = jnp.zeros((2, h, h, cfg.latent_channels))
    jax.config.update("jax_enable_compilation_cache", False)  # a cached executable reports no costs
    try:
        d = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(params["vae"], zj)
        xla_vae = d.compile().cost_analysis()["flops"] / 2
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    hand_vae = compare.vae_decode_flops(cfg, SIZE)
    print(f"VAE decode: hand {hand_vae:.4g}, XLA {xla_vae:.4g}")
    # XLA leaves out the taps that fall on a conv's zero padding, which the hand count keeps (and
    # adds norms and activations): at 16 px (4x4 to 16x16 grids) ~10% apart, at 256 px ~1%.
    assert 0.9 * xla_vae <= hand_vae <= 1.25 * xla_vae
    total = compare.sampler_flops(cfg, 2, SIZE, 3)
    assert np.isclose(total["total"], 2 * 2 * 3 * (hand["dense"] + hand["scan"]) + 2 * hand_vae)  # batch x CFG x steps
