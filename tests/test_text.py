"""Text encoders: PyTorch parity (BERT, CLIP text), the real MiniLM, loading errors, prompts, SimpleTextEncoder, cache.

torch is only a test dependency here: the reference models are transformers' PyTorch ones, saved with
`save_pretrained` and loaded back by our loader (so parity also covers the checkpoint mapping). The
tests that need torch import it themselves, so the one about running without torch runs without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from microforge_jax import text as T
from microforge_jax.config import TextConfig
from microforge_jax.models import text as mt

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _redraw_torch(model: torch.nn.Module, seed: int) -> None:
    """Non-degenerate weights (HF's std-0.02 init makes attention nearly uniform): DESIGN §7."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[1] if "embed" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _run_ours(folder: Path, ids: np.ndarray, mask: np.ndarray):
    module, params = T.load_hf_text_model(folder)
    return jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))


# ----------------------------------------------------------------------------- parity (tiny random configs)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    model = transformers.BertModel(transformers.BertConfig(max_position_embeddings=16, **TINY)).eval()
    _redraw_torch(model, seed=1)
    return _save(model, tmp_path_factory.mktemp("bert")), model


def test_bert_parity_with_padding(bert_folder, relerr):
    import torch

    folder, model = bert_folder
    rng = np.random.default_rng(0)
    lengths = np.array([12, 7, 3, 12])
    ids = rng.integers(1, 100, (4, 12))
    mask = np.arange(12)[None] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    hidden, pooled = _run_ours(folder, ids, mask)
    ref_h = ref.last_hidden_state.numpy()
    assert np.std(hidden) > 0.1 and relerr(hidden[0], hidden[1]) > 0.1  # not vacuous
    m = mask[..., None]
    err_h, err_p = relerr(hidden, ref_h), relerr(pooled, (ref_h * m).sum(1) / m.sum(1))
    print(f"BERT parity: hidden {err_h:.2e}, mean-pooled {err_p:.2e}")
    assert err_h <= 1e-5 and err_p <= 1e-5


@pytest.fixture(scope="module", params=[2, 50], ids=["legacy-eos2-argmax", "eos-id-first"])
def clip_folder(request, tmp_path_factory):
    cfg = transformers.CLIPTextConfig(
        max_position_embeddings=16, bos_token_id=98, eos_token_id=request.param, pad_token_id=1, **TINY
    )
    model = transformers.CLIPTextModel(cfg).eval()
    _redraw_torch(model, seed=2)
    return _save(model, tmp_path_factory.mktemp("clip")), model, request.param


def test_clip_parity_hidden_and_pooled(clip_folder, relerr):
    import torch

    folder, model, eos_cfg = clip_folder
    rng = np.random.default_rng(1)
    lengths = np.array([16, 9, 2, 5])  # 2: the empty prompt, BOS EOS
    pos = np.arange(16)[None]
    ids = rng.integers(51, 98, (4, 16))  # content ids above 50: argmax and "first eos" pick different places
    ids = np.where(pos == 0, 98, ids)
    if eos_cfg == 2:  # legacy config: the end-of-text token is the largest id, and a 2 elsewhere must not count
        ids = np.where(pos == 1, 2, ids)
        ids = np.where(pos == lengths[:, None] - 1, 99, ids)
        ids = np.where(pos >= lengths[:, None], 0, ids)
    else:  # eos id 50, also used as padding (as openai's CLIP tokenizers do): pool at its first occurrence
        ids = np.where(pos >= lengths[:, None] - 1, 50, ids)
    mask = pos < lengths[:, None]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    hidden, pooled = _run_ours(folder, ids, mask)
    assert np.std(pooled) > 0.1 and relerr(pooled[1], pooled[2]) > 0.1
    err_h, err_p = relerr(hidden, ref.last_hidden_state.numpy()), relerr(pooled, ref.pooler_output.numpy())
    print(f"CLIP(eos={eos_cfg}) parity: hidden {err_h:.2e}, pooled {err_p:.2e}")
    assert err_h <= 1e-5 and err_p <= 1e-5
    # The pooled row really is the end-of-text state, not the last or the max-id position by accident.
    np.testing.assert_array_equal(np.asarray(pooled[1]), np.asarray(hidden[1, 8]))
    # What TextEncoder.encode relies on: prompts cut to their own length (rows 2, 3 -> 8 tokens) give
    # the same states and the same end-of-text pooling.
    h8, p8 = _run_ours(folder, ids[2:, :8], mask[2:, :8])
    assert relerr(h8 * mask[2:, :8, None], np.asarray(hidden)[2:, :8] * mask[2:, :8, None]) <= 1e-6
    assert relerr(p8, pooled[2:]) <= 1e-6


def test_full_clip_model_folder_loads_text_tower(tmp_path, relerr):
    """A CLIPModel folder (CLIP-L's layout): `text_model.` prefix, vision tower and projections ignored."""
    import torch

    text = dict(max_position_embeddings=16, bos_token_id=98, eos_token_id=50, pad_token_id=1, **TINY)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32)
    cfg = transformers.CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 16}, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    _redraw_torch(model, seed=4)
    folder = _save(model, tmp_path / "clip-full")
    ids = np.array([[98, 60, 70, 50, 50, 50], [98, 50, 50, 50, 50, 50]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    with torch.no_grad():
        ref = model.text_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    hidden, pooled = _run_ours(folder, ids, mask)
    assert relerr(hidden, ref.last_hidden_state.numpy()) <= 1e-5
    assert relerr(pooled, ref.pooler_output.numpy()) <= 1e-5


def test_loader_is_strict(bert_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder, _ = bert_folder
    tensors = load_file(folder / "model.safetensors")
    cases = {
        "extra": {**tensors, "encoder.layer.0.attention.self.rotary.weight": np.zeros(3, np.float32)},
        "missing": {k: v for k, v in tensors.items() if k != "encoder.layer.1.output.dense.bias"},
        "shape": {**tensors, "embeddings.LayerNorm.bias": np.zeros(7, np.float32)},
    }
    expect = {"extra": "rotary", "missing": "layers_1/mlp/fc2/bias", "shape": "embeddings.LayerNorm.bias"}
    for case, tensors_ in cases.items():
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text((folder / "config.json").read_text())
        save_file(tensors_, d / "model.safetensors")
        with pytest.raises(T.TextEncoderError, match=expect[case]):
            T.load_hf_text_model(d)


# ----------------------------------------------------------------------------- the real MiniLM

SENTENCES = [
    "a red circle",
    "a crimson circle",
    "a blue square",
    "",
    "A photograph of an astronaut riding a horse on the moon.",
    "two small green triangles above a large yellow hexagon",
    "the quick brown fox jumps over the lazy dog",
    "Café au lait, crème brûlée et naïveté",
    "Ein großer Hund läuft über die Straße",
    "一只红色的猫坐在窗台上",
    "東京の夜景",
    "🚀 rocket launch at dawn 🌅",
    "emoji only 😀😀😀",
    "Ελληνικά γράμματα",
    "русский текст про кошку",
    "an oil painting of a lighthouse in a storm, dramatic lighting",
    "1234567890 !@#$%^&*()",
    "a minimalist logo, flat vector, white background",
    "UPPER CASE AND lower case",
    "a very long prompt " * 8,
    "spaces   and\ttabs\nand newlines",
    "a cat",
    "señor piñata",
    "mañana",
]


@pytest.fixture(scope="module")
def minilm():
    return T.load_text_encoder(TextConfig(encoder="minilm", path="", embed_dim=384, max_length=32, simple_layers=2))


def test_minilm_matches_pytorch_sentence_embeddings(minilm, relerr):
    import torch

    folder = str(minilm.folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tok(SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state.numpy()
    m = batch["attention_mask"].numpy()[..., None]
    ref = (h * m).sum(1) / m.sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one sentence is over-long on purpose; the warning has its own test
        ours = minilm.encode(SENTENCES)
    np.testing.assert_array_equal(np.asarray(ours.mask_BxM), m[..., 0].astype(bool))
    err = relerr(ours.tokens_BxMxD, h * m)
    print(f"MiniLM token states vs PyTorch: normwise {err:.2e}")
    assert err <= 1e-5
    ours_n = np.asarray(ours.pooled_BxD) / np.linalg.norm(ours.pooled_BxD, axis=1, keepdims=True)
    ref_n = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = np.sum(ours_n * ref_n, axis=1)
    print(f"MiniLM cosine vs PyTorch: min {cos.min():.8f} over {len(cos)} sentences")
    assert cos.min() >= 0.9999
    red, crimson, blue = ours_n[0], ours_n[1], ours_n[2]
    assert red @ crimson > red @ blue
    assert minilm.embed_dim == 384 and not minilm.trainable


def test_empty_prompt_is_deterministic(minilm, relerr):
    a = minilm.encode([""])
    b = minilm.encode(["a dog", "", "another prompt"])  # other batch size and company
    assert a.mask_BxM[0].tolist() == [True, True] + [False] * 30  # [CLS] [SEP]
    assert float(jnp.abs(a.tokens_BxMxD[0, 2:]).max()) == 0.0
    # Bitwise the same for the same batch shape; across batch sizes XLA may pick other kernels (fp32 rounding).
    np.testing.assert_array_equal(a.tokens_BxMxD, minilm.encode([""]).tokens_BxMxD)
    assert minilm.encode([]).tokens_BxMxD.shape == (0, 32, 384)
    assert relerr(b.tokens_BxMxD[1], a.tokens_BxMxD[0]) <= 1e-5
    assert relerr(b.pooled_BxD[1], a.pooled_BxD[0]) <= 1e-5


def test_encode_trims_each_prompt_to_its_length(minilm, relerr, monkeypatch):
    """encode groups prompts by their token count (rounded up to 8): the same states as the full-width encode."""
    prompts = ["", "a red circle", "a large green triangle in the center and a small blue square on the left", "a dog"]
    ids, mask = minilm.tokenize(prompts)
    full = minilm._encode_rows(ids, mask)  # the reference: every prompt padded to max_length (32)
    widths = []
    jitted = minilm._encode_jit
    monkeypatch.setattr(minilm, "_encode_jit", lambda p, i, m: widths.append(i.shape[1]) or jitted(p, i, m))
    ours = minilm.encode(prompts)
    assert sorted(set(widths)) == [8, 24], widths  # 2-5 tokens -> 8; the long caption's 20 -> 24; never 32
    assert ours.tokens_BxMxD.shape == (4, 32, 384)
    np.testing.assert_array_equal(np.asarray(ours.mask_BxM), mask)
    assert float(jnp.abs(jnp.where(ours.mask_BxM[..., None], 0.0, ours.tokens_BxMxD)).max()) == 0.0
    assert relerr(ours.tokens_BxMxD, full.tokens_BxMxD) <= 1e-6
    assert relerr(ours.pooled_BxD, full.pooled_BxD) <= 1e-6


def test_long_prompt_truncated_with_one_warning(minilm):
    minilm._warned_truncation = False
    long = ["word " * 100, "another " * 50, "short"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = minilm.encode(long)
        minilm.encode(long[:1])
    msgs = [w for w in caught if "truncated" in str(w.message)]
    assert len(msgs) == 1
    assert out.mask_BxM[:2].all() and out.mask_BxM[2].sum() == 3
    ids, _ = minilm.tokenize(long[:1])
    assert ids[0, -1] == 102  # [SEP] survives truncation


def test_resolve_errors_and_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_WARNED", set())
    clip = TextConfig(encoder="clip", path="", embed_dim=768, max_length=77, simple_layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = T.resolve_text_config(clip)
        T.resolve_text_config(clip)
    assert [str(w.message) for w in caught if "MiniLM" in str(w.message)].__len__() == 1
    assert first.encoder == "minilm" and first.embed_dim == 384
    missing = tmp_path / "no-such-folder"
    with pytest.raises(T.TextEncoderError, match=f"{missing}.*does not exist"):
        T.resolve_text_config(TextConfig("clip", str(missing), 768, 77, 2))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(T.TextEncoderError, match=r"gpt2.*'gpt2'.*expected a CLIP text"):
        T.resolve_text_config(TextConfig("clip", str(gpt2), 768, 77, 2))
    with pytest.raises(T.TextEncoderError, match="BERT"):
        T.load_text_encoder(TextConfig("bert", str(gpt2), 384, 32, 2))
    with pytest.raises(ValueError, match="max_length"):  # TextEncoderError is a ValueError
        T.resolve_text_config(TextConfig("minilm", "", 384, 1000, 2))


_NO_TORCH = """
import importlib.abc, sys
class HideTorch(importlib.abc.MetaPathFinder):
    def __init__(self, inner): self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] == "torch" else self.inner.find_spec(name, path, target)
    def invalidate_caches(self): getattr(self.inner, "invalidate_caches", lambda: None)()
    def find_distributions(self, *a, **k):
        fd = getattr(self.inner, "find_distributions", None)
        return [d for d in (fd(*a, **k) if fd else []) if (d.metadata["Name"] or "").lower() != "torch"]
sys.meta_path[:] = [HideTorch(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
from microforge_jax.config import TextConfig
from microforge_jax.text import load_text_encoder
out = load_text_encoder(TextConfig("minilm", "", 384, 8, 2)).encode(["hi", ""])
assert "torch" not in sys.modules and out.pooled_BxD.shape == (2, 384)
print("OK")
"""


def test_loads_and_encodes_without_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_TORCH)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------- SimpleTextEncoder


@pytest.fixture(scope="module")
def simple():
    return T.load_text_encoder(TextConfig(encoder="simple", path="", embed_dim=32, max_length=16, simple_layers=2))


def test_byte_tokenizer():
    ids, mask, cut = mt.byte_tokenize(["", "héllo", "日本語日本語"], max_length=8)
    assert ids[0, :3].tolist() == [mt.BOS_ID, mt.EOS_ID, mt.PAD_ID] and mask[0].sum() == 2
    assert ids[1, 1:7].tolist() == list("héllo".encode()) and ids[1, 7] == mt.EOS_ID and not cut[1]
    # 6 byte slots hold two 3-byte characters: the cut lands on a character boundary.
    assert cut[2] and bytes(ids[2, 1:7].tolist()).decode("utf-8") == "日本"


def test_simple_encoder(simple, redraw, relerr):
    assert simple.trainable and simple.embed_dim == 32
    shapes = jax.eval_shape(simple.init, jax.random.key(0))  # boxed: every parameter has logical axes
    boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxed) and len(boxed) == len(
        jax.tree.leaves(simple.params)
    )
    params = redraw(simple.params, seed=3)
    prompts = ["a red circle", "a blue square", "", "ünï 😀"]
    ids, mask = simple.tokenize(prompts)
    eager = simple.apply(params, ids, mask)
    jitted = jax.jit(simple.apply)(params, ids, mask)
    assert eager.tokens_BxMxD.shape == (4, 16, 32) and eager.pooled_BxD.shape == (4, 32)
    assert relerr(jitted.tokens_BxMxD, eager.tokens_BxMxD) <= 1e-6
    assert relerr(jitted.pooled_BxD, eager.pooled_BxD) <= 1e-6
    assert relerr(eager.pooled_BxD[0], eager.pooled_BxD[1]) > 0.05  # prompts matter
    assert relerr(eager.pooled_BxD[0], eager.pooled_BxD[2]) > 0.05

    def loss(p):
        e = simple.apply(p, ids, mask)
        return jnp.sum(e.pooled_BxD**2) + jnp.sum(e.tokens_BxMxD**2)

    grads = jax.jit(jax.grad(loss))(params)
    # bf16 compute (fp32 params, softmax, norms and pooling): same function within bf16 rounding.
    half = T.load_text_encoder(TextConfig("simple", "", 32, 16, 2), dtype=jnp.bfloat16)
    half = jax.jit(half.apply)(params, ids, mask)
    assert half.tokens_BxMxD.dtype == jnp.bfloat16 and relerr(half.pooled_BxD, eager.pooled_BxD) < 3e-2
    dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads) if not jnp.any(g != 0)]
    # Rows of the embedding tables for unused bytes/positions get zero gradient, but every table gets some.
    assert not dead, dead


# ----------------------------------------------------------------------------- cache


def test_cache_encodes_each_caption_once(minilm, simple, tmp_path):
    calls = []
    cache = T.TextEmbeddingCache(minilm, batch_size=4)
    real_encode = minilm.encode
    cache.encoder = type("Counting", (), {})()
    cache.encoder.__dict__.update(vars(minilm))
    cache.encoder.encode = lambda prompts: calls.append(list(prompts)) or real_encode(prompts)
    captions = ["a cat", "a dog", "a cat", "", "a dog", "ein Hund 🐕"]
    got = cache.lookup(captions)
    again = cache.lookup(["a dog", "", "a cat", "new one"])
    encoded = [p for call in calls for p in call]
    assert sorted(encoded) == sorted(["a cat", "a dog", "", "ein Hund 🐕", "new one"]) and cache.num_encoded == 5
    direct = minilm.encode(captions)
    for field in ("tokens_BxMxD", "mask_BxM", "pooled_BxD"):
        np.testing.assert_allclose(getattr(got, field), getattr(direct, field), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(again.pooled_BxD[0], got.pooled_BxD[1])

    path = tmp_path / "captions.safetensors"
    cache.save(path)
    fresh = T.TextEmbeddingCache(minilm)
    assert fresh.load(path) == 5 and len(fresh) == 5
    back = fresh.lookup(captions)
    assert fresh.num_encoded == 0
    for field in ("tokens_BxMxD", "mask_BxM", "pooled_BxD"):
        np.testing.assert_array_equal(getattr(back, field), getattr(got, field))
    with pytest.raises(ValueError, match="trainable"):
        T.TextEmbeddingCache(simple)
    other = T.TextEmbeddingCache(minilm)
    other.encoder = type("Other", (), {"identity": "someone-else", "trainable": False})()
    with pytest.raises(ValueError, match="written for text encoder"):
        other.load(path)
