"""Benchmark: what the window quality checks keep, on noise and on real recordings.

Every window goes through the checks build-windows and predict use (biofm.windows.make_windows
with configs/windows.yaml), once with the signal-quality indices ("after") and once with them
switched off, which leaves the rules biofm had before them ("before": missing, flat, clipped,
too few beats, implausible heart rate). Data:

- noise, per channel at VitalDB-like native rates (PPG 100 Hz, ECG 500 Hz), 300 s recordings:
  white; band-passed with the channel's own filter band; and pulse-band noise (0.5-3 Hz), a
  harder case than the targets ask for;
- ../shared/realdata/ppg_arrhythmia: 12,290 labelled 10 s PPG segments, kept share per rhythm
  (atrial fibrillation must be kept about as often as sinus rhythm);
- ../shared/realdata/vital (PPG + ECG), bidmc and neurokit (CSV, PPG + ECG): kept share;
- ../shared/realdata/butppg: the checks' verdict against the expert quality labels
  (sensitivity and specificity for "poor").

    python jobs/bench_quality.py --output artifacts/bench_quality

Writes <output>/bench_quality.json and bench_quality.md, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
RHYTHMS = ("sinus", "PVC", "PAC", "VT", "SVT", "AF")   # the labels 0..5 of ppg_arrhythmia
NATIVE_HZ = {"PPG": 100.0, "ECG": 500.0}


def without_indices(cfg):
    """``cfg`` with the signal-quality indices switched off: the rules before them."""
    return dataclasses.replace(cfg, ppg_min_template_match=-1.0, ppg_min_pulse_band_power=0.0,
                               ecg_min_template_match=-1.0, ecg_min_beat_agreement=0.0)


def judge(tracks: dict, channels: dict, cfg) -> tuple[int, int, Counter]:
    """Windows kept, windows cut and rejections by reason of one recording (name -> (x, fs))."""
    from biofm.windows import make_windows

    columns, reasons = make_windows({n: (x, fs, n) for n, (x, fs) in tracks.items()}, channels, cfg, {})
    return len(columns["window_idx"]), len(reasons), Counter(r for r in reasons if r)


def tally(recordings, channels: dict, cfgs: dict) -> dict:
    """Kept share per config over ``recordings`` (an iterable of tracks dicts)."""
    out = {name: {"kept": 0, "total": 0, "rejected": Counter()} for name in cfgs}
    for tracks in recordings:
        for name, cfg in cfgs.items():
            kept, total, rejected = judge(tracks, channels, cfg)
            out[name]["kept"] += kept
            out[name]["total"] += total
            out[name]["rejected"].update(rejected)
    return {name: {**t, "kept_share": t["kept"] / max(t["total"], 1), "rejected": dict(t["rejected"].most_common())}
            for name, t in out.items()}


def noise(kind: str, channel: str, band_hz, n: int, seconds: float, seed: int):
    """``n`` noise recordings of ``channel`` at its native rate: white, or band-passed to ``band_hz``."""
    from biofm import signals

    rng, fs = np.random.default_rng(seed), NATIVE_HZ[channel]
    for _ in range(n):
        x = rng.standard_normal(int(seconds * fs))
        yield {channel: (x if kind == "white" else signals.bandpass(x, fs, band_hz), fs)}


def arrhythmia_segments(folder: Path, rhythm: int):
    import scipy.io

    for f in sorted(folder.glob("MPA_*.mat")):
        m = scipy.io.loadmat(f)
        for x in m["ppgseg"][m["labels"][:, 0] == rhythm]:
            yield {"PPG": (x.astype(np.float64), 100.0)}


def csv_recording(path: Path, columns: dict[str, str], fs: float) -> dict:
    """Named columns of a CSV export (a header row, one sample per row) at ``fs`` Hz."""
    header = [h.strip() for h in path.open().readline().split(",")]
    data = np.genfromtxt(path, delimiter=",", skip_header=1)
    return {name: (data[:, header.index(col)], fs) for name, col in columns.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdata", default=str(REALDATA), help="the shared real-data folder")
    ap.add_argument("--noise-recordings", type=int, default=40, help="noise recordings per kind and channel")
    ap.add_argument("--noise-seconds", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1, help="noise seed (thresholds were chosen with seed 0)")
    ap.add_argument("--output", default="artifacts/bench_quality")
    args = ap.parse_args(argv)

    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.sources.butppg import read_annotations, read_record, read_records
    from biofm.sources.vitaldb import read_tracks

    realdata = Path(args.realdata)
    if not realdata.is_dir():
        raise SystemExit(f"bench_quality: no real data in {realdata}; the benchmark needs it")
    all_channels = load_config(ChannelsConfig, "configs/channels.yaml")
    both, ppg_only = all_channels.select(["PPG", "ECG"]), all_channels.select(["PPG"])
    cfg = load_config(WindowsConfig, "configs/windows.yaml")
    cfgs = {"before": without_indices(cfg), "after": cfg}
    rows: dict[str, dict] = {}

    for channel in ("PPG", "ECG"):
        spec = all_channels.select([channel])
        for kind in ("white", "band-passed", "pulse-band"):
            band = spec[channel].band_hz if kind == "band-passed" else (0.5, 3.0)
            rows[f"noise: {kind} {channel}"] = tally(
                noise(kind, channel, band, args.noise_recordings, args.noise_seconds, args.seed), spec, cfgs)

    arrhythmia = realdata / "ppg_arrhythmia"
    for label, rhythm in enumerate(RHYTHMS):
        rows[f"arrhythmia: {rhythm}"] = tally(arrhythmia_segments(arrhythmia, label), ppg_only, cfgs)

    vital = sorted((realdata / "vital").glob("*.vital"))
    rows["Vital Recorder (6 x 100 s)"] = tally(
        ({n: (x, fs) for n, (x, fs, _) in read_tracks(p, both).items()} for p in vital), both, cfgs)
    rows["BIDMC 01 (CSV, 8 min)"] = tally(
        [csv_recording(realdata / "bidmc" / "bidmc_01_Signals.csv", {"PPG": "PLETH", "ECG": "II"}, 125.0)], both, cfgs)
    rows["NeuroKit (CSV, 5 min)"] = tally(
        [csv_recording(realdata / "neurokit" / "bio_resting_5min_100hz.csv", {"PPG": "PPG", "ECG": "ECG"}, 100.0)],
        both, cfgs)

    butppg_dir = realdata / "butppg"
    labels = read_annotations(butppg_dir)
    verdict = {name: Counter() for name in cfgs}
    for rid in read_records(butppg_dir):
        record = read_record(butppg_dir, rid)
        truth = "good" if labels[rid].label == 1 else "poor"
        for name, c in cfgs.items():
            kept, _, _ = judge({"PPG": record["PPG"]}, ppg_only, c)
            verdict[name][(truth, "kept" if kept else "rejected")] += 1
    butppg = {}
    for name, v in verdict.items():
        poor, good = v["poor", "rejected"] + v["poor", "kept"], v["good", "kept"] + v["good", "rejected"]
        butppg[name] = {"records": poor + good, "poor": poor,
                        "sensitivity_poor": v["poor", "rejected"] / max(poor, 1),
                        "specificity_poor": v["good", "kept"] / max(good, 1)}

    sinus, af = rows["arrhythmia: sinus"]["after"]["kept_share"], rows["arrhythmia: AF"]["after"]["kept_share"]
    result = {"windows_config": dataclasses.asdict(cfg), "noise_seed": args.seed, "rows": rows, "butppg": butppg,
              "af_gap_points": round(100 * (sinus - af), 2)}
    table = format_table(result)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quality.json").write_text(json.dumps(result, indent=1))
    (out / "bench_quality.md").write_text(table + "\n")
    print(table)
    return result


def format_table(result: dict) -> str:
    lines = ["| windows | n | kept before | kept after | most frequent rejection after |", "|---|---:|---:|---:|---|"]
    for name, r in result["rows"].items():
        top = next(iter(r["after"]["rejected"].items()), ("-", 0))
        lines.append(f"| {name} | {r['after']['total']} | {100 * r['before']['kept_share']:.1f}% | "
                     f"{100 * r['after']['kept_share']:.1f}% | {top[0]} ({top[1]}) |")
    lines.append(f"\nAF kept {result['af_gap_points']:.1f} points less often than sinus rhythm (target: at most 5).")
    for name, b in result["butppg"].items():
        lines.append(f"BUT-PPG ({b['records']} records, {b['poor']} poor), {name}: sensitivity for poor "
                     f"{b['sensitivity_poor']:.2f}, specificity {b['specificity_poor']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
