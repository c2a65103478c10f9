"""Training on a folder of captioned images: both caption habits, resizing, skipped files, refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microforge_jax.data import imagefolder

ROOT = Path(__file__).resolve().parent.parent


def _write_folder(folder: Path, sidecar: bool = True) -> Path:
    """6 good images of assorted sizes and formats, a truncated JPEG and a zero-byte PNG, all captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(40, 48), (64, 32), (32, 32), (50, 70), (33, 90), (80, 40)]):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
        rows.append((name, f"picture number {i}"))
    good = folder / "img0.jpg"
    (folder / "corrupt.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])  # truncated JPEG
    (folder / "empty.png").write_bytes(b"")
    rows += [("corrupt.jpg", "a corrupt file"), ("empty.png", "an empty file")]
    if sidecar:
        for name, text in rows:
            (folder / name).with_suffix(".txt").write_text(text)
    else:
        lines = [json.dumps({"file_name": name, "text": text}) for name, text in rows]
        (folder / imagefolder.METADATA_FILE).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("sidecar", [True, False])
def test_source_reads_both_caption_habits_and_counts_bad_files(tmp_path, sidecar):
    source = imagefolder.ImageFolderSource(_write_folder(tmp_path / "imgs", sidecar), 32)
    assert len(source) == 8
    records = [source[i] for i in range(len(source))]
    assert all(r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 for r in records)
    assert sum(int(r["skipped"]) for r in records) == 2  # each bad file once per pass
    assert {r["text"] for r in records} <= {f"picture number {i}" for i in range(6)}


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 30:50] = 255  # a white band in the middle of a wide image
    Image.fromarray(image).save(tmp_path / "wide.png")
    out = imagefolder.load_image(str(tmp_path / "wide.png"), 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 8:12].min() > 200 and out[:, :3].max() < 50  # the band is centred, the sides cropped


def test_folder_without_captions_is_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "lonely.png")
    with pytest.raises(imagefolder.ImageFolderError, match="no captioned images"):
        imagefolder.scan_folder(tmp_path)


def test_training_on_a_folder_counts_skipped_images(tmp_path):
    from helpers import tiny_config as _config

    from microforge_jax import train_lib

    folder = _write_folder(tmp_path / "imgs")
    # A batch of 4 over the 8 fake devices: batch axes of 4 (data), the rest on "tensor".
    overrides = ("stages=('vae',)", "data.source=folder", f"data.path={folder}", "sharding.mesh_shape=(4,1,2)")
    config = _config(*overrides, steps=2, batch=4)
    train_lib.train_and_evaluate(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vae = [r for r in lines if r["stage"] == "vae"]
    assert len(vae) == 2 and all(np.isfinite(r["train/loss"]) for r in vae)
    assert vae[-1]["data/skipped"] == 2  # 2 steps of 4 = one epoch of 8 files, 2 of them unreadable


def test_empty_folder_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["data.source=folder", f"data.path={tmp_path / 'empty'}", "--workdir", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no captioned images in"), proc.stderr
    assert not (tmp_path / "run" / "config.json").exists()
