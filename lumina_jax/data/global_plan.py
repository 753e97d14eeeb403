"""Crop-size buckets that every host agrees on: a bucket plan made from metadata alone.

Per-host bucketing (:class:`lumina_jax.data.batching.BatchIterDataset` over each host's own samples)
gives each host its own bucket sequence, so on several hosts one training step would see a 512x1024
batch on one host and a 1024x1024 batch on another: different programs, a hang in the first collective.
The global plan fixes that without any communication between hosts:

1. Every host builds the same *global* stream of record references ``(source, epoch, record)`` -- the
   whole epoch permutation of each source (not a host's slice), mixed by the same weights -- with each
   record's crop size and caption length read from the cache's size index
   (:meth:`lumina_jax.data.cache.LatentCacheSource.record_sizes`), not from the record. Raw-image
   sources work the same way from their image size index (:mod:`lumina_jax.data.image_index`: each
   image's pixel size, from which the crop size follows; captions are encoded after batching).
2. The same :class:`~lumina_jax.data.batching.BatchIterDataset` groups those references into global
   batches of ``global_batch`` rows of one crop size (padding rules unchanged; the window counts global
   samples, default 64 global batches). Only references wait in the window, never decoded samples.
3. Host ``h`` reads the records of rows ``[h * B, (h + 1) * B)`` of each global batch
   (:class:`HostRows`, in a thread pool; in-process, :class:`ReadAhead` keeps the reads of the next
   batch in flight while one is collated) and collates them; caption features are padded to one length
   for the whole run (``text_len``, or the longest caption in the size indexes), so every host builds
   the same shapes at every step.

The resulting global batches do not depend on the number of hosts (only on the seed, sources,
``global_batch`` and ``num_workers``). The iterator state is the plan's (a position in the metadata
stream, replayed from the oldest waiting reference on restore), so resuming is exact and cheap.

Rows that cannot be read at training time (a corrupt record) are kept as padding (``valid=False``,
copies of a readable row of the same batch) and counted as skips by the host that read them; records
whose size index row is ``[0, 0, 0]`` (unreadable when the index was built) never enter the plan and are
counted by shard 0 only, so the hosts' counters add up to the run's totals.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
from typing import Any, Optional, Sequence

import grain
import numpy as np

from lumina_jax.data import batching
from lumina_jax.data.crops import CropFitter
from lumina_jax.data.pipeline import NoUsableSampleError
from lumina_jax.data.transforms import LazyKey, is_skip, skip_marker

INDEX_COMMAND = "python -m lumina_jax preprocess --index --out {dir}"

logger = logging.getLogger(__name__)


class SizeRefLoader:
    """``(epoch, record) -> {"ref", "image_size", "cap_len"}`` from a source's size index (no record read).

    Latent caches: the index row is ``[H px, W px, caption length]``, the crop size itself; rows
    ``[0, 0, 0]`` (records unreadable when the index was built) give skip markers. Raw-image sources
    (:mod:`lumina_jax.data.image_index`): the row is ``[H px, W px, skip]`` of the original image, the
    crop size is its best fit in ``crop_sizes`` (the loader's choice, so the plan and the decoded sample
    agree), the caption length is 0 (captions are encoded after batching), and a row with ``skip`` > 0
    gives a skip marker with the reason the loader would have given.

    Holds the source, not its index: each process (grain workers too) maps the index itself, so it is
    never pickled or copied per process.
    """

    def __init__(self, source: Any, source_id: int, crop_sizes: Optional[Sequence[tuple[int, int]]] = None):
        self.source = source
        self.source_id = source_id
        self.source_name = source.name
        self.is_image = getattr(source, "kind", "image") == "image"
        if self.is_image and not crop_sizes:
            raise ValueError("a raw-image source's plan needs the stage's crop sizes")
        self.fit = CropFitter(crop_sizes) if self.is_image else None

    def _record_name(self, index: int) -> str:
        """The record's key or file (e.g. ``data.jsonl:12`` or its image path) where the source can say it
        (one read of the record: called only for the skipped records whose :class:`LazyKey` is shown, i.e.
        logged, or sent from a worker process), else ``source:index``."""
        try:
            raw = self.source.get(index)
            name = getattr(raw, "image_path", None) or getattr(raw, "key", None)
        except Exception:  # noqa: BLE001 -- a record the index marked unusable may not even parse
            name = None
        return f"{name} ({self.source_name}:{index})" if name else f"{self.source_name}:{index}"

    def _planned_skip_key(self, index: int) -> str:
        return f"{self._record_name(index)} (size index)"

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, index = int(item[0]), int(item[1])
        h, w, third = (int(v) for v in self.source.record_sizes()[index])
        ref = (self.source_id, epoch, index)
        if not self.is_image:
            if h <= 0 or w <= 0:
                return skip_marker("unreadable", self.source_name, f"{self.source_name}:{index} (size index row 0)")
            return {"ref": ref, "image_size": (h, w), "cap_len": third}
        if third > 0 or h <= 0 or w <= 0:
            from lumina_jax.data.image_index import reason_of

            key = LazyKey(functools.partial(self._planned_skip_key, index))  # no read unless it is logged
            return skip_marker(reason_of(third), self.source_name, key)
        cw, ch = self.fit(w, h)
        return {"ref": ref, "image_size": (ch, cw), "cap_len": 0}


def plan_collate(refs: Sequence[dict], n_valid: int) -> dict:
    """One global batch of the plan: the references ``(source, epoch, record, caption length)`` of its
    ``n_valid`` real rows and their crop size."""
    return {
        "plan_refs": [(*r["ref"], r["cap_len"]) for r in refs[:n_valid]],
        "image_size": tuple(refs[0]["image_size"]),
        "global_rows": len(refs),
    }


def _latent(source: Any) -> bool:
    return getattr(source, "kind", "image") == "latent"


def longest_caption(sources: Sequence[Any], caption_dropout: float) -> int:
    """The longest caption feature length in the size indexes (and the empty prompt's, if captions are dropped)."""
    longest = 1
    for s in filter(_latent, sources):  # raw-image captions are encoded after batching, at a fixed length
        sizes = s.record_sizes()
        if len(sizes):
            longest = max(longest, int(sizes[:, 2].max()))
        if caption_dropout > 0 and s.empty_prompt is not None:
            longest = max(longest, int(s.empty_prompt[0].shape[0]))
    return longest


def check_text_len(sources: Sequence[Any], text_len: Optional[int], caption_dropout: float, multiple: int) -> int:
    """The caption length every batch is padded to: ``text_len``, or the longest caption rounded up to
    ``multiple``. A ``text_len`` shorter than the longest caption is refused here, at start-up on every
    host, not at the step (different on each host) whose batch first holds a longer one."""
    longest = longest_caption(sources, caption_dropout)
    if text_len is None:
        return -(-longest // multiple) * multiple
    if text_len < longest:
        raise ValueError(f"text_len={text_len} is shorter than the longest caption in the latent caches' size "
                         f"indexes ({longest} tokens); set text_len >= {longest} (training config: "
                         f"stages.N.data.text_len) or leave it unset to pad to the longest")  # fmt: skip
    return text_len


def plan_digest(sources: Sequence[Any], rows: int = 4096) -> np.ndarray:
    """``uint32 (8,)``: a digest of what the plan is computed from -- each source's name, length and
    ``rows`` evenly spaced rows of its size index (not the whole index: 1.2 GB at 100M records). Hosts
    whose digests differ would plan different batches and hang in the first collective; comparing them
    at start-up (:func:`lumina_jax.train.data.build_stage_iterator`) turns that into an error."""
    import hashlib

    h = hashlib.sha256()
    for s in sources:
        sizes = s.record_sizes()
        h.update(f"{s.name}\t{len(sizes)}\n".encode())
        if len(sizes):
            picks = np.unique(np.linspace(0, len(sizes) - 1, min(rows, len(sizes))).astype(np.int64))
            h.update(np.ascontiguousarray(np.asarray(sizes)[picks], np.int32).tobytes())
    return np.frombuffer(h.digest(), np.uint32).copy()


def check_probe(source: Any, loader: Any, ref_loader: SizeRefLoader, count: int) -> None:
    """Compares the first ``count`` readable records of ``source`` with what their size index rows plan
    (``ref_loader``), so a stale index fails at start-up (every host reads the same records here) rather
    than mid-run on one host."""
    for index in range(min(count, len(source))):
        sample = loader((0, index))
        planned = ref_loader((0, index))
        if is_skip(sample):
            continue  # an unreadable record the index thinks usable only costs a padding row
        if is_skip(planned):  # a usable record the plan would leave out: silently never trained on
            raise ValueError(_stale(source, index, "readable", f"unusable ({planned['_skip']})"))
        check_sample(source, index, sample, tuple(planned["image_size"]), planned["cap_len"])


def check_sample(source: Any, index: int, sample: dict, planned: tuple[int, int], cap_len: int) -> None:
    """``ValueError`` (the index is stale) if a read sample's crop size, or a latent record's caption
    length, is not what the plan said."""
    got = tuple(int(v) for v in sample["image_size"])
    if not _latent(source):
        if got != planned:
            raise ValueError(_stale(source, index, got, planned))
        return
    got = (*got, int(np.shape(sample["cap_feats"])[0]))
    # A dropped caption carries the empty prompt's features, whose length the index does not list.
    if got[:2] != planned or (got[2] != cap_len and not sample.get("caption_dropped")):
        raise ValueError(_stale(source, index, got, (*planned, cap_len)))


def _stale(source: Any, index: int, got: Any, planned: Any) -> str:
    if not _latent(source):
        from lumina_jax.data.image_index import index_command

        what = f"crops to {got} px (H, W)" if isinstance(got, tuple) else f"is {got}"
        return (f"record {index} of {source.name!r} {what} but its size index says {planned}: the index is stale "
                f"(the data changed after it was indexed); rebuild it with "
                f"`{index_command(source)}`")  # fmt: skip
    cache_dir = source.cache_dir
    return (f"record {index} of latent cache {cache_dir} is {got} ([H px, W px, caption length]) but its size index "
            f"says {planned}: the index is stale (the cache changed after it was indexed). Delete "
            f"{cache_dir}/record_sizes.npy and {cache_dir}/*.sizes.npy, then rebuild the index with "
            f"`{INDEX_COMMAND.format(dir=cache_dir)}`")  # fmt: skip


TEMPLATE_SEARCH = 64  # records read to shape an all-padding batch when none of a batch's can be read


class HostRows:
    """A global plan batch -> this host's rows as a collated batch (a picklable grain map).

    Args:
      loaders: per source, ``(epoch, record) -> sample`` (:class:`lumina_jax.data.cache.LatentSampleLoader`
        or :class:`lumina_jax.data.transforms.ImageSampleLoader`).
      sources: the sources (named in errors).
      rows: ``(start, stop)`` rows of each global batch that this host feeds.
      collate: :class:`lumina_jax.data.batching.Collate` (bucket; latent records padded to a fixed
        ``text_len``).
      count_plan_skips: report the plan's own skip counts (records the size index marks unusable); True on
        one shard.
      read_threads: records read concurrently.
      max_consecutive_skips, option: unreadable rows in a row before :class:`NoUsableSampleError`.

    A record whose crop size (or caption length) is not what the plan said -- it changed after the index
    was built -- becomes a padding row counted as ``stale_index``, with a warning: raising would stop
    only the host that read it and leave the others waiting in a collective.
    """

    def __init__(
        self,
        loaders: Sequence[Any],
        sources: Sequence[Any],
        rows: tuple[int, int],
        collate: batching.Collate,
        *,
        count_plan_skips: bool,
        read_threads: int = 4,
        max_consecutive_skips: int = 1000,
        option: str = "max_consecutive_skips",
    ):
        self.loaders = list(loaders)
        self.sources = list(sources)
        self.start, self.stop = rows
        self.collate = collate
        self.count_plan_skips = count_plan_skips
        self.read_threads = max(1, read_threads)
        self.max_consecutive_skips = max_consecutive_skips
        self.option = option
        self._consecutive = 0
        self._warned_stale = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # threads do not pickle; each worker process starts its own
        return state

    def _load(self, ref: tuple[int, int, int, int]) -> dict:
        source_id, epoch, index, _ = ref
        return self.loaders[source_id]((epoch, index))

    def _wanted(self, plan: dict) -> tuple[list, list[bool]]:
        """This host's rows of a plan batch: references and whether each is a real row. Rows past the
        plan's real rows are padding: copies of the batch's rows, cycled (as per-host padding)."""
        refs = plan["plan_refs"]
        wanted = [refs[r % len(refs)] for r in range(self.start, self.stop)]
        return wanted, [r < len(refs) for r in range(self.start, self.stop)]

    def _submit_loads(self, refs: list[tuple[int, int, int, int]], background: bool) -> "_Loads":
        """Starts reading each distinct record once (padding rows repeat records of their batch): in the
        thread pool, or here when ``background`` is off and the reads are serial anyway (one thread or
        one record)."""
        distinct = list(dict.fromkeys(refs))
        if not background and (self.read_threads == 1 or len(distinct) <= 1):
            return _Loads(refs, distinct, [self._load(r) for r in distinct])
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads, thread_name_prefix="host_rows")
        return _Loads(refs, distinct, [self._pool.submit(self._load, r) for r in distinct])

    def _check_size(self, sample: dict, ref: tuple[int, int, int, int], planned: tuple[int, int]) -> None:
        source_id, _, index, cap_len = ref
        check_sample(self.sources[source_id], index, sample, planned, cap_len)

    def __call__(self, plan: dict) -> dict:
        return self.finish(self.submit(plan, background=False))

    def restart_skip_run(self) -> None:
        """Forget the unreadable rows in a row counted so far (an iterator moved to another position)."""
        self._consecutive = 0

    def submit(self, plan: dict, background: bool = True) -> tuple[dict, Optional["_Loads"]]:
        """Starts reading this host's rows of ``plan`` in the thread pool (``background``; else serial
        reads may run here, as the map over plan batches does); :meth:`finish` collates them."""
        if plan.get("_stats_only"):
            return plan, None
        return plan, self._submit_loads(self._wanted(plan)[0], background)

    def finish(self, pending: tuple[dict, Optional["_Loads"]]) -> dict:
        """The batch of a :meth:`submit` once its reads are done: skips counted, padding rows filled."""
        plan, loads = pending
        tally = batching.SkipTally()
        plan_skips = plan.get("_skips") if self.count_plan_skips else None
        dropped = 0
        if plan_skips:
            tally.add_tally(plan_skips)
            dropped = int(plan_skips.get("dropped_incomplete", 0))
        if plan.get("_stats_only"):
            return {"_stats_only": True, "_skips": dict(tally.take(), dropped_incomplete=dropped)}
        refs, planned = plan["plan_refs"], tuple(plan["image_size"])
        wanted, real = self._wanted(plan)
        loaded = loads.samples()
        samples: list[Optional[dict]] = []
        for ref, is_real, sample in zip(wanted, real, loaded):
            if is_skip(sample):
                if is_real:
                    tally.add_marker(sample)
                    self._consecutive += 1
                    if self._consecutive >= self.max_consecutive_skips:
                        raise NoUsableSampleError(
                            f"{self._consecutive} records in a row could not be read (last: {sample['key']}, "
                            f"{sample['_skip']}). Check the data, or raise the limit ({self.max_consecutive_skips}) "
                            f"with {self.option}."
                        )
                samples.append(None)
                continue
            try:
                self._check_size(sample, ref, planned)
            except ValueError as e:  # changed since indexed: raising here would stop this host only (a hang)
                if self._warned_stale < 3:
                    self._warned_stale += 1
                    logger.warning("%s; the record is left out (counted as stale_index)", e)
                if is_real:
                    tally.add_marker(skip_marker("stale_index", self.sources[ref[0]].name, str(sample.get("key"))))
                samples.append(None)
                continue
            if is_real:
                self._consecutive = 0
            samples.append(sample)
        valid = np.asarray([s is not None and r for s, r in zip(samples, real)], bool)
        filler = next((s for s in samples if s is not None), None)
        if filler is None:
            filler = self._any_readable(refs, planned)
        rows = [s if s is not None else filler for s in samples]
        batch = self.collate(rows, len(rows))
        batch["valid"] = valid
        batch["_skips"] = dict(tally.take(), dropped_incomplete=dropped)
        return batch

    def _any_readable(self, refs: list[tuple[int, int, int, int]], planned: tuple[int, int]) -> dict:
        """A readable record of the global batch (to fill a host whose own rows all failed); if the only
        readable ones changed size since indexing, a blank sample of the planned size (every row of the
        batch is then padding, on every host: they all see the same records)."""
        stale = None
        for ref in refs:
            sample = self._load(ref)
            if not is_skip(sample):
                try:
                    self._check_size(sample, ref, planned)
                except ValueError:
                    stale = stale or sample
                    continue
                return sample
        if stale is not None:
            return _blank(stale, planned)
        # Nothing of this batch reads (e.g. the only record of its crop size is corrupt: the size index
        # reads headers only): an all-padding batch shaped from another record, the same on every host.
        source_id, epoch = refs[0][0], refs[0][1]
        for index in range(min(len(self.sources[source_id]), TEMPLATE_SEARCH)):
            sample = self.loaders[source_id]((epoch, index))
            if not is_skip(sample):
                logger.warning("no record of a %d-row global batch of size %s could be read (e.g. %r record %d): "
                               "an all-padding batch", len(refs), planned, self.sources[source_id].name, refs[0][2])  # fmt: skip
                return _blank(sample, planned)
        raise NoUsableSampleError(
            f"no record of a {len(refs)}-row global batch of size {planned} could be read (e.g. "
            f"{self.sources[refs[0][0]].name!r} record {refs[0][2]}), nor any of the first {TEMPLATE_SEARCH} records "
            f"of that source; check the data"
        )


class _Loads:
    """The reads of one batch's rows: samples (serial reads) or futures (the pool's)."""

    def __init__(self, refs: list, distinct: list, loaded: list):
        self.refs, self.distinct, self.loaded = refs, distinct, loaded

    def samples(self) -> list[dict]:
        """One sample per ref, once every read is done."""
        done = [f.result() if isinstance(f, concurrent.futures.Future) else f for f in self.loaded]
        by_ref = dict(zip(self.distinct, done))
        return [by_ref[r] for r in self.refs]

    def cancel(self) -> None:
        """Drops the reads not started yet."""
        for f in self.loaded:
            if isinstance(f, concurrent.futures.Future):
                f.cancel()


class ReadAhead(grain.IterDataset):
    """Plan batches (``parent``) mapped by ``rows`` (:class:`HostRows`), with the reads of the next
    ``depth`` batches in flight while one is collated: in-process, the read pool would otherwise idle
    while the batch is collated and the plan advanced. No thread of its own (the reads run in the pool
    of ``rows``); the state is the plan's position before the oldest batch not yet returned, so a
    checkpoint neither skips nor repeats a batch. Worker processes (``num_workers`` > 0) overlap whole
    batches without it."""

    def __init__(self, parent: grain.IterDataset, rows: HostRows, depth: int = 1):
        super().__init__(parent)
        if depth < 1:
            raise ValueError(f"read-ahead depth must be >= 1, got {depth}")
        self._rows = rows
        self._depth = depth

    def __iter__(self) -> "_ReadAheadIterator":
        return _ReadAheadIterator(self._parent.__iter__(), self._rows, self._depth)


class _ReadAheadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, rows: HostRows, depth: int):
        super().__init__(parent)
        self._rows = rows
        self._depth = depth
        self._pending: collections.deque = collections.deque()  # (plan state before the batch, submitted)
        self._exhausted = False
        self._error: Optional[BaseException] = None  # raised by the plan ahead of the pending batches

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._depth:
            state = self._parent.get_state()  # a fresh dict (the plan's BatchIterator builds it), kept as is
            try:
                plan = next(self._parent)
            except StopIteration:
                self._exhausted = True
                return
            except Exception as e:  # noqa: BLE001 -- raised in order, after the batches before it
                self._exhausted, self._error = True, e
                return
            self._pending.append((state, self._rows.submit(plan)))

    def __next__(self) -> dict:
        self._fill()
        if not self._pending:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopIteration
        _, submitted = self._pending.popleft()
        self._fill()  # the next batches' reads start before this one is collated
        return self._rows.finish(submitted)

    def get_state(self) -> dict:
        return self._pending[0][0] if self._pending else self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._drop_pending()
        self._parent.set_state(state)
        self._rows.restart_skip_run()  # as after a restart: the run of skips counts from this position
        self._exhausted, self._error = False, None

    def _drop_pending(self) -> None:
        for _, (_, loads) in self._pending:
            if loads is not None:
                loads.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._drop_pending()
        super().close()

    def __str__(self) -> str:
        return f"ReadAhead(depth={self._depth})"


def _blank(sample: dict, size: tuple[int, int]) -> dict:
    """``sample`` with zero pixels (or latents) of crop size ``size`` ``(H, W)`` px: a padding row."""
    out = dict(sample, image_size=tuple(size))
    if "image" in sample:
        out["image"] = np.zeros((size[0], size[1], np.shape(sample["image"])[-1]), np.asarray(sample["image"]).dtype)
    if "latent" in sample:
        lat = np.asarray(sample["latent"])
        scale = int(sample["image_size"][0]) // lat.shape[0]  # pixels per latent row (the VAE's factor)
        out["latent"] = np.zeros((size[0] // scale, size[1] // scale, lat.shape[-1]), lat.dtype)
    return out
