"""Sampling from a trained run: the notebook API (`MicroForgePipeline`) and what `sample.py` calls.

    pipe = MicroForgePipeline.from_run("runs/nano")
    images = pipe.generate(["a red circle"], steps=20, cfg=4.0, seed=0, size=(64, 64))  # uint8 (N, H, W, 3)
    fast = pipe.generate(["a red circle"], steps=2)  # a consistency-distilled run: the consistency sampler
    edited = pipe.edit(images[0], "make it blue")
    filled = pipe.inpaint(images[0], hole_mask, "a red circle")
    big = pipe.super_resolve(low_res, "a red circle", size=(64, 64))

Everything is validated before any work or any write: bad input raises a ValueError subclass
with one line (`cli.run` prints it and exits with 2).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from microforge_jax import sampling
from microforge_jax.checkpoint import latest_steps, load_run
from microforge_jax.config import ModelConfig
from microforge_jax.models.denoiser import Text, task_id


class SampleError(ValueError):
    """Bad sampling input (size, steps, guidance, images); the message is one line for the user."""


DEFAULT_STEPS = 20
DEFAULT_CFG = 4.0
DEFAULT_SR_FACTOR = 4  # the shapes dataset's default `sr_factor`
MAX_CONSISTENCY_STEPS = 4  # a consistency-distilled run samples with the consistency rule up to this many steps


def _as_images(images: Any, what: str) -> np.ndarray:
    """One image (H, W, 3) or a batch (N, H, W, 3) -> uint8 (N, H, W, 3)."""
    x = np.asarray(images)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise SampleError(f"{what} must be an RGB image (H, W, 3) or a batch (N, H, W, 3), got shape {x.shape}")
    if x.dtype != np.uint8:
        raise SampleError(f"{what} must be uint8 in [0, 255], got {x.dtype}")
    return x


def check_settings(steps: int, cfg: float, num: int = 1) -> None:
    """Raises SampleError for steps < 1, a negative or non-finite guidance scale, or num < 1."""
    if int(steps) != steps or steps < 1:
        raise SampleError(f"steps must be a positive integer, got {steps}")
    if not math.isfinite(cfg) or cfg < 0:
        raise SampleError(f"the guidance scale (cfg) must be >= 0, got {cfg}")
    if int(num) != num or num < 1:
        raise SampleError(f"num (images per prompt) must be a positive integer, got {num}")


def check_strength(strength: float, task: str, has_source: bool = False) -> None:
    """Raises SampleError unless `strength` is in (0, 1]; below 1 it needs a source image (for the
    text-to-image task, the image it starts from: img2img), and an image to start from needs it below 1."""
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise SampleError(f"the strength must be in (0, 1] (1: start from pure noise), got {strength}")
    if task in sampling.SOURCE_TASKS:
        return
    if strength < 1.0 and not has_source:
        raise SampleError(
            f"a strength below 1 needs a source image (--task edit, inpaint or sr; or --task {task} --source IMG "
            "to start from an image)"
        )
    if has_source and strength >= 1.0:
        raise SampleError(
            f"--task {task} with a source image starts from it noised to --strength: give a strength below 1"
        )


class MicroForgePipeline:
    """A trained model ready to sample: config, parameters, text encoder, compiled samplers.

    Attributes:
      config: the run's full config.
      model_cfg: its `ModelConfig`.
      params: `{"vae": ..., "denoiser": ...}` (EMA parameter trees).
      text_encoder: anything with `encode(prompts) -> TextEmbeddings` (the run's encoder).
      consistency: the parameters are a consistency-distilled model (the run has a "consistency"
        checkpoint): `sampler=None` then means the consistency sampler for steps <= 4.
      last_timing: `{"compile_s", "sample_s", "per_image_s", "images"}` of the latest call.
      last_sampler: the step rule of the latest call (one of `sampling.SAMPLERS`).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        params: dict[str, Any],
        text_encoder: Any,
        *,
        batch_sharding: jax.sharding.NamedSharding | None = None,
        consistency: bool = False,
    ):
        self.config = config
        self.consistency = consistency
        self.model_cfg = ModelConfig.from_config(config)
        missing = [k for k in ("vae", "denoiser") if k not in params]
        if missing:
            raise SampleError(
                f"the run has no trained {' and '.join(missing)} parameters (no checkpoint of that stage)"
            )
        self.params = {"vae": params["vae"], "denoiser": params["denoiser"]}
        self.text_encoder = text_encoder
        self.batch_sharding = batch_sharding
        self.last_timing: dict[str, float] = {}
        self.last_sampler = ""
        self._compiled: dict[tuple, Callable] = {}
        self._uncond: Text | None = None

    @classmethod
    def from_run(cls, workdir: str | os.PathLike) -> MicroForgePipeline:
        """Loads the EMA weights of the latest checkpoints of a run and its text encoder.

        Args:
          workdir: the run directory (what `python train.py --workdir` wrote).

        Returns:
          The pipeline.

        Raises:
          ValueError (RunError, TextEncoderError, SampleError): one line naming what is wrong.
        """
        from microforge_jax.text import load_text_encoder, resolve_text_config  # heavy: transformers

        config, params = load_run(workdir)
        model_cfg = ModelConfig.from_config(config)
        # config.json already holds the resolved text config; resolving again is a no-op but
        # keeps runs written before resolution working.
        encoder = load_text_encoder(resolve_text_config(model_cfg.text))
        if encoder.trainable:  # "simple" trains with the backbone: its weights are in the run
            if "text" not in params:
                raise SampleError(f"run {workdir} uses the 'simple' text encoder but has no trained text parameters")
            encoder.params = params["text"]
        if encoder.embed_dim != model_cfg.backbone.text_dim:
            raise SampleError(
                f"run {workdir}: the text encoder gives width {encoder.embed_dim} but the backbone expects "
                f"{model_cfg.backbone.text_dim} (model.text.embed_dim)"
            )
        return cls(config, params, encoder, consistency="consistency" in latest_steps(workdir))

    # ------------------------------------------------------------------------- the four tasks

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steps: int = DEFAULT_STEPS,
        cfg: float = DEFAULT_CFG,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        num: int = 1,
        shift: float | None = None,
        sampler: str | None = None,
        init_image: Any = None,
        strength: float = 1.0,
    ) -> np.ndarray:
        """Text to image; with `init_image`, image to image (SDEdit, diffusers' img2img).

        Args:
          prompts: the prompts.
          steps: sampler steps (Heun evaluates the denoiser 2 * steps - 1 times, the others once a step).
          cfg: guidance scale (1: no guidance, computed without the unconditional half).
          seed: the noise seed (same seed, same images).
          size: (H, W), multiples of the VAE factor; default the run's `image_size`.
          num: images per prompt.
          shift: time-grid shift; default the run's training `time_shift` for the task's stage.
          sampler: "euler", "heun" (2nd order, two evaluations a step), "dpm++2m" (2nd order
            multistep, one evaluation a step) or "consistency" (denoise to x0, re-noise with fresh
            noise from `seed`; for a consistency-distilled run);
            None: consistency for a consistency-distilled run at steps <= 4, else Euler.
          init_image: uint8 (H, W, 3), or one per prompt: start from this image's latent noised to
            t = `strength` (z = strength * noise + (1 - strength) * latent) and take `steps` steps
            of the time grid scaled by `strength`; the model sees only the text (unlike `edit`).
            The output has its size.
          strength: in (0, 1); only with `init_image`.

        Returns:
          uint8 (len(prompts) * num, H, W, 3), prompt-major.
        """
        init = None if init_image is None else _as_images(init_image, "the initial image")
        if init is not None:
            if size is not None and tuple(size) != init.shape[1:3]:
                raise SampleError(f"the initial image is {init.shape[1]}x{init.shape[2]}: drop size or match it")
            size = init.shape[1:3]
        size = size or (int(self.config.get("image_size", 64)),) * 2
        return self._sample("generate", prompts, init, steps, cfg, seed, size, num, shift, sampler, strength)

    def edit(self, source_image: Any, prompts: str | Sequence[str], **kw: Any) -> np.ndarray:
        """Edits `source_image` (uint8 (H, W, 3) or one per prompt) by an instruction; output at its size.

        Keyword arguments as `generate` (without `size`), plus `strength` (the source tasks' own): in
        (0, 1], how much of the source to re-draw; below 1 sampling starts from the source latent
        noised to t = strength (SDEdit, diffusers' img2img `strength`), 1 from pure noise.
        """
        source = _as_images(source_image, "the source image")
        return self._sample("edit", prompts, source, size=source.shape[1:3], **kw)

    def inpaint(self, source_image: Any, mask: Any, prompts: str | Sequence[str], **kw: Any) -> np.ndarray:
        """Fills the holes (mask nonzero, (H, W) or (H, W, 1), the source's size) of `source_image`.

        Keyword arguments as `generate` (without `size`).
        """
        source = _as_images(source_image, "the source image")
        source = np.stack([sampling.inpaint_source(s, mask) for s in source])
        return self._sample("inpaint", prompts, source, size=source.shape[1:3], **kw)

    def super_resolve(
        self,
        low_res: Any,
        prompts: str | Sequence[str],
        *,
        size: tuple[int, int] | None = None,
        factor: int = DEFAULT_SR_FACTOR,
        **kw: Any,
    ) -> np.ndarray:
        """Upscales `low_res` to `size` (default `factor` times its size), an integer multiple of it.

        Keyword arguments as `generate`.
        """
        low = _as_images(low_res, "the low-resolution image")
        size = tuple(size) if size is not None else (low.shape[1] * factor, low.shape[2] * factor)
        source = np.stack([sampling.sr_source(x, size) for x in low])
        return self._sample("sr", prompts, source, size=size, **kw)

    # ------------------------------------------------------------------------- internals

    def check_size(self, size: tuple[int, int]) -> None:
        """Raises SampleError unless `size` is (H, W) of positive multiples of the VAE factor x patch size."""
        f, p = self.model_cfg.vae.downsample_factor, self.model_cfg.backbone.patch_size
        if len(size) != 2 or min(size) < 1 or size[0] % (f * p) or size[1] % (f * p):
            why = "the VAE's compression factor" + (f" {f} x model.backbone.patch_size {p}" if p > 1 else "")
            raise SampleError(
                f"image size {'x'.join(map(str, size))} is not supported: height and width must be positive "
                f"multiples of {f * p} ({why})"
            )

    def resolve_sampler(self, sampler: str | None, steps: int) -> str:
        """The step rule to use: `sampler`, or by default consistency for a consistency run at steps <= 4."""
        if sampler is None:
            return "consistency" if self.consistency and steps <= MAX_CONSISTENCY_STEPS else "euler"
        if sampler not in sampling.SAMPLERS:
            raise SampleError(f"unknown sampler {sampler!r}; samplers are {', '.join(sampling.SAMPLERS)}")
        return sampler

    def default_shift(self, task: str, sampler: str = "euler") -> float:
        """The time shift the stage trained with (`train.flow` / `train.edit` / `train.consistency`), else 1."""
        stage = "flow" if task == "generate" else "edit"
        if sampler == "consistency" and "consistency" in self.config.get("train", {}):
            stage = "consistency"
        try:
            return float(self.config.train[stage].time_shift)
        except (AttributeError, KeyError, TypeError):
            return 1.0

    def encode(self, prompts: Sequence[str]) -> Text:
        """The text encoder's embeddings as the backbone's `Text`."""
        return Text(*self.text_encoder.encode(list(prompts)))

    def _sample(
        self,
        task: str,
        prompts: str | Sequence[str],
        source: np.ndarray | None,
        steps: int = DEFAULT_STEPS,
        cfg: float = DEFAULT_CFG,
        seed: int = 0,
        size: tuple[int, int] = (64, 64),
        num: int = 1,
        shift: float | None = None,
        sampler: str | None = None,
        strength: float = 1.0,
    ) -> np.ndarray:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise SampleError("give at least one prompt")
        check_settings(steps, cfg, num)
        check_strength(strength, task, source is not None)
        sampler = self.resolve_sampler(sampler, steps)
        step_fn, stochastic = sampling.step_rule(sampler)
        size = (int(size[0]), int(size[1]))
        self.check_size(size)
        if source is not None and len(source) not in (1, len(prompts)):
            raise SampleError(f"give one source image or one per prompt ({len(prompts)}), got {len(source)}")
        prompts = [p for p in prompts for _ in range(num)]
        b, f, c = len(prompts), self.model_cfg.vae.downsample_factor, self.model_cfg.latent_channels
        guided = cfg != 1.0
        shift = self.default_shift(task, sampler) if shift is None else float(shift)
        if not math.isfinite(shift) or shift <= 0:
            raise SampleError(f"the time shift must be > 0, got {shift}")
        text = self.encode(prompts)
        if guided and self._uncond is None:
            self._uncond = self.encode([""])
        noise = sampling.initial_noise(seed, b, (size[0] // f, size[1] // f), c)
        args = [self.params, text, self._uncond if guided else None, noise, jnp.float32(cfg)]
        if source is not None:
            src = np.repeat(source, num, axis=0) if len(source) == len(prompts) // num else source
            args += [
                jnp.asarray(sampling.from_uint8(np.broadcast_to(src, (b, *src.shape[1:])))),
                jnp.int32(task_id(task)),
            ]
        if self.batch_sharding is not None:  # the batch-led inputs; the 1-row empty prompt stays replicated
            for i in [1, 3] + ([5] if source is not None else []):
                args[i] = jax.device_put(args[i], self.batch_sharding)
        if stochastic:  # the per-step noise: from the seed, apart from the initial noise's stream
            args += [None, jnp.int32(0)] if source is None else []
            args.append(jax.random.fold_in(jax.random.key(seed), 1))
        condition = task in sampling.SOURCE_TASKS  # generate with a source: img2img, the source only starts it
        key = (
            source is not None,
            condition,
            steps,
            guided,
            shift,
            b,
            size,
            text.tokens.shape,
            sampler,
            float(strength),
        )
        t0 = time.perf_counter()
        if key not in self._compiled:
            fn = sampling.make_sampler(
                self.model_cfg,
                steps,
                guidance=guided,
                shift=shift,
                with_source=source is not None,
                batch_sharding=self.batch_sharding,
                step_fn=step_fn,
                stochastic=stochastic,
                vae_tile=int(self.config.get("sample_vae_tile", 0)),
                low_memory=bool(self.config.get("sample_low_memory", False)),
                strength=float(strength),
                condition_on_source=condition,
            )
            self._compiled[key] = fn.lower(*args).compile()
        t1 = time.perf_counter()
        images = np.asarray(jax.block_until_ready(self._compiled[key](*args).images_BxHxWx3))
        t2 = time.perf_counter()
        self.last_timing = {"compile_s": t1 - t0, "sample_s": t2 - t1, "per_image_s": (t2 - t1) / b, "images": b}
        self.last_sampler = sampler
        return sampling.to_uint8(images)


# ----------------------------------------------------------------------------- sample.py


def _read_image(path: str, what: str, mode: str = "RGB") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SampleError(
            f"cannot read the {what} {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def parse_size(text: str) -> tuple[int, int]:
    """Parses --size: "HxW", or "N" for a square, into (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise SampleError(f"--size must look like 64x64 or 64, got {text!r}")
    h = int(m.group(1))
    return h, int(m.group(2) or h)


def make_grid(images_NxHxWx3: np.ndarray, cols: int) -> np.ndarray:
    """Tiles images row-major into one uint8 image (empty cells black)."""
    n, h, w, c = images_NxHxWx3.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images_NxHxWx3):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "empty"


def sample_to_folder(
    workdir: str,
    prompts: Sequence[str],
    *,
    prompts_file: str | None = None,
    num: int = 1,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    seed: int = 0,
    size: str | None = None,
    task: str = "generate",
    source: str | None = None,
    mask: str | None = None,
    out: str = "samples",
    shift: float | None = None,
    sampler: str | None = None,
    strength: float = 1.0,
    vae_tile: int | None = None,
    low_memory: bool | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """What `sample.py` does: validate everything, load the run, sample, then write PNGs + a grid.

    Nothing is written (not even the output folder) unless every input is valid and sampling succeeded.
    `vae_tile` / `low_memory` override the run's `sample_vae_tile` / `sample_low_memory`.

    Returns:
      The paths written (one PNG per image, then `grid.png`).
    """
    prompts = list(prompts)
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read the prompts file {prompts_file}: {type(e).__name__}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SampleError("give at least one --prompt or a non-empty --prompts-file")
    check_settings(steps, cfg, num)
    if shift is not None and (not math.isfinite(shift) or shift <= 0):
        raise SampleError(f"--shift must be > 0, got {shift}")
    if vae_tile is not None and vae_tile < 0:
        raise SampleError(f"--vae-tile must be >= 0 latent cells (0: the whole latent), got {vae_tile}")
    if sampler is not None and sampler not in sampling.SAMPLERS:
        raise SampleError(f"unknown sampler {sampler!r}; samplers are {', '.join(sampling.SAMPLERS)}")
    if task not in sampling.TASKS:
        raise SampleError(f"unknown task {task!r}; tasks are {', '.join(sampling.TASKS)}")
    check_strength(strength, task, source is not None)
    if source is None and task in sampling.SOURCE_TASKS:  # generate takes one too: the image it starts from
        raise SampleError(f"--source is required with --task {task}")
    if (mask is not None) != (task == "inpaint"):
        raise SampleError(f"--mask is {'required' if mask is None else 'only used'} with --task inpaint")
    size_hw = parse_size(size) if size is not None else None
    src_img = _read_image(source, "source image") if source is not None else None
    mask_img = _read_image(mask, "mask image", "L") if mask is not None else None
    if mask_img is not None and mask_img.shape != src_img.shape[:2]:
        raise SampleError(
            f"the mask {mask} is {mask_img.shape[0]}x{mask_img.shape[1]} but the source image is "
            f"{src_img.shape[0]}x{src_img.shape[1]}; they must match"
        )
    if src_img is not None and task != "sr" and size_hw is not None and size_hw != src_img.shape[:2]:
        raise SampleError(f"--task {task} keeps the source's size ({src_img.shape[0]}x{src_img.shape[1]}); drop --size")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise SampleError(f"--out {out} exists and is not a folder")

    pipe = MicroForgePipeline.from_run(workdir)
    if vae_tile is not None:
        pipe.config.sample_vae_tile = vae_tile
    if low_memory is not None:
        pipe.config.sample_low_memory = bool(low_memory)
    kw = dict(steps=steps, cfg=cfg, seed=seed, num=num, shift=shift, sampler=sampler, strength=strength)
    if task == "generate":
        images = pipe.generate(prompts, size=size_hw, init_image=src_img, **kw)
    elif task == "edit":
        images = pipe.edit(src_img, prompts, **kw)
    elif task == "inpaint":
        images = pipe.inpaint(src_img, mask_img >= 128, prompts, **kw)
    else:
        images = pipe.super_resolve(src_img, prompts, size=size_hw, **kw)
    t = pipe.last_timing
    log(
        f"{len(images)} images of {images.shape[1]}x{images.shape[2]} ({task}, {steps} {pipe.last_sampler} steps, "
        f"cfg {cfg}): "
        f"{t['per_image_s']:.3f} s per image ({t['sample_s']:.2f} s in all), compile {t['compile_s']:.1f} s apart"
    )

    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(out_dir / f"{i:03d}_{_slug(prompts[i // num])}.png")
        Image.fromarray(image).save(paths[-1])
    cols = num if num > 1 else max(1, math.ceil(math.sqrt(len(images))))
    paths.append(out_dir / "grid.png")
    Image.fromarray(make_grid(images, cols)).save(paths[-1])
    log(f"wrote {len(images)} images and grid.png to {out_dir}")
    return paths
