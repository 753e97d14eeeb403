"""Per-sample transforms: decode, colour mode, best-fit crop, normalise, system prompt, caption dropout.

Mirrors ``T2IItemProcessor`` + the image transform of the original ``finetune.py`` (spec §6.5):
RGBA is composited on white, P and L become RGB, the image is resized and cropped to the best-fitting
size of the stage's crop list, and normalised to [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``), but
channels-last ``(H, W, 3)``. Extensions: LA/PA are composited on white like RGBA and 1/CMYK/YCbCr/LAB/HSV
are converted to RGB (the original raises on those modes); 16-bit and float modes are skipped.

Randomness (caption dropout, optional crop offset) comes from a generator seeded by
``(seed, source_id, epoch, record_index)``, so a sample's decisions do not depend on the number of
hosts or worker processes, or on what was skipped before it.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from lumina_jax import text_templates
from lumina_jax.data import crops
from lumina_jax.data.sources import RawItem, SkipSample

# Skip reasons, in the order they are checked.
SKIP_REASONS = (
    "missing",  # image file does not exist
    "unreadable",  # record or file could not be read (I/O or source error)
    "bad_record",  # record malformed (no caption/path key, corrupt container, ...)
    "empty_caption",  # caption missing or only whitespace
    "undecodable",  # not an image, truncated, or corrupt
    "unsupported_mode",  # e.g. 16-bit or float images
)

_TO_RGB_DIRECT = {"RGB", "P", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


def sample_rng(seed: int, source_id: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one sample; independent of sharding, workers and skipped neighbours."""
    return np.random.default_rng(np.random.SeedSequence([seed, source_id, epoch, index]))


def decode_image(data: bytes) -> Image.Image:
    """Decodes fully (so truncation is detected here, not later), turned as viewers show it
    (:func:`exif_oriented`). Raises on any failure."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return exif_oriented(image)


EXIF_ORIENTATION = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1-8; 1 = as stored, also for images without EXIF or with a broken one)."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- a malformed EXIF block: the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def exif_oriented(image: Image.Image) -> Image.Image:
    """``image`` as photo viewers show it: phone cameras store portrait shots landscape with an EXIF
    Orientation tag (6, 8, ...), which is applied here (as transformers' ``load_image`` does); without a
    tag the image itself is returned. Orientations 5-8 swap width and height (the size index does too)."""
    if exif_orientation(image) == 1:
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def image_from_array(data: np.ndarray) -> Image.Image:
    """A PIL image of a decoded ``uint8`` array ``(H, W)`` or ``(H, W, 1)`` (grey), ``(H, W, 3)`` (RGB) or
    ``(H, W, 4)`` (RGBA). Other arrays are left to PIL, which raises or gives a mode :func:`to_rgb` rejects."""
    if data.ndim == 3 and data.shape[-1] == 1:
        data = data[..., 0]  # PIL has no (H, W, 1) mode; it is greyscale ("L")
    return Image.fromarray(data)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparency -- an alpha channel, or a PNG ``tRNS`` colour of a palette, grey or RGB
    image -- is composited on white as in the original ``to_rgb_if_rgba``."""
    mode = image.mode
    keyed = mode in _TO_RGB_DIRECT and image.info.get("transparency") is not None
    if mode == "RGB" and not keyed:
        return image
    if mode in _WITH_ALPHA or keyed:
        rgba = image.convert("RGBA") if mode != "RGBA" else image
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.split()[3])
        return out
    if mode in _TO_RGB_DIRECT:
        return image.convert("RGB")
    raise SkipSample("unsupported_mode", f"image mode {mode}")


def normalize(image: Image.Image, dtype: Any = np.float32) -> np.ndarray:
    """uint8 RGB -> ``(H, W, 3)`` in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    return (arr / 127.5 - 1.0).astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class ImageTransformConfig:
    """How raw images become training samples.

    Attributes:
      resolution: stage resolution in px; crop sizes come from ``(resolution/16)**2`` patches.
      caption_dropout: probability that the whole prompt is replaced by ``""`` (spec §6.3: 0.1).
      random_crop_offset: draw the crop offset at random like the original (default: centre crop).
      max_ratio: largest allowed aspect ratio of a crop size.
      image_dtype: dtype of the normalised image (``"float32"`` or ``"bfloat16"``).
    """

    resolution: int = 1024
    caption_dropout: float = 0.1
    random_crop_offset: bool = False
    max_ratio: float = 4.0
    image_dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        crops.crop_sizes_for_resolution(self.resolution, crops.PATCH_PIXELS, self.max_ratio)
        _resolve_dtype(self.image_dtype)

    @property
    def crop_sizes(self) -> tuple[crops.CropSize, ...]:
        return crops.crop_sizes_for_resolution(self.resolution, crops.PATCH_PIXELS, self.max_ratio)


def skip_marker(reason: str, source: str, key: "str | LazyKey") -> dict:
    return {"_skip": reason, "source": source, "key": key}


class LazyKey:
    """A skip marker's key that is built only when it is shown (``str``/``repr``, or pickled: it pickles as the
    plain string), for keys that cost a read of the record: only the few skips that are logged pay for it."""

    __slots__ = ("_make", "_text")

    def __init__(self, make: Callable[[], str]):
        self._make: Optional[Callable[[], str]] = make
        self._text: Optional[str] = None

    def __str__(self) -> str:
        if self._text is None:
            self._text, self._make = str(self._make()), None
        return self._text

    def __repr__(self) -> str:
        return repr(str(self))

    def __eq__(self, other: Any) -> bool:
        return str(self) == (str(other) if isinstance(other, LazyKey) else other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self) -> tuple:
        return str, (str(self),)


def is_skip(element: Any) -> bool:
    return isinstance(element, dict) and "_skip" in element


class ImageSampleLoader:
    """``(epoch, record_index) -> sample dict`` for an image source, or a skip marker.

    Sample: ``image`` (H, W, 3) in [-1, 1], ``image_size`` (H, W), ``prompt`` (system prompt + caption,
    or ``""`` when dropped), ``caption_dropped``, ``id`` (``"<source>:<index>"``), ``key``, ``source``,
    ``epoch``. A picklable callable, so it can run in grain worker processes.
    """

    def __init__(self, source: Any, source_id: int, config: ImageTransformConfig, seed: int):
        self.source = source
        self.source_id = source_id
        self.config = config
        self.seed = seed
        self._dtype = np.dtype(_resolve_dtype(config.image_dtype))

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, index = int(item[0]), int(item[1])
        name = self.source.name
        default_key = f"{name}:{index}"
        try:
            raw: RawItem = self.source.get(index)
        except SkipSample as e:
            return skip_marker(e.reason, name, f"{default_key} ({e.detail})" if e.detail else default_key)
        except FileNotFoundError:
            return skip_marker("missing", name, default_key)
        except Exception as e:  # noqa: BLE001 -- any read failure is a counted skip
            return skip_marker("unreadable", name, f"{default_key} ({type(e).__name__}: {e})")

        key = raw.key or default_key
        detail = text_templates.system_prompt_problem(raw.system_prompt)
        if detail is not None:
            return skip_marker("bad_record", name, f"{key} ({detail})")
        caption = raw.caption
        if caption is None or caption.strip() == "":
            return skip_marker("empty_caption", name, key)

        data = raw.image
        if data is None:
            if raw.image_path is None:
                return skip_marker("bad_record", name, key)
            try:
                with open(raw.image_path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return skip_marker("missing", name, key)
            except OSError as e:
                return skip_marker("unreadable", name, f"{key} ({e})")
        try:
            if isinstance(data, np.ndarray):
                image = image_from_array(data)
            else:
                image = decode_image(data)
        except Exception as e:  # noqa: BLE001 -- truncated / corrupt / not an image
            return skip_marker("undecodable", name, f"{key} ({type(e).__name__}: {e})")
        try:
            image = to_rgb(image)
        except SkipSample as e:
            return skip_marker(e.reason, name, f"{key} ({e.detail})")

        # Fixed draw order: dropout first, then the optional crop offset.
        rng = sample_rng(self.seed, self.source_id, epoch, index)
        dropped = bool(rng.random() < self.config.caption_dropout)
        offset_rng = rng if self.config.random_crop_offset else None
        try:
            image = crops.var_center_crop(image, self.config.crop_sizes, offset_rng)
        except Exception as e:  # noqa: BLE001 -- e.g. decompression errors surfacing at resize
            return skip_marker("undecodable", name, f"{key} ({type(e).__name__}: {e})")
        prompt = "" if dropped else text_templates.build_prompt(caption, raw.system_prompt)
        pixels = normalize(image, self._dtype)
        return {
            "image": pixels,
            "image_size": (pixels.shape[0], pixels.shape[1]),
            "prompt": prompt,
            "caption_dropped": dropped,
            "id": default_key,
            "key": key,
            "source": self.source_id,
            "epoch": epoch,
        }


def _resolve_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in ("float32", "float16"):
        raise ValueError(f"image_dtype must be float32, float16 or bfloat16, got {name!r}")
    return name
