"""Random-access sources of (image, caption, system prompt) items.

Every source has a ``name`` (used in errors and skip counters), ``kind = "image"``, ``__len__`` and
``get(index) -> RawItem``. ``get`` may raise: :class:`SkipSample` (with a reason) for a record that is
bad by construction, ``FileNotFoundError`` for a missing image file, any other exception for an
unreadable record. The pipeline turns those into counted skips; it never lets them stop training.

Sources here:

* :class:`JsonlSource` -- the original repo's format: one JSON object per line (``.jsonl``), or one JSON
  array of such objects (a ``.json`` file, as the original loader reads it), with the image path and
  caption; ``{"image_path", "super_high_quality_caption"}`` gets the ``"align"`` system prompt and
  ``{"path" or "image_path", "prompt"}`` gets ``"base"`` (Template A), as in the original
  ``finetune.py`` (spec §6.5). Relative image paths are resolved against ``root`` or the file's folder.
  :func:`load_yaml_sources` reads the original ``META:`` YAML list of JSONL/JSON files with ``ratio``.
* :class:`ArrayRecordImageSource` -- our own ArrayRecord shards, written by :func:`write_image_records`.
  Record schema (``LJR1`` container, see :mod:`lumina_jax.data.records`)::

      image:          bytes  -- the encoded file (PNG, JPEG, WebP, ...), stored as-is
      caption:        str    -- the caption without system prompt ("" = unusable)
      system_prompt:  str    -- optional; template name or text (text_templates.resolve_system_prompt;
                                default: the source's)
      key:            str    -- optional; stable identifier used in logs (default "<name>:<index>")
      schema:         str    -- "lumina_image_record/v1"

* :class:`TfdsSource` -- any TFDS dataset prepared in ``array_record`` format, read through
  ``tfds.data_source`` (no TensorFlow needed to read); see :mod:`lumina_jax.data.tfds_folder` for a
  builder that prepares a captioned image folder without TensorFlow.
* :class:`ListSource` -- items held in memory (tests, benchmarks, small eval sets).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from lumina_jax.data import records as rec_lib
from lumina_jax.text_templates import DEFAULT_SYSTEM_PROMPT, resolve_system_prompt, system_prompt_problem

logger = logging.getLogger(__name__)

IMAGE_RECORD_SCHEMA = "lumina_image_record/v1"
IMAGE_SHARD_PREFIX = "images"


class SkipSample(Exception):
    """A record that must be skipped; ``reason`` becomes the skip counter's name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class RawItem:
    """One undecoded training item.

    Exactly one of ``image`` (encoded bytes, or an already decoded ``uint8`` array ``(H, W[, C])``) and
    ``image_path`` is normally set; if ``image`` is None the file at ``image_path`` is read.
    """

    key: str
    caption: Optional[str]
    system_prompt: str
    image: Union[bytes, np.ndarray, None] = None
    image_path: Optional[str] = None


def _as_str(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return value if isinstance(value, str) else str(value)


class ListSource:
    """In-memory items: dicts with ``image`` (bytes/array) or ``image_path``, ``caption`` and
    optionally ``system_prompt`` and ``key``."""

    kind = "image"

    def __init__(self, items: Sequence[Mapping[str, Any]], name: str = "list", system_prompt: str = "base"):
        self.name = name
        self.system_prompt = system_prompt
        resolve_system_prompt(system_prompt)  # a misspelt template name fails here, not at the first batch
        self._items = list(items)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> RawItem:
        item = self._items[index]
        return RawItem(
            key=str(item.get("key", f"{self.name}:{index}")),
            caption=_as_str(item.get("caption")),
            system_prompt=item.get("system_prompt", self.system_prompt),
            image=item.get("image"),
            image_path=item.get("image_path"),
        )


# ---------------------------------------------------------------------------------------------------
# Original JSONL / YAML format


def parse_original_item(item: Mapping[str, Any]) -> tuple[str, Optional[str], str]:
    """``(image_path, caption, system_prompt_name)`` of one line of the original format.

    Follows ``T2IItemProcessor.process_item`` of the original ``finetune.py``: a
    ``super_high_quality_caption`` selects the ``"align"`` template (image under ``image_path``);
    otherwise a ``prompt`` selects ``"base"`` (image under ``image_path`` or ``path``). A line's own
    ``system_prompt`` (a template name such as ``"empty"``, or text; our extension) replaces that choice.
    Raises :class:`SkipSample` ("bad_record") for anything else.
    """
    if not isinstance(item, Mapping):
        raise SkipSample("bad_record", f"the record is not a JSON object (got {type(item).__name__})")
    if "super_high_quality_caption" in item:
        path = item.get("image_path", item.get("path"))
        caption, system = item["super_high_quality_caption"], "align"
    elif "prompt" in item:
        path = item.get("image_path", item.get("path"))
        caption, system = item["prompt"], "base"
    else:
        raise SkipSample("bad_record", f"no caption key in {sorted(item)}")
    if item.get("system_prompt") is not None:  # (null: as if absent)
        problem = system_prompt_problem(item["system_prompt"])
        if problem is not None:
            raise SkipSample("bad_record", problem)
        system = item["system_prompt"]
    if not isinstance(path, str) or not path:
        raise SkipSample("bad_record", f"no image path in {sorted(item)}")
    if caption is not None and not isinstance(caption, str):
        raise SkipSample("bad_record", f"caption is a {type(caption).__name__}")
    if caption is not None and _SURROGATE.search(caption):  # e.g. a JSON "\ud83d" escape without its pair
        raise SkipSample("bad_record", "caption is not valid Unicode (a lone surrogate)")
    return path, caption, system


_SURROGATE = re.compile("[\ud800-\udfff]")


class _BadEntry:
    """A line or array element that is not a record (invalid JSON, not UTF-8); ``message`` says why."""

    def __init__(self, message: str):
        self.message = message


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """``("<path>:<line>", value or _BadEntry)`` for each non-blank line of a JSON-lines file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _BadEntry(
                    f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                )
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _BadEntry(f"invalid JSON ({e.msg})")


def _json_array(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """``("<path>:<line> (element <i>)", value or _BadEntry)`` for each element of a JSON array file.

    Elements are decoded one at a time, so each is named by the line it starts on. An element that holds
    bytes that are not UTF-8 becomes a :class:`_BadEntry`; a file that is not one well-formed JSON array
    raises ``ValueError`` naming the line and column (its elements cannot be told apart).
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        text, all_utf8 = data.decode("utf-8"), True
    except UnicodeDecodeError:  # keep the bad bytes as lone surrogates; their elements are skipped
        text, all_utf8 = data.decode("utf-8", errors="surrogateescape"), False
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> ValueError:
        lineno = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return ValueError(
            f"{path}:{lineno}:{column}: {what}; a .json file must hold one JSON array of records (or one "
            f"JSON object per line)"
        )

    pos = _JSON_WHITESPACE.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise fail(pos, "expected '[' (the start of a JSON array)")
    pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    lineno, counted_to = 1, 0
    index = 0
    if text[pos : pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, f"invalid JSON ({e.msg})") from None
            lineno += text.count("\n", counted_to, pos)
            counted_to = pos
            where = f"{path}:{lineno} (element {index})"
            if not all_utf8 and not _is_utf8(text[pos:end]):
                yield where, _BadEntry("not valid UTF-8")
            else:
                yield where, value
            index += 1
            pos = _JSON_WHITESPACE.match(text, end).end()
            sep = text[pos : pos + 1]
            if sep == "]":
                pos += 1
                break
            if sep != ",":
                raise fail(pos, "invalid JSON array (expected ',' or ']' after an element)")
            pos = _JSON_WHITESPACE.match(text, pos + 1).end()
    pos = _JSON_WHITESPACE.match(text, pos).end()
    if pos != len(text):
        raise fail(pos, "extra data after the JSON array")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte kept by "surrogateescape"
        return False
    return True


def _starts_with_array(path: Path) -> bool:
    """Whether the file's first non-blank character (after a UTF-8 BOM) is ``[``."""
    with open(path, "rb") as f:
        chunk = f.read(1 << 16)
        if chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
        while chunk:
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped[:1] == b"["
            chunk = f.read(1 << 16)
    return False


def _read_original_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """The records of an original-format file as ``(location, value)``, in file order.

    A ``.json`` file whose content is a JSON array gives one value per element (as the original loader's
    ``json.load``); any other file (``.jsonl``, or a ``.json`` holding one object per line) is read as JSON
    lines, blank lines ignored. ``location`` is ``"<path>:<line>"`` (plus ``" (element <i>)"`` for arrays).
    A line or element that is not valid UTF-8 or not valid JSON gives a ``_BadEntry`` value instead of
    stopping the file. Raises ``ValueError`` (naming line and column) for a ``.json`` array that is not
    well-formed, since its elements cannot be separated then.
    """
    path = Path(path)
    if path.suffix.lower() == ".json" and _starts_with_array(path):
        return _json_array(path, path.read_bytes())
    return _json_lines(path)


def image_index_suffix() -> str:
    from lumina_jax.data.image_index import IMAGE_SIZES_SUFFIX

    return IMAGE_SIZES_SUFFIX


class SizeIndexed:
    """Mixin of image sources that can have a size index (:mod:`lumina_jax.data.image_index`).

    Subclasses define ``size_index_spec() -> (file, records, index -> RawItem)`` (or ``None``) and
    ``index_data_path`` (the ``--data`` value that rebuilds it); :meth:`_index_rows` maps the file's
    rows to the source's records (identity unless overridden).
    """

    _record_sizes: Optional[np.ndarray] = None
    index_dir: Optional[str] = None  # where the index lives when not next to the data (image_index.set_index_dir)

    def size_index_spec(self) -> Optional[tuple[str, int, Any]]:
        """``(index file, records, index -> RawItem)``; ``None`` (this default): no index possible."""
        return None

    def _index_rows(self, sizes: np.ndarray) -> np.ndarray:
        return sizes

    def record_sizes(self) -> Optional[np.ndarray]:
        """``int32 (len(self), 3)``: ``[H px, W px, skip]`` of each record (memory-mapped when the rows
        are the file's), or ``None`` without an index. Loaded once; ``ValueError`` for a stale index."""
        if self._record_sizes is None:
            from lumina_jax.data.image_index import index_command, index_target, load_index

            target = index_target(self)
            if target is None:
                return None
            path, count, _ = target
            sizes = load_index(path, count, index_command(self))
            self._record_sizes = None if sizes is None else self._index_rows(sizes)
        return self._record_sizes

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_record_sizes", None)  # mapped again on demand, not shipped to every worker process
        return state


class JsonlSource(SizeIndexed):
    """Items of an original-format file: JSON lines, or a ``.json`` JSON array (see the module docstring).

    Lines or array elements that are not valid UTF-8 or valid JSON, or that lack the expected keys, are
    kept as placeholders that the pipeline skips and counts as ``bad_record`` (their skip log names
    ``<file>:<line>``); blank lines are ignored. A ``.json`` array that is not well-formed JSON as a whole
    is a ``ValueError`` naming the line and column.

    Args:
      path: the JSONL (or ``.json``) file.
      name: source name for logs/stats (default: the file stem).
      root: folder that relative image paths are relative to (default: the file's folder).
      ratio: subsample as the original ``META`` entry's ``ratio`` does (``random.seed(0)`` then
        ``random.sample(items, int(len * ratio))``: the same items are chosen). ``ratio > 1`` (not in
        the original) repeats the list ``floor(ratio)`` times plus such a sample of the fraction.
    """

    kind = "image"

    def __init__(
        self,
        path: str | os.PathLike,
        name: Optional[str] = None,
        root: Optional[str | os.PathLike] = None,
        ratio: Optional[float] = None,
    ):
        path = Path(path)
        self.name = name or path.stem
        self.path = str(path)
        self.root = None if root is None else str(root)  # None: the file's folder
        # What `preprocess --index --data` needs to rebuild this source's index (load_yaml_sources
        # names the YAML instead: the entry's `root` changes what the file's paths point to).
        self.index_data_path = self.path
        root = Path(root) if root is not None else path.parent
        entries: list[tuple] = []
        bad: list[str] = []
        for where, value in _read_original_records(path):
            try:
                if isinstance(value, _BadEntry):
                    raise SkipSample("bad_record", value.message)
                img, caption, system = parse_original_item(value)
            except SkipSample as e:
                bad.append(f"{where}: {e.detail}")
                entries.append((None, bad[-1], None))
                continue
            full = img if os.path.isabs(img) else os.path.join(root, img)
            entries.append((full, caption, system))
        if bad:
            logger.warning(
                "%s: %d of %d records are unusable and will be skipped as bad_record (first: %s)",
                path, len(bad), len(entries), "; ".join(bad[:3]),
            )
        self._file_records = len(entries)
        self._rows: Optional[np.ndarray] = None  # the file rows ``ratio`` picked (None: every row, in order)
        if ratio is not None:
            rows = _subsample(list(range(len(entries))), ratio)
            entries = [entries[r] for r in rows]
            self._rows = np.asarray(rows, np.int64)
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, index: int) -> RawItem:
        path, caption, system = self._entries[index]
        if path is None:
            raise SkipSample("bad_record", caption)
        return RawItem(key=path, caption=caption, system_prompt=system, image_path=path)

    def size_index_spec(self) -> tuple[str, int, Any]:
        """``(index file, records, row -> RawItem)`` over the file's rows (before ``ratio``):
        ``<file>.image_sizes.npy``, or ``<file>.root-<hash>.image_sizes.npy`` for an explicit ``root``
        (the same file under another root names other images)."""
        tag = ""
        if self.root is not None and os.path.abspath(self.root) != os.path.abspath(os.path.dirname(self.path)):
            tag = ".root-" + hashlib.sha1(os.fsencode(os.path.abspath(self.root))).hexdigest()[:10]
        return self.path + tag + image_index_suffix(), self._file_records, self._read_file_row

    def _read_file_row(self, row: int) -> RawItem:
        """Row ``row`` of the file, picked by ``ratio`` or not (one index serves every ratio)."""
        if self._rows is None:
            return self.get(row)
        if getattr(self, "_whole_file", None) is None:  # parsed again once, only to build an index
            self._whole_file = JsonlSource(self.path, root=self.root)
        return self._whole_file.get(row)

    def _index_rows(self, sizes: np.ndarray) -> np.ndarray:
        return sizes if self._rows is None else sizes[self._rows]


def _subsample(entries: list, ratio: float) -> list:
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    whole, frac = int(math.floor(ratio)), ratio - math.floor(ratio)
    out = entries * whole
    if frac > 0:
        rng = random.Random(0)  # the original seeds the global RNG with 0 right before sampling
        out += rng.sample(entries, int(len(entries) * frac))
    return out


def load_yaml_sources(path: str | os.PathLike) -> list[JsonlSource]:
    """JSONL / JSON sources listed in an original-style YAML file.

    Format (relative ``path``/``root`` values are relative to the YAML file)::

        META:
          - path: data/part1.jsonl
            ratio: 0.5          # optional, see JsonlSource
            root: /images       # optional
          - path: data/part2.json   # one JSON array of records

    A top-level list (without ``META``) is accepted as well. Source names are the file stems (or an
    entry's ``name``); stems that repeat get ``#<position>`` appended. The original concatenates all
    files into one dataset; combine the returned sources with :class:`ConcatSource` for that, or give
    them mixture weights.
    """
    import yaml

    path = Path(path)
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    metas = config.get("META") if isinstance(config, Mapping) else config
    if not isinstance(metas, list) or not metas:
        raise ValueError(f"{path}: expected a non-empty 'META' list of JSONL entries")
    sources, named = [], []
    for i, meta in enumerate(metas):
        if isinstance(meta, str):
            meta = {"path": meta}
        if not isinstance(meta, Mapping) or "path" not in meta:
            raise ValueError(f"{path}: META[{i}] needs a 'path'")
        unknown = set(meta) - {"path", "ratio", "root", "type", "name"}
        if unknown:
            raise ValueError(f"{path}: META[{i}] has unknown keys {sorted(unknown)}")
        jsonl = Path(meta["path"])
        jsonl = jsonl if jsonl.is_absolute() else path.parent / jsonl
        root = meta.get("root")
        if root is not None and not os.path.isabs(root):
            root = path.parent / root
        source = JsonlSource(jsonl, name=meta.get("name"), root=root, ratio=meta.get("ratio"))
        source.index_data_path = str(path)  # indexing the YAML indexes each entry with its own root
        sources.append(source)
        named.append("name" in meta)
    # Names key the skip counters and must be unique; files with the same stem get "#<position>".
    return unique_names(sources, keep=named)


def unique_names(sources: list, keep: Optional[Sequence[bool]] = None) -> list:
    """``sources`` with repeated names made unique in place, ``"<name>#<position>"`` (names key the skip
    counters and data states): two ``data.jsonl`` files in different folders, two ``cache_256`` caches.
    Sources whose ``keep[i]`` is true (a name given explicitly) keep theirs."""
    names = [s.name for s in sources]
    for i, src in enumerate(sources):
        if names.count(src.name) > 1 and not (keep is not None and keep[i]):
            src.name = f"{src.name}#{i}"
    return sources


class ConcatSource(SizeIndexed):
    """Several image sources as one (the original concatenates all JSONL files of a YAML)."""

    kind = "image"

    def __init__(self, sources: Sequence[Any], name: str = "concat"):
        if not sources:
            raise ValueError("ConcatSource needs at least one source")
        self.name = name
        self._sources = list(sources)
        self._offsets = np.cumsum([0] + [len(s) for s in self._sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def get(self, index: int) -> RawItem:
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self._sources[s].get(index - int(self._offsets[s]))

    @property
    def index_data_path(self) -> Optional[str]:
        """The ``--data`` values that rebuild the parts' indexes (``None`` if a part cannot have one);
        each part has its own index (see :func:`lumina_jax.data.image_index.index_image_source`)."""
        paths = [getattr(s, "index_data_path", None) for s in self._sources]
        return None if None in paths else " --data ".join(dict.fromkeys(paths))

    def record_sizes(self) -> Optional[np.ndarray]:
        """The parts' size indexes concatenated (once), ``None`` unless every part has one."""
        if self._record_sizes is None:
            parts = []
            for s in self._sources:
                get = getattr(s, "record_sizes", None)
                sizes = get() if callable(get) else None
                if sizes is None:
                    return None
                parts.append(sizes)
            self._record_sizes = np.concatenate(parts)
        return self._record_sizes


# ---------------------------------------------------------------------------------------------------
# ArrayRecord shards of our own schema


def write_image_records(
    items: Iterable[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    prefix: str = IMAGE_SHARD_PREFIX,
) -> list[Path]:
    """Writes image/caption items as ArrayRecord shards (schema in the module docstring).

    Each item needs ``caption`` and either ``image`` (encoded bytes) or ``image_path`` (the file's bytes
    are stored unchanged -- nothing is decoded, so a corrupt file stays corrupt and is skipped at read
    time). ``system_prompt`` and ``key`` are optional. Resumable like
    :func:`lumina_jax.data.records.write_sharded`.
    """

    def encode(item: Mapping[str, Any]) -> bytes:
        data = item.get("image")
        if data is None:
            p = item.get("image_path")
            if p is None:
                raise ValueError("item needs 'image' bytes or 'image_path'")
            with open(p, "rb") as f:
                data = f.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"'image' must be encoded bytes, got {type(data).__name__}")
        record: dict[str, Any] = {
            "schema": IMAGE_RECORD_SCHEMA,
            "image": bytes(data),
            "caption": item.get("caption") or "",
        }
        for k in ("system_prompt", "key"):
            if item.get(k) is not None:
                record[k] = item[k]
        if record.get("key") is None and item.get("image_path") is not None:
            record["key"] = str(item["image_path"])
        return rec_lib.encode_record(record)

    return rec_lib.write_sharded(items, out_dir, shard_size, prefix, encode=encode)


class ArrayRecordImageSource(SizeIndexed):
    """Reads shards written by :func:`write_image_records`.

    Args:
      paths: a folder (all ``<prefix>-NNNNN.array_record`` shards in it) or a list of shard files.
      system_prompt: template for records without their own ``system_prompt`` (default ``"real"``, as
        the training config's ``data.system_prompt`` and sampling).
    """

    kind = "image"

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        name: Optional[str] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        prefix: str = IMAGE_SHARD_PREFIX,
    ):
        self.index_data_path: Optional[str] = None  # a folder's shards have a size index; a list of files not
        if isinstance(paths, (str, os.PathLike)):
            folder = Path(paths)
            shard_paths = rec_lib.list_shards(folder, prefix) if folder.is_dir() else [folder]
            name = name or folder.name
            if folder.is_dir():
                self.index_data_path = str(folder)
        else:
            shard_paths = [Path(p) for p in paths]
            name = name or (shard_paths[0].parent.name if shard_paths else "array_record")
        if not shard_paths:
            raise FileNotFoundError(f"no '{prefix}-*.array_record' shards in {paths}")
        self.name = name
        self.system_prompt = system_prompt
        resolve_system_prompt(system_prompt)  # a misspelt template name fails here, not at the first batch
        self._reader = rec_lib.ShardedRecordReader(shard_paths)

    def __len__(self) -> int:
        return len(self._reader)

    def size_index_spec(self) -> Optional[tuple[str, int, Any]]:
        """``(index file, records, index -> RawItem)``; ``None`` for shards given as a list of files."""
        if self.index_data_path is None:
            return None
        return os.path.join(self.index_data_path, "image_sizes.npy"), len(self), self.get

    def get(self, index: int) -> RawItem:
        try:
            record = rec_lib.decode_record(self._reader[index])
        except rec_lib.RecordFormatError as e:
            raise SkipSample("bad_record", str(e)) from e
        if "image" not in record:
            raise SkipSample("bad_record", "record has no 'image'")
        return RawItem(
            key=str(record.get("key", f"{self.name}:{index}")),
            caption=_as_str(record.get("caption")),
            system_prompt=record.get("system_prompt", self.system_prompt),
            image=record["image"],
        )


# ---------------------------------------------------------------------------------------------------
# TFDS


class TfdsSource(SizeIndexed):
    """A TFDS dataset prepared with ``file_format="array_record"``, read with ``tfds.data_source``.

    The image feature is read undecoded (``tfds.decode.SkipDecoding``) when it is a
    ``tfds.features.Image``, so corrupt images reach our decoder and are skipped and counted instead
    of raising inside TFDS; a feature that already holds encoded bytes or a ``uint8`` array works too.
    Reading needs no TensorFlow.

    Args:
      name: registered dataset name (``"name"`` or ``"name/config:version"``); ignored if
        ``builder_dir`` is given.
      builder_dir: a prepared dataset folder (``.../name/version``), read without the builder class.
      image_key, caption_key, key_key: feature names; ``key_key`` (optional) gives a stable identifier.
    """

    kind = "image"

    def __init__(
        self,
        name: Optional[str] = None,
        split: str = "train",
        data_dir: Optional[str | os.PathLike] = None,
        builder_dir: Optional[str | os.PathLike] = None,
        image_key: str = "image",
        caption_key: str = "caption",
        key_key: Optional[str] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        source_name: Optional[str] = None,
    ):
        import tensorflow_datasets as tfds

        if builder_dir is not None:
            builder = tfds.builder_from_directory(str(builder_dir))
        elif name is not None:
            builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        else:
            raise ValueError("TfdsSource needs a dataset name or builder_dir")
        features = builder.info.features
        for k in (image_key, caption_key) + ((key_key,) if key_key else ()):
            if k not in features:
                raise KeyError(f"TFDS dataset {builder.name!r} has no feature {k!r} (has {list(features)})")
        decoders = None
        if isinstance(features[image_key], tfds.features.Image):
            decoders = {image_key: tfds.decode.SkipDecoding()}
        self._source = builder.as_data_source(split=split, decoders=decoders)
        self.name = source_name or f"{builder.name}/{split}"
        self.system_prompt = system_prompt
        resolve_system_prompt(system_prompt)  # a misspelt template name fails here, not at the first batch
        self._image_key, self._caption_key, self._key_key = image_key, caption_key, key_key
        self.split = split
        self.index_data_path = str(builder.data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def size_index_spec(self) -> tuple[str, int, Any]:
        """``(index file, records, index -> RawItem)``: ``<dataset dir>/<split>.image_sizes.npy``."""
        from lumina_jax.data.image_index import split_file_name

        path = os.path.join(self.index_data_path, split_file_name(self.split) + image_index_suffix())
        return path, len(self), self.get

    def get(self, index: int) -> RawItem:
        ex = self._source[index]
        image = ex[self._image_key]
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        if isinstance(image, np.bytes_):
            image = bytes(image)
        key = _as_str(ex[self._key_key]) if self._key_key else f"{self.name}:{index}"
        return RawItem(
            key=key,
            caption=_as_str(ex[self._caption_key]),
            system_prompt=self.system_prompt,
            image=image,
        )
