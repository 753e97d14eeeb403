"""Crop-size buckets that every host agrees on: a bucket plan made from metadata alone.

Per-host bucketing (:class:`lumina_jax.data.batching.BatchIterDataset` over each host's own samples)
gives each host its own bucket sequence, so on several hosts one training step would see a 512x1024
batch on one host and a 1024x1024 batch on another: different programs, a hang in the first collective.
The global plan fixes that without any communication between hosts:

1. Every host builds the same *global* stream of record references ``(source, epoch, record)`` -- the
   whole epoch permutation of each source (not a host's slice), mixed by the same weights -- with each
   record's crop size and caption length read from the cache's size index
   (:meth:`lumina_jax.data.cache.LatentCacheSource.record_sizes`), not from the record.
2. The same :class:`~lumina_jax.data.batching.BatchIterDataset` groups those references into global
   batches of ``global_batch`` rows of one crop size (padding rules unchanged; the window counts global
   samples, default 64 global batches). Only references wait in the window, never decoded samples.
3. Host ``h`` reads the records of rows ``[h * B, (h + 1) * B)`` of each global batch
   (:class:`HostRows`, in a thread pool) and collates them; caption features are padded to one length
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

import concurrent.futures
from typing import Any, Optional, Sequence

import numpy as np

from lumina_jax.data import batching
from lumina_jax.data.pipeline import NoUsableSampleError
from lumina_jax.data.transforms import is_skip, skip_marker

INDEX_COMMAND = "python -m lumina_jax preprocess --index --out {dir}"


class SizeRefLoader:
    """``(epoch, record) -> {"ref", "image_size", "cap_len"}`` from a source's size index (no record read).

    Holds the source, not its index: each process (grain workers too) maps ``record_sizes.npy`` itself,
    so the index is never pickled or copied per process. Index rows ``[0, 0, 0]`` (records that were
    unreadable when the index was built) give skip markers.
    """

    def __init__(self, source: Any, source_id: int):
        self.source = source
        self.source_id = source_id
        self.source_name = source.name

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, index = int(item[0]), int(item[1])
        h, w, length = (int(v) for v in self.source.record_sizes()[index])
        if h <= 0 or w <= 0:
            return skip_marker("unreadable", self.source_name, f"{self.source_name}:{index} (size index row 0)")
        return {"ref": (self.source_id, epoch, index), "image_size": (h, w), "cap_len": length}


def plan_collate(refs: Sequence[dict], n_valid: int) -> dict:
    """One global batch of the plan: the references ``(source, epoch, record, caption length)`` of its
    ``n_valid`` real rows and their crop size."""
    return {
        "plan_refs": [(*r["ref"], r["cap_len"]) for r in refs[:n_valid]],
        "image_size": tuple(refs[0]["image_size"]),
        "global_rows": len(refs),
    }


def longest_caption(sources: Sequence[Any], caption_dropout: float) -> int:
    """The longest caption feature length in the size indexes (and the empty prompt's, if captions are dropped)."""
    longest = 1
    for s in sources:
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


def check_probe(source: Any, loader: Any, count: int) -> None:
    """Compares the first ``count`` readable records of ``source`` with their size index rows, so a stale
    index fails at start-up (every host reads the same records here) rather than mid-run on one host."""
    sizes = source.record_sizes()
    for index in range(min(count, len(source))):
        sample = loader((0, index))
        if is_skip(sample):
            continue
        row = tuple(int(v) for v in sizes[index])
        got = (*(int(v) for v in sample["image_size"]), int(np.shape(sample["cap_feats"])[0]))
        if row != got and not (sample.get("caption_dropped") and row[:2] == got[:2]):
            raise ValueError(_stale(source.cache_dir, index, got, row))


def _stale(cache_dir: str, index: int, got: tuple, planned: tuple) -> str:
    return (f"record {index} of latent cache {cache_dir} is {got} ([H px, W px, caption length]) but its size index "
            f"says {planned}: the index is stale (the cache changed after it was indexed). Delete "
            f"{cache_dir}/record_sizes.npy and {cache_dir}/*.sizes.npy, then rebuild the index with "
            f"`{INDEX_COMMAND.format(dir=cache_dir)}`")  # fmt: skip


class HostRows:
    """A global plan batch -> this host's rows as a collated batch (a picklable grain map).

    Args:
      loaders: per source, ``(epoch, record) -> sample`` (:class:`lumina_jax.data.cache.LatentSampleLoader`).
      cache_dirs: per source, its directory (named in errors).
      rows: ``(start, stop)`` rows of each global batch that this host feeds.
      collate: :class:`lumina_jax.data.batching.Collate` (latent, bucket, fixed ``text_len``).
      count_plan_skips: report the plan's own skip counts (index rows ``[0, 0, 0]``); True on one shard.
      read_threads: records read concurrently.
      max_consecutive_skips, option: unreadable rows in a row before :class:`NoUsableSampleError`.
    """

    def __init__(
        self,
        loaders: Sequence[Any],
        cache_dirs: Sequence[str],
        rows: tuple[int, int],
        collate: batching.Collate,
        *,
        count_plan_skips: bool,
        read_threads: int = 4,
        max_consecutive_skips: int = 1000,
        option: str = "max_consecutive_skips",
    ):
        self.loaders = list(loaders)
        self.cache_dirs = list(cache_dirs)
        self.start, self.stop = rows
        self.collate = collate
        self.count_plan_skips = count_plan_skips
        self.read_threads = max(1, read_threads)
        self.max_consecutive_skips = max_consecutive_skips
        self.option = option
        self._consecutive = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # threads do not pickle; each worker process starts its own
        return state

    def _load(self, ref: tuple[int, int, int, int]) -> dict:
        source_id, epoch, index, _ = ref
        return self.loaders[source_id]((epoch, index))

    def _load_all(self, refs: list[tuple[int, int, int, int]]) -> list[dict]:
        if self.read_threads == 1 or len(refs) <= 1:
            return [self._load(r) for r in refs]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads, thread_name_prefix="host_rows")
        return list(self._pool.map(self._load, refs))

    def _check_size(self, sample: dict, ref: tuple[int, int, int, int], planned: tuple[int, int]) -> None:
        source_id, _, index, cap_len = ref
        got = (*(int(v) for v in sample["image_size"]), int(np.shape(sample["cap_feats"])[0]))
        # A dropped caption carries the empty prompt's features, whose length the index does not list.
        if got[:2] != planned or (got[2] != cap_len and not sample.get("caption_dropped")):
            raise ValueError(_stale(self.cache_dirs[source_id], index, got, (*planned, cap_len)))

    def __call__(self, plan: dict) -> dict:
        tally = batching.SkipTally()
        plan_skips = plan.get("_skips") if self.count_plan_skips else None
        dropped = 0
        if plan_skips:
            tally.add_tally(plan_skips)
            dropped = int(plan_skips.get("dropped_incomplete", 0))
        if plan.get("_stats_only"):
            return {"_stats_only": True, "_skips": dict(tally.take(), dropped_incomplete=dropped)}
        refs = plan["plan_refs"]
        n_valid, planned = len(refs), tuple(plan["image_size"])
        # Rows past the plan's real rows are padding: copies of the batch's rows, cycled (as per-host padding).
        wanted = [refs[r % n_valid] for r in range(self.start, self.stop)]
        real = [r < n_valid for r in range(self.start, self.stop)]
        loaded = self._load_all(wanted)
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
            self._check_size(sample, ref, planned)
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
        """A readable record of the global batch (to fill a host whose own rows all failed)."""
        for ref in refs:
            sample = self._load(ref)
            if not is_skip(sample):
                self._check_size(sample, ref, planned)
                return sample
        raise NoUsableSampleError(
            f"no record of a {len(refs)}-row global batch of size {planned} could be read (e.g. "
            f"{self.cache_dirs[refs[0][0]]} record {refs[0][2]}); check the latent caches"
        )
