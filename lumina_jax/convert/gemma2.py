"""Key mapper between transformers' Gemma-2 checkpoints and :mod:`lumina_jax.models.gemma2` params.

One table (:data:`LAYER_TABLE` + the two global tensors) drives every direction: the directory loader
(:func:`load_text_encoder`), the exporter (:func:`save_text_encoder`) and the in-memory functions
(:func:`torch_state_dict_to_params`, :func:`params_to_torch_state_dict`) used by the parity tests.

transformers layout (checked against transformers 5.24 ``Gemma2Model`` / ``Gemma2ForCausalLM``; the
Lumina-Image 2.0 repo's ``text_encoder/`` is a saved ``Gemma2Model``, google/gemma-2-2b a causal LM whose
keys carry a ``model.`` prefix and whose tied ``lm_head`` is not stored)::

    embed_tokens.weight                                   (V, E)
    layers.{i}.self_attn.{q,k,v}_proj.weight              (heads*Dh, E)   torch Linear: (out, in)
    layers.{i}.self_attn.o_proj.weight                    (E, H*Dh)
    layers.{i}.mlp.{gate,up}_proj.weight                  (F, E)
    layers.{i}.mlp.down_proj.weight                       (E, F)
    layers.{i}.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight   (E,)
    norm.weight                                           (E,)

Keys are accepted with or without the ``model.`` prefix; ``lm_head.*`` is ignored. Anything else
missing, unexpected or mis-shaped is a :class:`CheckpointError` that names the keys. Per-layer tensors
are stacked on a leading ``layers`` axis (the ``nn.scan`` layout); linear weights are transposed and the
attention projections split into ``(heads, head_dim)``. Every transform is a transpose/reshape, so a
round trip in the same dtype is bit-exact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from lumina_jax.convert.common import (
    Params,
    TensorSource,
    atomic_output,
    cast,
    flatten,
    read_config_json,
    resolve_dtype,
    to_numpy,
    unflatten,
    write_sharded_safetensors,
)
from lumina_jax.convert.errors import CheckpointError, check_keys
from lumina_jax.models.gemma2 import Gemma2Config

PREFIX = "model."
IGNORED_PREFIXES = ("lm_head.",)

# kind -> how the torch tensor and the JAX (per-layer) slice relate:
#   in_heads:  torch (n*Dh, E)  <-> jax (E, n, Dh)     q/k/v projections
#   out_heads: torch (E, H*Dh)  <-> jax (H, Dh, E)     o projection
#   linear:    torch (out, in)  <-> jax (in, out)      MLP
#   vector:    torch (E,)       <-> jax (E,)           norms
LAYER_TABLE: dict[str, tuple[str, str]] = {
    "self_attn.q_proj.weight": ("self_attn/q_proj/kernel", "in_heads"),
    "self_attn.k_proj.weight": ("self_attn/k_proj/kernel", "in_heads"),
    "self_attn.v_proj.weight": ("self_attn/v_proj/kernel", "in_heads"),
    "self_attn.o_proj.weight": ("self_attn/o_proj/kernel", "out_heads"),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", "linear"),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", "linear"),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", "linear"),
    "input_layernorm.weight": ("input_layernorm/scale", "vector"),
    "post_attention_layernorm.weight": ("post_attention_layernorm/scale", "vector"),
    "pre_feedforward_layernorm.weight": ("pre_feedforward_layernorm/scale", "vector"),
    "post_feedforward_layernorm.weight": ("post_feedforward_layernorm/scale", "vector"),
}
GLOBAL_TABLE: dict[str, tuple[str, str]] = {
    "embed_tokens.weight": ("embed_tokens/embedding", "vector"),  # (V, E) on both sides
    "norm.weight": ("norm/scale", "vector"),
}


# ----------------------------------------------------------------------------------------------
# the mapper


def _heads_of(jax_path: str, config: Gemma2Config) -> int:
    return config.num_heads if "q_proj" in jax_path or "o_proj" in jax_path else config.num_kv_heads


def _torch_shape(hf_suffix: str, jax_path: str, kind: str, c: Gemma2Config) -> tuple[int, ...]:
    E, F, Dh = c.hidden_size, c.intermediate_size, c.head_dim
    if hf_suffix == "embed_tokens.weight":
        return (c.vocab_size, E)
    if kind == "in_heads":
        return (_heads_of(jax_path, c) * Dh, E)
    if kind == "out_heads":
        return (E, c.num_heads * Dh)
    if kind == "linear":
        return (E, F) if "down_proj" in jax_path else (F, E)
    return (E,)


def _to_jax(w: np.ndarray, kind: str, jax_path: str, c: Gemma2Config) -> np.ndarray:
    if kind == "in_heads":
        return w.T.reshape(c.hidden_size, _heads_of(jax_path, c), c.head_dim)
    if kind == "out_heads":
        return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)
    if kind == "linear":
        return w.T
    return w


def _to_torch(k: np.ndarray, kind: str) -> np.ndarray:
    if kind == "in_heads":
        return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)
    if kind == "out_heads":
        return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)
    if kind == "linear":
        return np.ascontiguousarray(k.T)
    return np.ascontiguousarray(k)


def torch_key_shapes(config: Gemma2Config, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Every transformers key of a ``Gemma2Model`` with ``config`` and its shape."""
    out = {prefix + k: _torch_shape(k, p, kind, config) for k, (p, kind) in GLOBAL_TABLE.items()}
    for i in range(config.num_layers):
        for k, (p, kind) in LAYER_TABLE.items():
            out[f"{prefix}layers.{i}.{k}"] = _torch_shape(k, p, kind, config)
    return out


def jax_param_shapes(config: Gemma2Config) -> dict[str, tuple[int, ...]]:
    """``"/"``-joined JAX param paths -> shapes (per-layer params stacked on a leading axis)."""
    out: dict[str, tuple[int, ...]] = {}
    for k, (p, kind) in GLOBAL_TABLE.items():
        out[p] = _to_jax(np.empty(_torch_shape(k, p, kind, config), np.uint8), kind, p, config).shape
    for k, (p, kind) in LAYER_TABLE.items():
        one = _to_jax(np.empty(_torch_shape(k, p, kind, config), np.uint8), kind, p, config).shape
        out[f"layers/{p}"] = (config.num_layers, *one)
    return out


def canonical_keys(keys: list[str] | Any, what: str = "checkpoint") -> dict[str, str]:
    """Map canonical (un-prefixed) key -> key as stored; drops ``lm_head.*``; rejects duplicates."""
    out: dict[str, str] = {}
    for k in keys:
        if k.startswith(IGNORED_PREFIXES) or k.startswith(tuple(PREFIX + p for p in IGNORED_PREFIXES)):
            continue
        c = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if c in out:
            raise CheckpointError(f"{what}: {out[c]!r} and {k!r} name the same tensor")
        out[c] = k
    return out


def _fill_params(
    get: Callable[[str], np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    config: Gemma2Config,
    dtype: Any,
    what: str,
) -> Params:
    """Check keys, then copy tensor by tensor into preallocated stacked arrays (peak ~ one model copy)."""
    names = canonical_keys(list(shapes), what)
    check_keys(torch_key_shapes(config), {c: tuple(shapes[k]) for c, k in names.items()}, what)
    dt = resolve_dtype(dtype)  # None: each tensor keeps its stored dtype (a layer stack takes layer 0's)
    flat: dict[str, np.ndarray] = {}
    for k, (p, kind) in GLOBAL_TABLE.items():
        x = _to_jax(get(names[k]), kind, p, config)
        flat[p] = np.ascontiguousarray(x if dt is None else cast(x, dt))
    shapes_jax = jax_param_shapes(config)
    stacked: dict[str, np.ndarray] = {}
    for i in range(config.num_layers):
        for k, (p, kind) in LAYER_TABLE.items():
            x = _to_jax(get(names[f"layers.{i}.{k}"]), kind, p, config)
            name = f"layers/{p}"
            if name not in stacked:  # allocated at layer 0 (peak ~ one model copy)
                stacked[name] = np.empty(shapes_jax[name], x.dtype if dt is None else dt)
            elif dt is None and x.dtype != stacked[name].dtype:
                raise CheckpointError(f"{what}: layers.{i}.{k} is {x.dtype} but layers.0.{k} is {stacked[name].dtype}; "
                                      f"pass a dtype to read it")  # fmt: skip
            stacked[name][i] = x
    flat.update(stacked)
    return unflatten(flat)


def torch_state_dict_to_params(state_dict: Mapping[str, Any], config: Gemma2Config, *,
                               dtype: Any = "fp32") -> Params:
    """transformers Gemma-2 state dict (torch tensors or arrays) -> nested NumPy params (stacked layers).

    ``dtype``: ``"fp32"`` (default; the encoder keeps fp32 params), ``"bf16"``, or None for the source dtype.
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return _fill_params(lambda k: to_numpy(state_dict[k]), shapes, config, dtype, "Gemma-2 state dict")


def iter_torch_tensors(params: Params, config: Gemma2Config, *, dtype: Any = None,
                       prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(transformers key, host array)`` one tensor at a time (one layer slice of a stacked param).

    ``params`` may hold NumPy or (fully addressable) JAX arrays; shapes are checked first, naming keys.
    """
    flat = flatten(params)
    check_keys(jax_param_shapes(config), {k: tuple(np.shape(v)) for k, v in flat.items()}, "Gemma-2 params")
    dt = resolve_dtype(dtype)
    for k, (p, kind) in GLOBAL_TABLE.items():
        if k == "norm.weight":
            continue  # written last, in the transformers module order
        yield prefix + k, cast(_to_torch(to_numpy(flat[p]), kind), dt)
    for i in range(config.num_layers):
        for k, (p, kind) in LAYER_TABLE.items():
            yield f"{prefix}layers.{i}.{k}", cast(_to_torch(to_numpy(flat[f"layers/{p}"][i]), kind), dt)
    yield prefix + "norm.weight", cast(_to_torch(to_numpy(flat["norm/scale"]), "vector"), dt)


def params_to_torch_state_dict(params: Params, config: Gemma2Config, *, dtype: Any = None,
                               prefix: str = "") -> dict[str, np.ndarray]:
    """Nested params -> transformers state dict of NumPy arrays (``torch.from_numpy`` each to load)."""
    return dict(iter_torch_tensors(params, config, dtype=dtype, prefix=prefix))


# ----------------------------------------------------------------------------------------------
# directories


def load_text_encoder(path: str | os.PathLike, *, dtype: Any = "fp32") -> tuple[Gemma2Config, Params]:
    """Read a transformers Gemma-2 directory (``config.json`` + safetensors shards, or ``.bin``).

    Streams tensor by tensor into preallocated stacked NumPy arrays, so peak host memory is about one
    copy of the model in ``dtype``. Returns NumPy params; ``jax.device_put`` them (with a sharding) to use.
    Raises :class:`CheckpointError` naming missing / unexpected / mis-shaped keys or a truncated file.
    The project's own component folder (``save_components``' ``text_encoder/``) is read too.
    """
    from lumina_jax.convert.components import component_dir, load_component

    own = component_dir(path, "text_encoder")
    if own is not None:
        return load_component(own, "gemma2", Gemma2Config, dtype)
    path = Path(path)
    if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
        path = path / "text_encoder"  # a diffusers pipeline folder
    cfg_file = path / "config.json"
    hf = read_config_json(path, "a transformers Gemma-2 directory")
    try:
        config = Gemma2Config.from_hf_config(hf)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: not a Gemma-2 config (no {e.args[0]!r})") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    src = TensorSource(path)
    if hf.get("tie_word_embeddings") is False and any(k.endswith("lm_head.weight") for k in src.keys()):
        logging.getLogger(__name__).warning(
            "%s: its untied lm_head.weight is not read (the encoder does not use it); an export writes a "
            "Gemma2Model, whose config ties the head to the embeddings", path)  # fmt: skip
    params = _fill_params(src.get, src.shapes(), config, dtype, str(path))
    return config, params


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def save_text_encoder(
    path: str | os.PathLike,
    config: Gemma2Config,
    params: Params,
    *,
    dtype: Any = None,
    prefix: str = "",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write ``params`` as a transformers ``Gemma2Model`` directory (``config.json`` + safetensors shards).

    ``dtype`` casts the written tensors (None keeps the params' dtype); ``prefix="model."`` writes the
    causal-LM key layout instead. The directory appears at ``path`` only when complete (written to a
    temporary sibling, then renamed), so a failure leaves nothing at ``path``.
    """
    check_keys(jax_param_shapes(config), {k: tuple(np.shape(v)) for k, v in flatten(params).items()},
               "Gemma-2 params")
    dt = resolve_dtype(dtype)
    leaf_dtype = np.dtype(to_numpy(flatten(params)["norm/scale"]).dtype) if dt is None else dt
    dtype_name = _DTYPE_NAMES.get(str(leaf_dtype))
    if dtype_name is None:
        raise ValueError(f"cannot export Gemma-2 params of dtype {leaf_dtype}")
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(dtype_name), indent=2) + "\n")
        write_sharded_safetensors(iter_torch_tensors(params, config, dtype=dt, prefix=prefix), tmp,
                                  max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    return Path(path)
