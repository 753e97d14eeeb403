"""Key mapper between transformers Qwen2-VL / Qwen2.5-VL checkpoints and :mod:`lumina_jax.models.captioner`.

One table (:func:`key_table`) drives every direction: the directory loader (:func:`load_captioner`), the
exporter (:func:`save_captioner`) and the in-memory functions used by the parity tests
(:func:`torch_state_dict_to_params`, :func:`params_to_torch_state_dict`).

Canonical key names (this module's) and the two layouts found in the wild::

    canonical                      transformers >= 4.52 layout         released checkpoints (and 5.25's save)
    visual.<k>                     model.visual.<k>                    visual.<k>
    language_model.<k>             model.language_model.<k>            model.<k>
    lm_head.weight                 lm_head.weight                      lm_head.weight

Both are read; the exporter writes the first (transformers 4.52+ and 5 load it; its config.json has the
5.x ``rope_parameters`` and the 4.x ``rope_scaling``/``rope_theta``, checked with 4.57.1 and 5.25). With
``tie_word_embeddings`` the LM head is the embedding table: ``lm_head.weight`` is ignored if present and
not written.

Tensor transforms (torch ``Linear`` weights are ``(out, in)``; JAX kernels ``(in, out)``):

=============  ================================  =========================================================
kind           torch                             JAX
=============  ================================  =========================================================
in_heads       (n*Dh, E)                         (E, n, Dh)            q/k/v projections
bias_heads     (n*Dh,)                           (n, Dh)
out_heads      (E, H*Dh)                         (H, Dh, E)            attention output projections
qkv_weight     (3*H*Dh, E) fused                 3 x (E, H, Dh)        vision q, k, v (split / concatenated)
qkv_bias       (3*H*Dh,)                         3 x (H, Dh)
linear         (out, in)                         (in, out)
conv3d         (E, C, T, P, P)                   (C*T*P*P, E)          patch embedding as a matmul
vector         any                               same                  norms, biases, embedding table
=============  ================================  =========================================================

Per-layer tensors are stacked on a leading ``layers`` axis (``nn.scan`` layout). Every transform is a
reshape/transpose/split, so a round trip in the same dtype is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lumina_jax.convert.common import (
    Params,
    TensorSource,
    atomic_output,
    cast,
    flatten,
    read_config_json,
    read_json,
    resolve_dtype,
    to_numpy,
    unflatten,
    write_sharded_safetensors,
)
from lumina_jax.convert.errors import CheckpointError, check_keys
from lumina_jax.models.captioner.config import QWEN2_VL, CaptionerConfig

# files of a model directory that are not weights and travel with an export
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json", "generation_config.json", "video_preprocessor_config.json")

_VISION_BLOCK_COMMON: dict[str, tuple[tuple[str, ...], str]] = {
    "attn.qkv.weight": (("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel"), "qkv_weight"),
    "attn.qkv.bias": (("attn/q_proj/bias", "attn/k_proj/bias", "attn/v_proj/bias"), "qkv_bias"),
    "attn.proj.weight": (("attn/o_proj/kernel",), "out_heads"),
    "attn.proj.bias": (("attn/o_proj/bias",), "vector"),
    "norm1.weight": (("norm1/scale",), "vector"),
    "norm2.weight": (("norm2/scale",), "vector"),
}
_VISION_BLOCK_QWEN2: dict[str, tuple[tuple[str, ...], str]] = {
    "norm1.bias": (("norm1/bias",), "vector"),
    "norm2.bias": (("norm2/bias",), "vector"),
    "mlp.fc1.weight": (("mlp/fc1/kernel",), "linear"),
    "mlp.fc1.bias": (("mlp/fc1/bias",), "vector"),
    "mlp.fc2.weight": (("mlp/fc2/kernel",), "linear"),
    "mlp.fc2.bias": (("mlp/fc2/bias",), "vector"),
}
_VISION_BLOCK_QWEN2_5: dict[str, tuple[tuple[str, ...], str]] = {
    f"mlp.{p}.{w}": ((f"mlp/{p}/{'kernel' if w == 'weight' else 'bias'}",), "linear" if w == "weight" else "vector")
    for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")
}
_MERGER: dict[str, tuple[tuple[str, ...], str]] = {
    "merger.ln_q.weight": (("merger/ln_q/scale",), "vector"),
    "merger.ln_q.bias": (("merger/ln_q/bias",), "vector"),  # Qwen2-VL only (LayerNorm)
    "merger.mlp.0.weight": (("merger/fc1/kernel",), "linear"),
    "merger.mlp.0.bias": (("merger/fc1/bias",), "vector"),
    "merger.mlp.2.weight": (("merger/fc2/kernel",), "linear"),
    "merger.mlp.2.bias": (("merger/fc2/bias",), "vector"),
}
_LM_LAYER: dict[str, tuple[tuple[str, ...], str]] = {
    **{f"self_attn.{p}_proj.weight": ((f"self_attn/{p}_proj/kernel",), "in_heads") for p in "qkv"},
    **{f"self_attn.{p}_proj.bias": ((f"self_attn/{p}_proj/bias",), "bias_heads") for p in "qkv"},
    "self_attn.o_proj.weight": (("self_attn/o_proj/kernel",), "out_heads"),
    "mlp.gate_proj.weight": (("mlp/gate_proj/kernel",), "linear"),
    "mlp.up_proj.weight": (("mlp/up_proj/kernel",), "linear"),
    "mlp.down_proj.weight": (("mlp/down_proj/kernel",), "linear"),
    "input_layernorm.weight": (("input_layernorm/scale",), "vector"),
    "post_attention_layernorm.weight": (("post_attention_layernorm/scale",), "vector"),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor <-> one or more JAX params (``layer`` set: a slice of stacked params)."""

    key: str  # canonical torch key
    paths: tuple[str, ...]  # full "/"-joined JAX param paths (stacked ones include the "layers" scan)
    kind: str
    layer: Optional[int] = None


def key_table(config: CaptionerConfig) -> list[Entry]:
    """Every tensor of the model, in transformers module order."""
    out: list[Entry] = []
    v = "visual/"
    out.append(Entry("visual.patch_embed.proj.weight", (v + "patch_embed/kernel",), "conv3d"))
    block = dict(_VISION_BLOCK_COMMON)
    block.update(_VISION_BLOCK_QWEN2 if config.family == QWEN2_VL else _VISION_BLOCK_QWEN2_5)
    for i in range(config.vision.depth):
        for k, (paths, kind) in block.items():
            out.append(Entry(f"visual.blocks.{i}.{k}", tuple(f"{v}blocks/{p}" for p in paths), kind, i))
    for k, (paths, kind) in _MERGER.items():
        if k == "merger.ln_q.bias" and config.family != QWEN2_VL:
            continue
        out.append(Entry(f"visual.{k}", tuple(v + p for p in paths), kind))
    lm = "language_model/"
    out.append(Entry("language_model.embed_tokens.weight", (lm + "embed_tokens/embedding",), "vector"))
    for i in range(config.text.num_layers):
        for k, (paths, kind) in _LM_LAYER.items():
            out.append(Entry(f"language_model.layers.{i}.{k}", tuple(f"{lm}layers/{p}" for p in paths), kind, i))
    out.append(Entry("language_model.norm.weight", (lm + "norm/scale",), "vector"))
    if not config.text.tie_word_embeddings:
        out.append(Entry("lm_head.weight", (lm + "lm_head/kernel",), "linear"))
    return out


# ----------------------------------------------------------------------------------------------
# shapes and transforms


def jax_param_shapes(config: CaptionerConfig) -> dict[str, tuple[int, ...]]:
    """``"/"``-joined JAX param paths -> shapes (stacked params include the leading layer axis)."""
    from lumina_jax.models.captioner.model import param_shapes

    return {k: tuple(v.shape) for k, v in flatten(param_shapes(config)).items()}


def _one(shape: tuple[int, ...], e: Entry) -> tuple[int, ...]:
    return shape[1:] if e.layer is not None else shape


def _torch_shape(e: Entry, shapes: Mapping[str, tuple[int, ...]], config: CaptionerConfig) -> tuple[int, ...]:
    s = [_one(shapes[p], e) for p in e.paths]
    k = e.kind
    if k == "in_heads":
        return (s[0][1] * s[0][2], s[0][0])
    if k == "bias_heads":
        return (s[0][0] * s[0][1],)
    if k == "out_heads":
        return (s[0][2], s[0][0] * s[0][1])
    if k == "qkv_weight":
        return (3 * s[0][1] * s[0][2], s[0][0])
    if k == "qkv_bias":
        return (3 * s[0][0] * s[0][1],)
    if k == "linear":
        return (s[0][1], s[0][0])
    if k == "conv3d":
        v = config.vision
        return (s[0][1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return s[0]


def _to_jax(w: np.ndarray, e: Entry, shapes: Mapping[str, tuple[int, ...]]) -> list[np.ndarray]:
    s = [_one(shapes[p], e) for p in e.paths]
    k = e.kind
    if k == "in_heads":
        return [w.T.reshape(s[0])]
    if k in ("bias_heads", "vector"):
        return [w.reshape(s[0])]
    if k == "out_heads":
        return [w.T.reshape(s[0])]
    if k == "qkv_weight":
        return [c.T.reshape(s[0]) for c in np.split(w, 3, axis=0)]
    if k == "qkv_bias":
        return [c.reshape(s[0]) for c in np.split(w, 3, axis=0)]
    if k == "linear":
        return [w.T]
    if k == "conv3d":
        return [w.reshape(w.shape[0], -1).T]
    raise AssertionError(k)


def _to_torch(arrs: list[np.ndarray], e: Entry, torch_shape: tuple[int, ...]) -> np.ndarray:
    k = e.kind
    a = arrs[0]
    if k == "in_heads":
        out = a.reshape(a.shape[0], -1).T
    elif k == "out_heads":
        out = a.reshape(-1, a.shape[-1]).T
    elif k == "qkv_weight":
        out = np.concatenate([x.reshape(x.shape[0], -1).T for x in arrs], axis=0)
    elif k == "qkv_bias":
        out = np.concatenate([x.reshape(-1) for x in arrs], axis=0)
    elif k == "linear":
        out = a.T
    elif k == "conv3d":
        out = a.T.reshape(torch_shape)
    else:
        out = a.reshape(torch_shape)
    return np.ascontiguousarray(out)


def torch_key_shapes(config: CaptionerConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical transformers key of the model and its shape."""
    shapes = jax_param_shapes(config)
    return {e.key: _torch_shape(e, shapes, config) for e in key_table(config)}


def canonical_key(key: str) -> str:
    """Stored key (either layout) -> canonical key (see module docstring)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return key[len("model."):]
    if key.startswith("model."):
        return "language_model." + key[len("model."):]
    return key


def canonical_keys(keys: Any, config: CaptionerConfig, what: str = "checkpoint") -> dict[str, str]:
    """canonical key -> stored key; drops a tied ``lm_head.weight``; rejects two names for one tensor."""
    out: dict[str, str] = {}
    for k in keys:
        c = canonical_key(k)
        if c == "lm_head.weight" and config.text.tie_word_embeddings:
            continue
        if c in out:
            raise CheckpointError(f"{what}: {out[c]!r} and {k!r} name the same tensor")
        out[c] = k
    return out


# ----------------------------------------------------------------------------------------------
# in memory


def _fill_params(get: Callable[[str], np.ndarray], stored_shapes: Mapping[str, tuple[int, ...]],
                 config: CaptionerConfig, dtype: Any, what: str) -> Params:
    """Check keys/shapes, then copy tensor by tensor into preallocated arrays (peak ~ one model copy)."""
    names = canonical_keys(list(stored_shapes), config, what)
    check_keys(torch_key_shapes(config), {c: tuple(stored_shapes[k]) for c, k in names.items()}, what)
    shapes = jax_param_shapes(config)
    dt = resolve_dtype(dtype)
    # dt None: each param takes its source tensor's dtype (a bf16 model with an fp32 merger stays so); a
    # layer stack whose layers were stored in different dtypes takes the widest (lossless)
    flat: dict[str, np.ndarray] = {} if dt is None else {p: np.empty(s, dt) for p, s in shapes.items()}
    for e in key_table(config):
        for p, arr in zip(e.paths, _to_jax(get(names[e.key]), e, shapes)):
            if p not in flat:
                flat[p] = np.empty(shapes[p], arr.dtype)
            elif dt is None and arr.dtype != flat[p].dtype:
                flat[p] = flat[p].astype(np.result_type(flat[p].dtype, arr.dtype))
            if e.layer is None:
                flat[p][...] = arr
            else:
                flat[p][e.layer] = arr
    return unflatten(flat)


def torch_state_dict_to_params(state_dict: Mapping[str, Any], config: CaptionerConfig, *,
                               dtype: Any = "fp32") -> Params:
    """transformers state dict (torch tensors or arrays, either key layout) -> nested NumPy params."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return _fill_params(lambda k: to_numpy(state_dict[k]), shapes, config, dtype, "Qwen-VL state dict")


def iter_torch_tensors(params: Params, config: CaptionerConfig, *, dtype: Any = None,
                       prefix_layout: str = "5.x") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(transformers key, host array)`` one tensor at a time, in module order.

    ``prefix_layout``: ``"5.x"`` (``model.visual.*``, ``model.language_model.*``) or ``"4.x"`` (``visual.*``,
    ``model.*``). Param shapes are checked first, naming keys.
    """
    flat = flatten(params)
    shapes = jax_param_shapes(config)
    check_keys(shapes, {k: tuple(np.shape(v)) for k, v in flat.items()}, "Qwen-VL params")
    dt = resolve_dtype(dtype)
    for e in key_table(config):
        arrs = [to_numpy(flat[p] if e.layer is None else flat[p][e.layer]) for p in e.paths]
        yield _stored_key(e.key, prefix_layout), cast(_to_torch(arrs, e, _torch_shape(e, shapes, config)), dt)


def _stored_key(canonical: str, layout: str) -> str:
    if canonical == "lm_head.weight":
        return canonical
    if layout == "5.x":
        return "model." + canonical
    if layout == "4.x":
        return canonical if canonical.startswith("visual.") else "model." + canonical[len("language_model."):]
    raise ValueError(f"prefix_layout must be '5.x' or '4.x', got {layout!r}")


def params_to_torch_state_dict(params: Params, config: CaptionerConfig, *, dtype: Any = None,
                               prefix_layout: str = "5.x") -> dict[str, np.ndarray]:
    """Nested params -> transformers state dict of NumPy arrays (``torch.from_numpy`` each to load)."""
    return dict(iter_torch_tensors(params, config, dtype=dtype, prefix_layout=prefix_layout))


# ----------------------------------------------------------------------------------------------
# directories


def read_config(path: str | os.PathLike) -> CaptionerConfig:
    """``config.json`` of a transformers Qwen2-VL / Qwen2.5-VL directory -> :class:`CaptionerConfig`."""
    path = Path(path)
    f = path / "config.json"
    hf = read_config_json(path, "a transformers Qwen2-VL / Qwen2.5-VL directory")
    try:
        config = CaptionerConfig.from_hf_config(hf)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{f}: {type(e).__name__}: {e}") from None
    gen = path / "generation_config.json"
    if gen.is_file():  # the chat models stop on <|im_end|> and <|endoftext|>: generation_config has both
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            eos = [eos] if isinstance(eos, int) else list(eos)
            config = dataclasses.replace(config, eos_token_id=tuple(dict.fromkeys([*config.eos_token_id, *eos])))
    return config


def generation_setting(path: str | os.PathLike, key: str) -> Any:
    """``key`` of the directory's ``generation_config.json`` (transformers' decoding defaults, e.g.
    ``repetition_penalty``), or None when the file or the key is absent; a malformed file is a
    :class:`CheckpointError`."""
    f = Path(path) / "generation_config.json"
    return read_json(f, "object").get(key) if f.is_file() else None


def load_captioner(path: str | os.PathLike, *, dtype: Any = "fp32") -> tuple[CaptionerConfig, Params]:
    """Read a transformers Qwen2-VL / Qwen2.5-VL directory (config.json + safetensors shards or .bin).

    Streams tensor by tensor into preallocated NumPy arrays (peak host memory ~ one model copy in
    ``dtype``; ``None`` keeps the stored dtype). Raises :class:`CheckpointError` naming missing,
    unexpected or mis-shaped keys.
    """
    config = read_config(path)
    src = TensorSource(path)
    return config, _fill_params(src.get, src.shapes(), config, dtype, str(path))


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save_captioner(path: str | os.PathLike, config: CaptionerConfig, params: Params, *, dtype: Any = None,
                   processor_dir: Optional[str | os.PathLike] = None, overwrite: bool = False,
                   max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``params`` as a transformers ``*ForConditionalGeneration`` directory (5.x key layout).

    ``dtype`` casts the written tensors (None keeps the params' dtype). ``processor_dir``: copy its tokenizer /
    processor / generation files (:data:`PROCESSOR_FILES`) along, so the result is a complete model
    directory. Written to a temporary sibling and renamed when complete.
    """
    flat = flatten(params)
    check_keys(jax_param_shapes(config), {k: tuple(np.shape(v)) for k, v in flat.items()}, "Qwen-VL params")
    dt = resolve_dtype(dtype)
    leaf_dtype = np.dtype(to_numpy(flat["language_model/norm/scale"]).dtype) if dt is None else dt
    dtype_name = _DTYPE_NAMES.get(str(leaf_dtype))
    if dtype_name is None:
        raise ValueError(f"cannot export params of dtype {leaf_dtype}")
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(dtype_name), indent=2) + "\n")
        write_sharded_safetensors(iter_torch_tensors(params, config, dtype=dt), tmp,
                                  max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        if processor_dir is not None:
            for name in PROCESSOR_FILES:
                f = Path(processor_dir) / name
                if f.is_file():
                    shutil.copy2(f, tmp / name)
    return Path(path)
