"""Shared behaviour of the frozen config dataclasses: strict dicts and bundled YAML files."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import yaml

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
T = TypeVar("T", bound="YamlConfig")


class YamlConfig:
    """Mixin for frozen dataclasses: ``from_dict`` rejects unknown keys by name; ``from_yaml`` takes a
    bundled config name (``configs/model/<name>.yaml``) or a path. Subclasses set ``_what`` (for
    messages) and ``_prefix`` (the file-name prefix of their bundled configs)."""

    _what: ClassVar[str] = "model"
    _prefix: ClassVar[str] = ""

    def replace(self: T, **kw: Any) -> T:
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls._what} config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls: type[T], name_or_path: str | Path) -> T:
        p = Path(name_or_path)
        if not p.suffix:
            p = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            names = sorted(q.stem for q in MODEL_CONFIG_DIR.glob(f"{cls._prefix}*.yaml"))
            raise FileNotFoundError(f"no {cls._what} config {name_or_path!r}; bundled configs: {names}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from None
        d.pop("command", None)  # configs may carry the command that uses them
        return cls.from_dict(d)


def int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {value}")
        return value

    parse.__name__ = f"integer >= {lowest}"
    return parse
