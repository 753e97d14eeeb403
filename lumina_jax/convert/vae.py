"""Checkpoint conversion for the FLUX VAE (spec §5): diffusers ``AutoencoderKL`` and BFL ``ae.safetensors``.

Two foreign layouts, each with one key mapper (a list of :class:`KeyMap` rows built from the
:class:`~lumina_jax.models.vae.VAEConfig`) used by the loader, the exporter and the tests alike:

- **diffusers** (``vae/`` of a diffusers pipeline: ``config.json`` + ``diffusion_pytorch_model.safetensors``):
  ``encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}``,
  ``encoder.down_blocks.{i}.downsamplers.0.conv``, ``{encoder,decoder}.mid_block.resnets.{0,1}``,
  ``{encoder,decoder}.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (Linear weights),
  ``decoder.up_blocks.{i}.resnets.{j}`` / ``.upsamplers.0.conv``, ``{enc,dec}.conv_{in,norm_out,out}``,
  optional ``quant_conv`` / ``post_quant_conv``. ``decoder.up_blocks.0`` is the *lowest* resolution.
- **BFL** (the original FLUX ``ae.safetensors``, ``black-forest-labs/flux: src/flux/modules/autoencoder.py``):
  ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder.down.{i}.downsample.conv``,
  ``{enc,dec}.mid.{block_1,attn_1,block_2}`` with ``attn_1.{norm,q,k,v,proj_out}`` stored as 1x1 convs
  ``(C, C, 1, 1)``, ``{enc,dec}.norm_out``, ``decoder.up.{i}.block.{j}`` / ``.upsample.conv`` where
  ``up.{i}`` is indexed by resolution level, i.e. ``up.{n-1-k}`` is diffusers' ``up_blocks.{k}``.

Tensor transforms: conv ``(O, I, kh, kw)`` <-> ``(kh, kw, I, O)``; Linear ``(O, I)`` <-> ``(I, O)``;
1x1-conv projection ``(O, I, 1, 1)`` <-> ``(I, O)``; GroupNorm ``weight`` <-> ``scale``. All are exact
(transposes/reshapes), so round trips are bit-exact.

Loading streams one tensor at a time (:class:`~lumina_jax.convert.common.TensorSource`) after a strict
key/shape check; export writes to a temporary sibling that is renamed into place only on success.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from lumina_jax.convert.common import (
    DIFFUSERS_INDEX,
    Params,
    TensorSource,
    atomic_output,
    cast,
    flatten,
    plain_params,
    resolve_dtype,
    shapes_of,
    to_numpy,
    unflatten,
    write_sharded_safetensors,
)
from lumina_jax.convert.errors import CheckpointError, check_keys
from lumina_jax.models.vae import VAEConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One tensor: its name in the foreign layout, its JAX param path, and how the two relate."""

    name: str  # foreign (PyTorch) name, e.g. "encoder.conv_in.weight"
    path: str  # JAX path, e.g. "encoder/conv_in/kernel"
    kind: str  # "conv" | "linear" | "conv1x1_linear" | "vector"
    shape: tuple[int, ...]  # foreign shape
    jax_shape: tuple[int, ...]

    def to_jax(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
        if self.kind == "linear":
            return np.ascontiguousarray(a.T)
        if self.kind == "conv1x1_linear":
            return np.ascontiguousarray(a[:, :, 0, 0].T)
        return a

    def to_foreign(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
        if self.kind == "linear":
            return np.ascontiguousarray(a.T)
        if self.kind == "conv1x1_linear":
            return np.ascontiguousarray(a.T[:, :, None, None])
        return a


# ----------------------------------------------------------------------------------------------
# the structure, walked once for both layouts


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str  # JAX module path
    diffusers: str  # diffusers module name
    bfl: str  # BFL module name
    op: str  # "conv" | "norm" | "proj"
    shape: tuple[int, ...]  # conv: (out, in, k); norm: (c,); proj: (out, in)


def _layers(cfg: VAEConfig) -> Iterator[_Layer]:
    chans = cfg.block_out_channels
    n = len(chans)

    def conv(path, d, b, cout, cin, k=3):
        return _Layer(path, d, b, "conv", (cout, cin, k))

    def norm(path, d, b, c):
        return _Layer(path, d, b, "norm", (c,))

    def resnet(path, d, b, cin, cout):
        yield norm(f"{path}/norm1", f"{d}.norm1", f"{b}.norm1", cin)
        yield conv(f"{path}/conv1", f"{d}.conv1", f"{b}.conv1", cout, cin)
        yield norm(f"{path}/norm2", f"{d}.norm2", f"{b}.norm2", cout)
        yield conv(f"{path}/conv2", f"{d}.conv2", f"{b}.conv2", cout, cout)
        if cin != cout:
            yield conv(f"{path}/conv_shortcut", f"{d}.conv_shortcut", f"{b}.nin_shortcut", cout, cin, 1)

    def mid(part, c):
        p, d, b = f"{part}/mid_block", f"{part}.mid_block", f"{part}.mid"
        yield from resnet(f"{p}/resnets_0", f"{d}.resnets.0", f"{b}.block_1", c, c)
        if cfg.mid_block_add_attention:
            a, da, ba = f"{p}/attention", f"{d}.attentions.0", f"{b}.attn_1"
            yield norm(f"{a}/group_norm", f"{da}.group_norm", f"{ba}.norm", c)
            for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v")):
                yield _Layer(f"{a}/{ours}", f"{da}.{ours}", f"{ba}.{theirs}", "proj", (c, c))
            yield _Layer(f"{a}/to_out", f"{da}.to_out.0", f"{ba}.proj_out", "proj", (c, c))
        yield from resnet(f"{p}/resnets_1", f"{d}.resnets.1", f"{b}.block_2", c, c)

    # encoder
    yield conv("encoder/conv_in", "encoder.conv_in", "encoder.conv_in", chans[0], cfg.in_channels)
    cin = chans[0]
    for i, cout in enumerate(chans):
        for j in range(cfg.layers_per_block):
            yield from resnet(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                              f"encoder.down.{i}.block.{j}", cin, cout)  # fmt: skip
            cin = cout
        if i < n - 1:
            yield conv(f"encoder/down_blocks_{i}/downsampler", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                       f"encoder.down.{i}.downsample.conv", cout, cout)  # fmt: skip
    yield from mid("encoder", chans[-1])
    yield norm("encoder/conv_norm_out", "encoder.conv_norm_out", "encoder.norm_out", chans[-1])
    yield conv("encoder/conv_out", "encoder.conv_out", "encoder.conv_out", 2 * cfg.latent_channels, chans[-1])
    if cfg.use_quant_conv:
        lc = 2 * cfg.latent_channels
        yield conv("quant_conv", "quant_conv", "quant_conv", lc, lc, 1)
    if cfg.use_post_quant_conv:
        lc = cfg.latent_channels
        yield conv("post_quant_conv", "post_quant_conv", "post_quant_conv", lc, lc, 1)

    # decoder: up_blocks_k runs at level n-1-k (BFL indexes by level)
    rev = tuple(reversed(chans))
    yield conv("decoder/conv_in", "decoder.conv_in", "decoder.conv_in", rev[0], cfg.latent_channels)
    yield from mid("decoder", rev[0])
    cin = rev[0]
    for k, cout in enumerate(rev):
        level = n - 1 - k
        for j in range(cfg.layers_per_block + 1):
            yield from resnet(f"decoder/up_blocks_{k}/resnets_{j}", f"decoder.up_blocks.{k}.resnets.{j}",
                              f"decoder.up.{level}.block.{j}", cin, cout)  # fmt: skip
            cin = cout
        if k < n - 1:
            yield conv(f"decoder/up_blocks_{k}/upsampler", f"decoder.up_blocks.{k}.upsamplers.0.conv",
                       f"decoder.up.{level}.upsample.conv", cout, cout)  # fmt: skip
    yield norm("decoder/conv_norm_out", "decoder.conv_norm_out", "decoder.norm_out", chans[0])
    yield conv("decoder/conv_out", "decoder.conv_out", "decoder.conv_out", cfg.out_channels, chans[0])


def _key_map(cfg: VAEConfig, layout: str) -> list[KeyMap]:
    if layout not in ("diffusers", "bfl"):
        raise ValueError(f"unknown VAE checkpoint layout {layout!r}; choose 'diffusers' or 'bfl'")
    rows: list[KeyMap] = []
    for layer in _layers(cfg):
        name = layer.diffusers if layout == "diffusers" else layer.bfl
        if layer.op == "conv":
            o, i, k = layer.shape
            rows.append(KeyMap(f"{name}.weight", f"{layer.path}/kernel", "conv", (o, i, k, k), (k, k, i, o)))
            rows.append(KeyMap(f"{name}.bias", f"{layer.path}/bias", "vector", (o,), (o,)))
        elif layer.op == "norm":
            (c,) = layer.shape
            rows.append(KeyMap(f"{name}.weight", f"{layer.path}/scale", "vector", (c,), (c,)))
            rows.append(KeyMap(f"{name}.bias", f"{layer.path}/bias", "vector", (c,), (c,)))
        else:  # proj: Linear in diffusers, 1x1 conv in BFL
            o, i = layer.shape
            if layout == "diffusers":
                rows.append(KeyMap(f"{name}.weight", f"{layer.path}/kernel", "linear", (o, i), (i, o)))
            else:
                rows.append(KeyMap(f"{name}.weight", f"{layer.path}/kernel", "conv1x1_linear", (o, i, 1, 1), (i, o)))
            rows.append(KeyMap(f"{name}.bias", f"{layer.path}/bias", "vector", (o,), (o,)))
    return rows


def diffusers_key_map(cfg: VAEConfig) -> list[KeyMap]:
    """Every tensor of a diffusers ``AutoencoderKL`` with ``cfg``, with its JAX path and transform."""
    return _key_map(cfg, "diffusers")


def bfl_key_map(cfg: VAEConfig) -> list[KeyMap]:
    """Every tensor of a BFL ``ae.safetensors`` autoencoder with ``cfg``, with its JAX path and transform."""
    return _key_map(cfg, "bfl")


def param_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """``{jax_path: shape}`` of :class:`~lumina_jax.models.vae.AutoencoderKL` params for ``cfg``."""
    return {m.path: m.jax_shape for m in diffusers_key_map(cfg)}


# ----------------------------------------------------------------------------------------------
# generic import / export over a key map


class _MappingSource:
    """``TensorSource``-like view of an in-memory state dict (NumPy or torch tensors)."""

    def __init__(self, sd: Mapping[str, Any]):
        self._sd = sd

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._sd.items()}

    def get(self, key: str) -> np.ndarray:
        return to_numpy(self._sd[key])


def _import(source: Any, rows: list[KeyMap], what: str, dtype: Any) -> Params:
    check_keys({m.name: m.shape for m in rows}, source.shapes(), what)
    dt = resolve_dtype(dtype)
    flat: dict[str, np.ndarray] = {}
    for m in rows:  # one tensor in flight at a time
        flat[m.path] = cast(m.to_jax(source.get(m.name)), dt)
    return unflatten(flat)


def _flat_params(cfg: VAEConfig, params: Mapping[str, Any], what: str) -> dict[str, Any]:
    flat = flatten(plain_params(params))  # freshly initialised (logically partitioned) params too
    check_keys(param_shapes(cfg), shapes_of(flat), what)
    return flat


def _export(cfg: VAEConfig, params: Mapping[str, Any], rows: list[KeyMap],
            dtype: Any) -> Iterator[tuple[str, np.ndarray]]:  # fmt: skip
    flat = _flat_params(cfg, params, "VAE params")
    dt = resolve_dtype(dtype)
    for m in rows:
        yield m.name, cast(m.to_foreign(to_numpy(flat[m.path])), dt)


def params_from_state_dict(cfg: VAEConfig, state_dict: Mapping[str, Any], *, layout: str = "diffusers",
                           dtype: Any = "fp32") -> Params:  # fmt: skip
    """In-memory state dict (NumPy or torch tensors) -> JAX params, strictly checked.

    ``layout`` is ``"diffusers"`` or ``"bfl"``; ``dtype`` ``None`` keeps the stored dtype.
    """
    return _import(_MappingSource(state_dict), _key_map(cfg, layout), f"{layout} VAE state dict", dtype)


def state_dict_from_params(cfg: VAEConfig, params: Mapping[str, Any], *, layout: str = "diffusers",
                           dtype: Any = None) -> dict[str, np.ndarray]:  # fmt: skip
    """JAX params -> ``{name: np.ndarray}`` in the ``layout`` naming (PyTorch tensor layouts)."""
    return dict(_export(cfg, params, _key_map(cfg, layout), dtype))


# ----------------------------------------------------------------------------------------------
# diffusers directories


def _diffusers_dir(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    if (path / "vae" / "config.json").exists():  # a whole pipeline directory
        return path / "vae"
    raise CheckpointError(
        f"{path}: no config.json (expected a diffusers AutoencoderKL directory or a pipeline directory with vae/)"
    )


def load_vae_config(path: str | os.PathLike) -> VAEConfig:
    """Read the :class:`VAEConfig` of a diffusers ``vae/`` directory (or a pipeline directory)."""
    d = _diffusers_dir(Path(path))
    try:
        raw = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    if "_class_name" not in raw and "model_type" in raw:
        raise CheckpointError(f"{d / 'config.json'}: a transformers {raw['model_type']!r} config, not a diffusers "
                              f"AutoencoderKL")  # fmt: skip
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{d}: config is for {raw['_class_name']!r}, not AutoencoderKL")
    try:
        return VAEConfig.from_diffusers_config(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None


def load_vae(path: str | os.PathLike, *, dtype: Any = "fp32") -> tuple[VAEConfig, Params]:
    """Load a diffusers ``AutoencoderKL`` directory into ``(config, params)``.

    ``path`` is a ``vae/`` directory (``config.json`` + safetensors, sharded or not) or a pipeline
    directory containing one. Every key and shape is checked before any tensor is read (missing,
    unexpected and mis-shaped keys are named in the :class:`CheckpointError`); tensors are then read
    one at a time. Params are host NumPy arrays in ``dtype`` (``None`` keeps the stored dtype), as a
    nested dict for ``AutoencoderKL.apply({'params': params}, ...)``. The project's own component
    folder (``save_components``' ``vae/``, e.g. in the bundled default model) is read too.
    """
    from lumina_jax.convert.components import component_dir, load_component

    own = component_dir(path, "vae")
    if own is not None:
        return load_component(own, "vae", VAEConfig, dtype)
    d = _diffusers_dir(Path(path))
    cfg = load_vae_config(d)
    # Prefer the canonical file: hub folders may also hold variants (``*.fp16.safetensors``).
    src = TensorSource(d / DIFFUSERS_WEIGHTS if (d / DIFFUSERS_WEIGHTS).exists() else d)
    return cfg, _import(src, diffusers_key_map(cfg), f"{d}: diffusers AutoencoderKL", dtype)


def save_vae(path: str | os.PathLike, config: VAEConfig, params: Mapping[str, Any], *, dtype: Any = None,
             overwrite: bool = False, max_shard_bytes: int = 5 * 1024**3) -> Path:  # fmt: skip
    """Write ``params`` as a diffusers ``AutoencoderKL`` directory loadable with ``from_pretrained``.

    ``dtype`` ``None`` keeps the params' dtype (fp32 -> a bit-exact round trip). The params are checked
    against ``config`` first; the directory appears at ``path`` only when complete.
    """
    _flat_params(config, params, "VAE params")  # fail before creating anything
    rows = diffusers_key_map(config)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config.to_diffusers_config(), indent=2) + "\n")
        write_sharded_safetensors(_export(config, params, rows, dtype), tmp, weights_name=DIFFUSERS_WEIGHTS,
                                  index_name=DIFFUSERS_INDEX, max_shard_bytes=max_shard_bytes)  # fmt: skip
    return Path(path)


# ----------------------------------------------------------------------------------------------
# BFL ae.safetensors


CONFIG_METADATA = "lumina_jax_config"  # key of the config in the metadata of our ae.safetensors exports


def infer_bfl_config(shapes: Mapping[str, tuple[int, ...]], base: Optional[VAEConfig] = None) -> VAEConfig:
    """Architecture of a BFL autoencoder from its tensor shapes; the rest (GroupNorm groups, latent
    scaling) from ``base`` (default: FLUX, whose ``ae.safetensors`` carries no config)."""
    base = base or VAEConfig()
    try:
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        chans = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels)
        blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
        return base.replace(
            in_channels=shapes["encoder.conv_in.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            latent_channels=shapes["decoder.conv_in.weight"][1],
            block_out_channels=chans,
            layers_per_block=len(blocks),
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes,
            use_quant_conv="quant_conv.weight" in shapes,
            use_post_quant_conv="post_quant_conv.weight" in shapes,
        )
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"not a BFL autoencoder layout (cannot infer its config: no tensor {e})") from None
    except ValueError as e:  # shapes of a BFL autoencoder that the base's settings do not fit
        raise CheckpointError(f"a BFL autoencoder whose shapes do not fit the base config ({e}); pass config= "
                              f"(or base=) with its norm_num_groups and latent scaling") from None


def load_flux_ae(path: str | os.PathLike, *, config: Optional[VAEConfig] = None, dtype: Any = "fp32",
                 base: Optional[VAEConfig] = None) -> tuple[VAEConfig, Params]:  # fmt: skip
    """Load the original FLUX ``ae.safetensors`` (BFL layout) into ``(config, params)``.

    Without ``config``: the config :func:`save_flux_ae` stored in the file's metadata
    (``lumina_jax_config``), else the architecture inferred from the tensor shapes
    (:func:`infer_bfl_config`) and the rest taken from ``base`` (default FLUX: 32 groups, scale 0.3611,
    shift 0.1159; the released ``ae.safetensors`` carries no config). Keys are checked strictly;
    tensors stream one at a time.
    """
    src = TensorSource(path)
    cfg = config
    if cfg is None and (text := src.metadata.get(CONFIG_METADATA)) is not None:
        try:
            cfg = VAEConfig.from_dict(json.loads(text))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: its stored {CONFIG_METADATA} is not a valid VAE config ({e}); pass "
                                  f"config= to override it") from None
    if cfg is None:
        try:
            cfg = infer_bfl_config(src.shapes(), base)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return cfg, _import(src, bfl_key_map(cfg), f"{path}: BFL autoencoder", dtype)


def save_flux_ae(path: str | os.PathLike, config: VAEConfig, params: Mapping[str, Any], *, dtype: Any = None,
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``params`` as one BFL-layout ``ae.safetensors`` file (atomically). The config goes into the
    file's metadata (``lumina_jax_config``; the original code ignores it), so that :func:`load_flux_ae`
    reads back GroupNorm groups and latent scaling that the shapes do not show."""
    _flat_params(config, params, "VAE params")
    rows = bfl_key_map(config)
    from lumina_jax.convert.safetensors_io import save_file

    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(_export(config, params, rows, dtype), tmp, metadata={CONFIG_METADATA: json.dumps(config.to_dict())})
    return Path(path)
