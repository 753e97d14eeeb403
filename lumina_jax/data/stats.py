"""Counters of a data iterator: delivered samples, skipped records by source and reason, padding.

The counters travel inside the batch stream (``_skips`` fields, see :mod:`lumina_jax.data.batching`),
so they are exact with worker processes too, and they are part of the iterator state, so a restored
iterator continues counting where the saved one stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

logger = logging.getLogger("lumina_jax.data")


@dataclasses.dataclass
class DataStats:
    """Counters since the start of iteration (restored with the iterator state).

    Attributes:
      batches: batches delivered.
      samples: valid (non-padding) rows delivered.
      padded_rows: padding rows delivered (copies marked ``valid=False``).
      dropped_incomplete: samples dropped with incomplete buckets (``drop_incomplete=True``).
      captions_dropped: valid rows whose prompt was dropped to ``""``.
      captions_truncated: captions cut to the text encoder's token limit where they were encoded
        (raw-image training: :class:`lumina_jax.train.data.FrozenEncoders` counts them here).
      skipped: ``{source: {reason: count}}`` of records that were skipped.
      logged_examples: skipped records already logged (the first ``log_first_n`` are).
    """

    batches: int = 0
    samples: int = 0
    padded_rows: int = 0
    dropped_incomplete: int = 0
    captions_dropped: int = 0
    captions_truncated: int = 0
    skipped: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    logged_examples: int = 0
    log_first_n: int = 10

    def total_skipped(self, source: Optional[str] = None, reason: Optional[str] = None) -> int:
        total = 0
        for src, reasons in self.skipped.items():
            if source is not None and src != source:
                continue
            for r, n in reasons.items():
                if reason is None or r == reason:
                    total += n
        return total

    def add_skips(self, tally: dict) -> None:
        for key, n in tally.get("counts", {}).items():
            source, reason = key.split("\t", 1)
            per = self.skipped.setdefault(source, {})
            per[reason] = per.get(reason, 0) + int(n)
        for source, reason, key in tally.get("examples", []):
            if self.logged_examples >= self.log_first_n:
                break
            self.logged_examples += 1
            logger.warning("skipped a sample of source %r (%s): %s", source, reason, key)
        self.dropped_incomplete += int(tally.get("dropped_incomplete", 0))

    def merge(self, other: "DataStats") -> None:
        """Adds ``other``'s counters to these (e.g. the counters of several processes' saved states)."""
        for name in ("batches", "samples", "padded_rows", "dropped_incomplete", "captions_dropped", "captions_truncated",
                     "logged_examples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for source, reasons in other.skipped.items():
            per = self.skipped.setdefault(source, {})
            for reason, n in reasons.items():
                per[reason] = per.get(reason, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataStats":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def summary(self) -> str:
        parts = [f"{self.samples} samples in {self.batches} batches"]
        if self.padded_rows:
            parts.append(f"{self.padded_rows} padding rows")
        if self.dropped_incomplete:
            parts.append(f"{self.dropped_incomplete} dropped in incomplete buckets")
        if self.captions_truncated:
            parts.append(f"{self.captions_truncated} captions truncated")
        for src, reasons in sorted(self.skipped.items()):
            detail = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
            parts.append(f"skipped in {src}: {detail}")
        return "; ".join(parts)
