"""A minimal TensorBoard event-file writer (scalars and PNG images), with no TensorFlow dependency.

TensorBoard reads ``events.out.tfevents.*`` files: a TFRecord stream of serialised ``tensorflow.Event``
protos. Each record is ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``
(little endian; ``masked = rotr(crc, 15) + 0xa282ead8``). The few proto fields used here are encoded by
hand (field numbers from ``tensorflow/core/util/event.proto`` and ``summary.proto``):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; Image image = 4; }
    Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

Neither tensorboardX nor TensorFlow is a dependency of the project; :func:`read_events` decodes the
same subset (tests, and quick inspection without TensorBoard).
"""

from __future__ import annotations

import io
import socket
import struct
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np


def _make_table() -> list[int]:
    poly = 0x82F63B78  # CRC-32C (Castagnoli), reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _field_varint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _event(step: int, wall_time: float, summary: Optional[bytes] = None, file_version: Optional[str] = None) -> bytes:
    out = _varint((1 << 3) | 1) + struct.pack("<d", wall_time) + _field_varint(2, step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if summary is not None:
        out += _field_bytes(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    return _field_bytes(1, tag.encode()) + _varint((2 << 3) | 5) + struct.pack("<f", float(value))


def _image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
    img = _field_varint(1, height) + _field_varint(2, width) + _field_varint(3, channels) + _field_bytes(4, png)
    return _field_bytes(1, tag.encode()) + _field_bytes(4, img)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class EventWriter:
    """Append-only writer of one event file in ``logdir``."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = self.logdir / name
        self._f = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(int(step), time.time(), summary=_field_bytes(1, _scalar_value(tag, value))))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: (H, W, 3) uint8, or float in [0, 1]."""
        arr = np.asarray(image)
        png = encode_png(arr)
        h, w = arr.shape[:2]
        c = arr.shape[2] if arr.ndim == 3 else 1
        self._write(_event(int(step), time.time(), summary=_field_bytes(1, _image_value(tag, png, h, w, c))))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


# ----------------------------------------------------------------------------------------------
# reading (the subset written above)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(buf, i)
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            v, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, v


def read_records(path: str | Path) -> Iterator[bytes]:
    """TFRecord payloads of ``path``; raises on a CRC mismatch."""
    data = Path(path).read_bytes()
    i = 0
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8 : i + 12])
        if hcrc != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12 : i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        if dcrc != masked_crc(payload):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        yield payload
        i += 16 + n


def read_events(path: str | Path) -> list[dict]:
    """Decoded events: ``{"step", "wall_time", "file_version"?, "scalars": {tag: v}, "images": {tag: png}}``."""
    out = []
    for rec in read_records(path):
        ev: dict = {"scalars": {}, "images": {}}
        for field, _, v in _fields(rec):
            if field == 1:
                ev["wall_time"] = struct.unpack("<d", v)[0]
            elif field == 2:
                ev["step"] = v
            elif field == 3:
                ev["file_version"] = v.decode()
            elif field == 5:
                for f2, _, val in _fields(v):
                    if f2 != 1:
                        continue
                    tag, scalar, image = None, None, None
                    for f3, _, x in _fields(val):
                        if f3 == 1:
                            tag = x.decode()
                        elif f3 == 2:
                            scalar = struct.unpack("<f", x)[0]
                        elif f3 == 4:
                            image = dict((f4, y) for f4, _, y in _fields(x))
                    if scalar is not None:
                        ev["scalars"][tag] = scalar
                    if image is not None:
                        ev["images"][tag] = image.get(4)
        out.append(ev)
    return out
