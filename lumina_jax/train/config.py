"""Training configuration: one YAML file (``configs/train/*.yaml``) plus ``key=value`` overrides.

    python -m lumina_jax train configs/train/lumina2_2b.yaml run_dir=gs://bucket/run1 \\
        mesh.fsdp=8 optimizer.lr=1.0e-4 stages.0.steps=1000

Overrides use dotted paths into the YAML (list items by index, ``stages.1.batch=256``); values are
parsed as YAML (``true``, ``[1, 2]``, ``{a: 1}``), numbers like ``1e-4`` included. A key that is not a
field of the configuration is an error that names it (and the known keys), in the file and on the
command line alike.

The progressive recipe (spec §6.4) is the ``stages`` list: each stage has its resolution, number of
steps, global batch, optional LR and its own data source; the trainer walks through them by itself.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from lumina_jax.config_utils import load_yaml
from lumina_jax.parallel.mesh import MeshConfig
from lumina_jax.train.lora import LoraTrainConfig
from lumina_jax.train.optim import OptimizerConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "train"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where a stage's batches come from.

    kinds:
      ``synthetic``: deterministic random latents + caption features generated in memory
        (``num_samples`` distinct samples, ``cap_len`` caption tokens); for tests and benchmarks.
      ``latent_cache``: :class:`lumina_jax.data.LatentCacheSource` directories (``paths``, optional
        mixture ``weights``) through :class:`lumina_jax.data.DataPipeline` (recommended: the VAE and
        Gemma-2 run once, offline, ``python -m lumina_jax preprocess``).
      ``images``: raw captioned images encoded on the fly by the frozen VAE and text encoder given in
        ``vae`` and ``text_encoder``. ``paths`` are JSONL files, original-style YAML lists (see
        :mod:`lumina_jax.data.sources`; one source per list, its files concatenated), folders of
        ``images-NNNNN.array_record`` shards or prepared TFDS ``array_record`` folders (``.../name/version``,
        read by :class:`lumina_jax.data.sources.TfdsSource` without TensorFlow). Bucket batches only:
        ``batching: mixed`` (token-packed crops of several sizes) needs a latent cache.

    ``system_prompt`` is the template of TFDS sources (JSONL/YAML entries carry their own);
    ``key_feature`` names a TFDS feature that identifies a record (else ``source:index``);
    ``max_consecutive_skips``: unusable records in a row (missing/corrupt images) before the stage stops
    with an error naming this key; ``bucket_plan`` (``auto``, ``global``, ``host``) decides who picks
    the crop size of ``bucket`` batches (:class:`lumina_jax.data.PipelineConfig`): on several hosts
    ``auto`` means ``global`` (every host derives the same plan from the sources' size indexes: a latent
    cache's own, or raw images' ``python -m lumina_jax preprocess --index --data PATH``; raw images on
    several hosts get caption features padded to ``max_text_len``); ``index_dir``: the folder that holds
    the raw images' size indexes when they cannot be written next to the data (``preprocess --index
    --data PATH --index-dir DIR``);
    ``encoder_dtype`` is the compute dtype of the frozen encoders
    (``bfloat16``; ``float32`` for models sampled in fp32, e.g. the bundled shapes model).
    """

    kind: str = "synthetic"
    paths: tuple[str, ...] = ()
    weights: Optional[tuple[float, ...]] = None
    num_samples: int = 64
    cap_len: int = 8
    batching: str = "bucket"
    bucket_plan: str = "auto"
    text_len: Optional[int] = None
    caption_dropout: float = 0.1
    num_workers: int = 0
    read_threads: int = 2
    max_consecutive_skips: int = 1000
    shuffle: bool = True
    seed: Optional[int] = None
    vae: Optional[str] = None
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None
    max_text_len: int = 256
    system_prompt: str = "real"
    key_feature: Optional[str] = None
    encoder_dtype: str = "bfloat16"
    index_dir: Optional[str] = None

    def __post_init__(self):
        if self.encoder_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"encoder_dtype must be 'bfloat16' or 'float32', got {self.encoder_dtype!r}")
        if self.kind not in ("synthetic", "latent_cache", "images"):
            raise ValueError(f"unknown data kind {self.kind!r}; choose synthetic, latent_cache or images")
        if self.bucket_plan not in ("auto", "global", "host"):
            raise ValueError(f"bucket_plan must be 'auto', 'global' or 'host', got {self.bucket_plan!r}")
        if self.kind != "synthetic" and not self.paths:
            raise ValueError(f"data kind {self.kind!r} needs 'paths'")
        if self.index_dir is not None:
            from lumina_jax.data.image_index import check_index_dir

            check_index_dir(self.index_dir)
        if self.index_dir is not None and self.kind != "images":
            raise ValueError(f"index_dir is where raw images' size indexes live (data kind 'images'), not for "
                             f"kind {self.kind!r}")  # fmt: skip
        object.__setattr__(self, "paths", tuple(self.paths) if not isinstance(self.paths, str) else (self.paths,))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        # checked here, when the config loads, not when a late stage first builds its data
        if self.batching not in ("bucket", "mixed"):
            raise ValueError(f"batching must be 'bucket' or 'mixed', got {self.batching!r}")
        if self.kind == "images" and self.batching != "bucket":
            raise ValueError("raw-image training encodes bucket batches (batching: bucket); for mixed batches "
                             "encode offline (python -m lumina_jax preprocess) and train from the latent cache")
        if self.kind == "synthetic" and self.batching != "bucket":
            raise ValueError("batching applies to latent_cache and images data; synthetic batches are uniform "
                             "(leave batching at 'bucket')")  # fmt: skip
        if self.bucket_plan == "global" and self.batching != "bucket":
            raise ValueError("bucket_plan 'global' plans bucket batches; it needs batching 'bucket'")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.kind == "images" and not (self.vae and self.text_encoder):
            raise ValueError("data kind 'images' needs 'vae' and 'text_encoder' paths (the frozen encoders)")
        if self.weights is not None and (len(self.weights) != len(self.paths) or min(self.weights) <= 0):
            raise ValueError(f"weights must be one number > 0 per path: {len(self.paths)} paths, weights "
                             f"{list(self.weights)}")  # fmt: skip
        if self.text_len is not None and self.text_len < 1 or self.max_text_len < 1:
            raise ValueError(f"text_len and max_text_len must be >= 1, got {self.text_len} and {self.max_text_len}")
        if self.num_samples < 1 or self.cap_len < 1:
            raise ValueError(f"num_samples and cap_len (synthetic data) must be >= 1, got {self.num_samples} and "
                             f"{self.cap_len}")  # fmt: skip
        if self.num_workers < 0 or self.read_threads < 1 or self.max_consecutive_skips < 1:
            raise ValueError(f"num_workers must be >= 0, read_threads and max_consecutive_skips >= 1, got "
                             f"{self.num_workers}, {self.read_threads}, {self.max_consecutive_skips}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage of the progressive recipe (spec §6.4). ``batch`` is the global batch (all hosts).

    ``time_shift_mu``: a fixed ``mu`` for this stage's time shift (``t' = t / (e^mu (1 - t) + t)``),
    instead of the resolution rule of spec §6.1 (which assumes 16 pixels per token, the FLUX VAE with
    patch 2). Models with more features per token (e.g. pixel space, patch 8) decide their layout at
    smaller ``t`` and need more training there.

    ``t_sampling``: this stage's ``t`` distribution (``uniform`` or ``lognorm``) instead of the objective's.
    A strong shift on ``lognorm`` leaves almost no samples near ``t = 1`` (e^mu = 3: 0.6 % above
    ``t' = 0.8``), where the last noise is removed; ``uniform`` with the same shift keeps 8 % there.

    ``aux_loss_weight``: this stage's weight of the auxiliary low-resolution loss instead of the
    objective's (e.g. ``0`` for a low-resolution stage; spec §6.2 describes the term for 1024 px).
    """

    name: str = "stage"
    resolution: int = 256
    steps: int = 1000
    batch: int = 8
    lr: Optional[float] = None
    time_shift_mu: Optional[float] = None
    t_sampling: Optional[str] = None
    aux_loss_weight: Optional[float] = None
    data: DataConfig = DataConfig()

    def __post_init__(self):
        from lumina_jax.train.objective import T_SAMPLINGS

        if self.aux_loss_weight is not None and not 0 <= self.aux_loss_weight < math.inf:
            raise ValueError(f"stage {self.name!r}: aux_loss_weight must be a finite number >= 0, got {self.aux_loss_weight}")

        if self.t_sampling is not None and self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"stage {self.name!r}: unknown t_sampling {self.t_sampling!r}; choose from {T_SAMPLINGS}")
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"stage {self.name!r}: resolution {self.resolution} is not a positive multiple of 16")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"stage {self.name!r}: lr must be finite and >= 0, got {self.lr}")
        if self.time_shift_mu is not None and not math.isfinite(self.time_shift_mu):
            raise ValueError(f"stage {self.name!r}: time_shift_mu must be a finite number, got {self.time_shift_mu}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"stage {self.name!r}: steps and batch must be >= 1")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Rectified-flow loss (spec §6.1-6.2), see :mod:`lumina_jax.train.objective`."""

    t_sampling: str = "lognorm"
    time_shift: bool = True
    aux_loss_weight: float = 1.0
    aux_pool: int = 4

    def __post_init__(self):
        from lumina_jax.train.objective import T_SAMPLINGS

        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"unknown t_sampling {self.t_sampling!r}; choose from {T_SAMPLINGS}")
        if self.aux_pool < 1:
            raise ValueError(f"objective.aux_pool must be >= 1, got {self.aux_pool}")
        if not 0 <= self.aux_loss_weight < math.inf:  # NaN too: every step would be non-finite
            raise ValueError(f"objective.aux_loss_weight must be a finite number >= 0, got {self.aux_loss_weight}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing. ``every``: save interval in steps (0: only at stage ends and at the end);
    ``keep``: newest checkpoints kept; ``keep_every``: also keep every step divisible by it (0: none; the
    steps an earlier value kept stay); ``keep_stage_ends``: also keep each stage's last step (its final model);
    ``resume_data``: on resume, restore the data iterator saved with the checkpoint (exact data order);
    ``false`` restores only the train state and starts the stage's data from its beginning (when the data
    or the host layout changed so that the saved position means nothing)."""

    every: int = 1000
    keep: int = 3
    keep_every: int = 0
    keep_stage_ends: bool = True
    async_save: bool = True
    resume_data: bool = True

    def __post_init__(self):
        if self.every < 0 or self.keep_every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint: every and keep_every must be >= 0 and keep >= 1, got every={self.every}, "
                             f"keep={self.keep}, keep_every={self.keep_every}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """``every``: steps between metric lines / TensorBoard points; ``progress``: tqdm bar on process 0;
    ``dir``: local directory for ``metrics.jsonl``, TensorBoard events and sample PNGs (default: the
    run directory, or ``logs/<run name>`` when ``run_dir`` is a ``gs://`` URL)."""

    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    dir: Optional[str] = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1 (steps between metric lines), got {self.every}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Periodic sample grid (optional). ``fn`` is ``"module:function"`` with signature
    ``fn(params, model_config, prompts, seeds, resolution) -> uint8 (N, H, W, 3)``; the trainer tiles
    the images into a grid PNG (``<run_dir>/samples/step_XXXXXXX.png``) and logs it to TensorBoard."""

    every: int = 0
    fn: Optional[str] = None
    prompts: tuple[str, ...] = ("a photo of a cat", "a watercolor landscape")
    seeds: tuple[int, ...] = (0, 1)
    resolution: Optional[int] = None

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if self.every and not self.fn:
            raise ValueError(f"every={self.every} needs fn ('module:function' that renders the samples); "
                             "without it no samples are made")  # fmt: skip
        if self.fn is not None and (":" not in self.fn or not all(self.fn.split(":", 1))):
            raise ValueError(f"fn must be 'module:function', got {self.fn!r}")
        if self.every and not self.prompts:
            raise ValueError("samples.prompts is empty: a sample grid needs at least one prompt")
        if self.every and len(self.seeds) != len(self.prompts):
            raise ValueError(f"samples: {len(self.prompts)} prompts but {len(self.seeds)} seeds; give one seed per "
                             f"prompt (samples.seeds=[...])")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. See ``configs/train/*.yaml`` for annotated examples."""

    model: str = "nextdit_2b"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    init: Optional[str] = None
    run_dir: str = "runs/default"
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    dtype: str = "bfloat16"
    attention: str = "auto"
    remat: str = "none"
    scan_layers: bool = True
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: Optional[float] = 0.95
    grad_accum: int = 1
    trainable: tuple[str, ...] = (".*",)
    lora: Optional[LoraTrainConfig] = None  # LoRA fine-tuning of a frozen base (lumina_jax.train.lora)
    objective: ObjectiveConfig = ObjectiveConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    samples: SampleConfig = SampleConfig()
    max_nonfinite: int = 10
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    command: Optional[str] = None  # documentation only: the command that runs this config

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not self.stages:
            raise ValueError("at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        for s in self.stages:
            if s.batch % self.grad_accum:
                raise ValueError(f"stage {s.name!r}: batch {s.batch} is not divisible by grad_accum {self.grad_accum}")
        short = [s.name for s in self.stages if self.optimizer.warmup_steps > s.steps]
        if short and self.optimizer.warmup_steps > 0:  # the warm-up restarts at every stage
            import logging

            logging.getLogger("lumina_jax.train").warning(
                "optimizer.warmup_steps=%d is longer than stage(s) %s: the LR warms up again at every stage "
                "start and never reaches its peak there", self.optimizer.warmup_steps, short)
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or null, got {self.ema_decay}")
        if not self.scan_layers:  # the train state, its shardings and checkpoints use the stacked layout
            raise ValueError("scan_layers: false is not supported for training (the params, their shardings and "
                             "the checkpoints are stacked per layer); the inference pipeline and the model take it")
        if self.lora is not None and tuple(self.trainable) != (".*",):
            raise ValueError(f"trainable {list(self.trainable)} and lora are exclusive: a LoRA run trains its "
                             f"adapters only (choose the adapted matrices with lora.targets)")
        if self.init is not None and not str(self.init).strip():  # init=$UNSET_VAR in a launch script
            raise ValueError("init is empty: give a checkpoint to start from, or leave init out (null) to start "
                             "from random weights")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1 (consecutive skipped steps before aborting), "
                             f"got {self.max_nonfinite}")
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"trainable: {pattern!r} is not a regular expression ({e})") from None
        self._check_names()

    def _check_names(self) -> None:
        """Names that would otherwise fail only once the run has started (at model init or tracing)."""
        import lumina_jax.parallel.context  # noqa: F401 -- registers the context-parallel attention backends
        from lumina_jax.models.nextdit import REMAT_POLICIES
        from lumina_jax.ops.attention import available_backends

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.attention not in available_backends():
            raise ValueError(f"unknown attention backend {self.attention!r}; choose from {available_backends()}")
        load_model_config(self)  # FileNotFoundError naming the bundled configs; unknown model_overrides

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_bounds(self) -> list[tuple[int, int]]:
        """``[(start, end))`` global step range of each stage."""
        out, start = [], 0
        for s in self.stages:
            out.append((start, start + s.steps))
            start += s.steps
        return out

    def stage_at(self, step: int) -> int:
        """Index of the stage that runs global step ``step`` (the last stage for ``step >= total``)."""
        for i, (a, b) in enumerate(self.stage_bounds()):
            if a <= step < b:
                return i
        return len(self.stages) - 1

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(x: Any) -> Any:
    """A copy of ``x`` made of plain dicts, lists and scalars, each its own (``copy.deepcopy`` keeps the
    sharing of YAML anchors), with every :class:`_OverrideInt` a plain ``int`` (configs are dumped as YAML)."""
    if isinstance(x, _OverrideInt):
        return int(x)
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# building dataclasses from dicts, strictly


def _build(cls: type, d: Any, where: str) -> Any:
    if dataclasses.is_dataclass(d):
        return d
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(d).__name__} {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[f'{where}.{k}' if where else k for k in unknown]}; "
            f"known keys{' of ' + where if where else ''}: {sorted(fields)}"
        )
    kw = {}
    for k, v in d.items():
        kw[k] = _coerce(hints[k], v, f"{where}.{k}" if where else k)
    try:
        return cls(**kw)
    except ValueError as e:  # a section's own check: say which section (stages.1.data: ...)
        if not where or str(e).startswith(where):
            raise
        raise ValueError(f"{where}: {e}") from None


def _coerce(tp: Any, v: Any, where: str) -> Any:
    if tp is str and isinstance(v, _OverrideInt):
        return v.text  # run_dir=2024 (the shell took the quotes of run_dir="2024"): the text as typed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if v is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if tp is dict or origin is dict:  # e.g. model_overrides: an empty YAML block (all commented out) is null
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(v).__name__} {v!r}")
        return _to_plain(v)
    if origin is tuple:
        if isinstance(v, (str, int, float)):
            v = [v]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(v).__name__} {v!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, x, f"{where}.{i}") for i, x in enumerate(v))
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if tp is int and isinstance(v, float) and v.is_integer():
        return int(v)
    if tp in (int, float) and isinstance(v, bool):
        raise ValueError(f"{where}: expected {tp.__name__}, got bool {v!r}")
    if tp in (int, float, bool, str) and not isinstance(v, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(v).__name__} {v!r}")
    return int(v) if isinstance(v, _OverrideInt) else v


class _OverrideInt(int):
    """An integer typed on the command line, with its text (a text field takes the text: ``0017`` stays
    ``"0017"``, ``2024_01_05`` stays as typed)."""

    text: str

    def __new__(cls, value: int, text: str) -> "_OverrideInt":
        out = super().__new__(cls, value)
        out.text = text
        return out


def parse_value(text: str) -> Any:
    """A command-line value: YAML with 1.2's numbers (:func:`lumina_jax.config_utils.load_yaml`), ``nan``
    and ``inf`` as floats; a quoted value stays a string (``run_dir="2024"``), and an integer keeps its text
    for text fields (:class:`_OverrideInt`)."""
    try:
        v = load_yaml(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override value {text!r} is not valid YAML ({e})") from None
    if isinstance(v, int) and not isinstance(v, bool):
        return _OverrideInt(v, text.strip())
    if isinstance(v, str) and not text.strip().startswith(("'", '"')):
        try:
            return float(v)  # nan, inf
        except ValueError:
            pass
    return v


def _field_type(cls: type, key: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return None
    hints = typing.get_type_hints(cls)
    return hints.get(key)


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if inner else tp
    return tp


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][0][c] = value`` for ``dotted = "a.b.0.c"``, checking each key against the schema."""
    keys = dotted.split(".")
    node: Any = raw
    cls: Any = TrainConfig
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        path = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ValueError(f"override {dotted!r}: {path!r} is not an index of a list of {len(node)} items")
            idx = int(k)
            if last:
                node[idx] = value
                return
            if node[idx] is None:
                node[idx] = {}
            node, cls = node[idx], _unwrap(typing.get_args(cls)[0]) if typing.get_args(cls) else None
            continue
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {'.'.join(keys[:i])!r} is not a mapping")
        ftype = _field_type(cls, k) if cls is not None else None
        free_form = cls is dict or (cls is None and isinstance(node, dict))
        if ftype is None and not free_form:
            known = sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []
            raise ValueError(f"unknown config key {path!r} in override {dotted}={value!r}; known keys here: {known}")
        if last:
            node[k] = value
            return
        if node.get(k) is None:
            if _unwrap(ftype) is not None and typing.get_origin(_unwrap(ftype)) is tuple:
                raise ValueError(f"override {dotted!r}: {path!r} is empty; set the whole list instead")
            node[k] = {}
        node = node[k]
        cls = _unwrap(ftype) if ftype is not None else None
        if cls is not None and typing.get_origin(cls) is tuple:
            pass  # list items typed by the tuple argument, handled above


def load_config(path_or_name: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a train YAML (a path, or a name in ``configs/train``) and apply ``key=value`` overrides."""
    p = Path(path_or_name)
    if not p.exists() and not p.suffix:
        p = CONFIG_DIR / f"{path_or_name}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no train config {str(path_or_name)!r}; bundled: {names}")
    if p.is_dir():
        raise ValueError(f"{p} is a folder; pass a train config YAML (e.g. configs/train/tiny_synthetic.yaml)")
    text = p.read_text()
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from None
    bare_lora = re.search(r"^lora:[ \t]*(#.*)?$", text, re.MULTILINE)  # not `lora: null`, which says "off"
    if bare_lora and isinstance(raw, dict) and raw.get("lora") is None and \
            not any(o.split("=", 1)[0].strip().startswith("lora") for o in overrides):  # fmt: skip
        # an empty block (its lines commented out) would silently make the run a full fine-tune
        raise ValueError(f"{p}: 'lora:' is empty; write 'lora: {{}}' for a LoRA run with the default settings, or "
                         f"'lora: null' (or no key) to fine-tune every weight")  # fmt: skip
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    raw = _to_plain(raw)  # a copy: YAML anchors (`data: *data`) share one dict, an override must change one stage
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        apply_override(raw, k.strip(), parse_value(v))
    return _build(TrainConfig, raw, "")


def load_model_config(cfg: TrainConfig):
    """The :class:`NextDiTConfig` named by ``cfg.model`` with ``cfg.model_overrides`` applied."""
    from lumina_jax.models.nextdit import NextDiTConfig

    mc = NextDiTConfig.from_yaml(cfg.model)
    known = {f.name for f in dataclasses.fields(mc)}
    unknown = sorted(set(cfg.model_overrides) - known)
    if unknown:
        raise ValueError(f"unknown model_overrides key(s) {unknown}; model config keys: {sorted(known)}")
    return mc.replace(**cfg.model_overrides) if cfg.model_overrides else mc
