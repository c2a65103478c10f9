"""What every benchmark prints above its numbers: the machine, the library versions and the date."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except (ImportError, AttributeError):
        return "not installed"


def header() -> str:
    """Machine, library versions and date, as markdown lines (torch's threads if torch is loaded)."""
    import jax  # noqa: PLC0415

    dev = jax.devices()[0]
    versions = ", ".join(f"{m} {_version(m)}" for m in ("jax", "jaxlib", "flax", "torch"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    threads = ""
    if "torch" in sys.modules:
        threads = f"; torch threads {sys.modules['torch'].get_num_threads()}"
    return (
        f"- machine: {cpu_model()}, nproc {os.cpu_count()}; JAX backend {dev.platform} ({dev.device_kind})\n"
        f"- versions: {versions}, Python {platform.python_version()}{threads}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}\n"
        f"- date: {now}"
    )
