"""MicroForge-tiny (the original design's 16M VAE + 8M backbone), the mobile model.

python train.py --config configs/tiny.py --workdir runs/tiny
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "tiny"
    c.model.latent_channels = 16
    c.model.vae.channels = (32, 64, 128, 256)
    c.model.vae.decoder_blocks = 1
    c.model.backbone.depth = 6
    c.model.backbone.dim = 256
    c.model.text.encoder = "minilm"
    c.model.text.embed_dim = 384
    return c
