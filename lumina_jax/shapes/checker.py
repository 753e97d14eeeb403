"""Deterministic checker for images of the shapes world (no learned model).

For an image and the scene its prompt described:

1. background: the median colour of the border pixels, named by the nearest background colour;
2. foreground: pixels farther than ``FG_DIST`` (RGB Euclidean) from the measured background, split into
   connected components (4-connectivity); components under ``MIN_AREA`` px (at 64 px) are noise;
3. colour (pixel clustering): every foreground pixel of a component is assigned to its nearest named
   colour; the component's colour is the majority cluster, ``other`` when the component's median colour
   is farther than ``MAX_COLOUR_DIST`` from it (grey is not purple);
4. shape (geometry): fill ratio = area / bounding-box area (square ~1.0, circle ~0.79, triangle ~0.5),
   plus the vertical mass balance (a triangle has most of its mass in its lower half); ``other`` for a
   bounding box more than ``MAX_ASPECT`` times longer one way than the other (the shapes are drawn 1:1);
5. position: the bounding-box centre (a triangle's centroid sits a sixth of its height below it),
   relative to the image centre: ``center`` if within 12.5 % of the side, else the dominant axis
   (left/right or top/bottom).

Components are matched to the expected objects by position order (left before right, top before bottom;
the largest component for one-object scenes). A missing component makes every attribute of that object
wrong. :func:`check` returns per-object booleans; :func:`summarise` aggregates accuracies.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from lumina_jax.shapes.spec import BACKGROUNDS, COLOURS, Obj, Scene

FG_DIST = 80.0
MIN_AREA_FRAC = 25 / 64**2
MAX_COLOUR_DIST = 60.0  # RGB Euclidean, component median to its named colour (the model: <= 29; palette gaps >= 109)
MAX_ASPECT = 1.35
ATTRIBUTES = ("colour", "shape", "position")


@dataclasses.dataclass
class Component:
    area: int
    cx: float  # fractions of the side
    cy: float
    colour: str
    shape: str
    position: str
    fill: float


def _labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    try:
        from scipy import ndimage

        lab, n = ndimage.label(mask)
        return lab, int(n)
    except ImportError:  # pragma: no cover - scipy is normally present
        lab = np.zeros(mask.shape, np.int32)
        n = 0
        for y, x in zip(*np.nonzero(mask)):
            if lab[y, x]:
                continue
            n += 1
            stack = [(y, x)]
            lab[y, x] = n
            while stack:
                a, b = stack.pop()
                for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    p, q = a + da, b + db
                    if 0 <= p < mask.shape[0] and 0 <= q < mask.shape[1] and mask[p, q] and not lab[p, q]:
                        lab[p, q] = n
                        stack.append((p, q))
        return lab, n


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into ``list(palette)`` of the nearest palette colour of each ``(..., 3)`` pixel."""
    pal = np.asarray(list(palette.values()), np.float32)
    d = np.sum((rgb[..., None, :].astype(np.float32) - pal) ** 2, axis=-1)
    return np.argmin(d, axis=-1)


def classify_position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.125:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def classify_shape(m: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(m)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(m.sum()) / float(h * w)
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "other", fill
    # triangles: mass concentrated towards the base (lower half holds ~3/4 of the area)
    mid = (ys.min() + ys.max()) / 2.0
    lower = float(np.mean(ys > mid))
    if fill > 0.88:
        return "square", fill
    if fill < 0.66 or lower > 0.66:
        return "triangle", fill
    return "circle", fill


def components(image: np.ndarray) -> tuple[str, list[Component]]:
    """Background name and the foreground components (largest first) of a ``(H, W, 3)`` uint8 image."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    hgt, wid = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    bg_rgb = np.median(border, axis=0)
    bg = list(BACKGROUNDS)[int(nearest(bg_rgb, BACKGROUNDS))]
    dist = np.sqrt(np.sum((img.astype(np.float32) - bg_rgb) ** 2, axis=-1))
    mask = dist > FG_DIST
    lab, n = _labels(mask)
    names = list(COLOURS)
    out = []
    min_area = MIN_AREA_FRAC * hgt * wid
    for k in range(1, n + 1):
        m = lab == k
        area = int(m.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(m)
        cluster = nearest(img[m], COLOURS)
        colour = names[int(np.bincount(cluster, minlength=len(names)).argmax())]
        median = np.median(img[m].astype(np.float32), axis=0)
        if np.linalg.norm(median - np.asarray(COLOURS[colour], np.float32)) > MAX_COLOUR_DIST:
            colour = "other"
        cx, cy = (xs.min() + xs.max() + 1) / 2 / wid, (ys.min() + ys.max() + 1) / 2 / hgt
        shape, fill = classify_shape(m)
        out.append(Component(area, float(cx), float(cy), colour, shape, classify_position(cx, cy), fill))
    out.sort(key=lambda c: -c.area)
    return bg, out


@dataclasses.dataclass
class Result:
    background: bool
    objects: list[dict[str, bool]]  # per expected object: {"colour": bool, "shape": bool, "position": bool}
    count: bool  # as many components as objects

    @property
    def all_correct(self) -> bool:
        return self.background and self.count and all(all(o.values()) for o in self.objects)


def check(image: np.ndarray, scene: Scene) -> Result:
    bg, comps = components(image)
    want = list(scene.objects)
    comps_used = comps[: len(want)]
    if len(want) == 2:
        axis = "cx" if want[0].position in ("left", "right") else "cy"
        comps_used = sorted(comps_used, key=lambda c: getattr(c, axis))
    objs = []
    for i, o in enumerate(want):
        if i >= len(comps_used):
            objs.append({a: False for a in ATTRIBUTES})
            continue
        c = comps_used[i]
        objs.append({"colour": c.colour == o.colour, "shape": c.shape == o.shape, "position": c.position == o.position})
    return Result(bg == scene.background, objs, len(comps) == len(want))


def summarise(results: Iterable[Result]) -> dict[str, float]:
    """Accuracies in [0, 1]: per object attribute (``colour``, ``shape``, ``position``), ``background`` and
    ``count`` per image, ``all`` (everything right) per image; ``n_images``, ``n_objects``."""
    results = list(results)
    objs = [o for r in results for o in r.objects]
    out = {a: float(np.mean([o[a] for o in objs])) if objs else 0.0 for a in ATTRIBUTES}
    out["background"] = float(np.mean([r.background for r in results])) if results else 0.0
    out["count"] = float(np.mean([r.count for r in results])) if results else 0.0
    out["all"] = float(np.mean([r.all_correct for r in results])) if results else 0.0
    out["n_images"] = len(results)
    out["n_objects"] = len(objs)
    return out


def check_many(images: Sequence[np.ndarray], scenes: Sequence[Scene]) -> dict[str, float]:
    return summarise(check(i, s) for i, s in zip(images, scenes))


def describe_image(image: np.ndarray) -> str:
    bg, comps = components(image)
    parts = [f"{c.colour} {c.shape} {c.position} (area {c.area}, fill {c.fill:.2f})" for c in comps]
    return f"background {bg}: " + ("; ".join(parts) if parts else "no objects")


__all__ = ["check", "check_many", "summarise", "components", "Result", "Obj", "Scene", "describe_image"]
