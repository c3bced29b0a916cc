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
    assert all(type(v) is float for v in bm.metrics(kind, y, p).values())


def test_binary_metrics_where_one_side_is_empty():
    """Nothing predicted positive: F1 0, also where no window is positive (scikit-learn's
    zero_division=0), not NaN; the lowest score a positive's: AUPRC still scikit-learn's; one class
    only: AUROC and AUPRC undefined (NaN) for either class, where scikit-learn warns."""
    y, p = np.array([1, 1, 0, 1, 0]), np.array([0.05, 0.4, 0.2, 0.3, 0.45])
    m = bm.metrics("binary", y, p)
    assert m["f1"] == 0.0 == skm.f1_score(y, p >= 0.5, zero_division=0)
    assert m["auroc"] == skm.roc_auc_score(y, p) and m["auprc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert bm.metrics("binary", np.zeros(5, int), p)["f1"] == 0.0 == skm.f1_score(np.zeros(5), p >= 0.5, zero_division=0)
    for one in (np.zeros(5, int), np.ones(5, int)):
        m = bm.metrics("binary", one, p)
        assert np.isnan(m["auroc"]) and np.isnan(m["auprc"]), m


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
    prepare_task(TASKS["arrhythmia-af"], raw, task_dir, channels, windows, split_ratios=(1.0, 0.0, 0.0))
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
    ecg = np.stack([bandpass(heartbeat_signals(10.0, 125.0, hr_bpm=hr, seed=i)[1], 125.0, (0.5, 40.0))
                    for i, hr in enumerate((50.0, 120.0))])   # an ECG-only task's features: R peaks
    f = dict(zip(HANDCRAFTED, handcrafted_features(ecg, 125.0, (0.5, 40.0), kind="ecg").T))
    np.testing.assert_allclose(f["hr_bpm"], [50.0, 120.0], rtol=0.05)


def test_handcrafted_beat_intervals_in_ms_and_the_shape_of_each_window():
    """Pulses 0.8 and 1.0 s apart by turns: interval SD 100 ms, RMSSD 200 ms, range 200 ms, to the
    sample (8 ms at 125 Hz); skewness and kurtosis are scipy's of each window in its own column."""
    from scipy import stats

    from biofm.signals import HANDCRAFTED, bandpass, handcrafted_features

    fs, t = 125.0, np.arange(1250) / 125.0
    onsets = np.cumsum(np.tile([0.8, 1.0], 6))[:11] - 0.5
    beat = lambda t0: np.exp(-((t - t0 - 0.15) / 0.06) ** 2) + 0.4 * np.exp(-((t - t0 - 0.4) / 0.08) ** 2)
    windows = np.stack([bandpass(sum(beat(b) for b in onsets), fs, (0.5, 10.0)),
                        bandpass(sum(beat(b) for b in np.arange(0.2, 10, 0.75)), fs, (0.5, 10.0))])
    f = dict(zip(HANDCRAFTED, handcrafted_features(windows, fs).T))
    np.testing.assert_allclose([f["ibi_sd_ms"][0], f["rmssd_ms"][0], f["ibi_range_ms"][0]], [100.0, 200.0, 200.0], atol=8.0)
    np.testing.assert_allclose([f["ibi_sd_ms"][1], f["rmssd_ms"][1], f["ibi_range_ms"][1]], 0.0, atol=8.0)
    np.testing.assert_allclose(f["skewness"], stats.skew(windows, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(f["kurtosis"], stats.kurtosis(windows, axis=-1), rtol=1e-12)
    assert abs(f["skewness"][0] - f["skewness"][1]) > 0.01 and abs(f["kurtosis"][0] - f["kurtosis"][1]) > 0.01


def test_a_metric_undefined_on_a_fold_is_said_so_not_printed_as_zero(monkeypatch, tmp_path):
    """The rare class in one subject of five: its fold's probes never saw it; every figure is
    undefined, with the reason, in the JSON, the table and the forest plot (not 0.000)."""
    task = TASKS["arrhythmia-af"]
    subjects = np.repeat([f"p{i}" for i in range(5)], 4)
    y = np.where(subjects == "p2", 1, 0)
    fold = np.repeat(np.arange(5), 4)
    why = bm.undefined(task, y, fold, subjects)
    assert why.startswith("fold 3: no AF window in its training folds (only 1 subject(s) have AF: p2)")
    assert "the protocol needs at least 2 subjects per class (5 for every fold to test one)" in why
    assert bm.undefined(task, np.where(np.isin(subjects, ["p1", "p2"]), 1, 0), fold, subjects) == ""
    assert bm.undefined(task, np.zeros(20, int), fold, subjects) == "no tested window of AF"
    assert bm.undefined(TASKS["butppg-hr"], y, fold, subjects) == ""
    cell = {"value": None, "ci95": [None, None], "undefined": why}
    report = {"fixed_split": False, "resamples": 10, "seed": 0, "tasks": {"arrhythmia-af": {
        "kind": "binary", "windows": 20, "subjects": 5, "folds": 5, "headline": "auroc", "undefined": why, "unit": "",
        "rows": {"a": {m: cell for m in bm.METRICS["binary"]}},
        "differences": {"a - random weights": {"metric": "auroc", **cell}}}}}
    text = bm.markdown(report)
    assert "| a | undefined | undefined | undefined | undefined |" in text and f"Every figure is undefined: {why}." in text
    assert "0.000" not in text and "- a - random weights: undefined" in text
    ax = forest_axes(report, monkeypatch, tmp_path)
    assert [t.get_text() for t in ax.texts] == ["undefined (see benchmark.md)"] and not ax.lines[1:]


def forest_axes(report: dict, monkeypatch, tmp_path):
    """The axes of the AUROC forest plot of ``report``, caught before it is saved."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    bm.forest_plot(report, "auroc", str(tmp_path / "f.png"))
    return figures[0].axes[0]


def test_forest_plot_colours_follow_the_row_and_auroc_has_its_chance_line(monkeypatch, tmp_path):
    cell = lambda v: {"value": v, "ci95": [v - 0.1, v + 0.1]}
    rows = {"pretrained": {"auroc": cell(0.7)}, "random weights": {"auroc": cell(0.6)}}
    report = {"tasks": {t: {"headline": "auroc", "rows": rows} for t in ("af", "quality")}}
    ax = forest_axes(report, monkeypatch, tmp_path)
    points = [c for c in ax.containers]
    colours = [tuple(c.lines[0].get_color()) if not isinstance(c.lines[0].get_color(), str) else c.lines[0].get_color()
               for c in points]
    assert colours[0] == colours[2] and colours[1] == colours[3] and colours[0] != colours[1]   # same row, same colour
    assert [l.get_xdata()[0] for l in ax.lines if l.get_linestyle() == "--"] == [0.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance (0.5)"]


def test_published_measures_beside_the_benchmarks_own():
    """TROIKA: the mean over recordings of each recording's MAE, as TROIKA (2.34) and JOSS (1.28)
    report it on these 12, shown as published, not re-run; CinC 2017: the mean F1 of N, A and O
    over records, each record's class the most probable of its windows' mean."""
    task = TASKS["troika-hr"]
    data = {"case_id": np.array(["r1"] * 3 + ["r2"] * 1), "subject_id": np.array(["s1"] * 3 + ["s2"]),
            "y": np.array([100.0, 110, 120, 150])}
    pred = np.array([101.0, 112, 123, 140])
    tested = np.arange(4)
    out = bm.protocol(task, data, pred, tested, bm.subject_draws(data["subject_id"], 50, 0))
    assert out["measure"] == "mae_mean_of_recordings" and out["value"] == pytest.approx((2 + 10) / 2)
    assert out["per_recording"] == {"r1": 2.0, "r2": 10.0} and out["unit"] == "bpm"
    cinc = TASKS["cinc2017-rhythm"]
    data = {"case_id": np.array(["a", "a", "b", "c", "d"]), "subject_id": np.array(["a", "a", "b", "c", "d"]),
            "y": np.array([0, 0, 1, 2, 3])}
    p = np.eye(4)[[0, 1, 1, 2, 0]] * 0.9 + 0.025          # a: windows N and A, mean N (0.9 + 0.025 ...)
    p[1] = [0.4, 0.5, 0.05, 0.05]
    out = bm.protocol(cinc, data, p, np.arange(5), bm.subject_draws(data["subject_id"], 20, 0))
    assert out["measure"] == "challenge_f1_NAO" and out["records"] == 4
    # A and O right (F1 1); the noisy record called N is a false N: F1(N) = 2 x 1 / (2 + 1)
    assert out["value"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert bm.protocol(TASKS["arrhythmia-af"], data, p, np.arange(5), None) is None
    assert [r["value"] for r in bm.REFERENCES["troika-hr"]] == [2.34, 1.28]
    report = {"fixed_split": False, "resamples": 50, "seed": 0, "tasks": {"troika-hr": {
        "kind": "regression", "windows": 4, "subjects": 2, "folds": 2, "headline": "mae", "unit": "bpm", "undefined": "",
        "references": bm.REFERENCES["troika-hr"], "differences": {},
        "rows": {"pretrained": {**{m: {"value": 1.0, "ci95": [0.5, 1.5]} for m in bm.METRICS["regression"]},
                                "protocol": {**out, "measure": "mae_mean_of_recordings", "value": 6.0, "ci95": [2.0, 10.0]}}}},
        "capnobase-rr": {"kind": "regression", "windows": 4, "subjects": 2, "folds": 2, "headline": "mae", "unit": "breaths/min",
                         "undefined": "", "differences": {},
                         "rows": {"pretrained": {m: {"value": 1.0, "ci95": [0.5, 1.5]} for m in bm.METRICS["regression"]}}}}}
    text = bm.markdown(report)
    assert "| row | mae, bpm | rmse, bpm | pearson_r |" in text
    assert "| pretrained | 6.000 [2.000, 10.000] |" in text
    assert "| TROIKA (Zhang, Pi and Liu, IEEE TBME 62(2), 2015) | 2.34 (published, not re-run) |" in text
    assert "| JOSS (Zhang, IEEE TBME 62(8), 2015) | 1.28 (published, not re-run) |" in text
    assert text.count("No published figure on this data and protocol is verified here") == 1   # CapnoBase's
