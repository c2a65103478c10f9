"""JAX vs the PyTorch mirror, side by side in one process: guided sampling (one flow train step: `train_step.py`).

Both sides run the same model with the same weights: random JAX parameters, every leaf redrawn
from a non-degenerate distribution (zero-initialised gates would make the backbone an
identity and any comparison vacuous), converted with `export.convert.jax_to_torch` into
`export.torch_model`. On CPU the JAX model's scan is the compiled C++ kernel (`scan_impl="auto"`),
and the torch side is timed both with its own eager scan (the token loop) and with the same kernel
(`native_torch_scan`); the faster is the baseline of every ratio. Before timing, the two samplers are run on the same noise and text and
their outputs compared (normwise and max abs error), so the timings are of one computation.

Timings: compile (JAX ahead-of-time `lower().compile()`, torch.compile's first call) apart from
the run time, the median of `repeats` calls after one warm-up. torch uses all cores
(`set_num_threads(os.cpu_count())`), `inference_mode` for sampling, and flushes denormals to
zero (so neither side is timed on denormal arithmetic). When JAX runs on a GPU and torch sees
CUDA, the torch side runs there too (`DEVICE`), each timed call ends with a synchronisation, and
torch's f32 matmuls may use TF32 as XLA's do by default (`set_float32_matmul_precision("high")`).

The sampler's FLOPs are counted by hand (`sampler_flops`): XLA's cost analysis counts a
`lax.scan` body once. `matmul_rate` measures the machine's f32 matmul rate in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from microforge_jax import sampling
from microforge_jax.bench.sampling import _fake_text
from microforge_jax.config import ModelConfig
from microforge_jax.export import convert
from microforge_jax.export import torch_model as tm
from microforge_jax.kernels import native_scan
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import build_vae, map_slices

Row = dict[str, Any]
DEVICE = torch.device("cpu")  # where the torch side runs; `setup_torch` picks CUDA beside a JAX GPU


def sync() -> None:
    """Wait for queued torch GPU work (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def row(part: str, case: str, impl: str, median_ms=None, compile_s=None, ratio=None, note: str = "") -> Row:
    """One result row (the format every bench part returns), also printed as it is made (a part cut
    off by a time limit still leaves its finished rows in the log)."""
    out = {
        "part": part,
        "case": case,
        "impl": impl,
        "median_ms": median_ms,
        "compile_s": compile_s,
        "ratio": ratio,
        "note": note,
    }
    ms = "-" if median_ms is None else f"{median_ms:.2f} ms"
    cs = "" if compile_s is None else f" (compile {compile_s:.1f} s)"
    print(f"[{part}] {case} | {impl} | {ms}{cs} | {ratio or ''} | {note}", flush=True)
    return out


def normwise(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall milliseconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    runs = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(runs)


# ----------------------------------------------------------------------------- FLOPs and the matmul rate


def denoiser_flops(cfg: ModelConfig, latent_hw: tuple[int, int]) -> dict[str, float]:
    """FLOPs of one denoiser row (planner + backbone) by hand: 2 per multiply-add.

    Returns {"dense": matmuls, convs and attention products, "scan": the selective scan's
    elementwise work (~7 FLOPs per token, channel, state and direction)}.
    """
    bb, pl, c = cfg.backbone, cfg.planner, cfg.latent_channels
    p = getattr(bb, "patch_size", 1)  # backbone tokens are p x p latent cells; the planner reads every cell
    cells = latent_hw[0] * latent_hw[1]
    L, cp = cells // (p * p), c * p * p
    D, E, N, R, hd, k2 = bb.dim, bb.ssm_inner, bb.ssm_state, bb.ssm_dt_rank, bb.head_dim, bb.conv_kernel**2
    S, Et, M = cfg.text.max_length + (pl.num_tokens if bb.use_planner else 0), bb.text_dim, cfg.text.max_length
    groups = bb.depth if bb.adaln == "full" else math.ceil(bb.depth / bb.adaln_group_size)
    macs = L * cp * D + 256 * D + D * D + Et * D + M * Et * D  # patch embedding, t-MLP, pooled and token text
    macs += groups * D * 6 * D + D * 2 * D + L * D * cp  # adaLN, final adaLN, proj_out
    bissm = L * D * 2 * E + 2 * L * E * k2 + 2 * L * E * (R + 2 * N) + 2 * L * R * E + L * E * D
    cross = 2 * L * D * D + 2 * S * D * hd + 2 * L * S * D  # q, out; k, v (one head: MQA); logits, probs @ v
    ffn = 2 * L * D * bb.ffn_expand * D
    macs += bb.depth * (bissm + cross + ffn)
    if bb.use_shared_attn and bb.depth >= bb.shared_attn_every:
        macs += (bb.depth // bb.shared_attn_every) * (2 * L * D * D + 2 * L * D * hd + 2 * L * L * D)
    if bb.use_planner:
        K, P = pl.num_tokens, pl.dim
        macs += Et * P + 256 * P + P * P + cells * c * P  # init, t-MLP, latent projection
        read = 2 * K * P * P + 2 * cells * P * P + 2 * K * cells * P
        reason = 4 * K * P * P + 2 * K * K * P
        macs += pl.depth * (read + reason + 2 * K * P * 3 * P)
    return {"dense": 2.0 * macs, "scan": bb.depth * 2 * L * E * N * 7.0}


def vae_decode_flops(cfg: ModelConfig, size: int) -> float:
    """FLOPs of one image's VAE decode (its 3x3 convs; norms and shuffles left out)."""
    n = int(round(math.log2(cfg.vae.downsample_factor))) + 1
    ch = list(cfg.vae.channels)
    w = ch[:n] if n < len(ch) else ch + [ch[-1]] * (n - len(ch))
    res = [size // 2**i for i in range(n)]
    macs = 9 * cfg.latent_channels * w[-1] * res[-1] ** 2 + 9 * w[0] * 3 * size**2  # conv_in, conv_out
    for i in range(n):
        macs += cfg.vae.decoder_blocks * 2 * 9 * w[i] ** 2 * res[i] ** 2
        if i > 0:
            macs += 9 * w[i] * 4 * w[i - 1] * res[i] ** 2  # upsample conv to 4 x the next width
    return 2.0 * macs


def sampler_flops(cfg: ModelConfig, batch: int, size: int, steps: int, guidance: bool = True) -> dict[str, float]:
    """FLOPs of one sampler call: denoiser rows x (2 with guidance) x steps, plus the VAE decode."""
    f = cfg.vae.downsample_factor
    den = denoiser_flops(cfg, (size // f, size // f))
    rows = batch * (2 if guidance else 1) * steps
    out = {"denoiser": rows * (den["dense"] + den["scan"]), "scan": rows * den["scan"]}
    out["vae_decode"] = batch * vae_decode_flops(cfg, size)
    out["total"] = out["denoiser"] + out["vae_decode"]
    return out


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n f32 matmul, jitted JAX and torch (median of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax_ms = median_ms(lambda: jax.block_until_ready(f(a)), repeats)
    t = torch.randn(n, n, device=DEVICE)
    torch_ms = median_ms(lambda: (t @ t, sync()), repeats)
    return {"jax": 2 * n**3 / jax_ms / 1e6, "torch": 2 * n**3 / torch_ms / 1e6}


# ----------------------------------------------------------------------------- shared weights


def redraw(params: Any, seed: int) -> Any:
    """Every leaf redrawn (as tests/conftest.py's fixture): kernels N(0, 1/fan_in), norm scales
    1 + 0.3 N, A_log kept near its init, other vectors 0.3 N."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = np.shape(leaf)
        if name == "scale":
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif "A_log" in name:
            value = np.asarray(leaf, np.float64) + 0.3 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[:-1])) or 1)
        else:
            value = 0.3 * rng.standard_normal(shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def init_params(cfg: ModelConfig, size: int, seed: int = 0) -> dict:
    """Redrawn denoiser and VAE parameters, bare trees (`{"denoiser": tree, "vae": tree}`)."""
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    z = jnp.zeros((1, size // f, size // f, c))
    text = _fake_text(1, cfg.text.max_length, cfg.backbone.text_dim, 0)
    den, vae = build_denoiser(cfg), build_vae(cfg)
    prev = jnp.zeros((1, cfg.planner.num_tokens, cfg.backbone.dim))
    dshape = jax.eval_shape(lambda: den.init(jax.random.key(0), z, jnp.ones(1), text, prev_plan_BxKxD=prev))
    vshape = jax.eval_shape(lambda: vae.init(jax.random.key(1), jnp.zeros((1, size, size, 3))))
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(tree)["params"])
    dparams = zeros(dshape)
    # A_log starts from its init, log(1..N), before the redraw perturbs it.
    dparams = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            np.broadcast_to(np.log(np.arange(1, x.shape[-1] + 1, dtype=np.float32)), x.shape).copy()
            if "A_log" in str(getattr(p[-1], "key", p[-1]))
            else x
        ),
        dparams,
    )
    return {"denoiser": redraw(dparams, seed + 1), "vae": redraw(zeros(vshape), seed + 2)}


def torch_model(config: Any, params: dict) -> tm.MicroForgeTorch:
    """The PyTorch mirror with `params` converted into it (eval mode)."""
    import dataclasses
    import json

    cfg = ModelConfig.from_config(config)
    model_cfg = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as config.json has them
    model = tm.MicroForgeTorch({"model": model_cfg, "image_size": int(config.image_size)}).eval()
    model.load_state_dict(convert.jax_to_torch(params, model), strict=True)
    return model


def _torch_text(text: Text) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.array(x)).to(DEVICE) for x in text)


class SamplerPair:
    """The JAX sampler and the torch mirror's on the same weights, inputs and noise."""

    def __init__(self, config: Any, params: dict, batch: int, size: int, steps: int, scale: float = 4.0):
        self.cfg = cfg = ModelConfig.from_config(config)
        f, m, e = cfg.vae.downsample_factor, cfg.text.max_length, cfg.backbone.text_dim
        self.batch, self.steps, self.scale = batch, steps, scale
        self.text, self.uncond = _fake_text(batch, m, e, 1), _fake_text(1, m, e, 2)
        self.noise = sampling.initial_noise(0, batch, (size // f, size // f), cfg.latent_channels)
        self.params = params
        self.jax_fn = sampling.make_sampler(cfg, steps, guidance=True)
        self.model = torch_model(config, params).to(DEVICE)
        self.t_text, self.t_uncond = _torch_text(self.text), _torch_text(self.uncond)
        self.t_noise = torch.from_numpy(np.array(self.noise)).permute(0, 3, 1, 2).contiguous().to(DEVICE)

    def jax_args(self) -> tuple:
        return (self.params, self.text, self.uncond, self.noise, jnp.float32(self.scale))

    def run_torch(self, model: tm.MicroForgeTorch | None = None, decode: bool = True):
        with torch.inference_mode():
            m = model or self.model
            out = m.sample(self.t_text, self.t_uncond, self.t_noise, self.scale, self.steps, decode=decode)
            sync()
            return out

    def agreement(self) -> dict[str, float]:
        """Normwise relative and max abs errors of torch vs JAX images and final latents."""
        out = self.jax_fn(*self.jax_args())
        images, z = self.run_torch()
        ji, jz = np.asarray(out.images_BxHxWx3), np.asarray(out.latent_BxhxwxC)
        ti, tz = images.permute(0, 2, 3, 1).cpu().numpy(), z.permute(0, 2, 3, 1).cpu().numpy()
        return {
            "image_rel": normwise(ti, ji),
            "image_max_abs": float(np.abs(ti - ji).max()),
            "latent_rel": normwise(tz, jz),
            "image_std": float(ji.std()),
        }


def compiled_torch(model: tm.MicroForgeTorch) -> tm.MicroForgeTorch:
    """A copy of `model` whose denoiser and VAE decoder go through torch.compile (static shapes)."""
    cm = copy.deepcopy(model)
    cm.denoiser = torch.compile(cm.denoiser, dynamic=False)
    cm.vae.decoder = torch.compile(cm.vae.decoder, dynamic=False)
    return cm


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# ----------------------------------------------------------------------------- sampling


def sampling_rows(config: Any, size: int, steps: int, batches: list[int], repeats: int, *, use_compile: bool,
                  profile: bool, matmul: dict[str, float]) -> list[Row]:  # fmt: skip
    """Sampling latency rows: agreement, JAX, torch eager, torch.compile; goals at the largest batch."""
    cfg = ModelConfig.from_config(config)
    name = f"{config.name} {size}px {steps} steps CFG"
    params = init_params(cfg, size)
    rows: list[Row] = []
    for b in batches:
        case = f"{name} b{b}"
        pair = SamplerPair(config, params, b, size, steps)
        t0 = time.perf_counter()
        compiled = pair.jax_fn.lower(*pair.jax_args()).compile()
        jax_compile = time.perf_counter() - t0
        agree = pair.agreement()
        print(
            f"[sampling b{b}] torch vs JAX on the same weights: images normwise {agree['image_rel']:.1e} "
            f"(max abs {agree['image_max_abs']:.1e}, image std {agree['image_std']:.2f}), "
            f"final latent normwise {agree['latent_rel']:.1e}",
            flush=True,
        )
        jax_ms = median_ms(lambda c=compiled, p=pair: jax.block_until_ready(c(*p.jax_args())), repeats)
        eager_ms = median_ms(lambda p=pair: p.run_torch(), repeats)
        eager_forms = {"token loop": eager_ms}
        if DEVICE.type == "cuda":  # many small launches: the static chunked scan may be the faster eager form here
            tm.SCAN_FORM = "static"
            try:
                eager_forms["static chunked scan"] = median_ms(lambda p=pair: p.run_torch(), repeats)
            finally:
                tm.SCAN_FORM = "auto"
        with native_torch_scan() as ok:
            if ok:
                eager_forms["C++ scan"] = median_ms(lambda p=pair: p.run_torch(), repeats)
        eager_form = min(eager_forms, key=eager_forms.get)
        eager_ms = eager_forms[eager_form]
        per_image = f"{jax_ms / b:.0f} ms per image"
        rows.append(row("sampling", case, "torch vs JAX outputs", note=(
            f"same weights and inputs: images normwise {agree['image_rel']:.1e}, max abs {agree['image_max_abs']:.1e}; "
            f"latent normwise {agree['latent_rel']:.1e}")))  # fmt: skip
        rows.append(row("sampling", case, "JAX jit (lax.scan + decode)", jax_ms, jax_compile,
                        f"{eager_ms / jax_ms:.2f}x faster than torch eager", per_image))  # fmt: skip
        for form, ms in eager_forms.items():
            impl = "torch eager" + (f" ({form})" if len(eager_forms) > 1 else "")
            rows.append(row("sampling", case, impl, ms, None, f"{ms / eager_ms:.2f}x",
                            f"{ms / b:.0f} ms per image" + (" (the baseline)" if form == eager_form and len(eager_forms) > 1 else "")))  # fmt: skip
        if use_compile:
            try:
                cm = compiled_torch(pair.model)
                t0 = time.perf_counter()
                pair.run_torch(cm)
                first = time.perf_counter() - t0
                comp_ms = median_ms(lambda p=pair, m=cm: p.run_torch(m), repeats)
                rows.append(row("sampling", case, "torch.compile (inductor)", comp_ms, first - comp_ms / 1e3,
                                f"{comp_ms / jax_ms:.2f}x JAX time", f"{comp_ms / b:.0f} ms per image"))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - report any compiler failure, don't crash the bench
                rows.append(row("sampling", case, "torch.compile (inductor)", note=f"failed: {_first_line(exc)}"))
        else:
            rows.append(row("sampling", case, "torch.compile (inductor)", note="skipped (--torch-compile off)"))
        if b == max(batches):
            fl = sampler_flops(cfg, b, size, steps)
            achieved = fl["total"] / (jax_ms / 1e3) / 1e9
            # The matmul rate again, next to the sampler's timing (shared cores drift), averaged.
            again = matmul_rate(2048 if size >= 128 else 512, repeats)
            matmul = {k: (v + again[k]) / 2 for k, v in matmul.items()}
            rows.append(row("sampling", case, "JAX: FLOP rate", None, None,
                            f"{100 * achieved / matmul['jax']:.0f}% of matmul rate (goal >= 40%)", (
                f"{fl['total'] / b / 1e9:.1f} GFLOP per image by hand (denoiser {fl['denoiser'] / b / 1e9:.1f}, "
                f"of which scan {fl['scan'] / b / 1e9:.2f}; VAE decode {fl['vae_decode'] / b / 1e9:.1f}); "
                f"{achieved:.0f} GFLOP/s vs f32 matmul {matmul['jax']:.0f} GFLOP/s (torch {matmul['torch']:.0f})")))  # fmt: skip
            rows.append(row("sampling", case, "JAX: per image", jax_ms / b, None,
                            f"{jax_ms / b / 130:.2f}x the 130 ms goal", "goal <= 130 ms per 256 px image at batch 8"))  # fmt: skip
            if profile:
                # The torch side profiled in its baseline form.
                with native_torch_scan() if eager_form == "C++ scan" else contextlib.nullcontext():
                    rows.extend(_profile_rows(pair, case, repeats, jax_ms, eager_ms))
    return rows


def _profile_rows(pair: SamplerPair, case: str, repeats: int, jax_ms: float, eager_ms: float) -> list[Row]:
    """Where the time goes: the denoising loop and the VAE decode timed apart, both sides."""
    cfg = pair.cfg
    loop = sampling.make_sampler(cfg, pair.steps, guidance=True, decode=False)
    loop_c = loop.lower(*pair.jax_args()).compile()
    vae = build_vae(cfg)
    z = sampling.denormalize_latent(pair.noise, cfg.vae)

    def dec(p, z):  # sliced as the sampler slices it
        up = cfg.vae.downsample_factor**2
        return map_slices(lambda x: vae.apply({"params": p}, x, method="decode"), z, upscale=up)

    decode = jax.jit(dec).lower(pair.params["vae"], z).compile()
    j_loop = median_ms(lambda: jax.block_until_ready(loop_c(*pair.jax_args())), repeats)
    j_dec = median_ms(lambda: jax.block_until_ready(decode(pair.params["vae"], z)), repeats)
    zt = torch.from_numpy(np.array(z)).permute(0, 3, 1, 2).contiguous().to(DEVICE)
    t_loop = median_ms(lambda: pair.run_torch(decode=False), repeats)

    def t_decode():
        with torch.inference_mode():
            pair.model.vae.decode_sliced(zt)
        sync()

    t_dec = median_ms(t_decode, repeats)
    share = lambda part, whole: f"{100 * part / whole:.0f}% of the whole call"
    return [
        row("sampling", case, "profile: JAX denoising loop (no decode)", j_loop, None,
            f"{t_loop / j_loop:.2f}x faster than torch eager", share(j_loop, jax_ms)),
        row("sampling", case, "profile: JAX VAE decode", j_dec, None,
            f"{t_dec / j_dec:.2f}x faster than torch eager", share(j_dec, jax_ms)),
        row("sampling", case, "profile: torch eager denoising loop", t_loop, None, None, share(t_loop, eager_ms)),
        row("sampling", case, "profile: torch eager VAE decode", t_dec, None, None, share(t_dec, eager_ms)),
    ]  # fmt: skip


@contextlib.contextmanager
def native_torch_scan():
    """Within: the PyTorch mirror runs its eager scan on the same compiled C++ kernel as JAX on CPU
    (`export/torch_native_scan.py`). Yields False (and changes nothing) off CPU or without a compiler."""
    if DEVICE.type != "cpu" or not native_scan.available():
        yield False
        return
    from microforge_jax.export import torch_native_scan

    with torch_native_scan.as_scan_kernel():
        yield True


def setup_torch() -> None:
    """All cores for torch, denormals flushed to zero; CUDA (TF32 matmuls, as XLA's default) beside a JAX GPU."""
    global DEVICE
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        DEVICE = torch.device("cuda")
        torch.set_float32_matmul_precision("high")


__all__ = [
    "SamplerPair",
    "denoiser_flops",
    "init_params",
    "matmul_rate",
    "sampler_flops",
    "sampling_rows",
    "setup_torch",
    "torch_model",
    "vae_decode_flops",
]
