"""The built-in procedural "shapes" world: scenes, captions, splits, task records, Grain sources.

No files and no network: every record is a pure function of `(seed, split, task, index)` through
`np.random.default_rng([seed, split_id, task_id, index])`, so Grain can shuffle, shard and resume
by index, and the same index always gives the same bytes.

World (geometry and renderer in `shapes_render`): 1-3 objects, each one of 8 shapes (circle,
square, triangle, star, diamond, hexagon, cross, heart), 10 colours (red, green, blue, yellow,
orange, purple, cyan, pink, white, black), 2 sizes (small, large), in one cell of a 3x3 grid named
"top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right";
one object per cell, so objects never overlap. Background: plain, split (two halves) or a linear
gradient, in muted colours (gray, slate, sand, sage, taupe) far from every object colour.

Splits:
  - "train": scenes never contain a (colour, shape) pair of HELDOUT_PAIRS, in any task (edits never
    create one either).
  - "val": the train distribution, drawn from a different random stream (unseen scenes).
  - "heldout": every scene's first object is a held-out pair (compositional generalisation: the
    colour and the shape were each seen in training, never together); other objects are free.
HELDOUT_PAIRS holds out each shape exactly once, with 8 different colours:
  red star, green heart, blue triangle, yellow square, orange circle, purple diamond, cyan cross,
  pink hexagon.

Tasks and record formats (uint8 images in [0, 255], H = W = image_size; strings are `str`):
  generate: image HxWx3, text (= caption), scene (JSON str), cells float32 (9,) (1 = a cell whose
            object the caption places; all 0 when the caption names no position), attrs int32 (9, 2)
            (per cell: 1 + shape index, 1 + colour index; 0 = empty), task int32, index int64
  edit:     image (target) HxWx3, source HxWx3, mask float32 HxWx1 (1 = edited region: the touched
            cells grown by 1 px), text (= instruction), caption (of the target), op (recolour | move |
            remove | add), scene (target JSON), source_scene (JSON), task, index
  inpaint:  image HxWx3, source (image with the hole set to 0) HxWx3, mask float32 HxWx1 (1 = hole:
            one object's cell or a random rectangle), text (= caption), scene, cells, task, index
  sr:       image HxWx3, low_res (H/f)x(W/f)x3 (area average), source (low_res nearest-upsampled)
            HxWx3, text (= caption), scene, cells, task, index
`task` indexes TASKS; `text` is always what the model is conditioned on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from microforge_jax.data.shapes_render import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    MAX_JITTER,
    ORIENTATIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    Background,
    Obj,
    Scene,
    cells_mask,
    render_scene,
    validate_scene,
)

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "NUM_OBJECTS_P",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "Background",
    "Obj",
    "Scene",
    "ShapesSource",
    "caption_for",
    "make_record",
    "render_scene",
    "sample_scene",
    "validate_scene",
]

TASKS: tuple[str, ...] = ("generate", "edit", "inpaint", "sr")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "heart"),
        ("blue", "triangle"),
        ("yellow", "square"),
        ("orange", "circle"),
        ("purple", "diamond"),
        ("cyan", "cross"),
        ("pink", "hexagon"),
    }
)
_HELDOUT_LIST = sorted(HELDOUT_PAIRS)
_COLOUR_NAMES = tuple(COLOURS)
_BG_NAMES = tuple(BACKGROUND_COLOURS)
NUM_OBJECTS_P: tuple[float, float, float] = (0.4, 0.35, 0.25)  # 1, 2, 3 objects (the world's own mix)
_COUNT_WORDS = ("zero", "one", "two", "three")


def _rng(seed: int, split: str, task: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), index])


def _allowed(colour: str, shape: str, split: str) -> bool:
    return split == "heldout" or (colour, shape) not in HELDOUT_PAIRS


def _sample_obj(rng: np.random.Generator, cell: int, split: str, pair: tuple[str, str] | None = None) -> Obj:
    if pair is None:
        while True:  # rejection keeps colour and shape marginals near uniform
            pair = (_COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))])
            if _allowed(*pair, split):
                break
    size = SIZES[rng.integers(len(SIZES))]
    # Jitter rounded to 3 decimals so the JSON form of a scene renders to the same bytes.
    dx, dy = np.round(rng.uniform(-MAX_JITTER, MAX_JITTER, 2), 3)
    return Obj(pair[1], pair[0], size, int(cell), float(dx), float(dy))


def _sample_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUND_KINDS[rng.choice(len(BACKGROUND_KINDS), p=(0.4, 0.3, 0.3))]
    i, j = rng.choice(len(_BG_NAMES), 2, replace=False)
    colours = (_BG_NAMES[i], _BG_NAMES[i] if kind == "plain" else _BG_NAMES[j])
    return Background(kind, colours, ORIENTATIONS[rng.integers(2)])


def _check_objects_p(objects_p: Any) -> tuple[float, float, float]:
    p = tuple(float(x) for x in objects_p)
    if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
        raise ValueError(f"objects_p must be 3 probabilities (1, 2, 3 objects) summing to 1, got {objects_p}")
    return p


def sample_scene(
    rng: np.random.Generator,
    split: str = "train",
    num_objects: int | None = None,
    objects_p: tuple[float, float, float] = NUM_OBJECTS_P,
) -> Scene:
    """Draws a random scene for a split (see the module docstring for what each split allows).

    Args:
      rng: the random stream (one per record).
      split: "train", "val" or "heldout".
      num_objects: 1-3, or None to draw it from `objects_p`.
      objects_p: probabilities of 1, 2 and 3 objects (default the world's 40% / 35% / 25%). The
        draw takes one number from `rng` whatever `objects_p` is, so the rest of the scene follows
        the same stream: with the default the records are unchanged.

    Returns:
      A Scene.
    """
    n = int(rng.choice(3, p=_check_objects_p(objects_p))) + 1 if num_objects is None else num_objects
    cells = rng.choice(9, n, replace=False)
    objs = []
    for k, cell in enumerate(cells):
        pair = _HELDOUT_LIST[rng.integers(len(_HELDOUT_LIST))] if (split == "heldout" and k == 0) else None
        objs.append(_sample_obj(rng, cell, split, pair))
    return Scene(tuple(objs), _sample_background(rng))


def scene_for_index(index: int, split: str = "train", seed: int = 0) -> Scene:
    """The scene of record `index` of the generate task (also the eval prompts)."""
    return sample_scene(_rng(seed, split, "generate", index), split)


# ----------------------------------------------------------------------------------------------------
# Captions. Templates 0, 1, 4, 5 and 6 name every attribute (ShapesEval uses 0 by default); 2 drops
# the size and 3 drops size and position, so a text encoder also sees under-specified paraphrases.

_PREP = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top", "at the top"),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left", "on the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right"),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "at the bottom"),
    "bottom right": ("in the bottom right", "at the bottom right"),
}
NUM_TEMPLATES = 7
COMPLETE_TEMPLATES = (0, 1, 4, 5, 6)
_TEMPLATE_P = np.array([0.25, 0.15, 0.12, 0.08, 0.15, 0.1, 0.15])


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _bg_phrase(bg: Background) -> str:
    if bg.kind == "plain":
        return f"a plain {bg.colours[0]} background"
    word = "split" if bg.kind == "split" else "gradient"
    return f"{_a(bg.colours[0])} and {bg.colours[1]} {word} background"


def caption_for(scene: Scene, template_id: int = 0) -> str:
    """The caption of a scene under one template (0 .. NUM_TEMPLATES - 1; see COMPLETE_TEMPLATES).

    Args:
      scene: the scene.
      template_id: which template; 0 is "a large red circle in the top left and a small blue ...".

    Returns:
      The caption string.
    """
    objs = scene.objects
    full = [f"{_a(o.size)} {o.colour} {o.shape} {_PREP[o.position][0]}" for o in objs]
    if template_id == 0:
        return _join(full)
    if template_id == 1:
        noun = "shape" if len(objs) == 1 else "shapes"
        return f"{_COUNT_WORDS[len(objs)]} {noun}: {_join(full)}"
    if template_id == 2:
        return _join([f"{_a(o.colour)} {o.shape} {_PREP[o.position][1]}" for o in objs])
    if template_id == 3:
        return ", ".join(f"{o.colour} {o.shape}" for o in objs)
    if template_id == 4:
        return "; ".join(f"{o.size} {o.colour} {o.shape}, {o.position}" for o in objs)
    if template_id == 5:
        return f"{_join(full)} on {_bg_phrase(scene.background)}"
    if template_id == 6:
        return ". ".join(f"{o.position}: {o.size} {o.colour} {o.shape}" for o in objs)
    raise ValueError(f"template_id must be in [0, {NUM_TEMPLATES}), got {template_id}")


# Templates whose captions name every object's position (template 3 names colour and shape only).
POSITION_TEMPLATES = frozenset({0, 1, 2, 4, 5, 6})


def _random_caption(rng: np.random.Generator, scene: Scene) -> tuple[str, int]:
    template = int(rng.choice(NUM_TEMPLATES, p=_TEMPLATE_P))
    return caption_for(scene, template), template


def named_cells(scene: Scene, template_id: int) -> np.ndarray:
    """(9,) float32: 1 at the grid cells whose object the caption places (all zero if it names no position).

    A function of the caption alone, so a loss weighted by it keeps the conditional flow's
    minimiser (`train.flow.object_cell_weight`).
    """
    cells = np.zeros(9, np.float32)
    if template_id in POSITION_TEMPLATES:
        cells[[o.cell for o in scene.objects]] = 1
    return cells


# ----------------------------------------------------------------------------------------------------
# Edit pairs.

_EDIT_OPS = ("recolour", "move", "remove", "add")


def cell_attributes(scene: Scene) -> np.ndarray:
    """Per 3x3-grid cell (row-major), the object's (1 + shape index, 1 + colour index); (0, 0) if empty.

    The free labels of the attribute-alignment loss (`train.flow.attribute_weight`).
    """
    attrs = np.zeros((len(POSITIONS), 2), np.int32)
    for obj in scene.objects:
        attrs[obj.cell] = (1 + SHAPES.index(obj.shape), 1 + list(COLOURS).index(obj.colour))
    return attrs


def refer(scene: Scene, i: int) -> str:
    """A unique referring expression for object i: "the red circle", plus its position if ambiguous."""
    o = scene.objects[i]
    ref = f"the {o.colour} {o.shape}"
    if sum(p.colour == o.colour and p.shape == o.shape for p in scene.objects) > 1:
        ref += f" {_PREP[o.position][0]}"
    return ref


def _free_cells(scene: Scene) -> list[int]:
    used = {o.cell for o in scene.objects}
    return [c for c in range(9) if c not in used]


def sample_edit(rng: np.random.Generator, split: str = "train") -> tuple[Scene, Scene, str, str, list[int]]:
    """Draws a source scene and one edit of it.

    Args:
      rng: the random stream.
      split: as in `sample_scene`; on "train" neither scene contains a held-out pair.

    Returns:
      (source_scene, target_scene, instruction, op, touched_cells).
    """
    src = sample_scene(rng, split)
    objs = list(src.objects)
    n = len(objs)
    op = _EDIT_OPS[rng.integers(len(_EDIT_OPS))]
    if op == "remove" and n == 1:
        op = "add"  # never leave an empty canvas
    if op == "add" and n == 3:
        op = "remove"
    i = int(rng.integers(n))
    ref = refer(src, i)
    o = objs[i]
    if op == "recolour":
        choices = [c for c in _COLOUR_NAMES if c != o.colour and _allowed(c, o.shape, split)]
        new = choices[rng.integers(len(choices))]
        objs[i] = Obj(o.shape, new, o.size, o.cell, o.dx, o.dy)
        tmpl = ("make {ref} {c}", "change the colour of {ref} to {c}", "turn {ref} {c}", "paint {ref} {c}")
        text, cells = tmpl[rng.integers(len(tmpl))].format(ref=ref, c=new), [o.cell]
    elif op == "move":
        free = _free_cells(src)
        cell = free[rng.integers(len(free))]
        objs[i] = Obj(o.shape, o.colour, o.size, cell, o.dx, o.dy)
        pos = POSITIONS[cell]
        tmpl = ("move {ref} to the {pos}", "put {ref} {prep}", "shift {ref} to the {pos}")
        text = tmpl[rng.integers(len(tmpl))].format(ref=ref, pos=pos, prep=_PREP[pos][0])
        cells = [o.cell, cell]
    elif op == "remove":
        objs.pop(i)
        tmpl = ("remove {ref}", "delete {ref}", "take away {ref}", "erase {ref}")
        text, cells = tmpl[rng.integers(len(tmpl))].format(ref=ref), [o.cell]
    else:  # add
        free = _free_cells(src)
        new = _sample_obj(rng, free[rng.integers(len(free))], split)
        objs.append(new)
        tmpl = ("add {a} {c} {sh} {prep}", "put {a} {c} {sh} {prep}", "draw {a} {c} {sh} {prep}")
        prep = _PREP[new.position][int(rng.integers(2))]
        text = tmpl[rng.integers(len(tmpl))].format(a=_a(new.size), c=new.colour, sh=new.shape, prep=prep)
        cells = [new.cell]
    return src, Scene(tuple(objs), src.background), text, op, cells


# ----------------------------------------------------------------------------------------------------
# Records.


def area_downsample(image_hxwx3: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsampling by an integer factor (uint8 in, uint8 out)."""
    h, w, c = image_hxwx3.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} must be a multiple of the SR factor {factor}")
    x = image_hxwx3.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32).mean((1, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _random_rect(rng: np.random.Generator, image_size: int) -> np.ndarray:
    h, w = (rng.uniform(0.2, 0.6, 2) * image_size).astype(int) + 1
    y0, x0 = rng.integers(0, image_size - h + 1), rng.integers(0, image_size - w + 1)
    m = np.zeros((image_size, image_size), bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


def make_record(
    task: str,
    index: int,
    split: str = "train",
    image_size: int = 64,
    seed: int = 0,
    sr_factor: int = 4,
    objects_p: tuple[float, float, float] = NUM_OBJECTS_P,
) -> dict[str, Any]:
    """One record of a task (formats in the module docstring).

    Args:
      task: one of TASKS.
      index: the record index (any non-negative int).
      split: one of SPLITS.
      image_size: output resolution (a multiple of `sr_factor` for "sr").
      seed: the dataset seed.
      sr_factor: low-res downsampling factor for "sr".
      objects_p: probabilities of 1, 2, 3 objects in the scene (generate, inpaint, sr; the edit
        task keeps the world's mix).

    Returns:
      A dict of numpy arrays and strings.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = _rng(seed, split, task, index)
    rec: dict[str, Any] = {"task": np.int32(TASKS.index(task)), "index": np.int64(index)}
    if task == "edit":
        src, tgt, text, op, cells = sample_edit(rng, split)
        mask = cells_mask(cells, image_size)
        rec.update(
            image=render_scene(tgt, image_size),
            source=render_scene(src, image_size),
            mask=mask[..., None].astype(np.float32),
            text=text,
            caption=caption_for(tgt, 0),
            op=op,
            scene=json.dumps(tgt.to_dict()),
            source_scene=json.dumps(src.to_dict()),
        )
        return rec
    scene = sample_scene(rng, split, objects_p=objects_p)
    image = render_scene(scene, image_size)
    text, template = _random_caption(rng, scene)
    rec.update(
        image=image,
        text=text,
        scene=json.dumps(scene.to_dict()),
        cells=named_cells(scene, template),
        attrs=cell_attributes(scene),
    )
    if task == "inpaint":
        if rng.random() < 0.6:
            hole = cells_mask([scene.objects[rng.integers(len(scene.objects))].cell], image_size)
        else:
            hole = _random_rect(rng, image_size)
        rec.update(source=np.where(hole[..., None], np.uint8(0), image), mask=hole[..., None].astype(np.float32))
    elif task == "sr":
        low = area_downsample(image, sr_factor)
        rec.update(low_res=low, source=np.repeat(np.repeat(low, sr_factor, 0), sr_factor, 1))
    return rec


class ShapesSource:
    """A Grain random-access data source (`__len__`, `__getitem__`) over one task of the shapes world.

    Use as `grain.MapDataset.source(ShapesSource("generate")).shuffle(seed=0).batch(32)`; records are
    pure functions of the index, so shuffling, sharding and resuming are exact.
    """

    def __init__(
        self,
        task: str = "generate",
        split: str = "train",
        image_size: int = 64,
        num_records: int = 1 << 20,
        seed: int = 0,
        sr_factor: int = 4,
        objects_p: tuple[float, float, float] = NUM_OBJECTS_P,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if task == "sr" and image_size % sr_factor:
            raise ValueError(f"image_size {image_size} must be a multiple of the SR factor {sr_factor}")
        self.task, self.split, self.image_size = task, split, image_size
        self.num_records, self.seed, self.sr_factor = num_records, seed, sr_factor
        self.objects_p = _check_objects_p(objects_p)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range [0, {self.num_records})")
        return make_record(self.task, index, self.split, self.image_size, self.seed, self.sr_factor, self.objects_p)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(task={self.task!r}, split={self.split!r}, image_size={self.image_size}, "
            f"num_records={self.num_records}, seed={self.seed}, objects_p={self.objects_p})"
        )


def scene_from_json(text: str) -> Scene:
    """Parses the `scene` string of a record."""
    return Scene.from_dict(json.loads(text))
