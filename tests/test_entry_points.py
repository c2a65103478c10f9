"""The entry points: they run, and bad input is one line on stderr with a non-zero exit."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_train_unknown_key_is_one_line():
    r = _run("train.py", "model.backbone.dpth=3")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown config key 'model.backbone.dpth'")
    assert "model.backbone.depth" in r.stderr


def test_train_unknown_config_lists_configs():
    r = _run("train.py", "--config", "nanoo")
    assert r.returncode == 2 and "available configs are base, nano, small, tiny" in r.stderr
    assert "Traceback" not in r.stderr


def test_sample_runs():
    assert _run("sample.py", "--help").returncode == 0


def test_train_bad_cell_weight_is_one_line_and_writes_nothing(tmp_path):
    r = _run("train.py", "--workdir", str(tmp_path / "run"), "train.flow.object_cell_weight=0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("train.flow.object_cell_weight must be > 0, got 0.0")
    assert r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
