"""The selective scan as a compiled CPU kernel (`native_scan.cc`), called through the XLA FFI.

On CPU the sequential `lax.scan` form spends its time in the ~16 separate XLA kernels each token
of its backward runs, not in arithmetic (BENCHMARKS.md, "The BiSSM layer against its floors"). The
C++ kernel runs each token's whole update in one pass over the cache-resident state, the way
Mamba's CUDA kernel does on a GPU: forward once, backward by recomputing chunks from saved
chunk-start states.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `g++` / `c++`)
into a cache directory (`$MICROFORGE_KERNEL_CACHE`, else `~/.cache/microforge_jax`), keyed by the
source, the flags, the compiler, jaxlib and the CPU, as torch's `cpp_extension.load` and Triton do.
Nothing is fetched. Where no compiler works, `available()` is False (one warning says why) and
`scan_impl="auto"` keeps the `lax.scan` form.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("native_scan.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
FORWARD, BACKWARD = "mf_scan_forward", "mf_scan_backward"

log = logging.getLogger(__name__)


class NativeScanError(RuntimeError):
    """The kernel could not be built or loaded (the message says which command failed, and how)."""


def _compiler() -> str:
    if os.environ.get("CXX"):
        cxx = os.environ["CXX"]
        if not shutil.which(cxx):
            raise NativeScanError(f"$CXX={cxx!r} is not an executable")
        return cxx
    for cxx in ("g++", "c++"):
        if shutil.which(cxx):
            return cxx
    raise NativeScanError("no C++ compiler found (set $CXX, or install g++)")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _jaxlib_version() -> str:
    """The FFI headers' version: they ship with jaxlib."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return jax.__version__


def cache_dir() -> Path:
    root = os.environ.get("MICROFORGE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microforge_jax"


def build() -> Path:
    """Compiles the kernel if this source/compiler/CPU has no library yet; returns its path."""
    cxx = _compiler()
    version = _run([cxx, "--version"], timeout=60).stdout.split("\n")[0]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _jaxlib_version(), _cpu_id()]).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / f"native_scan_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-shared", "-fPIC", "-pthread", f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        done = _run(cmd, timeout=600)
    except NativeScanError:
        os.unlink(tmp)
        raise
    if done.returncode != 0:
        os.unlink(tmp)
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        first_error = next((ln for ln in lines if "error" in ln), lines[-1])
        raise NativeScanError(f"`{' '.join(cmd)}` failed: {first_error}")
    os.replace(tmp, lib)
    return lib


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeScanError(f"`{' '.join(cmd)}` did not run: {e}") from e


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel library, loaded (also exports `mf_scan_forward_raw` / `_backward_raw`, C ABI)."""
    return ctypes.cdll.LoadLibrary(str(build()))


@functools.cache
def _register() -> None:
    lib = library()
    for name, symbol in ((FORWARD, lib.MfScanForward), (BACKWARD, lib.MfScanBackward)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered; False (with one warning saying why) otherwise."""
    try:
        _register()
        return True
    except (NativeScanError, OSError, AttributeError) as e:
        log.warning("native CPU scan unavailable, using the lax.scan form: %s", e)
        return False


def require() -> None:
    """Registers the kernel, or raises NativeScanError with the reason."""
    try:
        _register()
    except OSError as e:
        raise NativeScanError(f"could not load the native scan library: {e}") from e


def threads() -> int:
    env = os.environ.get("MICROFORGE_SCAN_THREADS")
    if env:
        return max(1, int(env))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunk_for(n: int, din: int) -> int:
    """Tokens per recomputed chunk: its states and decays (2 T N Din floats) take ~1 MiB (L2).

    Measured with the kernel alone, one thread, T = 4 / 8 / 16 / 32 (2-core AMD EPYC, 2026-11-27):
    backward 44.7 / 30.1 / 28.8 / 30.9 ms at (Bt, L, Din, N) = (4, 1024, 512, 16) and 21.4 / 18.6 /
    17.9 / 17.3 ms at (64, 64, 256, 16); keeping the decays beat recomputing them (1.0-1.15x).
    """
    return int(max(1, min(64, 131072 // (n * din))))


def _attrs(chunk: int) -> dict:
    return {"chunk": np.int64(chunk), "threads": np.int64(threads())}


def _forward(u, d, At, B, C, chunk: int, keep_starts: bool):
    bt, length, din = u.shape
    starts = (bt, -(-length // chunk) if keep_starts else 0, B.shape[-1], din)  # batch-leading, even when empty
    out = (jax.ShapeDtypeStruct(u.shape, jnp.float32), jax.ShapeDtypeStruct(starts, jnp.float32))
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(u, d, At, B, C, **_attrs(chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(u, d, At, B, C, chunk):
    return _forward(u, d, At, B, C, chunk, keep_starts=False)[0]


def _scan_fwd(u, d, At, B, C, chunk):
    y, starts = _forward(u, d, At, B, C, chunk, keep_starts=True)
    return y, (u, d, At, B, C, starts)


def _scan_bwd(chunk, res, g):
    u, d, At, B, C, starts = res
    out = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (u, d, At, B, C))
    call = jax.ffi.ffi_call(BACKWARD, out, vmap_method="sequential")
    return tuple(call(u, d, At, B, C, g.astype(jnp.float32), starts, **_attrs(chunk)))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_native(u, delta, At, B, C, *, chunk: int | None = None) -> jax.Array:
    """y_t = sum_n h_t C_t (no D skip), fp32, batch-major.

    Args:
      u, delta: (Bt, L, Din); At: (Bt, N, Din) (the decay rates, transposed and per row); B, C:
        (Bt, L, N). Any float dtype; computed in fp32.
      chunk: tokens per recomputed chunk of the backward (default `chunk_for`: what fits in L2).
    """
    require()
    f32 = jnp.float32
    chunk = chunk or chunk_for(B.shape[-1], u.shape[-1])
    return _scan(*(x.astype(f32) for x in (u, delta, At, B, C)), int(chunk))
