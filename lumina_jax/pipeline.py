"""Text-to-image with Lumina-Image 2.0 in JAX: ``Lumina2Pipeline.from_pretrained(path)(prompt)``.

Stages (one per module): prompt -> tokens -> Gemma-2 features (:mod:`lumina_jax.text`) -> Next-DiT +
solver + CFG loop (:mod:`lumina_jax.sample`) -> VAE decode (:mod:`lumina_jax.models.vae`) -> images.

Keyword names follow diffusers' ``Lumina2Pipeline`` for the options both have (``prompt``,
``negative_prompt``, ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``,
``cfg_trunc_ratio``, ``cfg_normalization``, ``max_sequence_length``, ``system_prompt``,
``num_images_per_prompt``, ``latents``, ``output_type``); the *defaults* follow the original code:

========================  ===================================  ======================================
option                    default here (original semantics)    diffusers semantics (opt in)
========================  ===================================  ======================================
solver                    ``"midpoint"`` (17 steps)             ``"flow_euler"`` (30 steps)
cfg_normalization         ``True`` = clamp, per-sample L2       ``"rows"``: always rescale per row
cfg_trunc_ratio / mode    1.0 / ``"time"``: CFG while t < r     ``cfg_trunc_mode="steps"``
========================  ===================================  ======================================

``preset=`` picks a named group of settings (:data:`lumina_jax.sample.solvers.PRESETS`: ``quality``,
``balanced``, ``fast``, ``diffusers``); explicit keywords override it. With ``preset="diffusers"`` (and
the same initial ``latents``) the output equals diffusers' ``Lumina2Pipeline`` to ~1e-6 relative.

Non-empty negative prompts get the system prompt, as in the original (diffusers uses them verbatim:
``negative_system_prompt=False``, set by ``preset="diffusers"``); ``guidance_scale`` below 1 is applied
(the original's formula; diffusers, and ``preset="diffusers"``, turn CFG off for any scale <= 1). Differences from diffusers that
remain: ``latents`` are channels-last ``(B, h, w, C)``; seeds instead of torch generators (image ``k`` of a
call with ``seed=s`` uses ``s + k``, so it can be regenerated alone); with several prompts and
``num_images_per_prompt > 1`` diffusers pairs masks and features in different orders (its rows are
A, A, B, B and its masks A, B, A, B), so parity holds per prompt there, not for that batch.

Sharded inference: ``Lumina2Pipeline(components, mesh=...)`` (``from_pretrained(..., mesh=...)``, the
CLI's ``--mesh``) runs on all local devices through the training mesh and its rule table
(:mod:`lumina_jax.parallel.mesh`): images over ``data``/``fsdp``, Next-DiT and Gemma-2 weights over
``fsdp``/``tensor``, the VAE replicated. ``mesh="dp"`` is data parallel (a batch of 8 images on 8 chips runs
one image per chip); ``"fsdp"`` / ``"tensor=4"`` split the weights for models one chip cannot hold. One host
only (every device of the mesh local to this process; multi-host sampling is not supported).

Execution: by default the whole run (all steps and the VAE decode) is one compiled XLA program
(``mode="fused"``). ``mode="stepwise"`` compiles one program per kind of step and runs the steps from
Python, for progress reporting (the CLI's progress bar); results agree to float rounding. A persistent
compilation cache (:func:`enable_compilation_cache`, on by default in :meth:`from_pretrained`) lets a
second process skip compilation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from lumina_jax.convert.components import Components, cache_home, load_components
from lumina_jax.convert.lora import LoRA, load_lora, merge_lora
from lumina_jax.models.nextdit import NextDiT, cast_matmul_weights, unstack_layers
from lumina_jax.models.vae import AutoencoderKL
from lumina_jax.parallel import mesh as mesh_lib
from lumina_jax.sample import loop
from lumina_jax.sample.cfg import RENORM_MODES, TRUNC_MODES, real_number, resolve_cfg_normalization
from lumina_jax.sample.solvers import DEFAULT_SOLVER, PRESETS, SOLVERS, Schedule, init_state, make_schedule
from lumina_jax.text import PromptTooLongError, TextEncoder
from lumina_jax.text_templates import SYSTEM_PROMPTS
from lumina_jax.text_templates import resolve_system_prompt as _resolve_template

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"
OUTPUT_TYPES = ("pil", "np", "latent")
MODES = ("fused", "stepwise")
RANDOM_MODEL_NOTICE = (
    "No bundled default model at {where}: using a TINY RANDOMLY INITIALISED model, so images will look like "
    "noise. Pass a checkpoint (from_pretrained(path) / --checkpoint PATH) to generate real images."
)


# ----------------------------------------------------------------------------------------------
# persistent compilation cache


def enable_compilation_cache(path: Union[str, os.PathLike, bool, None] = None) -> Optional[Path]:
    """Turn on JAX's persistent compilation cache so later processes reuse compiled programs.

    ``path``: a directory; ``None`` -> ``$LUMINA_JAX_COMPILATION_CACHE`` or ``cache_home()/xla``
    (``~/.cache/lumina_jax/xla``); ``False`` (or the env var set to ``off``/``0``) leaves JAX's settings
    alone. A directory the user already configured (``jax_compilation_cache_dir``) is kept when
    ``path`` is ``None``. Every program is cached (minimum compile time 0 s). Returns the directory used;
    ``None`` (with a warning) when it cannot be created (a read-only home, a file in the way): the work
    goes on, compiled anew.
    """
    env = os.environ.get("LUMINA_JAX_COMPILATION_CACHE")
    if path is False or (path is None and env is not None and env.strip().lower() in ("", "0", "off", "false", "none")):
        return None
    current = jax.config.jax_compilation_cache_dir
    if path is None or path is True:
        if current:
            return Path(current)
        path = env or cache_home() / "xla"
    d = Path(path).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # the cache only saves time: its absence must not stop the job
        log.warning("compilation cache %s cannot be used (%s: %s); compiling without a persistent cache",
                    d, type(e).__name__, e.strerror or e)
        return None
    if current != str(d):
        jax.config.update("jax_compilation_cache_dir", str(d))
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # a cache initialised before (possibly disabled) is re-read
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return d


# ----------------------------------------------------------------------------------------------
# argument checks


def check_image_size(height: int, width: int, multiple: int = 16, max_tokens_side: Optional[int] = None,
                     patch_px: int = 16) -> None:
    """Raise ``ValueError`` naming the nearest valid sizes when ``height``/``width`` are not positive
    multiples of ``multiple`` (16 = 8x VAE x patch 2), or exceed the RoPE table."""
    bad = []
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < multiple or v % multiple:
            lo, hi = (v // multiple) * multiple, max((v // multiple + 1) * multiple, multiple)
            cap = None if max_tokens_side is None else (max_tokens_side * patch_px) // multiple * multiple
            near = [s for s in (lo, hi) if s >= multiple and (cap is None or s <= cap)] or [cap or multiple]
            bad.append(f"{name}={v} (nearest valid: {' or '.join(map(str, near))})")
    if bad:  # both sides in one message
        raise ValueError(f"{' and '.join(bad)}: not a positive multiple of {multiple} (VAE factor x patch size)")
    for name, v in (("height", height), ("width", width)):
        if max_tokens_side is not None and v // patch_px > max_tokens_side:
            raise ValueError(f"{name}={v} exceeds the model's RoPE table ({max_tokens_side} patches = "
                             f"{max_tokens_side * patch_px} px)")


def resolve_system_prompt(system_prompt: Optional[str]) -> str:
    """The text put before each prompt: ``None`` -> the default template (``"real"``, the diffusers
    default sentence); anything else as :func:`lumina_jax.text_templates.resolve_system_prompt` (a template
    name, ``""`` for none, or text that gets diffusers' ``" <Prompt Start> "`` unless it holds one; the
    same rule the training data and preprocessing use)."""
    if system_prompt is None:
        return SYSTEM_PROMPTS["real"]
    if not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
    return _resolve_template(system_prompt)


def _as_prompt_list(prompt: Union[str, Sequence[str]], what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt is None:
        raise ValueError(f"{what} is required")
    prompts = list(prompt)
    if not prompts:
        raise ValueError(f"{what} list is empty: pass at least one prompt")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"every {what} must be a string, got {bad}")
    return prompts


# ----------------------------------------------------------------------------------------------
# output


@dataclasses.dataclass
class Lumina2Output:
    """``images``: PIL images (``output_type="pil"``), a float32 ``(B, H, W, 3)`` array in [0, 1] (``"np"``)
    or the final latents ``(B, h, w, C)`` (``"latent"``). ``latents`` are always the final latents.
    ``prompts[k]``, ``negative_prompts[k]`` (``None`` when no evaluation was guided) and ``seeds[k]`` are
    image ``k``'s (``seeds[k]`` regenerates it alone: the same noise; the same pixels in fp32, while in bf16
    another batch size may round differently, a few levels of 255); ``settings`` are the resolved options;
    ``timings`` in seconds: ``text_encode``, ``compile`` (with the Gemma-2 forward's, for a new prompt shape),
    ``sample`` (steps, and decode when fused), ``decode`` (stepwise only), ``total``."""

    images: Any
    latents: np.ndarray
    prompts: list[str]
    seeds: list[Optional[int]]
    settings: dict[str, Any]
    timings: dict[str, float]
    negative_prompts: list[Optional[str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the pipeline



def _as_mesh(mesh: Any) -> Optional[Mesh]:
    """``mesh`` argument -> a ``Mesh`` over this process's devices (or ``None``), checked."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        if isinstance(mesh, str):
            mesh = mesh_lib.MeshConfig.parse(mesh)
        mesh = mesh_lib.create_mesh(mesh, devices=jax.local_devices())
    missing = [a for a in mesh_lib.MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"mesh axes {tuple(mesh.axis_names)} lack {missing}: build the mesh with "
                         f"lumina_jax.parallel.create_mesh (axes {mesh_lib.MESH_AXES})")  # fmt: skip
    remote = sum(d.process_index != jax.process_index() for d in mesh.devices.flat)
    if remote:
        raise ValueError(f"the mesh holds {remote} devices of other processes: the pipeline samples on one host "
                         f"only (build the mesh over jax.local_devices()); multi-host sampling is not supported")  # fmt: skip
    if any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
        # jax.make_mesh makes Explicit axes; the model's sharding works through Auto axes (jax_notes §3.2)
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return mesh


def _shard_weights(mesh: Mesh, components: Components, text_params: Any) -> tuple[Any, Any]:
    """Gemma-2 params (``text_params``) placed by the rule table's logical axes, the VAE replicated."""
    from lumina_jax.models import gemma2
    from lumina_jax.parallel import sharding as shard_lib

    boxed = jax.eval_shape(lambda r: gemma2.init_params(components.text_encoder_config, r, boxed=True),
                           jax.random.PRNGKey(0))  # fmt: skip
    text = shard_lib.param_shardings(boxed, mesh)
    return jax.device_put(text_params, text), jax.device_put(components.vae, mesh_lib.replicated(mesh))


def compute_dtype(dtype: str) -> str:
    """``"fp32"`` or ``"bf16"``; ``"auto"``: bf16 on accelerators, fp32 on CPU."""
    if dtype == "auto":
        return "fp32" if jax.default_backend() == "cpu" else "bf16"
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'auto', got {dtype!r}")
    return dtype


def load_dtype(weights_dtype: str, compute: str) -> Optional[str]:
    """The dtype :func:`~lumina_jax.convert.components.load_components` reads weights in (``None``: the
    checkpoint's own). ``"auto"``: fp32 when computing in fp32; in bf16 the checkpoint's own dtype, so a
    bf16 release is not widened to fp32 on the host (2x the memory: ~20 GB for the 2B transformer and
    Gemma-2) only to be cast back on placement; the values used are the same."""
    if weights_dtype == "auto":
        return "fp32" if compute == "fp32" else None
    if weights_dtype == "keep":
        return None
    if weights_dtype not in ("fp32", "bf16"):
        raise ValueError(f"weights_dtype must be 'auto', 'keep', 'fp32' or 'bf16', got {weights_dtype!r}")
    return weights_dtype


def resolve_settings(*, solver: Optional[str], num_inference_steps: Optional[int], cfg_trunc_ratio: Optional[float],
                     cfg_normalization: Any, cfg_trunc_mode: Optional[str], time_shift: Optional[float],
                     preset: Optional[str], negative_system_prompt: Optional[bool] = None,
                     default_shift: float) -> dict[str, Any]:  # fmt: skip
    """The sampler settings: explicit argument > preset > default, for the options a preset may set
    (``default_shift``: the model's time shift)."""
    p: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        p = PRESETS[preset]
    pick = lambda v, k, d: v if v is not None else p.get(k, d)  # noqa: E731
    solver = pick(solver, "solver", DEFAULT_SOLVER)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(SOLVERS)}")
    steps = num_inference_steps if num_inference_steps is not None else (
        p.get("num_inference_steps") if p.get("solver", solver) == solver else None)
    if steps is None:
        steps = SOLVERS[solver]["default_steps"]
    if cfg_normalization is True and p.get("cfg_normalization") == "rows":
        cfg_normalization = "rows"  # diffusers' cfg_normalization=True is its per-row rescale
    renorm, ratio = resolve_cfg_normalization(pick(cfg_normalization, "cfg_normalization", True))
    mode = pick(cfg_trunc_mode, "cfg_trunc_mode", "time")
    if mode not in TRUNC_MODES:
        raise ValueError(f"unknown cfg_trunc_mode {mode!r}; choose from {TRUNC_MODES}")
    shift = real_number("time_shift", time_shift) if time_shift is not None else default_shift
    return {
        "solver": solver,
        "num_inference_steps": steps,
        "cfg_trunc_ratio": real_number("cfg_trunc_ratio", pick(cfg_trunc_ratio, "cfg_trunc_ratio", 1.0)),
        "cfg_trunc_mode": mode,
        "cfg_renorm": renorm,
        "cfg_renorm_ratio": ratio,
        "time_shift": shift,
        "negative_system_prompt": bool(pick(negative_system_prompt, "negative_system_prompt", True)),
        "cfg_off_at_or_below_one": bool(p.get("cfg_off_at_or_below_one", False)),
    }


def schedule_of(settings: dict[str, Any], guidance_scale: float) -> Schedule:
    """The sampler :class:`~lumina_jax.sample.solvers.Schedule` of :func:`resolve_settings`' output."""
    s = settings
    return make_schedule(s["solver"], s["num_inference_steps"], shift=s["time_shift"], guidance_scale=guidance_scale,
                         cfg_trunc_ratio=s["cfg_trunc_ratio"], cfg_trunc_mode=s["cfg_trunc_mode"],
                         cfg_clamp_ratio=s["cfg_renorm_ratio"] if s["cfg_renorm"] == "clamp" else 1.0,
                         cfg_off_at_or_below_one=s.get("cfg_off_at_or_below_one", False))  # fmt: skip


def _integer(value: Any, name: str) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` for anything else (floats are not rounded)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:  # a NumPy scalar array (np.array(3))
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


class Lumina2Pipeline:
    """Lumina-Image 2.0 text-to-image (see the module docstring for semantics and options).

    Args:
      components: loaded weights and configs (:func:`lumina_jax.convert.components.load_components`).
      dtype: compute dtype of the transformer, text encoder and VAE: ``"fp32"``, ``"bf16"`` or
        ``"auto"`` (bf16 on accelerators, fp32 on CPU). Params are used in the dtype they were loaded in.
      attention_backend: Next-DiT attention backend (:mod:`lumina_jax.ops.attention`).
      scan_layers: run the Next-DiT layer stacks as a scan (fast compile, default) or unrolled (no per-layer
        slice of the stacked weights at run time; a longer compile).
      fuse_qk_norm_rope: each attention's q/k RMSNorm + RoPE as one Pallas kernel (same maths, one memory
        pass; :mod:`lumina_jax.ops.qk_norm_rope`). Off by default until timed on a GPU.
      mesh: run sharded over a device mesh: a ``jax.sharding.Mesh`` with the axes
        ``data, fsdp, context, tensor``, or what :func:`lumina_jax.parallel.mesh.create_mesh` takes (a preset
        name such as ``"dp"``, a dict of axis sizes, a :class:`~lumina_jax.parallel.mesh.MeshConfig`);
        ``None`` (default): one device. Weights are placed by the training rule table; a batch of images
        that ``data x fsdp`` does not divide enters replicated and the model's activation constraints split
        its work unevenly (2 images on 8 devices: 0.39 of one device's FLOPs each).

    In bf16 the Next-DiT and Gemma-2 matmul weights (and Gemma-2's embedding table) are cast once at
    construction (:func:`~lumina_jax.models.nextdit.cast_matmul_weights`; same outputs, half the weight
    memory).
    """

    def __init__(self, components: Components, *, dtype: str = "auto", attention_backend: str = "auto",
                 scan_layers: bool = True, fuse_qk_norm_rope: bool = False,
                 mesh: Union[Mesh, str, Mapping[str, Any], mesh_lib.MeshConfig, None] = None):  # fmt: skip
        components.check()
        self.components = components
        self.dtype = dtype = compute_dtype(dtype)
        from lumina_jax.ops.attention import available_backends

        if attention_backend not in available_backends() and not attention_backend.startswith("context_"):
            raise ValueError(f"unknown attention backend {attention_backend!r}; available: {available_backends()}")
        jdt = jnp.float32 if dtype == "fp32" else jnp.bfloat16
        self.dit = NextDiT(components.transformer_config, dtype=jdt, attention_backend=attention_backend,
                           scan_layers=scan_layers, fuse_qk_norm_rope=fuse_qk_norm_rope)  # fmt: skip
        self.vae = AutoencoderKL(components.vae_config, dtype=jdt)
        self.scan_layers = scan_layers
        self.loras: list[tuple[LoRA, float]] = []
        self.last_truncated: dict[str, list[int]] = {"prompt": [], "negative_prompt": []}
        self.mesh = _as_mesh(mesh)
        text_params = components.text_encoder
        if dtype == "bf16":  # on the host, before placing: half the device memory, the same outputs
            text_params = cast_matmul_weights(text_params, jnp.bfloat16, names=("kernel", "embedding"))
        if self.mesh is None:
            text_params, self.vae_params = jax.device_put(text_params), jax.device_put(components.vae)
        else:
            mesh_lib.warn_context_attention(mesh_lib.mesh_shape(self.mesh), attention_backend)
            tc = components.transformer_config
            mesh_lib.warn_tensor_heads(mesh_lib.mesh_shape(self.mesh), tc.n_heads, tc.n_kv_heads)
            text_params, self.vae_params = _shard_weights(self.mesh, components, text_params)
        self._place_dit()
        self.text_encoder = TextEncoder(text_params, components.text_encoder_config, components.tokenizer,
                                        dtype=dtype)  # fmt: skip
        self._executables: dict[Any, Any] = {}
        self._jitted: dict[Any, Any] = {}

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike, None] = None,
        *,
        transformer: Union[str, os.PathLike, None] = None,
        dtype: str = "auto",
        weights_dtype: str = "auto",
        cache: Union[bool, str, os.PathLike] = False,
        compilation_cache: Union[bool, str, os.PathLike] = True,
        attention_backend: str = "auto",
        mesh: Union[Mesh, str, Mapping[str, Any], mesh_lib.MeshConfig, None] = None,
    ) -> "Lumina2Pipeline":
        """Load a model directory (diffusers pipeline layout, the project's layout from
        :func:`~lumina_jax.convert.components.save_components`) or a hub id.

        ``path=None`` loads the bundled default model (``lumina_jax/assets/default_model``); while none is
        bundled, a tiny randomly initialised model with a logged notice. ``transformer`` replaces the
        transformer with any checkpoint the converter reads (e.g. an original ``consolidated.pth``).
        ``weights_dtype``: the host dtype of the loaded weights (:func:`load_dtype`: ``"auto"`` keeps a
        checkpoint's own dtype when computing in bf16, fp32 otherwise; ``"keep"``, ``"fp32"``, ``"bf16"``).
        ``cache`` stores converted diffusers weights as orbax for fast reloads; ``compilation_cache``
        is passed to :func:`enable_compilation_cache` (``False`` leaves JAX's settings alone); ``mesh``: see
        the class docstring.
        """
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)
        weights = load_dtype(weights_dtype, compute_dtype(dtype))
        if path is None:
            if DEFAULT_MODEL_DIR.is_dir() and any(DEFAULT_MODEL_DIR.iterdir()):
                path = DEFAULT_MODEL_DIR
            else:
                from lumina_jax.sample.tiny import random_components

                log.warning(RANDOM_MODEL_NOTICE.format(where=DEFAULT_MODEL_DIR))
                comps = random_components(0)
                if transformer is not None:
                    raise ValueError("transformer= needs a model directory for the other components")
                return cls(comps, dtype=dtype, attention_backend=attention_backend, mesh=mesh)
        comps = load_components(path, transformer=transformer, dtype=weights, cache=cache)
        return cls(comps, dtype=dtype, attention_backend=attention_backend, mesh=mesh)

    @property
    def default_image_size(self) -> int:
        return int(self.components.default_image_size)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE down-sampling x patch size; 16 for Lumina 2)."""
        return self.components.vae_config.downsample_factor * self.components.transformer_config.patch_size

    # -- transformer weights and LoRA ---------------------------------------------------------------

    def _place_dit(self) -> None:
        """``self.dit_params`` from the loaded (host) weights + the active LoRAs: merged in float32, matmul
        weights cast to bf16 when computing in bf16, placed on the device or the mesh."""
        params = self.components.transformer
        bf16 = self.dtype == "bf16"
        if self.loras:
            params = merge_lora(params, self.components.transformer_config, self.loras,
                                dtype=jnp.bfloat16 if bf16 else None)  # fmt: skip
        if bf16:
            params = cast_matmul_weights(params, jnp.bfloat16)
        if self.mesh is None:
            params = jax.device_put(params)
        else:
            from lumina_jax.parallel import sharding as shard_lib

            abstract = shard_lib.model_abstract(self.components.transformer_config)
            params = jax.device_put(params, shard_lib.param_shardings(abstract, self.mesh))
        self.dit_params = params if self.scan_layers else unstack_layers(params)

    def load_lora(self, lora: Union[str, os.PathLike, LoRA], scale: float = 1.0) -> LoRA:
        """Add a LoRA adapter (a file or folder :func:`lumina_jax.convert.lora.load_lora` reads, or a
        loaded :class:`~lumina_jax.convert.lora.LoRA`) with weight ``scale``, merged into the transformer
        weights; adapters loaded before stay (their products add up). Shapes do not change, so compiled
        programs are reused. Returns the loaded adapter."""
        if not isinstance(lora, LoRA):
            lora = load_lora(lora, self.components.transformer_config)  # names checked against this model's layers
        if not np.isfinite(float(scale)):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        self.loras = [*self.loras, (lora, float(scale))]
        try:
            self._place_dit()
        except Exception:
            self.loras = self.loras[:-1]  # a LoRA that does not fit leaves the pipeline as it was
            raise
        return lora

    def unload_lora(self) -> None:
        """Drop every LoRA: the transformer weights are the loaded ones again, bit for bit."""
        if self.loras:
            loras, self.loras = self.loras, []
            try:
                self._place_dit()
            except Exception:
                self.loras = loras  # e.g. out of device memory: the merged weights are still in place
                raise

    # -- text ---------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], negative_prompts: Optional[list[str]], system_prompt: Optional[str],
                       max_sequence_length: int, num_images_per_prompt: int = 1, *,
                       negative_system_prompt: bool = True, on_phase: Optional[Callable[[str], None]] = None,
                       on_long_prompt: str = "warn") -> tuple[jax.Array, jax.Array]:
        """Caption features ``(R, L, D)`` and mask ``(R, L)``: ``B = len(prompts) * n`` conditional rows
        (prompt-major), then, when ``negative_prompts`` is given, the ``B`` unconditional rows. Both sets
        go through one Gemma-2 forward, right-padded to one length. Prompts always get the system prompt;
        non-empty negatives too with ``negative_system_prompt`` (original), else verbatim (diffusers).
        Over-long texts: see ``on_long_prompt`` of :meth:`__call__`; :attr:`last_truncated` records which
        were cut (``{"prompt": [indices], "negative_prompt": [...]}``, empty lists when none)."""
        te = self.text_encoder
        prefix = resolve_system_prompt(system_prompt)
        ids, mask = te.tokenize(prompts, prefix, max_sequence_length, on_long_prompt, empty_is_unconditional=False)
        self.last_truncated = {"prompt": list(te.last_truncated_rows), "negative_prompt": []}
        if negative_prompts is not None:
            # negatives were broadcast to one per prompt: warning indices are those of ``prompt``
            # diffusers (negative_system_prompt=False) encodes negatives verbatim: " " is not ""
            ids_u, mask_u = te.tokenize(negative_prompts, prefix if negative_system_prompt else "empty",
                                        max_sequence_length, on_long_prompt, label="negative prompt",
                                        empty_is_unconditional=negative_system_prompt)  # fmt: skip
            self.last_truncated["negative_prompt"] = list(te.last_truncated_rows)
            length = max(ids.shape[1], ids_u.shape[1])
            pad = lambda a, v: np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=v)  # noqa: E731
            pid = te.tokenizer.pad_token_id
            ids = np.concatenate([pad(ids, pid), pad(ids_u, pid)])
            mask = np.concatenate([pad(mask, False), pad(mask_u, False)])
        feats = te.encode_tokens(ids, mask, on_phase)
        rows = np.repeat(np.arange(ids.shape[0]), num_images_per_prompt)
        return feats[rows], jnp.asarray(mask[rows])

    # -- noise --------------------------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.components.vae_config.downsample_factor
        return height // f, width // f, self.components.transformer_config.in_channels

    def make_noise(self, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
        """Standard normal latents ``(len(seeds), h, w, C)``, one NumPy generator per seed (platform- and
        batch-independent)."""
        shape = self.latent_shape(height, width)
        return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32) for s in seeds])

    # -- sharding -------------------------------------------------------------------------------------

    def _batch_splits(self, batch: int) -> bool:
        """Whether ``batch`` images are split over the mesh's batch axes (``data x fsdp`` divides it)."""
        return self.mesh is not None and batch % mesh_lib.batch_divisor(self.mesh) == 0

    def _place_batch(self, batch: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """Batch-major inputs onto the mesh: split over ``data x fsdp`` when it divides ``batch`` (the
        caption rows, ``2 batch`` with CFG, then split with the images), else replicated."""
        if self.mesh is None:
            return arrays
        if not self._batch_splits(batch):
            log.info("%d images do not divide data x fsdp = %d: inputs replicated, activations split unevenly",
                     batch, mesh_lib.batch_divisor(self.mesh))  # fmt: skip
            return tuple(jax.device_put(a, mesh_lib.replicated(self.mesh)) for a in arrays)
        return tuple(jax.device_put(a, mesh_lib.batch_sharding(self.mesh, a.ndim)) for a in arrays)

    @contextlib.contextmanager
    def _sharded(self) -> Iterator[None]:
        """Trace under the mesh and the rule table (the model's activation constraints). A batch that the
        batch axes do not divide comes in replicated and is still split unevenly by the constraints."""
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
            yield

    # -- compile helper -------------------------------------------------------------------------------

    def _executable(self, key: Any, fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
        """AOT-compile ``fn`` for ``args`` once per (key, argument structure and shapes); returns
        ``(executable, seconds spent compiling now)``."""
        leaves, tree = jax.tree_util.tree_flatten(args)
        # shardings too: a program compiled for replicated inputs refuses batch-split ones (and vice versa)
        sig = (key, tree, tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        if sig in self._executables:
            return self._executables[sig], 0.0
        t0 = time.perf_counter()
        exe = fn.lower(*args).compile()
        self._executables[sig] = exe
        return exe, time.perf_counter() - t0

    def _jit(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._jitted:
            self._jitted[key] = make()
        return self._jitted[key]

    # -- generation ---------------------------------------------------------------------------------

    def resolve_settings(self, *, solver: Optional[str], num_inference_steps: Optional[int],
                         cfg_trunc_ratio: Optional[float], cfg_normalization: Any, cfg_trunc_mode: Optional[str],
                         time_shift: Optional[float], preset: Optional[str],
                         negative_system_prompt: Optional[bool] = None) -> dict[str, Any]:
        """Explicit argument > preset > default (:func:`resolve_settings` with the model's time shift)."""
        return resolve_settings(solver=solver, num_inference_steps=num_inference_steps,
                                cfg_trunc_ratio=cfg_trunc_ratio, cfg_normalization=cfg_normalization,
                                cfg_trunc_mode=cfg_trunc_mode, time_shift=time_shift, preset=preset,
                                negative_system_prompt=negative_system_prompt,
                                default_shift=self.components.time_shift)  # fmt: skip

    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        *,
        negative_prompt: Union[str, Sequence[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        cfg_trunc_ratio: Optional[float] = None,
        cfg_normalization: Union[bool, float, str, None] = None,
        max_sequence_length: int = 256,
        system_prompt: Optional[str] = None,
        num_images_per_prompt: int = 1,
        latents: Any = None,
        output_type: str = "pil",
        negative_system_prompt: Optional[bool] = None,
        solver: Optional[str] = None,
        time_shift: Optional[float] = None,
        seed: Union[int, Sequence[int], None] = None,
        cfg_trunc_mode: Optional[str] = None,
        preset: Optional[str] = None,
        mode: str = "fused",
        callback: Optional[Callable[[int, int], None]] = None,
        on_phase: Optional[Callable[[str], None]] = None,
        vae_tile: Optional[tuple[int, int]] = None,
        on_long_prompt: str = "warn",
    ) -> Lumina2Output:
        """Generate images. Every argument after ``prompt`` is a keyword (diffusers' positional order
        differs: ``pipe("cat", 1024, 768)`` would have meant other things).

        Args (diffusers names; semantics noted where they differ):
          prompt: a string or a non-empty list of strings; each gets the system prompt, an empty one too
            (as in the original and diffusers).
          negative_prompt: the unconditional prompt(s); default ``""``. An empty or whitespace-only one is
            the unconditional prompt ``""`` (no system prompt); a non-empty one gets the system prompt
            (original) unless ``negative_system_prompt=False`` (diffusers: every negative verbatim,
            whitespace too: ``" "`` is encoded as written).
          height, width: pixels, multiples of :attr:`size_multiple` (16); default :attr:`default_image_size`.
          num_inference_steps: solver steps (default per solver: midpoint 17, dpm 20, euler/flow_euler 30).
            For euler/midpoint the original's ``--num_sampling_steps N`` (grid points) is ``N - 1`` here;
            for dpm it is ``N`` (the original's dpm counts steps).
          guidance_scale: CFG scale ``w``: ``v_u + w (v_c - v_u)`` for any ``w`` (original; ``0`` gives the
            unconditional image); ``w = 1`` skips the unconditional forwards (diffusers skips them for every
            ``w <= 1``). Default: the
            model's (``Components.guidance_scale``: 4.0, diffusers' default, unless the model directory
            records another; the bundled shapes model uses 2.5).
          cfg_trunc_ratio: CFG-Trunc threshold, default 1.0 (guidance everywhere). ``cfg_trunc_mode="time"``
            (original): CFG while the model time ``t < cfg_trunc_ratio``; ``"steps"`` (diffusers): CFG for
            step ``i`` iff ``(i + 1) / N <= cfg_trunc_ratio``.
          cfg_normalization: CFG-Renorm. ``True`` (default): original clamp with ratio 1 (with
            ``preset="diffusers"``: diffusers' meaning of ``True``, the per-row rescale); a float: clamp
            ratio; ``"rows"``/``"diffusers"``: diffusers' per-row rescale; ``False``: none.
          max_sequence_length: token limit including ``<bos>`` and the system prompt (256).
          system_prompt: template name (``"real"``, ``"base"``, ...), a diffusers-style sentence (gets
            ``" <Prompt Start> "`` appended) or a full prefix containing ``<Prompt Start>``. Default: the
            one the model was trained with (``Components.system_prompt``: ``"real"`` for Lumina-Image 2.0).
          num_images_per_prompt: images per prompt (rows are prompt-major).
          latents: initial noise, channels-last ``(B, h, w, C)`` with ``h = height / 8``; overrides ``seed``.
          output_type: ``"pil"``, ``"np"`` or ``"latent"``.
          negative_system_prompt: whether a non-empty negative prompt gets the system prompt; default
            ``True`` (original), ``False`` under ``preset="diffusers"``.
          solver: ``"midpoint"`` (default), ``"euler"``, ``"dpm"`` (original semantics) or ``"flow_euler"``
            (diffusers' scheduler).
          time_shift: the shift ``s``; default the scheduler config's ``shift`` (6.0 for Lumina-Image 2.0,
            3.0 for the bundled model).
          seed: int (image ``k`` uses ``seed + k``), one int per image, or ``None`` (random, reported).
          preset: ``"quality"``, ``"balanced"``, ``"fast"`` or ``"diffusers"`` (see ``PRESETS``).
          mode: ``"fused"`` (one compiled program) or ``"stepwise"`` (one call per step).
          callback: ``callback(step, num_steps)`` after each step (fused mode: through a host callback,
            which keeps that program out of the persistent compilation cache).
          on_phase: ``on_phase(name)`` when a phase starts: ``"encode"``, ``"compile"``, ``"sample"``,
            ``"decode"`` (stepwise only).
          vae_tile: ``(tile, overlap)`` in latent pixels for tiled VAE decoding of large images.
          on_long_prompt: a (negative) prompt over ``max_sequence_length`` tokens: ``"warn"`` (default, as
            diffusers: cut to the limit, with a warning; ``settings["truncated_prompts"]`` lists which) or
            ``"error"`` (:class:`lumina_jax.text.PromptTooLongError` naming the limit and the overflow).
        """
        t_start = time.perf_counter()
        prompts = _as_prompt_list(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_long_prompt not in ("warn", "error"):
            raise ValueError(f"on_long_prompt must be 'warn' or 'error', got {on_long_prompt!r}")
        if guidance_scale is None:
            guidance_scale = self.components.guidance_scale
        try:
            finite = bool(np.isfinite(real_number("guidance_scale", guidance_scale)))
        except ValueError:  # a string, a bool, not a number
            finite = False
        if not finite:
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        n = _integer(num_images_per_prompt, "num_images_per_prompt")
        if n < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        height = self.default_image_size if height is None else height
        width = self.default_image_size if width is None else width
        if system_prompt is None:
            system_prompt = self.components.system_prompt
        tcfg = self.components.transformer_config
        check_image_size(height, width, self.size_multiple, max_tokens_side=min(tcfg.axes_lens[1:]),
                         patch_px=self.size_multiple)  # fmt: skip
        if vae_tile is not None:  # a hashable pair: it keys the compiled programs and is recorded in the settings
            if isinstance(vae_tile, (str, bytes)) or not hasattr(vae_tile, "__len__") or len(vae_tile) != 2:
                raise ValueError(f"vae_tile must be (tile, overlap) in latent pixels, got {vae_tile!r}")
            vae_tile = (_integer(vae_tile[0], "vae_tile's tile"), _integer(vae_tile[1], "vae_tile's overlap"))
            if not 0 <= vae_tile[1] < vae_tile[0]:
                raise ValueError(f"vae_tile: overlap must be in [0, tile), got {vae_tile}")
        area = height * width / self.default_image_size**2
        if area > 4:
            log.warning("%dx%d px is %.0fx the area of the model's %d px images: expect a long run and images "
                        "the model was not trained for", width, height, area, self.default_image_size)  # fmt: skip
        max_len = min(tcfg.axes_lens[0] - 1, self.components.text_encoder_config.max_position_embeddings)
        if not 1 <= _integer(max_sequence_length, "max_sequence_length") <= max_len:
            raise ValueError(f"max_sequence_length must be in [1, {max_len}], got {max_sequence_length}")
        s = self.resolve_settings(solver=solver, num_inference_steps=num_inference_steps,
                                  cfg_trunc_ratio=cfg_trunc_ratio, cfg_normalization=cfg_normalization,
                                  cfg_trunc_mode=cfg_trunc_mode, time_shift=time_shift, preset=preset,
                                  negative_system_prompt=negative_system_prompt)  # fmt: skip
        schedule = schedule_of(s, guidance_scale)
        b = len(prompts) * n
        negatives = _as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if not schedule.num_guided:
            if any(negatives):
                log.warning("the negative prompt is not used: no step is guided (guidance_scale %g, cfg_trunc_ratio "
                            "%g)", guidance_scale, s["cfg_trunc_ratio"])  # fmt: skip
            negatives = None

        # noise
        seeds: list[Optional[int]]
        if latents is not None:
            noise = np.asarray(latents, np.float32)
            want = (b, *self.latent_shape(height, width))
            if noise.shape != want:
                hint = (" (channels-last: (B, h, w, C), not NCHW)"
                        if noise.ndim == 4 and noise.shape[1] == want[3] and noise.shape[3] != want[3] else "")
                raise ValueError(f"latents have shape {noise.shape}, expected {want}{hint}")
            seeds = [None] * b
        else:
            if seed is None:
                seed = int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF)
            if np.ndim(seed) == 0:
                seeds = [_integer(seed, "seed") + k for k in range(b)]
            else:
                seeds = [_integer(x, "seed") for x in seed]
            if len(seeds) != b:
                raise ValueError(f"{len(seeds)} seeds for {b} images")
            if min(seeds) < 0:
                raise ValueError(f"seed must be a non-negative integer, got {seed!r} (pass seed=None for a random one)")
            noise = self.make_noise(seeds, height, width)

        phase = on_phase or (lambda name: None)
        timings: dict[str, float] = {}
        phase("encode")
        t0, te_compile = time.perf_counter(), self.text_encoder.compile_seconds
        try:
            feats, mask = self.encode_prompts(prompts, negatives, system_prompt, max_sequence_length, n,
                                              negative_system_prompt=s["negative_system_prompt"], on_phase=phase,
                                              on_long_prompt=on_long_prompt)  # fmt: skip
        except PromptTooLongError as e:
            raise PromptTooLongError(f"{e}; shorten it, raise max_sequence_length (up to {max_len}), or pass "
                                     f"on_long_prompt='warn' to cut it") from None  # fmt: skip
        jax.block_until_ready(feats)
        te_compile = self.text_encoder.compile_seconds - te_compile  # a new prompt shape: Gemma-2 compiled
        timings["text_encode"] = time.perf_counter() - t0 - te_compile

        decode = output_type != "latent"
        scale = jnp.float32(guidance_scale)
        ratio = jnp.float32(s["cfg_renorm_ratio"])
        noise, feats, mask = self._place_batch(b, jnp.asarray(noise), feats, mask)
        with self._sharded():
            if mode == "fused":
                latents_out, images, comp_s, run_s = self._run_fused(noise, feats, mask, schedule, scale, ratio,
                                                                     s["cfg_renorm"], decode, vae_tile, callback, phase)
                timings.update(compile=comp_s, sample=run_s)
            else:
                latents_out, images, t = self._run_stepwise(noise, feats, mask, schedule, scale, ratio,
                                                            s["cfg_renorm"], decode, vae_tile, callback, phase)
                timings.update(t)
        timings["compile"] = timings.get("compile", 0.0) + te_compile
        latents_np = np.asarray(latents_out)
        if output_type == "latent":
            out: Any = latents_np
        else:
            arr = np.asarray(images, np.float32)
            out = arr if output_type == "np" else [_to_pil(a) for a in arr]
        timings["total"] = time.perf_counter() - t_start
        settings = dict(s, guidance_scale=float(guidance_scale), height=height, width=width,
                        num_images_per_prompt=n, max_sequence_length=max_sequence_length,
                        system_prompt=resolve_system_prompt(system_prompt), negative_prompt=negatives,
                        num_model_evaluations=schedule.num_evaluations, num_guided_evaluations=schedule.num_guided,
                        preset=preset, mode=mode, dtype=self.dtype, model=self.components.source,
                        loras=[[lora.source, w] for lora, w in self.loras],
                        vae_tile=None if vae_tile is None else list(vae_tile),
                        truncated_prompts=self.last_truncated)  # fmt: skip
        per_image = [None] * b if negatives is None else [q for q in negatives for _ in range(n)]
        return Lumina2Output(out, latents_np, [p for p in prompts for _ in range(n)], seeds, settings, timings,
                             per_image)  # fmt: skip

    def _run_fused(self, noise, feats, mask, schedule: Schedule, scale, ratio, renorm: str, decode: bool,
                   vae_tile, callback, phase):
        on_step = None
        if callback is not None:
            total = schedule.num_steps
            self._callback = callback  # the program calls the current call's callback: one program for all
            on_step = lambda i: self._callback(int(i), total)  # noqa: E731
        # the step count is in the key: ``on_step`` closes over it (a new count retraces anyway)
        key = ("fused", renorm, decode, vae_tile, callback is not None,
               schedule.num_steps if callback is not None else None)
        fn = self._jit(key, lambda: loop.make_generate_fn(self.dit, self.vae if decode else None, renorm=renorm,
                                                          vae_tile=vae_tile, on_step=on_step))  # fmt: skip
        args = (self.dit_params, self.vae_params, noise, feats, mask, schedule, scale, ratio)
        phase("compile")
        exe, comp_s = self._executable(key, fn, args)
        phase("sample")
        t0 = time.perf_counter()
        latents, images = jax.block_until_ready(exe(*args))
        if callback is not None:
            jax.effects_barrier()  # every step's callback has run: the next call's cannot get this one's steps
            self._callback = None
        return latents, images, comp_s, time.perf_counter() - t0

    def _init_state(self, schedule: Schedule, noise: jax.Array) -> jax.Array:
        """The solver state, placed like ``noise`` (a scalar state replicated) on a mesh."""
        state = init_state(schedule, noise)
        if self.mesh is not None:
            state = jax.device_put(state, noise.sharding if np.ndim(state) else mesh_lib.replicated(self.mesh))
        return state

    def step_executables(self, schedule: Schedule, noise, feats, mask, renorm: str) -> tuple[dict, float]:
        """Compiled single-step programs for every guidance pattern in ``schedule`` -> ``({flags: exe},
        compile seconds)``."""
        comp = 0.0
        exes = {}
        state = self._init_state(schedule, noise)
        coeffs = {k: np.asarray(v)[0] for k, v in schedule.arrays.items()}
        # sharded: steps return x and the state as they came in, so the next step takes them
        out_sh = None if self.mesh is None else (noise.sharding, state.sharding)
        for flags in dict.fromkeys(schedule.guided):
            key = ("step", schedule.solver, flags, renorm, out_sh)
            fn = self._jit(key, lambda flags=flags: loop.make_step_fn(self.dit, schedule.solver, flags, renorm=renorm,
                                                                      out_shardings=out_sh))  # fmt: skip
            args = (self.dit_params, noise, state, coeffs, feats, mask, jnp.float32(1), jnp.float32(1))
            exes[flags], c = self._executable(key, fn, args)
            comp += c
        return exes, comp

    def _run_stepwise(self, noise, feats, mask, schedule: Schedule, scale, ratio, renorm: str, decode: bool,
                      vae_tile, callback, phase):
        phase("compile")
        exes, comp = self.step_executables(schedule, noise, feats, mask, renorm)
        dec = None
        if decode:
            key = ("decode", vae_tile)
            fn = self._jit(key, lambda: loop.make_decode_fn(self.vae, vae_tile))
            dec, c = self._executable(key, fn, (self.vae_params, noise))
            comp += c
        arrays = {k: np.asarray(v) for k, v in schedule.arrays.items()}
        x, state = noise, self._init_state(schedule, noise)
        phase("sample")
        t0 = time.perf_counter()
        for i, flags in enumerate(schedule.guided):
            coeffs = {k: v[i] for k, v in arrays.items()}
            x, state = exes[flags](self.dit_params, x, state, coeffs, feats, mask, scale, ratio)
            if callback is not None:
                jax.block_until_ready(x)
                callback(i, schedule.num_steps)
        x = jax.block_until_ready(x)
        t_sample = time.perf_counter() - t0
        images, t_dec = None, 0.0
        if dec is not None:
            phase("decode")
            t0 = time.perf_counter()
            images = jax.block_until_ready(dec(self.vae_params, x))
            t_dec = time.perf_counter() - t0
        return x, images, {"compile": comp, "sample": t_sample, "decode": t_dec}

    # -- analysis -----------------------------------------------------------------------------------

    def schedule_flops(self, schedule: Schedule, batch: int, height: int, width: int, caption_length: int = 64,
                       renorm: str = "clamp") -> dict[str, Any]:
        """FLOPs of the denoising loop from XLA's cost analysis of each kind of step (see
        :func:`lumina_jax.sample.loop.schedule_flops`), for ``batch`` images of ``height x width``; with a
        mesh, per device (the programs a call of that batch runs)."""
        noise = jnp.zeros((batch, *self.latent_shape(height, width)), jnp.float32)
        rows = 2 * batch if schedule.num_guided else batch
        d = self.components.transformer_config.cap_feat_dim
        feats = jnp.zeros((rows, caption_length, d), jnp.float32)
        mask = jnp.ones((rows, caption_length), bool)
        noise, feats, mask = self._place_batch(batch, noise, feats, mask)
        with self._sharded():
            exes, _ = self.step_executables(schedule, noise, feats, mask, renorm)
        return loop.schedule_flops(schedule, lambda flags: loop.compiled_flops(exes[flags]))


def _to_pil(img: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))


__all__ = ["Lumina2Pipeline", "Lumina2Output", "enable_compilation_cache", "check_image_size",
           "resolve_system_prompt", "RENORM_MODES"]  # fmt: skip
