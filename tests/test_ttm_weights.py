"""Pretraining from IBM's published TTM weights: folders laid out as IBM publishes them (the
published architectures, random weights), loaded offline."""

import hashlib
import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tsfm_public.models.tinytimemixer import TinyTimeMixerForPrediction

from biofm.config import ChannelsConfig, FinetuneConfig, PretrainConfig, WindowsConfig, load_config
from biofm.errors import BiofmError, ConfigError
from biofm.model.classifier import Classifier, inflate_encoder
from biofm.model.ssl import random_mask
from biofm.model.ttm_weights import PUBLISHED, describe, initial_model, parse, write_stand_in
from conftest import REAL_BUTPPG, REAL_VITAL, ROOT, requires_realdata


@pytest.fixture(scope="module")
def ibm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ibm")
    return {name: write_stand_in(root / name, name, seed=1) for name in PUBLISHED}


def zscored(b, c, t, seed=0):
    x = torch.randn(b, c, t, generator=torch.Generator().manual_seed(seed))
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False)


def published_latents(folder, x, context):
    """The published model's backbone on windows ``x`` ``[B, C, T]`` zero-padded to its context,
    the padding marked unobserved (its std scaling on), every channel on its own."""
    model = TinyTimeMixerForPrediction.from_pretrained(str(folder)).eval()
    padded = torch.nn.functional.pad(x, (0, context - x.shape[-1])).transpose(1, 2)
    observed = torch.zeros_like(padded)
    observed[:, :x.shape[-1]] = 1
    with torch.no_grad():
        return model.backbone(past_values=padded, past_observed_mask=observed).last_hidden_state


@pytest.mark.parametrize("name, window", [("r2-1536-96", 1250), ("r1-512-96", 500)])
def test_step_zero_computes_what_the_published_backbone_does(ibm, name, window):
    model, record = initial_model(PretrainConfig(init=str(ibm[name]), dropout=0.0), window)
    arch = PUBLISHED[name]
    cfg = model.encoder.config
    assert (cfg.d_model, cfg.num_layers, cfg.adaptive_patching_levels, cfg.patch_length, cfg.context_length) == (
        arch["d_model"], 2, 3, arch["patch_length"], arch["context_length"])
    assert cfg.mode == "mix_channel" and cfg.num_input_channels == 2 and cfg.signal_length == window
    patches = -(-window // arch["patch_length"])  # 10 patches of 128 samples hold 1250, 8 of 64 hold 500
    assert model.patches == patches == {1250: 10, 500: 8}[window]
    x = zscored(4, 2, window)
    with torch.no_grad():
        ours = model.eval().encoder(x)
    theirs = published_latents(ibm[name], x, arch["context_length"])
    assert ours.shape == (4, 2, patches, arch["d_model"])
    # equal up to TTM's std scaling of an already z-scored window: sqrt(1 + 1e-5)
    assert torch.allclose(ours, theirs[:, :, :patches], atol=1e-4), (ours - theirs[:, :, :patches]).abs().max()
    # what loaded: the whole backbone; new: 8 tensors of channel mixing per layer (6 layers) + 2 decoder
    backbone = {k: v for k, v in load_file(ibm[name] / "model.safetensors").items() if k.startswith("backbone.")}
    assert record["tensors_loaded"] == len(backbone) and record["unused"] == []
    assert record["params_loaded"] == sum(v.numel() for v in backbone.values())
    assert record["tensors_new"] == 6 * 8 + 2 and sum("channel_feature_mixer" in k for k in record["new"]) == 48
    assert record["params_loaded"] + record["params_new"] == sum(p.numel() for p in model.parameters())
    assert record["sha256"] == hashlib.sha256((ibm[name] / "model.safetensors").read_bytes()).hexdigest()
    assert record["source"] == str(ibm[name]) and record["revision"] is None and record["weights"] == "loaded"
    assert f"loaded {len(backbone)} tensors" in describe(record)
    # the masked model reconstructs the window's own samples, and trains
    recon, latents = model(x, random_mask(4, 2, patches, 0.4))
    assert recon.shape == x.shape and latents.shape == ours.shape
    assert len(model.encoder.layers) == 6
    with pytest.raises(ValueError, match=f"windows of {arch['context_length'] + 1} samples: this encoder takes at most"):
        model.encoder(zscored(1, 2, arch["context_length"] + 1))


def test_architecture_only_and_bad_checkpoints(ibm, tmp_path):
    cfg = PretrainConfig(init=str(ibm["r2-1536-96"]), init_weights=False)
    control, record = initial_model(cfg, 1250)
    loaded, _ = initial_model(PretrainConfig(init=str(ibm["r2-1536-96"])), 1250)
    assert record["tensors_loaded"] == 0 and record["weights"] == "random"
    assert [p.shape for p in control.parameters()] == [p.shape for p in loaded.parameters()]
    assert not torch.equal(control.encoder.ttm.encoder.patcher.weight, loaded.encoder.ttm.encoder.patcher.weight)
    assert "random weights on the architecture of" in describe(record)

    with pytest.raises(BiofmError, match="context is 512 samples, shorter than the 1250-sample windows.*1536-96-r2"):
        initial_model(PretrainConfig(init=str(ibm["r1-512-96"])), 1250)
    broken = tmp_path / "renamed"
    write_stand_in(broken, "r1-512-96")
    tensors = load_file(broken / "model.safetensors")
    tensors["backbone.encoder.patcher.renamed"] = tensors.pop("backbone.encoder.patcher.weight")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BiofmError, match=r"core mixers did not load \(1 tensors.*patcher.weight"):
        initial_model(PretrainConfig(init=str(broken)), 500)
    prefix = tmp_path / "prefix"
    write_stand_in(prefix, "r1-512-96")
    config = json.loads((prefix / "config.json").read_text())
    (prefix / "config.json").write_text(json.dumps({**config, "resolution_prefix_tuning": True}))
    with pytest.raises(BiofmError, match="resolution_prefix_tuning=True"):
        initial_model(PretrainConfig(init=str(prefix)), 500)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiofmError, match="no model.safetensors or pytorch_model.bin"):
        initial_model(PretrainConfig(init=str(tmp_path / "empty")), 500)
    with pytest.raises(ConfigError, match="a local folder has no revisions"):
        initial_model(PretrainConfig(init=f"{ibm['r1-512-96']}@main"), 500)
    assert parse("ibm-granite/granite-timeseries-ttm-r2@1536-96-r2") == (
        "ibm-granite/granite-timeseries-ttm-r2", "1536-96-r2")


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_without_network_or_cache_fails_at_once(tmp_path, monkeypatch, dead_url, offline):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "ENDPOINT", dead_url)  # never the real hub from a test
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", offline)
    t0 = time.perf_counter()
    with pytest.raises(BiofmError) as e:
        initial_model(PretrainConfig(init="ibm-granite/granite-timeseries-ttm-r2@1536-96-r2"), 1250)
    assert time.perf_counter() - t0 < 10
    message = str(e.value)
    assert "cannot get ibm-granite/granite-timeseries-ttm-r2@1536-96-r2" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "unreachable") in message
    assert str(tmp_path / "cache") in message and "--init /path/to/folder" in message


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(ibm, tmp_path, monkeypatch, dead_url):
    """The cache as huggingface_hub lays it out (refs/<revision> -> snapshots/<commit>/)."""
    import shutil

    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--ibm-granite--granite-timeseries-ttm-r2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(ibm["r2-1536-96"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "1536-96-r2").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "ENDPOINT", dead_url)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    _, record = initial_model(PretrainConfig(init="ibm-granite/granite-timeseries-ttm-r2@1536-96-r2"), 1250)
    assert (record["source"], record["revision"]) == ("ibm-granite/granite-timeseries-ttm-r2", "1536-96-r2")
    assert record["folder"] == str(repo / "snapshots" / commit) and record["tensors_loaded"] == 98
    with pytest.raises(BiofmError, match="HF_HUB_OFFLINE is set"):  # a revision the cache lacks
        initial_model(PretrainConfig(init="ibm-granite/granite-timeseries-ttm-r2@1024-96-r2"), 1250)


def test_inflation_and_staged_unfreezing_on_the_published_architecture(ibm):
    model, _ = initial_model(PretrainConfig(init=str(ibm["r2-1536-96"]), dropout=0.0), 1250)
    state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    five = ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"]
    encoder = inflate_encoder(state, model.encoder.config, ["PPG", "ECG"], five).eval()
    x = zscored(3, 5, 1250, seed=2)
    with torch.no_grad():
        before = model.encoder.eval()(x[:, 3:])
        after = encoder(x)
    assert after.shape == (3, 5, 10, 384)
    assert torch.allclose(after[:, 3:], before, atol=1e-5)  # "preserve": PPG and ECG read no new channel
    classifier = Classifier(encoder)
    trainable = classifier.set_stage(2, unfreeze_last_n=2, train_encoder=False)
    layers = {n.split(".mixer_layers.")[0][-1] + n.split(".mixer_layers.")[1][0] for n in trainable if "mixer_layers" in n}
    assert layers == {"21", "20"}  # the last level's two layers: the last two that run


@pytest.mark.slow  # pretraining, then fine-tuning with its two baselines, on Ray Train
@requires_realdata(REAL_VITAL)
@requires_realdata(REAL_BUTPPG)
@pytest.mark.timeout(600)
def test_a_model_started_from_ibm_weights_goes_through_every_later_stage(ibm, butppg_data, tmp_path, capsys):
    from biofm.cli import main
    from biofm.infer import predict
    from biofm.preprocess import build_windows
    from biofm.sources.vitaldb import DirectorySource
    from biofm.train import checkpoint
    from biofm.train.evaluate import evaluate_ssl
    from biofm.train.evaluate import load_pretrained
    from biofm.train.pretrain import pretrain
    from biofm.train.transfer import compare_variants

    ids = sorted(p.stem for p in REAL_VITAL.glob("*.vital"))
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "ECG"])
    windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    for split, cases in (("train", ids[:4]), ("val", ids[4:])):
        build_windows(cases, DirectorySource(str(REAL_VITAL)), channels, windows, tmp_path / "windows", split)
    cfg = PretrainConfig(init=str(ibm["r2-1536-96"]), epochs=2, batch_size=16, lr=1e-3, warmup_epochs=1,
                         cpus_per_worker=0.5, d_model=64, num_layers=3)
    fm = tmp_path / "fm"
    assert main(["pretrain", "--init", str(tmp_path / "no-ttm"), "--data-dir", str(tmp_path / "windows"),
                 "--output-dir", str(fm)]) == 2  # the flag reaches the run, which stops before Ray starts
    assert f"init {tmp_path / 'no-ttm'}: no such folder" in capsys.readouterr().err
    final = pretrain(cfg, tmp_path / "windows", fm)
    assert final["epoch"] == 2 and final["val_loss"] == final["val_loss"]  # finite
    assert (f"[pretrain] starting from {ibm['r2-1536-96']}: loaded 98 tensors (2,026,560 parameters); new 50 "
            "(52,136 parameters: 48 of channel mixing, as the identity, and the decoder)") in capsys.readouterr().out

    config = json.loads((fm / "training_config.json").read_text())
    init = config["init"]
    assert (init["source"], init["revision"], init["weights"]) == (str(ibm["r2-1536-96"]), None, "loaded")
    assert init["sha256"] == hashlib.sha256((ibm["r2-1536-96"] / "model.safetensors").read_bytes()).hexdigest()
    assert (init["tensors_loaded"], init["tensors_new"]) == (98, 50) and init["params_loaded"] == 2_026_560
    assert (config["d_model"], config["num_layers"]) == (384, 2)  # the checkpoint's, not the config's 64 and 3
    description = checkpoint.load(fm / "best_model.pt")["description"]
    assert description["init"] == {k: v for k, v in init.items() if k not in ("new", "unused")}
    model = load_pretrained(fm / "best_model.pt")
    assert model.patches == 10 and model.encoder.config.context_length == 1536

    result = evaluate_ssl(fm / "best_model.pt", tmp_path / "windows")
    assert result["windows"] > 0 and all(v == v for v in result["masked_mse"]["overall"].values())
    exported = TinyTimeMixerForPrediction.from_pretrained(str(fm / "encoder")).eval()
    x = zscored(2, 2, 1250)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 286)).transpose(1, 2)
        theirs = exported.backbone(past_values=padded).last_hidden_state[:, :, :10]
        assert torch.allclose(model.encoder(x), theirs, atol=1e-5)

    fine = FinetuneConfig(epochs=2, head_epochs=1, batch_size=16, lr=1e-4, cpus_per_worker=0.5)
    # the linear probe is the same run with no encoder layer unfrozen (test_finetune.py)
    report = compare_variants(fine, str(fm / "best_model.pt"), butppg_data, tmp_path / "ft",
                              variants=("finetuned", "scratch"))
    assert list(report) == ["finetuned", "scratch"]
    assert all(0.0 <= report[v]["auroc"] <= 1.0 for v in report)
    classifier = checkpoint.load(tmp_path / "ft" / "best_model.pt")["description"]
    assert classifier["ttm_config"]["num_input_channels"] == 5 and classifier["ttm_config"]["d_model"] == 384
    scratch = checkpoint.load(tmp_path / "ft" / "baselines" / "scratch" / "best_model.pt")["description"]
    assert scratch["ttm_config"]["adaptive_patching_levels"] == 3 and scratch["ttm_config"]["context_length"] == 1536
    predicted = predict(str(tmp_path / "ft" / "best_model.pt"), str(REAL_BUTPPG), str(tmp_path / "pred"), plots=0)
    assert predicted["recordings_ok"] == 51


def test_compare_init_runs_differ_only_in_the_weights(tmp_path):
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("compare_init", ROOT / "jobs" / "compare_init.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    runs = job.variant_configs(PretrainConfig(epochs=3), "ibm-granite/granite-timeseries-ttm-r2@1536-96-r2")
    assert [(c.init, c.init_weights, c.epochs) for c in runs.values()] == [
        ("ibm-granite/granite-timeseries-ttm-r2@1536-96-r2", False, 3),
        ("ibm-granite/granite-timeseries-ttm-r2@1536-96-r2", True, 3)]
    cv = {v: {"mean": 0.8125, "std": 0.05} for v in job.VARIANTS}
    table = job.format_table({"random": {"val_loss": 1.5, "masked_mse": {"model": 0.61, "zero": 1.0,
                                                                        "linear_interp": 0.7}, "cv_auroc": cv}})
    assert table.splitlines()[-1] == "| random | 1.5000 | 0.6100 | 1.0000 | 0.7000 | 0.812 ± 0.050 | 0.812 ± 0.050 |"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "compare_init.py"), "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "give --init (IBM's checkpoint) or --stand-in" in done.stderr
