"""Batches of windows from a Parquet split, for every loop that trains or evaluates a model.

The driver scans a split once (:func:`scan`: files, windows per file, data spec); each worker
then reads its share itself with pyarrow (:class:`WindowBatches`), in a background thread, and
hands over tensors ready for its device. Pretraining, fine-tuning, Tune trials, evaluation and
the benchmarks all take their batches from here.

Why not Ray Data's ``get_dataset_shard``: every epoch starts a new streaming execution whose
first batch waits for seconds (13-24 s for 200-800 files on 2 cores), and epochs ran at 4-5% of
pyarrow's rate on the same files (``jobs/bench_ingest.py``). Reading in the worker costs one
file open per file, overlapped with training, and nothing per epoch.

Order, per epoch ``e`` (the same on every worker, so the shares never overlap):

- streamed: the files in a random order drawn from ``(seed, e)``, read as one sequence of
  windows; worker ``rank`` takes its contiguous share of that sequence and mixes it through a
  shuffle buffer of ``shuffle_buffer`` windows (a different draw every epoch);
- cached (a split of at most ``cache_mb`` MB in memory, float32: 10 kB per 2-channel window):
  read once into the worker's memory, then every epoch is a fresh permutation of all windows.

``train=True``: shuffled as above, and every worker gets the same number of windows, so DDP's
workers step together (fewer than ``world`` windows, a different few each epoch, are left out).
``train=False``: files and windows in order, every window exactly once across the workers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from biofm import storage
from biofm.errors import BiofmError, ConfigError

_END = object()


@dataclasses.dataclass(frozen=True)
class Split:
    """A split as the driver scanned it (sent to the workers), or a corpus of several
    (:func:`corpus`). ``spec``: the data spec with the selected channels; ``channel_index``: per
    file, each selected channel's row in the stored ``signal`` ``[C, T]``, -1 where that file's
    source lacks it (a row of zeros, as fine-tuning marks an absent channel); ``source``: per file,
    its index into ``sources`` (the batches' ``source`` column)."""

    files: tuple[str, ...]
    rows: tuple[int, ...]
    spec: dict
    channel_index: tuple[tuple[int, ...], ...]
    source: tuple[int, ...] = ()
    sources: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    @property
    def windows(self) -> int:
        return sum(self.rows)

    @property
    def weighted(self) -> bool:
        return any(w != 1 for w in self.weights)

    def epoch_windows(self) -> int:
        """Windows in a training epoch: each source's ``weight`` x its windows (rounded)."""
        if not self.weighted:
            return self.windows
        per = self.windows_per_source()
        return sum(int(w) * per[name] + round((w - int(w)) * per[name]) for name, w in zip(self.sources, self.weights))

    @property
    def memory_bytes(self) -> int:
        """The signals of the selected channels in memory, float32."""
        return self.windows * len(self.spec["channels"]) * self.spec["window_samples"] * 4

    def windows_per_source(self) -> dict[str, int]:
        counts = dict.fromkeys(self.sources, 0)
        for f, rows in zip(self.source, self.rows):
            counts[self.sources[f]] += rows
        return counts


def scan(split_dir: str, channels: Sequence[str] | None = None, absent_ok: bool = False) -> Split:
    """Scan ``split_dir`` (every footer: see :func:`biofm.dataset.scan_split`) and select
    ``channels`` (names, in the order wanted; None: all, as stored). ``absent_ok``: a channel the
    split lacks is zeros (index -1) instead of an error, as long as it holds one of them."""
    from biofm.dataset import scan_split

    spec, rows = scan_split(split_dir)
    channels = list(spec["channels"] if channels is None else channels)
    missing = [c for c in channels if c not in spec["channels"]]
    if missing and (not absent_ok or len(missing) == len(channels)):
        raise ConfigError(f"{split_dir} has channels {spec['channels']}, not {missing}")
    index = tuple(spec["channels"].index(c) if c in spec["channels"] else -1 for c in channels)
    spec = {**spec, "channels": channels, "filters": {c: spec["filters"][c] for c in channels if c in spec["filters"]}}
    return Split(tuple(rows), tuple(rows.values()), spec, (index,) * len(rows), (0,) * len(rows),
                 (storage.name(storage.normalize(split_dir).rsplit("/", 1)[0]),), (1.0,))


def corpus(splits: Sequence[Split], names: Sequence[str], weights: Sequence[float] | None = None) -> Split:
    """One split of several sources' splits (``names``: one per split, as the history names
    them; ``weights``: their sampling weights, 1 each by default). They must agree on rate,
    window and the filters of every channel they share."""
    first = splits[0].spec
    filters = {}
    for split, name in zip(splits, names):
        spec = split.spec
        if (spec["sample_rate_hz"], spec["window_samples"]) != (first["sample_rate_hz"], first["window_samples"]):
            raise ConfigError(f"source {name} has {spec['window_samples']} samples at {spec['sample_rate_hz']:g} Hz, "
                              f"{names[0]} {first['window_samples']} at {first['sample_rate_hz']:g} Hz: build both "
                              "with the same windows.yaml")
        for c, f in spec["filters"].items():
            if filters.setdefault(c, (f, name))[0] != f:
                raise ConfigError(f"sources {filters[c][1]} and {name} filter {c} differently "
                                  f"({filters[c][0]} and {f}): build both with the same channels.yaml")
    spec = {**first, "filters": {c: filters[c][0] for c in first["channels"] if c in filters},
            "sources": {name: s.spec["config_hash"] for s, name in zip(splits, names)}}
    return Split(tuple(f for s in splits for f in s.files), tuple(r for s in splits for r in s.rows), spec,
                 tuple(i for s in splits for i in s.channel_index),
                 tuple(k for k, s in enumerate(splits) for _ in s.files), tuple(names),
                 tuple(weights or (1.0,) * len(splits)))


class WindowBatches:
    """Batches of ``columns`` from ``split`` for worker ``rank`` of ``world``; iterate
    ``epoch(e)`` once per epoch. Each batch is a dict: ``signal`` float32 ``[B, C, T]``, other
    numeric columns as tensors (integers int64, booleans bool, ``present`` ``[B, C]``), strings
    as numpy arrays; ``source`` (not stored: each window's index into ``split.sources``) int64.
    With a CUDA ``device`` the tensors arrive there, copied from pinned memory
    without blocking (pinned by torch's caching host allocator, which reuses the blocks of
    batches already copied). ``repeat``: how often each window (in file order) counts per epoch,
    for oversampling; needs the split cached. ``prefetch``: batches made ahead, ``read_ahead``:
    files read at once, each in its own thread (:func:`reader_threads`)."""

    def __init__(self, split: Split, columns: Sequence[str], batch_size: int, *, train: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1, cache_mb: float = 0.0, shuffle_buffer: int = 4096,
                 repeat: np.ndarray | None = None, device: torch.device | str | None = None,
                 prefetch: int = 4, read_ahead: int = 4):
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}")
        self.split, self.columns, self.batch_size = split, list(columns), batch_size
        self.train, self.seed, self.rank, self.world = train, seed, rank, world
        self.cached = split.memory_bytes <= cache_mb * 1e6
        if repeat is not None and (not self.cached or len(repeat) != split.windows or split.weighted):
            raise ValueError(f"repeat needs the split cached, unweighted and one count per window ({split.windows})")
        self.repeat, self.shuffle_buffer = repeat, shuffle_buffer
        self.device = torch.device(device) if device is not None else None
        self.prefetch, self.read_ahead = prefetch, read_ahead
        self._data: dict[str, np.ndarray] | None = None
        total = int(np.sum(repeat)) if repeat is not None else split.epoch_windows() if train else split.windows
        self.windows = total // world if train else len(np.array_split(np.arange(total), world)[rank])

    def __len__(self) -> int:
        """Batches per epoch for this worker."""
        return math.ceil(self.windows / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """This worker's batches of epoch ``epoch``, made in a background thread."""
        out: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for batch in self._batches(epoch):
                    if not put(_tensors(batch, pin=self.device is not None and self.device.type == "cuda")):
                        return
                put(_END)
            except BaseException as e:  # raised again on the training thread
                put(e)

        thread = threading.Thread(target=produce, name=f"batches-epoch{epoch}", daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item if self.device is None else {
                    k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        finally:
            stop.set()
            thread.join()

    def _batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        if self.cached:
            data = self._load()
            if self.train and self.split.weighted:
                starts = np.cumsum((0,) + self.split.rows)
                index = np.concatenate([np.arange(starts[f] + lo, starts[f] + hi) for f, lo, hi in self._weighted_runs(epoch)])
            else:
                index = np.arange(self.split.windows) if self.repeat is None else np.repeat(
                    np.arange(self.split.windows), self.repeat)
            if self.train:
                index = np.random.default_rng([self.seed, epoch]).permutation(index)
            index = index[self._share(len(index))]
            for i in range(0, len(index), self.batch_size):
                yield {k: v[index[i:i + self.batch_size]] for k, v in data.items()}
            return
        chunks = self._read_all(self._pieces(epoch))
        if self.train:
            yield from _shuffled(chunks, self.batch_size, self.shuffle_buffer,
                                 np.random.default_rng([self.seed, epoch, self.rank]))
        else:
            yield from _rebatched(chunks, self.batch_size)

    def _share(self, total: int) -> slice:
        if self.train:
            per = total // self.world
            return slice(self.rank * per, (self.rank + 1) * per)
        bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(total), self.world)])
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def _weighted_runs(self, epoch: int) -> list[tuple[int, int, int]]:
        """A training epoch of a weighted corpus as ``(file, first row, end row)`` runs: each
        source's files ``int(weight)`` times, then, for the fraction, the first windows of its
        files in an order drawn from ``(seed, epoch)`` (another part every epoch)."""
        rng, runs = np.random.default_rng([self.seed, epoch, 1]), []
        for k, w in enumerate(self.split.weights):
            mine = [f for f, src in enumerate(self.split.source) if src == k]
            runs += [(f, 0, self.split.rows[f]) for f in mine] * int(w)
            extra = round((w - int(w)) * sum(self.split.rows[f] for f in mine))
            for f in (rng.permutation(mine) if extra else []):
                take = min(extra, self.split.rows[f])
                runs.append((int(f), 0, take))
                extra -= take
                if not extra:
                    break
        return runs

    def _pieces(self, epoch: int) -> list[tuple[int, int, int]]:
        """``(file index, first row, end row)`` of this worker's share of epoch ``epoch``."""
        runs = self._weighted_runs(epoch) if self.train and self.split.weighted else [
            (f, 0, n) for f, n in enumerate(self.split.rows)]
        if self.train:
            runs = [runs[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(runs))]
        share, pieces, at = self._share(sum(hi - lo for _, lo, hi in runs)), [], 0
        for f, first, end in runs:
            rows = end - first
            lo, hi = max(share.start - at, 0), min(share.stop - at, rows)
            if lo < hi:
                pieces.append((f, first + lo, first + hi))
            at += rows
        return pieces

    def _read(self, piece: tuple[int, int, int]) -> dict[str, np.ndarray]:
        f, lo, hi = piece
        location, stored = self.split.files[f], [c for c in self.columns if c != "source"]
        try:
            table = storage.read_file(location, columns=stored).slice(lo, hi - lo)
        except (pa.ArrowException, OSError) as e:
            raise BiofmError(f"cannot read {location}: {type(e).__name__}: {e}") from None
        data = {c: _numpy(table.column(c)) for c in stored}
        if "signal" in data:
            index, signal = list(self.split.channel_index[f]), data["signal"]
            if -1 in index:
                out = np.zeros((len(signal), len(index), signal.shape[2]), signal.dtype)
                for c, row in enumerate(index):
                    if row >= 0:
                        out[:, c] = signal[:, row]
                data["signal"] = out
            elif index != list(range(signal.shape[1])):
                data["signal"] = signal[:, index]
        if "present" in data:  # a task's own marking, by the selected channels; -1: absent
            index = self.split.channel_index[f]
            data["present"] = np.stack([data["present"][:, r] if r >= 0 else np.zeros(hi - lo, bool) for r in index], 1)
        if "source" in self.columns:
            data["source"] = np.full(hi - lo, self.split.source[f], np.int16)
        return data

    def _read_all(self, pieces: list) -> Iterator[dict[str, np.ndarray]]:
        """The pieces' columns in order, ``read_ahead`` files in flight (overlapping the round
        trips of an object store)."""
        with ThreadPoolExecutor(self.read_ahead) as pool:
            todo = iter(pieces)
            pending = deque(pool.submit(self._read, p) for p in itertools.islice(todo, self.read_ahead))
            while pending:
                chunk = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(self._read, nxt))
                yield chunk

    def _load(self) -> dict[str, np.ndarray]:
        if self._data is None:
            pieces = [(f, 0, n) for f, n in enumerate(self.split.rows)]
            self._data = _concat(list(self._read_all(pieces)))
        return self._data


def reader_threads(local_workers: int = 1) -> int:
    """Files a worker decodes at once: its share of the node's cores, and at least 4 (pyarrow
    releases the GIL while it decodes; a read from an object store waits on the network)."""
    return max(4, (os.cpu_count() or 1) // max(1, local_workers))


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    if isinstance(array.type, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    if pa.types.is_fixed_size_list(array.type):
        return array.flatten().to_numpy(zero_copy_only=False).reshape(len(array), array.type.list_size)
    return array.to_numpy(zero_copy_only=False)


def _rows(data: dict[str, np.ndarray]) -> int:
    return len(next(iter(data.values())))


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One dict of fresh (writable) arrays from ``chunks``."""
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _rebatched(chunks: Iterator[dict], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` in order; the last may be smaller."""
    held, size = [], 0
    for chunk in chunks:
        held.append(chunk)
        size += _rows(chunk)
        if size >= batch_size:
            data = _concat(held)
            cut = size // batch_size * batch_size
            for i in range(0, cut, batch_size):
                yield {k: v[i:i + batch_size] for k, v in data.items()}
            held, size = ([{k: v[cut:] for k, v in data.items()}], size - cut) if size > cut else ([], 0)
    if size:
        yield _concat(held)


def _shuffled(chunks: Iterator[dict], batch_size: int, buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Batches of windows drawn at random from a pool of ``buffer`` windows (0: in order)."""
    return _rebatched(_drawn(chunks, buffer, rng) if buffer else chunks, batch_size)


def _drawn(chunks: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """tf.data's shuffle buffer, a chunk at a time: once the pool of ``buffer`` windows is full,
    each incoming window takes the slot of a random one, which goes out; the pool empties in a
    random order at the end. The pool is allocated once, so no large array is made per chunk."""
    pool, filled = None, 0
    for chunk in chunks:
        at, n = 0, _rows(chunk)
        if pool is None:
            pool = {k: np.empty((buffer, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
        if filled < buffer:
            take = min(n, buffer - filled)
            for k, v in chunk.items():
                pool[k][filled:filled + take] = v[:take]
            filled, at = filled + take, take
        while at < n:
            take = min(n - at, buffer)
            slots = rng.choice(buffer, take, replace=False)
            out = {k: v[slots] for k, v in pool.items()}
            for k, v in chunk.items():
                pool[k][slots] = v[at:at + take]
            at += take
            yield out
    if filled:
        order = rng.permutation(filled)
        yield {k: v[order] for k, v in pool.items()}


def _tensors(batch: dict[str, np.ndarray], pin: bool) -> dict:
    """Numeric columns as tensors (integers as int64, the dtype of labels and indices in torch),
    in pinned memory when ``pin``; strings stay numpy."""
    out = {}
    for k, v in batch.items():
        if v.dtype.kind not in "fbiu":
            out[k] = v
            continue
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64 if v.dtype.kind in "iu" else v.dtype))
        out[k] = t.pin_memory() if pin else t
    return out


class WaitClock:
    """Wraps one epoch's batches and times the loop's waits for them: ``data_wait_fraction`` (of
    the epoch's seconds, ``train_s``) and ``first_batch_wait_s``."""

    def __init__(self, batches: Iterator[dict]):
        self.batches, self.wait, self.first, self.t0 = batches, 0.0, 0.0, 0.0
        self.elapsed = 0.0

    def __iter__(self) -> Iterator[dict]:
        self.t0 = t = time.perf_counter()
        for i, batch in enumerate(self.batches):
            waited = time.perf_counter() - t
            self.wait += waited
            self.first = waited if i == 0 else self.first
            yield batch
            t = time.perf_counter()
        self.elapsed = time.perf_counter() - self.t0

    def metrics(self) -> dict:
        seconds = max(self.elapsed, 1e-9)
        return {"data_wait_fraction": self.wait / seconds, "first_batch_wait_s": self.first, "train_s": seconds}


def data_wait_note(metrics: dict) -> str:
    """A progress line's account of data loading, so a starving accelerator shows at once."""
    return (f"data wait {100 * metrics['data_wait_fraction']:.0f}% "
            f"(first batch {metrics['first_batch_wait_s']:.2f} s)")
