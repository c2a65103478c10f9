"""Export a training run to a PyTorch folder (+ ONNX graphs and INT8 weights).

    python -m microforge_jax.export --workdir runs/nano --out export/nano [--onnx] [--int8] [--force]

Writes `OUT/config.json` (model config, latent scale/shift, text encoder info), `OUT/model.safetensors`
(torch names under `vae.`, `denoiser.`, `text.`), `OUT/text_encoder/` (the Hugging Face folder of a
pretrained encoder), `OUT/README.md`, and with `--onnx` `OUT/onnx/{denoiser_step,denoiser_edit,vae_decoder}.onnx`
(+ `*.int8.onnx` with `--int8`) and `OUT/onnx/report.json`. EMA weights, via `load_run`: the denoiser
of the run's latest denoising stage, so a run with a "consistency" checkpoint exports its
consistency-distilled denoiser, and `config.json` says so (`consistency.distilled`).
The folder is built beside OUT and moved into place at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microforge_jax.cli import UserError, run

FORMAT = "microforge-torch"

README = """# MicroForge export ({name})

PyTorch weights of a MicroForge-JAX run (`{workdir}`), EMA parameters. Load and sample with torch only
(copy `microforge_jax/export/torch_model.py` into your project; it imports no JAX):

```python
from torch_model import load_exported  # or: from microforge_jax.export.torch_model import load_exported

model = load_exported("{out}")
images = model.generate(["a red circle"], steps=20, cfg=4.0, seed=0)  # uint8 (N, {size}, {size}, 3)
```

Denoiser weights: stage "{stage}" of the run{distilled}. Lower level:
`model.sample(text, uncond, noise, scale, steps, sampler="euler" | "heun" | "dpm++2m" | "consistency", generator=None, step_noise_SxBxCxhxw=None)`
with `text = model.text_encoder.encode(prompts)`;
`model.vae.encode / decode` (NCHW images in [-1, 1]); `model.denoiser(z, t, tokens, mask, pooled, prev_plan,
has_prev, task, source) -> (velocity, plan)`. Latents are NCHW in the backbone's normalised space
`(z - {shift}) * {scale}`. Text encoder: {text}.
The noise of `generate(seed=...)` comes from torch's generator, not JAX's: pass `noise=`
(and `step_noise=` for the consistency sampler) to reproduce a JAX sample.
{onnx}"""

ONNX_README = """
ONNX (static shapes, opset 18; see `onnx/report.json`): `onnx/denoiser_step.onnx` takes
(z, t, text, text_mask, pooled, prev_plan, has_prev) at batch {batch} (one guided prompt: [cond ; uncond])
and returns (velocity, plan); run the sampler/CFG loop around it, `has_prev` False at the first step.
`onnx/denoiser_edit.onnx` adds (task, source) for edit / inpaint / SR: `task` int64 (1 edit, 2 inpaint,
3 sr) and `source` the source image's normalised VAE latent (the encoder's mean, `(mean - {shift}) * {scale}`),
shaped like z. `onnx/vae_decoder.onnx` maps a VAE-space latent to an image. `*.int8.onnx`: weight-only INT8
(dynamic quantization).
"""

DISTILLED_README = """, consistency-distilled: `generate(..., steps<={max_steps})` uses the consistency sampler
(x0 = z - t v, re-noised with fresh noise each step; time shift {time_shift}) unless `sampler="euler"` is given"""


def _time_shift(config: Any, stage: str, default: float = 1.0) -> float:
    """`train.<stage>.time_shift` of a run's config, or `default` when the config has none."""
    try:
        return float(config.train[stage].time_shift)
    except (AttributeError, KeyError, TypeError):
        return default


def export_config(config: Any, stages: Sequence[str] = ()) -> dict[str, Any]:
    """The exported `config.json`: the model config, latent normalisation, text encoder, sampling defaults.

    Args:
      config: the run's config.
      stages: the stages the run has checkpoints of (`latest_steps(workdir)`); the latest denoising
        one is whose denoiser `load_run` returns, and a "consistency" one makes the weights
        consistency-distilled (`generate` then samples few steps with the consistency rule).
    """
    from microforge_jax.checkpoint import DENOISER_STAGES
    from microforge_jax.config import ModelConfig
    from microforge_jax.pipeline import MAX_CONSISTENCY_STEPS
    from microforge_jax.text import resolve_text_config

    model_cfg = ModelConfig.from_config(config)
    text_cfg = resolve_text_config(model_cfg.text)
    model_cfg = dataclasses.replace(model_cfg, text=text_cfg)
    model = json.loads(json.dumps(dataclasses.asdict(model_cfg)))  # tuples -> lists, as any reader sees them
    shift = _time_shift(config, "flow")
    denoiser_stage = next((s for s in reversed(DENOISER_STAGES) if s in stages), None)
    simple = text_cfg.encoder == "simple"
    return {
        "format": FORMAT,
        "format_version": 1,
        "name": str(config.get("name", "")),
        "model": model,
        "image_size": int(config.get("image_size", 64)),
        "time_shift": shift,
        "stages": list(stages),
        "denoiser_stage": denoiser_stage,
        "consistency": {
            "distilled": denoiser_stage == "consistency",
            "time_shift": _time_shift(config, "consistency", shift),
            "max_steps": MAX_CONSISTENCY_STEPS,
        },
        "latent": {"scaling_factor": model_cfg.vae.scaling_factor, "shift_factor": model_cfg.vae.shift_factor},
        "text_encoder": {
            "encoder": text_cfg.encoder,
            "folder": None if simple else "text_encoder",
            "weights": "model.safetensors (text.)" if simple else "text_encoder/ (transformers AutoModel)",
            "tokenizer": "bytes (BOS 256, EOS 257, PAD 258)" if simple else "text_encoder/ (AutoTokenizer)",
            "max_length": text_cfg.max_length,
            "embed_dim": text_cfg.embed_dim,
            "pooling": "eos" if text_cfg.encoder == "clip" else "mean",
        },
        "layout": {"image": "NCHW float in [-1, 1]", "latent": "NCHW, normalised: (z - shift) * scale"},
    }


def export_run(
    workdir: str | Path, out: str | Path, *, onnx: bool = False, int8: bool = False, force: bool = False, batch: int = 2
) -> dict[str, Any]:
    """Exports a run; returns a summary (files, ONNX report). Raises UserError / ValueError on bad input."""
    workdir, out = Path(workdir), Path(out)
    if not workdir.is_dir():
        raise UserError(f"run directory {workdir} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"output folder {out} exists and is not empty (use --force to replace it)")
    onnx = onnx or int8
    if onnx:
        try:
            import onnx as _onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError("--onnx needs the packages onnx, onnxruntime and onnxscript (pip install them)") from None
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")

    import torch
    from safetensors.torch import save_file

    from microforge_jax.checkpoint import latest_steps, load_run
    from microforge_jax.export.convert import jax_to_torch
    from microforge_jax.export.torch_model import MicroForgeTorch
    from microforge_jax.text import resolve_text_folder

    config, params = load_run(workdir)
    exported = export_config(config, tuple(latest_steps(workdir)))
    text, consistency = exported["text_encoder"], exported["consistency"]
    needed = ["vae", "denoiser"] + (["text"] if text["encoder"] == "simple" else [])
    missing = [k for k in needed if k not in params]
    if missing:
        raise UserError(
            f"run {workdir} has no trained {' and '.join(missing)} parameters (no checkpoint of that stage)"
        )
    model = MicroForgeTorch(exported).eval()
    state = jax_to_torch({k: params[k] for k in needed}, model)
    model.load_state_dict(state, strict=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    summary: dict[str, Any] = {
        "out": str(out),
        "parameters": sum(v.numel() for v in state.values()),
        "denoiser_stage": exported["denoiser_stage"],
        "consistency_distilled": consistency["distilled"],
    }
    try:
        (tmp / "config.json").write_text(json.dumps(exported, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": FORMAT})
        if text["folder"]:
            src = resolve_text_folder(text["encoder"], config.model.text.path)
            shutil.copytree(src, tmp / text["folder"], ignore=shutil.ignore_patterns(".git*"))
        onnx_text = ""
        if onnx:
            from microforge_jax.export.onnx_export import export_onnx, quantize_int8

            (tmp / "onnx").mkdir()
            torch.manual_seed(0)
            report = export_onnx(model, tmp / "onnx", batch=batch)
            if int8:
                report = quantize_int8(model, tmp / "onnx", report)
            (tmp / "onnx" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            summary["onnx"] = report
            latent = exported["latent"]
            onnx_text = ONNX_README.format(batch=batch, shift=latent["shift_factor"], scale=latent["scaling_factor"])
        (tmp / "README.md").write_text(
            README.format(
                name=exported["name"] or workdir.name,
                workdir=workdir,
                out=out,
                size=exported["image_size"],
                shift=exported["latent"]["shift_factor"],
                scale=exported["latent"]["scaling_factor"],
                text=f"{text['encoder']} ({text['weights']}; tokenizer: {text['tokenizer']}), max_length {text['max_length']}",
                onnx=onnx_text,
                stage=exported["denoiser_stage"],
                distilled=DISTILLED_README.format(**exported["consistency"]) if consistency["distilled"] else "",
            )
        )
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    distilled = ", consistency-distilled" if summary["consistency_distilled"] else ""
    print(
        f"exported {summary['parameters']:,} parameters (denoiser of stage {summary['denoiser_stage']}{distilled}) "
        f"to {summary['out']}"
    )
    for rep in summary.get("onnx", {}).values():
        errs = ", ".join(f"{k} {v:.1e}" for k, v in rep["relerr"].items())
        print(f"  onnx/{rep['file']}: {rep['bytes'] / 1e6:.2f} MB ({rep['exporter']}), onnxruntime vs torch: {errs}")
        if "int8" in rep:
            q = rep["int8"]
            errs = ", ".join(f"{k} {v:.1e}" for k, v in q["relerr_vs_fp32_onnx"].items())
            print(
                f"  onnx/{q['file']}: {q['bytes'] / 1e6:.2f} MB ({q['size_ratio']:.0%} of fp32), vs fp32 ONNX: {errs}"
            )


def export(argv: list[str]) -> int:
    """Parses the flags, then exports (raises on bad input; `main` makes that one line)."""
    parser = argparse.ArgumentParser(prog="python -m microforge_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the run directory (train.py --workdir)")
    parser.add_argument("--out", required=True, help="the export folder (must be empty or absent, unless --force)")
    parser.add_argument(
        "--onnx", action="store_true", help="also write ONNX graphs (static shapes), checked with onnxruntime"
    )
    parser.add_argument("--int8", action="store_true", help="also write weight INT8 ONNX graphs (implies --onnx)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument(
        "--batch", type=int, default=2, help="static batch of the ONNX denoiser step (2: one guided prompt)"
    )
    args = parser.parse_args(argv)
    summary = export_run(args.workdir, args.out, onnx=args.onnx, int8=args.int8, force=args.force, batch=args.batch)
    _print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m microforge_jax.export` and `microforge-export`: a user error is one line, exit code 2."""
    return run(export, argv)


if __name__ == "__main__":
    sys.exit(main())
