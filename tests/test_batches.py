"""The one batch path of every training loop (biofm.train.batches): every window exactly once per
epoch, a new order every epoch, equal shares for DDP workers, right shapes and dtypes, streamed
and cached, and a clear error for a file that breaks mid-epoch."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import BiofmError, ConfigError
from biofm.dataset import data_spec, windows_table
from biofm.train.batches import WaitClock, WindowBatches, scan
from conftest import ROOT

CHANNELS = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
WINDOWS = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
SIZES = {"a": 7, "b": 13, "c": 1, "d": 20, "e": 10}  # 51 windows in 5 files


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Windows whose signals carry their identity: window ``k`` (numbered across files in name
    order) is ``k`` on PPG and ``-k`` on ECG."""
    folder = tmp_path_factory.mktemp("batches") / "train"
    folder.mkdir()
    spec, k = data_spec(CHANNELS, WINDOWS), 0
    for case, n in SIZES.items():
        ids = np.arange(k, k + n, dtype=np.float32)
        signal = np.stack([np.repeat(ids[:, None], 1250, 1), np.repeat(-ids[:, None], 1250, 1)], axis=1)
        columns = {"window_idx": np.arange(n, dtype=np.int32), "start_s": np.arange(n) * 10.0, "signal": signal}
        pq.write_table(windows_table(case, columns, spec), folder / f"{case}.parquet")
        k += n
    return folder


def ids_of(batches) -> list[np.ndarray]:
    return [b["signal"][:, 0, 0].numpy().astype(int) for b in batches]


@pytest.mark.parametrize("cache_mb", [0.0, 100.0], ids=["streamed", "cached"])
def test_every_window_once_per_epoch_in_a_new_order(split, cache_mb):
    s = scan(str(split))
    assert (s.windows, len(s.files), s.rows) == (51, 5, (7, 13, 1, 20, 10))
    batches = WindowBatches(s, ["signal", "case_id", "window_idx", "start_s"], 8, train=True, seed=3,
                            cache_mb=cache_mb, shuffle_buffer=6, read_ahead=2)
    assert batches.cached == (cache_mb > 0) and len(batches) == 7
    orders = []
    for epoch in range(3):
        got = list(batches.epoch(epoch))
        assert [len(b["signal"]) for b in got] == [8] * 6 + [3]
        b = got[0]
        assert b["signal"].shape == (8, 2, 1250) and b["signal"].dtype == torch.float32
        assert b["window_idx"].dtype == torch.int64 and b["start_s"].dtype == torch.float64
        assert b["case_id"].dtype == object and set(b["case_id"]) <= set(SIZES)
        torch.testing.assert_close(b["signal"][:, 1], -b["signal"][:, 0])
        order = np.concatenate(ids_of(got))
        assert sorted(order) == list(range(51))
        orders.append(order)
    assert len({tuple(o) for o in orders}) == 3
    assert not np.array_equal(orders[0], np.arange(51))
    again = np.concatenate(ids_of(batches.epoch(1)))  # an epoch's order is fixed by (seed, epoch): resume
    np.testing.assert_array_equal(again, orders[1])


@pytest.mark.parametrize("cache_mb", [0.0, 100.0], ids=["streamed", "cached"])
def test_workers_get_equal_disjoint_shares(split, cache_mb):
    s = scan(str(split))
    shares = [np.concatenate(ids_of(WindowBatches(s, ["signal"], 4, train=True, rank=r, world=2,
                                                  cache_mb=cache_mb).epoch(5))) for r in range(2)]
    assert [len(x) for x in shares] == [25, 25]  # DDP steps together: one window of 51 sits out
    assert len(set(shares[0]) | set(shares[1])) == 50 and not set(shares[0]) & set(shares[1])
    # evaluation: files by name, windows in order, every window exactly once across the workers
    evals = [np.concatenate(ids_of(WindowBatches(s, ["signal"], 4, rank=r, world=2, cache_mb=cache_mb).epoch(0)))
             for r in range(2)]
    np.testing.assert_array_equal(np.concatenate(evals), np.arange(51))
    assert [len(x) for x in evals] == [26, 25]


def test_channels_are_selected_in_the_order_asked(split):
    s = scan(str(split), ("ECG", "PPG"))
    assert s.spec["channels"] == ["ECG", "PPG"] and list(s.spec["filters"]) == ["ECG", "PPG"]
    assert s.memory_bytes == 51 * 2 * 1250 * 4
    b = next(iter(WindowBatches(s, ["signal"], 51).epoch(0)))
    np.testing.assert_array_equal(b["signal"][:, 0, 0].numpy(), -np.arange(51))
    ppg = next(iter(WindowBatches(scan(str(split), ("PPG",)), ["signal"], 51).epoch(0)))
    assert ppg["signal"].shape == (51, 1, 1250)
    with pytest.raises(ConfigError, match=r"has channels \['PPG', 'ECG'\], not \['ACC_X'\]"):
        scan(str(split), ("ACC_X", "PPG"))


def test_oversampling_repeats_windows_in_memory(split):
    s = scan(str(split))
    repeat = np.where(np.arange(51) < 7, 3, 1)  # the 7 windows of file "a" count three times
    batches = WindowBatches(s, ["signal"], 10, train=True, cache_mb=100, repeat=repeat)
    counts = np.bincount(np.concatenate(ids_of(batches.epoch(0))), minlength=51)
    np.testing.assert_array_equal(counts, repeat)
    assert batches.windows == 65 and len(batches) == 7
    with pytest.raises(ValueError, match="needs the split cached"):
        WindowBatches(s, ["signal"], 10, train=True, cache_mb=0, repeat=repeat)


def test_stopping_early_and_a_file_that_breaks_mid_epoch(split, tmp_path):
    import shutil

    folder = tmp_path / "train"
    shutil.copytree(split, folder)
    s = scan(str(folder))
    batches = WindowBatches(s, ["signal"], 4, read_ahead=1, prefetch=1)
    for _ in batches.epoch(0):
        break  # the reader thread stops; the next epoch starts afresh
    assert sum(len(b["signal"]) for b in batches.epoch(1)) == 51
    (folder / "d.parquet").write_bytes(b"not parquet any more")
    with pytest.raises(BiofmError, match=r"cannot read .*d\.parquet"):
        list(batches.epoch(2))
    clock = WaitClock(WindowBatches(scan(str(split)), ["signal"], 4).epoch(0))
    assert sum(len(b["signal"]) for b in clock) == 51
    m = clock.metrics()
    assert 0 <= m["first_batch_wait_s"] <= m["data_wait_fraction"] * m["train_s"] + 1e-9
    assert 0 < m["data_wait_fraction"] <= 1


def test_arguments_sizes_and_columns(split):
    s = scan(str(split))
    for bad in ({"batch_size": 0}, {"rank": 2, "world": 2}, {"rank": -1}):
        with pytest.raises(ValueError, match="need batch_size >= 1 and 0 <= rank < world"):
            WindowBatches(s, ["signal"], **{"batch_size": 4, **bad})
    assert len(list(WindowBatches(s, ["signal"], 1).epoch(0))) == 51
    assert WindowBatches(s, ["signal"], 4, cache_mb=s.memory_bytes / 1e6).cached         # exactly fits
    assert not WindowBatches(s, ["signal"], 4, cache_mb=s.memory_bytes / 1e6 * 0.999).cached
    assert [WindowBatches(s, ["signal"], 4, train=True, rank=r, world=2).windows for r in (0, 1)] == [25, 25]
    assert [WindowBatches(s, ["signal"], 4, rank=r, world=2).windows for r in (0, 1)] == [26, 25]
    b = next(iter(WindowBatches(s, ["window_idx", "signal"], 4).epoch(0)))
    assert sorted(b) == ["signal", "window_idx"]                                          # only what was asked
    # streamed, a worker's share starts inside a file (rank 1 of 3 begins at window 17, in file "b")
    mine = np.concatenate(ids_of(WindowBatches(s, ["signal"], 5, rank=1, world=3).epoch(0)))
    np.testing.assert_array_equal(mine, np.arange(17, 34))


def test_shuffle_buffer_and_rebatching():
    from biofm.train.batches import _drawn, _rebatched, _shuffled

    chunks = [{"x": np.arange(a, b)} for a, b in ((0, 3), (3, 10), (10, 11), (11, 20))]
    assert [len(c["x"]) for c in _rebatched(iter(chunks), 4)] == [4, 4, 4, 4, 4]
    assert [c["x"].tolist() for c in _rebatched(iter(chunks), 10)] == [list(range(10)), list(range(10, 20))]
    drawn = list(_drawn(iter(chunks), 5, np.random.default_rng(0)))
    assert sorted(np.concatenate([c["x"] for c in drawn]).tolist()) == list(range(20))  # each window once
    assert [len(c["x"]) for c in drawn] == [5, 1, 5, 4, 5]  # a full pool swaps what comes in, then empties
    first = drawn[0]["x"]
    assert first.max() <= 9 and not np.array_equal(first, np.arange(5))                   # from the pool, mixed
    in_order = list(_shuffled(iter(chunks), 8, 0, np.random.default_rng(0)))
    assert np.concatenate([c["x"] for c in in_order]).tolist() == list(range(20))           # buffer 0: as they came


def test_wait_clock_times_the_waits_for_batches():
    import time

    from biofm.train.batches import data_wait_note

    def slow(waits):
        for w in waits:
            time.sleep(w)
            yield w

    clock = WaitClock(slow([0.2, 0.05, 0.05]))
    assert clock.metrics()["train_s"] == pytest.approx(1e-9)   # before the epoch: nothing measured
    for _ in clock:
        time.sleep(0.1)                                          # the loop's own work
    m = clock.metrics()
    assert m["first_batch_wait_s"] == pytest.approx(0.2, abs=0.05)
    assert m["train_s"] == pytest.approx(0.6, abs=0.1)
    assert m["data_wait_fraction"] == pytest.approx(0.3 / m["train_s"], abs=0.08)
    assert data_wait_note({"data_wait_fraction": 0.263, "first_batch_wait_s": 0.061}) == (
        "data wait 26% (first batch 0.06 s)")


def test_an_epoch_left_early_ends_its_reader_thread_and_streamed_windows_are_mixed(split):
    import threading
    import time

    s = scan(str(split))
    epoch = WindowBatches(s, ["signal"], 2, prefetch=1).epoch(3)
    next(epoch)
    epoch.close()                                        # the loop stopped early: its reader must stop too
    deadline = time.time() + 0.5
    while time.time() < deadline and any(t.name == "batches-epoch3" for t in threading.enumerate()):
        time.sleep(0.01)
    assert not any(t.name == "batches-epoch3" for t in threading.enumerate())
    # streamed with a shuffle buffer: windows of one file do not come out as a run
    order = np.concatenate(ids_of(WindowBatches(s, ["signal"], 8, train=True, seed=3, shuffle_buffer=6).epoch(0)))
    assert int(np.sum(np.diff(order) == 1)) < 25         # in file order, 46 of the 50 steps are +1
    # a share that starts and ends inside one file (rank 3 of 7: inside file "d")
    share = np.array_split(np.arange(51), 7)[3]
    got = np.concatenate(ids_of(WindowBatches(s, ["signal"], 5, rank=3, world=7).epoch(0)))
    np.testing.assert_array_equal(got, share)
    assert 21 < share[0] and share[-1] < 40


@pytest.mark.parametrize("cache_mb", [0.0, 100.0], ids=["streamed", "cached"])
def test_a_corpus_with_weights_and_an_absent_channel(split, tmp_path, cache_mb):
    """Two sources: ``split`` (PPG+ECG, weight 2: every window twice) and a PPG-only one (weight
    0.5: half its windows, another half each epoch; its ECG a row of zeros). Two workers share
    each epoch equally; the ``source`` column says where a window came from."""
    from biofm.train.batches import corpus

    ppg_only = tmp_path / "watch" / "train"
    ppg_only.mkdir(parents=True)
    ppg = {"PPG": CHANNELS["PPG"]}
    for case, n in (("w1", 6), ("w2", 8)):
        ids = np.arange(1000, 1000 + n, dtype=np.float32) + (0 if case == "w1" else 6)
        columns = {"window_idx": np.arange(n, dtype=np.int32), "start_s": np.arange(n) * 10.0,
                   "signal": np.repeat(ids[:, None, None], 1250, 2)}
        pq.write_table(windows_table(case, columns, data_spec(ppg, WINDOWS)), ppg_only / f"{case}.parquet")
    with pytest.raises(ConfigError, match=r"has channels \['PPG'\], not \['ECG'\]"):
        scan(str(ppg_only), ["PPG", "ECG"])
    both = corpus([scan(str(split)), scan(str(ppg_only), ["PPG", "ECG"], absent_ok=True)], ["vital", "watch"], [2.0, 0.5])
    assert both.windows_per_source() == {"vital": 51, "watch": 14} and both.epoch_windows() == 102 + 7
    seen_watch = []
    for epoch in range(3):
        per_worker = []
        for rank in (0, 1):
            b = WindowBatches(both, ["signal", "source"], 16, train=True, seed=1, rank=rank, world=2, cache_mb=cache_mb)
            got = list(b.epoch(epoch))
            per_worker.append((np.concatenate(ids_of(got)), np.concatenate([x["source"].numpy() for x in got]),
                               torch.cat([x["signal"] for x in got])))
        ids = np.concatenate([w[0] for w in per_worker])
        source = np.concatenate([w[1] for w in per_worker])
        signal = torch.cat([w[2] for w in per_worker])
        assert len(per_worker[0][0]) == len(per_worker[1][0]) == 54  # 109 // 2 each
        vital, watch = ids[source == 0], ids[source == 1]
        assert set(vital) <= set(range(51)) and set(watch) <= set(range(1000, 1014))
        assert np.all(np.bincount(vital, minlength=51) <= 2) and len(vital) + len(watch) == 108
        assert (len(vital), len(watch)) in ((102, 6), (101, 7))  # 2 x 51 and 7 of 14, less the one left out
        assert (signal[source == 1][:, 1] == 0).all() and (signal[source == 0][:, 1] == -signal[source == 0][:, 0]).all()
        seen_watch.append(frozenset(watch.tolist()))
    assert len(set(seen_watch)) > 1  # the half of the PPG-only source drawn changes with the epoch


def test_a_worker_reads_with_its_share_of_the_cores(monkeypatch, split):
    """Decode threads per worker: the node's cores over its workers, at least 4; pretraining's
    readers take that many."""
    import os

    from biofm.config import PretrainConfig
    from biofm.train.batches import reader_threads
    from biofm.train.pretrain import loaders

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [reader_threads(n) for n in (1, 2, 4, 8)] == [16, 8, 4, 4]
    train, val = loaders(PretrainConfig(), scan(str(split)), scan(str(split)), local_workers=2)
    assert train.read_ahead == val.read_ahead == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert reader_threads(1) == 4
