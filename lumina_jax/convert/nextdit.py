"""Next-DiT checkpoints: diffusers, original (Alpha-VLLM) and the project's own format, both ways.

One key mapper per format (:func:`diffusers_rules`, :func:`original_rules`) is the single source of
truth, used by loading, exporting and the parity tests. A *rule* ties one PyTorch tensor to one or
more JAX params: the PyTorch tensor is the row-concatenation of its parts, each part being a JAX param
(optionally one layer of a stacked ``nn.scan`` param), transposed when it is a ``Linear`` weight. So
the original fused ``attention.qkv.weight`` is one rule with three parts (q, k, v), with split sizes
derived from the config (``n_heads*head_dim``, ``n_kv_heads*head_dim`` twice), never hard-coded.

Loading streams: the JAX tree is preallocated in host memory and filled one PyTorch tensor at a time
(safetensors by positioned reads, ``.pth`` through torch's memory map), so peak host memory stays near
one copy of the model. Export streams the other way, one safetensors shard at a time, into a temporary
directory renamed into place only when everything succeeded.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional

import numpy as np

from lumina_jax.convert.common import (
    DIFFUSERS_INDEX,
    TensorSource,
    atomic_output,
    cast,
    flatten,
    plain_params,
    read_json,
    resolve_dtype,
    same_bits,
    to_numpy,
    unflatten,
    write_sharded_safetensors,
)
from lumina_jax.convert.errors import CheckpointError, check_keys
from lumina_jax.models.nextdit import DIFFUSERS_QK_NORM_EPS, NextDiTConfig

log = logging.getLogger(__name__)

ORIG_PREFIX = "model.diffusion_model."
JAX_MARKER = "lumina_jax.json"
Format = Literal["jax", "diffusers", "original"]


@dataclasses.dataclass(frozen=True)
class Part:
    path: str  # JAX param path, e.g. "layers/blocks/attention/q"
    layer: Optional[int] = None  # index into the stacked (scan) axis


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str  # PyTorch state-dict key
    parts: tuple[Part, ...]
    transpose: bool  # nn.Linear weight [out, in] <-> Dense kernel [in, out]


def _lin(key: str, path: str, layer: Optional[int] = None, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{key}.weight", (Part(f"{path}/kernel", layer),), True)]
    if bias:
        rules.append(Rule(f"{key}.bias", (Part(f"{path}/bias", layer),), False))
    return rules


def _vec(key: str, path: str, layer: Optional[int] = None) -> Rule:
    return Rule(key, (Part(path, layer),), False)


def _stacks(c: NextDiTConfig) -> list[tuple[str, int, bool]]:
    return [
        ("context_refiner", c.n_refiner_layers, False),
        ("noise_refiner", c.n_refiner_layers, True),
        ("layers", c.n_layers, True),
    ]


def diffusers_rules(c: NextDiTConfig) -> list[Rule]:
    """Key mapper for diffusers' ``Lumina2Transformer2DModel`` (spec §3.2)."""
    r: list[Rule] = []
    r += _lin("x_embedder", "x_embedder")
    r += _lin("time_caption_embed.timestep_embedder.linear_1", "t_embedder/linear_1")
    r += _lin("time_caption_embed.timestep_embedder.linear_2", "t_embedder/linear_2")
    r.append(_vec("time_caption_embed.caption_embedder.0.weight", "cap_norm/scale"))
    r += _lin("time_caption_embed.caption_embedder.1", "cap_linear")
    for stack, n, modulated in _stacks(c):
        for i in range(n):
            k, p = f"{stack}.{i}", f"{stack}/blocks"
            for name in ("q", "k", "v"):
                r.append(Rule(f"{k}.attn.to_{name}.weight", (Part(f"{p}/attention/{name}", i),), True))
            r += _lin(f"{k}.attn.to_out.0", f"{p}/attention/out", i, bias=False)
            r.append(_vec(f"{k}.attn.norm_q.weight", f"{p}/attention/q_norm/scale", i))
            r.append(_vec(f"{k}.attn.norm_k.weight", f"{p}/attention/k_norm/scale", i))
            for j in (1, 2, 3):
                r += _lin(f"{k}.feed_forward.linear_{j}", f"{p}/feed_forward/w{j}", i, bias=False)
            if modulated:
                r.append(_vec(f"{k}.norm1.norm.weight", f"{p}/attention_norm1/scale", i))
                r += _lin(f"{k}.norm1.linear", f"{p}/adaLN_modulation", i)
            else:
                r.append(_vec(f"{k}.norm1.weight", f"{p}/attention_norm1/scale", i))
            r.append(_vec(f"{k}.norm2.weight", f"{p}/attention_norm2/scale", i))
            r.append(_vec(f"{k}.ffn_norm1.weight", f"{p}/ffn_norm1/scale", i))
            r.append(_vec(f"{k}.ffn_norm2.weight", f"{p}/ffn_norm2/scale", i))
    r += _lin("norm_out.linear_1", "final_adaLN")
    r += _lin("norm_out.linear_2", "final_linear")
    return r


def original_rules(c: NextDiTConfig) -> list[Rule]:
    """Key mapper for the original Alpha-VLLM checkpoint (``consolidated*.pth``; spec §3.1)."""
    r: list[Rule] = []
    r += _lin("x_embedder", "x_embedder")
    r += _lin("t_embedder.mlp.0", "t_embedder/linear_1")
    r += _lin("t_embedder.mlp.2", "t_embedder/linear_2")
    r.append(_vec("cap_embedder.0.weight", "cap_norm/scale"))
    r += _lin("cap_embedder.1", "cap_linear")
    for stack, n, modulated in _stacks(c):
        for i in range(n):
            k, p = f"{stack}.{i}", f"{stack}/blocks"
            qkv = tuple(Part(f"{p}/attention/{name}", i) for name in ("q", "k", "v"))
            r.append(Rule(f"{k}.attention.qkv.weight", qkv, True))
            r += _lin(f"{k}.attention.out", f"{p}/attention/out", i, bias=False)
            if c.qk_norm:
                r.append(_vec(f"{k}.attention.q_norm.weight", f"{p}/attention/q_norm/scale", i))
                r.append(_vec(f"{k}.attention.k_norm.weight", f"{p}/attention/k_norm/scale", i))
            for j in (1, 2, 3):
                r += _lin(f"{k}.feed_forward.w{j}", f"{p}/feed_forward/w{j}", i, bias=False)
            for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
                r.append(_vec(f"{k}.{norm}.weight", f"{p}/{norm}/scale", i))
            if modulated:
                r += _lin(f"{k}.adaLN_modulation.1", f"{p}/adaLN_modulation", i)
    r.append(_vec("norm_final.weight", "norm_final"))
    r += _lin("final_layer.adaLN_modulation.1", "final_adaLN")
    r += _lin("final_layer.linear", "final_linear")
    return r


RULES = {"diffusers": diffusers_rules, "original": original_rules}


# ----------------------------------------------------------------------------------------------
# expected JAX shapes


def jax_shapes(c: NextDiTConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``path -> shape`` of the (scanned) JAX params, computed without tracing the model."""
    from lumina_jax.models.nextdit import abstract_params  # local: keeps import of this module light
    import flax.linen as nn
    import jax

    tree = nn.meta.unbox(abstract_params(c))
    return {k: tuple(v.shape) for k, v in flatten(jax.tree_util.tree_map(lambda x: x, tree)).items()}


def _part_shape(shapes: dict[str, tuple[int, ...]], part: Part, transpose: bool) -> tuple[int, ...]:
    s = shapes[part.path]
    if part.layer is not None:
        s = s[1:]
    return tuple(reversed(s)) if transpose else s


def torch_shapes(rules: list[Rule], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Expected PyTorch tensor shapes implied by the rules and the JAX shapes."""
    out = {}
    for rule in rules:
        ps = [_part_shape(shapes, p, rule.transpose) for p in rule.parts]
        out[rule.key] = (sum(s[0] for s in ps), *ps[0][1:]) if len(ps) > 1 else ps[0]
    return out


# ----------------------------------------------------------------------------------------------
# torch <-> jax through the rules


def torch_to_jax(
    get: Any, rules: list[Rule], shapes: dict[str, tuple[int, ...]], dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Fill a flat JAX param dict from ``get(torch_key) -> np.ndarray``, one tensor at a time.

    ``dtype=None`` keeps each tensor's own dtype. Params not covered by a rule (``norm_final`` for
    diffusers) are set to their initial value (ones).
    """
    dtype = resolve_dtype(dtype)
    flat: dict[str, np.ndarray] = {}
    covered = {p.path for rule in rules for p in rule.parts}
    widened: set[str] = set()
    for rule in rules:
        t = get(rule.key)
        off = 0
        for part in rule.parts:
            shp = _part_shape(shapes, part, rule.transpose)
            piece = t[off : off + shp[0]] if len(rule.parts) > 1 else t
            off += shp[0]
            piece = piece.T if rule.transpose else piece
            piece = cast(np.asarray(piece), dtype)
            if part.layer is None:
                flat[part.path] = np.ascontiguousarray(piece)
            else:
                if part.path not in flat:
                    flat[part.path] = np.empty(shapes[part.path], dtype=piece.dtype)
                elif piece.dtype != flat[part.path].dtype:  # layers stored in different dtypes (keep-dtype load)
                    wide = np.float64 if np.float64 in (piece.dtype, flat[part.path].dtype) else np.float32
                    widened.add(part.path)
                    if flat[part.path].dtype != wide:
                        flat[part.path] = flat[part.path].astype(wide)  # exact: every weight dtype fits
                flat[part.path][part.layer] = piece
    if widened:
        log.warning("layers stored in different dtypes: %d params (e.g. %s) are stacked in the widest, %s",
                    len(widened), sorted(widened)[0], ", ".join(sorted({flat[p].dtype.name for p in widened})))
    fill_dtype = dtype or next((v.dtype for v in flat.values()), np.dtype(np.float32))
    for path in shapes:
        if path not in covered:
            flat[path] = np.ones(shapes[path], dtype=fill_dtype)
    return flat


def jax_to_torch(flat: dict[str, Any], rules: list[Rule], dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch_key, array)`` for every rule, one tensor at a time (PyTorch layout)."""
    dtype = resolve_dtype(dtype)
    for rule in rules:
        pieces = []
        for part in rule.parts:
            if part.path not in flat:
                raise CheckpointError(f"JAX params lack {part.path!r} needed for {rule.key!r}")
            a = flat[part.path]
            # one layer of a stacked weight is taken before the host copy: jax arrays keep the host copy
            # of what np.asarray read, which for the whole stack would be a second copy of the model
            a = to_numpy(a[part.layer] if part.layer is not None else a)
            pieces.append(a.T if rule.transpose else a)
        t = np.concatenate(pieces, 0) if len(pieces) > 1 else pieces[0]
        yield rule.key, np.ascontiguousarray(cast(t, dtype))


def jax_to_torch_specs(flat: dict[str, Any], rules: list[Rule], dtype: Any = None) -> list[tuple[str, tuple, np.dtype]]:
    """``(key, shape, dtype)`` of every tensor :func:`jax_to_torch` will yield, in order (for streaming)."""
    dt = resolve_dtype(dtype)
    shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
    out = []
    by_key = rules_by_key(rules)
    for key, shape in torch_shapes(rules, shapes).items():
        # a fused tensor (the original's qkv) of parts in different dtypes is their promotion, as the
        # concatenation in jax_to_torch makes it
        src = np.result_type(*(np.dtype(getattr(flat[p.path], "dtype", np.float32)) for p in by_key[key].parts))
        floating = np.issubdtype(src, np.floating) or src == np.dtype("bfloat16")
        out.append((key, shape, dt if (dt is not None and floating) else src))
    return out


def rules_by_key(rules: list[Rule]) -> dict[str, Rule]:
    return {r.key: r for r in rules}


# ----------------------------------------------------------------------------------------------
# format detection and config inference


def detect_format(path: str | os.PathLike) -> Format:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        other = _other_component(p)
        if other is not None:
            raise CheckpointError(f"{p} is {other}, not a Next-DiT checkpoint (read text encoders with "
                                  f"lumina_jax.convert.load_text_encoder, VAEs with load_vae, captioners with "
                                  f"load_captioner; `python -m lumina_jax convert` converts text encoders and VAEs "
                                  f"too)")  # fmt: skip
        if (p / JAX_MARKER).exists():
            return "jax"
        cfg = p / "config.json"
        if cfg.exists() and "Lumina2Transformer2DModel" in cfg.read_text():
            return "diffusers"
        if list(p.glob("diffusion_pytorch_model*.safetensors")):
            return "diffusers"
        if (p / "transformer").is_dir():
            raise CheckpointError(f"{p} looks like a whole pipeline; pass {p / 'transformer'} for the transformer")
        if _consolidated_files(p):
            return "original"
        run = p if (p / "checkpoints").is_dir() else p.parent if p.name == "checkpoints" else None
        if run is not None:
            raise CheckpointError(f"{p} is a training run; write its weights as a checkpoint first: "
                                  f"python -m lumina_jax train export {run} OUT")
        raise CheckpointError(f"{p}: cannot tell the checkpoint format (no {JAX_MARKER}, config.json or consolidated*)")
    if p.suffix.lower() in WEIGHT_FILE_SUFFIXES:
        return "original"
    raise CheckpointError(f"{p}: unknown checkpoint file type {p.suffix!r}")


WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _consolidated_files(folder: Path) -> list[Path]:
    """The folder's ``consolidated*`` weight files, ``.safetensors`` before ``.pth`` (suffixes in any case, as
    the writers take them)."""
    found = [f for f in folder.iterdir() if f.name.startswith("consolidated") and f.is_file()]
    return sorted(f for f in found if f.suffix.lower() == ".safetensors") + sorted(
        f for f in found if f.suffix.lower() == ".pth")


def original_target(path: str | os.PathLike, name: str = "consolidated.00-of-01.pth") -> Path:
    """Where an original-format export of ``path`` goes: ``path`` itself when it names a weights file
    (one of :data:`WEIGHT_FILE_SUFFIXES`, and not an existing folder), else ``path/name`` (so that a folder
    such as ``lumina.v2`` is written into, never replaced); a folder already holding another
    ``consolidated*`` file of the same kind (main or EMA) is a :class:`CheckpointError` (reading it
    would not give the export)."""
    path = Path(path)
    if path.suffix.lower() in WEIGHT_FILE_SUFFIXES and not path.is_dir():
        folder, name, target = path.parent, path.name, path
    else:
        folder, target = path, path / name
    if folder.is_dir() and name.startswith("consolidated"):
        ema = name.startswith("consolidated_ema")  # the main and the EMA weights are read apart (original_weights_file)
        others = sorted(f.name for f in folder.iterdir() if f.name != name and f.name.startswith("consolidated")
                        and f.name.startswith("consolidated_ema") == ema and f.suffix.lower() in (".safetensors", ".pth"))  # fmt: skip
        if others:  # reading the folder would give one of them (or refuse to choose), not this export
            raise CheckpointError(f"{folder} already holds {others}: a {name} next to them would not be what "
                                  f"reading the folder gives; write to another folder, or give the file a name "
                                  f"that does not start with 'consolidated'")  # fmt: skip
    return target


def _other_component(d: Path) -> Optional[str]:
    """What a folder holds when it is another model than a Next-DiT (the project's text encoder / VAE /
    captioner folders share its marker file; transformers and diffusers folders have a config.json)."""
    try:
        if (d / JAX_MARKER).is_file():
            model = json.loads((d / JAX_MARKER).read_text()).get("model", "nextdit")
            return None if model == "nextdit" else f"the project's {model!r} component"
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            if cfg.get("_class_name") not in (None, "Lumina2Transformer2DModel"):
                return f"a diffusers {cfg['_class_name']}"
            if "_class_name" not in cfg and cfg.get("model_type"):
                return f"a transformers {cfg['model_type']!r} model"
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: the loader names the problem
    return None


def original_weights_file(path: str | os.PathLike) -> Path:
    """The file an original checkpoint ``path`` (a file, or a folder of ``consolidated*`` files) is read
    from: in a folder, ``consolidated.*`` rather than the EMA weights ``consolidated_ema.*`` (pass that
    file itself to read them; a folder with only EMA weights is read from them), ``.safetensors`` before
    ``.pth``. Model-parallel shards (``consolidated.00-of-02.pth``, ...) are a :class:`CheckpointError`:
    how their tensors were split is not recorded, so they cannot be merged here."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = _consolidated_files(path)
        if not files:
            raise CheckpointError(f"{path}: no consolidated*.safetensors or consolidated*.pth file")
    shards = [f.name for f in files if (m := re.search(r"\.\d+-of-(\d+)\.", f.name)) and int(m.group(1)) > 1]
    if shards:
        raise CheckpointError(f"{path}: model-parallel shards {shards} are not supported (how their tensors were "
                              f"split is not recorded); merge them into one consolidated.00-of-01 file first")
    if not path.is_dir():
        return path
    main = [f for f in files if not f.name.startswith("consolidated_ema")]
    ema = [f for f in files if f not in main]
    for group in (main, ema):
        if not group:
            continue
        stems = {f.stem for f in group}
        if len(stems) > 1:
            raise CheckpointError(f"{path}: several weights files ({[f.name for f in group]}); pass the one to read")
        if len(group) > 1:  # the same weights in both formats, as releases often ship them
            log.warning("%s: reading %s, not %s (pass that file to read it)", path, group[0].name,
                        ", ".join(f.name for f in group[1:]))  # fmt: skip
        if main and ema:
            log.info("reading %s; the EMA weights (%s) are read when that file is passed", group[0].name,
                     ", ".join(f.name for f in ema))  # fmt: skip
        return group[0]  # .safetensors sorts first
    raise AssertionError("unreachable")


def _original_source(path: Path, pth_key: Optional[str] = None) -> TensorSource:
    f = original_weights_file(path)
    if pth_key is not None and f.suffix.lower() not in (".pth", ".pt", ".bin"):
        raise CheckpointError(f"{f}: pth_key {pth_key!r} picks a state dict of a .pth file; this one is {f.suffix}")
    return TensorSource(f, pth_key=pth_key)


class _Prefixed:
    """View of a TensorSource with a ``model.diffusion_model.`` prefix stripped: when any key has it (a
    ComfyUI-style all-in-one file), only those keys are the transformer's; the others (``vae.*``,
    ``text_encoders.*``, ...) are ignored, and logged."""

    def __init__(self, src: TensorSource):
        self.src = src
        keys = src.keys()
        self.prefix = ORIG_PREFIX if any(k.startswith(ORIG_PREFIX) for k in keys) else ""
        others = [k for k in keys if not k.startswith(self.prefix)]
        if others:
            log.info("%s: reading the %d %s* tensors; ignoring %d others (%s)", src.path, len(keys) - len(others),
                     ORIG_PREFIX, len(others), ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""))

    def keys(self) -> list[str]:
        return [k[len(self.prefix) :] for k in self.src.keys() if k.startswith(self.prefix)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k[len(self.prefix) :]: s for k, s in self.src.shapes().items() if k.startswith(self.prefix)}

    def get(self, key: str) -> np.ndarray:
        return self.src.get(self.prefix + key)


def infer_original_config(shapes: dict[str, tuple[int, ...]], patch_size: int = 2) -> NextDiTConfig:
    """Infer the architecture of an original checkpoint from its tensor shapes.

    Head dim comes from ``q_norm`` (qk_norm checkpoints); the RoPE split is equal thirds (as in every
    original config). Pass an explicit config for anything else.
    """
    if any(k.startswith("time_caption_embed.") for k in shapes):
        raise CheckpointError("this is a diffusers Lumina2Transformer2DModel weights file, not an original "
                              "checkpoint: pass its folder (with config.json)")  # fmt: skip
    if "layers.0.attention.qkv.weight" in shapes and "layers.0.attention.q_norm.weight" not in shapes:
        raise CheckpointError("checkpoint has no q_norm weights: cannot infer head_dim; pass config=")
    try:
        dim, patch_feats = shapes["x_embedder.weight"]
        n_layers = _layer_count(shapes, "layers")
        n_ref = _layer_count(shapes, "noise_refiner")
        # sizes every layer has, taken from the most common shape: a lone mis-shaped tensor is then the one
        # the key check names (not all the others)
        hd = _common_shape(shapes, "attention.q_norm.weight")[0]
        qkv_rows = _common_shape(shapes, "attention.qkv.weight")[0]
        ffn = _common_shape(shapes, "feed_forward.w1.weight")[0]
        out_feats = shapes["final_layer.linear.weight"][0]
        cap_dim = shapes["cap_embedder.1.weight"][1]
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"not an original Next-DiT checkpoint (cannot infer its config: no tensor {e})") from None
    except ValueError:  # no blocks at all
        raise CheckpointError("not an original Next-DiT checkpoint (cannot infer its config: no layers.N.* or "
                              "noise_refiner.N.* tensors)") from None  # fmt: skip
    n_heads = dim // hd
    n_kv = (qkv_rows - dim) // (2 * hd)
    if hd % 3 or (hd // 3) % 2:
        raise CheckpointError(f"head_dim {hd} has no equal 3-axis RoPE split; pass config=")
    multiple_of, mult = None, None
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if m * ((4 * dim + m - 1) // m) == ffn:
            multiple_of = m
            break
    if multiple_of is None:  # ffn_dim_multiplier: int(mult * 4 * dim) must give ffn back, not ffn - 1
        multiple_of, mult = 1, (ffn + 0.5) / (4 * dim)
    config = NextDiTConfig(
        patch_size=patch_size,
        in_channels=patch_feats // patch_size**2,
        out_channels=out_feats // patch_size**2,
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_ref,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        cap_feat_dim=cap_dim,
        axes_dims=(hd // 3,) * 3,
    )
    if config.ffn_hidden != ffn:
        raise CheckpointError(f"cannot infer the feed-forward config of width {ffn} for dim {dim}; pass config=")
    return config


def _layer_count(shapes: Mapping[str, tuple], stack: str) -> int:
    """The number of ``<stack>.N.*`` blocks; indices must run 0..N-1 with the same tensors in each, else a
    :class:`CheckpointError` naming the stray or missing ones."""
    keys: dict[int, set[str]] = collections.defaultdict(set)
    for k in shapes:
        parts = k.split(".")
        if parts[0] == stack and len(parts) > 2 and parts[1].isdigit():
            keys[int(parts[1])].add(".".join(parts[2:]))
    if not keys:
        raise ValueError(stack)  # (max() of nothing before) -> "no layers.N.* tensors"
    n = max(keys) + 1
    full = collections.Counter(frozenset(v) for v in keys.values()).most_common(1)[0][0]
    odd = []
    for i in range(n):
        have = keys.get(i, set())
        if have == full:
            continue
        lacks, extra = sorted(full - have), sorted(have - full)
        odd.append(f"{stack}.{i}: " + ("no tensors" if not have else
                   f"lacks {', '.join(lacks[:3])}" if lacks else f"has extra {', '.join(extra[:3])}"))  # fmt: skip
    if odd:
        raise CheckpointError(f"{stack}.N blocks 0..{n - 1} do not all hold the same tensors ({'; '.join(odd[:4])}); "
                              f"a stray or missing key? (or pass config=)")  # fmt: skip
    return n


def _common_shape(shapes: Mapping[str, tuple], suffix: str) -> tuple:
    """The most common shape of ``<stack>.N.<suffix>`` over the blocks of every stack (main layers and
    refiners have the same width; ``KeyError`` if none has it)."""
    found = [tuple(v) for k, v in shapes.items() if k.startswith(("layers.", "noise_refiner.", "context_refiner."))
             and k.endswith("." + suffix) and k.count(".") == suffix.count(".") + 2]  # fmt: skip
    if not found:
        raise KeyError(f"layers.0.{suffix}")
    return collections.Counter(found).most_common(1)[0][0]


def _config_of(f: Path, make: Any) -> NextDiTConfig:
    """``make()``, a config read from ``f``; an invalid one is a :class:`CheckpointError` naming ``f``."""
    try:
        return make()
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{f}: not a valid Next-DiT config ({e})") from None


def recorded_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config fields a checkpoint itself records, as :meth:`NextDiTConfig.to_dict` values: all of them for
    the project's format and for our original-format exports, the ones diffusers' ``config.json`` has (sizes,
    ``norm_eps``, RoPE axes and table) for a diffusers folder, none for an original file that stores none
    (its shapes are checked when it is read). For checking a checkpoint against a config given for it."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "jax":
        return NextDiTConfig.from_dict(read_json(path / JAX_MARKER, key="config")["config"]).to_dict()
    if fmt == "diffusers":
        d = read_json(path / "config.json")
        full = NextDiTConfig.from_diffusers_config(d).to_dict()
        return {ours: full[ours] for theirs, ours in NextDiTConfig._DIFFUSERS_KEYS.items() if theirs in d}
    stored = _stored_config(_original_source(path))
    return {} if stored is None else stored.to_dict()


def _contradictions(path: Path, config: NextDiTConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (in config.json, given)}`` where a diffusers folder's config.json and a config given for it
    describe different models: sizes, eps, RoPE (``out_channels`` as the effective count; the metadata
    fields, e.g. the default image size, are not the model). None when config.json is missing or unusable
    (the given config is then what describes the weights)."""
    try:
        recorded = recorded_config(path)
    except (OSError, ValueError):
        return {}
    ours = config.to_dict()
    recorded.pop("out_channels", None)
    out = {k: (v, ours.get(k)) for k, v in recorded.items()
           if k not in NextDiTConfig.METADATA_FIELDS and ours.get(k) != v}  # fmt: skip
    theirs = NextDiTConfig.from_diffusers_config(read_json(path / "config.json"))
    if theirs.out_ch != config.out_ch:
        out["out_channels"] = (theirs.out_ch, config.out_ch)
    return out


def _stored_config(src: TensorSource) -> Optional[NextDiTConfig]:
    """The config our original-format export stores in its metadata (``lumina_jax_config``: the
    safetensors ``__metadata__``, or the ``.pth`` archive's metadata record), so that a
    reload does not have to infer it from the shapes (patch size, RoPE split, eps and table sizes are
    not in them); ``None`` for other files."""
    if src.metadata_error is not None:
        raise CheckpointError(f"{src.metadata_error}; pass config= (--config) to read the weights without it")
    text = src.metadata.get("lumina_jax_config")
    if text is None:
        return None
    try:
        return NextDiTConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{src.path}: its stored lumina_jax_config is not a valid config ({e}); pass "
                              f"config= (--config) to override it") from None


# ----------------------------------------------------------------------------------------------
# public API


def load_transformer_config(path: str | os.PathLike) -> NextDiTConfig:
    """The config :func:`load_transformer` would use for ``path`` (no ``config`` given), without reading
    any weights: the stored one (project folder, diffusers ``config.json``, our original exports), else
    inferred from an original file's tensor shapes."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "jax":
        marker = path / JAX_MARKER
        return _config_of(marker, lambda: NextDiTConfig.from_dict(read_json(marker, key="config")["config"]))
    if fmt == "diffusers":
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: diffusers directory without config.json")
        return _config_of(cfg_file, lambda: NextDiTConfig.from_diffusers_config(read_json(cfg_file)))
    src = _Prefixed(_original_source(path))
    return _stored_config(src.src) or infer_original_config(src.shapes())


def load_transformer(
    path: str | os.PathLike,
    *,
    config: Optional[NextDiTConfig] = None,
    dtype: Any = "fp32",
    pth_key: Optional[str] = None,
) -> tuple[NextDiTConfig, dict]:
    """Load a Next-DiT checkpoint of any supported format -> ``(config, params)`` (host NumPy arrays).

    Formats (detected from ``path``): the project's own directory (``lumina_jax.json`` + orbax), a
    diffusers ``transformer/`` directory (config.json + safetensors), or an original checkpoint (a
    ``.pth``/``.safetensors`` file, or a directory with ``consolidated*``; the config is the one our
    export stores in the file's metadata, else inferred from the shapes, unless ``config`` is
    given, which may change a stored config's RoPE table size but nothing else that it holds (as with
    a diffusers folder's config.json); ``model.diffusion_model.`` prefixes are stripped).
    ``dtype`` is the param dtype (``"fp32"`` default; ``None`` keeps the checkpoint's). ``pth_key`` picks
    the state dict of a ``.pth`` that wraps several (``"ema"`` of ``{"model": ..., "ema": ...}``; without
    it such a file reads ``"model"``, and a file wrapping a single one reads that).
    """
    path = Path(path)
    fmt = detect_format(path)
    if pth_key is not None and fmt != "original":
        raise ValueError(f"pth_key is for original .pth checkpoints; {path} is a {fmt} checkpoint")
    if fmt == "jax":
        if config is not None:
            raise ValueError(f"config= is for original and diffusers checkpoints; {path} is a project checkpoint, "
                             "which stores its own config")  # fmt: skip
        return _load_jax(path, dtype)
    if fmt == "diffusers":
        if config is None:
            config = load_transformer_config(path)
        else:  # it may add what config.json cannot hold (e.g. qk_norm_eps), not contradict what it holds
            differ = _contradictions(path, config)
            if differ:
                raise CheckpointError(f"{path / 'config.json'} disagrees with the config given for it: "
                                      + ", ".join(f"{k} {a!r} there, {b!r} given" for k, (a, b) in differ.items())
                                      + "; drop config= (--config) or fix it")  # fmt: skip
        src: Any = TensorSource(path)
    else:
        src = _Prefixed(_original_source(path, pth_key))
        if config is None:
            config = _stored_config(src.src) or infer_original_config(src.shapes())
        else:  # the config our export stored may be extended (a larger RoPE table: axes_lens) but not
            try:  # contradicted where it changes the weights' outputs (RoPE split and theta, eps: shapes do not
                stored = _stored_config(src.src)  # show them); one that cannot be read is what config= replaces
            except CheckpointError:
                stored = None
            if stored is not None:
                theirs, ours = stored.to_dict(), config.to_dict()
                free = {"axes_lens", *NextDiTConfig.METADATA_FIELDS}
                differ = {k: (v, ours.get(k)) for k, v in theirs.items() if k not in free and ours.get(k) != v}
                if differ:
                    raise CheckpointError(f"{path}: the config stored with the weights disagrees with the config "
                                          "given for it: " + ", ".join(f"{k} {a!r} stored, {b!r} given"
                                                                        for k, (a, b) in differ.items())
                                          + "; drop config= (--config) or fix it")  # fmt: skip
    found = src.shapes()
    # norm_final is unused by the forward; tolerate repackaged original files that dropped it.
    rules = [r for r in RULES[fmt](config) if r.key in found or r.key != "norm_final.weight"]
    shapes = jax_shapes(config)
    check_keys(torch_shapes(rules, shapes), found, f"{path} ({fmt} Next-DiT)")
    flat = torch_to_jax(src.get, rules, shapes, dtype)
    return config, unflatten(flat)


def save_transformer(
    path: str | os.PathLike,
    config: NextDiTConfig,
    params: dict,
    format: Format = "jax",
    *,
    dtype: Any = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write ``params`` in ``format`` to ``path`` atomically (nothing at ``path`` unless all succeeded).

    - ``"jax"``: a directory with ``lumina_jax.json`` (config) and an orbax checkpoint of the params.
    - ``"diffusers"``: a ``Lumina2Transformer2DModel`` directory (``from_pretrained`` loads it).
    - ``"original"``: a single file; ``.safetensors`` or ``.pth`` by the suffix of ``path`` (a folder, or
      a path without a weights-file suffix, becomes ``path/consolidated.00-of-01.pth``: :func:`original_target`);
      ``norm_final.weight`` is written too (the original loads strictly).
    ``dtype``: ``"fp32"``/``"bf16"``/``"fp16"``/``None`` (keep the params' dtype).
    """
    path = Path(path)
    if format != "jax":
        config.require_velocity_head(f"the {format!r} format")
    flat = flatten(plain_params(params))
    shapes = jax_shapes(config)
    check_keys(shapes, {k: tuple(np.shape(v)) for k, v in flat.items()}, "params to save")
    if format == "jax":
        empty = sorted(k for k, v in flat.items() if np.size(v) == 0)
        if empty:  # orbax cannot save empty arrays (e.g. the stacked refiners of n_refiner_layers: 0)
            raise ValueError(f"the jax format cannot hold the empty params {empty[:3]} (n_refiner_layers="
                             f"{config.n_refiner_layers}?); save this model as 'diffusers' or 'original'")
        with atomic_output(path, overwrite=overwrite) as tmp:
            _save_jax(tmp, config, flat, dtype)
        return path
    if format == "diffusers":
        if config.qk_norm_eps != DIFFUSERS_QK_NORM_EPS:
            log.warning("diffusers' Lumina2Transformer2DModel fixes the q/k RMSNorm eps at %g; this model uses %g, "
                        "which its config.json cannot carry: diffusers (and a reload of %s here) will run it with "
                        "%g (a small change where the q/k mean square is far above the eps)", DIFFUSERS_QK_NORM_EPS,
                        config.qk_norm_eps, path, DIFFUSERS_QK_NORM_EPS)  # fmt: skip
        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text(json.dumps(config.to_diffusers_config(), indent=2))
            rules = diffusers_rules(config)
            write_sharded_safetensors(
                jax_to_torch(flat, rules, dtype), tmp, specs=jax_to_torch_specs(flat, rules, dtype),
                weights_name="diffusion_pytorch_model.safetensors", index_name=DIFFUSERS_INDEX,
                max_shard_bytes=max_shard_bytes,
            )  # fmt: skip
        return path
    if format == "original":
        target = original_target(path)
        with atomic_output(target, overwrite=overwrite) as tmp:
            rules = original_rules(config)
            tensors, specs = jax_to_torch(flat, rules, dtype), jax_to_torch_specs(flat, rules, dtype)
            meta = {"lumina_jax_config": json.dumps(config.to_dict())}
            if target.suffix.lower() == ".safetensors":  # both streamed: one tensor in memory at a time
                from lumina_jax.convert.safetensors_io import save_file_streaming

                save_file_streaming(tmp, specs, tensors, metadata=meta)
            else:
                from lumina_jax.convert.torch_io import save_pth_streaming

                save_pth_streaming(tmp, specs, tensors, metadata=meta)
        return target
    raise ValueError(f"unknown format {format!r}; choose 'jax', 'diffusers' or 'original'")


def verify_transformer(path: str | os.PathLike, config: NextDiTConfig, params: dict, format: Format, *,
                       dtype: Any = None) -> int:
    """Read a :func:`save_transformer` output back and check that it holds exactly ``params`` (cast to
    ``dtype`` as the export did; bit for bit) and ``config``; returns the number of tensors checked.

    Tensors are compared one at a time for the diffusers and original formats (one tensor in memory
    besides ``params``); the project's format is restored whole (a second copy of the model). A
    difference is a :class:`CheckpointError` naming the tensors (up to 5) or the config fields.
    """
    path = Path(path)
    flat = flatten(plain_params(params))
    if format == "jax":
        got_config, got = _load_jax(path, None)
        got_flat = flatten(got)
        pairs: Iterator[tuple[str, np.ndarray, np.ndarray]] = (
            (k, cast(to_numpy(v), resolve_dtype(dtype)), got_flat[k]) for k, v in flat.items())  # fmt: skip
        expected_keys, found_keys = set(flat), set(got_flat)
    else:
        if format == "diffusers":  # config.json holds what diffusers knows (e.g. not the original's eps)
            want = json.loads(json.dumps(config.to_diffusers_config()))
            written = read_json(path / "config.json")
            if written != want:
                raise CheckpointError(f"{path / 'config.json'}: differs from the model's config in "
                                      f"{sorted(k for k in want.keys() | written.keys() if want.get(k) != written.get(k))}")
            got_config = config
            src: Any = TensorSource(path)
        else:
            src = _Prefixed(_original_source(path))
            got_config = _stored_config(src.src)
        rules = RULES[format](config)
        pairs = ((k, want, src.get(k)) for k, want in jax_to_torch(flat, rules, dtype))
        expected_keys, found_keys = {r.key for r in rules}, set(src.keys())
    if got_config != config:
        fields = [f.name for f in dataclasses.fields(config) if getattr(got_config, f.name, None) != getattr(config, f.name)]
        raise CheckpointError(f"{path}: the stored config differs from the model's in {fields or 'its presence'}")
    if expected_keys != found_keys:
        raise CheckpointError(f"{path}: tensors missing {sorted(expected_keys - found_keys)[:5]}, "
                              f"unexpected {sorted(found_keys - expected_keys)[:5]}")  # fmt: skip
    bad, n = [], 0
    for key, want, got_arr in pairs:
        n += 1
        same_kind = want.dtype == got_arr.dtype and want.shape == got_arr.shape
        if not same_kind or not same_bits(want, got_arr):
            bad.append(f"{key} ({want.dtype} {want.shape} expected, {got_arr.dtype} {got_arr.shape} read"
                       f"{'' if not same_kind else ', other values'})")
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors differ from the params written: {bad[:5]}")
    return n


# ----------------------------------------------------------------------------------------------
# the project's own format (orbax)


def _save_jax(tmp: Path, config: NextDiTConfig, flat: dict, dtype: Any) -> None:
    import orbax.checkpoint as ocp

    dt = resolve_dtype(dtype)
    tree = unflatten({k: cast(to_numpy(v), dt) for k, v in flat.items()})
    tmp.mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((tmp / "params").absolute(), tree)
    ckptr.wait_until_finished()
    (tmp / JAX_MARKER).write_text(json.dumps({"model": "nextdit", "config": config.to_dict()}, indent=2))


def _load_jax(path: Path, dtype: Any) -> tuple[NextDiTConfig, dict]:
    import orbax.checkpoint as ocp

    config = load_transformer_config(path)
    if not (path / "params").exists():
        raise CheckpointError(f"{path}: missing params/ (incomplete checkpoint)")
    try:
        tree = ocp.StandardCheckpointer().restore((path / "params").absolute())
    except Exception as e:  # orbax raises various types for damaged checkpoints
        raise CheckpointError(f"{path}: cannot restore params ({type(e).__name__}: {e})") from None
    flat = {k: np.asarray(v) for k, v in flatten(tree).items()}
    check_keys(jax_shapes(config), {k: v.shape for k, v in flat.items()}, f"{path} (lumina_jax Next-DiT)")
    dt = resolve_dtype(dtype)
    return config, unflatten({k: cast(v, dt) for k, v in flat.items()})
