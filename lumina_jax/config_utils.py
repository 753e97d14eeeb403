"""Shared behaviour of the frozen config dataclasses: strict dicts and bundled YAML files."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import yaml

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
T = TypeVar("T", bound="YamlConfig")


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's numbers: ``1e-4`` is a float (1.1: a string), ``0100`` is 100
    (1.1: octal 64), ``1:00`` a string (1.1: sexagesimal 60); ``0x1F``/``0o17``/``0b101`` and digit
    separators (``10_000``) as in 1.1. Booleans keep 1.1's spellings (``yes``/``no``/``on``/``off``)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(  # before the float resolver: "12" is an int
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0o[0-7_]+|[0-9][0-9_]*)$"), list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if digits[:2] in ("0x", "0o", "0b"):
        return sign * int(digits, 0)
    return sign * int(digits, 10)  # "0100" -> 100, not octal


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str) -> Any:
    """A config document (YAML with 1.2's numbers, see :class:`_ConfigLoader`); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_ConfigLoader)


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
            d = load_yaml(p.read_text()) or {}
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
