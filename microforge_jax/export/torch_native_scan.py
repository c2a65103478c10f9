"""The compiled C++ CPU selective scan (`kernels/native_scan.cc`) as a PyTorch autograd function.

The JAX model runs this kernel on CPU through the XLA FFI; here the same library is called with
ctypes on contiguous fp32 CPU tensors, so the benchmark's PyTorch side can use it too (set
`torch_model.SCAN_KERNEL = selective_scan`). Same signature and result as
`torch_model.selective_scan`; building the library needs a C++ compiler (`native_scan.build`).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

from microforge_jax.export import torch_model
from microforge_jax.kernels import native_scan

_i64 = ctypes.c_int64


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class _NativeScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, At, B, C, chunk):
        bt, length, e = u.shape
        n = B.shape[-1]
        keep = any(ctx.needs_input_grad)
        y = torch.empty_like(u)
        starts = torch.empty((bt, -(-length // chunk) if keep else 0, n, e), dtype=torch.float32)
        native_scan.library().mf_scan_forward_raw(
            *map(_ptr, (u, delta, At, B, C, y)),
            _ptr(starts) if keep else ctypes.c_void_p(None),
            *map(_i64, (bt, length, e, n, chunk, torch.get_num_threads())),
        )
        ctx.save_for_backward(u, delta, At, B, C, starts)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, g):
        u, delta, At, B, C, starts = ctx.saved_tensors
        bt, length, e = u.shape
        grads = [torch.empty_like(x) for x in (u, delta, At, B, C)]
        native_scan.library().mf_scan_backward_raw(
            *map(_ptr, (u, delta, At, B, C, g.float().contiguous(), starts, *grads)),
            *map(_i64, (bt, length, e, B.shape[-1], ctx.chunk, torch.get_num_threads())),
        )
        return (*grads, None)


def selective_scan(u, delta, A, B, C, D, block: int | None = None) -> torch.Tensor:
    """`torch_model.selective_scan` on the C++ kernel (CPU tensors).

    Args:
      u, delta: (Bt, L, E); A: (E, N) or (Bt, E, N); B, C: (Bt, L, N); D: (E,) or (Bt, E).
      block: tokens per recomputed chunk of the backward (default `native_scan.chunk_for`: what
        fits in L2); a speed / memory knob only, the result does not depend on it.
    """
    bt, _, e = u.shape
    n = B.shape[-1]
    f = lambda x: x.float().contiguous()
    At = f(A.float().reshape(-1, e, n).transpose(-1, -2).expand(bt, n, e))
    chunk = block or native_scan.chunk_for(n, e)
    y = _NativeScan.apply(f(u), f(delta), At, f(B), f(C), int(chunk))
    return (y + u.float() * D.float().reshape(-1, e)[:, None, :]).to(u.dtype)


@contextlib.contextmanager
def as_scan_kernel():
    """Within: the mirror's eager BiSSM scan (`torch_model.SCAN_KERNEL`) is this kernel; restored after."""
    previous, torch_model.SCAN_KERNEL = torch_model.SCAN_KERNEL, selective_scan
    try:
        yield
    finally:
        torch_model.SCAN_KERNEL = previous
