"""ShapesEval: an analytic (no learned model) check that an image shows the shapes scene it was asked for.

How an image is read (uint8 HxWx3, any resolution):
  1. Every pixel takes its nearest colour among the 10 object colours and the 5 background colours
     (RGB distance); background-coloured pixels are dropped.
  2. Per 3x3 grid cell, the most frequent object colour is the cell's candidate; the cell holds an
     object when that colour covers at least 35% of the smallest shape's area at "small" size.
  3. Shape and size: the candidate's pixel mask is compared (IoU) with each shape at each size,
     rendered by the dataset's own renderer and aligned on the mask's centroid; the best wins.
  4. Asked objects are matched to detected ones by the assignment that agrees on the most
     attributes (colour, shape, size, position), so a wrong attribute is reported as that attribute.

Scores per asked object: colour, shape, size, position correct (an asked object with no detected
partner is wrong on all four); per image: count correct (detected == asked) and all correct (count
and every attribute of every object). `evaluate` aggregates them; for edits, `evaluate_edit` also
checks the rest of the image is unchanged: PSNR outside the edit region against the source must be
at least PRESERVE_PSNR_DB = 25 dB.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from microforge_jax.data.shapes_render import (
    BACKGROUND_COLOURS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Scene,
    cell_bounds,
    cell_size,
    shape_coverage,
    shape_unit_stats,
)

PRESERVE_PSNR_DB = 25.0
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
_OCCUPIED_FRACTION = 0.35
_COLOUR_NAMES = tuple(COLOURS)
_PALETTE_Kx3 = np.array(list(COLOURS.values()) + list(BACKGROUND_COLOURS.values()), np.float32)


def classify_pixels(image_hxwx3: np.ndarray) -> np.ndarray:
    """Nearest palette colour per pixel: int HxW, an index into COLOURS, or -1 for background."""
    x = np.asarray(image_hxwx3, np.float32)
    # ||x - p||^2 = ||x||^2 - 2 x.p + ||p||^2; the ||x||^2 term does not change the argmin.
    d_hxwxk = -2.0 * (x @ _PALETTE_Kx3.T) + np.sum(_PALETTE_Kx3**2, axis=1)
    k = np.argmin(d_hxwxk, axis=-1)
    return np.where(k < len(COLOURS), k, -1)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.shape[0] < 12:
        raise ValueError(f"expected a square HxWx3 image of side >= 12, got shape {image.shape}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0 + 1e-6:
            image = image * 255.0  # accept [0, 1] floats
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def _soft_mask(patch_hxwx3: np.ndarray, lab_hxw: np.ndarray, k: int) -> np.ndarray:
    """Estimated coverage of object colour k in a cell: each pixel as a blend of k and the cell's background.

    Anti-aliased rims blend the object into the background; reading them as fractions (rather than
    nearest-colour yes/no) keeps shapes of ~10 px apart (small square vs hexagon at 64 px).
    """
    bg = lab_hxw < 0
    b = patch_hxwx3[bg].mean(0) if bg.any() else _PALETTE_Kx3[len(COLOURS) :].mean(0)
    o = _PALETTE_Kx3[k]
    a = np.clip((patch_hxwx3 - b) @ (o - b) / max(float(np.dot(o - b, o - b)), 1.0), 0.0, 1.0)
    # Only the colour-k blob and its 1-pixel rim count, so stray pixels elsewhere in the cell do not.
    m = lab_hxw == k
    near = m.copy()
    near[1:] |= m[:-1]
    near[:-1] |= m[1:]
    near[:, 1:] |= m[:, :-1]
    near[:, :-1] |= m[:, 1:]
    return np.where(near, a, 0.0).astype(np.float32)


def detect_objects(image_hxwx3: np.ndarray) -> list[dict[str, Any]]:
    """Finds the objects in an image, at most one per grid cell.

    Args:
      image_hxwx3: uint8 square image (floats in [0, 1] are accepted too).

    Returns:
      One dict per occupied cell: colour, shape, size, position (names), cell (int), iou (of the best
      template), area (pixels).
    """
    image = _check_image(image_hxwx3)
    n = image.shape[0]
    labels = classify_pixels(image)
    c = cell_size(n)
    min_area = min(shape_unit_stats(s)[0] for s in SHAPES) * (SIZE_RADIUS["small"] * c) ** 2
    found = []
    for cell in range(9):
        y0, y1, x0, x1 = cell_bounds(cell, n)
        lab = labels[y0:y1, x0:x1]
        counts = np.bincount(lab[lab >= 0].ravel(), minlength=len(COLOURS))
        k = int(np.argmax(counts))
        if counts[k] < _OCCUPIED_FRACTION * min_area:
            continue
        a = _soft_mask(image[y0:y1, x0:x1].astype(np.float32), lab, k)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        my, mx = (a * yy).sum() / a.sum() + 0.5, (a * xx).sum() / a.sum() + 0.5  # centroid, pixel coords
        best = (-1.0, SHAPES[0], SIZES[0])
        for shape, size in itertools.product(SHAPES, SIZES):
            r = SIZE_RADIUS[size] * c
            _, ox, oy = shape_unit_stats(shape)
            cov, (ty0, ty1, tx0, tx1) = shape_coverage(shape, mx - ox * r, my - oy * r, r, n, n)
            tmpl = np.zeros((n, n), np.float32)
            tmpl[ty0:ty1, tx0:tx1] = cov
            tmpl = tmpl[y0:y1, x0:x1]
            iou = np.minimum(tmpl, a).sum() / max(np.maximum(tmpl, a).sum(), 1e-6)
            if iou > best[0]:
                best = (float(iou), shape, size)
        found.append(
            {
                "colour": _COLOUR_NAMES[k],
                "shape": best[1],
                "size": best[2],
                "position": POSITIONS[cell],
                "cell": cell,
                "iou": best[0],
                "area": int(counts[k]),
            }
        )
    return found


def _agreement(asked: Any, det: dict[str, Any]) -> dict[str, bool]:
    return {
        "colour": det["colour"] == asked.colour,
        "shape": det["shape"] == asked.shape,
        "size": det["size"] == asked.size,
        "position": det["cell"] == asked.cell,
    }


def evaluate_image(image_hxwx3: np.ndarray, scene: Scene) -> dict[str, Any]:
    """Scores one image against the scene it was asked to show.

    Args:
      image_hxwx3: uint8 square image at any resolution.
      scene: the asked-for scene.

    Returns:
      {"objects": [per asked object: colour/shape/size/position/found bools], "count": bool,
       "all": bool, "num_asked": int, "num_detected": int, "detected": [detect_objects dicts]}.
    """
    det = detect_objects(image_hxwx3)
    asked = scene.objects
    # Best assignment of asked objects to distinct detections (None = unmatched); at most 10P3 = 720.
    slots = list(range(len(det))) + [None] * len(asked)
    best_score, best_assign = -1.0, tuple([None] * len(asked))
    for assign in set(itertools.permutations(slots, len(asked))):
        score = 0.0
        for a, j in zip(asked, assign, strict=True):
            if j is not None:
                agree = _agreement(a, det[j])
                # position breaks ties: an object in the asked cell is the natural partner
                score += sum(agree.values()) + 0.01 * agree["position"] + 0.001
        if score > best_score:
            best_score, best_assign = score, assign
    per_obj = []
    for a, j in zip(asked, best_assign, strict=True):
        if j is None:
            per_obj.append({**dict.fromkeys(ATTRIBUTES, False), "found": False})
        else:
            per_obj.append({**_agreement(a, det[j]), "found": True})
    count_ok = len(det) == len(asked)
    all_ok = count_ok and all(all(o[k] for k in ATTRIBUTES) for o in per_obj)
    return {
        "objects": per_obj,
        "count": count_ok,
        "all": all_ok,
        "num_asked": len(asked),
        "num_detected": len(det),
        "detected": det,
    }


def _mean(xs: list[bool]) -> float | None:
    return float(np.mean(xs)) if xs else None


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates `evaluate_image` results into a report (accuracies in [0, 1], None when undefined)."""
    objs = [o for r in results for o in r["objects"]]
    single = [r for r in results if r["num_asked"] == 1]
    multi = [r for r in results if r["num_asked"] > 1]
    report: dict[str, Any] = {"num_images": len(results), "num_objects": len(objs)}
    for k in ATTRIBUTES:
        report[k] = _mean([o[k] for o in objs])
    report["count"] = _mean([r["count"] for r in results])
    report["all"] = _mean([r["all"] for r in results])
    report["single_colour_shape"] = _mean([r["objects"][0]["colour"] and r["objects"][0]["shape"] for r in single])
    report["multi_all"] = _mean([r["all"] for r in multi])
    return report


def evaluate(images: Sequence[np.ndarray] | np.ndarray, scenes: Sequence[Scene]) -> dict[str, Any]:
    """Scores images against their scenes.

    Args:
      images: N uint8 HxWx3 images (a list or an NxHxWx3 array).
      scenes: the N asked-for scenes.

    Returns:
      The `aggregate` report, plus "per_image": the `evaluate_image` results without detections.
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    results = [evaluate_image(im, s) for im, s in zip(images, scenes, strict=True)]
    report = aggregate(results)
    report["per_image"] = [{k: v for k, v in r.items() if k != "detected"} for r in results]
    return report


def evaluate_generator(
    generate: Callable[[list[str]], Sequence[np.ndarray] | np.ndarray],
    scenes: Sequence[Scene],
    captions: Sequence[str],
    batch_size: int = 32,
) -> dict[str, Any]:
    """Scores any text-to-image function: `generate(captions) -> images` in batches.

    Args:
      generate: maps a list of captions to as many uint8 HxWx3 images.
      scenes: the scenes the captions describe.
      captions: one prompt per scene (e.g. `caption_for(scene, 0)`).
      batch_size: captions per call.

    Returns:
      The `evaluate` report.
    """
    images: list[np.ndarray] = []
    for i in range(0, len(captions), batch_size):
        batch = list(captions[i : i + batch_size])
        out = generate(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate returned {len(out)} images for {len(batch)} captions")
        images.extend(np.asarray(im) for im in out)
    return evaluate(images, scenes)


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between uint8 images over the pixels where `mask` (HxW bool) is True; capped at 100."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    mse = float(np.mean(d**2)) if d.size else 0.0
    return 100.0 if mse <= 1e-10 else min(100.0, 10.0 * np.log10(255.0**2 / mse))


def evaluate_edit(
    source_hxwx3: np.ndarray, edited_hxwx3: np.ndarray, target_scene: Scene, region_mask: np.ndarray
) -> dict[str, Any]:
    """Scores an edit: the edited image against the target scene, and the rest of it against the source.

    Args:
      source_hxwx3: the image before the edit (uint8).
      edited_hxwx3: the edited image (uint8, same size).
      target_scene: the scene the edit should produce.
      region_mask: HxW or HxWx1, nonzero where the edit may change pixels.

    Returns:
      `evaluate_image` fields plus "psnr_outside" (dB, capped at 100) and "preserved"
      (psnr_outside >= PRESERVE_PSNR_DB); "all" then also requires "preserved".
    """
    src, edt = _check_image(source_hxwx3), _check_image(edited_hxwx3)
    if src.shape != edt.shape:
        raise ValueError(f"source {src.shape} and edited {edt.shape} differ in shape")
    region = np.asarray(region_mask).reshape(src.shape[:2]) > 0
    res = evaluate_image(edt, target_scene)
    res["psnr_outside"] = psnr(src, edt, ~region)
    res["preserved"] = res["psnr_outside"] >= PRESERVE_PSNR_DB
    res["all"] = res["all"] and res["preserved"]
    return res


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report's accuracies."""
    rows = [
        ("colour", "per object"),
        ("shape", "per object"),
        ("size", "per object"),
        ("position", "per object"),
        ("count", "per image"),
        ("single_colour_shape", "1-object images"),
        ("multi_all", "2-3-object images"),
        ("all", "per image"),
    ]
    lines = [f"ShapesEval: {report['num_images']} images, {report['num_objects']} objects", ""]
    lines.append(f"{'metric':<22}{'over':<20}{'accuracy':>9}")
    lines.append("-" * 51)
    for key, over in rows:
        v = report.get(key)
        lines.append(f"{key:<22}{over:<20}{('%.1f%%' % (100 * v)) if v is not None else 'n/a':>9}")
    return "\n".join(lines)
