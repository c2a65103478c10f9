"""MicroForge-small (the original design's 77M VAE + 29M backbone), 256-512 px on one accelerator.

python train.py --config configs/small.py --workdir runs/small model.text.path=/path/to/clip
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "small"
    c.model.latent_channels = 32
    c.model.vae.channels = (64, 128, 256, 512)
    c.model.vae.decoder_blocks = 2
    c.model.backbone.depth = 12
    c.model.backbone.dim = 384
    return c
