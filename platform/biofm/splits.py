"""Deterministic group-level splits (by case or by subject): no group lands in two splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from biofm import storage
from biofm.errors import ConfigError

SPLITS = ("train", "val", "test")
FASTTRACK_CASES = 70


def split_groups(groups: list[str], ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0, positive_rate: dict[str, float] | None = None) -> dict[str, list[str]]:
    """Shuffle ``groups`` with ``seed`` and cut them by ``ratios`` (train, val, test).

    Each split gets ``round(ratio * n)`` groups (test takes the rest); the same input and seed
    always give the same splits. Ids come back sorted within each split. With
    ``positive_rate`` (group -> share of positive labels) the split is stratified: groups are
    ordered by that rate and dealt out in turn, each to the split furthest below its share.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(f"split ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    ids = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(round(ratios[0] * len(ids)))
    n_val = min(int(round(ratios[1] * len(ids))), len(ids) - n_train)
    sizes = {"train": n_train, "val": n_val, "test": len(ids) - n_train - n_val}
    if positive_rate is None:
        cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    else:
        cuts = {name: [] for name in SPLITS}
        for k, i in enumerate(sorted(order, key=lambda i: positive_rate[ids[i]])):  # stable: ties stay shuffled
            open_splits = [n for n in SPLITS if len(cuts[n]) < sizes[n]]
            cuts[max(open_splits, key=lambda n: (sizes[n] * (k + 1) / len(ids) - len(cuts[n]), -SPLITS.index(n)))].append(i)
    return {name: sorted((ids[i] for i in idx), key=_natural) for name, idx in cuts.items()}


def kfold_groups(rates: dict[str, float], k: int, seed: int = 0) -> list[list[str]]:
    """Groups (subjects) -> ``k`` folds, stratified: ordered by ``rates`` (their positive rate, or
    any number to balance; ties in a seeded random order) and dealt out in turn."""
    ids = sorted(rates)
    order = np.random.default_rng(seed).permutation(len(ids))
    folds: list[list[str]] = [[] for _ in range(k)]
    for n, i in enumerate(sorted(order, key=lambda i: rates[ids[i]])):
        folds[n % k].append(ids[i])
    return [sorted(f) for f in folds]


def _natural(case_id: str):
    return (0, int(case_id), "") if case_id.isdigit() else (1, 0, case_id)


def read_case_list(spec: str) -> tuple[list[str], str]:
    """Case ids from a vitaldb case set name, a text file (one id per line, ``#`` comments), or a
    folder of recordings in any format :func:`~biofm.sources.formats.open_source` reads (a
    ``wfdb:`` ... prefix names one). Returns ``(ids, description)``."""
    from biofm.sources.formats import format_prefix, open_source
    from biofm.sources.vitaldb import case_sets

    sets = case_sets()
    if spec in sets:
        return sets[spec], f"vitaldb case set {spec!r}"
    path = Path(format_prefix(spec)[1])
    if path.is_dir():
        source = open_source(spec)
        return source.ids(), f"folder {source.describe()}"
    if path.is_file():
        ids = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return [i for i in ids if i], f"case list file {path}"
    raise ConfigError(f"--case-set {spec!r} is neither a vitaldb case set ({', '.join(sorted(sets))}), "
                      "a file of case ids, nor a folder of recordings")


def prepare_splits(mode: str, case_set: str, output: str | Path, seed: int = 0,
                   ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> str:
    """Write ``<output>/splits_<mode>.json`` (``output``: a local path or a URI): ``{"train": [...], "val": [...], "test": [...], "meta": {...}}``.

    ``mode="fasttrack"`` first draws a deterministic subset of 70 cases; ``"full"`` keeps all. A
    split that ``ratios`` give a share but no case (one recording for three splits) is refused,
    naming the counts and the ratios that would do.
    """
    if mode not in ("fasttrack", "full"):
        raise ConfigError(f"--mode must be fasttrack or full, got {mode!r}")
    ids, described = read_case_list(case_set)
    if not ids:
        raise ConfigError(f"{described} holds no case ids")
    rng = np.random.default_rng(seed)
    if mode == "fasttrack" and len(ids) > FASTTRACK_CASES:
        ids = sorted(rng.choice(sorted(ids), FASTTRACK_CASES, replace=False).tolist(), key=_natural)
    splits = split_groups(ids, ratios, seed)
    empty = [name for name, r in zip(SPLITS, ratios) if r > 0 and not splits[name]]
    if empty:
        raise ConfigError(f"{described} holds {len(ids)} recording(s): with --ratios {' '.join(f'{r:g}' for r in ratios)} "
                          f"the {' and '.join(empty)} split(s) get none. A split is whole recordings: add recordings, or "
                          f"give the empty split(s) no share (e.g. --ratios 1 0 0: every recording trains)")
    meta = {"mode": mode, "case_set": case_set, "source": described, "seed": seed,
            "ratios": list(ratios), "n_cases": len(ids), "counts": {k: len(v) for k, v in splits.items()}}
    return storage.write_text(storage.join(output, f"splits_{mode}.json"), json.dumps({**splits, "meta": meta}, indent=1))


def load_split(split_file: str | Path, split: str) -> list[str]:
    """The case ids of ``split`` in a splits JSON file, as strings."""
    path = storage.normalize(split_file)
    if not storage.is_file(path):
        raise ConfigError(f"split file not found: {path} (make one with `biofm prepare-splits`)")
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if split not in data or split == "meta":
        available = [k for k in data if k != "meta"]
        raise ConfigError(f"{path} has no split {split!r} (it has {', '.join(available)})")
    return [str(c) for c in data[split]]
