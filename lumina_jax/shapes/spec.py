"""The synthetic "shapes" world: vocabulary, scenes, rendering, captions and the held-out split.

A scene is one or two coloured shapes at named positions on a plain background::

    Scene(background="white", objects=(Obj("red", "circle", "left"), Obj("blue", "square", "right")))

rendered at 64x64 (any size works; coordinates are fractions of the side) and captioned in several
phrasings (``"a red circle on the left and a blue square on the right, on a white background"``,
``"a red circle to the left of a blue square, on a white background"``, ...).

Generalisation split: a fixed set of (colour, shape, position) *triples* (:data:`HELD_OUT`, about 15 %)
never appears in training; every colour, shape, position and every (colour, shape), (shape, position)
and (colour, position) pair still does. A scene is *held out* when any of its objects is a held-out
triple. Everything here is deterministic (NumPy only, seeded).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Optional

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 175),
    "orange": (250, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

# centre of each named position, as fractions of the image side (x, y)
CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5),
}  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}  # fmt: skip
RELATION_PHRASES: dict[tuple[str, str], str] = {("left", "right"): "to the left of", ("top", "bottom"): "above"}

EXAMPLE_PROMPT = "a red circle on the left and a blue square on the right, on a white background"


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [dataclasses.asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(Obj(**o) for o in d["objects"]))


def all_triples() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def _held_out() -> frozenset[tuple[str, str, str]]:
    # A Latin-square-like pattern: (ci + 2 si + 3 pi) % 7 == 3 picks ~1/7 of the 90 triples, spread so that
    # every pair of attributes keeps training examples. The README example's objects stay seen.
    keep = {("red", "circle", "left"), ("blue", "square", "right")}
    out = set()
    for (ci, c), (si, s), (pi, p) in itertools.product(enumerate(COLOURS), enumerate(SHAPES), enumerate(POSITIONS)):
        if (ci + 2 * si + 3 * pi) % 7 == 3 and (c, s, p) not in keep:
            out.add((c, s, p))
    return frozenset(out)


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out()


def is_held_out(scene: Scene) -> bool:
    return any((o.colour, o.shape, o.position) in HELD_OUT for o in scene.objects)


# ----------------------------------------------------------------------------------------------
# sampling


def random_scene(rng: np.random.Generator, *, held_out: Optional[bool] = False, p_pair: float = 0.6) -> Scene:
    """A random scene. ``held_out``: ``False`` only training combinations, ``True`` only held-out scenes
    (at least one held-out object), ``None`` anything."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for _ in range(10_000):
        bg = backgrounds[rng.integers(len(backgrounds))]
        if rng.random() < p_pair:
            pos = PAIRS[rng.integers(len(PAIRS))]
            c1, c2 = rng.choice(len(colours), 2, replace=False)
            s1, s2 = rng.integers(len(SHAPES), size=2)
            objs = (Obj(colours[c1], SHAPES[s1], pos[0]), Obj(colours[c2], SHAPES[s2], pos[1]))
        else:
            objs = (Obj(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                        POSITIONS[rng.integers(len(POSITIONS))]),)  # fmt: skip
        scene = Scene(bg, objs)
        if held_out is None or is_held_out(scene) == held_out:
            return scene
    raise RuntimeError("could not sample a scene")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# captions


def caption(scene: Scene, variant: Optional[int] = None, rng: Optional[np.random.Generator] = None) -> str:
    """One of several phrasings of ``scene`` (``variant`` picks one; else ``rng``, else the first)."""
    bg = scene.background
    if len(scene.objects) == 1:
        o = scene.objects[0]
        forms = [
            f"a {o.colour} {o.shape} {POSITION_PHRASES[o.position]}, on a {bg} background",
            f"a {bg} background with a {o.colour} {o.shape} {POSITION_PHRASES[o.position]}",
            f"there is a {o.colour} {o.shape} {POSITION_PHRASES[o.position]} on a {bg} background",
        ]
    else:
        a, b = scene.objects
        rel = RELATION_PHRASES[(a.position, b.position)]
        pa, pb = POSITION_PHRASES[a.position], POSITION_PHRASES[b.position]
        forms = [
            f"a {a.colour} {a.shape} {pa} and a {b.colour} {b.shape} {pb}, on a {bg} background",
            f"a {b.colour} {b.shape} {pb} and a {a.colour} {a.shape} {pa}, on a {bg} background",
            f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}, on a {bg} background",
            f"a {bg} background with a {a.colour} {a.shape} {pa} and a {b.colour} {b.shape} {pb}",
        ]
    if variant is None:
        variant = int(rng.integers(len(forms))) if rng is not None else 0
    return forms[variant % len(forms)]


def vocabulary_corpus() -> list[str]:
    """Every caption phrasing of every scene kind (for the tokenizer), deterministic."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(3000):
        s = random_scene(rng, held_out=None)
        out.append(caption(s, rng=rng))
    return out


_VOCABULARY: set[str] = set()


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that no caption of the shapes world uses (punctuation stripped, the first
    word's capital allowed): the bundled model has never seen them, and its output for them is arbitrary."""
    if not _VOCABULARY:
        _VOCABULARY.update(w for c in vocabulary_corpus() for w in re.findall(r"[^\s,.]+", c))
    words = re.findall(r"[^\s,.;:!?]+", prompt)
    known = [w in _VOCABULARY or (i == 0 and w[:1].lower() + w[1:] in _VOCABULARY) for i, w in enumerate(words)]
    return list(dict.fromkeys(w for w, ok in zip(words, known) if not ok))


# ----------------------------------------------------------------------------------------------
# rendering


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in _GRIDS:
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        _GRIDS[n] = ((xx + 0.5) / n, (yy + 0.5) / n)
    return _GRIDS[n]


def render(scene: Scene, size: int = 64, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``(size, size, 3)`` uint8 image. With ``rng``: small jitter of position (+-4 %) and size
    (radius 13-16 % of the side); without: canonical placement. Shapes are antialiased by 4x
    supersampling."""
    ss = 4
    n = size * ss
    xx, yy = _grid(n)
    img = np.empty((n, n, 3), np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], np.float32)
    for o in scene.objects:
        cx, cy = CENTRES[o.position]
        r = 0.145
        if rng is not None:
            cx += rng.uniform(-0.04, 0.04)
            cy += rng.uniform(-0.04, 0.04)
            r = rng.uniform(0.13, 0.16)
        if o.shape == "circle":
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        elif o.shape == "square":
            h = r * 0.9
            m = (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
        elif o.shape == "triangle":  # upright isosceles, base 2r*1.1, height 2r*1.1
            h = r * 1.1
            top, bot = cy - h, cy + h
            frac = (yy - top) / (bot - top)  # 0 at apex, 1 at base
            m = (yy >= top) & (yy <= bot) & (np.abs(xx - cx) <= frac * h)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
        img[m] = np.asarray(COLOURS[o.colour], np.float32)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def example_scene() -> Scene:
    return Scene("white", (Obj("red", "circle", "left"), Obj("blue", "square", "right")))


def fixed_eval_scenes(n: int, held_out: bool, seed: int = 0) -> list[Scene]:
    """``n`` scenes for the evaluator, deterministic in ``(n, held_out, seed)``."""
    rng = np.random.default_rng([seed, int(held_out), 99])
    return [random_scene(rng, held_out=held_out) for _ in range(n)]
