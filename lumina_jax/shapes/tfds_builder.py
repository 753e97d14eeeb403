"""``shapes_world``: the synthetic shapes dataset as a TFDS builder (``array_record``, no TensorFlow).

Features: ``image`` (64x64 PNG, stored as encoded bytes like :mod:`lumina_jax.data.tfds_folder`),
``caption`` (one random phrasing), ``key``, ``scene`` (JSON of :class:`~lumina_jax.shapes.spec.Scene`),
``held_out`` (``"1"`` if the scene contains a held-out combination, else ``"0"``).

Splits: ``train`` (only seen combinations), ``test_seen`` and ``test_held_out`` (each ``num_test``).
Everything is a function of ``(seed, split, index)``, so two preparations give identical records.

    builder_dir = prepare(data_dir="/tmp/shapes_tfds", num_train=16000)
    TfdsSource(builder_dir=builder_dir, system_prompt="real")       # lumina_jax.data.sources
"""

from __future__ import annotations

import io
import json
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lumina_jax.shapes import spec


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def example(split: str, index: int, seed: int = 0, size: int = 64) -> tuple[spec.Scene, str, np.ndarray]:
    """``(scene, caption, image)`` of record ``index`` of ``split`` (deterministic)."""
    sid = {"train": 0, "test_seen": 1, "test_held_out": 2}[split]
    rng = np.random.default_rng([seed, sid, index])
    scene = spec.random_scene(rng, held_out=(split == "test_held_out"))
    return scene, spec.caption(scene, rng=rng), spec.render(scene, size, rng)


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes on plain backgrounds with captions (see :mod:`lumina_jax.shapes.spec`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # see lumina_jax.data.tfds_folder: avoids the importlib_resources lookup
        return epath.Path(__file__)

    def __init__(self, *, num_train: int = 16000, num_test: int = 200, seed: int = 0, size: int = 64, **kwargs):
        self._num_train, self._num_test, self._seed, self._size = num_train, num_test, seed, size
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic captioned shapes (lumina_jax.shapes): one or two coloured shapes at named "
            "positions on a plain background; some colour/shape/position triples held out of train.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),
                "scene": tfds.features.Text(),
                "held_out": tfds.features.Text(),
            }),  # fmt: skip
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples("train", self._num_train),
            "test_seen": self._generate_examples("test_seen", self._num_test),
            "test_held_out": self._generate_examples("test_held_out", self._num_test),
        }

    def _generate_examples(self, split: str, n: int):
        for i in range(n):
            scene, cap, img = example(split, i, self._seed, self._size)
            key = f"{split}/{i:07d}"
            yield key, {"image": png_bytes(img), "caption": cap, "key": key,
                        "scene": json.dumps(scene.to_dict()), "held_out": "1" if spec.is_held_out(scene) else "0"}  # fmt: skip


def prepared_split_sizes(builder_dir: str | os.PathLike) -> Optional[dict[str, int]]:
    """``{split: num_examples}`` of a prepared builder directory (from its ``dataset_info.json``), or
    ``None`` when nothing is prepared there."""
    info_path = epath.Path(builder_dir) / "dataset_info.json"
    if not info_path.exists():
        return None
    splits = json.loads(info_path.read_text()).get("splits", [])
    return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in splits}


def prepare(data_dir: str | os.PathLike, *, num_train: int = 16000, num_test: int = 200, seed: int = 0,
            size: int = 64, overwrite: bool = False) -> str:  # fmt: skip
    """Prepare the dataset as ``array_record`` under ``data_dir``; returns the builder directory.

    An existing preparation is reused when its split sizes are the requested ones; with other sizes a
    ``ValueError`` says so, unless ``overwrite`` (then it is deleted and prepared again)."""
    def builder() -> ShapesWorld:
        return ShapesWorld(num_train=num_train, num_test=num_test, seed=seed, size=size, data_dir=str(data_dir),
                           file_format="array_record")  # fmt: skip

    b = builder()
    have = prepared_split_sizes(b.data_dir)
    want = {"train": num_train, "test_seen": num_test, "test_held_out": num_test}
    if have is not None and have != want:
        if not overwrite:
            raise ValueError(f"{b.data_dir} already holds a dataset with split sizes {have}, not the requested "
                             f"{want} (--num-train {num_train}, --num-test {num_test}): pass another --work, "
                             "remove that folder, or pass --overwrite to prepare it again")
        epath.Path(b.data_dir).rmtree()
        b = builder()
    tfds.disable_progress_bar()
    b.download_and_prepare()
    return str(b.data_dir)


def load_scenes(builder_dir: str, split: str, limit: Optional[int] = None) -> list[tuple[spec.Scene, str]]:
    """``(scene, caption)`` of the records of ``split`` (reads with ``tfds.data_source``)."""
    src = tfds.builder_from_directory(builder_dir).as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    n = len(src) if limit is None else min(limit, len(src))
    out = []
    for i in range(n):
        ex = src[i]
        sc, cap = ex["scene"], ex["caption"]
        sc = sc.decode() if isinstance(sc, bytes) else str(sc)
        cap = cap.decode() if isinstance(cap, bytes) else str(cap)
        out.append((spec.Scene.from_dict(json.loads(sc)), cap))
    return out
