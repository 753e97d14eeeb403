"""Every component of a Lumina-Image 2.0 model, from a diffusers pipeline directory or the project's own
layout, with an optional converted-weights cache.

Layouts read by :func:`load_components`:

- **diffusers** (``Lumina2Pipeline.save_pretrained``, the ``Alpha-VLLM/Lumina-Image-2.0`` hub repo)::

      model_index.json  transformer/  text_encoder/  tokenizer/  vae/  scheduler/

  Each part goes through its own converter: :func:`lumina_jax.convert.nextdit.load_transformer`,
  :func:`lumina_jax.convert.gemma2.load_text_encoder`, :func:`lumina_jax.text.load_tokenizer`,
  :func:`lumina_jax.convert.vae.load_vae`; ``scheduler/scheduler_config.json`` is read as a dict (its
  ``shift`` is the default time shift); ``model_index.json``'s ``_lumina_jax`` key, when there, holds the
  project's settings that diffusers has no place for (default system prompt, guidance scale, image size).
- **lumina_jax** (written by :func:`save_components`): ``lumina_jax_pipeline.json`` plus one directory per
  component; every weight is an orbax checkpoint (``transformer/`` is the Next-DiT ``"jax"`` format,
  ``text_encoder/`` and ``vae/`` hold ``lumina_jax.json`` with the config and ``params/``), the tokenizer
  is a ``save_pretrained`` folder and the scheduler its JSON. Loading it needs neither torch nor
  conversion.

:func:`save_components` writes either layout (``layout="diffusers"``: a folder diffusers'
``Lumina2Pipeline.from_pretrained`` loads), so a model moves between the two whole and bit-exact.

``transformer=`` replaces the transformer with any checkpoint :func:`load_transformer` reads (an
original ``consolidated*.pth``, a diffusers ``transformer/`` folder, a project checkpoint), so e.g. a
fine-tuned original checkpoint runs with the text encoder and VAE of a pipeline directory.

``cache=True`` (or a directory) stores the converted components of a diffusers directory in the
lumina_jax layout under a key made of the source path and the sizes and modification times of the
files the load reads (``model_index.json`` and the component folders, through links; not ``.git/`` or
READMEs), and loads from there next time (no torch, no key mapping). An entry that cannot be read
(damaged, or written by another version) is dropped with a warning and the source converted again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from lumina_jax.convert.common import (
    atomic_output,
    cast,
    flatten,
    read_json,
    resolve_dtype,
    same_bits,
    to_numpy,
    unflatten,
)
from lumina_jax.convert.errors import CheckpointError, check_keys
from lumina_jax.models.gemma2 import Gemma2Config
from lumina_jax.models.nextdit import NextDiTConfig
from lumina_jax.models.vae import VAEConfig

log = logging.getLogger(__name__)

Params = dict[str, Any]
Layout = Literal["diffusers", "lumina_jax"]
PIPELINE_MARKER = "lumina_jax_pipeline.json"
COMPONENT_MARKER = "lumina_jax.json"
SETTINGS_KEY = "_lumina_jax"  # the project's settings in a diffusers model_index.json (diffusers skips "_" keys)
LAYOUT_VERSION = 1
REQUIRED = ("transformer", "text_encoder", "tokenizer", "vae")
DIFFUSERS_PIPELINE_CLASSES = ("Lumina2Pipeline", "Lumina2Text2ImgPipeline")
DEFAULT_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 6.0,
    "use_dynamic_shifting": False,
}  # fmt: skip
DEFAULT_GUIDANCE_SCALE = 4.0  # diffusers' Lumina2Pipeline default
HUB_PATTERNS = ["model_index.json", "transformer/*", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*"]


def cache_home() -> Path:
    """Root of the project's caches: ``$LUMINA_JAX_CACHE`` or ``~/.cache/lumina_jax``."""
    return Path(os.environ.get("LUMINA_JAX_CACHE") or Path.home() / ".cache" / "lumina_jax").expanduser()


@dataclasses.dataclass
class Components:
    """Everything a pipeline needs; params are host NumPy trees."""

    transformer_config: NextDiTConfig
    transformer: Params
    text_encoder_config: Gemma2Config
    text_encoder: Params
    tokenizer: Any
    vae_config: VAEConfig
    vae: Params
    scheduler: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    default_image_size: int = 1024
    source: str = ""
    layout: str = ""
    # The prefix the model was trained with (a template name of lumina_jax.text_templates.SYSTEM_PROMPTS or
    # a prefix); the pipeline's default when a call passes none. "real" (the released model's) unless the
    # model directory says otherwise (the bundled shapes model is trained with "empty").
    system_prompt: str = "real"
    # The CFG scale the pipeline uses when a call passes none: 4.0 (diffusers' default, the released model's
    # recommendation) unless the model directory records another (the bundled shapes model: 2.5).
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE

    @property
    def time_shift(self) -> float:
        """The scheduler's ``shift`` (6.0 for the released model)."""
        return float(self.scheduler.get("shift", DEFAULT_SCHEDULER["shift"]))

    def check(self) -> None:
        """Cross-component consistency: caption width = encoder width, latent channels agree."""
        t, g, v = self.transformer_config, self.text_encoder_config, self.vae_config
        if t.cap_feat_dim != g.hidden_size:
            raise CheckpointError(f"transformer cap_feat_dim={t.cap_feat_dim} but the text encoder's hidden size "
                                  f"is {g.hidden_size}")
        if t.in_channels != v.latent_channels:
            raise CheckpointError(f"transformer in_channels={t.in_channels} but the VAE has "
                                  f"{v.latent_channels} latent channels")
        if len(self.tokenizer) > g.vocab_size:
            raise CheckpointError(f"tokenizer has {len(self.tokenizer)} tokens, the text encoder only "
                                  f"{g.vocab_size} embeddings")


# ----------------------------------------------------------------------------------------------
# layout detection


def detect_layout(path: str | os.PathLike) -> Layout:
    """``"lumina_jax"`` or ``"diffusers"``; a :class:`CheckpointError` names what is missing otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory")
    if not p.is_dir():
        raise CheckpointError(f"{p}: a whole model is a directory (for a single transformer checkpoint pass it "
                              f"as transformer= together with a pipeline directory)")
    if (p / PIPELINE_MARKER).exists():
        layout: Layout = "lumina_jax"
    else:
        idx = p / "model_index.json"
        if idx.exists():
            cls = read_json(idx).get("_class_name", "")
            if cls not in DIFFUSERS_PIPELINE_CLASSES:
                raise CheckpointError(f"{idx}: pipeline class {cls!r} is not Lumina2Pipeline")
        elif not any((p / c).is_dir() for c in REQUIRED):
            raise CheckpointError(
                f"{p}: not a Lumina-Image 2.0 model directory (no {PIPELINE_MARKER}, no model_index.json and "
                f"none of {list(REQUIRED)}); found: {sorted(q.name for q in p.iterdir())[:20]}")
        layout = "diffusers"
    missing = [c for c in REQUIRED if not (p / c).is_dir()]
    if missing:
        raise CheckpointError(
            f"{p}: incomplete {layout} model directory: missing component(s) {missing} "
            f"(a pipeline needs {', '.join(c + '/' for c in REQUIRED)} and optionally scheduler/)")
    return layout


def resolve_pretrained(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id downloaded with ``huggingface_hub.snapshot_download``
    (only the diffusers component folders; needs network or the HF cache)."""
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        return p
    s = str(path_or_hub_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"{s}: no such directory (and not a hub id of the form 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth: all end here with the reason
        raise CheckpointError(f"{s!r} is not a local directory and could not be fetched from the Hugging Face "
                              f"hub ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------
# loading


def load_components(
    path: str | os.PathLike,
    *,
    transformer: Optional[str | os.PathLike] = None,
    dtype: Any = "fp32",
    cache: Union[bool, str, os.PathLike] = False,
) -> Components:
    """Load every component of a Lumina-Image 2.0 model directory (see the module docstring).

    Args:
      path: a diffusers pipeline directory, a lumina_jax layout directory, or a hub id.
      transformer: optional checkpoint that replaces the directory's transformer (any format).
      dtype: weight dtype of the returned params (``"fp32"``, ``"bf16"``; ``None`` keeps each stored dtype).
      cache: for diffusers directories, ``True`` caches the converted weights under
        ``cache_home()/converted`` (a directory path chooses another root); the next load reads the cache.
    Raises:
      CheckpointError: missing component, unknown layout, or keys/shapes that do not match.
    """
    root = resolve_pretrained(path)
    layout = detect_layout(root)
    own_weights = transformer is None  # else the directory's own transformer gives its config only (a fallback)
    if layout == "diffusers" and cache:
        cache_root = cache_home() / "converted" if cache is True else Path(cache)
        cached = cache_root / _cache_key(root, dtype)
        comps = None
        if (cached / PIPELINE_MARKER).exists():
            log.info("loading converted weights from the cache %s", cached)
            try:
                comps = _load_lumina_jax(cached, dtype, own_weights)
                comps.source, comps.layout = str(root), "diffusers (cached)"
            except (CheckpointError, ValueError, KeyError, TypeError) as e:  # a damaged entry, one of another
                import shutil  # version (the source is still there); not an I/O hiccup or a full memory

                log.warning("the cache entry %s cannot be read (%s: %s); removing it and converting %s again",
                            cached, type(e).__name__, str(e)[:300], root)  # fmt: skip
                shutil.rmtree(cached, ignore_errors=True)
                comps = None
        if comps is not None:
            pass
        elif not own_weights:  # a cache entry holds the whole directory: written by a load without an override
            log.info("no cache entry is written when the transformer is replaced (load %s once without it to "
                     "cache the directory)", root)  # fmt: skip
            comps = _load_diffusers(root, dtype, False)
        else:
            comps = _load_diffusers(root, dtype)
            try:
                save_components(cached, comps)
                log.info("cached the converted weights in %s", cached)
                _drop_stale_cache_entries(cache_root, cached, root, dtype)
            except Exception as e:  # full disk (orbax reports it as ValueError), read-only cache folder...: the
                # loaded weights are still good
                if isinstance(e, FileExistsError) and (cached / PIPELINE_MARKER).exists():
                    pass  # another process wrote it meanwhile
                else:
                    log.warning("could not cache the converted weights in %s (%s: %s); loading goes on "
                                "without the cache", cached, type(e).__name__, e)
    elif layout == "diffusers":
        comps = _load_diffusers(root, dtype, own_weights)
    else:
        comps = _load_lumina_jax(root, dtype, own_weights)
    if transformer is not None:
        from lumina_jax.convert.nextdit import detect_format, load_transformer

        try:
            comps.transformer_config, comps.transformer = load_transformer(transformer, dtype=dtype)
        except CheckpointError as e:
            # An original checkpoint's config is inferred from shapes, which cannot express every RoPE
            # split; the directory's own transformer config is the natural fallback (a fine-tune of it).
            if detect_format(transformer) != "original":
                raise
            log.info("%s; retrying with the config of %s/transformer", e, root)
            try:
                comps.transformer_config, comps.transformer = load_transformer(
                    transformer, config=comps.transformer_config, dtype=dtype)
            except CheckpointError:
                raise e from None
        comps.source += f" + transformer {transformer}"
    comps.check()
    return comps


def peek_size_limits(path: str | os.PathLike,
                     transformer: Optional[str | os.PathLike] = None) -> Optional[tuple[int, int]]:
    """``(multiple, max_tokens_side)`` of the model at local ``path``: what image sides must be multiples
    of (VAE factor x patch size) and how many patches a side may hold (its RoPE table), read from its
    configs alone (no weights), so that a bad size fails before a long load; ``None`` when the configs
    cannot be read this way (a hub id, a damaged folder: the full load names the problem)."""
    from lumina_jax.convert.nextdit import detect_format, load_transformer_config, original_weights_file
    from lumina_jax.convert.vae import load_vae_config

    root = Path(path).expanduser()
    try:
        t_path = Path(transformer) if transformer is not None else root / "transformer"
        if detect_format(t_path) == "original" and original_weights_file(t_path).suffix.lower() != ".safetensors":
            return None  # a pickled .pth has no header to read its shapes from: the load checks the size
        t_cfg = load_transformer_config(t_path)
        if detect_layout(root) == "diffusers":
            factor = load_vae_config(root / "vae").downsample_factor
        else:
            marker = read_json(root / "vae" / COMPONENT_MARKER, key="config")
            factor = VAEConfig.from_dict(marker["config"]).downsample_factor
    except (CheckpointError, OSError, ValueError, TypeError, KeyError):
        return None
    return factor * t_cfg.patch_size, min(t_cfg.axes_lens[1:])


def _read_scheduler(root: Path) -> dict[str, Any]:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.exists():
        log.warning("%s: no scheduler/scheduler_config.json; using the Lumina-Image 2.0 defaults %s", root,
                    DEFAULT_SCHEDULER)
        return dict(DEFAULT_SCHEDULER)
    cfg = read_json(f)
    cls = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if cls != "FlowMatchEulerDiscreteScheduler":
        log.warning("%s: scheduler %s is not FlowMatchEulerDiscreteScheduler; only its 'shift' is used", f, cls)
    for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "invert_sigmas", "stochastic_sampling"):
        if cfg.get(key):
            log.warning("%s: %s=true is not implemented by the JAX samplers and is ignored", f, key)
    if cfg.get("shift_terminal"):
        log.warning("%s: shift_terminal is not implemented by the JAX samplers and is ignored", f)
    return cfg


def _transformer(path: Path, dtype: Any, weights: bool) -> tuple[Any, Any]:
    """``(config, params)`` of a directory's transformer; ``params`` is ``None`` without ``weights``."""
    from lumina_jax.convert.nextdit import load_transformer, load_transformer_config

    return load_transformer(path, dtype=dtype) if weights else (load_transformer_config(path), None)


def _load_diffusers(root: Path, dtype: Any, transformer_weights: bool = True) -> Components:
    from lumina_jax.convert.gemma2 import load_text_encoder
    from lumina_jax.convert.vae import load_vae
    from lumina_jax.text import load_tokenizer

    t_cfg, t_params = _transformer(root / "transformer", dtype, transformer_weights)
    g_cfg, g_params = load_text_encoder(root / "text_encoder", dtype=dtype)
    v_cfg, v_params = load_vae(root / "vae", dtype=dtype)
    tok = load_tokenizer(root / "tokenizer")
    size, system_prompt, guidance = _folder_settings(root, "diffusers", t_cfg, v_cfg)
    return Components(t_cfg, t_params, g_cfg, g_params, tok, v_cfg, v_params, _read_scheduler(root), size,
                      str(root), "diffusers", system_prompt, guidance)


def _load_lumina_jax(root: Path, dtype: Any, transformer_weights: bool = True) -> Components:
    from lumina_jax.text import load_tokenizer

    size, system_prompt, guidance = _folder_settings(root, "lumina_jax")  # first: a newer layout fails early
    t_cfg, t_params = _transformer(root / "transformer", dtype, transformer_weights)
    g_cfg, g_params = load_component(root / "text_encoder", "gemma2", Gemma2Config, dtype)
    v_cfg, v_params = load_component(root / "vae", "vae", VAEConfig, dtype)
    tok = load_tokenizer(root / "tokenizer")
    return Components(t_cfg, t_params, g_cfg, g_params, tok, v_cfg, v_params, _read_scheduler(root), size,
                      str(root), "lumina_jax", system_prompt, guidance)


def _folder_settings(root: Path, layout: Layout, t_cfg: Optional[NextDiTConfig] = None,
                     v_cfg: Optional[VAEConfig] = None) -> tuple[int, str, float]:
    """``(default_image_size, system_prompt, guidance_scale)`` a model folder records (the defaults where it
    records none: a diffusers folder's size follows from the configs ``t_cfg`` and ``v_cfg``)."""
    if layout == "diffusers":
        settings = _read_settings(root)
        size = settings["default_image_size"] if "default_image_size" in settings else \
            _diffusers_image_size(t_cfg, v_cfg)  # fmt: skip
    else:
        settings = read_json(root / PIPELINE_MARKER)
        if int(settings.get("version", 0)) > LAYOUT_VERSION:
            raise CheckpointError(f"{root}: layout version {settings.get('version')} is newer than this code "
                                  f"({LAYOUT_VERSION})")  # fmt: skip
        _check_settings({k: settings[k] for k in ("system_prompt", "guidance_scale", "default_image_size")
                         if k in settings}, str(root / PIPELINE_MARKER))  # fmt: skip
        size = settings.get("default_image_size", 1024)
    return (int(size), str(settings.get("system_prompt", "real")),
            float(settings.get("guidance_scale", DEFAULT_GUIDANCE_SCALE)))


def component_dir(path: str | os.PathLike, name: str) -> Optional[Path]:
    """The project-format component folder (``lumina_jax.json`` + ``params/``) that ``path`` is, or its
    ``name/`` subfolder in a project pipeline folder (e.g. the bundled default model); ``None`` else."""
    path = Path(path)
    for d in (path, path / name):
        if (d / COMPONENT_MARKER).is_file() and (d / "params").exists():
            return d
    return None


def load_component(d: Path, model: str, cfg_cls: Any, dtype: Any) -> tuple[Any, Params]:
    """``(config, params)`` of a project-format component folder holding ``model`` ("vae", "gemma2")."""
    import orbax.checkpoint as ocp

    marker = d / COMPONENT_MARKER
    if not marker.exists():
        raise CheckpointError(f"{d}: missing {COMPONENT_MARKER} (not a lumina_jax component directory)")
    meta = read_json(marker, key="config")
    if meta.get("model") != model:
        raise CheckpointError(f"{d}: holds a {meta.get('model')!r} component, expected {model!r}")
    config = cfg_cls.from_dict(meta["config"])
    if not (d / "params").exists():
        raise CheckpointError(f"{d}: missing params/ (incomplete checkpoint)")
    try:
        tree = ocp.StandardCheckpointer().restore((d / "params").absolute())
    except Exception as e:  # orbax raises various types for damaged checkpoints
        raise CheckpointError(f"{d}: cannot restore params ({type(e).__name__}: {e})") from None
    dt = resolve_dtype(dtype)
    flat = {k: cast(np.asarray(v), dt) for k, v in flatten(tree).items()}
    expected = {k: tuple(v) for k, v in meta.get("shapes", {}).items()}
    if expected:
        check_keys(expected, {k: v.shape for k, v in flat.items()}, f"{d} ({model})")
    return config, unflatten(flat)


# ----------------------------------------------------------------------------------------------
# saving


def save_components(path: str | os.PathLike, components: Components, *, layout: Layout = "lumina_jax",
                    dtype: Any = None, overwrite: bool = False) -> Path:
    """Write ``components`` as a whole model folder (atomically: nothing at ``path`` unless complete).

    ``layout="lumina_jax"`` (the default) writes the project's layout (orbax weights; loads without torch);
    ``"diffusers"`` writes what ``Lumina2Pipeline.save_pretrained`` writes (``model_index.json``, a
    ``Lumina2Transformer2DModel`` ``transformer/``, a transformers ``Gemma2Model`` ``text_encoder/``, an
    ``AutoencoderKL`` ``vae/``, ``tokenizer/``, ``scheduler/``), so that diffusers'
    ``Lumina2Pipeline.from_pretrained`` loads it. The default image size becomes the transformer's
    ``sample_size`` (diffusers' default too); the settings diffusers has no place for (a default system
    prompt or guidance scale other than the released model's; a size that is no whole number of latent
    pixels) go under ``model_index.json``'s ``"_lumina_jax"`` key, which diffusers ignores (pass them to its
    pipeline yourself) and :func:`load_components` reads back. ``dtype`` ``None``
    keeps the params' dtype (a bit-exact round trip either way); ``"bf16"`` halves the size.
    """
    from lumina_jax.convert.nextdit import save_transformer

    if layout not in ("lumina_jax", "diffusers"):
        raise ValueError(f"layout={layout!r}: expected 'lumina_jax' or 'diffusers'")
    c = components
    settings: dict[str, Any] = {}
    if c.system_prompt != "real":
        settings["system_prompt"] = c.system_prompt
    if float(c.guidance_scale) != DEFAULT_GUIDANCE_SCALE:
        settings["guidance_scale"] = float(c.guidance_scale)
    if layout == "diffusers" and int(c.default_image_size) != _diffusers_image_size(diffusers_transformer_config(c),
                                                                                   c.vae_config):  # fmt: skip
        settings["default_image_size"] = int(c.default_image_size)  # not a whole number of latent pixels
    size = int(c.default_image_size) if isinstance(c.default_image_size, np.integer) else c.default_image_size
    _check_settings({**settings, "default_image_size": size}, "the model's settings")  # before
    # any weights are written (the size is checked even where it goes into sample_size)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        if layout == "diffusers":
            from lumina_jax.convert.gemma2 import save_text_encoder
            from lumina_jax.convert.vae import save_vae

            save_transformer(tmp / "transformer", diffusers_transformer_config(c), c.transformer, "diffusers",
                             dtype=dtype)  # fmt: skip
            save_text_encoder(tmp / "text_encoder", c.text_encoder_config, c.text_encoder, dtype=dtype)
            save_vae(tmp / "vae", c.vae_config, c.vae, dtype=dtype)
        else:
            save_transformer(tmp / "transformer", c.transformer_config, c.transformer, "jax", dtype=dtype)
            _save_orbax_component(tmp / "text_encoder", "gemma2", dataclasses.asdict(c.text_encoder_config),
                                  c.text_encoder, dtype)  # fmt: skip
            _save_orbax_component(tmp / "vae", "vae", c.vae_config.to_dict(), c.vae, dtype)
        c.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(c.scheduler, indent=2) + "\n")
        if layout == "diffusers":
            (tmp / "model_index.json").write_text(json.dumps(_model_index(c, settings), indent=2) + "\n")
        else:
            meta = {"format": "lumina_jax.pipeline", "version": LAYOUT_VERSION, "components": list(REQUIRED) +
                    ["scheduler"], "default_image_size": int(c.default_image_size), "source": c.source, **settings}
            (tmp / PIPELINE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def verify_components(path: str | os.PathLike, comps: Components, *, dtype: Any = None) -> int:
    """Read the model folder at ``path`` (either layout) back and check it holds ``comps``: every tensor bit
    for bit (cast to ``dtype`` when given), every config, the scheduler, the pipeline settings and the
    tokenizer's vocabulary. Returns the number of tensors checked; a difference is a
    :class:`CheckpointError` naming it. One component is read at a time (the transformer one tensor at a
    time), so the check needs about one text encoder's memory besides ``comps``."""
    from lumina_jax.convert.gemma2 import load_text_encoder
    from lumina_jax.convert.nextdit import verify_transformer
    from lumina_jax.convert.vae import load_vae
    from lumina_jax.text import load_tokenizer

    root = Path(path)
    layout = detect_layout(root)
    if layout == "diffusers":  # sample_size is metadata: the folder's own (an older writer kept the model's) is
        # taken here, and the default size it gives is compared with the other settings below
        from lumina_jax.convert.nextdit import load_transformer_config

        t_cfg = dataclasses.replace(comps.transformer_config,
                                    sample_size=load_transformer_config(root / "transformer").sample_size)
        n = verify_transformer(root / "transformer", t_cfg, comps.transformer, "diffusers", dtype=dtype)
    else:
        n = verify_transformer(root / "transformer", comps.transformer_config, comps.transformer, "jax", dtype=dtype)
    dt = resolve_dtype(dtype)
    for name, load, config in (("text_encoder", load_text_encoder, comps.text_encoder_config),
                               ("vae", load_vae, comps.vae_config)):  # fmt: skip
        got_config, got = load(root / name, dtype=None)
        if got_config != config:
            raise CheckpointError(f"{root / name}: the config reads back as {got_config}, not {config}")
        want, got = flatten(getattr(comps, name)), flatten(got)
        if set(want) != set(got):
            raise CheckpointError(f"{root / name}: params {sorted(set(want) ^ set(got))[:10]} differ in name")
        bad = [k for k in want if not same_bits(cast(to_numpy(want[k]), dt), got[k])]
        if bad:
            raise CheckpointError(f"{root / name}: {len(bad)} tensors differ after reading back: {bad[:10]}")
        n += len(want)
        del got
    names = ("default_image_size", "system_prompt", "guidance_scale")
    stored = _folder_settings(root, layout, t_cfg if layout == "diffusers" else None, comps.vae_config)
    differ = [k for k, v in zip(names, stored) if v != getattr(comps, k)]
    if _read_scheduler(root) != comps.scheduler:
        differ.append("scheduler")
    if load_tokenizer(root / "tokenizer").get_vocab() != comps.tokenizer.get_vocab():
        differ.append("tokenizer vocabulary")
    if differ:
        raise CheckpointError(f"{root}: {differ} differ after reading back")
    return n


def diffusers_transformer_config(c: Components) -> NextDiTConfig:
    """The transformer config a diffusers folder of ``c`` holds: its ``sample_size`` (diffusers' default
    image size, in latent pixels; metadata the model never reads) set from ``c.default_image_size``, so that
    diffusers' pipeline makes images of the model's own size by default (the bundled 64 px model would
    otherwise default to 1024 px)."""
    size, factor = int(c.default_image_size), int(c.vae_config.downsample_factor)
    if size % factor or size // factor == c.transformer_config.sample_size:
        return c.transformer_config
    return dataclasses.replace(c.transformer_config, sample_size=size // factor)


def _diffusers_image_size(t_cfg: NextDiTConfig, v_cfg: VAEConfig) -> int:
    """The default image side of a diffusers folder: the transformer's ``sample_size`` (latent pixels) in
    image pixels, as diffusers' pipeline computes it."""
    return int(t_cfg.sample_size) * int(v_cfg.downsample_factor)


def _model_index(c: Components, settings: dict[str, Any]) -> dict[str, Any]:
    """``model_index.json`` of a diffusers ``Lumina2Pipeline`` folder holding ``c``."""
    tok = type(c.tokenizer)
    tok_library = tok.__module__.split(".")[0]
    index: dict[str, Any] = {
        "_class_name": "Lumina2Pipeline",
        "_diffusers_version": _diffusers_version(),
        "scheduler": ["diffusers", str(c.scheduler.get("_class_name", DEFAULT_SCHEDULER["_class_name"]))],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": [tok_library, tok.__name__],
        "transformer": ["diffusers", "Lumina2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if settings:
        index[SETTINGS_KEY] = settings
    return index


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # not installed: the version the folder layout was checked against
        return "0.33.0"


def _check_settings(settings: Any, where: str) -> None:
    """A :class:`CheckpointError` unless ``settings`` is what ``_lumina_jax`` may hold: a system prompt (text),
    a finite guidance scale (any sign, as the pipeline takes), a positive integer image size."""
    import math

    if not isinstance(settings, dict):
        raise CheckpointError(f"{where}: {SETTINGS_KEY!r} must be an object, not {type(settings).__name__}")
    for key, value in settings.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "system_prompt":
            ok, want = isinstance(value, str), "a string"
        elif key == "guidance_scale":
            ok, want = number and math.isfinite(value), "a finite number"
        elif key == "default_image_size":
            ok, want = number and isinstance(value, int) and value > 0, "a positive integer"
        else:
            raise CheckpointError(f"{where}: unknown {SETTINGS_KEY!r} setting {key!r} (known: default_image_size, "
                                  f"guidance_scale, system_prompt)")  # fmt: skip
        if not ok:
            raise CheckpointError(f"{where}: {SETTINGS_KEY}.{key} = {value!r} is not {want}")


def _read_settings(root: Path) -> dict[str, Any]:
    """The project's settings stored in a diffusers folder's ``model_index.json`` (``_lumina_jax``), checked."""
    idx = root / "model_index.json"
    if not idx.is_file():
        return {}
    settings = read_json(idx).get(SETTINGS_KEY, {})
    _check_settings(settings, str(idx))
    return settings


def save_component(path: str | os.PathLike, model: str, config: dict[str, Any], params: Params, *, dtype: Any = None,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Write one encoder (``model`` ``"gemma2"`` or ``"vae"``) as the project's component folder (what a
    pipeline folder's ``text_encoder/`` / ``vae/`` hold; ``load_text_encoder`` / ``load_vae`` read it),
    atomically."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        _save_orbax_component(tmp, model, config, params, dtype)
    return Path(path)


def _save_orbax_component(d: Path, model: str, config: dict[str, Any], params: Params, dtype: Any) -> None:
    import orbax.checkpoint as ocp

    dt = resolve_dtype(dtype)
    flat = {k: cast(to_numpy(v), dt) for k, v in flatten(params).items()}
    d.mkdir()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save((d / "params").absolute(), unflatten(flat))
    ckptr.wait_until_finished()
    meta = {"model": model, "config": _jsonable(config), "shapes": {k: list(v.shape) for k, v in flat.items()}}
    (d / COMPONENT_MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


CACHE_SOURCE = "cache_source.json"


# what a diffusers directory's load reads: the cache key covers these alone (a .git/ or README changing must not
# reconvert a whole model)
CACHED_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def _cache_key(root: Path, dtype: Any) -> str:
    """Source path + dtype (resolved: ``"bf16"`` and ``jnp.bfloat16`` share entries) + layout and package
    version + the size and mtime of ``model_index.json`` and of every file in the component folders,
    followed through links (a linked ``transformer/`` of a fine-tune counts); dot files and folders are
    left out. (Not the inode or ctime: copies of one model on several hosts, a ``cp -a`` restore and
    network file systems that renumber inodes must keep their entry.)"""
    from lumina_jax import __version__

    h = hashlib.sha256()
    h.update(f"{_cache_source(root, dtype)}|v{LAYOUT_VERSION}|{__version__}".encode())
    files = [root / "model_index.json"]
    for name in CACHED_COMPONENTS:
        for d, dirs, names in os.walk(root / name, followlinks=True):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            files += [Path(d) / n for n in sorted(names) if not n.startswith(".")]
    for f in files:
        try:
            st = f.stat()
        except OSError:  # absent (model_index.json), a dangling link
            continue
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{root.resolve().name}-{h.hexdigest()[:16]}"


def _cache_source(root: Path, dtype: Any) -> str:
    return f"{root.resolve()}|{resolve_dtype(dtype)}"


def _drop_stale_cache_entries(cache_root: Path, fresh: Path, root: Path, dtype: Any) -> None:
    """Record what ``fresh`` (a new cache entry) was converted from, and delete older entries of the same
    source folder and dtype (made before its files changed: each is a whole converted model)."""
    import shutil

    source = _cache_source(root, dtype)
    (fresh / CACHE_SOURCE).write_text(json.dumps({"source": source}))
    import glob

    for other in cache_root.glob(f"{glob.escape(root.resolve().name)}-*"):
        try:
            same = other != fresh and json.loads((other / CACHE_SOURCE).read_text()).get("source") == source
        except (OSError, ValueError):  # entries of other sources, or written before sources were recorded
            continue
        if same:
            shutil.rmtree(other, ignore_errors=True)
            log.info("removed the stale cache entry %s (its source files changed since)", other)
