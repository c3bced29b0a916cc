"""Benchmark: each format's reader against its library's bare read of the same signals.

The six Vital Recorder files of ../shared/realdata/vital (PPG 100 Hz, ECG 300 Hz), tiled to
``--minutes`` each, are written as .vital, WFDB (multi-frequency), EDF (NSRR labels) and CSV (ECG
resampled to the PPG's 100 Hz, as CSV has one rate). Per format, in one process, alternating
rounds so that a noisy neighbour hits all alike:

    bare    the library alone: vitaldb load_vital + get_track_samples, wfdb.rdrecord,
            edfio read_edf + .data, pandas.read_csv
    reader  biofm's source.read (the same library, plus channel matching and track checks)
    windows source.read + the windowing of build-windows (resample, filter, quality): windows/s
            on one core

    python jobs/bench_readers.py --minutes 30 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata" / "vital"


def tiled(minutes: float) -> dict[str, dict[str, tuple[np.ndarray, float]]]:
    """Recording name -> {"PPG"|"ECG": (samples, Hz)}, gaps filled, tiled to ``minutes``."""
    from biofm import signals
    from biofm.config import ChannelsConfig, load_config
    from biofm.sources.vitaldb import read_tracks

    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    out = {}
    for path in sorted(REALDATA.glob("*.vital")):
        tracks = read_tracks(path, channels)
        out[path.stem] = {c: (np.resize(signals.fill_gaps(x)[0], int(minutes * 60 * fs)), fs) for c, (x, fs, _) in tracks.items()}
    return out


def write_all(recordings: dict, workdir: Path) -> dict[str, Path]:
    import edfio
    import pandas as pd
    import vitaldb
    import wfdb

    from biofm import signals

    folders = {fmt: workdir / fmt for fmt in ("vital", "wfdb", "edf", "csv")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for name, t in recordings.items():
        (ppg, fp), (ecg, fe) = t["PPG"], t["ECG"]
        vf = vitaldb.VitalFile()
        vf.dtstart, vf.dtend = 1.7e9, 1.7e9 + len(ppg) / fp
        vf.add_track("SNUADC/PLETH", [{"dt": vf.dtstart, "val": ppg.astype(np.float32)}], srate=fp)
        vf.add_track("SNUADC/ECG_II", [{"dt": vf.dtstart, "val": ecg.astype(np.float32)}], srate=fe)
        vf.to_vital(str(folders["vital"] / f"{name}.vital"), compresslevel=6)
        wfdb.wrsamp(name, fs=fp, units=["NU", "mV"], sig_name=["PLETH", "II"], samps_per_frame=[1, int(fe // fp)],
                    e_p_signal=[ppg, ecg], fmt=["16", "16"], write_dir=str(folders["wfdb"]))
        edfio.Edf([edfio.EdfSignal(ppg, fp, label="Pleth"), edfio.EdfSignal(ecg, fe, label="EKG")]).write(
            folders["edf"] / f"{name}.edf")
        pd.DataFrame({"Time [s]": np.arange(len(ppg)) / fp, "PLETH": ppg,
                      "II": signals.resample(ecg, fe, fp)[:len(ppg)]}).to_csv(folders["csv"] / f"{name}.csv", index=False)
    return folders


def bare(fmt: str, path: Path) -> int:
    """The library's own read of the two signals; returns the samples read."""
    if fmt == "vital":
        import vitaldb

        vf = vitaldb.VitalFile()
        vf.load_vital(str(path), track_names=["SNUADC/PLETH", "SNUADC/ECG_II"])
        return sum(len(vf.get_track_samples(t, 1.0 / vf.trks[t].srate)) for t in ("SNUADC/PLETH", "SNUADC/ECG_II"))
    if fmt == "wfdb":
        import wfdb

        rec = wfdb.rdrecord(str(path.with_suffix("")), smooth_frames=False)
        return sum(len(x) for x in rec.e_p_signal)
    if fmt == "edf":
        import edfio

        return sum(len(s.data) for s in edfio.read_edf(path).signals)
    import pandas as pd

    table = pd.read_csv(path)
    return int(table["PLETH"].to_numpy().size + table["II"].to_numpy().size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/bench_readers")
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if not REALDATA.is_dir():
        raise SystemExit(f"bench_readers: no real recordings in {REALDATA}; the benchmark needs them")

    import torch

    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import recording_windows
    from biofm.sources.formats import open_source

    torch.set_num_threads(1)
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    cfg = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    folders = write_all(tiled(args.minutes), Path(args.workdir))
    sources = {fmt: open_source(str(folder)) for fmt, folder in folders.items()}
    seconds = {fmt: {"bare": [], "reader": [], "windows": []} for fmt in folders}
    windows = {}
    for _ in range(args.rounds):
        for fmt, folder in folders.items():
            files = sorted(p for p in folder.iterdir() if p.suffix in (".vital", ".hea", ".edf", ".csv"))
            t0 = time.perf_counter()
            for path in files:
                bare(fmt, path)
            t1 = time.perf_counter()
            for rid in sources[fmt].ids():
                sources[fmt].read(rid, channels).require(channels)
            t2 = time.perf_counter()
            n = 0
            for rid in sources[fmt].ids():
                n += len(recording_windows(sources[fmt].read(rid, channels).require(channels), channels, cfg, {})[1])
            t3 = time.perf_counter()
            windows[fmt] = n
            for k, s in zip(("bare", "reader", "windows"), (t1 - t0, t2 - t1, t3 - t2)):
                seconds[fmt][k].append(s)
    rows = {}
    for fmt, s in seconds.items():
        b, r, w = (float(np.median(s[k])) for k in ("bare", "reader", "windows"))
        rows[fmt] = {"bare_s": round(b, 3), "reader_s": round(r, 3), "reader_over_bare": round(r / b, 3),
                     "windows": windows[fmt], "windows_per_s_per_core": round(windows[fmt] / w, 1)}
        print(f"{fmt:6s} bare {b:7.3f} s  reader {r:7.3f} s  reader/bare {r / b:5.2f}x  "
              f"{windows[fmt]} windows at {windows[fmt] / w:7.1f} windows/s on one core", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"minutes": args.minutes, "rounds": args.rounds, "formats": rows}, indent=1))


if __name__ == "__main__":
    main()
