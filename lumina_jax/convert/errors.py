"""The one error type conversion code raises for bad checkpoints, with the offending key names."""

from __future__ import annotations

from typing import Iterable, Mapping


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of an unknown layout, or its keys/shapes do not match."""


def _fmt(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    what: str,
    *,
    ignore: Iterable[str] = (),
) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and mis-shaped key."""
    ignore = set(ignore)
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected) - ignore
    misshaped = [
        f"{k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k]) != tuple(found[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    if problems:
        raise CheckpointError(f"{what}: " + " | ".join(problems))
