"""A pretraining corpus from recordings: every source of a corpus YAML windowed in its own folder.

A corpus YAML (:class:`~biofm.config.CorpusConfig`) lists its sources, each with the folder its
windows go to (``path``, relative to the YAML) and its sampling weight; ``biofm pretrain
--data-dir corpus.yaml`` reads them as one corpus. :func:`build_corpus` makes those folders from
the recordings each source names (``raw``, under a root folder):

- a source with a ``task`` is read by that built-in task's reader (the arrhythmia set's
  ``MPA_*.mat`` segments), its subjects split into train and val by ``val_share``; the labels
  stay in the windows, unused by pretraining (evaluate-ssl then gives the floors per class);
- any other is a folder of recordings in a format build-windows reads; ``val_share`` of its
  recordings (at least one, when it has two or more) are validation windows.

Then it copies the YAML beside the folders, so the paths resolve: ``<outdir>/corpus.yaml``.
``cases`` restricts a source to some recordings (the arrhythmia patients and CapnoBase cases
that are not benchmark subjects).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biofm import storage
from biofm.config import ChannelsConfig, CorpusConfig, CorpusSource, WindowsConfig, load_config, resolve
from biofm.errors import ConfigError


def build_corpus(corpus_yaml: str | Path, raw_root: str | Path, outdir: str | Path, channels: ChannelsConfig,
                 windows: WindowsConfig, seed: int = 0, address: str | None = None) -> dict:
    """Window every source of ``corpus_yaml`` from ``raw_root`` into ``outdir`` and write
    ``<outdir>/corpus.yaml``; returns ``{source: {split: windows}}``."""
    cfg = load_config(CorpusConfig, corpus_yaml)
    raw_root, outdir = Path(raw_root), Path(outdir)
    unbuildable = [s.name or s.path for s in cfg.sources if not s.raw]
    if unbuildable:
        raise ConfigError(f"{corpus_yaml}: sources {unbuildable} name no recordings (raw:): build-corpus cannot make them")
    from biofm.sources.formats import format_prefix

    missing = [s.raw for s in cfg.sources if not (raw_root / format_prefix(s.raw)[1]).exists()]
    if missing:
        raise ConfigError(f"{raw_root} lacks {missing}: point --raw-root at the folder that holds the corpus's recordings")
    counts = {}
    for source in cfg.sources:
        target = outdir / source.path
        counts[source.name or source.path] = (_task_source if source.task else _recording_source)(
            source, raw_root, target, channels, windows, seed, address)
        print(f"[build-corpus] {source.name or source.path}: " + ", ".join(f"{n} {s}" for s, n in
                                                                        counts[source.name or source.path].items())
              + f" windows -> {target}", flush=True)
    storage.write_text(str(outdir / "corpus.yaml"), resolve(corpus_yaml).read_text())
    return counts


def _val_count(n: int, share: float) -> int:
    return 0 if n < 2 or share == 0 else max(1, round(share * n))


def link_recordings(folder: Path, dest: Path, cases, others: bool = False, where: str = "") -> Path:
    """``dest``, made afresh: links to the files of ``folder`` that belong to ``cases`` (a file
    ``<case>.<suffix>``), or with ``others`` to every other file. A case without a file is a
    :class:`ConfigError` naming ``where``."""
    storage.remove_tree(str(dest))
    dest.mkdir(parents=True)
    files = sorted(f for f in folder.iterdir() if f.is_file())
    ids = {f: f.name.split(".", 1)[0] for f in files}
    missing = sorted(set(cases) - set(ids.values()))
    if missing and not others:
        raise ConfigError(f"{where}: no recording {missing[0]} in {folder}")
    for f in files:
        if (ids[f] in cases) != others:
            (dest / f.name).symlink_to(f.resolve())
    return dest


def _task_source(source: CorpusSource, raw_root: Path, target: Path, channels, windows, seed, address) -> dict:
    from biofm.tasks import builtin_task, prepare_task

    task, raw = builtin_task(source.task), raw_root / source.raw
    if source.cases:   # a folder of links: the task's reader sees these recordings only
        raw = link_recordings(raw, target.parent / "_raw" / target.name, source.cases,
                              where=f"corpus source {source.name or source.path}")
    subjects = len(source.cases) or None
    share = source.val_share if subjects is None or _val_count(subjects, source.val_share) else 0.0
    m = prepare_task(task, raw, target, channels.select(list(source.channels)), windows, (1 - share, share, 0.0), seed,
                     rate_hz=source.rate_hz, address=address, classes_in_every_split=False)
    return {s: m["splits"][s]["windows"] for s in ("train", "val") if m["splits"][s]["windows"]}


def _recording_source(source: CorpusSource, raw_root: Path, target: Path, channels, windows, seed, address) -> dict:
    from biofm.preprocess import build_windows
    from biofm.sources.formats import format_prefix, open_source

    fmt, rel = format_prefix(source.raw)
    recordings = open_source(f"{fmt}:{raw_root / rel}" if fmt else str(raw_root / rel), rate_hz=source.rate_hz)
    ids = list(source.cases) or recordings.ids()
    unknown = sorted(set(ids) - set(recordings.ids()))
    if unknown:
        raise ConfigError(f"corpus source {source.name or source.path}: no recording {unknown} in {raw_root / rel}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = _val_count(len(ids), source.val_share)
    parts = {"train": sorted(ids[i] for i in order[n_val:]), "val": sorted(ids[i] for i in order[:n_val])}
    chans = channels.select(list(source.channels))
    return {split: build_windows(cases, recordings, chans, windows, str(target), split, overwrite=True,
                                 address=address)["windows_kept"] for split, cases in parts.items() if cases}
