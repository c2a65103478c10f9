"""MicroForge-nano: the CPU default, 64 px on the built-in shapes world with an f4 VAE and 2x2 patches.

    python train.py

(the same as `python train.py --config configs/nano.py --workdir runs/nano`). The VAE starts from the
weights shipped in `microforge_jax/assets/nano_vae.safetensors` (trained once by this config's own VAE
stage, 4,000 steps; `train.vae.pretrained=` trains it instead), so the ~20 CPU minutes go to the
flow. Results and timings: README.md and BENCHMARKS.md ("The default run"); trials behind each value:
docs/experiments.md.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "nano"
    c.image_size = 64
    # VAE: f4 -> a 16x16x4 latent; the backbone takes 2x2 patches of it, so it still sees 8x8 = 64
    # tokens. An f8 latent cell holds a whole 10-pixel object: its shapes do not survive the VAE.
    c.model.latent_channels = 4
    c.model.vae.channels = (16, 32, 64)
    c.model.vae.downsample_factor = 4
    c.model.vae.encoder_blocks = 1
    c.model.vae.decoder_blocks = 1
    c.model.backbone.patch_size = 2
    c.model.backbone.depth = 4
    c.model.backbone.dim = 128
    # AdaLN-Group: the base's group of 6 exceeds nano's depth, so the four blocks share one modulation
    # MLP and differ by their learned offsets; groups of 2 measured no better (docs/experiments.md).
    # The text cross-attention gates start open: zero-initialised they barely open in a short run.
    c.model.backbone.cross_gate_init = 1.0
    c.model.planner.num_tokens = 8
    c.model.planner.depth = 1
    c.model.text.encoder = "minilm"
    c.model.text.embed_dim = 384
    c.model.text.max_length = 40  # the longest shapes caption is 39 MiniLM tokens

    c.log_every = 25
    c.checkpoint_every = 200
    c.sample_steps = 16
    c.final_eval.num = 200  # `python train.py` ends with the ShapesEval table

    v = c.train.vae
    v.pretrained = "nano"  # the shipped weights of the stage below; "" trains it (~14 min on 2 cores)
    v.steps = 4000
    v.batch_size = 16
    v.lr = 2e-3
    v.warmup_steps = 50
    v.ema_decay = 0.99
    v.gan_weight = 0.0  # the GAN term cost 5 dB of PSNR and made each step 2.5x slower at this size

    f = c.train.flow
    f.steps = 1300  # what fits the 20-minute budget on a 2-core CPU once the VAE is shipped
    f.batch_size = 32
    f.lr = 2e-3
    f.warmup_steps = 50
    f.objects_p = (0.7, 0.2, 0.1)  # 1, 2, 3 objects: one-object captions bind colour and shape unambiguously
    # The loss weighs the grid cells the caption places objects in by 4 (a uniform loss is mostly
    # background), and training times lean to the noise (logit-normal mean 0.5), where layout and
    # shape are decided.
    f.object_cell_weight = 4.0
    f.time_mean = 0.5
    f.ema_decay = 0.995

    e = c.train.edit
    e.steps = 100
    e.batch_size = 16
    # 1e-4: the edit stage's weights are also the sampler's; at 3e-4 it cost generation 17 points of position.
    e.lr = 1e-4
    e.warmup_steps = 50
    e.ema_decay = 0.995
    return c
