"""ONNX graphs of the PyTorch mirror (static shapes), checked with onnxruntime, and weight INT8.

Three graphs, the pieces a phone runtime loops over:

- `denoiser_step.onnx`: (z, t, text, text_mask, pooled, prev_plan, has_prev) -> (velocity, plan),
  the planner and the backbone at a static batch N (2 = one prompt with guidance) and latent size;
  the sampler loop, CFG mix and Euler / consistency step stay in the host language
  (`MicroForgeTorch.sample`).
- `denoiser_edit.onnx`: the same plus (task, source) -> (velocity, plan), for edit / inpaint / SR:
  `task` (N,) int64 (1 / 2 / 3), `source` (N, C, h, w) the source image's normalised VAE latent;
  the backbone runs on the [target | source] grid (h, 2w), so it is a graph of its own.
- `vae_decoder.onnx`: latent (B, C, h, w) in VAE space -> image (B, 3, H, W).

Needs `onnx`, `onnxruntime` and (for the default dynamo exporter) `onnxscript`; the TorchScript
exporter (`dynamo=False`) is the fallback.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microforge_jax.export.torch_model import DenoiserStep, MicroForgeTorch

OPSET = 18
STEP_INPUTS = ["z", "t", "text", "text_mask", "pooled", "prev_plan", "has_prev"]
EDIT_INPUTS = [*STEP_INPUTS, "task", "source"]


def example_inputs(model: MicroForgeTorch, batch: int, latent_hw: tuple[int, int], seed: int = 0) -> dict[str, Any]:
    """Random inputs of the right shapes for the graphs (rows alternate has_prev, text padding; tasks cycle
    edit, inpaint, sr)."""
    cfg = model.config["model"]
    c, m, e = cfg["latent_channels"], cfg["text"]["max_length"], cfg["backbone"]["text_dim"]
    k, d = cfg["planner"]["num_tokens"], cfg["backbone"]["dim"]
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, m, dtype=torch.bool)
    mask[:, max(2, m // 2) :] = False  # padded text, as real prompts have
    return {
        "z": torch.randn(batch, c, *latent_hw, generator=g),
        "t": torch.rand(batch, generator=g),
        "text": torch.randn(batch, m, e, generator=g) * mask[..., None],
        "text_mask": mask,
        "pooled": torch.randn(batch, e, generator=g),
        "prev_plan": torch.randn(batch, k, d, generator=g),
        "has_prev": torch.arange(batch) % 2 == 0,
        "task": 1 + torch.arange(batch) % 3,
        "source": torch.randn(batch, c, *latent_hw, generator=g),
    }


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> str:
    """torch.onnx.export with the dynamo exporter, falling back to TorchScript; returns which was used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                verbose=False,
                input_names=input_names,
                output_names=output_names,
                opset_version=OPSET,
            )
            program.save(str(path))
        return "dynamo"
    except Exception as e:  # noqa: BLE001 (any exporter failure: try the other exporter)
        warnings.warn(
            f"dynamo ONNX export failed ({type(e).__name__}: {str(e)[:200]}); using dynamo=False", stacklevel=2
        )
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
        )
        return "torchscript"


def _relerr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def run_onnx(path: str | Path, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Runs a graph in onnxruntime (CPU) on torch tensors or arrays."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: np.asarray(v) for k, v in feeds.items() if k in names})


def export_onnx(
    model: MicroForgeTorch, out: str | Path, batch: int = 2, latent_hw: tuple[int, int] | None = None
) -> dict:
    """Writes `denoiser_step.onnx`, `denoiser_edit.onnx` and `vae_decoder.onnx` into `out`, checked against PyTorch.

    Args:
      model: the loaded mirror (eval mode).
      out: the folder.
      batch: the denoiser batch N (2: one prompt, guided); the decoder gets N // 2 (at least 1).
      latent_hw: the latent grid (default: the config's image size / VAE factor).

    Returns:
      {"denoiser_step": {...}, "denoiser_edit": {...}, "vae_decoder": {...}}: per graph its file,
      exporter, size in bytes, input shapes, and the normwise relative error of onnxruntime vs PyTorch
      per output.
    """
    out = Path(out)
    cfg = model.config["model"]
    f = cfg["vae"]["downsample_factor"]
    if latent_hw is None:
        size = int(model.config.get("image_size", 64))
        latent_hw = (size // f, size // f)
    x = example_inputs(model, batch, latent_hw)
    report: dict[str, Any] = {}
    step = DenoiserStep(model.denoiser).eval()
    for key, names in (("denoiser_step", STEP_INPUTS), ("denoiser_edit", EDIT_INPUTS)):
        with torch.no_grad():
            expected = step(*(x[n] for n in names))
        path = out / f"{key}.onnx"
        exporter = _export(step, tuple(x[n] for n in names), path, names, ["velocity", "plan"])
        got = run_onnx(path, x)
        report[key] = {
            "file": path.name,
            "exporter": exporter,
            "bytes": path.stat().st_size,
            "inputs": {n: list(x[n].shape) for n in names},
            "relerr": {o: _relerr(g, e.numpy()) for o, g, e in zip(["velocity", "plan"], got, expected)},
        }
    dec_batch = max(1, batch // 2)
    z = x["z"][:dec_batch]
    decoder = model.vae.decoder.eval()
    with torch.no_grad():
        image = decoder(z)
    path = out / "vae_decoder.onnx"
    exporter = _export(decoder, (z,), path, ["latent"], ["image"])
    report["vae_decoder"] = {
        "file": path.name,
        "exporter": exporter,
        "bytes": path.stat().st_size,
        "inputs": {"latent": list(z.shape)},
        "relerr": {"image": _relerr(run_onnx(path, {"latent": z})[0], image.numpy())},
    }
    return report


def quantize_int8(model: MicroForgeTorch, out: str | Path, report: dict) -> dict:
    """Weight INT8 copies (`*.int8.onnx`) of the exported graphs; adds sizes and the error vs fp32 ONNX.

    onnxruntime's dynamic quantization: weights stored as INT8 per tensor, activations quantized
    on the fly; MatMul/Gemm only in the denoiser (attention and projections), plus Conv in the decoder.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    shapes = report["denoiser_step"]["inputs"]
    feeds = example_inputs(model, shapes["z"][0], tuple(shapes["z"][2:]), seed=1)  # unseen inputs
    latent = {"latent": feeds["z"][: report["vae_decoder"]["inputs"]["latent"][0]]}
    graphs = {
        "denoiser_step": (["MatMul", "Gemm"], feeds),
        "denoiser_edit": (["MatMul", "Gemm"], feeds),
        "vae_decoder": (["MatMul", "Gemm", "Conv"], latent),
    }
    for key, (ops, graph_feeds) in graphs.items():
        src = out / report[key]["file"]
        dst = out / src.name.replace(".onnx", ".int8.onnx")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        ref, q = run_onnx(src, graph_feeds), run_onnx(dst, graph_feeds)
        report[key]["int8"] = {
            "file": dst.name,
            "bytes": dst.stat().st_size,
            "size_ratio": dst.stat().st_size / src.stat().st_size,
            "relerr_vs_fp32_onnx": {f"out{i}": _relerr(a, b) for i, (a, b) in enumerate(zip(q, ref))},
        }
    return report
