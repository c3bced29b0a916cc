import json
from pathlib import Path

import pytest

from biofm.errors import ConfigError
from biofm.splits import load_split, prepare_splits, read_case_list, split_groups
from conftest import REAL_VITAL, requires_realdata


def test_fasttrack_is_deterministic_disjoint_and_sized(tmp_path):
    a = json.loads(Path(prepare_splits("fasttrack", "bis", tmp_path / "a")).read_text())
    b = json.loads(Path(prepare_splits("fasttrack", "bis", tmp_path / "b")).read_text())
    c = json.loads(Path(prepare_splits("fasttrack", "bis", tmp_path / "c", seed=1)).read_text())
    assert a == b
    assert [len(a[k]) for k in ("train", "val", "test")] == [49, 10, 11]
    ids = a["train"] + a["val"] + a["test"]
    assert len(set(ids)) == 70 and all(isinstance(i, str) and i.isdigit() for i in ids)
    assert set(ids) <= set(read_case_list("bis")[0])
    assert set(c["train"]) != set(a["train"])
    assert a["meta"]["mode"] == "fasttrack" and a["meta"]["seed"] == 0 and a["meta"]["n_cases"] == 70


def test_full_mode_takes_every_case(tmp_path):
    ids, _ = read_case_list("bis")
    assert len(ids) > 1000
    d = json.loads(Path(prepare_splits("full", "bis", tmp_path, ratios=(0.8, 0.1, 0.1))).read_text())
    assert sorted(d["train"] + d["val"] + d["test"]) == sorted(ids)
    assert len(d["train"]) == round(0.8 * len(ids))


def test_case_list_file_and_bad_inputs(tmp_path):
    f = tmp_path / "cases.txt"
    f.write_text("# my cases\n12\n7  # a comment\n\n3\n")
    assert read_case_list(str(f))[0] == ["12", "7", "3"]
    with pytest.raises(ConfigError, match="neither a vitaldb case set"):
        read_case_list("no-such-set")
    with pytest.raises(ConfigError, match="sum"):
        split_groups(["1", "2"], (0.5, 0.5, 0.5))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no case ids"):
        prepare_splits("full", str(empty), tmp_path)
    one = tmp_path / "one.txt"
    one.write_text("7\n")   # one recording for three splits: refused, not two empty splits in silence
    with pytest.raises(ConfigError, match=r"holds 1 recording\(s\): with --ratios 0.7 0.15 0.15 the val and test "
                                          r"split\(s\) get none.*--ratios 1 0 0"):
        prepare_splits("full", str(one), tmp_path)
    assert json.loads(Path(prepare_splits("full", str(one), tmp_path, ratios=(1.0, 0.0, 0.0))).read_text())["train"] == ["7"]


@requires_realdata(REAL_VITAL)
def test_case_list_from_folder_of_vital_files():
    ids, described = read_case_list(str(REAL_VITAL))
    assert len(ids) == 6 and "MICUB08_240520_230000_first100s" in ids


def test_load_split_errors(tmp_path):
    path = prepare_splits("fasttrack", "bis", tmp_path)
    assert len(load_split(path, "val")) == 10
    with pytest.raises(ConfigError, match="has no split 'holdout' \\(it has train, val, test\\)"):
        load_split(path, "holdout")
    with pytest.raises(ConfigError, match="split file not found"):
        load_split(tmp_path / "missing.json", "train")


def test_stratified_split_spreads_positive_groups_by_ratio():
    groups = [f"s{i:02d}" for i in range(20)]
    rate = {g: 1.0 if i < 5 else 0.0 for i, g in enumerate(groups)}
    for seed in range(5):
        s = split_groups(groups, (0.6, 0.2, 0.2), seed=seed, positive_rate=rate)
        assert [len(s[k]) for k in ("train", "val", "test")] == [12, 4, 4]
        assert [sum(rate[g] for g in s[k]) for k in ("train", "val", "test")] == [3, 1, 1]
        assert sorted(s["train"] + s["val"] + s["test"]) == groups
    assert split_groups(groups, seed=1, positive_rate=rate) == split_groups(groups, seed=1, positive_rate=rate)
    assert split_groups(groups, seed=1, positive_rate=rate) != split_groups(groups, seed=2, positive_rate=rate)


def test_stratified_dealing_by_hand():
    """Ten groups with rising rates, sizes 5/3/2: dealt in rate order, each to the split furthest
    below its share so far (share = size * (k + 1) / n; a tie goes to the earlier split). Worked
    out by hand: train, val, test, train, train (tie), val, train, test, val, train."""
    groups = [f"s{i:02d}" for i in range(10)]
    rate = {g: i / 10 for i, g in enumerate(groups)}
    assert split_groups(groups, (0.5, 0.3, 0.2), seed=3, positive_rate=rate) == {
        "train": ["s00", "s03", "s04", "s06", "s09"], "val": ["s01", "s05", "s08"], "test": ["s02", "s07"]}


def test_split_sizes_order_and_checks():
    ids = [str(i) for i in range(1, 11)]
    s = split_groups(ids, (0.6, 0.3, 0.1))
    assert [len(s[k]) for k in ("train", "val", "test")] == [6, 3, 1]
    assert s == split_groups(ids, (0.6, 0.3, 0.1), seed=0)                      # seed 0 by default
    assert split_groups(["1", "2", "3"], (0.5, 0.5, 0.0)) == {"train": ["1", "3"], "val": ["2"], "test": []}
    mixed = split_groups(["b", "10", "a", "9", "2"], (1.0, 0.0, 0.0))["train"]
    assert mixed == ["2", "9", "10", "a", "b"]                                   # numbers by value, then names
    for bad in ((0.5, 0.5), (0.5, 0.6, -0.1), (0.5, 0.3, 0.3)):
        with pytest.raises(ConfigError, match="three non-negative numbers summing to 1"):
            split_groups(ids, bad)


def test_prepare_splits_file_and_meta(tmp_path):
    cases = tmp_path / "cases.txt"
    cases.write_text("\n".join(str(i) for i in range(1, 21)))
    path = prepare_splits("full", str(cases), tmp_path / "out", seed=4, ratios=(0.5, 0.25, 0.25))
    assert path == str(tmp_path / "out" / "splits_full.json")
    data = json.loads(Path(path).read_text())
    assert {k: data[k] for k in ("train", "val", "test")} == split_groups([str(i) for i in range(1, 21)],
                                                                          (0.5, 0.25, 0.25), seed=4)
    assert data["meta"] == {"mode": "full", "case_set": str(cases), "source": f"case list file {cases}", "seed": 4,
                            "ratios": [0.5, 0.25, 0.25], "n_cases": 20, "counts": {"train": 10, "val": 5, "test": 5}}
    assert load_split(path, "val") == data["val"] and all(isinstance(c, str) for c in load_split(path, "val"))
    with pytest.raises(ConfigError, match="has no split 'meta'"):
        load_split(path, "meta")
    with pytest.raises(ConfigError, match="--mode must be fasttrack or full"):
        prepare_splits("some", str(cases), tmp_path)


def test_case_list_from_a_physionet_layout(tmp_path):
    (tmp_path / "vital_files").mkdir()
    for name in ("0002.vital", "0010.vital"):
        (tmp_path / "vital_files" / name).write_bytes(b"")
    (tmp_path / "7.vital").write_bytes(b"")
    assert read_case_list(str(tmp_path)) == (["0002", "0010", "7"], f"folder {tmp_path}")


def test_kfold_deals_subjects_by_their_rate_with_seeded_ties():
    """kfold_groups orders subjects by rate before dealing them out: the two positive subjects of
    ten (p0 and p5, which id order would deal to the same fold of five) land in different folds;
    ties fall in an order fixed by the seed (0 by default), so two calls agree."""
    from biofm.splits import kfold_groups

    rates = {f"p{i}": float(i in (0, 5)) for i in range(10)}
    folds = kfold_groups(rates, 5)
    assert sorted(len(f) for f in folds) == [2] * 5 and sorted(sum(folds, [])) == sorted(rates)
    assert [f for f in folds if "p0" in f] != [f for f in folds if "p5" in f]
    assert folds == kfold_groups(rates, 5) == kfold_groups(rates, 5, seed=0)
    assert any(kfold_groups(rates, 5, seed=s) != folds for s in range(1, 6))
