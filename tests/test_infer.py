"""Applying the models: embeddings of windows splits on Ray Data, from a pretraining checkpoint
or a fine-tuned classifier, on the real recordings; refusals for data the model was not built for."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from biofm.cli import main
from biofm.config import ChannelsConfig, FinetuneConfig, WindowsConfig, load_config
from biofm.errors import BiofmError, ConfigError, NothingProduced
from biofm.infer import embed, load_encoder
from biofm.preprocess import build_windows
from biofm.sources.vitaldb import DirectorySource
from biofm.train import checkpoint
from conftest import REAL_BUTPPG, REAL_VITAL, REALDATA, ROOT, requires_realdata, write_pretrained


@pytest.fixture(scope="module")
def vital_windows(ray_session, tmp_path_factory):
    """Windows of the six real recordings, one split."""
    if not REAL_VITAL.is_dir():
        pytest.skip(f"real data folder {REAL_VITAL} is absent")
    out = tmp_path_factory.mktemp("windows")
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    cases = sorted(p.stem for p in REAL_VITAL.glob("*.vital"))
    m = build_windows(cases, DirectorySource(str(REAL_VITAL)), channels,
                      load_config(WindowsConfig, ROOT / "configs/windows.yaml"), out, "val")
    return out / "val", m["windows_kept"]


def _sorted(folder) -> dict:
    table = pq.read_table(folder).sort_by([("case_id" if "case_id" in pq.read_schema(
        next(folder.glob("*.parquet"))).names else "record_id", "ascending"), ("window_idx", "ascending")])
    return {c: table.column(c).to_pylist() for c in table.column_names}


def test_embeddings_of_real_windows_count_finite_and_deterministic(vital_windows, tmp_path):
    split, n = vital_windows
    ckpt = write_pretrained(tmp_path / "fm.pt")
    m = embed(ckpt, split, tmp_path / "a", batch_size=32, tokens=True)
    assert m["windows_in"] == m["embeddings"] == n > 20 and m["embedding_dim"] == 192 and m["id_column"] == "case_id"
    assert len(m["checkpoint_sha256"]) == 64 and m["data_spec"]["sample_rate_hz"] == 125
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == m
    a = _sorted(tmp_path / "a" / "embeddings")
    emb = np.array(a["embedding"], dtype=np.float32)
    assert emb.shape == (n, 192) and np.isfinite(emb).all() and emb.std(axis=0).mean() > 0
    assert np.array(a["tokens"]).shape == (n, 10, 192)
    source = pq.read_table(split).sort_by([("case_id", "ascending"), ("window_idx", "ascending")])
    assert a["case_id"] == source.column("case_id").to_pylist() and a["start_s"] == source.column("start_s").to_pylist()
    # the encoder and pooling as loaded in this process give the same numbers
    encoder, _ = load_encoder(ckpt)
    x = torch.from_numpy(source.column("signal").combine_chunks().to_numpy_ndarray()[:4].copy())
    with torch.no_grad():
        expected = encoder(x).mean(dim=2).mean(dim=1).numpy()
    np.testing.assert_allclose(emb[:4], expected, atol=1e-5)
    assert main(["embed", "--checkpoint", ckpt, "--data-dir", str(split), "--output", str(tmp_path / "b"),
                 "--concurrency", "1"]) == 0
    b = _sorted(tmp_path / "b" / "embeddings")
    np.testing.assert_array_equal(np.array(b["embedding"], dtype=np.float32), emb)  # same checkpoint, same numbers
    assert "tokens" not in b
    with pytest.raises(BiofmError, match="already holds embeddings"):
        embed(ckpt, split, tmp_path / "b")
    bf16 = embed(ckpt, split, tmp_path / "c", batch_size=32, bf16=True)  # the actors' encoder in bf16 autocast
    assert (bf16["bf16"], bf16["compile"], m["bf16"]) == (True, None, False)
    c = np.array(_sorted(tmp_path / "c" / "embeddings")["embedding"], dtype=np.float32)
    assert c.shape == emb.shape and not np.array_equal(c, emb) and np.abs(c - emb).max() < 0.1 * emb.std()


@requires_realdata(REAL_BUTPPG)
def test_a_fine_tuned_classifier_embeds_but_ppg_with_its_present_mask(butppg_data, tmp_path, capsys):
    from biofm.model.classifier import pool
    from biofm.dataset import read_data_spec
    from biofm.train.finetune import build_classifier, read_split

    spec = read_data_spec(butppg_data / "train")
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "fm.pt"), spec)
    ckpt = checkpoint.save(tmp_path / "clf.pt", model.state_dict(), {**desc, "threshold": 0.5})
    m = embed(ckpt, butppg_data / "test", tmp_path / "out")
    test = read_split(butppg_data / "test")
    assert m["embeddings"] == len(test["label"]) and m["id_column"] == "case_id" and m["channels"][0] == "ACC_X"
    got = _sorted(tmp_path / "out" / "embeddings")
    order = np.argsort(test["case_id"])
    with torch.no_grad():
        expected = pool(model.eval().encoder(torch.from_numpy(test["signal"][order])),
                        torch.from_numpy(test["present"][order])).numpy()
    np.testing.assert_allclose(np.array(got["embedding"], dtype=np.float32), expected, atol=1e-5)
    assert set(got["window_idx"]) == {0}
    assert "left out" not in capsys.readouterr().out
    # the pretrained PPG + ECG encoder on the five channels: ACC added by inflation, as fine-tuning adds
    # it (the one rule of channels), its own channels' latents unchanged; a fine-tuned model reads its own only
    m = embed(str(tmp_path / "fm.pt"), butppg_data / "test", tmp_path / "fm_out")
    assert m["channels"] == ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"] and m["channels_added"] == ["ACC_X", "ACC_Y", "ACC_Z"]
    assert m["channels_left_out"] == [] and "[embed] the encoder has no ACC_X, ACC_Y, ACC_Z: added" in capsys.readouterr().out
    got = _sorted(tmp_path / "fm_out" / "embeddings")
    encoder, _ = load_encoder(str(tmp_path / "fm.pt"))
    with torch.no_grad():
        two = pool(encoder(torch.from_numpy(test["signal"][order][:, 3:])), torch.from_numpy(test["present"][order][:, 3:]))
    np.testing.assert_allclose(np.array(got["embedding"], dtype=np.float32), two.numpy(), atol=1e-5)  # ACC absent here


def test_data_the_model_was_not_built_for_is_refused(vital_windows, tmp_path):
    split, _ = vital_windows
    ckpt = write_pretrained(tmp_path / "fm.pt")
    blob = checkpoint.load(ckpt)
    spec = blob["description"]["data_spec"]
    other = {**spec, "filters": {**spec["filters"], "PPG": {**spec["filters"]["PPG"], "band_hz": [0.5, 8.0]}}}
    checkpoint.save(tmp_path / "other.pt", blob["model"], {**blob["description"], "data_spec": other})
    with pytest.raises(ConfigError, match=r"PPG filter .*0\.5, 10\.0.* differs from the model's .*0\.5, 8\.0"):
        embed(str(tmp_path / "other.pt"), split, tmp_path / "x")
    acc = {**blob["description"], "channels": ["ACC_X", "ACC_Y"]}  # a channel the data lacks is marked absent; all, refused
    checkpoint.save(tmp_path / "acc.pt", blob["model"], acc)
    with pytest.raises(ConfigError, match=r"has channels \['PPG', 'ECG'\]; the model .* reads \['ACC_X', 'ACC_Y'\]: none of them"):
        embed(str(tmp_path / "acc.pt"), split, tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NothingProduced, match="no windows in"):
        embed(ckpt, tmp_path / "empty", tmp_path / "x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BiofmError, match="is not a biofm checkpoint"):
        embed(str(tmp_path / "junk.pt"), split, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, butppg_data):
    from biofm.dataset import read_data_spec
    from biofm.train.finetune import build_classifier

    folder = tmp_path_factory.mktemp("clf")
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(folder / "fm.pt"),
                                   read_data_spec(butppg_data / "train"))
    return checkpoint.save(folder / "clf.pt", model.state_dict(), {**desc, "threshold": 0.5}), model


@requires_realdata(REAL_BUTPPG)
def test_predict_every_record_of_a_but_ppg_folder(classifier, butppg_data, tmp_path):
    from biofm.infer import predict
    from biofm.train.finetune import predict as predict_in_memory, read_split

    ckpt, model = classifier
    m = predict(ckpt, str(REAL_BUTPPG), tmp_path / "out", plots=2)
    assert (m["recordings_in"], m["recordings_ok"], m["windows"], m["input_kind"]) == (51, 51, 51, "butppg")
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    assert sorted(table["recording_id"]) == sorted(p.name for p in REAL_BUTPPG.iterdir() if p.is_dir())
    assert ((table["probability"] >= 0.5).astype(int) == table["label"]).all()
    # the same numbers as the model on the prepared rows: the same preprocessing as training
    test = read_split(butppg_data / "test")
    expected = dict(zip(test["case_id"], predict_in_memory(model, test["signal"], test["present"])))
    got = dict(zip(table["recording_id"], table["probability"]))
    np.testing.assert_allclose([got[r] for r in expected], list(expected.values()), atol=1e-5)
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 52 and summary[0].startswith("recording_id,status,windows,share_predicted_good")
    assert len(m["timelines"]) == 2 and (tmp_path / "out" / f"timeline_{m['timelines'][0]}.png").stat().st_size > 10_000


@requires_realdata(REAL_BUTPPG)
def test_predict_on_vital_files_skips_a_corrupt_one_and_refuses_bad_inputs(classifier, tmp_path):
    from biofm.infer import predict

    ckpt, _ = classifier
    folder = tmp_path / "vital"
    folder.mkdir()
    for p in sorted(REAL_VITAL.glob("*.vital"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.vital").write_bytes(b"\x1f\x8b not really gzip")
    assert main(["predict", "--model", ckpt, "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--plots", "1"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (m["recordings_in"], m["recordings_ok"], m["input_kind"]) == (3, 2, "vital")
    assert m["skipped"]["broken"].startswith("corrupt_file") and m["windows"] > 10
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    assert set(table["recording_id"]) == {p.stem for p in folder.glob("MIC*.vital")}
    assert {"ppg_beats", "ecg_hr_bpm", "ppg_nan_fraction"} <= set(table.columns) and table["window_idx"].min() >= 0
    with pytest.raises(BiofmError, match="is not a fine-tuned classifier .* embeddings of a pretrained model"):
        predict(write_pretrained(tmp_path / "fm.pt"), str(folder), tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiofmError, match="no recordings in .*empty"):
        predict(ckpt, str(tmp_path / "empty"), tmp_path / "x")


@requires_realdata(REAL_BUTPPG)
def test_predict_on_a_physionet_wfdb_folder(classifier, tmp_path):
    import wfdb

    from biofm.infer import predict
    from conftest import heartbeat_signals

    ckpt, _ = classifier
    folder = tmp_path / "wfdb"
    folder.mkdir()
    ppg, ecg = heartbeat_signals(60.0, 125.0, seed=3)
    wfdb.wrsamp("rec1", fs=125, units=["NU", "mV"], sig_name=["PLETH", "II"], p_signal=np.stack([ppg, ecg], 1),
                fmt=["16", "16"], adc_gain=[1000.0, 1000.0], baseline=[0, 0], write_dir=str(folder))
    wfdb.wrsamp("rec2", fs=125, units=["NU"], sig_name=["RESP"], p_signal=ppg[:, None], fmt=["16"],
                adc_gain=[1000.0], baseline=[0], write_dir=str(folder))
    m = predict(ckpt, str(folder), tmp_path / "out", plots=1)
    assert (m["input_kind"], m["recordings_in"], m["recordings_ok"], m["windows"]) == ("wfdb", 2, 1, 6)
    assert m["skipped"] == {"rec2": "no_matching_channel: no PPG signal among RESP (channels.yaml: tracks and aliases)"}
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    assert list(table["window_idx"]) == list(range(6)) and list(table["start_s"]) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert (table["ppg_beats"] >= 10).all() and m["timelines"] == ["rec1"]
    mimic = REALDATA / "mimic3_wdb" / "p000878"
    if mimic.is_dir():  # a real multi-segment record with 34 of its 36 segments absent: its two PPG windows are rated
        m = predict(ckpt, str(mimic), tmp_path / "mimic", plots=1)
        assert (m["input_kind"], m["recordings_in"], m["windows"]) == ("wfdb", 1, 2)
        table = pq.read_table(tmp_path / "mimic" / "predictions.parquet").to_pandas()
        assert list(table["start_s"]) == [30.0, 46.0] and (tmp_path / "mimic" / "timeline_p000878-2137-10-26-16-57.png").is_file()


def test_predict_with_an_ecg_only_model_needs_ecg_not_ppg(ray_session, tmp_path):
    """A CinC 2017 rhythm model (ECG; the encoder's PPG absent) rates an ECG-only record and skips
    a PPG-only one for its missing ECG; the answers and the timeline are the task's and the ECG's."""
    import wfdb

    from biofm.dataset import data_spec
    from biofm.infer import anchor_channel, predict
    from biofm.tasks import TASKS
    from biofm.train.finetune import build_classifier
    from conftest import heartbeat_signals

    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
    windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    task = dataclasses.asdict(TASKS["cinc2017-rhythm"])
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "fm.pt"),
                                   data_spec(channels.select(["ECG"]), windows), task)
    assert desc["channels"] == ["ECG", "PPG"] and desc["absent"] == ["PPG"] and anchor_channel(desc) == "ECG"
    ckpt = checkpoint.save(tmp_path / "clf.pt", model.state_dict(), desc)
    folder = tmp_path / "wfdb"
    folder.mkdir()
    ppg, ecg = heartbeat_signals(30.0, 125.0, seed=4)
    for name, sig, unit, x in (("ecg_only", "II", "mV", ecg), ("ppg_only", "PLETH", "NU", ppg)):
        wfdb.wrsamp(name, fs=125, units=[unit], sig_name=[sig], p_signal=x[:, None], fmt=["16"], adc_gain=[1000.0],
                    baseline=[0], write_dir=str(folder))
    m = predict(ckpt, str(folder), tmp_path / "out", plots=1)
    assert (m["recordings_ok"], m["windows"], m["timelines"]) == (1, 3, ["ecg_only"])
    assert m["skipped"]["ppg_only"].startswith("no_matching_channel: no ECG signal among PLETH")
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    assert set(table["class"]) <= set(task["classes"]) and {"p_normal", "p_af", "p_other", "p_noisy"} <= set(table.columns)


@requires_realdata(REAL_BUTPPG)
def test_predict_on_an_edf_folder_with_nsrr_names_and_a_ppg_only_record(classifier, tmp_path):
    """NSRR's labels (Pleth, EKG) map to the model's PPG and ECG; a record with PPG only is rated
    with ECG absent (present = false), one with neither is skipped with the names it holds."""
    from conftest import heartbeat_signals
    from test_sources_formats import write_edf

    from biofm.infer import predict

    ckpt, _ = classifier
    folder = tmp_path / "edf"
    folder.mkdir()
    ppg, ecg = heartbeat_signals(40.0, 256.0, seed=5)
    write_edf(folder / "both.edf", {"Pleth": (ppg, 256.0), "EKG": (ecg, 256.0), "Thor": (ecg[::8], 32.0)})
    write_edf(folder / "ppg.edf", {"Pleth": (ppg, 256.0)})
    write_edf(folder / "eeg.edf", {"C3-A2": (ecg, 256.0)})
    m = predict(ckpt, str(folder), tmp_path / "out", plots=0)
    assert (m["input_kind"], m["recordings_in"], m["recordings_ok"], m["windows"]) == ("edf", 3, 2, 8)
    assert m["skipped"] == {"eeg": "no_matching_channel: no PPG signal among C3-A2 (channels.yaml: tracks and aliases)"}
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    by = {r: table[table.recording_id == r] for r in ("both", "ppg")}
    assert len(by["both"]) == len(by["ppg"]) == 4 and by["both"]["ppg_beats"].between(11, 13).all()  # 72 bpm
    assert by["both"]["ecg_beats"].notna().all() and by["ppg"]["ecg_beats"].isna().all()  # ECG absent: not checked


def test_bench_inference_steady_rate_leaves_out_warm_up_and_its_own_measuring(monkeypatch):
    """The embedding benchmark's steady rate: each model's first 8 batches and the seconds the
    benchmark spent reading memory are left out, for the plain loop and the actors alike."""
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import bench_inference as bench

    cold = [(i * 0.5, i * 0.5 + 0.5, 100) for i in range(8)]  # 8 batches at 200 windows/s
    warm = [(4.0 + i * 0.1, 4.0 + i * 0.1 + 0.1, 100) for i in range(20)]  # 20 at 1,000 windows/s
    assert bench.steady_rate([cold + warm]) == pytest.approx(1000.0)
    assert bench.steady_rate([warm[::-1] + cold]) == pytest.approx(1000.0)  # order of the records does not matter
    assert bench.steady_rate([cold + warm], measuring=1.0) == pytest.approx(2000.0)
    # two actors over the same 2 s: their warm windows over that span
    assert bench.steady_rate([cold + warm, cold + warm]) == pytest.approx(2000.0)
    # a model with fewer than 16 batches keeps its second half
    assert bench.warm(warm[:6]) == warm[3:6]


def test_predict_uses_the_models_own_preprocessing_and_threshold(butppg_data, tmp_path):
    """A model trained on other settings than the shipped configs (PPG band 0.7-8 Hz, the third
    colour signal of BUT-PPG's _PPG files) is applied with its own settings, and labels windows
    at its own threshold, not at 0.5."""
    import dataclasses

    import wfdb

    from biofm.infer import predict
    from biofm.dataset import read_data_spec
    from biofm.windows import record_signal
    from biofm.sources.butppg import read_record
    from biofm.train.finetune import build_classifier, predict as predict_in_memory
    from conftest import heartbeat_signals, write_butppg

    folder = write_butppg(tmp_path / "raw", {f"10000{i}": 1 for i in range(1, 7)}, ecg=False)
    colours = {}
    for k, rid in enumerate(sorted(p.name for p in folder.iterdir() if p.is_dir())):
        rng = np.random.default_rng(k)
        x = np.stack([rng.standard_normal(300), rng.standard_normal(300),
                      heartbeat_signals(10.0, 30.0, hr_bpm=55 + 7 * k, seed=k)[0]], axis=1)
        wfdb.wrsamp(f"{rid}_PPG", fs=30, units=["NU"] * 3, sig_name=["R", "G", "B"], p_signal=x, fmt=["16"] * 3,
                    adc_gain=[1000.0] * 3, baseline=[0] * 3, write_dir=str(folder / rid))
        colours[rid] = x
    model, desc = build_classifier(FinetuneConfig(), write_pretrained(tmp_path / "fm.pt"),
                                   read_data_spec(butppg_data / "train"))
    spec = json.loads(json.dumps(desc["data_spec"]))
    spec["filters"]["PPG"]["band_hz"], spec["ppg_signal"] = [0.7, 8.0], 2

    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(desc["channels"])
    windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    own = {**channels, "PPG": dataclasses.replace(channels["PPG"], band_hz=(0.7, 8.0))}

    def expected(chans, signal_index):
        rows = [record_signal(read_record(folder, r, signal_index), chans, windows) for r in sorted(colours)]
        return predict_in_memory(model, np.stack([s for s, _ in rows]), np.stack([p for _, p in rows]))

    wanted, shipped, first_colour = expected(own, 2), expected(channels, 2), expected(own, 0)
    below = wanted[wanted < 0.5]  # a threshold that labels some window otherwise than 0.5 would
    threshold = float(below.max() if below.size else wanted.max())
    assert np.abs(wanted - shipped).max() > 1e-4 and np.abs(wanted - first_colour).max() > 1e-4  # the test can tell
    assert ((wanted >= threshold) != (wanted >= 0.5)).any()
    ckpt = checkpoint.save(tmp_path / "clf.pt", model.state_dict(), {**desc, "data_spec": spec, "threshold": threshold})

    m = predict(ckpt, str(folder), tmp_path / "out", plots=0)
    assert m["windows"] == 6 and m["threshold"] == threshold and m["data_spec"]["ppg_signal"] == 2
    table = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas().sort_values("recording_id")
    np.testing.assert_allclose(table["probability"], wanted, atol=1e-5)
    assert table["label"].tolist() == (wanted >= threshold).astype(int).tolist()


def test_a_timeline_shades_each_window_by_its_label_at_the_threshold(monkeypatch, tmp_path):
    """Green where the label is the positive class, red where the negative (not a colour scale of
    the probability), the legend gives the threshold to four decimals, and every word is the task's;
    a regression model's timeline plots its value with the unit."""
    from matplotlib.colors import to_rgba

    from biofm import infer
    from biofm import plotting

    figures = []
    monkeypatch.setattr(plotting, "save_png", lambda fig, path, dpi=100: figures.append(fig))
    rows = [{"start_s": 0.0, "probability": 0.52, "label": 1}, {"start_s": 10.0, "probability": 0.49, "label": 0}]
    af = {"task": {"name": "arrhythmia-af", "kind": "binary", "classes": ["other rhythm", "AF"]}, "threshold": 0.5017,
          "data_spec": {"window_s": 10.0}}
    infer._timeline("r1", ("PPG", np.sin(np.arange(3000) / 10.0), 100.0), rows, af, str(tmp_path / "t.png"))
    top, bottom = figures[0].axes
    spans = [p for p in top.patches]
    assert [p.get_facecolor()[:3] for p in spans] == [to_rgba("tab:green")[:3], to_rgba("tab:red")[:3]]
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == ["threshold 0.5017"]
    assert bottom.get_ylabel() == "P(AF)" and "arrhythmia-af" in top.get_title() and "green: AF, red: other rhythm" in top.get_title()
    assert "good" not in top.get_title() + bottom.get_ylabel()
    hr = {"task": {"name": "troika-hr", "kind": "regression", "target": "heart rate", "unit": "bpm"},
          "data_spec": {"window_s": 10.0}}
    infer._timeline("r1", ("PPG", np.sin(np.arange(3000) / 10.0), 100.0), [{"start_s": 0.0, "value": 71.0}], hr, str(tmp_path / "h.png"))
    top, bottom = figures[1].axes
    assert bottom.get_ylabel() == "heart rate, bpm" and not top.patches
    assert infer.summary_columns(hr["task"]) == ["mean_heart_rate_bpm", "sd_heart_rate_bpm"]
    assert infer.summary_columns(af["task"]) == ["share_predicted_af", "mean_probability_af"]


def test_windows_or_models_of_the_earlier_filters_are_refused():
    """The data spec says what band_hz means; a model or windows of the biofm whose filters passed
    a narrower band (its spec has no "edges") are refused, with what to do."""
    from biofm.dataset import check_data_spec, data_spec
    from biofm.infer import model_preprocessing

    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    spec = data_spec(channels, load_config(WindowsConfig, ROOT / "configs/windows.yaml"))
    assert spec["filters"]["PPG"]["edges"] == "pass band, -3 dB"
    old = {**spec, "filters": {c: {k: v for k, v in f.items() if k != "edges"} for c, f in spec["filters"].items()}}
    assert list(model_preprocessing({"data_spec": spec})[0]) == ["PPG", "ECG"]
    with pytest.raises(ConfigError, match=r"trained on PPG windows filtered by an earlier biofm, .* retrain it"):
        model_preprocessing({"data_spec": old})
    with pytest.raises(ConfigError, match="an earlier biofm built it, whose filters passed a narrower band"):
        check_data_spec(spec, old, "windows")
    check_data_spec(spec, spec, "windows")
