"""Flax text encoders: one transformer for the BERT and CLIP-text families, and `SimpleTextEncoder`.

transformers v5 ships no Flax models, so these mirror `BertModel` and `CLIPTextModel` exactly (the
parity tests compare them with PyTorch) and load Hugging Face checkpoints through
`microforge_jax.text`. `SimpleTextEncoder` is small, needs no files (a byte-level tokenizer) and is
the one encoder that trains with the backbone.

Every encoder returns `TextEmbeddings`: the per-token states, their validity mask and one pooled
vector per prompt; that is all the backbone sees of the text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax import axes
from microforge_jax.models import layers

Dtype = Any


class TextEmbeddings(NamedTuple):
    """What a text encoder hands the backbone (a pytree, so it passes through `jit`).

    Attributes:
        tokens_BxMxD: per-token hidden states; zero at padded positions.
        mask_BxM: True where a token is real (not padding).
        pooled_BxD: one vector per prompt (mean over real tokens, or the CLIP end-of-text state).
    """

    tokens_BxMxD: jax.Array
    mask_BxM: jax.Array
    pooled_BxD: jax.Array


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation, `x * sigmoid(1.702 x)` (transformers' `quick_gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


def _tanh_gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=True)


# transformers' ACT2FN names -> functions ("gelu" there is the exact erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": layers.gelu,
    "gelu_python": layers.gelu,
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class TextTransformerConfig:
    """Hyper-parameters of a BERT- or CLIP-text-style encoder (frozen, hashable).

    `family` decides the block layout: "bert" is post-LN, bidirectional, with token-type
    embeddings, an embedding LayerNorm and mean pooling; "clip" is pre-LN, causal, with a final
    LayerNorm and end-of-text pooling; "simple" is pre-LN, bidirectional, final LayerNorm, mean pooling.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    hidden_act: str
    type_vocab_size: int = 0
    eos_token_id: int = -1

    def __post_init__(self):
        if self.family not in ("bert", "clip", "simple"):
            raise ValueError(f"unknown text transformer family {self.family!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> TextTransformerConfig:
        """Reads a transformers `config.json` dict (BERT, CLIP text, or a full CLIP's `text_config`)."""
        model_type = hf.get("model_type")
        if model_type == "clip":  # a full CLIPModel folder: the text tower's config is nested
            hf = {"model_type": "clip_text_model", **hf.get("text_config", {})}
            model_type = "clip_text_model"
        if model_type == "bert":
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError(
                    f"only absolute position embeddings are supported, got {hf['position_embedding_type']!r}"
                )
            return cls(
                family="bert",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                max_positions=hf["max_position_embeddings"],
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                hidden_act=hf.get("hidden_act", "gelu"),
                type_vocab_size=hf.get("type_vocab_size", 2),
            )
        if model_type == "clip_text_model":
            # CLIPTextConfig's defaults, for nested text_configs that only list what differs.
            return cls(
                family="clip",
                vocab_size=hf.get("vocab_size", 49408),
                hidden_size=hf.get("hidden_size", 512),
                num_layers=hf.get("num_hidden_layers", 12),
                num_heads=hf.get("num_attention_heads", 8),
                intermediate_size=hf.get("intermediate_size", 2048),
                max_positions=hf.get("max_position_embeddings", 77),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                hidden_act=hf.get("hidden_act", "quick_gelu"),
                eos_token_id=hf.get("eos_token_id", 49407),
            )
        raise ValueError(f"unsupported model_type {model_type!r}: expected 'bert', 'clip' or 'clip_text_model'")


def _embed(num: int, features: int, names: tuple[str, str], *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Embed:
    """An `nn.Embed` whose table carries logical axes (flax's default N(0,1) is far too large)."""
    init = nn.initializers.normal(stddev=0.02)
    return nn.Embed(
        num, features, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(init, names), name=name,
    )  # fmt: skip


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (BERT and CLIP layout)."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, allowed_BxLxL: jax.Array) -> jax.Array:
        batch, length, dim = x_BxLxD.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = (batch, length, self.num_heads, dim // self.num_heads)
        q = layers.dense(dim, (axes.EMBED, axes.HEADS), name="query", **kw)(x_BxLxD).reshape(shape)
        k = layers.dense(dim, (axes.EMBED, axes.HEADS), name="key", **kw)(x_BxLxD).reshape(shape)
        v = layers.dense(dim, (axes.EMBED, axes.HEADS), name="value", **kw)(x_BxLxD).reshape(shape)
        o_BxLxHxK = layers.dot_product_attention(q, k, v, allowed_BxLxL)
        return layers.dense(dim, (axes.HEADS, axes.EMBED), name="out", **kw)(o_BxLxHxK.reshape(batch, length, dim))


class Mlp(nn.Module):
    """fc1 -> activation -> fc2."""

    hidden: int
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(self.hidden, (axes.EMBED, axes.MLP), name="fc1", **kw)(x_BxLxD)
        h = ACTIVATIONS[self.activation](h)
        return layers.dense(x_BxLxD.shape[-1], (axes.MLP, axes.EMBED), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """One transformer layer: pre-LN (CLIP, simple) or post-LN (BERT)."""

    num_heads: int
    mlp_hidden: int
    activation: str
    pre_ln: bool
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, allowed_BxLxL: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = SelfAttention(self.num_heads, name="attn", **kw)
        mlp = Mlp(self.mlp_hidden, self.activation, name="mlp", **kw)
        norm1 = layers.layer_norm(epsilon=self.layer_norm_eps, name="norm1", **kw)
        norm2 = layers.layer_norm(epsilon=self.layer_norm_eps, name="norm2", **kw)
        if self.pre_ln:
            x_BxLxD = x_BxLxD + attn(norm1(x_BxLxD), allowed_BxLxL)
            return x_BxLxD + mlp(norm2(x_BxLxD))
        x_BxLxD = norm1(x_BxLxD + attn(x_BxLxD, allowed_BxLxL))
        return norm2(x_BxLxD + mlp(x_BxLxD))


def mean_pool(x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Mean over real tokens, in fp32 (sentence-transformers' pooling; the clamp avoids 0/0)."""
    m = mask_BxL.astype(jnp.float32)[..., None]
    total = jnp.sum(x_BxLxD.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def attention_mask(mask_BxL: jax.Array, causal: bool) -> jax.Array:
    """Boolean (B, L, L) mask, True where query l may attend to key s: key is real (and s <= l if causal)."""
    length = mask_BxL.shape[1]
    allowed_BxLxL = jnp.broadcast_to(mask_BxL.astype(bool)[:, None, :], (mask_BxL.shape[0], length, length))
    if causal:
        allowed_BxLxL = allowed_BxLxL & jnp.tril(jnp.ones((length, length), bool))[None]
    return allowed_BxLxL


class TextTransformer(nn.Module):
    """BERT (`BertModel`) or CLIP text (`CLIPTextModel`) encoder; see `TextTransformerConfig`.

    Parameter names (the checkpoint format, mapped from Hugging Face names in `microforge_jax.text`):
    `token_embed`, `position_embed`, `type_embed` + `embed_norm` (BERT), `layers_{i}/{attn,mlp,norm1,norm2}`,
    `final_norm` (CLIP).
    """

    config: TextTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encodes token ids.

        Args:
            ids_BxL: int token ids, right-padded.
            mask_BxL: 1/True for real tokens (the tokenizer's attention mask).

        Returns:
            (hidden_BxLxD, pooled_BxD): the last hidden states (LayerNorm'd at the end for CLIP, like
            transformers' `last_hidden_state`) and the pooled vector (mean over real tokens for BERT,
            the end-of-text state for CLIP, as transformers' `pooler_output`), pooled in fp32.
        """
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = ids_BxL.shape[1]
        if length > c.max_positions:
            raise ValueError(f"sequence length {length} exceeds the encoder's {c.max_positions} positions")
        x_BxLxD = _embed(c.vocab_size, c.hidden_size, (axes.VOCAB, axes.EMBED), name="token_embed", **kw)(ids_BxL)
        pos = _embed(c.max_positions, c.hidden_size, (axes.TOKENS, axes.EMBED), name="position_embed", **kw)
        x_BxLxD = x_BxLxD + pos(jnp.arange(length))[None]
        if c.family == "bert":
            # Single-segment prompts: token type 0 everywhere (what the tokenizer returns for one text).
            types = _embed(c.type_vocab_size, c.hidden_size, (axes.TOKENS, axes.EMBED), name="type_embed", **kw)
            x_BxLxD = x_BxLxD + types(jnp.zeros_like(ids_BxL))
            x_BxLxD = layers.layer_norm(epsilon=c.layer_norm_eps, name="embed_norm", **kw)(x_BxLxD)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        allowed_BxLxL = attention_mask(mask_BxL, causal=c.family == "clip")
        for i in range(c.num_layers):
            x_BxLxD = EncoderLayer(
                c.num_heads, c.intermediate_size, c.hidden_act, pre_ln=c.family != "bert",
                layer_norm_eps=c.layer_norm_eps, name=f"layers_{i}", **kw,
            )(x_BxLxD, allowed_BxLxL)  # fmt: skip
        if c.family != "bert":
            x_BxLxD = layers.layer_norm(epsilon=c.layer_norm_eps, name="final_norm", **kw)(x_BxLxD)
        if c.family == "clip":
            pooled_BxD = x_BxLxD[jnp.arange(x_BxLxD.shape[0]), eos_positions(ids_BxL, c.eos_token_id)]
            pooled_BxD = pooled_BxD.astype(jnp.float32)
        else:
            pooled_BxD = mean_pool(x_BxLxD, mask_BxL)
        return x_BxLxD, pooled_BxD


def eos_positions(ids_BxL: jax.Array, eos_token_id: int) -> jax.Array:
    """Where CLIP pools, exactly as transformers' `CLIPTextTransformer`.

    Configs written before transformers PR #24773 say `eos_token_id == 2`; there the end-of-text
    token is the largest id (argmax of the ids). Otherwise the first occurrence of `eos_token_id`
    (padding may reuse the same id); a row without one pools position 0, as argmax does in torch.
    """
    if eos_token_id == 2:
        return jnp.argmax(ids_BxL, axis=-1)
    return jnp.argmax((ids_BxL == eos_token_id).astype(jnp.int32), axis=-1)


# ----------------------------------------------------------------------------- SimpleTextEncoder

BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
SIMPLE_VOCAB = 259


def byte_tokenize(prompts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """The SimpleTextEncoder tokenizer: UTF-8 bytes between BOS and EOS, right-padded with PAD.

    Over-long prompts keep their first `max_length - 2` bytes, cut back to a character boundary
    so no half character is fed in. `""` becomes `[BOS, EOS, PAD, ...]`.

    Args:
        prompts: the texts.
        max_length: tokens per prompt, BOS and EOS included (>= 2).

    Returns:
        (ids_BxM int32, mask_BxM bool, truncated) where `truncated[i]` says prompt i was cut.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
    ids = np.full((len(prompts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(prompts), max_length), bool)
    truncated = []
    for i, text in enumerate(prompts):
        data = text.encode("utf-8")
        cut = len(data) > max_length - 2
        if cut:
            end = max_length - 2
            while end > 0 and (data[end] & 0xC0) == 0x80:  # data[end] continues a character: back off
                end -= 1
            data = data[:end]
        row = [BOS_ID, *data, EOS_ID]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
        truncated.append(cut)
    return ids, mask, truncated


class SimpleTextEncoder(nn.Module):
    """A small trainable encoder over bytes: learned positions, pre-LN layers, mean pooling.

    Use with `byte_tokenize`; trains jointly with the backbone (init it like any linen module:
    `SimpleTextEncoder(embed_dim=768, num_layers=2).init(rng, ids_BxM, mask_BxM)`).
    """

    embed_dim: int = 768
    num_layers: int = 2
    num_heads: int | None = None  # default: heads of width 64
    max_length: int = 77
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def transformer_config(self) -> TextTransformerConfig:
        return TextTransformerConfig(
            family="simple",
            vocab_size=SIMPLE_VOCAB,
            hidden_size=self.embed_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads or max(1, self.embed_dim // 64),
            intermediate_size=self.mlp_ratio * self.embed_dim,
            max_positions=self.max_length,
            layer_norm_eps=1e-5,  # torch's LayerNorm default, so the PyTorch mirror needs no eps argument
            hidden_act="gelu",
        )

    @nn.compact
    def __call__(self, ids_BxM: jax.Array, mask_BxM: jax.Array) -> TextEmbeddings:
        """Encodes byte ids from `byte_tokenize`.

        Args:
            ids_BxM: int ids, right-padded with PAD_ID.
            mask_BxM: True for real tokens.

        Returns:
            TextEmbeddings, padded positions zeroed.
        """
        hidden_BxMxD, pooled_BxD = TextTransformer(
            self.transformer_config, dtype=self.dtype, param_dtype=self.param_dtype, name="transformer"
        )(ids_BxM, mask_BxM)
        return finish(hidden_BxMxD, mask_BxM, pooled_BxD)


def finish(hidden_BxMxD: jax.Array, mask_BxM: jax.Array, pooled_BxD: jax.Array) -> TextEmbeddings:
    """Packs encoder outputs: zeroes padded token states (so a consumer that forgets the mask sees
    nothing there) and casts the pooled vector back to the compute dtype."""
    mask_BxM = mask_BxM.astype(bool)
    tokens_BxMxD = jnp.where(mask_BxM[..., None], hidden_BxMxD, jnp.zeros((), hidden_BxMxD.dtype))
    return TextEmbeddings(tokens_BxMxD, mask_BxM, pooled_BxD.astype(hidden_BxMxD.dtype))
