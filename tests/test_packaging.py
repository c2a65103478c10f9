"""The wheel: `pip install .` ships every module and the C++ kernel source, and the console scripts run.

Built offline (`--no-build-isolation --no-index`: the installed setuptools) from a copy of the
package, so a stale `build/` folder or another process's files cannot leak in; ~10-30 s.
"""

import configparser
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "microforge_jax"
CONFIGS = ROOT / "configs"
SCRIPTS = {
    "microforge-train": "microforge_jax.commands.train:main",
    "microforge-sample": "microforge_jax.commands.sample:main",
    "microforge-eval": "microforge_jax.eval.__main__:main",
    "microforge-export": "microforge_jax.export.__main__:main",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    for folder in (PACKAGE, CONFIGS):
        shutil.copytree(folder, src / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index"]
    r = subprocess.run([*cmd, "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = (tmp / "dist").glob("microforge_jax-*.whl")
    return path


def test_wheel_holds_every_module_and_the_kernel_source(wheel):
    expected = {
        p.relative_to(ROOT).as_posix()
        for folder in (PACKAGE, CONFIGS)
        for p in folder.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected.add("microforge_jax/kernels/native_scan.cc")
    expected |= {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "assets").glob("*.safetensors")}
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(z.read(entry_points).decode())
    assert {n for n in names if n.startswith(("microforge_jax/", "configs/"))} == expected
    assert dict(parser["console_scripts"]) == SCRIPTS


def test_installed_console_scripts_run(wheel, tmp_path):
    """Installed in a venv (beside this Python's packages): each command's --help, and the kernel source."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    bin_dir = env_dir / ("Scripts" if sys.platform == "win32" else "bin")
    python = bin_dir / Path(sys.executable).name
    python = python if python.exists() else bin_dir / "python"
    run = lambda *args: subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    r = run(str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    for script in SCRIPTS:
        r = run(str(bin_dir / script), "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr)
    r = run(str(bin_dir / "microforge-train"), "--config", "nanoo")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "nano" in r.stderr and "tiny" in r.stderr  # the installed configs are found (outside the repository)
    code = "from microforge_jax.kernels import native_scan as k; print(k.SOURCE.is_file(), k.SOURCE.parent.parent)"
    r = run(str(python), "-c", code)
    assert r.returncode == 0, r.stderr
    found, package = r.stdout.split()
    assert found == "True" and Path(package).resolve() != PACKAGE.resolve()  # the installed copy's source
