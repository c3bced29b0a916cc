"""The data report of a windows folder, written by every build beside its manifest: per split
(one source each), the recordings read, kept and skipped by reason, the hours, the windows kept
and rejected by reason, the heart rate of the kept windows per channel, and a grid of kept and
rejected windows labelled with their reasons. Markdown with PNGs, for a browser or an editor::

    <outdir>/report.md
    <outdir>/report/<split>_heart_rate.png
    <outdir>/report/<split>_examples.png
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from biofm import storage
from biofm.dataset import read_examples

EXAMPLES = 6  # kept and rejected windows shown per split, each


def write_report(outdir: str | Path) -> str:
    """(Re)write ``<outdir>/report.md`` and its pictures from ``<outdir>/manifest.json`` and the
    splits' files; returns the report's location."""
    manifest = json.loads(storage.read_text(storage.join(outdir, "manifest.json")))
    lines = [f"# Data report: {storage.normalize(outdir)}", ""]
    for split, m in sorted(manifest["splits"].items()):
        lines += _split_section(str(outdir), split, m)
    return storage.write_text(storage.join(outdir, "report.md"), "\n".join(lines) + "\n")


def _split_section(outdir: str, split: str, m: dict) -> list[str]:
    spec, cases = m["data_spec"], m["cases"]
    ok = [c for c, o in cases.items() if o["status"] == "ok"]
    hours = sum(o.get("duration_s", 0.0) for o in cases.values()) / 3600
    cut = m["windows_kept"] + sum(m["windows_rejected"].values())
    lines = [f"## {split}: {m['source']}", "",
             f"Built {m['created']} by biofm {m['code_version']}: {', '.join(spec['channels'])} at "
             f"{spec['sample_rate_hz']:g} Hz, {spec['window_s']:g} s windows (config {spec['config_hash']}).", "",
             "| recordings in | kept | skipped | kept with parts absent | hours read | windows cut | kept | rejected |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {m['cases_in']} | {m['cases_ok']} | {m['cases_skipped']} | {m.get('partial_records', 0)} | "
             f"{hours:.2f} | {cut} | {m['windows_kept']} ({m['windows_kept'] / max(cut, 1):.0%}) | "
             f"{cut - m['windows_kept']} |", ""]
    if m["skip_reasons"]:
        lines += ["Recordings skipped, by reason:", "", "| reason | recordings | for example |", "|---|---:|---|"]
        for code, n in m["skip_reasons"].items():
            case, o = next((c, o) for c, o in cases.items() if o.get("code") == code)
            lines.append(f"| `{code}` | {n} | {case}: {_cell(o['reason'])} |")
        lines.append("")
    if m["windows_rejected"]:
        lines += ["Windows rejected, by reason (the first check each failed):", "",
                  "| reason | windows | share of those cut |", "|---|---:|---:|"]
        lines += [f"| `{r}` | {n} | {n / cut:.1%} |" for r, n in m["windows_rejected"].items()]
        lines.append("")
    split_dir = storage.join(outdir, split)
    if ok:
        files = [storage.join(split_dir, f"{c}.parquet") for c in ok]
        hr = _heart_rate(files, spec["channels"], storage.join(outdir, "report", f"{split}_heart_rate.png"))
        if hr:
            lines += [f"Heart rate of the kept windows (median beat interval): {hr}", "",
                      f"![heart rate](report/{split}_heart_rate.png)", ""]
    shown = _examples(split_dir, ok, cases, spec, storage.join(outdir, "report", f"{split}_examples.png"))
    if shown:
        lines += [f"Kept and rejected windows ({shown}; z-scored, channels offset):", "",
                  f"![windows](report/{split}_examples.png)", ""]
    return lines


def _cell(text: str, width: int = 140) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _heart_rate(files: list[str], channels: list[str], path: str) -> str:
    """Histogram of ``<ch>_hr_bpm`` per channel that has it; returns its summary line."""
    import pyarrow.parquet as pq

    from biofm.plotting import plt, save_png

    schema = pq.read_schema(storage.filesystem(files[0])[1], filesystem=storage.filesystem(files[0])[0])
    columns = {c: f"{c.lower()}_hr_bpm" for c in channels if f"{c.lower()}_hr_bpm" in schema.names}
    table = storage.read_table(files, list(columns.values())) if columns else None
    rates = {c: table[col].to_numpy() for c, col in columns.items()} if columns else {}
    rates = {c: x[np.isfinite(x)] for c, x in rates.items() if np.isfinite(x).any()}  # channels with beats (not ACC)
    if not rates:
        return ""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    summary = []
    for channel, x in rates.items():
        ax.hist(x, bins=np.arange(30, 205, 5), alpha=0.55, label=f"{channel} (n={len(x)})")
        summary.append(f"{channel} median {np.median(x):.0f} bpm [{np.percentile(x, 5):.0f}-{np.percentile(x, 95):.0f}, 5th-95th]")
    ax.set(xlabel="heart rate, bpm", ylabel="windows", title="heart rate of the kept windows")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
    return "; ".join(summary)


def _examples(split_dir: str, ok: list[str], cases: dict, spec: dict, path: str) -> str:
    """A grid: up to :data:`EXAMPLES` kept windows (spread over the recordings, and over a
    recording's windows where there are fewer recordings) above up to as many rejected ones (a
    different reason each first), as many columns as the longer row; returns what it shows."""
    from biofm.plotting import plt, save_png

    kept, chosen = [], ok[:: max(1, len(ok) // EXAMPLES)][:EXAMPLES]
    for case in chosen:
        table = storage.read_file(storage.join(split_dir, f"{case}.parquet"), ["window_idx", "start_s", "signal"])
        per = -(-EXAMPLES // len(chosen))
        signals = table["signal"].combine_chunks().to_numpy_ndarray()
        for i in sorted(set(np.linspace(0, table.num_rows - 1, per + 2)[1:-1].round().astype(int).tolist())):
            kept.append(("kept", f"{case} at {table['start_s'][i].as_py():g} s", signals[i]))
    kept = kept[:EXAMPLES]
    rejected, seen = [], Counter()
    for case in [c for c, o in cases.items() if o.get("rejected")][:200]:
        for reason, start, signal in read_examples(split_dir, case):
            rejected.append((seen[reason], reason, f"{case} at {start:g} s", signal))
            seen[reason] += 1
    rejected = [r[1:] for r in sorted(rejected, key=lambda r: r[0])][:EXAMPLES]
    rows = [r for r in (kept, rejected) if r]
    if not rows:
        return ""
    t = np.arange(spec["window_samples"]) / spec["sample_rate_hz"]
    columns = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.6 * columns, 2.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        for ax, item in zip(ax_row, row + [None] * (columns - len(row))):
            ax.axis("off")
            if item is None:
                continue
            label, where, signal = item
            for c, name in enumerate(spec["channels"]):
                ax.plot(t[:signal.shape[-1]], signal[c] - 5 * c, lw=0.6, label=name)
            ax.set_title(f"{label}\n{where}", fontsize=7, color="tab:green" if label == "kept" else "tab:red")
    axes[0][0].legend(loc="upper left", fontsize=6)
    fig.tight_layout()
    save_png(fig, path, dpi=90)
    return f"{len(kept)} kept, {len(rejected)} rejected"
