"""Batching of variable-size samples: crop-size buckets (default) or token-budget packing ("mixed").

``bucket`` (default): a batch holds samples of one crop size, so ``images`` is a dense
``(B, H, W, 3)`` array that the VAE and the DiT take without masks or wasted compute. Samples wait in
a bounded window: a sample is emitted at most ``window`` pulls (upstream elements) after it was read;
if its bucket has not filled by then, the bucket is emitted padded to ``B`` rows (copies of its samples, ``valid=False``).
Cost: each distinct crop size is a distinct array shape (one compilation per shape under ``jit``).

``mixed``: samples are batched in arrival order whatever their size; each sample is patchified into
tokens (16x16x3 pixels, or 2x2x16 latent values) and padded to the stage's token budget
``(resolution/16)**2`` -- the most any crop size has -- with ``token_mask`` and per-sample
``image_sizes``. This is what the original does (a list of differently sized images per batch,
spec §2.12). One shape for the whole stage, at the price of padding tokens (the crop sizes hug the
area budget: at most 3.5 % padding at 1024 px, 12.5 % at 256 px) and of unpacking each sample
(:func:`unpatchify`) before the VAE, which needs 2-D images.

Why ``bucket`` is the default: raw images must go through the VAE encoder, which takes dense 2-D
batches, and a homogeneous batch needs no masks anywhere downstream. ``mixed`` suits a latent cache
feeding a masked DiT on TPU, where one compiled shape matters more than a few percent of padding.

Both are one :class:`BatchIterDataset`: a bucketed batcher whose bucket key is the sample size, or one
single bucket. Its iterator state is resumable without storing samples: it records the upstream state
before the oldest buffered sample plus which later arrivals were already emitted, and replays from
there on restore (at most ``window`` samples are re-read).

Every batch also carries ``_skips`` (skip counters and a few example keys since the previous batch of
this iterator) for :class:`lumina_jax.data.pipeline.DataIterator`, which strips it. At the end of a
finite stream, skips that followed the last sample travel in a batch with ``_stats_only=True``.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable, Hashable, Optional, Sequence

import grain
import numpy as np

from lumina_jax.data.transforms import LazyKey, is_skip

MAX_SKIP_EXAMPLES = 8


def patchify(x: np.ndarray, patch: int) -> np.ndarray:
    """``(H, W, C) -> (H/p * W/p, p*p*C)``, row-major over patches, each patch flattened as (p, p, C)."""
    h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"size {h}x{w} is not a multiple of the patch {patch}")
    x = x.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: np.ndarray, size: tuple[int, int], patch: int, channels: int) -> np.ndarray:
    """Inverse of :func:`patchify` for the first ``(H/p)*(W/p)`` rows of ``tokens``."""
    h, w = size
    gh, gw = h // patch, w // patch
    x = np.asarray(tokens[: gh * gw]).reshape(gh, gw, patch, patch, channels)
    return x.transpose(0, 2, 1, 3, 4).reshape(h, w, channels)


class SkipTally:
    """Skip counters between two emitted batches (plain dicts so they pickle and JSON-encode)."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.examples: list[list[str]] = []

    def add_marker(self, marker: dict) -> None:
        k = f"{marker['source']}\t{marker['_skip']}"
        self.counts[k] = self.counts.get(k, 0) + 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            key = marker["key"]  # a LazyKey stays lazy until it is logged (or pickled)
            self.examples.append([marker["source"], marker["_skip"], key if isinstance(key, LazyKey) else str(key)])

    def add_tally(self, tally: dict) -> None:
        for k, v in tally["counts"].items():
            self.counts[k] = self.counts.get(k, 0) + v
        room = MAX_SKIP_EXAMPLES - len(self.examples)
        self.examples.extend(tally["examples"][: max(room, 0)])

    def take(self) -> dict:
        out = {"counts": self.counts, "examples": self.examples}
        self.counts, self.examples = {}, []
        return out

    def __bool__(self) -> bool:
        return bool(self.counts)


def _stats_only(tally: dict) -> dict:
    return {"_stats_only": True, "_skips": tally}


class BatchIterDataset(grain.IterDataset):
    """Groups samples into batches of ``batch_size`` (see the module docstring).

    Args:
      parent: samples (dicts) and skip markers (:func:`lumina_jax.data.transforms.skip_marker`).
      batch_size: rows per batch.
      collate: ``(samples, n_valid) -> batch dict``; ``samples`` has ``batch_size`` entries, the last
        ``batch_size - n_valid`` of which are padding copies.
      key_fn: bucket key of a sample; ``None`` = one bucket (mixed mode, no reordering).
      window: max pulls (upstream elements) a sample may wait before its bucket is flushed
        (``>= batch_size``).
      drop_incomplete: drop incomplete buckets (counted) instead of padding them.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        collate: Callable[[Sequence[dict], int], dict],
        key_fn: Optional[Callable[[dict], Hashable]] = None,
        window: Optional[int] = None,
        drop_incomplete: bool = False,
    ):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        window = window if window is not None else 16 * batch_size
        if window < batch_size:
            raise ValueError(f"window ({window}) must be >= batch_size ({batch_size})")
        self._batch_size = batch_size
        self._collate = collate
        self._key_fn = key_fn
        self._window = window
        self._drop_incomplete = drop_incomplete

    def __iter__(self):
        return _BatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            self._collate,
            self._key_fn,
            self._window,
            self._drop_incomplete,
        )

    def __str__(self) -> str:
        mode = "mixed" if self._key_fn is None else f"bucket(window={self._window})"
        return f"BatchIterDataset(batch_size={self._batch_size}, {mode})"


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size, collate, key_fn, window, drop_incomplete):
        super().__init__(parent)
        self._batch_size = batch_size
        self._collate = collate
        self._key_fn = key_fn
        self._window = window
        self._drop_incomplete = drop_incomplete
        self._reset()

    def _reset(self) -> None:
        # key -> list of (arrival, sample); dict order = bucket creation order.
        self._buckets: dict[Hashable, list[tuple[int, dict]]] = {}
        self._arrival = 0  # elements pulled from the parent so far
        # arrival -> parent state just before that element was pulled, for buffered arrivals only.
        self._snapshots: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._emitted: set[int] = set()  # arrivals >= anchor that have been emitted
        self._tally = SkipTally()
        self._exhausted = False
        self._ready: collections.deque = collections.deque()  # batches waiting to be returned

    # -- buffer helpers -------------------------------------------------------------------------
    def _oldest_arrival(self) -> Optional[int]:
        return min((b[0][0] for b in self._buckets.values()), default=None)

    def _prune(self) -> None:
        anchor = self._oldest_arrival()
        if anchor is None:
            self._snapshots.clear()
            self._emitted.clear()
            return
        while self._snapshots and next(iter(self._snapshots)) < anchor:
            self._snapshots.popitem(last=False)
        self._emitted = {a for a in self._emitted if a >= anchor}

    def _emit_bucket(self, key: Hashable) -> None:
        entries = self._buckets.pop(key)
        self._emitted.update(a for a, _ in entries)
        samples = [s for _, s in entries]
        n_valid = len(samples)
        tally = self._tally.take()
        if n_valid < self._batch_size and self._drop_incomplete:
            tally["dropped_incomplete"] = n_valid
            self._ready.append(_stats_only(tally))
        else:
            padded = samples + [samples[i % n_valid] for i in range(self._batch_size - n_valid)]
            batch = self._collate(padded, n_valid)
            batch["_skips"] = tally
            self._ready.append(batch)
        self._prune()

    def _pull_one(self, replay_skip: Optional[set] = None) -> bool:
        """Pulls one parent element into the buffer. Returns False at the end of the parent."""
        arrival = self._arrival
        state_before = self._parent.get_state()
        try:
            element = next(self._parent)
        except StopIteration:
            return False
        self._arrival += 1
        if replay_skip is not None:  # restoring: skips were reported, samples in `replay_skip` emitted
            if is_skip(element) or element.get("_stats_only") or arrival in replay_skip:
                return True
            element.pop("_skips_before", None)
        elif is_skip(element):
            self._tally.add_marker(element)
            return True
        elif element.get("_stats_only"):
            self._tally.add_tally(element["_skips"])
            return True
        if "_skips_before" in element:  # skips a source absorbed before this sample
            tally = element.pop("_skips_before")
            if replay_skip is None:
                self._tally.add_tally(tally)
        key = None if self._key_fn is None else self._key_fn(element)
        self._buckets.setdefault(key, []).append((arrival, element))
        self._snapshots[arrival] = state_before
        return True

    def _fill(self) -> None:
        """Pulls until one batch is ready; at the end of the parent, flushes one bucket per call."""
        while not self._ready:
            if self._exhausted:
                if self._buckets:
                    self._emit_bucket(min(self._buckets, key=lambda k: self._buckets[k][0][0]))
                elif self._tally:
                    self._ready.append(_stats_only(self._tally.take()))
                return
            if not self._pull_one():
                self._exhausted = True
                continue
            for key, entries in self._buckets.items():
                if len(entries) >= self._batch_size:
                    self._emit_bucket(key)
                    break
            else:
                oldest = self._oldest_arrival()
                if oldest is not None and self._arrival - oldest >= self._window:
                    self._emit_bucket(min(self._buckets, key=lambda k: self._buckets[k][0][0]))

    def __next__(self) -> dict:
        self._fill()
        if not self._ready:
            raise StopIteration
        return self._ready.popleft()

    # -- state -----------------------------------------------------------------------------------
    def get_state(self) -> dict:
        assert not self._ready, "batches are returned as soon as they are made"
        anchor = self._oldest_arrival()
        if anchor is None:
            return {"parent": self._parent.get_state(), "arrival": self._arrival, "anchor": self._arrival,
                    "emitted": [], "exhausted": self._exhausted}
        return {
            "parent": copy.deepcopy(self._snapshots[anchor]),
            "arrival": self._arrival,
            "anchor": anchor,
            "emitted": sorted(a - anchor for a in self._emitted if a >= anchor),
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict) -> None:
        self._reset()
        self._parent.set_state(state["parent"])
        anchor, arrival = int(state["anchor"]), int(state["arrival"])
        self._arrival = anchor
        emitted = {anchor + int(o) for o in state["emitted"]}
        while self._arrival < arrival:
            if not self._pull_one(replay_skip=emitted):
                raise RuntimeError(
                    f"cannot restore batching state: upstream ended after {self._arrival} of "
                    f"{arrival} elements (was the pipeline or its data changed?)"
                )
        self._emitted = {a for a in emitted if a < arrival}
        self._prune()
        self._exhausted = bool(state["exhausted"])

    def __str__(self) -> str:
        return "BatchIterator"


# ---------------------------------------------------------------------------------------------------
# Collation

IMAGE_PATCH = 16  # pixels per image token side (VAE 8x * DiT patch 2)
LATENT_PATCH = 2  # latent values per image token side


class Collate:
    """Stacks samples into a batch dict.

    Every batch has ``prompts`` (list of str), ``image_sizes`` (B, 2) int32 ``(H, W)`` in pixels,
    ``valid`` (B,) bool (False for padding rows), ``caption_dropped`` (B,) bool, ``source`` (B,) int32
    (mixture component), ``ids`` (list of ``"<source>:<index>"``) and ``keys`` (list of the records'
    own identifiers, e.g. image paths). Then, by ``kind`` and ``mode``:

    * image/bucket: ``images`` (B, H, W, 3)
    * image/mixed:  ``images`` (B, T, 16*16*3) patch tokens + ``token_mask`` (B, T) bool
    * latent/bucket: ``latents`` (B, H/8, W/8, C)
    * latent/mixed:  ``latents`` (B, T, 2*2*C) + ``token_mask`` (B, T) bool
    * latent (both): ``cap_feats`` (B, L, D) and ``cap_mask`` (B, L) bool, right-padded to ``text_len``
      or, if None, to the longest in the batch rounded up to ``text_pad_multiple`` (the original pads
      to a multiple of 8).

    ``T`` is ``token_budget`` = (resolution/16)**2; mixed-mode tokens are row-major over the
    ``(H/16, W/16)`` grid, so :func:`unpatchify` with ``image_sizes[i]`` recovers sample ``i``.
    """

    def __init__(
        self,
        kind: str,
        mode: str,
        token_budget: int,
        text_len: Optional[int] = None,
        text_pad_multiple: int = 8,
    ):
        if kind not in ("image", "latent"):
            raise ValueError(f"kind must be 'image' or 'latent', got {kind!r}")
        if mode not in ("bucket", "mixed"):
            raise ValueError(f"mode must be 'bucket' or 'mixed', got {mode!r}")
        self.kind, self.mode = kind, mode
        self.token_budget = token_budget
        self.text_len = text_len
        self.text_pad_multiple = text_pad_multiple

    def __call__(self, samples: Sequence[dict], n_valid: int) -> dict:
        b = len(samples)
        batch: dict[str, Any] = {
            "prompts": [s["prompt"] for s in samples],
            "image_sizes": np.asarray([s["image_size"] for s in samples], np.int32).reshape(b, 2),
            "valid": np.arange(b) < n_valid,
            "caption_dropped": np.asarray([s["caption_dropped"] for s in samples], bool),
            "source": np.asarray([s["source"] for s in samples], np.int32),
            "ids": [s["id"] for s in samples],
            "keys": [s["key"] for s in samples],
        }
        field, patch = ("images", IMAGE_PATCH) if self.kind == "image" else ("latents", LATENT_PATCH)
        arrays = [s["image" if self.kind == "image" else "latent"] for s in samples]
        if self.mode == "bucket":
            batch[field] = np.stack(arrays)
        else:
            first = arrays[0]
            dim = patch * patch * first.shape[-1]
            out = np.zeros((b, self.token_budget, dim), first.dtype)
            mask = np.zeros((b, self.token_budget), bool)
            for i, a in enumerate(arrays):
                tokens = patchify(a, patch)
                if tokens.shape[0] > self.token_budget:
                    raise ValueError(
                        f"sample {samples[i]['id']} has {tokens.shape[0]} tokens, more than the "
                        f"budget {self.token_budget}"
                    )
                out[i, : tokens.shape[0]] = tokens
                mask[i, : tokens.shape[0]] = True
            batch[field] = out
            batch["token_mask"] = mask
        if self.kind == "latent":
            batch["cap_feats"], batch["cap_mask"] = self._pad_text(samples)
        return batch

    def _pad_text(self, samples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        lengths = [s["cap_feats"].shape[0] for s in samples]
        if self.text_len is not None:
            length = self.text_len
            if max(lengths) > length:
                raise ValueError(f"text features of length {max(lengths)} exceed text_len={length}")
        else:
            m = self.text_pad_multiple
            length = max(1, -(-max(lengths) // m) * m)
        feats0 = samples[0]["cap_feats"]
        feats = np.zeros((len(samples), length, feats0.shape[-1]), feats0.dtype)
        mask = np.zeros((len(samples), length), bool)
        for i, s in enumerate(samples):
            n = s["cap_feats"].shape[0]
            feats[i, :n] = s["cap_feats"]
            mask[i, :n] = np.asarray(s["cap_mask"], bool)
        return feats, mask


def size_key(sample: dict) -> tuple[int, int]:
    """Bucket key: the sample's (H, W)."""
    return tuple(sample["image_size"])
