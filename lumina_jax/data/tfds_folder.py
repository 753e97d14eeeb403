"""A TFDS builder for a folder of captioned images, prepared and read without TensorFlow.

Checked with tensorflow-datasets 4.9.10 and no TensorFlow installed: ``download_and_prepare`` with
``file_format="array_record"`` works as long as no feature has to be *encoded* by TensorFlow; a
``tfds.features.Image`` fed with the file's encoded bytes is stored as-is (no decode, no re-encode),
and ``tfds.data_source`` reads it back (decoding with ``SkipDecoding`` gives the bytes). Feeding
numpy pixel arrays would need ``tf.image.encode_png`` and fails without TensorFlow, so this builder
never decodes: a corrupt file is stored unchanged and skipped (and counted) by the pipeline.

Folder layout: image files (``.jpg .jpeg .png .webp .gif .bmp``, searched recursively) with captions
either in ``metadata.jsonl`` (lines ``{"file_name": <relative path>, "text"|"caption"|"prompt": ...}``)
or in a sidecar ``<stem>.txt`` next to each image. Images without a caption get ``""`` (skipped at
read time as ``empty_caption``).

    builder_dir = prepare_captioned_image_folder("/data/my_images", data_dir="/data/tfds")
    source = TfdsSource(builder_dir=builder_dir)          # lumina_jax.data.sources
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator, Optional

from etils import epath
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_CAPTION_KEYS = ("text", "caption", "prompt")


def _read_captions(folder: Path) -> dict[str, str]:
    meta = folder / "metadata.jsonl"
    captions: dict[str, str] = {}
    if meta.exists():
        try:
            lines = meta.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not JSON
        except UnicodeDecodeError as e:
            raise ValueError(f"{meta}: not UTF-8 text ({e}); save it as UTF-8") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(item, dict) or "file_name" not in item:
                raise ValueError(f"{meta}:{lineno}: expected an object with 'file_name', got {line.strip()[:80]!r}")
            text = next((item[k] for k in _CAPTION_KEYS if k in item), "")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{meta}:{lineno}: the caption is a {type(text).__name__}, not a string")
            captions[Path(item["file_name"]).as_posix()] = text or ""
    return captions


def _read_sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: caption file is not UTF-8 text ({e}); save it as UTF-8") from None


def iter_captioned_images(folder: str | os.PathLike) -> Iterator[tuple[str, str, Path]]:
    """``(relative_path, caption, absolute_path)`` of every image under ``folder``, sorted by path."""
    folder = Path(folder)
    captions = _read_captions(folder)
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = sorted(set(captions) - {p.relative_to(folder).as_posix() for p in images})
    if missing:  # a caption whose image is not there (renamed, deleted, another extension) would vanish unseen
        warnings.warn(f"{folder / 'metadata.jsonl'}: {len(missing)} caption(s) name images that are not in the "
                      f"folder ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they are not used",
                      stacklevel=2)  # fmt: skip
    for path in images:
        rel = path.relative_to(folder).as_posix()
        caption = captions.get(rel)
        if caption is None:
            sidecar = path.with_suffix(".txt")
            caption = _read_sidecar(sidecar) if sidecar.exists() else ""
        yield rel, caption, path


class CaptionedImageFolder(tfds.core.GeneratorBasedBuilder):
    """``captioned_image_folder``: features ``image`` (encoded, stored as-is), ``caption``, ``key``.

    Construct with ``CaptionedImageFolder(folder=..., data_dir=..., file_format="array_record")``;
    everything lands in the ``train`` split. Use one ``data_dir`` per folder.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    # TFDS 4.9.10 finds a package builder's source file through the `importlib_resources` backport,
    # which it only declares as a dependency for Python < 3.9 (ModuleNotFoundError on 3.11).
    # The path is only used to look for a checksums file next to the code; give it directly.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def __init__(self, *, folder: Optional[str | os.PathLike] = None, **kwargs):
        self._folder = Path(folder) if folder is not None else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned images from a local folder (lumina_jax).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._folder is None or not self._folder.is_dir():
            raise ValueError(f"CaptionedImageFolder needs folder=<existing dir>, got {self._folder}")
        return {"train": self._generate_examples(self._folder)}

    def _generate_examples(self, folder: Path):
        for rel, caption, path in iter_captioned_images(folder):
            yield rel, {"image": path.read_bytes(), "caption": caption, "key": rel}


def prepare_captioned_image_folder(
    folder: str | os.PathLike, data_dir: str | os.PathLike
) -> str:
    """Prepares ``folder`` as an ``array_record`` TFDS dataset in ``data_dir``; returns its
    builder directory (for :class:`lumina_jax.data.sources.TfdsSource` ``builder_dir``)."""
    builder = CaptionedImageFolder(folder=folder, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
