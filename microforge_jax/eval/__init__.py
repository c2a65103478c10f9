"""Evaluation: ShapesEval, the analytic scorer for the built-in shapes world (numpy only, no JAX).

`python -m microforge_jax.eval --num 200 --resolution 64 --split heldout --out eval.json`
"""

from microforge_jax.eval.shapes_eval import (
    PRESERVE_PSNR_DB,
    detect_objects,
    evaluate,
    evaluate_edit,
    evaluate_generator,
    evaluate_image,
    format_table,
)

__all__ = [
    "PRESERVE_PSNR_DB",
    "detect_objects",
    "evaluate",
    "evaluate_edit",
    "evaluate_generator",
    "evaluate_image",
    "format_table",
]
