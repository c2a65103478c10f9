"""LPIPS: parity with an independent PyTorch LPIPS, its properties, the weights file, the VAE step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny_config as _config
from safetensors.torch import save_file

from microforge_jax import lpips
from microforge_jax.config import ConfigError

SIZE = 64


class _NetLin(torch.nn.Module):
    """lpips.NetLinLayer: dropout, then a bias-free 1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))


class TorchLPIPS(torch.nn.Module):
    """The lpips package's LPIPS(net="vgg", version="0.1") forward, written out with torch.nn (NCHW)."""

    def __init__(self):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
        layers, cin = [], 3
        for v in cfg:  # torchvision's vgg16().features, so the state dict keys are features.N.*
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU(inplace=False)]
                cin = v
        self.features = torch.nn.Sequential(*layers)
        for i, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", _NetLin(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None], persistent=False)

    def forward(self, x, y):
        def taps(h):
            h = (h - self.shift) / self.scale
            out = []
            for lo, hi in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):  # relu1_2 ... relu5_3
                h = self.features[lo:hi](h)
                out.append(h)
            return out

        norm = lambda f: f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)
        total = 0
        for i, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
            d = (norm(a) - norm(b)) ** 2
            total = total + getattr(self, f"lin{i}").model(d).mean(dim=(2, 3), keepdim=True)
        return total.reshape(-1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A TorchLPIPS with random (He-normal, so deep features keep their scale) weights, and its file."""
    torch.manual_seed(0)
    model = TorchLPIPS().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lin"):
                p.copy_(torch.rand_like(p))  # non-negative heads
            elif name.endswith("weight"):
                torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.double(), path


@pytest.fixture(scope="module")
def flax_lpips(reference):
    _, path = reference
    params = lpips.load_weights(path)
    module = lpips.LPIPS()
    return jax.jit(lambda x, y: module.apply(params, x, y)), params


def _images(seed: int, n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth-ish images in [-1, 1]: upsampled noise, so the deep layers see structure.
    low = rng.uniform(-1, 1, (n, SIZE // 8, SIZE // 8, 3))
    return np.clip(np.repeat(np.repeat(low, 8, 1), 8, 2) + 0.2 * rng.standard_normal((n, SIZE, SIZE, 3)), -1, 1)


def test_lpips_matches_a_pytorch_reference(reference, flax_lpips, relerr):
    model, _ = reference
    fn, params = flax_lpips
    x, y = _images(1, 3), _images(2, 3)
    got = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # NHWC -> NCHW, float64
    x_t = to_torch(x).requires_grad_(True)
    want_t = model(x_t, to_torch(y))
    want_t.sum().backward()
    want, want_grad = want_t.detach().numpy(), x_t.grad.numpy().transpose(0, 2, 3, 1)
    assert got.shape == (3,) and np.all(want > 0) and np.std(want) > 0  # non-degenerate distances
    # The gradient the VAE's decoder receives: d sum(LPIPS) / d x.
    grad = jax.jit(jax.grad(lambda a, b: jnp.sum(lpips.LPIPS().apply(params, a, b))))
    got_grad = np.asarray(grad(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    err, grad_err = relerr(got, want), relerr(got_grad, want_grad)
    print(f"\nLPIPS Flax fp32 vs PyTorch fp64, normwise: distances {err:.2e}, gradients {grad_err:.2e}; d = {want}")
    assert err <= 1e-5 and grad_err <= 1e-5


def test_lpips_is_zero_on_equal_images_and_grows_with_noise(flax_lpips):
    fn, _ = flax_lpips
    x = _images(3, 2)
    noise = np.random.default_rng(4).standard_normal(x.shape)
    dist = lambda s: float(np.mean(fn(jnp.asarray(x, jnp.float32), jnp.asarray(x + s * noise, jnp.float32))))
    d = [dist(s) for s in (0, 0.05, 0.2, 0.5)]
    assert d[0] <= 1e-9 * d[1]  # zero up to rounding (x and y ride in one batch through the VGG)
    assert d[1] > 0 and d[1] < d[2] < d[3], d


def test_weights_file_keys_converter_and_errors(reference, flax_lpips, tmp_path):
    model, path = reference
    _, params = flax_lpips
    state = {k: v.float() for k, v in model.state_dict().items()}
    vgg = {k: v for k, v in state.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has the classifier too: dropped
    lin = {k: v for k, v in state.items() if k.startswith("lin")}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    out = tmp_path / "out.safetensors"
    assert lpips.main(["--convert", str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(out)]) == 0
    converted = lpips.load_weights(out)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert sorted(lpips.expected_shapes()) == sorted(k for k in state)  # the documented key list

    with pytest.raises(ConfigError, match="needs train.vae.lpips_weights"):
        lpips.load_weights("")
    with pytest.raises(ConfigError, match="does not exist"):
        lpips.load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        lpips.load_weights(tmp_path / "junk.safetensors")
    vgg_only = {k: v.contiguous() for k, v in vgg.items() if k.startswith("features.")}
    save_file(vgg_only, str(tmp_path / "vgg_only.safetensors"))
    with pytest.raises(ConfigError, match=r"lack 5 of 31 keys, e.g. lin0.model.1.weight"):
        lpips.load_weights(tmp_path / "vgg_only.safetensors")
    negative = {k: v.contiguous() for k, v in state.items()}
    negative["lin2.model.1.weight"] = -negative["lin2.model.1.weight"]
    save_file(negative, str(tmp_path / "negative.safetensors"))
    with pytest.raises(ConfigError, match="lin2.model.1.weight has negative entries"):
        lpips.load_weights(tmp_path / "negative.safetensors")


def test_vae_step_with_lpips_has_finite_loss_and_perceptual_gradients(reference, redraw):
    """Only the LPIPS term on (L1, KL and GAN weights 0): its gradient alone moves the VAE."""
    import optax

    from microforge_jax import losses, optim, train_steps
    from microforge_jax.config import ModelConfig
    from microforge_jax.models.vae import build_vae

    _, path = reference
    config = _config(
        "train.vae.perceptual=lpips",
        f"train.vae.lpips_weights={path}",
        "train.vae.l1_weight=0",
        "train.vae.kl_weight=0",
        "train.vae.gan_weight=0",
        "train.vae.warmup_steps=0",
    )
    hp = config.train.vae
    vae = build_vae(ModelConfig.from_config(config))
    disc = losses.PatchDiscriminator(hp.disc_channels)
    tx = optim.make_optimizer(hp)
    image = jnp.asarray(_images(5, 2)[:, :32, :32], jnp.float32)
    params = redraw(jax.jit(vae.init)(jax.random.key(0), image), seed=0)
    disc_params = jax.jit(disc.init)(jax.random.key(1), image)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": params,
        "opt_state": tx.init(params),
        "disc_params": disc_params,
        "disc_opt_state": tx.init(disc_params),
    }
    spec = train_steps.VAEStep(vae, disc, tx, tx, hp, lpips=lpips.LPIPS())
    frozen = {"lpips": lpips.load_weights(path)}
    step = jax.jit(lambda s, b, r, f: train_steps.vae_train_step(spec, s, b, r, f))
    new, metrics = step(state, {"image": image}, jax.random.key(2), frozen)
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/perceptual"]) > 0
    assert np.isclose(float(metrics["train/loss"]), hp.perceptual_weight * float(metrics["train/perceptual"]))
    assert float(metrics["train/grad_norm"]) > 0
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new["params"], params))
    assert float(moved) > 0


def test_vae_stage_refuses_a_missing_lpips_file_before_training(tmp_path):
    from microforge_jax import checkpoint, train_lib

    config = _config("stages=('vae',)", "train.vae.perceptual=lpips", f"train.vae.lpips_weights={tmp_path / 'x'}")
    with pytest.raises(ConfigError, match=r"LPIPS weights file .*x does not exist"):
        train_lib.train_and_evaluate(config, tmp_path / "run")
    assert checkpoint.latest_steps(tmp_path / "run") == {}
    assert not (tmp_path / "run" / "checkpoints").exists()
    config = _config("stages=('vae',)", "train.vae.perceptual=vgg")
    with pytest.raises(ConfigError, match="perceptual must be one of gradient, lpips"):
        train_lib.train_and_evaluate(config, tmp_path / "run2")
