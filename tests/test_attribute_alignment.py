"""Attribute alignment: the per-cell labels, the token -> cell map and the loss, against hand computations."""

import json

import jax.numpy as jnp
import numpy as np

from microforge_jax import losses
from microforge_jax.data.shapes import SHAPES, cell_attributes, make_record
from microforge_jax.data.shapes_render import COLOURS, Background, Obj, Scene


def test_grid_cells_of_an_8x8_token_grid_by_hand():
    # floor((i + 0.5) * 3 / 8): 0.19, 0.56, 0.94, 1.31, 1.69, 2.06, 2.44, 2.81
    rows = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(losses.grid_cells(8, 8), 3 * rows[:, None] + rows[None, :])
    np.testing.assert_array_equal(losses.grid_cells(3, 3), np.arange(9).reshape(3, 3))


def test_cell_attributes_by_hand():
    scene = Scene((Obj("star", "red", "large", 4), Obj("heart", "cyan", "small", 2)), Background())
    attrs = cell_attributes(scene)
    expected = np.zeros((9, 2), np.int32)
    expected[4] = (1 + 3, 1 + 0)  # star is SHAPES[3], red is the first colour
    expected[2] = (1 + 7, 1 + 6)  # heart SHAPES[7], cyan the seventh colour
    assert SHAPES[3] == "star" and list(COLOURS)[6] == "cyan"
    np.testing.assert_array_equal(attrs, expected)
    rec = make_record("generate", 5)
    assert rec["attrs"].shape == (9, 2) and rec["attrs"].dtype == np.int32
    rec_scene = Scene.from_dict(json.loads(rec["scene"]))
    np.testing.assert_array_equal(rec["attrs"], cell_attributes(rec_scene))
    assert (rec["attrs"][:, 0] > 0).sum() == len(rec_scene.objects) > 0


def test_attribute_loss_is_the_mean_shape_plus_colour_cross_entropy():
    rng = np.random.default_rng(0)
    b, h, w = 2, 3, 3
    logits = rng.standard_normal((b, h * w, losses.NUM_SHAPE_CLASSES + losses.NUM_COLOUR_CLASSES)) * 2
    attrs = np.zeros((b, 9, 2), np.int32)
    attrs[0, 4] = (4, 1)
    attrs[1, 0] = (8, 10)
    attrs[1, 8] = (1, 5)

    def ce(x, label):
        x = x.astype(np.float64)
        return np.log(np.exp(x - x.max()).sum()) + x.max() - x[label]

    total = []
    for i in range(b):
        for tok in range(h * w):  # a 3x3 token grid: token k lies in cell k
            s, c = attrs[i, tok]
            total.append(ce(logits[i, tok, :9], s) + ce(logits[i, tok, 9:], c))
    got = losses.attribute_loss(jnp.asarray(logits, jnp.float32), attrs, (h, w))
    assert abs(float(got) - np.mean(total)) < 1e-5 * np.mean(total)
