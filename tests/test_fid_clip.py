"""FID and CLIP score: the Flax FID Inception against a PyTorch reference (through the converter), the
Flax CLIP vision tower + projections against transformers' CLIPModel, the Frechet distance against
closed forms, and the command line's bad-input lines.

All weights are random (tiny CLIP configs; the Inception at its real widths but a 75x75 input): no
download, no real checkpoint.
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _torch_fid_inception import build as build_torch_inception

from microforge_jax.eval import __main__ as cli
from microforge_jax.eval import clip_score as cs
from microforge_jax.eval import fid, inception

# ----------------------------------------------------------------------------- FID Inception


@pytest.fixture(scope="module")
def inception_pair(tmp_path_factory):
    """(torch reference, path of our converted safetensors, path of the .pth) with random weights."""
    folder = tmp_path_factory.mktemp("inception")
    model = build_torch_inception(seed=0, resize_to=75)
    pth = folder / "pt_inception-random.pth"
    torch.save(model.state_dict(), pth)  # the checkpoint's layout: fc and BN counters included
    out = inception.convert(pth, folder / "inception.safetensors")
    return model, out, pth


def _test_images(n: int, size: int) -> np.ndarray:
    """Distinct images: a colour gradient, noise, blocks (so features differ between rows)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    grad = np.stack([xx, yy, 1 - xx * yy], -1)
    blocks = ((np.floor(xx * 4) + np.floor(yy * 4)) % 2)[..., None] * np.array([0.9, 0.2, 0.5])
    base = [grad, rng.random((size, size, 3)), blocks]
    return np.stack([base[i % 3] for i in range(n)]).astype(np.float32)


def test_resize_matches_torch_interpolate(relerr):
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    for size_in in (20, 120):  # up- and down-sampling
        x = rng.random((2, size_in, size_in, 3)).astype(np.float32)
        ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), 75))
        ref = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(75, 75), mode="bilinear", align_corners=False)
        err = relerr(ours, ref.permute(0, 2, 3, 1).numpy())
        print(f"resize {size_in}->75: {err:.2e}")
        assert err <= 1e-6


def test_inception_matches_pytorch_through_converter(inception_pair, relerr):
    """uint8 images -> `InceptionFeatures` (converted weights, batches of 2, the last one padded) vs torch."""
    model, weights, _ = inception_pair
    x = np.round(_test_images(3, 80) * 255).astype(np.uint8)  # resized to 75 (the smallest the network takes)
    ours = fid.InceptionFeatures(weights, batch_size=2, size=75).features(x)
    with torch.no_grad():
        ref = model(torch.tensor(x.astype(np.float32) / 255).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (3, inception.FEATURES) and ours.dtype == np.float64
    assert np.std(ours) > 0.05 and min(relerr(ours[0], ours[1]), relerr(ours[1], ours[2])) > 0.05  # not vacuous
    err = relerr(ours, ref)
    print(f"FID Inception parity (3 images, 75x75): {err:.2e}")
    assert err <= 1e-5


def test_inception_weights_are_checked(inception_pair, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, weights, pth = inception_pair
    tensors = load_file(str(weights))
    assert set(tensors) == set(inception.expected_shapes())
    assert len(tensors) == 5 * sum(1 for k in torch.load(pth, weights_only=True) if k.endswith(".conv.weight"))
    cases = {
        "lack 1 of": {k: v for k, v in tensors.items() if k != "Mixed_6b.branch7x7_2.conv.weight"},
        "has shape": {**tensors, "Mixed_7c.branch_pool.bn.weight": np.ones(5, np.float32)},
        "unexpected keys": {**tensors, "Mixed_8a.conv.weight": np.ones((1, 1, 1, 1), np.float32)},
        "non-finite": {**tensors, "Conv2d_1a_3x3.bn.running_var": np.full(32, np.nan, np.float32)},
    }
    for message, bad in cases.items():
        path = tmp_path / "bad.safetensors"
        save_file(bad, str(path))
        with pytest.raises(inception.InceptionError, match=message):
            inception.load_weights(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(inception.InceptionError, match="not a readable safetensors"):
        inception.load_weights(tmp_path / "junk.safetensors")
    with pytest.raises(inception.InceptionError, match="does not exist"):
        inception.load_weights(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- Frechet distance


def _closed_form_diag(mu1, s1, mu2, s2) -> float:
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


@pytest.mark.parametrize("method", ["scipy", "eigh"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = _closed_form_diag(mu1, s1, mu2, s2)
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert expected > 1.0 and abs(got - expected) <= 1e-9 * expected
    # A common rotation changes no distance but makes the covariances full (and S1 S2 non-symmetric).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = fid.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T, method=method)
    assert abs(rotated - expected) <= 1e-9 * expected
    assert abs(fid.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1), method=method)) <= 1e-10


@pytest.mark.parametrize("n", [40, 500])  # fewer and more samples than dimensions (a singular covariance)
def test_fid_of_feature_sets(n):
    rng = np.random.default_rng(3)
    d = 64
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / 4
    shift = rng.normal(size=d)
    # A D x D square root of a singular product is good to ~sqrt(eps) (N=40: 2e-8 relative); lowrank to eps.
    tol = (
        {"lowrank": 1e-12, "scipy": 1e-6, "eigh": 1e-6} if n < d else dict.fromkeys(("lowrank", "scipy", "eigh"), 1e-12)
    )
    for method in ("lowrank", "scipy", "eigh"):
        assert abs(fid.fid_from_features(x, x, method=method)) <= tol[method] * np.trace(np.cov(x, rowvar=False))
        # The same set moved by `shift`: equal covariances, so FID = ||shift||^2 exactly.
        moved = fid.fid_from_features(x, x + shift, method=method)
        assert moved > 1.0 and abs(moved - shift @ shift) <= tol[method] * (shift @ shift)
    y = rng.normal(size=(n // 2, d)) * rng.uniform(0.5, 2, d) + 0.3  # another distribution
    values = {m: fid.fid_from_features(x, y, method=m) for m in ("auto", "lowrank", "scipy", "eigh")}
    print(f"N={n}: " + ", ".join(f"{m} {v:.12g}" for m, v in values.items()))
    assert values["lowrank"] > 1.0
    for m, v in values.items():
        assert abs(v - values["lowrank"]) <= max(tol.get(m, 1e-12), 1e-12) * values["lowrank"]
    with pytest.raises(ValueError, match="N >= 2"):
        fid.fid_from_features(x[:1], y)


def test_gaussian_samples_approach_the_closed_form():
    """Samples of two diagonal Gaussians: the FID of the sets is near the closed form (sampling error)."""
    rng = np.random.default_rng(4)
    d, n = 8, 20000
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = np.linspace(0.5, 2, d), np.linspace(2, 0.5, d)
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(s1)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(s2)
    expected = _closed_form_diag(mu1, s1, mu2, s2)
    assert abs(fid.fid_from_features(x, y) - expected) <= 0.03 * expected


# ----------------------------------------------------------------------------- CLIP


def _redraw_torch(model: torch.nn.Module, seed: int) -> None:
    """Non-degenerate weights (HF's std-0.02 init makes attention nearly uniform): DESIGN section 7."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            if p.dim() >= 2:
                fan_in = 1 if "embedding.weight" in name and "patch" not in name else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # LayerNorm scales
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


WORDS = "a an the red blue green circle square cat dog on of small big photo".split()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel saved with a word-level tokenizer and a 32 px image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("clip")
    text = dict(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=99,
    )  # fmt: skip
    vision = dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    _redraw_torch(model, seed=5)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 3 for i, w in enumerate(WORDS)}, "<bos>": 98, "<eos>": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 98), ("<eos>", 99)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder, model, fast, processor


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        freq, phase, colour = rng.uniform(0.05, 0.4), rng.uniform(0, 6), rng.uniform(0, 1, 3)
        wave = 0.5 + 0.5 * np.sin(freq * (xx + 2 * yy) + phase)
        out.append(np.clip(wave[..., None] * colour * 255 + rng.normal(0, 20, (h, w, 3)), 0, 255))
    return np.stack(out).astype(np.uint8)


def test_clip_preprocessing_matches_transformers(clip_folder, relerr):
    _, _, _, processor = clip_folder
    pre = cs.Preprocess.from_folder(clip_folder[0])
    assert pre.shortest_edge == 32 and pre.crop == (32, 32)
    for h, w in ((48, 40), (40, 57), (32, 32), (100, 37)):
        image = _images(1, h, w, seed=h + w)[0]
        ref = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = pre(image)
        assert ours.shape == (32, 32, 3)
        assert np.max(np.abs(ours - ref)) <= 1e-5, (h, w)


def test_clip_embeddings_and_score_match_transformers(clip_folder, relerr):
    folder, model, tokenizer, processor = clip_folder
    images = _images(4, 40, 48, seed=7)
    captions = ["a red circle", "the big blue dog on a green square", "photo of a cat", ""]
    scorer = cs.CLIPScorer(folder, batch_size=3)  # 3: a full batch and a padded one
    img, txt = scorer.image_embeds(images), scorer.text_embeds(captions)
    with torch.no_grad():
        pixels = torch.tensor(processor(images=list(images), return_tensors="np")["pixel_values"])
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        ref_txt = model.get_text_features(enc["input_ids"], enc["attention_mask"]).pooler_output.numpy()
    assert img.shape == (4, 16) and txt.shape == (4, 16)
    assert relerr(img[0], img[1]) > 0.1 and relerr(txt[0], txt[1]) > 0.1  # not vacuous
    err_img, err_txt = relerr(img, ref_img), relerr(txt, ref_txt)
    # torchmetrics' CLIPScore on the reference embeddings.
    ref_n = ref_img / np.linalg.norm(ref_img, axis=-1, keepdims=True)
    txt_n = ref_txt / np.linalg.norm(ref_txt, axis=-1, keepdims=True)
    ref_cos = (ref_n * txt_n).sum(-1)
    cos = scorer.cosines(images, captions)
    err_cos = float(np.max(np.abs(cos - ref_cos)))
    print(f"CLIP parity: image embeds {err_img:.2e}, text embeds {err_txt:.2e}, cosines max abs {err_cos:.2e}")
    assert err_img <= 1e-5 and err_txt <= 1e-5 and err_cos <= 1e-5
    assert np.std(cos) > 0.05
    ref_score = max(100 * ref_cos.mean(), 0.0)
    assert abs(cs.clip_score(cos) - ref_score) <= 1e-3
    # Random weights give cosines of either sign: check the clamp on both sides too.
    assert cs.clip_score(np.array([0.3, 0.1])) == pytest.approx(20.0)
    assert cs.clip_score(np.array([-0.5, 0.2])) == 0.0


def test_clip_loader_is_strict(clip_folder, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = clip_folder[0]
    tensors = load_file(str(folder / "model.safetensors"))
    cases = {
        "missing visual_projection": {k: v for k, v in tensors.items() if k != "visual_projection.weight"},
        "unexpected tensors vision_model.encoder.layers.5": {
            **tensors,
            "vision_model.encoder.layers.5.mlp.fc1.bias": np.zeros(3, np.float32),
        },
        "shape mismatches": {**tensors, "vision_model.pre_layrnorm.weight": np.ones(7, np.float32)},
    }
    for message, bad in cases.items():
        target = tmp_path / message.split()[0]
        shutil.copytree(folder, target)
        save_file(bad, str(target / "model.safetensors"))
        with pytest.raises(cs.CLIPScoreError, match=message):
            cs.load_clip_vision(target)
    text_only = tmp_path / "text-only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(cs.CLIPScoreError, match="expected a full CLIP model"):
        cs.load_clip_vision(text_only)


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def ref_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "refs"
    folder.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square", "a green cat"]):
        Image.fromarray(_images(1, 40, 52, seed=i)[0]).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_bad_input_is_one_line(tmp_path, ref_folder, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    weights = tmp_path / "inception.safetensors"
    weights.write_bytes(b"not safetensors")
    base = ["--workdir", str(workdir)]
    cases = [
        (["--fid", "--data", str(ref_folder)], "--fid needs --inception"),
        (["--fid", "--data", str(ref_folder), "--inception", str(tmp_path / "nope.safetensors")], "not found"),
        (["--fid", "--data", str(empty), "--inception", str(weights)], "no captioned images"),
        (["--fid", "--data", str(tmp_path / "nowhere"), "--inception", str(weights)], "is not a folder"),
        (["--fid", "--inception", str(weights)], "--data"),
        (["--clip-score", "--data", str(ref_folder)], "--clip-score needs --clip"),
        (["--clip-score", "--data", str(ref_folder), "--clip", str(tmp_path)], "without config.json"),
    ]
    for args, message in cases:
        assert cli.main(base + args) == 2, args
        assert message in _one_error_line(capsys), args
    assert cli.main(["--fid", "--data", str(ref_folder), "--inception", str(weights)]) == 2
    assert "--workdir" in _one_error_line(capsys)
    # Past the flag checks: an unreadable weights file fails before the run is loaded.
    assert cli.main(base + ["--fid", "--data", str(ref_folder), "--inception", str(weights)]) == 2
    assert "not a readable safetensors" in _one_error_line(capsys)
    assert list(workdir.iterdir()) == []  # nothing written


class _FakePipeline:
    """Stands in for a trained run: `generate` draws seeded images (the CLI's plumbing is under test)."""

    config = {"image_size": 80}

    def generate(self, prompts, *, steps, cfg, seed, sampler):
        return _images(len(prompts), 80, 80, seed=1000 + seed)

    def resolve_sampler(self, sampler, steps):
        return sampler or "euler"


def test_cli_fid_and_clip_score_on_a_run(tmp_path, ref_folder, clip_folder, inception_pair, monkeypatch, capsys):
    from microforge_jax import pipeline

    monkeypatch.setattr(pipeline.MicroForgePipeline, "from_run", classmethod(lambda cls, w: _FakePipeline()))
    monkeypatch.setattr(fid, "InceptionFeatures", functools.partial(fid.InceptionFeatures, batch_size=2, size=75))
    workdir = tmp_path / "run"
    workdir.mkdir()
    _, weights, _ = inception_pair
    args = ["--workdir", str(workdir), "--data", str(ref_folder), "--seeds", "2", "--steps", "3"]
    args += ["--fid", "--inception", str(weights), "--clip-score", "--clip", str(clip_folder[0])]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "CLIP score" in out
    result = json.loads((workdir / "fid_clip.json").read_text())
    assert result["num_reference"] == 3 and result["num_generated"] == 6
    assert [r["seed"] for r in result["per_seed"]] == [0, 1]
    assert result["fid"] > 0 and all(r["fid"] > 0 for r in result["per_seed"])
    assert result["per_seed"][0]["fid"] != result["per_seed"][1]["fid"]
    # The reported CLIP score is the one of the generated images with their captions.
    scorer = cs.CLIPScorer(clip_folder[0])
    captions = ["a red circle", "a blue square", "a green cat"]
    seed0 = cs.clip_score(
        scorer.cosines(_FakePipeline().generate(captions, steps=3, cfg=4, seed=0, sampler=None), captions)
    )
    assert result["per_seed"][0]["clip_score"] == pytest.approx(seed0, abs=1e-6)
    assert result["clip_score_reference"] is not None
