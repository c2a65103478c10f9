"""MicroForge-base: every key of a MicroForge-JAX config, declared and commented here.

    python train.py --config configs/base.py --workdir runs/base

The other configs (`nano`, `tiny`, `small`) call `get_config()` from this file and override a
few keys. Any key can be overridden on the command line, typed by its declared value:

    python train.py --config configs/tiny.py model.backbone.depth=4 batch_size=16
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.image_size = 256  # training resolution in pixels (square); a multiple of the VAE factor

    # ----------------------------------------------------------------------------- model
    c.model = m = ml_collections.ConfigDict()
    m.dtype = "float32"  # compute dtype of activations; "bfloat16" on TPU/GPU
    m.param_dtype = "float32"  # parameters (and optimizer state) stay fp32
    m.latent_channels = 32  # C of the VAE latent

    m.vae = v = ml_collections.ConfigDict()
    v.channels = (128, 256, 512, 512)  # stage widths, shallow to deep (the seed's lists)
    v.downsample_factor = 32  # spatial compression; the last width repeats for extra stages
    v.encoder_blocks = 1  # residual blocks per encoder stage
    v.decoder_blocks = 3  # residual blocks per decoder stage (the seed's sizes: 110M for base)
    v.scaling_factor = 1.0  # latent scale, measured after the VAE stage: z' = (z - shift) * scale
    v.shift_factor = 0.0  # latent shift, measured after the VAE stage

    m.backbone = b = ml_collections.ConfigDict()
    b.depth = 18  # number of SSM-Conv hybrid blocks
    b.dim = 512  # token width D
    b.head_dim = 64  # width of one attention head (cross-attention, SharedMQA, planner)
    b.ffn_expand = 3  # FFN hidden width = ffn_expand * dim
    b.ssm_expand = 2  # BiSSM inner width = ssm_expand * dim
    b.ssm_state = 16  # SSM state size N
    b.dt_rank = 0  # rank of the dt projection; 0 means ceil(dim / 16)
    b.conv_kernel = 3  # depthwise conv on the token grid (kernel x kernel)
    b.scan_impl = "auto"  # "auto" (by backend), "associative", "chunked" or "sequential"
    b.scan_chunk = 32  # chunk length of the chunked scan
    b.shared_attn_every = 3  # apply the one SharedMQA block after every k blocks
    b.adaln_group_size = 3  # blocks sharing one AdaLN modulation MLP (AdaLN-Group)
    b.pos_embed = "sincos"  # "sincos" (2-D, any grid size) or "none"
    # Ablations from the seed (section 10).
    b.use_planner = True  # A1: False removes the Recurrent Latent Planner
    b.mixer = "bissm"  # A2: "attention" replaces the BiSSM by full self-attention
    b.use_shared_attn = True  # A3: False removes the SharedMQA block
    b.use_dwconv = True  # A4: False removes the depthwise conv in the BiSSM
    b.adaln = "group"  # A6: "full" gives every block its own modulation MLP

    m.planner = p = ml_collections.ConfigDict()
    p.num_tokens = 32  # K plan tokens of the backbone's width
    p.depth = 2  # READ (cross-attention) + REASON (self-attention) layers per step
    p.diversity_weight = 0.01  # diversity loss on plan tokens (against planner collapse)

    m.text = t = ml_collections.ConfigDict()
    t.encoder = "clip"  # "minilm" (offline default), "clip", "bert" or "simple"
    t.path = ""  # a Hugging Face folder; "" means the default for the encoder (MiniLM built in)
    t.embed_dim = 768  # width of the text tokens the backbone receives (768: CLIP-L)
    t.max_length = 77  # prompts are truncated to this many tokens (with one warning)
    t.simple_layers = 2  # SimpleTextEncoder depth (encoder == "simple")

    # ----------------------------------------------------------------------------- scale-out
    c.sharding = s = ml_collections.ConfigDict()
    # Mesh axes and sizes; one size may be -1 (all remaining devices).
    s.mesh_axes = ("data", "fsdp", "tensor")
    s.mesh_shape = (-1, 1, 1)
    # Logical axis -> mesh axis (or axes, or None). Unlisted logical axes are replicated.
    s.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
    )
    return c
