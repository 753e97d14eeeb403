"""LoRA fine-tuning of the Next-DiT: frozen base weights plus trainable low-rank updates.

With ``lora:`` in a train config the trainer's params are ``{"base": <Next-DiT params>, "lora": {path:
{"down", "up"}}}``. Every targeted matrix ``W`` (JAX layout ``(..., in, out)``; stacked layers keep their
leading axis) gets ``down`` ``(..., in, r)`` and ``up`` ``(..., r, out)``, and the layer computes

    y = x W + (alpha / r) * (x down) up

as a side path inside the model (:class:`LoRAModel` passes the adapters as the model's ``lora``
variable collection; :func:`lumina_jax.models.nextdit.lora_delta`), as PEFT does: the backward forms
no full weight gradient (the frozen layers only pass activation gradients on), which saves about a
third of the step's matmul FLOPs and the weight-gradient buffers (the sum is in the compute dtype, as
in PEFT). Only ``lora`` is trainable: the
optimizer holds no state for the base, the frozen params skip the update and the gradient-accumulation
buffer, and the EMA covers the adapter alone (:func:`ema_source`); checkpoints hold the adapter state
only (the trainer re-reads the base from ``init`` on resume). ``down`` starts uniform in
``+-1/sqrt(in)`` and ``up`` at zero (PEFT's init), so step 0 is the base model. Exports and the periodic
samples use the merged weights (:func:`apply_lora`), like the pipeline's ``load_lora``.

Sharding: ``down`` takes the logical names of ``W``'s input axis, ``up`` those of its output axis, so
the adapter is split like the weight it adapts. :func:`export_lora` writes the adapter in diffusers'
LoRA layout (``transformer.<module>.lora_A/lora_B.weight`` + ``lora_adapter_metadata``), which
``Lumina2Pipeline.load_lora_weights`` (diffusers; PEFT underneath) and :func:`lumina_jax.convert.lora.load_lora`
read (not a PEFT adapter folder: there is no ``adapter_config.json`` for ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lumina_jax.convert.common import flatten, unflatten
from lumina_jax.models.nextdit import LORA

Params = Any

_STACKS = r"(layers|noise_refiner|context_refiner)/blocks"
DEFAULT_TARGETS: tuple[str, ...] = (
    _STACKS + r"/attention/(q|k|v|out/kernel)$",
    _STACKS + r"/feed_forward/w[123]/kernel$",
)


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    """``rank`` r; ``alpha`` (``null``: r, a scale of 1); ``targets``: regexes searched in the JAX param
    paths (``layers/blocks/attention/q``, ``.../feed_forward/w1/kernel``, ``.../adaLN_modulation/kernel``,
    ``x_embedder/kernel``, ...); every matched matrix gets an adapter. Default: attention q/k/v/out and
    the SwiGLU matrices of every block."""

    rank: int = 16
    alpha: Optional[float] = None
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0 or null (= rank), got {self.alpha}")
        if not self.targets:
            raise ValueError("lora.targets is empty: name at least one param path pattern")
        for t in self.targets:
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(f"lora.targets: {t!r} is not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def is_lora_tree(params: Any) -> bool:
    return isinstance(params, dict) and set(params) == {"base", "lora"}


def ema_source(params: Any) -> Any:
    """What the EMA averages: the adapter alone in a LoRA run (the base never changes), else all params."""
    return {"lora": params["lora"]} if is_lora_tree(params) else params


_MATRIX = re.compile(r"(/kernel|attention/[qkv])$")  # dense kernels and the q/k/v matrices: nn.Linear weights


def target_paths(base_shapes: dict[str, tuple[int, ...]], cfg: LoraTrainConfig) -> list[str]:
    """Flat paths of the weight matrices (dense kernels, attention q/k/v; 2-D, or 3-D stacked) that
    ``cfg.targets`` select; biases and norm scales never are. An error naming the pattern and the
    matrices there are when a pattern selects none."""
    regs = [re.compile(t) for t in cfg.targets]
    matrices = sorted(p for p, s in base_shapes.items() if _MATRIX.search(p) and len(s) in (2, 3))
    out = []
    for t, r in zip(cfg.targets, regs):
        hit = [p for p in matrices if r.search(p)]
        if not hit:
            raise ValueError(f"lora.targets pattern {t!r} matches no weight matrix; the matrices are "
                             f"{matrices[:8]} ...")  # fmt: skip
        out += [p for p in hit if p not in out]
    return sorted(out)


def abstract_lora(base_boxed: Any, cfg: LoraTrainConfig) -> Any:
    """Boxed abstract adapter params: ``down`` named like ``W``'s input axis, ``up`` like its output axis."""
    flat = flatten(base_boxed)
    shapes = {p: tuple(nn.meta.unbox(v).shape) for p, v in flat.items()}
    out = {}
    for p in target_paths(shapes, cfg):
        box = flat[p]
        names = tuple(box.names) if isinstance(box, nn.Partitioned) else (None,) * len(shapes[p])
        *lead, d_in, d_out = shapes[p]
        out[f"{p}/down"] = nn.Partitioned(jax.ShapeDtypeStruct((*lead, d_in, cfg.rank), jnp.float32),
                                          (*names[:-1], None))  # fmt: skip
        out[f"{p}/up"] = nn.Partitioned(jax.ShapeDtypeStruct((*lead, cfg.rank, d_out), jnp.float32),
                                        (*names[:-2], None, names[-1]))  # fmt: skip
    return unflatten(out)


def init_lora(abstract: Any, rng: jax.Array) -> Params:
    """Fresh adapter (traceable): ``down`` uniform in ``+-1/sqrt(in)``, ``up`` zeros."""
    flat = flatten(nn.meta.unbox(abstract))
    out = {}
    for i, (p, a) in enumerate(sorted(flat.items())):
        if p.endswith("/down"):
            bound = 1.0 / np.sqrt(a.shape[-2])
            out[p] = jax.random.uniform(jax.random.fold_in(rng, i), a.shape, jnp.float32, -bound, bound)
        else:
            out[p] = jnp.zeros(a.shape, jnp.float32)
    return unflatten(out)


def apply_lora(base: Params, lora: Params, scale: float) -> Params:
    """``base`` with ``scale * down @ up`` added to every adapted matrix (products in float32)."""
    flat = flatten(base)
    for p, ad in flatten_adapters(lora).items():
        w = flat[p]
        delta = jnp.einsum("...ir,...ro->...io", ad["down"].astype(jnp.float32), ad["up"].astype(jnp.float32))
        flat[p] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return unflatten(flat)


def params_fingerprint(params: Params) -> str:
    """A bit-exact fingerprint of a parameter tree (16 hex digits): per leaf, wrapping uint32 sums of its bit
    patterns, plain and weighted by a hash of the element index (integer reductions, so the same on any mesh or
    sharding), hashed with the leaf paths.
    A LoRA run records its frozen base's, which is re-read from ``init`` on resume and export."""
    import hashlib

    def leaf_sum(x: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
        index, stride = jnp.zeros(x.shape, jnp.uint32), 1
        for d in reversed(range(x.ndim)):  # the flat element index, so that moved values count too
            index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
            stride *= x.shape[d]
        weight = index * jnp.uint32(2654435761) + jnp.uint32(1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])

    flat = flatten(params)
    sums = jax.device_get(jax.jit(lambda f: {k: leaf_sum(v) for k, v in f.items()})(flat))
    digest = hashlib.sha256()
    for k in sorted(sums):
        digest.update(f"{k}:{[int(v) for v in sums[k]]};".encode())
    return digest.hexdigest()[:16]


def flatten_adapters(lora: Params) -> dict[str, dict[str, Any]]:
    """``{matrix path: {"down": ..., "up": ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in flatten(lora).items():
        p, _, which = k.rpartition("/")
        out.setdefault(p, {})[which] = v
    return out


def adapter_variables(lora: Params, scale: float) -> Params:
    """The adapters as the model's ``lora`` variable collection: ``{"down", "up" * scale}`` per param
    (:func:`lumina_jax.models.nextdit.lora_delta` adds ``(x @ down) @ up``)."""
    return unflatten({k: (v * scale if k.endswith("/up") else v) for k, v in flatten(lora).items()})


@dataclasses.dataclass(frozen=True)
class LoRAModel:
    """A Next-DiT whose ``apply`` takes ``{"params": {"base", "lora"}}``: the base weights with each adapter
    as a side path ``W x + (alpha / r) up(down(x))`` inside the model (what the train step sees in a LoRA
    run; ``config`` and ``forward_tokens`` pass through). Equal to the merged weights (:func:`apply_lora`)
    up to rounding, with no full weight gradient in the backward."""

    model: Any
    scale: float

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def forward_tokens(self) -> Any:
        return self.model.forward_tokens

    def apply(self, variables: dict, *args: Any, **kwargs: Any) -> Any:
        p = variables["params"]
        return self.model.apply({"params": p["base"], LORA: adapter_variables(p["lora"], self.scale)}, *args, **kwargs)


def training_view(model: Any, boxed: Any, trainable: Sequence[str],
                  cfg: Optional[LoraTrainConfig]) -> tuple[Any, Any, tuple[str, ...]]:
    """``(model, boxed abstract params, trainable patterns)`` a run trains: as given without ``lora``;
    with it the :class:`LoRAModel`, ``{"base", "lora"}`` and the adapters as the only trainable params."""
    if cfg is None:
        return model, boxed, tuple(trainable)
    return LoRAModel(model, cfg.scale), {"base": boxed, "lora": abstract_lora(boxed, cfg)}, ("^lora/",)


# ----------------------------------------------------------------------------------------------
# export


def export_lora(out: str | os.PathLike, model_config: Any, lora: Params, cfg: LoraTrainConfig, *,
                overwrite: bool = False) -> Path:
    """Write the adapter (host arrays) as diffusers' ``pytorch_lora_weights.safetensors`` in folder ``out``
    (atomic). Stacked adapters are split per layer through the converter's diffusers key rules."""
    from lumina_jax.convert.common import atomic_output
    from lumina_jax.convert.lora import METADATA_KEY
    from lumina_jax.convert.nextdit import diffusers_rules
    from lumina_jax.convert.safetensors_io import save_file

    by_part = {}
    for rule in diffusers_rules(model_config):
        if rule.key.endswith(".weight") and rule.transpose:
            for part in rule.parts:
                by_part[(part.path, part.layer)] = rule.key[: -len(".weight")]
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for p, ad in flatten_adapters(lora).items():
        down, up = np.asarray(ad["down"], np.float32), np.asarray(ad["up"], np.float32)
        layers = [None] if down.ndim == 2 else list(range(down.shape[0]))
        for layer in layers:
            name = by_part.get((p, layer))
            if name is None:
                raise ValueError(f"no diffusers module for the adapted param {p!r} (layer {layer})")
            d, u = (down, up) if layer is None else (down[layer], up[layer])
            tensors[f"transformer.{name}.lora_A.weight"] = np.ascontiguousarray(d.T)  # (r, in)
            tensors[f"transformer.{name}.lora_B.weight"] = np.ascontiguousarray(u.T)  # (out, r)
            modules.append(name)
    meta = {"transformer.r": cfg.rank, "transformer.lora_alpha": cfg.alpha if cfg.alpha is not None else cfg.rank,
            "transformer.target_modules": sorted(modules)}  # fmt: skip
    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp / "pytorch_lora_weights.safetensors",
                  metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})  # fmt: skip
    return Path(out)


def lora_param_count(lora: Params) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(lora))


__all__: Sequence[str] = ["LoraTrainConfig", "DEFAULT_TARGETS", "LoRAModel", "abstract_lora", "init_lora",
                          "apply_lora", "ema_source", "is_lora_tree", "export_lora", "target_paths", "training_view"]  # fmt: skip
