"""JAX vs the PyTorch mirror, one flow train step side by side (the `train` part of `python -m microforge_jax.bench`).

The real jitted `flow_train_step` (state donated, compiled ahead of time) against `TorchFlowStep`, the
same step written in PyTorch on the mirror (autograd, clipping, AdamW, EMA), on the same redrawn
weights (`compare.init_params`). The torch side is timed with its eager scan and, on CPU, with the
C++ kernel JAX runs (`compare.native_torch_scan`); the faster is the ratio's baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from microforge_jax import optim, train_steps
from microforge_jax.bench import compare
from microforge_jax.bench.compare import Row, median_ms, row
from microforge_jax.bench.sampling import _fake_text
from microforge_jax.config import ModelConfig
from microforge_jax.export import torch_model as tm
from microforge_jax.models.denoiser import build_denoiser
from microforge_jax.models.vae import build_vae


def _warmup_cosine(step: int, lr: float, warmup: int, total: int) -> float:
    """optim.schedule on the host: linear warm-up from 0, cosine decay to 0.1 lr."""
    warmup = max(0, min(warmup, total - 1))
    if step < warmup:
        return lr * step / max(warmup, 1)
    decay = max(total, warmup + 1) - warmup
    frac = min(max(step - warmup, 0), decay) / decay
    return 0.1 * lr + (lr - 0.1 * lr) * 0.5 * (1 + math.cos(math.pi * frac))


def plan_diversity_loss(plan: torch.Tensor) -> torch.Tensor:
    """models.planner.plan_diversity_loss in torch."""
    p = plan.float()
    p = p / (p.norm(dim=-1, keepdim=True) + 1e-6)
    sim = torch.einsum("bkd,bjd->bkj", p, p)
    k = p.shape[1]
    off = sim * (1.0 - torch.eye(k, device=p.device))[None]
    return off.square().sum() / (p.shape[0] * max(k * (k - 1), 1))


class TorchFlowStep:
    """flow_train_step in PyTorch on the mirror: the frozen VAE's posterior sample, logit-normal t,
    caption dropout, the planner's self-conditioning pass, the weighted rectified-flow loss plus plan
    diversity, clipping at `grad_clip`, AdamW (SSM parameters at `ssm_lr_mult`, decay on matrices
    only, the fused CPU kernel where available) and the parameter EMA."""

    def __init__(self, model: tm.MicroForgeTorch, hp: Any, cfg: ModelConfig, empty: tuple[torch.Tensor, ...]):
        self.den, self.vae, self.hp, self.cfg, self.empty = model.denoiser.train(), model.vae.eval(), hp, cfg, empty
        self.vae.requires_grad_(False)
        named = [(n, p) for n, p in self.den.named_parameters()]
        self.params = [p for _, p in named]
        self.ema = [p.detach().clone() for p in self.params]
        mult = float(hp.get("ssm_lr_mult", 1.0))
        groups = {}
        for n, p in named:
            ssm = any(part.startswith(("fwd_", "bwd_")) for part in n.split("."))
            key = (mult if ssm else 1.0, hp.weight_decay if p.ndim >= 2 else 0.0)
            groups.setdefault(key, []).append(p)
        spec = [{"params": ps, "lr_mult": m, "weight_decay": wd} for (m, wd), ps in groups.items()]
        try:
            self.opt = torch.optim.AdamW(spec, lr=hp.lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
            self.opt_kind = "fused"
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(spec, lr=hp.lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)
            self.opt_kind = "foreach"
        self.step_count = 0
        self.gen = torch.Generator(device=compare.DEVICE).manual_seed(0)

    def __call__(self, image: torch.Tensor, text: tuple[torch.Tensor, ...]) -> float:
        hp, vc, g = self.hp, self.cfg.vae, self.gen
        b, dev = image.shape[0], image.device
        with torch.no_grad():
            mean, logvar = self.vae.encode_sliced(image)
            z0 = (
                mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g, device=dev) - vc.shift_factor
            ) * vc.scaling_factor
        t = torch.sigmoid(hp.time_mean + hp.time_std * torch.randn(b, generator=g, device=dev))
        t = hp.time_shift * t / (1.0 + (hp.time_shift - 1.0) * t)
        eps = torch.randn(z0.shape, generator=g, device=dev)
        tb = t[:, None, None, None]
        z_t, target = (1 - tb) * z0 + tb * eps, eps - z0
        drop = torch.rand(b, generator=g, device=dev) < hp.caption_dropout
        has_prev = torch.rand(b, generator=g, device=dev) < hp.self_cond_prob
        tokens, mask, pooled = (
            torch.where(drop.reshape((b,) + (1,) * (x.ndim - 1)), e.expand_as(x), x) for e, x in zip(self.empty, text)
        )
        prev = None
        if self.den.planner is not None:
            with torch.no_grad():
                prev = self.den.planner(z_t, t, pooled)
        v, plan = self.den(z_t, t, tokens, mask, pooled, prev, has_prev)
        w = 1.0 / (1.0 + (2 * t - 1).abs())
        loss = (w * (v - target).square().flatten(1).mean(1)).mean()
        if plan is not None:
            loss = loss + float(self.cfg.planner.diversity_weight) * plan_diversity_loss(plan)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, hp.grad_clip, foreach=True)
        lr = _warmup_cosine(self.step_count, hp.lr, hp.warmup_steps, hp.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.opt.step()
        d = min(hp.ema_decay, self.step_count / (1.0 + self.step_count))  # optim.ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - d)
        self.step_count += 1
        return float(loss.detach())


def jax_flow_step(config: Any, params: dict, batch_size: int, size: int):
    """The real jitted flow train step (train_lib's: `flow_train_step`, state donated) and its inputs."""
    cfg = ModelConfig.from_config(config)
    hp = config.train.flow
    denoiser, vae = build_denoiser(cfg), build_vae(cfg)
    tx = optim.make_optimizer(hp)
    spec = train_steps.FlowStep(
        denoiser, vae, tx, hp, latent_scale=float(cfg.vae.scaling_factor), latent_shift=float(cfg.vae.shift_factor),
        diversity_weight=float(cfg.planner.diversity_weight),
    )  # fmt: skip
    dparams = {"denoiser": {"params": params["denoiser"]}}
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": dparams,
        "ema_params": jax.tree.map(jnp.copy, dparams),
        "opt_state": tx.init(dparams),
    }
    m, e = cfg.text.max_length, cfg.backbone.text_dim
    text, empty = _fake_text(batch_size, m, e, 3), _fake_text(1, m, e, 4)
    image = jax.random.uniform(jax.random.key(5), (batch_size, size, size, 3), jnp.float32, -1.0, 1.0)
    batch = {"image": image, "text_tokens": text.tokens, "text_mask": text.mask, "text_pooled": text.pooled}
    frozen = {"vae": {"params": params["vae"]}, "empty_text": empty}
    step = jax.jit(lambda s, b, r, f: train_steps.flow_train_step(spec, s, b, r, f), donate_argnums=(0,))
    return step, state, batch, jax.random.key(0), frozen


def compiled_step(step, state, batch, rng, frozen) -> tuple[Callable[[], dict], float]:
    """`step` compiled ahead of time, and a runner that advances the (donated) state one step and
    waits for it: (run() -> metrics, compile seconds)."""
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng, frozen).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run() -> dict:
        holder["state"], metrics = compiled(holder["state"], batch, rng, frozen)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    run.compiled = compiled  # for the optimized HLO (`--accel-hlo-dir`)
    return run, compile_s


def train_rows(config: Any, size: int, batch_size: int, repeats: int) -> list[Row]:
    """One flow train step, JAX (jitted, donated) vs PyTorch eager (autograd + AdamW) on the same model."""
    cfg = ModelConfig.from_config(config)
    case = f"{config.name} {size}px b{batch_size} flow step"
    params = compare.init_params(cfg, size, seed=10)
    model = compare.torch_model(config, params).to(
        compare.DEVICE
    )  # converted first: the JAX step donates its input state
    step, state, batch, rng, frozen = jax_flow_step(config, params, batch_size, size)
    run_jax, jax_compile = compiled_step(step, state, batch, rng, frozen)
    jax_ms = median_ms(run_jax, repeats)
    jax_loss = float(run_jax()["train/loss"])

    text = tuple(
        torch.from_numpy(np.array(x)).to(compare.DEVICE)
        for x in (batch["text_tokens"], batch["text_mask"], batch["text_pooled"])
    )
    empty = compare._torch_text(frozen["empty_text"])
    image = torch.from_numpy(np.array(batch["image"])).permute(0, 3, 1, 2).contiguous().to(compare.DEVICE)
    tstep = TorchFlowStep(model, config.train.flow, cfg, empty)
    losses = []
    forms = {"token loop": median_ms(lambda: losses.append(tstep(image, text)), repeats)}
    with compare.native_torch_scan() as ok:
        if ok:
            forms["C++ scan"] = median_ms(lambda: losses.append(tstep(image, text)), repeats)
    best = min(forms, key=forms.get)
    eager_ms = forms[best]
    note = (f"forward + backward + clip + AdamW + EMA, frozen VAE encode inside; losses JAX {jax_loss:.3f}, "
            f"torch {losses[-1]:.3f} (different random draws)")  # fmt: skip
    rows = [
        row("train", case, "JAX jit (flow_train_step, donated)", jax_ms, jax_compile,
            f"{jax_ms / eager_ms:.2f}x torch eager time (goal <= 0.70x)", note),
    ]  # fmt: skip
    for form, ms in forms.items():
        impl = f"torch eager (autograd, AdamW {tstep.opt_kind})" + (f" ({form})" if len(forms) > 1 else "")
        base = " (the baseline)" if form == best and len(forms) > 1 else ""
        rows.append(
            row("train", case, impl, ms, None, f"{ms / eager_ms:.2f}x", f"{batch_size / ms * 1e3:.1f} images/s{base}")
        )
    return rows
