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
    v.channels = (128, 256, 512, 512)  # stage widths, shallow to deep (the original design's lists)
    v.downsample_factor = 32  # spatial compression; the last width repeats for extra stages
    v.encoder_blocks = 1  # residual blocks per encoder stage
    v.decoder_blocks = 3  # residual blocks per decoder stage (the original design's sizes: 110M for base)
    v.scaling_factor = 1.0  # latent scale, measured after the VAE stage: z' = (z - shift) * scale
    v.shift_factor = 0.0  # latent shift, measured after the VAE stage
    # "dc": the deep-compression VAE above; "pixel": no autoencoder, the flow runs on the image itself
    # (then downsample_factor = 1, latent_channels = 3, and backbone.patch_size does the compression)
    v.kind = "dc"

    m.backbone = b = ml_collections.ConfigDict()
    b.depth = 18  # number of SSM-Conv hybrid blocks
    b.dim = 512  # token width D
    b.patch_size = 1  # latent cells per token side (DiT patchify): (h / p) x (w / p) tokens of p*p*C values
    b.head_dim = 64  # width of one attention head (cross-attention, SharedMQA, planner)
    b.ffn_expand = 3  # FFN hidden width = ffn_expand * dim
    b.ssm_expand = 2  # BiSSM inner width = ssm_expand * dim
    b.ssm_state = 16  # SSM state size N
    b.dt_rank = 0  # rank of the dt projection; 0 means ceil(dim / 16)
    b.conv_kernel = 3  # depthwise conv on the token grid (kernel x kernel)
    b.scan_impl = "auto"  # "auto" (by backend), "associative", "chunked", "sequential", "native" (CPU), "pallas"
    b.scan_chunk = 8  # chunk length of the chunked scan (8 measured best on a 2-core CPU)
    b.shared_attn_every = 3  # apply the one SharedMQA block after every k blocks
    b.adaln_group_size = 6  # blocks sharing one AdaLN modulation MLP (AdaLN-Group); each adds an offset
    b.pos_embed = "sincos"  # "sincos" (2-D, any grid size) or "none"
    # Editing: the source half's positions, "grid" (columns w..2w-1) or "aligned" (the target's own)
    b.source_positions = "grid"
    # Editing: a zero-initialised linear path from source token (i, j) to target token (i, j), beside
    # the width concatenation (copying no longer has to cross w tokens)
    b.source_skip = False
    # Initial value of the per-block cross-attention gates (0: shut at init, as DiT's zero-init
    # residual gates; 1: open, as PixArt's ungated cross-attention). Only the initialisation.
    b.cross_gate_init = 0.0
    b.shared_gate_init = 0.0  # the same for the shared self-attention block's gate
    # "velocity": the network predicts v = eps - x0; "x": it predicts the clean latent x0 and the
    # backbone returns (z_t - x0) / max(t, 0.05), so losses and samplers are unchanged (JiT: with large
    # pixel patches, predicting the clean image is what works)
    b.prediction = "velocity"
    # With prediction "x" and a source (edit / inpaint / SR): the clean target is predicted as source +
    # the network's output, so copying the unedited rest of the image is the zero output
    b.source_residual = False
    # Ablations (numbered as in the original design).
    b.use_planner = True  # A1: False removes the Recurrent Latent Planner
    b.mixer = "bissm"  # A2: "attention" replaces the BiSSM by full self-attention
    b.use_shared_attn = True  # A3: False removes the SharedMQA block
    b.use_dwconv = True  # A4: False removes the depthwise conv in the BiSSM
    b.adaln = "group"  # A6: "full" gives every block its own modulation MLP
    b.remat = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more compute

    m.planner = p = ml_collections.ConfigDict()
    p.num_tokens = 32  # K plan tokens of the backbone's width
    p.depth = 2  # READ (cross-attention) + REASON (self-attention) layers per step
    p.diversity_weight = 0.01  # diversity loss on plan tokens (against planner collapse)
    p.patch_size = 1  # latent cells per token side the planner READs (pixel space: the backbone's patch)

    m.text = t = ml_collections.ConfigDict()
    t.encoder = "clip"  # "minilm" (offline default), "clip", "bert" or "simple"
    t.path = ""  # a Hugging Face folder; "" means the default for the encoder (MiniLM built in)
    t.embed_dim = 768  # width of the text tokens the backbone receives (768: CLIP-L)
    t.max_length = 77  # prompts are truncated to this many tokens (with one warning)
    t.simple_layers = 2  # SimpleTextEncoder depth (encoder == "simple")

    # ----------------------------------------------------------------------------- data
    c.data = d = ml_collections.ConfigDict()
    d.source = "shapes"  # "shapes" (the built-in procedural world) or "folder" (images + captions at data.path)
    d.path = ""  # the folder: images + metadata.jsonl (file_name, text) or a <image>.txt caption each
    d.seed = 0  # which scenes exist (the world's seed), independent of the shuffle seed
    d.worker_count = 0  # Grain worker processes (0: read in the training process)

    # ----------------------------------------------------------------------------- training
    # The stages run in order; each resumes from its own checkpoints in the work directory.
    c.stages = ("vae", "flow", "edit")  # with data.source="folder" the edit stage is skipped (no edit pairs)
    c.init_from = ""  # another run: flow/edit start from its denoiser EMA (and, with no "vae" stage, use its VAE)
    c.log_every = 50  # steps between metric lines (metrics.jsonl, TensorBoard, progress bar)
    c.checkpoint_every = 1000  # steps between checkpoints (and one at the end of each stage)
    # Multi-host: steps between the processes' agreement on a SIGTERM (a 4-byte all-gather); a
    # preempted run stops within this many steps, so keep steps x this under the grace period
    c.stop_check_every = 10
    c.eval_every = 0  # steps between validation losses (val/loss, val/loss_t0.5, ...); 0: only at the end
    c.eval_batches = 2  # held-out batches (fixed noise, t in 0.1 ... 0.9) in each validation loss
    c.sample_every = 0  # steps between sample grids written to samples/<stage>_<step>.png (0: only at the end)
    c.sample_steps = 16  # Euler steps of those grids
    c.sample_cfg = 3.0  # guidance scale of those grids
    c.sample_vae_tile = 0  # VAE decode in overlapping tiles of this many latent cells (less memory); 0: whole latent
    # Compile the sampler for a lower peak on CPU (sampling.LOW_MEMORY_COMPILER_OPTIONS; ignored on GPU/TPU):
    # bit-identical images, the same speed and compile time (BENCHMARKS.md, `bench.memory`); runs saved
    # before it became the default keep False.
    c.sample_low_memory = True
    # ShapesEval of the finished run (held-out prompts, VAE PSNR, recolour edits; eval.json);
    # num = 0 turns it off. The same as `python -m microforge_jax.eval --workdir DIR`.
    c.final_eval = fe = ml_collections.ConfigDict()
    fe.num = 0  # held-out prompts to generate and score
    fe.steps = 25  # sampling steps
    fe.cfg = 4.0  # guidance scale
    fe.edits = 64  # recolour edits to score (0: none)

    c.train = tr = ml_collections.ConfigDict()
    tr.vae = v = ml_collections.ConfigDict()
    v.steps = 50_000
    v.batch_size = 32  # global batch, split over processes and the mesh's batch axes
    v.grad_accum = 1  # micro-batches per step (gradients summed in the step): same update, 1/n activation memory
    v.lr = 1e-4
    v.warmup_steps = 1000
    v.weight_decay = 0.0
    v.grad_clip = 2.0
    v.ema_decay = 0.999
    v.l1_weight = 1.0
    v.kl_weight = 1e-6  # small: a KL too strong blurs the VAE (a failure mode the original design names)
    # "gradient": multi-scale image-gradient L1, a substitute (LPIPS needs VGG weights we cannot fetch);
    # "lpips": LPIPS-VGG from lpips_weights (one safetensors file; see microforge_jax/lpips.py)
    v.perceptual = "gradient"
    v.lpips_weights = ""  # path of the LPIPS-VGG safetensors file (python -m microforge_jax.lpips --convert ...)
    v.perceptual_weight = 0.5
    v.gan_weight = 0.1  # hinge GAN with a patch discriminator, after disc_start steps
    v.disc_start = 10_000
    v.disc_lr = 1e-4
    v.disc_channels = 64
    v.scale_batches = 8  # batches encoded after the stage to measure the latent scale/shift
    # Start from trained VAE weights instead of training: a safetensors file written by
    # `python -m microforge_jax.vae_weights`, or "nano" (shipped in microforge_jax/assets/). The stage
    # saves them as its finished checkpoint (with their latent scale/shift); "": train the VAE.
    v.pretrained = ""

    tr.flow = f = ml_collections.ConfigDict()
    f.steps = 100_000
    f.batch_size = 32
    f.grad_accum = 1  # micro-batches per step; batch_size must split into them
    f.lr = 1e-4
    f.warmup_steps = 1000
    f.weight_decay = 0.01
    f.grad_clip = 2.0  # clip by global norm (one of the original design's failure-mode fixes)
    f.ssm_lr_mult = 0.5  # a separate (lower) learning rate for the SSM parameters (the original design's fix)
    f.ema_decay = 0.999
    f.time_sampling = "logit_normal"  # "uniform" or "logit_normal"
    f.time_mean = 0.0
    f.time_std = 1.0
    f.time_shift = 1.0  # resolution shift s t / (1 + (s - 1) t); > 1 for larger images
    f.caption_dropout = 0.1  # the empty prompt instead of the caption, for guidance
    f.self_cond_prob = 0.5  # planner self-conditioning (RIN): share of the batch given a previous plan
    f.text_cache = True  # encode each unique caption once (frozen encoders only)
    # Shapes world only: probabilities of training scenes with 1, 2, 3 objects (the world's own mix
    # by default; validation always uses it). More single-object scenes teach colour/shape binding faster.
    f.objects_p = (0.4, 0.35, 0.25)
    # Keep the frozen VAE's posterior (mean, logvar) of each training image on the host and sample from it
    # each step: skips the encoder from the 2nd epoch of a finite dataset (the shapes world never repeats)
    f.cache_latents = False
    # Shapes world only: loss weight of the latent positions inside the 3x3-grid cells that the
    # caption places objects in (1 = uniform). Objects cover a few percent of the latent, so the
    # uniform loss is mostly background; the weight depends on the caption alone, so it keeps the
    # conditional flow's minimiser.
    f.object_cell_weight = 1.0
    # Shapes world only: attribute alignment (REPA-style, with the world's free labels as the teacher):
    # a training-only probe on the tokens after block `attribute_block` predicts the shape and colour of
    # the object in each token's 3x3-grid cell; its cross-entropy times this weight joins the loss
    # (0: off). It puts shape, which moves few pixels of the flow loss, into the backbone's features.
    f.attribute_weight = 0.0
    f.attribute_block = 1

    # The high-resolution flow (opt-in: add "flow_hr" after "flow" in `stages`): the text -> image
    # flow again at `image_size`, starting from the flow stage's weights (positions and scan paths work
    # at any token grid), as the original curriculum's stage 3. Its own copy of the flow section's keys.
    tr.flow_hr = fh = ml_collections.ConfigDict(f.to_dict())
    fh.image_size = 512  # pixels; a multiple of the VAE factor x patch size
    fh.steps = 20_000
    fh.lr = 5e-5
    fh.warmup_steps = 500
    fh.time_shift = 3.0  # more noise at the higher resolution (the resolution shift)

    tr.edit = e = ml_collections.ConfigDict()
    e.steps = 20_000
    e.batch_size = 32
    e.grad_accum = 1  # micro-batches per step
    e.lr = 1e-5  # all parameters at a low learning rate (the original design's curriculum)
    e.warmup_steps = 500
    e.weight_decay = 0.01
    e.grad_clip = 2.0
    e.ssm_lr_mult = 0.5
    e.ema_decay = 0.999
    e.time_sampling = "logit_normal"
    e.time_mean = 0.0
    e.time_std = 1.0
    e.time_shift = 1.0
    e.caption_dropout = 0.1
    e.self_cond_prob = 0.5
    e.text_cache = True
    e.task_weights = (1.0, 1.0, 1.0)  # edit, inpaint, sr
    # Weight of a text-to-image loss on the same step's targets under their captions (0: off), against
    # forgetting generation while all weights fine-tune on edits. Nano (100 edit steps, weight 0.5)
    # measured no gain over 0 (docs/experiments.md, "Editing"); meant for long edit stages.
    e.generate_weight = 0.0

    # Stage 4 (opt-in: add "distill" to `stages`): text -> image flow training plus a distillation
    # term, L_flow + weight * w(t) * ||v_student - v_teacher||^2 (microforge_jax/distill.py).
    tr.distill = ds = ml_collections.ConfigDict()
    ds.teacher = ""  # another run's directory (a larger backbone, same VAE + text encoder); "": this run's own EMA
    ds.weight = 1.0  # lambda of the distillation term (0: plain flow training)
    ds.steps = 10_000
    ds.batch_size = 32
    ds.grad_accum = 1  # micro-batches per step
    ds.lr = 2e-5  # the student starts from this run's flow/edit weights (when it has them)
    ds.warmup_steps = 500
    ds.weight_decay = 0.01
    ds.grad_clip = 2.0
    ds.ssm_lr_mult = 0.5
    ds.ema_decay = 0.999
    ds.time_sampling = "logit_normal"
    ds.time_mean = 0.0
    ds.time_std = 1.0
    ds.time_shift = 1.0
    ds.caption_dropout = 0.1  # the teacher sees the same (dropped) caption as the student
    ds.self_cond_prob = 0.5
    ds.text_cache = True

    # Stage 6 (opt-in: add "consistency" to `stages`): few-step (consistency) distillation,
    # ||f_theta(z_t, t) - sg f_ema(z_t', t')||^2 with f(z, t) = z - t v and z_t' one Euler step of the
    # frozen teacher from t to t'; sampled with `sample.py --steps 1|2|4 --sampler consistency`.
    tr.consistency = cs = ml_collections.ConfigDict()
    cs.teacher = ""  # another run's directory; "": this run's latest distill/edit/flow EMA, frozen
    cs.num_scales = 16  # N: t = n/N (shifted), t' = (n-1)/N; a multiple of 4 puts 1/2/4-step samplers on the grid
    cs.teacher_cfg = 1.0  # guidance of the teacher's ODE step (guided distillation: then sample with --cfg 1); 1: off
    cs.steps = 5_000
    cs.batch_size = 32
    cs.grad_accum = 1  # micro-batches per step
    cs.lr = 1e-5
    cs.warmup_steps = 200
    cs.weight_decay = 0.01
    cs.grad_clip = 2.0
    cs.ssm_lr_mult = 0.5
    cs.ema_decay = 0.995  # the EMA is both the target theta- and the weights sampling uses
    cs.time_shift = 1.0  # shift of the t grid (training and the few-step sampler's default)
    cs.caption_dropout = 0.1  # also learns the unconditional consistency function (for guidance)
    cs.self_cond_prob = 0.5
    cs.text_cache = True
    cs.sample_steps = 2  # consistency-sampler steps of the stage's sample grids

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
