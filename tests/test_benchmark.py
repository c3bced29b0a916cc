"""The benchmark: metrics and bootstrap against direct computations, probes that never see the test
fold, subject-disjoint folds, and a run end to end on a small real task with two encoders."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm

from biofm import benchmark as bm
from biofm.config import ChannelsConfig, WindowsConfig, load_config
from biofm.errors import ConfigError
from biofm.tasks import TASKS, prepare_task
from conftest import REALDATA, ROOT, requires_realdata, write_pretrained

REAL_ARRHYTHMIA = REALDATA / "ppg_arrhythmia"


def sklearn_metrics(kind, y, p):
    if kind == "binary":
        return {"auroc": skm.roc_auc_score(y, p), "auprc": skm.average_precision_score(y, p),
                "f1": skm.f1_score(y, p >= 0.5), "balanced_accuracy": skm.balanced_accuracy_score(y, p >= 0.5)}
    if kind == "multiclass":
        k = p.shape[1]
        return {"macro_f1": skm.f1_score(y, p.argmax(1), average="macro", labels=range(k), zero_division=0),
                "balanced_accuracy": skm.balanced_accuracy_score(y, p.argmax(1)),
                "micro_auroc": skm.roc_auc_score(np.eye(k)[y].ravel(), p.ravel())}
    return {"mae": skm.mean_absolute_error(y, p), "rmse": np.sqrt(skm.mean_squared_error(y, p)),
            "pearson_r": np.corrcoef(y, p)[0, 1]}


def fixed_inputs(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y2 = rng.integers(0, 2, n)
    yk = rng.integers(0, 6, n)
    yr = rng.normal(70, 10, n)
    return {"binary": (y2, np.round(np.clip(0.3 * y2 + 0.7 * rng.random(n), 0, 1), 2)),  # ties on purpose
            "multiclass": (yk, rng.dirichlet(np.ones(6), n)),
            "regression": (yr, yr + rng.normal(0, 6, n))}, rng.integers(0, 25, n).astype(str)


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_metrics_are_scikit_learns(kind):
    y, p = fixed_inputs()[0][kind]
    assert bm.metrics(kind, y, p) == pytest.approx(sklearn_metrics(kind, y, p), abs=1e-12)
    undefined = {"binary": "auroc", "multiclass": "balanced_accuracy", "regression": "pearson_r"}[kind]
    assert np.isnan(bm.metrics(kind, np.zeros_like(y), p)[undefined])  # one class, or a constant target


@pytest.mark.parametrize("kind", ["binary", "multiclass", "regression"])
def test_the_bootstrap_interval_is_the_direct_computation(kind):
    """1,000 subject resamples, each computed as its concatenated windows with scikit-learn."""
    inputs, subjects = fixed_inputs(1)
    y, p = inputs[kind]
    draws = bm.subject_draws(subjects, 1000, seed=7)
    boot = bm.bootstrap(kind, y, p, draws)
    ids, inverse = np.unique(subjects, return_inverse=True)
    rng = np.random.default_rng(7)
    direct = {m: [] for m in bm.METRICS[kind]}
    for picks in rng.integers(0, len(ids), (1000, len(ids))):
        rows = np.concatenate([np.flatnonzero(inverse == i) for i in picks])
        for m, v in sklearn_metrics(kind, y[rows], p[rows]).items():
            direct[m].append(v)
    for m in bm.METRICS[kind]:
        np.testing.assert_allclose(boot[m], direct[m], atol=1e-9)
        assert bm.interval(boot[m])["ci95"] == pytest.approx(np.percentile(direct[m], [2.5, 97.5]).tolist(), abs=1e-9)
    first = np.unique(inverse, return_index=True)[1]  # a subject's windows share its count: one per subject drawn
    assert (draws[:, first].sum(axis=1) == len(ids)).all() and (draws == draws[:, first][:, inverse]).all()


def test_the_probe_never_sees_the_test_fold(monkeypatch):
    """Every fit, the inner CV's included, gets training rows only; the regularisation chosen
    does not move when the test fold's labels and features change."""
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(0)
    n = 300
    subjects = np.repeat([f"s{i}" for i in range(10)], 30)
    y = rng.integers(0, 2, n)
    x = np.column_stack([np.arange(n), y + rng.normal(0, 1.0, n), rng.normal(size=(n, 3))])
    train, test = np.flatnonzero(~np.isin(subjects, ["s0", "s1"])), np.flatnonzero(np.isin(subjects, ["s0", "s1"]))
    seen = []
    fit = Pipeline.fit
    monkeypatch.setattr(Pipeline, "fit", lambda self, X, y=None, **kw: (seen.append(X[:, 0].astype(int)), fit(self, X, y))[1])
    pred, chosen = bm._probe_fold("binary", x, y, subjects, train, test, 2, seed=0)
    rows = np.concatenate(seen)
    assert len(seen) >= 3 * len(bm.C_GRID) and not np.isin(rows, test).any()
    poisoned_x, poisoned_y = x.copy(), y.copy()
    poisoned_x[test, 1:] = rng.normal(0, 100, (len(test), 4))
    poisoned_y[test] = 1 - y[test]
    _, again = bm._probe_fold("binary", poisoned_x, poisoned_y, subjects, train, test, 2, seed=0)
    assert again == chosen and chosen in bm.C_GRID and pred.shape == (len(test),) and ((pred >= 0) & (pred <= 1)).all()


def test_folds_are_subject_disjoint_and_stratified():
    task = TASKS["arrhythmia-af"]
    subjects = np.repeat([f"p{i}" for i in range(10)], 20)
    y = np.concatenate([np.full(20, int(i < 5)) for i in range(10)])  # five AF patients, five without
    fold = bm._folds(task, {"subject_id": subjects, "y": y}, 5, 0, fixed=False)
    for s in np.unique(subjects):
        assert len(set(fold[subjects == s])) == 1
    assert sorted(np.bincount(fold).tolist()) == [40] * 5
    assert [int(y[fold == f].max()) for f in range(5)] == [1] * 5  # an AF patient in every fold
    fixed = bm._folds(task, {"subject_id": subjects, "y": y, "split": np.where(subjects == "p0", "test", "train")}, 5, 0, True)
    assert fixed.tolist() == [0] * 20 + [-1] * 180


@requires_realdata(REAL_ARRHYTHMIA)
def test_benchmark_end_to_end_on_a_real_task_with_two_encoders(ray_session, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in sorted(REAL_ARRHYTHMIA.glob("MPA_*.mat"))[:4]:
        (raw / f.name).symlink_to(f)
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG"])
    windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    task_dir = tmp_path / "af"
    prepare_task(TASKS["arrhythmia-af"], raw, task_dir, channels, windows)
    a, b = write_pretrained(tmp_path / "a.pt"), write_pretrained(tmp_path / "b.pt")  # PPG + ECG: ECG is absent here
    out = tmp_path / "bench"
    report = bm.benchmark([f"a={a}", f"b={b}"], [str(task_dir)], str(out), folds=4, resamples=200)
    t = report["tasks"]["arrhythmia-af"]
    assert list(t["rows"]) == ["a", "b", bm.RANDOM, bm.HANDCRAFTED, bm.TRIVIAL] and t["subjects"] == 4 and t["folds"] == 4
    assert set(t["differences"]) == {"a - b", f"a - {bm.RANDOM}", f"a - {bm.HANDCRAFTED}", f"b - {bm.RANDOM}",
                                     f"b - {bm.HANDCRAFTED}"}
    pred = pq.read_table(out / "predictions" / "arrhythmia-af.parquet").to_pandas()
    assert len(pred) == t["windows"] and pred.groupby("subject_id")["fold"].nunique().max() == 1
    # every figure is what the out-of-fold predictions give, and the paired CI is the draws' difference
    draws = bm.subject_draws(pred["subject_id"].to_numpy(), 200, 0)
    y = pred["label"].to_numpy()
    boot = {r: bm.bootstrap("binary", y, pred[r].to_numpy(), draws)["auroc"] for r in ("a", "b")}
    for r in t["rows"]:
        assert t["rows"][r]["auroc"]["value"] == pytest.approx(skm.roc_auc_score(y, pred[r]), abs=1e-9)
    assert t["differences"]["a - b"]["ci95"] == pytest.approx(bm.interval(boot["a"] - boot["b"])["ci95"])
    assert t["rows"][bm.TRIVIAL]["balanced_accuracy"]["value"] == 0.5
    embedded = json.loads((out / "embeddings" / "arrhythmia-af" / "a" / "manifest.json").read_text())
    assert embedded["channels_absent"] == ["ECG"] and embedded["embeddings"] == t["windows"]
    md = (out / "benchmark.md").read_text()
    assert all(f"| {r} |" in md for r in t["rows"]) and "a - b:" in md
    assert (out / "forest_auroc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "benchmark.json").read_text())["tasks"]["arrhythmia-af"]["rows"]["a"]["auroc"]["value"] == \
        t["rows"]["a"]["auroc"]["value"]
    with pytest.raises(ConfigError, match="already holds a benchmark"):
        bm.benchmark([a], [str(task_dir)], str(out))
    # an encoder made for other data is refused, the difference named
    from biofm.train import checkpoint

    blob = checkpoint.load(a)
    blob["description"]["data_spec"]["filters"]["PPG"]["band_hz"] = [0.7, 8.0]
    other = checkpoint.save(tmp_path / "other.pt", blob["model"], blob["description"])
    with pytest.raises(ConfigError, match=r"task arrhythmia-af .* vs the encoder other: PPG filter .* differs"):
        bm.benchmark([other], [str(task_dir)], str(tmp_path / "bench2"))


def test_encoder_rows_are_named_by_flag_or_folder_and_a_name_twice_is_refused():
    assert bm._encoder_row("a=/x/y.pt", set()) == ("a", "/x/y.pt")
    assert bm._encoder_row("/r/foundation_model/best_model.pt", {"foundation_model"}) == \
        ("foundation_model_2", "/r/foundation_model/best_model.pt")
    assert bm._encoder_row("/tmp/enc.pt", set()) == ("enc", "/tmp/enc.pt")
    with pytest.raises(ConfigError, match="the name 'a' is given twice"):
        bm._encoder_row("a=/z.pt", {"a"})


def test_handcrafted_features_of_a_pulse_at_a_known_rate():
    """Beat rate and regularity, template match and band shares of band-passed PPG at 125 Hz."""
    from biofm.signals import HANDCRAFTED, bandpass, handcrafted_features
    from conftest import heartbeat_signals

    windows = np.stack([bandpass(heartbeat_signals(10.0, 125.0, hr_bpm=hr, seed=i)[0], 125.0, (0.5, 10.0))
                        for i, hr in enumerate((60.0, 90.0))])
    f = dict(zip(HANDCRAFTED, handcrafted_features(windows, 125.0).T))
    np.testing.assert_allclose(f["hr_bpm"], [60.0, 90.0], rtol=0.05)
    assert (f["beats"] >= [9, 14]).all() and (f["ibi_sd_ms"] < 60).all() and (f["template_match"] > 0.9).all()
    # 60 bpm puts harmonics on the band edges (1, 2, 4 Hz): each counted once, the shares sum to 1
    np.testing.assert_allclose(f["power_0.5-1_hz"] + f["power_1-2_hz"] + f["power_2-4_hz"] + f["power_4-8_hz"], 1, atol=0.05)
    noise = handcrafted_features(bandpass(np.random.default_rng(0).standard_normal((1, 1250)), 125.0, (0.5, 10.0)), 125.0)
    assert noise[0, HANDCRAFTED.index("template_match")] < 0.8  # 0.70 for this noise: no beat repeats
