"""A PyTorch mirror of MicroForge: DC-VAE, BiSSM backbone, planner, SimpleTextEncoder and the sampler.

Imports only torch, numpy and the standard library (safetensors and transformers lazily, in
`load_exported`), so this file can be copied into a PyTorch or mobile project as it is.

Layouts are PyTorch's: images (B, 3, H, W) in [-1, 1], latents (B, C, h, w), tokens (B, L, D).
Parameter names are the JAX tree's, joined with "." (`kernel`/`scale`/`embedding` become
`weight`), so `microforge_jax.export.convert` maps them one to one. Flax defaults are matched
explicitly: LayerNorm/GroupNorm eps 1e-6 (1e-5 in SimpleTextEncoder), erf GELU, GroupNorm with
`num_groups(channels)` groups, "SAME" conv padding, multi-query K/V broadcast over the query
heads, fp32 softmax. The selective scan runs eagerly as a loop over tokens with a hand-written
backward (the fastest form on CPU); while an exporter traces, it switches to a static chunked form
(a loop over the T positions of a chunk only), so ONNX export does not unroll L x layers nodes.

    model = load_exported("export/nano")
    images = model.generate(["a red circle"], steps=20, cfg=4.0, seed=0)  # uint8 (N, H, W, 3)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_TASKS, NUM_MOD = 4, 6
X_PRED_MIN_T = 0.05  # x-prediction: the smallest t the velocity (z_t - x0) / t divides by
TASKS = ("generate", "edit", "inpaint", "sr")
SAMPLERS = ("euler", "consistency", "heun", "dpm++2m")
BOS_ID, EOS_ID, PAD_ID, SIMPLE_VOCAB = 256, 257, 258, 259


# ----------------------------------------------------------------------------- small helpers


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: the largest divisor of `channels` not above `max_groups` (as the JAX model)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def stage_channels(vae: Mapping[str, Any]) -> list[int]:
    """Widths of the log2(factor) + 1 VAE stages: the channel list, its last width repeated."""
    n = int(round(math.log2(vae["downsample_factor"]))) + 1
    ch = list(vae["channels"])
    return ch[:n] if n < len(ch) else ch + [ch[-1]] * (n - len(ch))


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to [0, 1000]): (B,) -> (B, dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = (scale * t_B.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(height: int, width: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """2-D sin-cos positions (H*W, dim) in raster order: rows in the first half, columns in the second."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(height, dtype=torch.float32, device=device)[:, None].expand(height, width).reshape(-1)
    cols = torch.arange(width, dtype=torch.float32, device=device)[None, :].expand(height, width).reshape(-1)
    out_r, out_c = rows[:, None] * omega[None], cols[:, None] * omega[None]
    return torch.cat([torch.sin(out_r), torch.cos(out_r), torch.sin(out_c), torch.cos(out_c)], dim=-1)


# (snake over rows or columns, flip rows, flip columns), cycled from layer to layer (ZigMa).
PATHS = (
    ("row", False, False),
    ("col", False, False),
    ("row", True, False),
    ("col", False, True),
    ("row", False, True),
    ("col", True, False),
    ("row", True, True),
    ("col", True, True),
)


def zigzag_path(height: int, width: int, layer_index: int, device: torch.device | str | None = None) -> Tensor:
    """Layer `layer_index`'s scan order (L,): position k of the path visits raster index path[k].

    Torch ops only (no numpy), so `torch.export` traces it; a constant once the grid is static.
    """
    kind, flip_rows, flip_cols = PATHS[layer_index % len(PATHS)]
    grid = torch.arange(height * width, device=device).reshape(height, width)
    if flip_rows:
        grid = grid.flip(0)
    if flip_cols:
        grid = grid.flip(1)
    if kind == "col":
        grid = grid.t()
    odd = (torch.arange(grid.shape[0], device=device) % 2 == 1)[:, None]
    return torch.where(odd, grid.flip(1), grid).reshape(-1)  # boustrophedon: odd lines run backwards


def layer_norm(dim: int, eps: float = 1e-6, affine: bool = True) -> nn.LayerNorm:
    """LayerNorm with Flax's epsilon (torch's default is 1e-5)."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask_BxS: Tensor | None = None) -> Tensor:
    """(B, L, H, K) queries, (B, S, H or 1, K) keys/values -> (B, L, H, K); fp32 logits and softmax."""
    dtype, depth = q.dtype, q.shape[-1]
    q = q.float() / math.sqrt(depth)
    logits = torch.einsum("blhk,bshk->bhls", q, k.float().expand(-1, -1, q.shape[2], -1))
    if mask_BxS is not None:
        logits = logits.masked_fill(~mask_BxS.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhls,bshk->blhk", probs, v.float().expand(-1, -1, q.shape[2], -1)).to(dtype)


class Attention(nn.Module):
    """Multi-head attention from x to a context (self-attention without one); `kv_heads=1` is MQA."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, kv_heads: int | None = None, context_dim: int = 0):
        super().__init__()
        self.num_heads, self.head_dim, self.kv_heads = num_heads, head_dim, kv_heads or num_heads
        ctx = context_dim or dim
        self.q = nn.Linear(dim, num_heads * head_dim)
        self.k = nn.Linear(ctx, self.kv_heads * head_dim)
        self.v = nn.Linear(ctx, self.kv_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask_BxS: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, s = x.shape[0], x.shape[1], context.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim)
        k = self.k(context).reshape(b, s, self.kv_heads, self.head_dim)
        v = self.v(context).reshape(b, s, self.kv_heads, self.head_dim)
        return self.out(dot_product_attention(q, k, v, mask_BxS).reshape(b, n, -1))


class Mlp(nn.Module):
    """fc1 -> GELU (erf, as the JAX model) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def conv_same(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A stride-1 conv with lax "SAME" padding (an even kernel's extra row/column of padding goes after)."""
    kh, kw = conv.kernel_size
    lo_h, lo_w = (kh - 1) // 2, (kw - 1) // 2
    x = F.pad(x, (lo_w, kw - 1 - lo_w, lo_h, kh - 1 - lo_h))
    return F.conv2d(x, conv.weight, conv.bias, groups=conv.groups)


class Conv(nn.Conv2d):
    """A stride-1 KxK conv with "SAME" padding (Flax's default), optionally depthwise."""

    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1):
        super().__init__(cin, cout, k, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        return conv_same(x, self)


# ----------------------------------------------------------------------------- DC-VAE (NCHW)


def channel_average(x: Tensor, out: int) -> Tensor:
    """Averages groups of consecutive channels: (B, out*g, H, W) -> (B, out, H, W)."""
    b, c, h, w = x.shape
    return x.reshape(b, out, c // out, h, w).mean(2)


def channel_repeat(x: Tensor, out: int) -> Tensor:
    """Repeats each channel consecutively: (B, c, H, W) -> (B, out, H, W)."""
    return torch.repeat_interleave(x, out // x.shape[1], dim=1)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        g = num_groups(ch)
        self.norm1, self.conv1 = nn.GroupNorm(g, ch, eps=1e-6), Conv(ch, ch)
        self.norm2, self.conv2 = nn.GroupNorm(g, ch, eps=1e-6), Conv(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Downsample(nn.Module):
    """conv3x3 to out/4 -> pixel_unshuffle(2), plus pixel_unshuffle(x) averaged down to `out`."""

    def __init__(self, cin: int, out: int):
        super().__init__()
        self.out_ch, self.conv = out, Conv(cin, out // 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(self.conv(x), 2) + channel_average(F.pixel_unshuffle(x, 2), self.out_ch)


class Upsample(nn.Module):
    """conv3x3 to 4*out -> pixel_shuffle(2), plus x with channels repeated, pixel-shuffled."""

    def __init__(self, cin: int, out: int):
        super().__init__()
        self.out_ch, self.conv = out, Conv(cin, out * 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(self.conv(x), 2) + F.pixel_shuffle(channel_repeat(x, self.out_ch * 4), 2)


class Encoder(nn.Module):
    def __init__(self, vae: Mapping[str, Any], latent_channels: int):
        super().__init__()
        widths = stage_channels(vae)
        self.widths, self.blocks, self.moments = widths, vae["encoder_blocks"], 2 * latent_channels
        self.conv_in = Conv(3, widths[0])
        for i, width in enumerate(widths):
            for j in range(self.blocks):
                self.add_module(f"stage{i}_block{j}", ResBlock(width))
            if i + 1 < len(widths):
                self.add_module(f"stage{i}_down", Downsample(width, widths[i + 1]))
        self.norm_out = nn.GroupNorm(num_groups(widths[-1]), widths[-1], eps=1e-6)
        self.conv_out = Conv(widths[-1], self.moments)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i in range(len(self.widths)):
            for j in range(self.blocks):
                h = getattr(self, f"stage{i}_block{j}")(h)
            if i + 1 < len(self.widths):
                h = getattr(self, f"stage{i}_down")(h)
        return self.conv_out(F.silu(self.norm_out(h))) + channel_average(h, self.moments)


class Decoder(nn.Module):
    def __init__(self, vae: Mapping[str, Any], latent_channels: int):
        super().__init__()
        widths = stage_channels(vae)
        self.widths, self.blocks = widths, vae["decoder_blocks"]
        self.conv_in = Conv(latent_channels, widths[-1])
        for i in reversed(range(len(widths))):
            for j in range(self.blocks):
                self.add_module(f"stage{i}_block{j}", ResBlock(widths[i]))
            if i > 0:
                self.add_module(f"stage{i}_up", Upsample(widths[i], widths[i - 1]))
        self.norm_out = nn.GroupNorm(num_groups(widths[0]), widths[0], eps=1e-6)
        self.conv_out = Conv(widths[0], 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z) + channel_repeat(z, self.widths[-1])
        for i in reversed(range(len(self.widths))):
            for j in range(self.blocks):
                h = getattr(self, f"stage{i}_block{j}")(h)
            if i > 0:
                h = getattr(self, f"stage{i}_up")(h)
        return self.conv_out(F.silu(self.norm_out(h)))


VAE_SLICE_PIXELS = 256 * 256  # `microforge_jax.vae_slicing.SLICE_PIXELS` (this file imports nothing of the package)


def vae_slice_size(batch: int, pixels: int, cpu: bool) -> int:
    """Images per VAE call (VAE slicing), the rule of `microforge_jax.vae_slicing.slice_size`.

    On a CPU: the largest divisor of `batch` not above `VAE_SLICE_PIXELS // pixels` (at least 1;
    `pixels` at the image's resolution): oneDNN's full-resolution convolutions slow down once a
    call outgrows the cache, as XLA's do. Elsewhere: `batch`.
    """
    if not cpu:
        return batch
    target = max(1, min(batch, VAE_SLICE_PIXELS // max(1, pixels)))
    return max(d for d in range(1, target + 1) if batch % d == 0)


class DCVAE(nn.Module):
    """`encode(image) -> (mean, logvar)` (the diagonal Gaussian posterior), `decode(z) -> image`.

    `encode_sliced` / `decode_sliced` are the same a slice of images at a time (`vae_slice_size`).
    """

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.factor = cfg["vae"]["downsample_factor"]
        # "pixel": no autoencoder; the latent is the image itself (no parameters, identity both ways)
        self.pixel = cfg["vae"].get("kind", "dc") == "pixel"
        if not self.pixel:
            self.encoder = Encoder(cfg["vae"], cfg["latent_channels"])
            self.decoder = Decoder(cfg["vae"], cfg["latent_channels"])

    def encode(self, image_Bx3xHxW: Tensor) -> tuple[Tensor, Tensor]:
        h, w = image_Bx3xHxW.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image height and width must be multiples of {self.factor}, got {h}x{w}")
        if self.pixel:
            x = image_Bx3xHxW.float()
            return x, torch.full_like(x, -30.0)
        mean, logvar = self.encoder(image_Bx3xHxW).float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z_BxCxhxw: Tensor) -> Tensor:
        return z_BxCxhxw.float() if self.pixel else self.decoder(z_BxCxhxw).float()

    def forward(self, z_BxCxhxw: Tensor) -> Tensor:
        return self.decode(z_BxCxhxw)

    def encode_sliced(self, image_Bx3xHxW: Tensor, size: int | None = None) -> tuple[Tensor, Tensor]:
        """`encode` `size` images at a time (None: `vae_slice_size`)."""
        b, (h, w) = image_Bx3xHxW.shape[0], image_Bx3xHxW.shape[-2:]
        size = size or vae_slice_size(b, h * w, image_Bx3xHxW.device.type == "cpu")
        parts = [self.encode(x) for x in image_Bx3xHxW.split(size)]
        return torch.cat([m for m, _ in parts]), torch.cat([lv for _, lv in parts])

    def decode_sliced(self, z_BxCxhxw: Tensor, size: int | None = None) -> Tensor:
        """`decode` `size` latents at a time (None: `vae_slice_size`)."""
        b, (h, w) = z_BxCxhxw.shape[0], z_BxCxhxw.shape[-2:]
        size = size or vae_slice_size(b, h * w * self.factor**2, z_BxCxhxw.device.type == "cpu")
        return torch.cat([self.decode(z) for z in z_BxCxhxw.split(size)])


# ----------------------------------------------------------------------------- selective scan

SCAN_BLOCK_ELEMENTS = 2**19  # eager scan: tokens per block T such that (T, Bt, E, N) decays are ~2 MiB


# Which scan form `BiSSM` runs: "auto" (the static chunked form while traced, the token loop eager),
# "loop" or "static" (forced; the benchmark times both on a GPU, where many small kernel launches
# make the loop's cost different).
SCAN_FORM = "auto"
# An optional drop-in for the eager loop, with `selective_scan`'s signature (None: the loop). The
# benchmark sets microforge_jax's compiled C++ CPU scan here (`export/torch_native_scan.py`), the
# kernel the JAX model runs on CPU, so both sides of its comparison can use it.
SCAN_KERNEL = None


def graph_capture() -> bool:
    """True while an exporter or compiler traces the model (ONNX, torch.export, torch.compile, jit.trace)."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or torch.jit.is_tracing()


class _SequentialScan(torch.autograd.Function):
    """The recurrence as a loop over tokens, with its reverse-loop backward written out.

    Inputs are fp32 and reshaped by `selective_scan`: u, delta (Bt, L, E), A (1 or Bt, E, N),
    B, C (Bt, L, N), D (1 or Bt, E). States are kept token-major, (L, Bt, E, N), so each step
    reads and writes one contiguous (Bt, E, N) slice in place.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, block):  # noqa: D102
        bt, length, e = u.shape
        n = A.shape[-1]
        delta_L, du_L, B_L = delta.transpose(0, 1), (delta * u).transpose(0, 1), B.transpose(0, 1)
        keep = any(ctx.needs_input_grad)  # the backward needs every state; inference only a block's
        dev = u.device
        h_LxBtxExN = torch.empty(length if keep else min(block, length), bt, e, n, device=dev)
        y = torch.empty(bt, length, e, device=dev)
        h = torch.zeros(bt, e, n, device=dev)
        for s in range(0, length, block):
            t = min(block, length - s)
            a = torch.exp(delta_L[s : s + t, ..., None] * A)  # (T, Bt, E, N): a block at a time, in cache
            hs = h_LxBtxExN[s : s + t] if keep else h_LxBtxExN[:t]
            torch.mul(du_L[s : s + t, ..., None], B_L[s : s + t, :, None], out=hs)  # b_t, then h_t over it
            for i in range(t):
                h = torch.addcmul(hs[i], a[i], h, out=hs[i])
            y[:, s : s + t] = torch.einsum("lben,bln->ble", hs, C[:, s : s + t])
            if not keep:
                h = h.clone()  # the next block overwrites the buffer that holds it
        y += u * D[:, None]
        if keep:
            ctx.save_for_backward(u, delta, A, B, C, D, h_LxBtxExN)
        ctx.block = block
        return y

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        u, delta, A, B, C, D, h_LxBtxExN = ctx.saved_tensors
        length, bt, e, n = h_LxBtxExN.shape
        delta_L, du_L = delta.transpose(0, 1), (delta * u).transpose(0, 1)
        B_L, C_L, dy_L = B.transpose(0, 1), C.transpose(0, 1), dy.transpose(0, 1)
        kw = {"device": dy.device}
        g_du = torch.empty(length, bt, e, **kw)  # dL/d(delta u)
        g_delta = torch.empty(length, bt, e, **kw)  # dL/d(delta) through the decays
        gB, gC = torch.empty(length, bt, n, **kw), torch.empty(length, bt, n, **kw)
        gA = torch.zeros(bt, e, n, **kw)
        carry = torch.zeros(bt, e, n, **kw)  # a_{s+T} dL/dh_{s+T}, from the block after this one
        for s in reversed(range(0, length, ctx.block)):
            t = min(ctx.block, length - s)
            sl = slice(s, s + t)
            a = torch.exp(delta_L[sl, ..., None] * A)
            gh = dy_L[sl, ..., None] * C_L[sl, :, None]  # (T, Bt, E, N): dL/dh_t, filled backwards
            gh[-1] += carry
            for i in range(t - 2, -1, -1):
                torch.addcmul(gh[i], a[i + 1], gh[i + 1], out=gh[i])
            carry = a[0] * gh[0]
            g_du[sl] = torch.einsum("lben,lbn->lbe", gh, B_L[sl])
            gB[sl] = torch.einsum("lben,lbe->lbn", gh, du_L[sl])
            gC[sl] = torch.einsum("lbe,lben->lbn", dy_L[sl], h_LxBtxExN[sl])
            lo = 0 if s else 1  # h_{-1} = 0: no gradient reaches the first decay
            g_log_a = gh[lo:].mul_(h_LxBtxExN[s + lo - 1 : s + t - 1]).mul_(a[lo:])  # dL/d(delta_t A), in gh
            g_delta[s + lo : s + t] = torch.einsum("lben,ben->lbe", g_log_a, A.expand(bt, -1, -1))
            gA += torch.einsum("lben,lbe->ben", g_log_a, delta_L[s + lo : s + t])
        g_delta[0] = 0
        g_du, g_delta = g_du.transpose(0, 1), g_delta.transpose(0, 1)
        gu = g_du * delta + dy * D[:, None]
        gdelta = g_du * u + g_delta
        gD = (dy * u).sum(1)
        if A.shape[0] == 1:  # shared by the rows
            gA = gA.sum(0, keepdim=True)
        if D.shape[0] == 1:
            gD = gD.sum(0, keepdim=True)
        return gu, gdelta, gA, gB.transpose(0, 1), gC.transpose(0, 1), gD, None


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, block: int | None = None
) -> Tensor:
    """Mamba-1 selective scan from a zero state: the eager form, a loop over the L tokens.

        a_t = exp(delta_t A)   b_t = delta_t B_t u_t   h_t = a_t h_{t-1} + b_t   y_t = C_t h_t + D u_t

    O(L E N) work like the recurrence itself: the decays of a block of T tokens are built at once,
    then one fused multiply-add per token updates the (Bt, E, N) state in place; the backward is
    the reverse loop (dL/dh_t = C_t dy_t + a_{t+1} dL/dh_{t+1}), written out in `_SequentialScan`
    so autograd keeps only the states, not a graph node per token. Measured on a 2-core CPU at
    Bt = 2-16, L = 64-1024, E = 512, N = 16, fp32: 5-140x faster forward and 4-16x forward +
    backward than `selective_scan_static` (its inter-chunk step grows as (L / T)^2), 15-50x
    faster than a closed form within chunks carrying the state (exps of (T, T) decay blocks, T x
    the recurrence's), and 5-75x faster forward + backward than the same loop left to autograd
    (or torch.jit.script). Blocks bound the memory and keep a block's decays in cache (~2 MiB).
    The exporters need a graph that does not grow with L: `BiSSM` uses `selective_scan_static`
    while one traces (`graph_capture`).

    Args:
      u, delta: (Bt, L, E) input and positive step sizes (softplus applied).
      A: (E, N) or (Bt, E, N) negative decay rates (-exp(A_log)).
      B, C: (Bt, L, N).
      D: (E,) or (Bt, E) skip.
      block: T, tokens whose decays are built at once (default: ~2 MiB of them, at least 16 tokens);
        a speed / memory knob only, the result does not depend on it.

    Returns:
      y: (Bt, L, E) in u's dtype.
    """
    e = u.shape[-1]
    # fp32 island: the discretisation and the state.
    A, D = A.float().reshape(-1, e, A.shape[-1]), D.float().reshape(-1, e)
    bt, _, n = B.shape
    block = max(16, SCAN_BLOCK_ELEMENTS // (bt * e * n)) if block is None else max(1, block)
    y = _SequentialScan.apply(u.float(), delta.float(), A, B.float(), C.float(), D, block)
    return y.to(u.dtype)


def segsum(x: Tensor) -> Tensor:
    """seg[..., t, s, :, :] = sum_{s < i <= t} x[..., i, :, :] for s <= t, -inf above the diagonal.

    x: (..., T, E, N) -> (..., T, T, E, N). Summing only the terms of each segment (not
    differencing a cumulative sum) keeps exp(seg) accurate when the log-decays are large.
    """
    t = x.shape[-3]
    idx = torch.arange(t, device=x.device)
    strict = (idx[:, None] > idx[None, :])[:, :, None, None]  # i > s
    xx = torch.where(
        strict,
        x.unsqueeze(-3).expand(*x.shape[:-3], t, t, *x.shape[-2:]),
        torch.zeros((), dtype=x.dtype, device=x.device),
    )
    seg = torch.cumsum(xx, dim=-4)
    lower = (idx[:, None] >= idx[None, :])[:, :, None, None]
    return torch.where(lower, seg, torch.full((), -math.inf, dtype=x.dtype, device=x.device))


def selective_scan_static(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, chunk: int = 8
) -> Tensor:
    """The scan of `selective_scan` in a static chunked form (no loop over the L tokens), for export.

        a_t = exp(delta_t A)   b_t = delta_t B_t u_t   h_t = a_t h_{t-1} + b_t   y_t = C_t h_t + D u_t

    The L tokens are cut into L / T chunks of T tokens. Two static passes of T steps each run over
    every chunk at once: the first builds each chunk's end state from a zero start; the states
    entering the chunks then follow in closed form over chunks (`segsum` of the chunk log-decays,
    every exponent <= 0, so nothing overflows); the second pass reruns the recurrence from those
    entry states and contracts each state with C_t as it goes, so no (Bt, L, E, N) state tensor is
    kept. The graph depends on T and L / T only (ONNX gets a fixed graph of ~2T steps per call).
    All fp32. Eager, `selective_scan` is faster (the (L / T)^2 inter-chunk step dominates at long L).

    Args:
      u, delta: (Bt, L, E) input and positive step sizes (softplus applied).
      A: (E, N) or (Bt, E, N) negative decay rates (-exp(A_log)).
      B, C: (Bt, L, N).
      D: (E,) or (Bt, E) skip.
      chunk: T, tokens per chunk.

    Returns:
      y: (Bt, L, E) in u's dtype.
    """
    bt, length, e = u.shape
    A = A.float().reshape(-1, *A.shape[-2:])  # (1 or Bt, E, N)
    D = D.float().reshape(-1, e)
    t = max(1, min(chunk, length))
    pad = -length % t
    uf, df, Bf, Cf = (x.float() for x in (u, delta, B, C))
    if pad:  # delta = 0: a = 1 and b = 0, the state passes through the padding unchanged
        uf, df, Bf, Cf = (F.pad(x, (0, 0, 0, pad)) for x in (uf, df, Bf, Cf))
    nc = (length + pad) // t
    uf, df, Bf, Cf = (x.reshape(bt, nc, t, x.shape[-1]) for x in (uf, df, Bf, Cf))
    dA = df[..., None] * A[:, None, None]  # (Bt, nc, T, E, N) log-decays
    a = torch.exp(dA)
    b = (df * uf)[..., None] * Bf[..., None, :]  # (Bt, nc, T, E, N)
    # Pass 1: the state each chunk builds from a zero start, at its end.
    h = b[:, :, 0]
    for i in range(1, t):
        h = torch.addcmul(b[:, :, i], a[:, :, i], h)
    # The states entering each chunk, from the chunk end states and the chunk log-decays.
    zeros = torch.zeros_like(h[:, :1])
    chunk_decay = torch.cat([zeros, dA.sum(2)], dim=1)  # (Bt, nc + 1, E, N)
    ends = torch.cat([zeros, h], dim=1)
    h = (torch.exp(segsum(chunk_decay)) * ends.unsqueeze(1)).sum(2)[:, :-1]  # (Bt, nc, E, N)
    # Pass 2: the recurrence from the entry states, read out through C as it goes.
    ys = []
    for i in range(t):
        h = torch.addcmul(b[:, :, i], a[:, :, i], h)
        ys.append(torch.einsum("bcen,bcn->bce", h, Cf[:, :, i]))
    y = torch.stack(ys, 2).reshape(bt, nc * t, e)[:, :length]
    return (y + u.float() * D[:, None, :]).to(u.dtype)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The same scan as a plain loop over tokens (for tests; do not export this one)."""
    bt, length, e = u.shape
    A = A.float().reshape(-1, e, A.shape[-1])
    h = torch.zeros(bt, e, A.shape[-1], device=u.device)
    ys = []
    for i in range(length):
        d = delta[:, i].float()
        h = torch.exp(d[..., None] * A) * h + (d * u[:, i].float())[..., None] * B[:, i, None].float()
        ys.append((h * C[:, i, None].float()).sum(-1))
    return (torch.stack(ys, 1) + u.float() * D.float().reshape(-1, e)[:, None]).to(u.dtype)


# ----------------------------------------------------------------------------- backbone


class BiSSM(nn.Module):
    """Bidirectional selective scan along this layer's zigzag path, with 2-D depthwise convs.

    `out = out_proj((y_fwd + y_bwd) * silu(z))`; each direction owns conv, x_proj, dt_proj, A_log, D.
    """

    def __init__(self, bb: Mapping[str, Any], layer_index: int):
        super().__init__()
        dim, self.inner, self.state = bb["dim"], bb["ssm_expand"] * bb["dim"], bb["ssm_state"]
        self.rank = bb["dt_rank"] or math.ceil(dim / 16)
        self.layer_index, self.use_dwconv, self.chunk = layer_index, bb["use_dwconv"], bb["scan_chunk"]
        self.in_proj = nn.Linear(dim, 2 * self.inner, bias=False)
        for p in ("fwd_", "bwd_"):
            if self.use_dwconv:
                self.add_module(f"{p}conv", Conv(self.inner, self.inner, bb["conv_kernel"], groups=self.inner))
            self.add_module(f"{p}x_proj", nn.Linear(self.inner, self.rank + 2 * self.state, bias=False))
            self.add_module(f"{p}dt_proj", nn.Linear(self.rank, self.inner))
            self.register_parameter(f"{p}A_log", nn.Parameter(torch.zeros(self.inner, self.state)))
            self.register_parameter(f"{p}D", nn.Parameter(torch.ones(self.inner)))
        self.out_proj = nn.Linear(self.inner, dim, bias=False)

    def forward(self, x_BxLxD: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        (h, w), b = grid_hw, x_BxLxD.shape[0]
        x, z = self.in_proj(x_BxLxD).chunk(2, dim=-1)
        perm = zigzag_path(h, w, self.layer_index, x.device)
        order = {"fwd_": perm, "bwd_": perm.flip(0)}  # the backward direction runs the path reversed
        us, deltas, As, Bs, Cs, Ds = [], [], [], [], [], []
        for p, idx in order.items():
            u = x
            if self.use_dwconv:
                grid = x.transpose(1, 2).reshape(b, self.inner, h, w)
                u = getattr(self, f"{p}conv")(grid).reshape(b, self.inner, h * w).transpose(1, 2)
            u = F.silu(u)[:, idx]
            dt, Bm, Cm = getattr(self, f"{p}x_proj")(u).split([self.rank, self.state, self.state], dim=-1)
            # fp32 island: the step size and the decay it drives.
            deltas.append(F.softplus(getattr(self, f"{p}dt_proj")(dt).float()))
            As.append((-torch.exp(getattr(self, f"{p}A_log").float()))[None].expand(b, -1, -1))
            Ds.append(getattr(self, f"{p}D").float()[None].expand(b, -1))
            us.append(u)
            Bs.append(Bm)
            Cs.append(Cm)
        # Both directions in one scan call, stacked on the batch axis (as the JAX model).
        args = [torch.cat(v, 0) for v in (us, deltas, As, Bs, Cs, Ds)]
        # Traced for export: the static form, whose graph does not grow with L; eager: the loop.
        static = SCAN_FORM == "static" or (SCAN_FORM == "auto" and graph_capture())
        y = selective_scan_static(*args, chunk=self.chunk) if static else (SCAN_KERNEL or selective_scan)(*args)
        y = y[:b][:, torch.argsort(order["fwd_"])] + y[b:][:, torch.argsort(order["bwd_"])]
        return self.out_proj(y.to(z.dtype) * F.silu(z))


class HybridBlock(nn.Module):
    """AdaLN-modulated BiSSM -> gated cross-attention to [text ; plan] -> modulated FFN."""

    def __init__(self, bb: Mapping[str, Any], layer_index: int):
        super().__init__()
        d = bb["dim"]
        heads = max(1, d // bb["head_dim"])
        self.mod_offset = nn.Parameter(torch.zeros(NUM_MOD, d))
        self.norm1 = layer_norm(d, affine=False)
        if bb["mixer"] == "bissm":
            self.mixer = BiSSM(bb, layer_index)
        else:
            self.mixer = Attention(d, heads, bb["head_dim"])
        self.norm2 = layer_norm(d)
        self.cross_attn = Attention(d, heads, bb["head_dim"], kv_heads=1)
        self.cross_gate = nn.Parameter(torch.zeros(d))
        self.norm3 = layer_norm(d, affine=False)
        self.ffn = Mlp(d, bb["ffn_expand"] * d)

    def forward(self, x: Tensor, mod: Tensor, context: Tensor, mask: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.mod_offset[None]).unbind(1)
        h = modulate(self.norm1(x), shift1, scale1)
        h = self.mixer(h, grid_hw) if isinstance(self.mixer, BiSSM) else self.mixer(h)
        x = x + gate1[:, None] * h
        x = x + self.cross_gate * self.cross_attn(self.norm2(x), context, mask)
        return x + gate2[:, None] * self.ffn(modulate(self.norm3(x), shift2, scale2))


class SharedMQA(nn.Module):
    """Gated multi-query self-attention; one parameter set shared by all its uses."""

    def __init__(self, bb: Mapping[str, Any]):
        super().__init__()
        d = bb["dim"]
        self.norm = layer_norm(d)
        self.attn = Attention(d, max(1, d // bb["head_dim"]), bb["head_dim"], kv_heads=1)
        self.gate = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gate * self.attn(self.norm(x))


class Backbone(nn.Module):
    """Velocity of the target latent from (z_t, t, text, plan, task[, source]); only the target half."""

    def __init__(self, bb: Mapping[str, Any]):
        super().__init__()
        self.bb = dict(bb)
        d, c, e = bb["dim"], bb["latent_channels"], bb["text_dim"]
        self.group = 1 if bb["adaln"] == "full" else bb["adaln_group_size"]
        self.p = p = bb.get("patch_size", 1)
        self.patch_embed = nn.Linear(c * p * p, d)
        self.segment_embed = nn.Parameter(torch.zeros(2, d))
        self.source_skip = nn.Linear(c * p * p, d, bias=False) if bb.get("source_skip", False) else None
        self.t_fc1, self.t_fc2 = nn.Linear(256, d), nn.Linear(d, d)
        self.task_embed = nn.Parameter(torch.zeros(NUM_TASKS, d))
        self.pooled_proj, self.text_proj = nn.Linear(e, d), nn.Linear(e, d)
        for i in range(bb["depth"]):
            if i % self.group == 0:
                self.add_module(f"adaln{i // self.group}", nn.Linear(d, NUM_MOD * d))
            self.add_module(f"block{i}", HybridBlock(bb, i))
        # SharedMQA exists only if it is applied at least once (after every `shared_attn_every` blocks).
        self.every = bb["shared_attn_every"]
        self.shared_mqa = SharedMQA(bb) if bb["use_shared_attn"] and bb["depth"] >= self.every else None
        self.final_adaln = nn.Linear(d, 2 * d)
        self.final_norm = layer_norm(d, affine=False)
        self.proj_out = nn.Linear(d, c * p * p)

    def forward(
        self,
        z_BxCxhxw: Tensor,
        t_B: Tensor,
        text_BxMxE: Tensor,
        text_mask_BxM: Tensor,
        pooled_BxE: Tensor,
        plan_BxKxD: Tensor | None = None,
        task_B: Tensor | None = None,
        source_BxCxhxw: Tensor | None = None,
    ) -> Tensor:
        b, c, h, w = z_BxCxhxw.shape
        seg, p = self.segment_embed, self.p
        x = self.patch_embed(F.pixel_unshuffle(z_BxCxhxw, p).permute(0, 2, 3, 1)) + seg[0]
        if source_BxCxhxw is not None:  # editing: [target | source] along the width
            src = F.pixel_unshuffle(source_BxCxhxw, p).permute(0, 2, 3, 1)
            if self.source_skip is not None:  # source cell (i, j) -> target token (i, j)
                x = x + self.source_skip(src)
            x = torch.cat([x, self.patch_embed(src) + seg[1]], dim=2)
        grid_hw = (h // p, x.shape[2])
        x = x.reshape(b, grid_hw[0] * grid_hw[1], -1)
        if self.bb["pos_embed"] == "sincos":
            if source_BxCxhxw is not None and self.bb.get("source_positions", "grid") == "aligned":
                pos = sincos_2d(h // p, w // p, x.shape[-1], x.device).reshape(h // p, w // p, -1)
                pos = torch.cat([pos, pos], dim=1).reshape(grid_hw[0] * grid_hw[1], -1)  # the source at the target's
            else:
                pos = sincos_2d(*grid_hw, x.shape[-1], x.device)
            x = x + pos[None]
        task_B = torch.zeros(b, dtype=torch.long, device=x.device) if task_B is None else task_B.long()
        t_emb = self.t_fc2(F.silu(self.t_fc1(timestep_embedding(t_B, 256))))
        silu_cond = F.silu(t_emb + self.pooled_proj(pooled_BxE) + self.task_embed[task_B])
        context, mask = self.text_proj(text_BxMxE), text_mask_BxM.bool()
        if self.bb["use_planner"]:
            context = torch.cat([context, plan_BxKxD], dim=1)
            mask = torch.cat([mask, torch.ones(plan_BxKxD.shape[:2], dtype=torch.bool, device=mask.device)], dim=1)
        mod = None
        for i in range(self.bb["depth"]):
            if i % self.group == 0:
                mod = getattr(self, f"adaln{i // self.group}")(silu_cond).reshape(b, NUM_MOD, -1)
            x = getattr(self, f"block{i}")(x, mod, context, mask, grid_hw)
            if self.shared_mqa is not None and (i + 1) % self.every == 0:
                x = self.shared_mqa(x)
        shift, scale = self.final_adaln(silu_cond).chunk(2, dim=-1)
        v = self.proj_out(modulate(self.final_norm(x), shift, scale))
        v = v.reshape(b, grid_hw[0], grid_hw[1], c * p * p)[:, :, : w // p]
        out = F.pixel_shuffle(v.permute(0, 3, 1, 2), p).float()
        if self.bb.get("prediction", "velocity") == "x":  # the clean latent x0 -> the velocity (z_t - x0) / t
            if self.bb.get("source_residual", False) and source_BxCxhxw is not None:
                out = out + source_BxCxhxw.float()  # x0 = source + the predicted change
            t = t_B.float().clamp(min=X_PRED_MIN_T).reshape(-1, 1, 1, 1)
            return (z_BxCxhxw.float() - out) / t
        return out


# ----------------------------------------------------------------------------- planner


class Planner(nn.Module):
    """Recurrent Latent Planner: gated carry of the previous plan, READ the latent, REASON, FFN."""

    def __init__(self, pl: Mapping[str, Any]):
        super().__init__()
        self.pl = dict(pl)
        d, k, hd = pl["dim"], pl["num_tokens"], pl["head_dim"]
        heads = max(1, d // hd)
        self.plan_init = nn.Parameter(torch.zeros(k, d))
        self.init_proj = nn.Linear(pl["text_dim"], d)
        self.carry_gate = nn.Parameter(torch.zeros(()))
        self.t_fc1, self.t_fc2 = nn.Linear(256, d), nn.Linear(d, d)
        self.r = pl.get("patch_size", 1)  # READ tokens: r x r patches of latent cells
        self.latent_proj = nn.Linear(pl["latent_channels"] * self.r**2, d)
        self.latent_norm = layer_norm(d)
        for i in range(pl["depth"]):
            for part in ("read", "reason"):
                self.add_module(f"{part}{i}", Attention(d, heads, hd))
                self.add_module(f"{part}{i}_norm", layer_norm(d))
            self.add_module(f"ffn{i}", Mlp(d, 3 * d))
            self.add_module(f"ffn{i}_norm", layer_norm(d))
        self.out_norm = layer_norm(d)

    def forward(
        self,
        z_BxCxhxw: Tensor,
        t_B: Tensor,
        pooled_BxE: Tensor,
        prev_BxKxD: Tensor | None = None,
        has_prev_B: Tensor | None = None,
    ) -> Tensor:
        b, _, h, w = z_BxCxhxw.shape
        p_init = self.plan_init[None] + self.init_proj(pooled_BxE)[:, None]
        p = p_init
        if prev_BxKxD is not None:
            keep = torch.sigmoid(self.carry_gate.float())
            mixed = keep * prev_BxKxD + (1 - keep) * p_init
            p = mixed if has_prev_B is None else torch.where(has_prev_B.bool()[:, None, None], mixed, p_init)
        p = p + self.t_fc2(F.silu(self.t_fc1(timestep_embedding(t_B, 256))))[:, None]
        h, w = h // self.r, w // self.r
        cells = F.pixel_unshuffle(z_BxCxhxw, self.r) if self.r > 1 else z_BxCxhxw
        latent = self.latent_proj(cells.permute(0, 2, 3, 1)).reshape(b, h * w, -1)
        latent = self.latent_norm(latent + sincos_2d(h, w, latent.shape[-1], latent.device)[None])
        for i in range(self.pl["depth"]):
            p = p + getattr(self, f"read{i}")(getattr(self, f"read{i}_norm")(p), latent)
            p = p + getattr(self, f"reason{i}")(getattr(self, f"reason{i}_norm")(p))
            p = p + getattr(self, f"ffn{i}")(getattr(self, f"ffn{i}_norm")(p))
        return self.out_norm(p)


class Denoiser(nn.Module):
    """Planner then backbone: `forward(...) -> (velocity (B, C, h, w), plan (B, K, D) or None)`."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.backbone = Backbone(cfg["backbone"])
        self.planner = Planner(cfg["planner"]) if cfg["backbone"]["use_planner"] else None

    def forward(
        self,
        z_BxCxhxw: Tensor,
        t_B: Tensor,
        text_BxMxE: Tensor,
        text_mask_BxM: Tensor,
        pooled_BxE: Tensor,
        prev_plan_BxKxD: Tensor | None = None,
        has_prev_B: Tensor | None = None,
        task_B: Tensor | None = None,
        source_BxCxhxw: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        plan = None
        if self.planner is not None:
            plan = self.planner(z_BxCxhxw, t_B, pooled_BxE, prev_plan_BxKxD, has_prev_B)
        v = self.backbone(z_BxCxhxw, t_B, text_BxMxE, text_mask_BxM, pooled_BxE, plan, task_B, source_BxCxhxw)
        return v, plan


# ----------------------------------------------------------------------------- SimpleTextEncoder


def byte_tokenize(prompts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes between BOS and EOS, right-padded with PAD, cut at a character boundary."""
    ids = torch.full((len(prompts), max_length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), max_length), dtype=torch.bool)
    for i, text in enumerate(prompts):
        data = text.encode("utf-8")
        if len(data) > max_length - 2:
            end = max_length - 2
            while end > 0 and (data[end] & 0xC0) == 0x80:  # a continuation byte: back off
                end -= 1
            data = data[:end]
        row = [BOS_ID, *data, EOS_ID]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    return ids, mask


class _TextLayer(nn.Module):
    """Pre-LN transformer layer (LayerNorm eps 1e-5, erf GELU), parameter names of the JAX EncoderLayer."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.attn = nn.Module()
        for name in ("query", "key", "value", "out"):
            self.attn.add_module(name, nn.Linear(d, d))
        self.mlp, self.heads = Mlp(d, hidden), heads
        self.norm1, self.norm2 = layer_norm(d, 1e-5), layer_norm(d, 1e-5)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (getattr(self.attn, m)(h).reshape(b, n, self.heads, -1) for m in ("query", "key", "value"))
        x = x + self.attn.out(dot_product_attention(q, k, v, mask).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class _TextTransformer(nn.Module):
    def __init__(self, d: int, layers: int, max_length: int):
        super().__init__()
        self.token_embed = nn.Embedding(SIMPLE_VOCAB, d)
        self.position_embed = nn.Embedding(max_length, d)
        self.num_layers = layers
        for i in range(layers):
            self.add_module(f"layers_{i}", _TextLayer(d, max(1, d // 64), 4 * d))
        self.final_norm = layer_norm(d, 1e-5)


class SimpleTextEncoder(nn.Module):
    """The small byte-level encoder: `forward(ids, mask) -> (tokens (zeroed at padding), mask, pooled)`."""

    def __init__(self, text: Mapping[str, Any]):
        super().__init__()
        self.max_length = text["max_length"]
        self.transformer = _TextTransformer(text["embed_dim"], text["simple_layers"], text["max_length"])

    def forward(self, ids_BxM: Tensor, mask_BxM: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tr, mask = self.transformer, mask_BxM.bool()
        x = tr.token_embed(ids_BxM) + tr.position_embed.weight[None, : ids_BxM.shape[1]]
        for i in range(tr.num_layers):
            x = getattr(tr, f"layers_{i}")(x, mask)
        x = tr.final_norm(x)
        m = mask.float()[..., None]
        pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return x * m, mask, pooled.to(x.dtype)

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        return self(*byte_tokenize(list(prompts), self.max_length))


class HFTextEncoder:
    """A Hugging Face BERT (mean pooling) or CLIP text (end-of-text pooling) folder, via transformers.

    Not an `nn.Module` on purpose: its weights live in the folder, not in MicroForge's state dict.
    """

    def __init__(self, folder: str | Path, max_length: int):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if self.tokenizer.pad_token is None:  # CLIP folders without one pad with end-of-text
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModel.from_pretrained(str(folder)).eval()
        self.model = getattr(model, "text_model", model)  # a full CLIPModel: its text tower
        self.is_clip = "clip" in type(self.model).__name__.lower()
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = enc["attention_mask"].bool()
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        x = out.last_hidden_state
        m = mask.float()[..., None]
        if self.is_clip:
            pooled = out.pooler_output.float()
        else:
            pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return x * m, mask, pooled.to(x.dtype)


# ----------------------------------------------------------------------------- the sampler


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
    """Times from 1 (noise) to 0 (data), shifted: s t / (1 + (s - 1) t); (steps + 1,) fp32."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=device)
    return shift * t / (1.0 + (shift - 1.0) * t)


def euler_step(z: Tensor, v: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step of dz/dt = v from t down to t_next: z - (t - t_next) v."""
    return z - (t - t_next) * v


def consistency_step(z: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
    """The consistency sampler's step (`sampling.consistency_step`): x0 = z - t v, then (1 - t_next) x0 + t_next eps.

    `eps` is fresh N(0, 1) noise of z's shape, drawn anew for each step; at t_next = 0 the step returns x0.
    """
    x0 = z - t * v
    return (1.0 - t_next) * x0 + t_next * eps


def heun_step(z: Tensor, v: Tensor, v_next: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The corrector of a Heun step (`flow.heun_step`): z - (t - t_next) (v + v_next) / 2, with `v_next`
    the velocity at the Euler predictor `euler_step(z, v, t, t_next)`, time t_next."""
    return z - (t - t_next) * (0.5 * (v + v_next))


def dpm_solver_2m_coefficients(ts: Tensor) -> tuple[Tensor, Tensor]:
    """DPM-Solver++(2M)'s per-step (ratio, slope) on a time grid (`flow.dpm_solver_2m_coefficients`),
    computed in float64 and returned as fp32 (S,) tensors: ratio_k = t_{k+1} / t_k and
    slope_k = (1 - ratio_k) h_k / (2 h_{k-1}), h_k = lambda_{k+1} - lambda_k, lambda = log((1 - t) / t);
    the first and the last step (to t = 0) are first order (slope 0)."""
    t = ts.detach().cpu().numpy().astype(np.float64)
    ratio = t[1:] / t[:-1]
    with np.errstate(divide="ignore"):
        lam = np.log1p(-t) - np.log(t)  # -inf at t = 1, +inf at t = 0
    slope = np.zeros_like(ratio)
    for k in range(1, len(ratio) - 1):
        slope[k] = 0.5 * (1.0 - ratio[k]) * (lam[k + 1] - lam[k]) / (lam[k] - lam[k - 1])
    return tuple(torch.tensor(c, dtype=torch.float32, device=ts.device) for c in (ratio, slope))


def dpm_solver_2m_step(z: Tensor, x0: Tensor, x0_prev: Tensor, ratio: Tensor, slope: Tensor) -> Tensor:
    """One DPM-Solver++(2M) step (`flow.dpm_solver_2m_step`): ratio z + (1 - ratio) x0 + slope (x0 - x0_prev)."""
    return ratio * z + (1.0 - ratio) * x0 + slope * (x0 - x0_prev)


class MicroForgeTorch(nn.Module):
    """The exported model: `vae`, `denoiser` and (for the simple encoder) `text`, plus the sampler.

    Attributes:
      config: the exported `config.json` (model config under "model"; "consistency" says whether the
        weights are consistency-distilled, and the few-step sampler's time shift and step limit).
      text_encoder: `encode(prompts) -> (tokens, mask, pooled)` (SimpleTextEncoder or HFTextEncoder).
    """

    def __init__(self, config: Mapping[str, Any], text_encoder: HFTextEncoder | None = None):
        super().__init__()
        self.config = dict(config)
        cfg = config["model"]
        self.scaling_factor = float(cfg["vae"]["scaling_factor"])
        self.shift_factor = float(cfg["vae"]["shift_factor"])
        self.vae, self.denoiser = DCVAE(cfg), Denoiser(cfg)
        self.text = SimpleTextEncoder(cfg["text"]) if cfg["text"]["encoder"] == "simple" else None
        self.hf_text = text_encoder
        self._uncond: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def text_encoder(self) -> SimpleTextEncoder | HFTextEncoder | None:
        """What `generate` encodes prompts with: the simple encoder, or the Hugging Face one."""
        return self.text if self.text is not None else self.hf_text

    def resolve_sampler(self, sampler: str | None, steps: int) -> str:
        """The step rule `generate` uses: `sampler`, or by default the consistency rule for
        consistency-distilled weights at steps <= `config["consistency"]["max_steps"]` (4), else Euler."""
        if sampler is None:
            consistency = self.config.get("consistency") or {}
            few_steps = steps <= int(consistency.get("max_steps", 0))
            return "consistency" if consistency.get("distilled", False) and few_steps else "euler"
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; samplers are {', '.join(SAMPLERS)}")
        return sampler

    def default_shift(self, sampler: str) -> float:
        """The time shift the weights trained with: the consistency stage's for the consistency rule
        (when the export records one), else the flow stage's (`config["time_shift"]`)."""
        consistency = self.config.get("consistency") or {}
        if sampler == "consistency" and "time_shift" in consistency:
            return float(consistency["time_shift"])
        return float(self.config.get("time_shift", 1.0))

    @torch.no_grad()
    def sample(
        self,
        text: tuple[Tensor, Tensor, Tensor],
        uncond: tuple[Tensor, Tensor, Tensor] | None,
        noise_BxCxhxw: Tensor,
        scale: float,
        steps: int,
        *,
        shift: float = 1.0,
        source_Bx3xHxW: Tensor | None = None,
        task: int = 0,
        decode: bool = True,
        sampler: str = "euler",
        generator: torch.Generator | None = None,
        step_noise_SxBxCxhxw: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """From t=1 to 0 with CFG on a stacked [cond ; uncond] batch and the plan carried.

        Every denoiser evaluation is guided and starts the planner from the previous evaluation's
        plan (for Heun, the corrector from its predictor's, the next step from the corrector's).

        Args:
          text, uncond: (tokens, mask, pooled) of the prompts and of the empty prompt (batch 1 is
            broadcast); `uncond=None` samples without guidance.
          noise_BxCxhxw: N(0, 1) in the backbone's normalised latent space.
          scale: guidance scale; steps: sampler steps S; shift: time-grid shift.
          source_Bx3xHxW: the source image in [-1, 1] for edit / inpaint / sr (task 1 / 2 / 3).
          sampler: the step rule, "euler" (`euler_step`), "heun" (`heun_step`: 2 evaluations a step,
            the last step to t = 0 a plain Euler step: 2S - 1 in all), "dpm++2m" (`dpm_solver_2m_step`:
            one evaluation a step, the previous x0 reused) or "consistency" (`consistency_step`: denoise
            to x0, re-noise with fresh noise each step; for consistency-distilled weights).
          generator: where the consistency rule draws its step noise (one (B, C, h, w) draw per
            step); None: torch's global generator.
          step_noise_SxBxCxhxw: the consistency rule's step noise given instead (step k uses row k; the
            last step's is multiplied by t = 0), e.g. to reproduce a JAX sample.

        Returns:
          (images (B, 3, H, W) in [-1, 1] or None, final normalised latent (B, C, h, w)).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; samplers are {', '.join(SAMPLERS)}")
        consistency = sampler == "consistency"
        if step_noise_SxBxCxhxw is not None:
            if not consistency:
                raise ValueError(f"step noise is used by the consistency sampler only, not {sampler!r}")
            expected = (steps, *noise_BxCxhxw.shape)
            if tuple(step_noise_SxBxCxhxw.shape) != expected:
                raise ValueError(f"step noise must have shape {expected}, got {tuple(step_noise_SxBxCxhxw.shape)}")
        b = noise_BxCxhxw.shape[0]
        guided = uncond is not None
        dev = noise_BxCxhxw.device
        text = tuple(x.to(dev).expand(b, *x.shape[1:]) for x in text)  # a batch of 1 is broadcast
        if guided:
            text = tuple(torch.cat([c, u.to(dev).expand(b, *u.shape[1:]).to(c.dtype)]) for c, u in zip(text, uncond))
        n = 2 * b if guided else b
        task_N = torch.full((n,), task, dtype=torch.long, device=noise_BxCxhxw.device)
        source = None
        if source_Bx3xHxW is not None:
            mean, _ = self.vae.encode_sliced(source_Bx3xHxW.float())
            source = (mean - self.shift_factor) * self.scaling_factor
            source = torch.cat([source, source]) if guided else source
        ts = time_grid(steps, shift, noise_BxCxhxw.device)
        z, plan = noise_BxCxhxw.float(), None

        def velocity(z: Tensor, t: Tensor) -> Tensor:
            nonlocal plan
            z_N = torch.cat([z, z]) if guided else z
            v_N, plan = self.denoiser(z_N, t.expand(n), *text, plan, None, task_N, source)
            return v_N[b:] + scale * (v_N[:b] - v_N[b:]) if guided else v_N

        if sampler == "dpm++2m":
            ratio, slope = dpm_solver_2m_coefficients(ts)
            x0_prev = torch.zeros_like(z)
        for k in range(steps):
            v = velocity(z, ts[k])
            if sampler == "heun" and k < steps - 1:  # the last step, to t = 0, stays an Euler step
                v_next = velocity(euler_step(z, v, ts[k], ts[k + 1]), ts[k + 1])
                z = heun_step(z, v, v_next, ts[k], ts[k + 1])
            elif sampler == "dpm++2m":
                x0 = z - ts[k] * v
                z, x0_prev = dpm_solver_2m_step(z, x0, x0_prev, ratio[k], slope[k]), x0
            elif consistency:
                if step_noise_SxBxCxhxw is not None:
                    eps = step_noise_SxBxCxhxw[k]
                else:
                    gen_dev = generator.device if generator is not None else dev
                    eps = torch.randn(z.shape, generator=generator, device=gen_dev)
                z = consistency_step(z, v, ts[k], ts[k + 1], eps.to(dev).float())
            else:
                z = euler_step(z, v, ts[k], ts[k + 1])
        images = None
        if decode:
            images = self.vae.decode_sliced(z / self.scaling_factor + self.shift_factor).clamp(-1.0, 1.0)
        return images, z

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        steps: int = 20,
        cfg: float = 4.0,
        seed: int = 0,
        noise: Tensor | None = None,
        size: tuple[int, int] | None = None,
        shift: float | None = None,
        sampler: str | None = None,
        step_noise: Tensor | None = None,
    ) -> np.ndarray:
        """Text to image: uint8 (N, H, W, 3). `cfg == 1` runs without guidance.

        The noise comes from `torch.Generator().manual_seed(seed)` (not JAX's generator: pass
        `noise` (N, C, h, w), and for the consistency rule `step_noise` (steps, N, C, h, w), to
        reproduce a JAX sample); the consistency rule's step noise continues that generator's stream.

        Args:
          sampler: "euler", "heun", "dpm++2m" or "consistency" (see `sample`); None: `resolve_sampler`
            (consistency for consistency-distilled weights at steps <= 4, as the JAX pipeline).
          shift: time-grid shift; None: `default_shift(sampler)`, what the weights trained with.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampler = self.resolve_sampler(sampler, steps)
        cfg_m = self.config["model"]
        f, c = cfg_m["vae"]["downsample_factor"], cfg_m["latent_channels"]
        size = size or (int(self.config.get("image_size", 64)),) * 2
        gen = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = torch.randn((len(prompts), c, size[0] // f, size[1] // f), generator=gen)
        noise = noise.to(next(self.parameters()).device)
        text = self.text_encoder.encode(prompts)
        uncond = None
        if cfg != 1.0:
            if self._uncond is None:
                self._uncond = self.text_encoder.encode([""])
            uncond = self._uncond
        shift = self.default_shift(sampler) if shift is None else shift
        images, _ = self.sample(
            text,
            uncond,
            noise,
            cfg,
            steps,
            shift=shift,
            sampler=sampler,
            generator=gen,
            step_noise_SxBxCxhxw=step_noise,
        )
        x = (images.permute(0, 2, 3, 1).cpu().numpy() + 1.0) * 127.5
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class DenoiserStep(nn.Module):
    """One denoiser evaluation with tensor-only inputs, for ONNX: (v, new plan).

    `has_prev_B` False rows start the plan from p_init (the first sampling step). Exported with the
    first seven inputs it is the generation step; with `task` (N,) int64 task ids (1 edit, 2 inpaint,
    3 sr) and `source` (N, C, h, w), the source image's normalised VAE latent (the posterior mean,
    `(mean - shift) * scale`, the target's shape), it is the edit step on the [target | source] grid
    (v of the target half only).
    """

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, z, t, text, text_mask, pooled, prev_plan, has_prev, task=None, source=None
    ) -> tuple[Tensor, Tensor]:
        return self.denoiser(z, t, text, text_mask, pooled, prev_plan, has_prev, task, source)


def load_exported(folder: str | Path, *, text_encoder: bool = True) -> MicroForgeTorch:
    """Loads an exported folder (`config.json`, `model.safetensors`, `text_encoder/`) for sampling.

    Args:
      folder: what `python -m microforge_jax.export` wrote.
      text_encoder: load the Hugging Face text encoder (False: leave `text_encoder` None).

    Returns:
      MicroForgeTorch in eval mode.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    hf = None
    if text_encoder and config["model"]["text"]["encoder"] != "simple":
        hf = HFTextEncoder(folder / config["text_encoder"]["folder"], config["model"]["text"]["max_length"])
    model = MicroForgeTorch(config, hf)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval()
