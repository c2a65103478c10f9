"""The shapes world's vocabulary, scene description and anti-aliased renderer (numpy only).

A scene is 1-3 flat-coloured shapes on a 3x3 grid of cells (at most one object per cell, so objects
never overlap) over a plain, split or gradient background in muted colours that are far from every
object colour, which keeps colour segmentation analytic (see `microforge_jax.eval.shapes_eval`).

Geometry, in units of one grid cell (side `image_size / 3`): an object's centre is its cell's
centre plus a jitter `(dx, dy)` in [-0.04, 0.04]; its extent (`radius`, half the side of its
bounding box) is 0.42 cell for "large" and 0.25 for "small". Shapes are upright (no rotation), so
"diamond" and "square" stay distinct. Every shape is a signed-distance function; the pixel
coverage `clip(0.5 - sdf_px, 0, 1)` gives analytic anti-aliasing at any resolution.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")

# Saturated object colours, pairwise >= 80 apart in RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 50, 180),
    "cyan": (40, 210, 220),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Muted background colours, >= 80 apart from every object colour (blends of two of them stay muted).
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "slate": (96, 106, 122),
    "sand": (190, 178, 146),
    "sage": (132, 150, 122),
    "taupe": (150, 128, 122),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "split", "gradient")
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical")

SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: dict[str, float] = {"small": 0.25, "large": 0.42}  # half-extent, in cells
MAX_JITTER = 0.04  # 0.42 + 0.04 < 0.5: an object (with its anti-aliased rim) stays inside its cell

# Cell index = 3 * row + col, row 0 at the top. Names as they appear in captions.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One shape: `cell` indexes POSITIONS; `dx`, `dy` are the jitter of its centre in cells."""

    shape: str
    colour: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class Background:
    """`kind` in BACKGROUND_KINDS; `colours` two names from BACKGROUND_COLOURS (equal for plain)."""

    kind: str = "plain"
    colours: tuple[str, str] = ("gray", "gray")
    orientation: str = "horizontal"  # split/gradient axis: "horizontal" = left-to-right


@dataclasses.dataclass(frozen=True)
class Scene:
    """A full scene description: enough to render it exactly and to score an image against it."""

    objects: tuple[Obj, ...]
    background: Background = Background()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (round-trips through `Scene.from_dict`)."""
        return {
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "background": {
                "kind": self.background.kind,
                "colours": list(self.background.colours),
                "orientation": self.background.orientation,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Builds a scene from `to_dict` output, validating every name. Raises ValueError."""
        try:
            objs = tuple(
                Obj(o["shape"], o["colour"], o["size"], int(o["cell"]), float(o.get("dx", 0)), float(o.get("dy", 0)))
                for o in d["objects"]
            )
            b = d.get("background", {})
            bg = Background(
                b.get("kind", "plain"), tuple(b.get("colours", ("gray", "gray"))), b.get("orientation", "horizontal")
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed scene dict: {e!r}") from None
        scene = cls(objs, bg)
        validate_scene(scene)
        return scene


def validate_scene(scene: Scene) -> None:
    """Raises ValueError naming the first unknown name, bad cell or shared cell."""
    cells = [o.cell for o in scene.objects]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {cells}")
    for o in scene.objects:
        if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES or not 0 <= o.cell < 9:
            raise ValueError(f"bad object {o}")
        if max(abs(o.dx), abs(o.dy)) > MAX_JITTER + 1e-9:
            raise ValueError(f"jitter above {MAX_JITTER}: {o}")
    b = scene.background
    if b.kind not in BACKGROUND_KINDS or b.orientation not in ORIENTATIONS or len(b.colours) != 2:
        raise ValueError(f"bad background {b}")
    if any(c not in BACKGROUND_COLOURS for c in b.colours):
        raise ValueError(f"bad background colour {b.colours}")


# ----------------------------------------------------------------------------------------------------
# Shape geometry: polygons in unit coordinates (extent <= 1 in x and y, image axes: y points down).


def _regular(n: int, radius: float, start_deg: float) -> np.ndarray:
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], -1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0, -90.0), _regular(5, 0.45, -54.0)
    pts = np.stack([outer, inner], 1).reshape(10, 2)
    pts[:, 1] += (1.0 - np.cos(np.pi / 5)) / 2  # centre the bounding box vertically
    return pts


def _cross(w: float = 0.34) -> np.ndarray:
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        float,
    )


_TRI_H = np.sqrt(3.0)  # equilateral with side 2: apex at -1, base at sqrt(3) - 1, then centred vertically
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
    "triangle": np.array([(0.0, -_TRI_H / 2), (1.0, _TRI_H / 2), (-1.0, _TRI_H / 2)]),
    "diamond": np.array([(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]),
    "hexagon": _regular(6, 1.0, -90.0),
    "star": _star(),
    "cross": _cross(),
    # The heart is two lobes (circles) on a convex pentagon tangent to them.
    "heart": np.array([(0.0, 0.9), (-0.83, -0.076), (-0.45, -0.4), (0.45, -0.4), (0.83, -0.076)]),
}
_HEART_LOBES = ((-0.45, -0.4, 0.5), (0.45, -0.4, 0.5))  # (cx, cy, r)


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points (P,) to a simple polygon, vectorised over edges.

    Inigo Quilez's sdPolygon: nearest distance to any edge, sign flipped by an even-odd crossing count.
    """
    vi = verts
    vj = np.roll(verts, 1, axis=0)
    ex, ey = (vj - vi)[:, 0], (vj - vi)[:, 1]  # (E,)
    wx = px[:, None] - vi[None, :, 0]  # (P, E)
    wy = py[:, None] - vi[None, :, 1]
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    bx, by = wx - ex * t, wy - ey * t
    d2 = np.min(bx * bx + by * by, axis=1)
    c1 = py[:, None] >= vi[None, :, 1]
    c2 = py[:, None] < vj[None, :, 1]
    c3 = ex * wy > ey * wx
    flips = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
    inside = (np.sum(flips, axis=1) % 2) == 1
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def shape_sdf(shape: str, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Signed distance in unit coordinates (object extent 1) for points `ux`, `uy` of any equal shape."""
    fx, fy = ux.ravel(), uy.ravel()
    if shape == "circle":
        d = np.hypot(fx, fy) - 1.0
    elif shape in _POLYGONS:
        d = _polygon_sdf(fx, fy, _POLYGONS[shape])
        if shape == "heart":
            for cx, cy, r in _HEART_LOBES:
                d = np.minimum(d, np.hypot(fx - cx, fy - cy) - r)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return d.reshape(ux.shape)


# ----------------------------------------------------------------------------------------------------
# Rendering.


def cell_size(image_size: int) -> float:
    return image_size / 3.0


def object_geometry(obj: Obj, image_size: int) -> tuple[float, float, float]:
    """(centre_x, centre_y, radius) of an object in pixels (pixel centres sit at integer + 0.5)."""
    c = cell_size(image_size)
    row, col = divmod(obj.cell, 3)
    return (col + 0.5 + obj.dx) * c, (row + 0.5 + obj.dy) * c, SIZE_RADIUS[obj.size] * c


def shape_coverage(
    shape: str, cx: float, cy: float, radius: float, height: int, width: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage of one shape, computed only over its bounding box.

    Args:
      shape: a name in SHAPES.
      cx, cy, radius: centre and half-extent in pixels.
      height, width: image size in pixels.

    Returns:
      (coverage_hxw float32 in [0, 1], (y0, y1, x0, x1) the box it covers in the image).
    """
    y0, y1 = max(int(np.floor(cy - radius - 1)), 0), min(int(np.ceil(cy + radius + 1)), height)
    x0, x1 = max(int(np.floor(cx - radius - 1)), 0), min(int(np.ceil(cx + radius + 1)), width)
    if y1 <= y0 or x1 <= x0:
        return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
    yy, xx = np.meshgrid(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5, indexing="ij")
    d_px = shape_sdf(shape, (xx - cx) / radius, (yy - cy) / radius) * radius
    return np.clip(0.5 - d_px, 0.0, 1.0).astype(np.float32), (y0, y1, x0, x1)


def object_mask(obj: Obj, image_size: int) -> np.ndarray:
    """Full-image coverage (float32 HxW in [0, 1]) of one object."""
    out = np.zeros((image_size, image_size), np.float32)
    cov, (y0, y1, x0, x1) = shape_coverage(obj.shape, *object_geometry(obj, image_size), image_size, image_size)
    out[y0:y1, x0:x1] = cov
    return out


def render_background(bg: Background, image_size: int) -> np.ndarray:
    """Background as float32 HxWx3 in [0, 255]."""
    c0 = np.asarray(BACKGROUND_COLOURS[bg.colours[0]], np.float32)
    c1 = np.asarray(BACKGROUND_COLOURS[bg.colours[1]], np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c0, (image_size, image_size, 3)).copy()
    u = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    if bg.kind == "split":
        u = (u >= 0.5).astype(np.float32)
    w = u[None, :] if bg.orientation == "horizontal" else u[:, None]
    w = np.broadcast_to(w, (image_size, image_size))[..., None]
    return c0 * (1.0 - w) + c1 * w


def render_scene(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Renders a scene. Returns uint8 image_size x image_size x 3."""
    img = render_background(scene.background, image_size)
    for obj in scene.objects:
        cov, (y0, y1, x0, x1) = shape_coverage(obj.shape, *object_geometry(obj, image_size), image_size, image_size)
        colour = np.asarray(COLOURS[obj.colour], np.float32)
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch + (colour - patch) * cov[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def cell_bounds(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the pixels whose centres fall inside a grid cell."""
    c = cell_size(image_size)
    row, col = divmod(cell, 3)

    def span(i: int) -> tuple[int, int]:
        # pixel p belongs to cell i when i*c <= p + 0.5 < (i+1)*c
        return int(np.ceil(i * c - 0.5)), int(np.ceil((i + 1) * c - 0.5))

    (y0, y1), (x0, x1) = span(row), span(col)
    return y0, y1, x0, x1


def cells_mask(cells: list[int] | tuple[int, ...], image_size: int, margin: int = 1) -> np.ndarray:
    """bool HxW: the union of grid cells, each grown by `margin` pixels (edit regions, inpaint holes)."""
    m = np.zeros((image_size, image_size), bool)
    for cell in cells:
        y0, y1, x0, x1 = cell_bounds(cell, image_size)
        m[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = True
    return m


@lru_cache(maxsize=None)
def shape_unit_stats(shape: str) -> tuple[float, float, float]:
    """(area, centroid_x, centroid_y) of a shape in unit coordinates, measured on a fine grid."""
    n = 400
    u = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    yy, xx = np.meshgrid(u, u, indexing="ij")
    inside = shape_sdf(shape, xx, yy) <= 0
    area = inside.mean() * 4.0
    return float(area), float(xx[inside].mean()), float(yy[inside].mean())
