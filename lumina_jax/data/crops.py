"""Aspect-ratio crop sizes and the best-fit resize + crop of the original Lumina recipe (spec §6.5).

Reimplements the rule of Alpha-VLLM/Lumina-Image-2.0 ``imgproc.py`` as used by ``finetune.py``:

* ``generate_crop_size_list(num_patches=(res/16)**2, patch_size=16, max_ratio=4.0)`` walks a staircase
  from ``(num_patches, 1)`` patches down to width 1: at every step it keeps ``(wp, hp)`` if
  ``max/min <= max_ratio``, then grows ``hp`` while ``wp*(hp+1) <= num_patches``, else shrinks ``wp``.
  The kept sizes hug the area budget ``res**2`` and are listed widest first.
* ``var_center_crop(..., random_top_k=1)`` scores every size by
  ``min(cw/w, ch/h) / max(cw/w, ch/h)`` (1.0 = same aspect ratio as the image), sorts the
  ``(score, (cw, ch))`` tuples in descending order and takes the first; ties therefore go to the
  larger width, then the larger height.
* ``center_crop`` halves the image with a BOX filter while both sides are at least twice the target,
  resizes with BICUBIC so that the target is covered (``round`` of the scaled sides), and crops.
  The original draws the crop offset uniformly at random; we crop at the centre by default and offer
  the random offset as an option (``offset_rng``).

Note: for 1024 px the rule gives 193 sizes (2048x512 ... 512x2048), not the 51 written in spec §6.5;
the 193 follow from the code above with patch 16 (``8 * model.patch_size``) and 4096 patches.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

CropSize = tuple[int, int]  # (width, height) in pixels, PIL order

PATCH_PIXELS = 16  # VAE downsample 8 x DiT patch 2: one image token per 16x16 pixels


def generate_crop_size_list(
    num_patches: int, patch_size: int, max_ratio: float = 4.0
) -> list[CropSize]:
    """All (width, height) crop sizes of the original staircase rule, widest first."""
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    if num_patches < 1 or patch_size < 1:
        raise ValueError(f"num_patches and patch_size must be >= 1, got {num_patches}, {patch_size}")
    sizes: list[CropSize] = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            sizes.append((wp * patch_size, hp * patch_size))
        if wp * (hp + 1) <= num_patches:
            hp += 1
        else:
            wp -= 1
    return sizes


@functools.lru_cache(maxsize=32)
def crop_sizes_for_resolution(
    resolution: int, patch_size: int = PATCH_PIXELS, max_ratio: float = 4.0
) -> tuple[CropSize, ...]:
    """Crop sizes of a training stage at ``resolution`` px (area budget ``resolution**2``)."""
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch_size}")
    num_patches = round((resolution / patch_size) ** 2)
    return tuple(generate_crop_size_list(num_patches, patch_size, max_ratio))


def best_crop_size(width: int, height: int, crop_sizes: Sequence[CropSize]) -> CropSize:
    """The crop size whose aspect ratio best matches a ``width x height`` image (top-1 of the original)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best: Optional[tuple[float, CropSize]] = None
    for cw, ch in crop_sizes:
        sx, sy = cw / width, ch / height
        key = (min(sx, sy) / max(sx, sy), (cw, ch))
        if best is None or key > best:
            best = key
    if best is None:
        raise ValueError("crop_sizes is empty")
    return best[1]


class CropFitter:
    """:func:`best_crop_size` for many images at once-per-image cost O(log n) (the global bucket plan fits
    every record of a raw-image index; 193 sizes at 1024 px made the linear scan ~100 us per image).

    The score ``min(sx, sy) / max(sx, sy)`` equals ``exp(-|log(cw / ch) - log(w / h)|)``: it falls with
    the distance between the log aspect ratios. So the best size is among those nearest in log aspect
    ratio; the few within ``1e-9`` of the nearest distance are scored with :func:`best_crop_size` itself,
    so float rounding and ties resolve exactly as there (checked on random sizes in the tests).
    """

    def __init__(self, crop_sizes: Sequence[CropSize]):
        if not crop_sizes:
            raise ValueError("crop_sizes is empty")
        logs = [math.log(cw / ch) for cw, ch in crop_sizes]
        order = sorted(range(len(crop_sizes)), key=logs.__getitem__)
        self._logs = [logs[i] for i in order]
        self._sizes = [tuple(crop_sizes[i]) for i in order]

    def __call__(self, width: int, height: int) -> CropSize:
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        x, logs, n = math.log(width / height), self._logs, len(self._logs)
        i = bisect.bisect_left(logs, x)
        nearest = min(abs(logs[j] - x) for j in (i - 1, i) if 0 <= j < n)
        tol = nearest + 1e-9
        lo, hi = i - 1, i
        while lo >= 0 and x - logs[lo] <= tol:
            lo -= 1
        while hi < n and logs[hi] - x <= tol:
            hi += 1
        return best_crop_size(width, height, self._sizes[lo + 1:hi])


THIN_FACTOR = 4  # resized image over this many times the crop's area: resize the kept region only


def resize_and_crop(
    image: Image.Image,
    crop_size: CropSize,
    offset_rng: Optional[np.random.Generator] = None,
) -> Image.Image:
    """Resizes ``image`` to cover ``crop_size`` (aspect preserved) and crops it to exactly that size.

    The crop is centred unless ``offset_rng`` is given, in which case the offset is drawn uniformly
    (the original's behaviour).
    """
    cw, ch = crop_size
    while image.size[0] >= 2 * cw and image.size[1] >= 2 * ch:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = max(cw / image.size[0], ch / image.size[1])
    new_size = tuple(round(s * scale) for s in image.size)
    # Rounding can leave a side one pixel short of the target; never crop outside the image.
    new_size = (max(new_size[0], cw), max(new_size[1], ch))
    slack_x, slack_y = new_size[0] - cw, new_size[1] - ch
    if offset_rng is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = int(offset_rng.integers(0, slack_x + 1))
        top = int(offset_rng.integers(0, slack_y + 1))
    if new_size[0] * new_size[1] > THIN_FACTOR * cw * ch:
        # A very thin image (a 2 x 3000 strip at 1024 px would become 512 x 768000, GBs): resize only the
        # source region that lands in the crop (same geometry; the filter sees no pixels past the box).
        sx, sy = image.size[0] / new_size[0], image.size[1] / new_size[1]
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        return image.resize((cw, ch), resample=Image.BICUBIC, box=box)
    image = image.resize(new_size, resample=Image.BICUBIC)
    return image.crop((left, top, left + cw, top + ch))


def var_center_crop(
    image: Image.Image,
    crop_sizes: Sequence[CropSize],
    offset_rng: Optional[np.random.Generator] = None,
) -> Image.Image:
    """Best-fit crop size for ``image``, then :func:`resize_and_crop` to it."""
    return resize_and_crop(image, best_crop_size(*image.size, crop_sizes), offset_rng)
