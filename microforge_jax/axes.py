"""Logical axis names: every parameter and every block boundary is annotated with these.

Model code only ever names these logical axes; which mesh axis (`data`, `fsdp`, `tensor`) each
one maps to is a choice of the config (`config.sharding.rules`), applied in `sharding.py`.
"""

# Activations.
BATCH = "batch"
LENGTH = "length"  # token sequence (image tokens, text tokens, plan tokens)
HEIGHT = "height"
WIDTH = "width"
ACT_EMBED = "act_embed"  # the model width of activations

# Parameters.
EMBED = "embed"  # model width (rows of most dense kernels)
MLP = "mlp"  # hidden width of FFNs, the SSM's inner width
HEADS = "heads"  # attention heads
KV = "kv"  # width of one head
STATE = "state"  # SSM state size N
RANK = "rank"  # SSM dt rank
VOCAB = "vocab"
NORM = "norm"  # scales and biases of normalisation layers
CONV_H = "conv_h"
CONV_W = "conv_w"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
TOKENS = "tokens"  # learned token tables: plan tokens, task and segment embeddings, positions

ALL = (
    BATCH,
    LENGTH,
    HEIGHT,
    WIDTH,
    ACT_EMBED,
    EMBED,
    MLP,
    HEADS,
    KV,
    STATE,
    RANK,
    VOCAB,
    NORM,
    CONV_H,
    CONV_W,
    CONV_IN,
    CONV_OUT,
    TOKENS,
)
