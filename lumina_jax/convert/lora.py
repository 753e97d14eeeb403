"""LoRA adapters for the Next-DiT: read the files people share, merge them into the params.

A LoRA adds ``scale * (alpha / r) * B @ A`` to a PyTorch ``nn.Linear`` weight (``A``: ``(r, in)``,
``B``: ``(out, r)``). This module reads such adapters and adds their product to the matching JAX params
through the same key mapper the checkpoint converter uses (:mod:`lumina_jax.convert.nextdit`), so a LoRA
made for either PyTorch layout lands exactly where that layout's weight does:

=================  ==================================================  ===================================
layout             module names                                        written by
=================  ==================================================  ===================================
diffusers / PEFT   ``layers.0.attn.to_q``, ``...feed_forward.linear_1``  diffusers' ``save_lora_weights``
                   (prefixes ``transformer.`` / ``base_model.model.``)   (training scripts), PEFT
original           ``layers.0.attention.qkv``, ``...feed_forward.w1``    ComfyUI / sd-scripts style trainers
                   (prefix ``diffusion_model.`` or none; fused qkv)
=================  ==================================================  ===================================

Weight names: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (PEFT) or ``lora_down`` /
``lora_up`` (kohya), optionally ``<module>.alpha``; kohya's underscore form
(``lora_unet_layers_0_attention_qkv.lora_down.weight``) is resolved against the model's module names.
``alpha`` comes from, in order: the module's ``.alpha`` tensor; the safetensors metadata diffusers writes
(``lora_adapter_metadata``: ``transformer.lora_alpha``, ``transformer.alpha_pattern``, ``use_rslora``);
a PEFT folder's ``adapter_config.json``; else ``alpha = r`` (scale 1, what diffusers assumes too).
For the original layout's fused ``qkv``, ``B``'s rows split into the q, k and v matrices (one shared
``A``), which is how diffusers converts those files.

Merging is exact up to float32 rounding (the product is formed in float32 and added to the weight in
float32, then cast to the weight's dtype); the base params are not modified. DoRA adapters
(``lora_magnitude_vector``) and LoRAs of other modules (biases, norms, embeddings) are refused with the
names found.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from lumina_jax.convert.common import TensorSource, flatten, read_json, unflatten
from lumina_jax.convert.errors import CheckpointError
from lumina_jax.convert.nextdit import RULES, _part_shape, jax_shapes
from lumina_jax.models.nextdit import NextDiTConfig

log = logging.getLogger(__name__)

# prefixes stripped from module names, longest first
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_", "lora_transformer_",
             "unet.")  # fmt: skip
# text-encoder adapters some Lumina 2 LoRA files carry (sd-scripts: lora_te_*; diffusers: text_encoder.*)
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "lora_te_", "lora_te1_", "te.")
_DOWN = ("lora_A.weight", "lora_down.weight", "lora_A.default.weight")
_UP = ("lora_B.weight", "lora_up.weight", "lora_B.default.weight")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry


@dataclasses.dataclass
class LoRAModule:
    """One adapted ``nn.Linear``: ``down`` ``(r, in)``, ``up`` ``(out, r)``, ``alpha`` (``None``: r)."""

    down: np.ndarray
    up: np.ndarray
    alpha: Optional[float] = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclasses.dataclass
class LoRA:
    """A loaded adapter: ``modules`` by PyTorch module name in ``layout`` (``"diffusers"`` / ``"original"``)."""

    modules: dict[str, LoRAModule]
    layout: str
    source: str = ""

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})


# ----------------------------------------------------------------------------------------------
# reading


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def _split_key(key: str) -> tuple[str, str]:
    """``"layers.0.attn.to_q.lora_A.weight"`` -> ``("layers.0.attn.to_q", "down")``; ``kind`` is
    ``"down"``, ``"up"``, ``"alpha"``, ``"dora"`` or ``"other"``."""
    for suffixes, kind in ((_DOWN, "down"), (_UP, "up"), (("alpha",), "alpha"),
                           (("lora_magnitude_vector", "lora_magnitude_vector.weight", "dora_scale"), "dora")):  # fmt: skip
        for s in suffixes:
            if key.endswith("." + s):
                return _strip(key[: -len(s) - 1]), kind
    return _strip(key), "other"


def _module_names(layout: str, config: Optional[NextDiTConfig]) -> set[str]:
    cfg = config or NextDiTConfig(n_layers=64, n_refiner_layers=8)  # names only: enough layers for any model
    # the nn.Linear weights (stored transposed); norm weights are no LoRA targets
    return {r.key[: -len(".weight")] for r in RULES[layout](cfg) if r.key.endswith(".weight") and r.transpose}


def _peft_alpha(meta: dict[str, Any], name: str, rank: int) -> Optional[float]:
    """alpha of module ``name`` from a PEFT ``LoraConfig`` dict: an ``alpha_pattern`` key is a regex that
    must match the end of the name after a dot, exactly as PEFT matches it; ``lora_alpha`` defaults to
    PEFT's 8; ``use_rslora`` makes the scale alpha / sqrt(r)."""
    alpha = meta.get("lora_alpha", 8)
    for pattern, a in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = a
            break
    if meta.get("use_rslora"):
        return float(alpha) * rank / math.sqrt(rank)  # scale alpha / sqrt(r) expressed as alpha' / r
    return float(alpha)


def _adapter_config(src: TensorSource, path: Path) -> Optional[dict[str, Any]]:
    """The PEFT ``LoraConfig`` of the adapter, from diffusers' safetensors metadata or a PEFT folder."""
    raw = src.metadata.get(METADATA_KEY)
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt {METADATA_KEY} metadata ({e})") from None
        return {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")} or meta
    cfg = path / "adapter_config.json"  # a PEFT folder (next to a lone file it may belong to another adapter)
    if path.is_dir() and cfg.exists():
        return read_json(cfg)
    return None


def load_lora(path: Union[str, os.PathLike], config: Optional[NextDiTConfig] = None) -> LoRA:
    """Read a LoRA: a ``.safetensors`` / ``.pth`` / ``.bin`` file, or a folder holding one (diffusers'
    ``pytorch_lora_weights.safetensors``, PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``).

    ``config`` (optional, the model's): module names are checked against its layers; without it, against a
    template of 64 layers and 8 refiner layers (deeper models need the config).
    Raises :class:`~lumina_jax.convert.errors.CheckpointError` naming what is wrong: no LoRA weights,
    DoRA, unknown modules, a module with only one of its two matrices, mismatched ranks.
    """
    path = Path(path)
    src = TensorSource(path)
    groups: dict[str, dict[str, np.ndarray]] = {}
    others: list[str] = []
    text_encoder = [k for k in src.keys() if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_encoder:
        log.warning("%s: %d text-encoder LoRA tensors (e.g. %s) are ignored: only Next-DiT adapters are applied",
                    path, len(text_encoder), text_encoder[0])  # fmt: skip
    for key in src.keys():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            continue
        name, kind = _split_key(key)
        if kind == "other":
            others.append(key)
            continue
        if kind == "dora":
            raise CheckpointError(f"{path}: a DoRA adapter ({key}); only plain LoRA is supported")
        groups.setdefault(name, {})[kind] = src.get(key)
    if not groups:
        raise CheckpointError(f"{path}: no Next-DiT LoRA weights (lora_A/lora_B or lora_down/lora_up) among "
                              f"{len(src.keys())} tensors, e.g. {sorted(src.keys())[:3]}")  # fmt: skip
    if others:
        raise CheckpointError(f"{path}: {len(others)} tensors are not plain LoRA matrices, e.g. {sorted(others)[:5]} "
                              f"(full weights, LoRA biases and LyCORIS formats such as LoHa/LoKr are not "
                              f"supported)")  # fmt: skip
    layout, names = _resolve_names(list(groups), config, path)
    meta = _adapter_config(src, path)
    modules: dict[str, LoRAModule] = {}
    for raw, name in names.items():
        g = groups[raw]
        missing = [k for k in ("down", "up") if k not in g]
        if missing:
            raise CheckpointError(f"{path}: module {raw!r} lacks its {' and '.join(missing)} matrix")
        down, up = np.asarray(g["down"]), np.asarray(g["up"])
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{path}: module {raw!r}: down {down.shape} and up {up.shape} are not a rank-r pair "
                                  f"((r, in) and (out, r))")  # fmt: skip
        alpha = float(np.asarray(g["alpha"]).reshape(())) if "alpha" in g else None
        if alpha is None and meta is not None:
            alpha = _peft_alpha(meta, name, down.shape[0])
        if alpha is not None and not math.isfinite(alpha):
            raise CheckpointError(f"{path}: module {raw!r} has alpha {alpha} (not a finite number)")
        if not (np.all(np.isfinite(down)) and np.all(np.isfinite(up))):
            raise CheckpointError(f"{path}: module {raw!r} holds NaN or infinite values")
        modules[name] = LoRAModule(down, up, alpha)
    lora = LoRA(modules, layout, str(path))
    log.info("%s: LoRA of %d modules (%s layout, rank %s)", path, len(modules), layout,
             "/".join(map(str, lora.ranks)))  # fmt: skip
    return lora


def _resolve_names(raw: list[str], config: Optional[NextDiTConfig], path: Path) -> tuple[str, dict[str, str]]:
    """Pick the layout whose module names cover ``raw`` (kohya underscores resolved) -> (layout, raw->name)."""
    best: tuple[int, str, dict[str, str]] = (-1, "", {})
    for layout in ("diffusers", "original"):
        known = _module_names(layout, config)
        underscored = {k.replace(".", "_"): k for k in known}
        found = {r: r if r in known else underscored.get(r) for r in raw}
        found = {r: n for r, n in found.items() if n is not None}
        if len(found) > best[0]:
            best = (len(found), layout, found)
    n, layout, found = best
    unknown = sorted(set(raw) - set(found))
    if unknown:
        other = "original" if layout == "diffusers" else "diffusers"
        known = _module_names(other, config)
        underscored = {k.replace(".", "_") for k in known}
        if all(r in known or r in underscored for r in unknown):
            raise CheckpointError(f"{path}: the file mixes the {layout} and {other} layouts ({len(found)} {layout} "
                                  f"modules, {len(unknown)} {other} ones, e.g. {unknown[:3]}); give one adapter "
                                  f"per file")  # fmt: skip
        hint = "" if config else "; checked against a 64-layer template: pass the model config for deeper models"
        raise CheckpointError(f"{path}: {len(unknown)} LoRA modules match no Next-DiT linear layer of either layout "
                              f"(closest: {layout}{hint}): {unknown[:6]}")  # fmt: skip
    spelled: dict[str, list[str]] = {}
    for r, name in found.items():
        spelled.setdefault(name, []).append(r)
    twice = {name: rs for name, rs in spelled.items() if len(rs) > 1}
    if twice:
        name, rs = next(iter(twice.items()))
        raise CheckpointError(f"{path}: {len(twice)} modules are given twice under different spellings, e.g. "
                              f"{name!r} as {rs}; keep one")  # fmt: skip
    return layout, found


def pair_scales(paths: Sequence[str], scales: Sequence[float]) -> list[tuple[str, float]]:
    """Command-line ``--lora`` paths with their ``--lora-scale`` weights: none (1.0 each), one (for all),
    or one per path; a ``ValueError`` otherwise."""
    if scales and not paths:
        raise ValueError("--lora-scale without --lora (give the adapter with --lora PATH)")
    scales = list(scales) or [1.0]
    if len(scales) == 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise ValueError(f"{len(scales)} --lora-scale values for {len(paths)} --lora adapters (give one, or one "
                         f"per adapter)")  # fmt: skip
    bad = [s for s in scales if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"--lora-scale must be finite numbers, got {bad}")
    return list(zip(paths, (float(s) for s in scales)))


# ----------------------------------------------------------------------------------------------
# merging


def lora_updates(config: NextDiTConfig, loras: Iterable[tuple[LoRA, float]]) -> dict[str, list[tuple[Optional[int], np.ndarray, np.ndarray, float]]]:
    """``{jax_path: [(layer, down, up_rows, scale), ...]}``: what each JAX param receives, checked
    against the shapes ``config`` implies (a LoRA made for another model size is an error naming the
    module)."""
    shapes = jax_shapes(config)
    out: dict[str, list] = {}
    for lora, weight in loras:
        by_key = {r.key: r for r in RULES[lora.layout](config)}
        for name, m in lora.modules.items():
            rule = by_key.get(name + ".weight")
            if rule is None:  # layer index beyond this config's depth
                raise CheckpointError(f"{lora.source}: LoRA module {name!r} is not in this model "
                                      f"({config.n_layers} layers, {config.n_refiner_layers} refiner layers)")  # fmt: skip
            parts = [(p, _part_shape(shapes, p, rule.transpose)) for p in rule.parts]
            out_dim, in_dim = sum(s[0] for _, s in parts), parts[0][1][1]
            if m.down.shape[1] != in_dim or m.up.shape[0] != out_dim:
                raise CheckpointError(f"{lora.source}: LoRA module {name!r} maps {m.down.shape[1]} -> {m.up.shape[0]} "
                                      f"features, the model's weight {in_dim} -> {out_dim}: a LoRA for another model")  # fmt: skip
            off = 0
            for part, shp in parts:
                up = m.up[off: off + shp[0]]
                off += shp[0]
                out.setdefault(part.path, []).append((part.layer, m.down, up, weight * m.scale))
    return out


def merge_lora(params: dict, config: NextDiTConfig, loras: Union[LoRA, Sequence[tuple[LoRA, float]]],
               scale: float = 1.0, *, dtype: Any = None) -> dict:
    """``params`` (scanned Next-DiT params, host or device arrays) with the LoRA products added.

    ``loras``: one :class:`LoRA` (weighted by ``scale``) or ``[(lora, weight), ...]`` applied together.
    Each touched param is computed as ``float32(W) + sum_i weight_i * alpha_i / r_i * (B_i A_i)^T`` and
    cast to ``dtype`` (default: the param's own); untouched params are returned as they are (not copied).
    """
    pairs = [(loras, scale)] if isinstance(loras, LoRA) else list(loras)
    updates = lora_updates(config, pairs)
    flat = flatten(params)
    missing = sorted(set(updates) - set(flat))
    if missing:
        raise CheckpointError(f"params lack {missing[:4]} (unstacked layers? merge before unstack_layers)")
    out = dict(flat)
    for path, items in updates.items():
        base = flat[path]
        acc = np.array(base, dtype=np.float32)
        for layer, down, up, s in items:
            delta = (np.float32(s) * (up.astype(np.float32) @ down.astype(np.float32))).T  # (in, out)
            if layer is None:
                acc += delta
            else:
                acc[layer] += delta
        out[path] = acc.astype(dtype or getattr(base, "dtype", np.float32))
    return unflatten(out)


__all__ = ["LoRA", "LoRAModule", "load_lora", "lora_updates", "merge_lora", "pair_scales", "METADATA_KEY"]
