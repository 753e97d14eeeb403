"""Host-side input processing for the captioner, in NumPy/PIL (no torch at inference).

- :func:`smart_resize` / :func:`preprocess_image`: the Qwen2-VL image processor (transformers 5.24
  ``Qwen2VLImageProcessorPil``): RGB (transparency composited over white, :func:`convert_to_rgb`), bicubic
  resize (PIL, uint8) to sides that are multiples of ``patch_size * merge_size`` with a pixel count inside
  ``[min_pixels, max_pixels]``, ``x / 255``, CLIP mean/std normalisation, and patch flattening (each patch
  ``(C, T, P, P)`` with the still image repeated over the ``temporal_patch_size`` frames; patches ordered
  merged token by merged token).
- :class:`Tokenizer`: a ``tokenizers`` tokenizer read from ``tokenizer.json`` of a model directory, with the
  Qwen special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``,
  ``<|vision_end|>``).
- :func:`chat_prompt`: the Qwen2-VL chat template for one image and one user instruction.
- :func:`rope_index`: the M-RoPE position ids of an image+text prompt (HF ``get_rope_index``): text tokens
  count up on all three axes; an image's merged tokens get ``(start, start + row, start + col)``; the text
  after it continues at ``start + max(rows, cols)``.
- :func:`build_batch`: left-padded prompts, positions, the vision slot layout and the feature gather index,
  with the prompt length and the slot count rounded up to compiled buckets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from lumina_jax.models.captioner.config import CaptionerConfig, VisionConfig
from lumina_jax.models.captioner.model import PromptBatch
from lumina_jax.models.captioner.vision import slots_needed, vision_layout

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


# ----------------------------------------------------------------------------------------------
# images


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the Qwen2-VL image processor (``preprocessor_config.json``)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """From a ``preprocessor_config.json`` dict (4.x ``min_pixels``/``max_pixels`` or 5.x ``size``)."""
        size = d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", 14)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            merge_size=int(d.get("merge_size", 2)),
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
                           or 28 * 28 * 1280),
            image_mean=tuple(float(x) for x in d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(x) for x in d.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
        )

    @classmethod
    def for_model(cls, config: CaptionerConfig, **overrides: Any) -> "ImageProcessorConfig":
        """Defaults matching a model's patch geometry."""
        v = config.vision
        kw = dict(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: Optional[CaptionerConfig] = None) -> "ImageProcessorConfig":
        """``preprocessor_config.json`` of a model directory, else defaults for ``config`` (with a warning: a
        fine-tuned model's own pixel limits would be lost)."""
        f = Path(path) / "preprocessor_config.json"
        if f.is_file():
            return cls.from_dict(json.loads(f.read_text()))
        default = cls.for_model(config) if config is not None else cls()
        warnings.warn(f"{path}: no preprocessor_config.json; using the Qwen2-VL defaults (min_pixels "
                      f"{default.min_pixels}, max_pixels {default.max_pixels}); transformers' processor would not "
                      f"load this folder", stacklevel=2)  # fmt: skip
        return default

    def to_dict(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` that transformers' ``Qwen2VLImageProcessor`` reads."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3,
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
        }

    def check_model(self, config: CaptionerConfig) -> None:
        v = config.vision
        mine = (self.patch_size, self.temporal_patch_size, self.merge_size)
        theirs = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        if mine != theirs:
            raise ValueError(f"image processor (patch, temporal, merge)={mine} does not match the model's {theirs}")


MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses longer/shorter side ratios above this


class UnsupportedImageError(ValueError):
    """A readable image the Qwen2-VL processor cannot take (aspect ratio above :data:`MAX_ASPECT_RATIO`)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Sides that are multiples of ``factor``, area within ``[min_pixels, max_pixels]``, aspect kept.

    Same arithmetic as transformers' ``smart_resize`` (Python's round-half-even included). Raises
    :class:`UnsupportedImageError` for an aspect ratio above :data:`MAX_ASPECT_RATIO` (as transformers does).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UnsupportedImageError(f"aspect ratio {max(height, width) / min(height, width):.1f} > "
                                    f"{MAX_ASPECT_RATIO} is not supported ({width}x{height} px)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def convert_to_rgb(image: Any) -> Any:
    """An RGB PIL image; transparency is composited over white first, as transformers' ``convert_to_rgb``.

    A PIL image with an alpha band (RGBA, LA, PA, ...) or a ``transparency`` entry (palette or RGB/L with a
    transparent colour) goes through RGBA and ``alpha_composite`` onto opaque white; any other mode is a
    plain ``convert("RGB")``. Arrays follow transformers' array path: ``(H, W, 4)`` is blended onto white
    in float64 and rounded, ``(H, W, 1)`` / ``(H, W)`` grey is repeated over three channels.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        x = image
        if x.ndim == 3 and x.shape[-1] == 4:
            white = 255 if np.issubdtype(x.dtype, np.integer) else 1.0
            alpha = x[..., 3:4] / white
            blend = alpha * x[..., :3] + (1 - alpha) * white
            x = np.round(blend).astype(x.dtype) if white == 255 else blend.astype(x.dtype)
        elif x.ndim == 3 and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        image = Image.fromarray(x)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess_image(image: Any, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image (or HWC uint8 array) -> ``(patches (gh*gw, C*T*P*P) float32, (gh, gw))``.

    Raises :class:`UnsupportedImageError` for an aspect ratio the processor does not support.
    """
    from PIL import Image

    image = convert_to_rgb(image)
    width, height = image.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    image = image.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    x = (np.asarray(image).astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # (H, W, C)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)  # (C, H, W)
    return patchify(x, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def patchify(x: np.ndarray, patch: int, merge: int, temporal: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``(C, H, W)`` -> flattened patches in merged-token order (HF ``patchify``), image repeated over time."""
    C, H, W = x.shape
    gh, gw = H // patch, W // patch
    p = x.reshape(C, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    p = np.broadcast_to(p[:, :, :, :, :, None], (*p.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(p.reshape(gh * gw, C * temporal * patch * patch), np.float32), (gh, gw)


def load_image(path: str | os.PathLike) -> Any:
    """Open and fully decode an image file as RGB (:func:`convert_to_rgb`: transparency composited over
    white), turned by its EXIF orientation as transformers' ``load_image`` does; raises on unreadable /
    truncated files."""
    from PIL import Image

    from lumina_jax.data.transforms import exif_oriented

    with Image.open(path) as im:
        im.load()
        return convert_to_rgb(exif_oriented(im))


# ----------------------------------------------------------------------------------------------
# text


class Tokenizer:
    """A ``tokenizers.Tokenizer`` (``tokenizer.json``) with the Qwen special tokens looked up by name."""

    def __init__(self, tok: Any):
        self._tok = tok

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as _T

        f = Path(path) / "tokenizer.json"
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (save the tokenizer with a fast tokenizer's "
                                    f"save_pretrained into the model directory)")
        return cls(_T.from_file(str(f)))

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"the tokenizer has no token {token!r}")
        return int(i)

    def maybe_token_id(self, token: str) -> Optional[int]:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def chat_prompt(instruction: str, system: Optional[str] = DEFAULT_SYSTEM) -> str:
    """Qwen2-VL chat template, one image before the instruction, ready for the assistant's answer."""
    sys = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    return (f"{sys}{IM_START}user\n{VISION_START}{IMAGE_PAD}{VISION_END}{instruction}{IM_END}\n"
            f"{IM_START}assistant\n")


def expand_image_tokens(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> list[int]:
    """Replace the k-th ``<|image_pad|>`` by ``counts[k]`` copies (one per merged token)."""
    out: list[int] = []
    k = 0
    for t in ids:
        if t == image_token_id:
            if k >= len(counts):
                raise ValueError(f"prompt has more image tokens than images ({len(counts)})")
            out.extend([image_token_id] * int(counts[k]))
            k += 1
        else:
            out.append(int(t))
    if k != len(counts):
        raise ValueError(f"prompt has {k} image tokens for {len(counts)} images")
    return out


def rope_index(ids: Sequence[int], grids: Sequence[tuple[int, int]], config: CaptionerConfig) -> np.ndarray:
    """``int32[3, L]`` M-RoPE ids of one unpadded prompt whose image tokens are already expanded.

    ``grids``: the ``(grid_h, grid_w)`` patch grid of each image in prompt order. Each maximal run of image
    tokens is one image (t = 1): merged token ``(r, c)`` gets ``(s, s + r, s + c)`` with ``s`` the running
    position; the next text token starts at ``s + max(rows, cols)``.
    """
    m = config.vision.spatial_merge_size
    ids = np.asarray(ids)
    is_img = ids == config.image_token_id
    pos = np.zeros((3, len(ids)), np.int64)
    cur, i, k = 0, 0, 0
    while i < len(ids):
        if not is_img[i]:
            pos[:, i] = cur
            cur += 1
            i += 1
            continue
        if k >= len(grids):
            raise ValueError("more image-token runs than images")
        gh, gw = grids[k]
        mh, mw = gh // m, gw // m
        n = mh * mw
        if i + n > len(ids) or not is_img[i:i + n].all():
            raise ValueError(f"image {k} expects {n} consecutive image tokens at position {i}")
        r, c = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
        pos[0, i:i + n] = cur
        pos[1, i:i + n] = cur + r.reshape(-1)
        pos[2, i:i + n] = cur + c.reshape(-1)
        cur += max(mh, mw)
        i += n
        k += 1
    if k != len(grids):
        raise ValueError(f"{k} image-token runs for {len(grids)} images")
    return pos.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# batches


def round_up(n: int, buckets: Sequence[int] | int) -> int:
    """Smallest bucket >= n (a list), or n rounded up to a multiple (an int)."""
    if isinstance(buckets, int):
        return -(-n // buckets) * buckets
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}")


def capped_slots(cfg: ImageProcessorConfig, vision: VisionConfig, max_aspect: float = 4.0) -> int:
    """The most vision slots (window padding included) an image takes once resized to the pixel cap,
    over aspect ratios from ``1 / max_aspect`` to ``max_aspect``: the top of :func:`default_slot_buckets`
    (thinner images get programs of their own size)."""
    most, side = 0, 16384  # large enough for the pixel cap to decide the size
    for i in range(65):
        aspect = max_aspect ** (i / 32 - 1)
        rh, rw = smart_resize(side, max(1, round(side * aspect)), cfg.factor, cfg.min_pixels, cfg.max_pixels)
        most = max(most, slots_needed((rh // cfg.patch_size, rw // cfg.patch_size), vision))
    return most


def default_slot_buckets(vision: VisionConfig, max_slots: int, smallest: int = 256, ratio: float = 1.5) -> list[int]:
    """Buckets (multiples of ``window_slots``) growing by ``ratio`` from ``smallest``, the last one exactly
    ``max_slots`` rounded up: images resized to the pixel cap (most photos) fill it, instead of ~60 % of
    the next doubling (which costs the vision tower that much more work)."""
    ws = vision.window_slots
    top = round_up(max_slots, ws)
    out = [min(round_up(smallest, ws), top)]
    while out[-1] < top:
        out.append(min(round_up(int(out[-1] * ratio), ws), top))
    return out


@dataclasses.dataclass
class Example:
    """One prompt with its image: the unpadded token ids (image tokens expanded) and preprocessed patches."""

    ids: list[int]
    patches: np.ndarray  # (gh*gw, patch_dim)
    grid: tuple[int, int]


def prompt_ids(instruction: str, tokenizer: Tokenizer, config: CaptionerConfig,
               system: Optional[str] = DEFAULT_SYSTEM) -> list[int]:
    """Token ids of the one-image chat prompt (one unexpanded ``<|image_pad|>``), checked against the model.

    Raises ``ValueError`` naming the problem when the tokenizer's ``<|image_pad|>`` id is not the model's
    ``image_token_id`` (tokenizer and model from different checkpoints), or when the instruction or the
    system prompt holds ``<|image_pad|>`` itself (the prompt must carry exactly one image).
    """
    image_id = tokenizer.token_id(IMAGE_PAD)
    if image_id != config.image_token_id:
        raise ValueError(f"the tokenizer's {IMAGE_PAD} id {image_id} != the model's image_token_id "
                         f"{config.image_token_id}: tokenizer and model come from different checkpoints")
    ids = tokenizer.encode(chat_prompt(instruction, system))
    n = sum(1 for t in ids if t == image_id)
    if n != 1:
        raise ValueError(f"the chat prompt holds {n} {IMAGE_PAD} tokens instead of 1: the instruction or the "
                         f"system prompt must not contain {IMAGE_PAD}")
    return ids


def make_example(image: Any, instruction: str, tokenizer: Tokenizer, config: CaptionerConfig,
                 proc: ImageProcessorConfig, system: Optional[str] = DEFAULT_SYSTEM, *,
                 ids: Optional[Sequence[int]] = None) -> Example:
    """Preprocess one image and tokenize its chat prompt (image tokens expanded).

    ``ids``: the prompt's tokens from :func:`prompt_ids` (computed and checked once by a caller captioning
    many images with one prompt); by default computed here from ``instruction`` and ``system``. Raises
    ``ValueError`` for a prompt/model mismatch (see :func:`prompt_ids`) and :class:`UnsupportedImageError`
    for an image the processor does not take.
    """
    if ids is None:
        ids = prompt_ids(instruction, tokenizer, config, system)
    patches, grid = preprocess_image(image, proc)
    n = grid[0] * grid[1] // config.vision.merge_unit
    return Example(expand_image_tokens(ids, config.image_token_id, [n]), patches, grid)


def build_batch(examples: Sequence[Example], config: CaptionerConfig, *, batch_size: Optional[int] = None,
                prompt_buckets: Sequence[int] | int = 64, slot_buckets: Sequence[int] | int | None = None,
                prompt_len: Optional[int] = None, slots: Optional[int] = None, pad_token_id: int = 0) -> PromptBatch:
    """Left-pad prompts and lay out images into one :class:`PromptBatch` of NumPy arrays.

    ``batch_size`` rows are allocated (extra rows are inert: one pad token, no image; pass them as
    inactive to :func:`~lumina_jax.models.captioner.decode.generate`). The prompt length is ``prompt_len``
    or the longest prompt rounded up by ``prompt_buckets``; the slot count ``slots`` or the largest need
    rounded up by ``slot_buckets`` (default: to a multiple of ``window_slots``), so that a few compiled
    shapes serve every batch.
    """
    B = batch_size or len(examples)
    if not 0 < len(examples) <= B:
        raise ValueError(f"{len(examples)} examples for batch_size={B}")
    v = config.vision
    need_slots = max(slots_needed(e.grid, v) for e in examples)
    if slots is None:
        slots = round_up(need_slots, slot_buckets if slot_buckets is not None else v.window_slots)
    vis, merged_slots = vision_layout([(e.patches, e.grid) for e in examples], v, slots, batch_size=B)
    longest = max(len(e.ids) for e in examples)
    P = round_up(longest, prompt_buckets) if prompt_len is None else prompt_len
    if P < longest:
        raise ValueError(f"prompt_len={P} is shorter than the longest prompt ({longest} tokens)")

    input_ids = np.full((B, P), pad_token_id, np.int32)
    positions = np.zeros((3, B, P), np.int32)
    kv_start = np.full((B,), P - 1, np.int32)  # dummy rows: one token at the last slot
    image_index = np.full((B, P), -1, np.int32)
    next_position = np.ones((B,), np.int32)
    for b, e in enumerate(examples):
        L = len(e.ids)
        start = P - L
        ids = np.asarray(e.ids, np.int32)
        input_ids[b, start:] = ids
        pos = rope_index(e.ids, [e.grid], config)
        positions[:, b, start:] = pos
        kv_start[b] = start
        next_position[b] = int(pos.max()) + 1
        img_at = np.nonzero(ids == config.image_token_id)[0]
        image_index[b, start + img_at] = merged_slots[b]
    return PromptBatch(input_ids, positions, kv_start, image_index, next_position, vis)
