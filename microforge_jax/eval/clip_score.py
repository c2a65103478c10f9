"""CLIP score (torchmetrics' `CLIPScore`) with a Hugging Face CLIP folder, in Flax, without torch.

    CLIPScore = max(100 * mean_i cos(E_image_i, E_text_i), 0)

where E_image = visual_projection(vision_model(image).pooler_output) and E_text =
text_projection(text_model(caption).pooler_output). As in torchmetrics, the clamp at 0 applies to
the mean (equal to averaging the per-pair `max(100 cos, 0)` whenever no pair is negative, which is
what real CLIPs give matched pairs).

The folder is a `CLIPModel` checkpoint (`config.json` with model_type "clip", `model.safetensors`,
tokenizer files, and optionally `preprocessor_config.json`), e.g. openai/clip-vit-large-patch14 as
saved by `save_pretrained`. Images are preprocessed as CLIP's processor does (transformers'
PIL backend, the classic `CLIPImageProcessor`): shortest side resized to 224 (bicubic), centre
crop 224, scaled to [0, 1], normalised with CLIP's mean and std.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax.config import TextConfig
from microforge_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPScoreError(ValueError):
    """A CLIP folder that cannot be used; the message is one line naming the folder."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """CLIP image preprocessing: resize the shortest side (bicubic), centre crop, normalise."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: Path) -> Preprocess:
        """Reads `preprocessor_config.json` when the folder has one; CLIP's defaults otherwise."""
        f = folder / "preprocessor_config.json"
        if not f.is_file():
            return cls()
        try:
            cfg = json.loads(f.read_text())
            size = cfg.get("size", 224)
            edge = int(size["shortest_edge"] if isinstance(size, dict) else size)
            crop = cfg.get("crop_size", edge)
            crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
            out = cls(edge, crop_hw, tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CLIPScoreError(f"CLIP folder {folder}: preprocessor_config.json is not usable ({e})") from None
        if max(out.crop) > out.shortest_edge:
            raise CLIPScoreError(f"CLIP folder {folder}: crop {out.crop} is larger than the resized side {edge}")
        return out

    def __call__(self, image_HxWx3: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 (crop_h, crop_w, 3), as transformers' CLIPImageProcessorPil."""
        from PIL import Image  # noqa: PLC0415

        h, w = image_HxWx3.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.shortest_edge * long / short)  # transformers truncates
        nh, nw = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
        im = Image.fromarray(np.asarray(image_HxWx3, np.uint8)).resize((nw, nh), Image.Resampling.BICUBIC)
        x = np.asarray(im)
        ch, cw = self.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        x = x[top : top + ch, left : left + cw].astype(np.float64) / 255.0
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)


# ----------------------------------------------------------------------------- loading

# Hugging Face names (after "vision_model.") -> Flax paths; {p} weight/bias -> kernel|scale/bias.
_VISION_RULES = [
    (r"embeddings\.patch_embedding\.weight", "patch_embed/kernel"),
    (r"embeddings\.class_embedding", "class_embed"),
    (r"embeddings\.position_embedding\.weight", "position_embed"),
    (r"pre_layrnorm\.(?P<p>weight|bias)", "pre_norm/{p}"),
    (r"post_layernorm\.(?P<p>weight|bias)", "post_norm/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<m>q|k|v)_proj\.(?P<p>weight|bias)", "layers_{i}/attn/{m}/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>weight|bias)", "layers_{i}/attn/out/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<n>1|2)\.(?P<p>weight|bias)", "layers_{i}/norm{n}/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.mlp\.(?P<m>fc1|fc2)\.(?P<p>weight|bias)", "layers_{i}/mlp/{m}/{p}"),
]


def _vision_target(name: str) -> str | None:
    """The Flax path of a `vision_model.*` tensor, or None if no rule knows it."""
    from microforge_jax.text import match_rules  # noqa: PLC0415 (loads transformers)

    return match_rules(_VISION_RULES, name)


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise CLIPScoreError(f"CLIP folder {folder} does not exist (--clip: a Hugging Face CLIPModel folder)")
    f = folder / "config.json"
    if not f.is_file():
        raise CLIPScoreError(f"CLIP folder {folder} has no config.json (expected a Hugging Face CLIPModel folder)")
    try:
        hf = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIPScoreError(f"CLIP folder {folder}: config.json is not readable JSON ({e})") from None
    if hf.get("model_type") != "clip":
        raise CLIPScoreError(
            f"CLIP folder {folder} holds model_type {hf.get('model_type')!r}, expected a full CLIP model ('clip': "
            "vision and text towers with their projections)"
        )
    if not (folder / "model.safetensors").is_file():
        hint = " (pickle .bin checkpoints are not loaded: convert to safetensors)" if any(folder.glob("*.bin")) else ""
        raise CLIPScoreError(f"CLIP folder {folder} has no model.safetensors{hint}")
    return hf


def load_clip_vision(folder: str | Path) -> tuple[CLIPVisionTransformer, dict[str, Any], np.ndarray, np.ndarray]:
    """The vision tower and both projections of a CLIPModel folder, loaded strictly.

    Returns:
      (module, vision params, visual_projection (D_vision, P), text_projection (D_text, P)), the
      projections as Flax-layout (in, out) float32 matrices.

    Raises:
      CLIPScoreError: a missing folder/file, another architecture, or tensors that do not match.
    """
    folder = Path(folder)
    hf = _read_config(folder)
    try:
        cfg = CLIPVisionConfig.from_hf(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise CLIPScoreError(f"CLIP folder {folder}: config.json is not usable ({e})") from None
    module = CLIPVisionTransformer(cfg)
    dummy = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
    shapes = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))["params"])
    expected = {"/".join(str(k.key) for k in p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}

    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    flat: dict[str, np.ndarray] = {}
    projections: dict[str, np.ndarray] = {}
    unknown, mismatched = [], []
    try:
        with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in ("visual_projection.weight", "text_projection.weight"):
                    projections[name] = np.asarray(f.get_tensor(name), np.float32).T  # (P, D) -> (D, P)
                    continue
                if not name.startswith("vision_model."):
                    continue  # text_model.* (loaded by the text encoder), logit_scale, buffers
                key = name.removeprefix("vision_model.")
                if key.endswith("position_ids"):
                    continue
                target = _vision_target(key)
                if target is None or target not in expected or target in flat:
                    unknown.append(name)
                    continue
                value = np.asarray(f.get_tensor(name), np.float32)
                if target == "patch_embed/kernel":
                    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
                elif target.endswith("/kernel"):
                    value = value.T  # torch Linear (out, in) -> Flax Dense (in, out)
                if tuple(value.shape) != tuple(expected[target].shape):
                    mismatched.append(f"{name} {tuple(value.shape)} -> {target} {tuple(expected[target].shape)}")
                else:
                    flat[target] = value
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIPScoreError(f"CLIP folder {folder}: model.safetensors is not readable ({first})") from None
    problems = []
    if unknown:
        problems.append(f"unexpected tensors {', '.join(sorted(unknown)[:5])}")
    if mismatched:
        problems.append(f"shape mismatches {'; '.join(mismatched[:3])}")
    missing = sorted(set(expected) - set(flat)) + sorted(
        {"visual_projection.weight", "text_projection.weight"} - set(projections)
    )
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}")
    if problems:
        raise CLIPScoreError(f"CLIP folder {folder} does not match a CLIP vision tower: {'; '.join(problems)}")
    visual, text = projections["visual_projection.weight"], projections["text_projection.weight"]
    if visual.shape[0] != cfg.hidden_size or visual.shape[1] != text.shape[1]:
        raise CLIPScoreError(f"CLIP folder {folder}: projections {visual.shape} and {text.shape} do not agree")
    params: dict[str, Any] = {}
    for target, value in flat.items():
        node = params
        *parents, leaf = target.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return module, params, visual, text


class CLIPScorer:
    """A CLIP model (vision + text towers, both projections) ready to embed images and captions.

    Args:
      folder: a Hugging Face CLIPModel folder (see the module docstring).
      batch_size: images per jitted call (the last batch is padded: one compile).
    """

    def __init__(self, folder: str | Path, batch_size: int = 32):
        from microforge_jax.text import TextEncoderError, load_text_encoder  # noqa: PLC0415 (transformers)

        folder = Path(folder)
        self.folder = folder
        self.vision, self.vision_params, self.visual_projection, self.text_projection = load_clip_vision(folder)
        self.preprocess = Preprocess.from_folder(folder)
        if self.preprocess.crop != (self.vision.config.image_size,) * 2:
            raise CLIPScoreError(
                f"CLIP folder {folder}: the processor crops {self.preprocess.crop} but the vision tower takes "
                f"{self.vision.config.image_size}x{self.vision.config.image_size}"
            )
        max_length = int(_read_config(folder).get("text_config", {}).get("max_position_embeddings", 77))
        try:
            self.text = load_text_encoder(
                TextConfig(encoder="clip", path=str(folder), embed_dim=0, max_length=max_length, simple_layers=0)
            )
        except TextEncoderError as e:
            raise CLIPScoreError(str(e)) from None
        self.batch_size = batch_size
        self._image_jit = jax.jit(lambda p, x: self.vision.apply({"params": p}, x)[1])

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """Projected image embeddings (N, P) float64 of uint8 RGB images (N, H, W, 3), not normalised."""
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {x.dtype} {x.shape}")
        out = []
        bs = max(1, min(self.batch_size, len(x)))
        with jax.default_matmul_precision("highest"):
            for i in range(0, len(x), bs):
                chunk = np.stack([self.preprocess(im) for im in x[i : i + bs]])
                n = len(chunk)
                if n < bs:
                    chunk = np.concatenate([chunk, np.zeros((bs - n, *chunk.shape[1:]), np.float32)])
                out.append(np.asarray(self._image_jit(self.vision_params, chunk), np.float64)[:n])
        pooled = np.concatenate(out) if out else np.zeros((0, self.vision.config.hidden_size))
        return pooled @ self.visual_projection.astype(np.float64)

    def text_embeds(self, captions: Sequence[str]) -> np.ndarray:
        """Projected text embeddings (N, P) float64 (captions over the length limit are truncated)."""
        pooled = []
        with jax.default_matmul_precision("highest"):
            for i in range(0, len(captions), self.batch_size):
                pooled.append(np.asarray(self.text.encode(list(captions[i : i + self.batch_size])).pooled_BxD))
        if not pooled:
            return np.zeros((0, self.text_projection.shape[1]))
        return np.concatenate(pooled).astype(np.float64) @ self.text_projection.astype(np.float64)

    def cosines(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        """cos(E_image_i, E_text_i) for each (image, caption) pair, float64 (N,)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return cosines(self.image_embeds(images), self.text_embeds(captions))


def cosines(image_NxP: np.ndarray, text_NxP: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64."""
    a = np.asarray(image_NxP, np.float64)
    b = np.asarray(text_NxP, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def clip_score(cos_N: np.ndarray) -> float:
    """torchmetrics' CLIPScore from the pairs' cosines: max(100 * mean(cos), 0)."""
    return float(max(100.0 * float(np.mean(cos_N)), 0.0))
