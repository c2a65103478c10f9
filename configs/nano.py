"""MicroForge-nano: the CPU default, 64 px on the built-in shapes world with an f8 VAE.

    python train.py

(the same as `python train.py --config configs/nano.py --workdir runs/nano`)
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "nano"
    c.image_size = 64
    c.model.latent_channels = 8
    c.model.vae.channels = (32, 64, 128)
    c.model.vae.downsample_factor = 8  # 64 px -> an 8x8 latent grid
    c.model.vae.encoder_blocks = 1
    c.model.vae.decoder_blocks = 1
    c.model.backbone.depth = 4
    c.model.backbone.dim = 128
    c.model.planner.num_tokens = 8
    c.model.planner.depth = 1
    c.model.text.encoder = "minilm"
    c.model.text.embed_dim = 384
    c.model.text.max_length = 40  # the longest shapes caption is 39 MiniLM tokens
    return c
