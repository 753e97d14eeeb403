"""Synthetic captioned-image sets for tests and benchmarks (small, generated on the fly).

:func:`make_test_dataset` writes a folder of images in the original JSONL format, including the bad
cases the pipeline must survive (missing file, truncated PNG, bytes that are not an image, empty and
blank captions), odd aspect ratios (beyond 4:1 too), RGBA, greyscale and palette images, and returns a
manifest saying, by construction, which items must be skipped and why.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random picture (upscaled noise) in ``mode`` (RGB, RGBA, L, P, LA)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    rgba = Image.fromarray(small, "RGBA").resize((width, height), Image.BICUBIC)
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    rgb = rgba.convert("RGB")
    if mode == "RGB":
        return rgb
    if mode == "L":
        return rgb.convert("L")
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE, colors=32)
    raise ValueError(f"unsupported mode {mode}")


def encode_image(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@dataclasses.dataclass
class SyntheticItem:
    """One generated item. ``expected_skip`` is the reason the pipeline must report, or None."""

    file: str
    caption: str
    width: int = 0
    height: int = 0
    mode: str = "RGB"
    fmt: str = "PNG"
    key_style: str = "path+prompt"  # or "image_path+super_high_quality_caption"
    expected_skip: Optional[str] = None
    defect: Optional[str] = None  # how the file is broken: missing, truncated, garbage, zero_bytes

    @property
    def system_prompt(self) -> str:
        return "align" if self.key_style.endswith("super_high_quality_caption") else "base"


def default_test_items(n_good: int = 24, seed: int = 0) -> list[SyntheticItem]:
    """``n_good`` usable items of varied sizes/modes plus 6 bad ones, in a fixed shuffled order."""
    rng = np.random.default_rng(seed)
    shapes = [(40, 30), (30, 40), (32, 32), (64, 16), (16, 64), (97, 23), (23, 97), (50, 28), (28, 50)]
    modes = ["RGB", "RGB", "RGBA", "L", "P", "LA"]
    items = []
    for i in range(n_good):
        w, h = shapes[i % len(shapes)]
        mode = modes[i % len(modes)]
        fmt = "JPEG" if mode in ("RGB", "L") and i % 3 == 0 else "PNG"
        style = "path+prompt" if i % 2 == 0 else "image_path+super_high_quality_caption"
        items.append(
            SyntheticItem(f"img_{i:03d}.{fmt.lower()}", f"caption number {i}", w, h, mode, fmt, style)
        )
    bad = [
        SyntheticItem("missing.png", "a missing file", 32, 32, expected_skip="missing", defect="missing"),
        SyntheticItem("truncated.png", "a truncated png", 48, 48, expected_skip="undecodable",
                      defect="truncated"),
        SyntheticItem("garbage.jpg", "not an image", expected_skip="undecodable", defect="garbage"),
        SyntheticItem("empty_caption.png", "", 32, 32, expected_skip="empty_caption"),
        SyntheticItem("blank_caption.png", "   ", 32, 32, expected_skip="empty_caption",
                      key_style="image_path+super_high_quality_caption"),
        SyntheticItem("zero_bytes.png", "an empty file", expected_skip="undecodable",
                      defect="zero_bytes"),
    ]
    all_items = items + bad
    order = rng.permutation(len(all_items))
    return [all_items[i] for i in order]


def write_item_file(folder: Path, item: SyntheticItem, seed: int) -> None:
    path = folder / item.file
    if item.defect == "missing":
        return
    if item.defect == "garbage":
        path.write_bytes(b"this is definitely not a JPEG file" * 10)
    elif item.defect == "zero_bytes":
        path.write_bytes(b"")
    else:
        data = encode_image(make_image(item.width, item.height, item.mode, seed), item.fmt)
        if item.defect == "truncated":
            data = data[: len(data) // 2]
        elif item.defect is not None:
            raise ValueError(f"unknown defect {item.defect!r}")
        path.write_bytes(data)


def make_test_dataset(
    root: str | os.PathLike, items: Optional[Sequence[SyntheticItem]] = None, seed: int = 0
) -> tuple[Path, list[SyntheticItem]]:
    """Writes ``items`` (default :func:`default_test_items`) under ``root/images`` and a JSONL in
    the original format at ``root/data.jsonl`` with paths relative to it. Returns (jsonl, items)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = list(items) if items is not None else default_test_items(seed=seed)
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            write_item_file(root / "images", item, seed * 100_003 + i)
            rel = f"images/{item.file}"
            if item.key_style == "path+prompt":
                line = {"path": rel, "prompt": item.caption}
            else:
                line = {"image_path": rel, "super_high_quality_caption": item.caption}
            f.write(json.dumps(line) + "\n")
    return root / "data.jsonl", items


def write_bench_images(
    folder: str | os.PathLike, n: int, resolution: int, seed: int = 0, quality: int = 90
) -> Path:
    """``n`` JPEGs around ``resolution**2`` pixels with aspect ratios in [1/3, 3] and a JSONL listing
    them; returns the JSONL path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "data.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
            area = resolution * resolution * rng.uniform(1.0, 1.6)
            w = max(16, int(round((area * aspect) ** 0.5)))
            h = max(16, int(round((area / aspect) ** 0.5)))
            name = f"bench_{i:05d}.jpg"
            (folder / name).write_bytes(
                encode_image(make_image(w, h, "RGB", seed + i), "JPEG", quality=quality)
            )
            f.write(json.dumps({"path": name, "prompt": f"benchmark image {i}"}) + "\n")
    return folder / "data.jsonl"
