"""Training data from a folder of images with captions: a Grain random-access source.

Two caption habits, as in Hugging Face `datasets`' imagefolder:

* `metadata.jsonl` at the folder's root, one JSON object a line with `file_name` (relative to the
  folder) and `text` (the caption);
* otherwise a sidecar caption per image: `cat.png` + `cat.txt` (images anywhere under the folder).

Images without a caption are left out. Each image is resized (shorter side to `image_size`,
bicubic) and centre-cropped to a square.

Unreadable images (a corrupt JPEG, a zero-byte file, a file named in metadata.jsonl that is not
there) are found lazily, when a record is read, so a big folder starts at once: the record of a
bad image is replaced by the next readable one and carries `skipped = 1` (else 0). Counters kept
in Grain worker processes never reach the trainer, so the trainer sums the `skipped`
field of the batches it consumes; over one epoch that counts each bad file once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_FILE = "metadata.jsonl"
Record = dict[str, Any]


class ImageFolderError(ValueError):
    """A folder that cannot be trained on (missing, empty, no captions); the message is one line."""


def scan_folder(path: str | Path) -> list[tuple[str, str]]:
    """The (image path, caption) pairs of a folder, sorted by path; nothing is decoded here.

    Args:
      path: the folder.

    Returns:
      A non-empty list of (absolute image path, caption).

    Raises:
      ImageFolderError: the folder is missing, has a malformed metadata.jsonl, or has no captioned image.
    """
    root = Path(path).expanduser()
    if not str(path) or not root.is_dir():
        raise ImageFolderError(f"data.path {str(path)!r} is not a folder (data.source='folder' needs one)")
    pairs: list[tuple[str, str]] = []
    metadata = root / METADATA_FILE
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ImageFolderError(
                    f"{metadata} line {n}: expected a JSON object with 'file_name' and 'text'"
                ) from None
            pairs.append((str(root / name), str(text)))
    else:
        for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
            caption = image.with_suffix(".txt")
            if caption.is_file():
                pairs.append((str(image), caption.read_text(encoding="utf-8", errors="replace").strip()))
    if not pairs:
        raise ImageFolderError(
            f"no captioned images in {root}: give a {METADATA_FILE} (file_name, text) or a .txt caption beside each image"
        )
    return sorted(pairs)


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decodes an image, resizes its shorter side to `image_size` and centre-crops: uint8 HxWx3.

    Raises:
      OSError / ValueError (PIL's): the file cannot be decoded.
    """
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as im:
        im = im.convert("RGB")  # forces the full decode: a truncated file fails here, not later
        w, h = im.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, np.uint8)


class ImageFolderSource:
    """A Grain random-access source over `scan_folder(path)`: {"image", "text", "skipped"} records.

    Args:
      path: the folder.
      image_size: the square training resolution.
    """

    def __init__(self, path: str | Path, image_size: int):
        self.path = str(path)
        self.image_size = int(image_size)
        self.entries = scan_folder(path)
        self._bad: set[int] = set()  # a per-process cache (not a counter): bad files are not decoded twice

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.path!r}, {len(self)} images)"

    def _read(self, i: int) -> np.ndarray | None:
        if i in self._bad:
            return None
        try:
            return load_image(self.entries[i][0], self.image_size)
        except (OSError, ValueError, SyntaxError):  # PIL raises these for corrupt or missing files
            self._bad.add(i)
            return None

    def __getitem__(self, index: int) -> Record:
        n = len(self.entries)
        index = int(index) % n
        for k in range(n):
            i = (index + k) % n
            image = self._read(i)
            if image is not None:
                # Only the record's own file counts, so an epoch counts each bad file once.
                return {"image": image, "text": self.entries[i][1], "skipped": np.int32(k > 0)}
        raise ImageFolderError(f"none of the {n} images in {self.path} can be read")


def folder_transform(stage: str) -> Callable[[Record], Record]:
    """The per-record fields of a stage: vae {"image", "skipped"}, flow {"image", "text", "skipped"}.

    Raises:
      ImageFolderError: the edit stage (a folder has no edit pairs).
    """
    if stage == "vae":
        return lambda r: {"image": r["image"], "skipped": r["skipped"]}
    if stage == "flow":
        return lambda r: {"image": r["image"], "text": r["text"], "skipped": r["skipped"]}
    raise ImageFolderError(f"a folder of captioned images has no {stage!r} records (only the vae and flow stages)")


def folder_dataset(stage: str, path: str | Path, *, batch_size: int, seed: int, image_size: int, **kwargs: Any) -> Any:
    """A stage's Grain pipeline over a folder (`pipeline.make_dataset` with `folder_transform`).

    Args:
      stage: "vae" or "flow".
      path: the folder.
      batch_size: the global batch size.
      seed: the shuffle seed.
      image_size: the square training resolution.
      **kwargs: passed to `make_dataset` (shuffle, num_epochs, worker_count, ...).

    Returns:
      A `grain.IterDataset` of batches with `image` (f32 [-1, 1]), `skipped` (int32) and, for flow, `text`.
    """
    from microforge_jax.data import pipeline  # noqa: PLC0415

    source = ImageFolderSource(path, image_size)
    return pipeline.make_dataset(source, batch_size=batch_size, seed=seed, transform=folder_transform(stage), **kwargs)
