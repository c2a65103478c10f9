"""What several test files share: the tiny nano-based training config."""

from microforge_jax.config import load_config

TINY = (
    "image_size=32",
    "model.latent_channels=4",
    "model.vae.channels=(8,16)",
    "train.vae.pretrained=",  # train the tiny VAE (the shipped nano weights do not fit it)
    "model.vae.downsample_factor=4",
    "model.backbone.depth=2",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=1",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.text.max_length=40",
    "train.vae.disc_start=1",
    "train.vae.disc_channels=8",
    "train.vae.scale_batches=1",
    "log_every=1",
    "checkpoint_every=2",
    "sample_steps=2",
    "eval_batches=1",
    "final_eval.num=0",  # nano ends with a 200-prompt ShapesEval; the curriculum test asks for a small one
)


def tiny_config(*overrides, steps=2, batch=8):
    """nano with TINY, `steps` and `batch` for the vae, flow and edit stages, then `overrides`."""
    per_stage = [
        f"train.{s}.{k}={v}" for s in ("vae", "flow", "edit") for k, v in (("steps", steps), ("batch_size", batch))
    ]
    return load_config("nano", TINY + tuple(per_stage) + tuple(overrides))
