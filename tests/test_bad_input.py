"""Bad input through the real command lines (`python train.py`, `python sample.py`, `python -m
microforge_jax.export`): one `error: ...` line on stderr, exit code 2, no traceback, nothing written,
and an existing run left exactly as it was (DESIGN.md section 6).

One tiny finished run (VAE 1 step, flow 2 steps, a checkpoint at each step) is trained once through
`python train.py`; every test works on a copy of it. The commands run as a user runs them: one CPU
device, the tests' persistent compilation cache.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TINY = (
    "stages=('vae','flow')",
    "image_size=16",
    "model.latent_channels=4",
    "model.vae.channels=(8,16)",
    "model.vae.downsample_factor=4",
    "model.backbone.depth=1",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=1",
    "model.backbone.patch_size=1",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.text.encoder=simple",
    "model.text.embed_dim=48",
    "model.text.max_length=192",  # bytes: the longest shapes caption fits (no truncation warning on stderr)
    "train.vae.pretrained=",  # train this tiny VAE (nano starts from its shipped weights)
    "train.vae.steps=1",
    "train.vae.batch_size=2",
    "train.vae.disc_channels=8",
    "train.vae.scale_batches=1",
    "train.flow.steps=2",
    "train.flow.batch_size=2",
    "checkpoint_every=1",  # flow/1 and flow/2: a damaged latest checkpoint must leave the other one
    "sample_steps=1",
    "eval_batches=1",
    "final_eval.num=0",
)


def _env() -> dict[str, str]:
    """The environment of a user's command: one CPU device (not the tests' 8 fake ones), offline."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    return env


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...`, holding every fragment."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), r.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert r.returncode == 2, (r.returncode, lines[0])
    return lines[0]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under root (root included) -> (sha256 of a file or "dir", mtime_ns).

    A file written, rewritten with the same bytes, created, renamed or deleted anywhere shows up
    (the last three through their directory's mtime).
    """
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (digest, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("finished") / "run"
    r = _cli("train.py", "--workdir", str(workdir), *TINY, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for step_dir in ("vae/1", "flow/1", "flow/2"):
        assert (workdir / "checkpoints" / step_dir / "state").is_dir(), step_dir
    return workdir


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run, the tests' to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ----------------------------------------------------------------------------- train.py


def test_train_on_a_missing_data_folder_leaves_the_run_untouched(run, tmp_path):
    before = _snapshot(run)
    missing = tmp_path / "no_such_folder"
    r = _cli("train.py", "--workdir", str(run), "data.source=folder", f"data.path={missing}")
    _assert_one_line_error(r, f"data.path '{missing}' is not a folder")
    assert _snapshot(run) == before


def test_train_on_an_empty_data_folder_writes_nothing(tmp_path):
    empty, workdir = tmp_path / "empty", tmp_path / "new_run"
    empty.mkdir()
    r = _cli("train.py", "--workdir", str(workdir), *TINY, "data.source=folder", f"data.path={empty}")
    _assert_one_line_error(r, f"no captioned images in {empty}")
    assert not workdir.exists()  # not even the run directory
    assert not any(empty.iterdir())


def test_train_into_another_configs_run_is_refused(run):
    before = _snapshot(run)
    r = _cli("train.py", "--workdir", str(run), "model.backbone.dim=96")
    _assert_one_line_error(
        r, "checkpoint from another config: model.backbone.dim is 64 in the saved run but 96 in the requested config"
    )
    assert _snapshot(run) == before


def _truncate_array_data(state_dir: Path) -> None:
    """Cuts the largest array chunk in half: a crash mid-copy, a full disk."""
    chunk = max(
        (p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
    )
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])


def _garble_metadata(state_dir: Path) -> None:
    """Overwrites the tree metadata (what the restore reads first) with garbage after its first third."""
    path = state_dir / "_METADATA"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] + b"\x00garbage\xff")


@pytest.mark.parametrize("damage", [_truncate_array_data, _garble_metadata], ids=["truncated", "garbled"])
def test_resume_from_a_damaged_checkpoint_names_it_and_keeps_the_others(run, damage):
    step_dir = run / "checkpoints" / "flow" / "2"
    damage(step_dir / "state")
    before = _snapshot(run)
    r = _cli("train.py", "--workdir", str(run))  # the same command again: resume
    _assert_one_line_error(r, f"cannot restore checkpoint {step_dir} (", "move it away to resume from step 1")
    assert _snapshot(run) == before  # the damaged checkpoint, flow/1, vae/1 and config.json as they were
    for kept in ("vae/1", "flow/1", "flow/2"):
        assert (run / "checkpoints" / kept / "state").is_dir(), kept


def test_train_at_an_image_size_the_vae_does_not_divide_writes_nothing(tmp_path):
    workdir = tmp_path / "new_run"
    r = _cli("train.py", "--workdir", str(workdir), *TINY, "image_size=30")
    _assert_one_line_error(r, "image_size 30 must be a positive multiple of 4 (the VAE's compression factor)")
    assert not workdir.exists()


# ----------------------------------------------------------------------------- sample.py


def test_sample_at_a_size_the_vae_does_not_divide(run, tmp_path):
    before, out = _snapshot(run), tmp_path / "samples"
    r = _cli("sample.py", "--workdir", str(run), "--size", "30", "--prompt", "a red circle", "--out", str(out))
    _assert_one_line_error(r, "image size 30x30 is not supported", "multiples of 4")
    assert not out.exists()
    assert _snapshot(run) == before


def _garbage_png(path: Path) -> None:
    path.write_bytes(b"not an image at all " * 20)


def _truncated_png(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("corrupt", [_garbage_png, _truncated_png], ids=["garbage", "truncated"])
def test_sample_edit_with_a_corrupt_source_image(run, tmp_path, corrupt):
    source, out = tmp_path / "source.png", tmp_path / "samples"
    corrupt(source)
    before = _snapshot(run)
    r = _cli(
        "sample.py",
        "--workdir",
        str(run),
        "--task",
        "edit",
        "--source",
        str(source),
        "--prompt",
        "make it blue",
        "--out",
        str(out),
    )
    _assert_one_line_error(r, f"cannot read the source image {source}")
    assert not out.exists()
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "remove, message",
    [("checkpoints", "has a config but no checkpoints"), ("checkpoints/flow", "has no trained denoiser")],
    ids=["no_checkpoints", "vae_only"],
)
def test_export_of_a_run_with_no_finished_denoiser(run, tmp_path, remove, message):
    shutil.rmtree(run / remove)
    before, out = _snapshot(run), tmp_path / "export"
    r = _cli("-m", "microforge_jax.export", "--workdir", str(run), "--out", str(out))
    _assert_one_line_error(r, f"run {run} {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no export folder, no temporary one beside it
    assert _snapshot(run) == before
