import pytest

from conftest import ROOT
from biofm.config import ChannelsConfig, WindowsConfig, config_hash, load_config
from biofm.errors import ConfigError


def test_shipped_configs_load():
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml")
    windows = load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    assert channels.channels["PPG"].band_hz == (0.5, 10.0)
    assert channels.channels["PPG"].tracks[0] == "SNUADC/PLETH"
    assert channels.channels["ECG"].tracks[0] == "SNUADC/ECG_II"
    assert "Bx50/ECG1" in channels.channels["ECG"].tracks
    assert windows.window_samples == 1250 and windows.stride_s == 10.0 and windows.min_beats == 3
    assert list(channels.select(["ECG", "PPG"])) == ["ECG", "PPG"]


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "windows.yaml"
    path.write_text("window_s: 10\nwindow_lenght: 5\n")
    with pytest.raises(ConfigError, match=r"windows.yaml: unknown key 'window_lenght'"):
        load_config(WindowsConfig, path)


def test_unknown_nested_key(tmp_path):
    path = tmp_path / "channels.yaml"
    path.write_text("channels:\n  PPG:\n    band_hz: [0.5, 10]\n    bandd: 1\n")
    with pytest.raises(ConfigError, match=r"c(hannels)?.yaml: channels.PPG: unknown key 'bandd' \(allowed: band_hz"):
        load_config(ChannelsConfig, path)


@pytest.mark.parametrize("text, message", [
    ("window_s: ten\n", "window_s: Input should be a valid number, unable to parse string as a number, got 'ten'"),
    ("min_beats: 2.5\n", "min_beats: Input should be a valid integer, got a number with a fractional part, got 2.5"),
    ("hr_bpm: [30, 100, 200]\n", "hr_bpm: Tuple should have at most 2 items"),
    ("hr_bpm: [200, 30]\n", "hr_bpm must satisfy 0 < low < high"),
    ("window_s: 10.001\n", "whole number of samples"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_values_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(WindowsConfig, path)


def test_bad_channel_spec(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("channels:\n  PPG:\n    band_hz: [10, 0.5]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: channels.PPG: band_hz must satisfy 0 < low < high, got \[10.0, 0.5\]"):
        load_config(ChannelsConfig, path)
    path.write_text("channels:\n  PPG:\n    tracks: [SNUADC/PLETH]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: channels.PPG: missing required key 'band_hz'"):
        load_config(ChannelsConfig, path)
    path.write_text("window_s: 10\n")
    with pytest.raises(ConfigError, match=r"c.yaml: missing required key 'channels'; unknown key 'window_s' \(allowed: channels\)"):
        load_config(ChannelsConfig, path)
    path.write_text("channels:\n  PPG:\n    band_hz: [0.5, 10]\n    quality: abp\n")
    with pytest.raises(ConfigError, match="quality must be one of"):
        load_config(ChannelsConfig, path)


def test_missing_file_and_unknown_channel():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(WindowsConfig, ROOT / "configs/nope.yaml")
    with pytest.raises(ConfigError, match=r"unknown channel\(s\) \['EEG'\]"):
        load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(["PPG", "EEG"])


def test_config_hash_tracks_values():
    a, b = WindowsConfig(), WindowsConfig(max_nan_fraction=0.1)
    assert config_hash(a) == config_hash(WindowsConfig()) and len(config_hash(a)) == 16
    assert config_hash(a) != config_hash(b)


def test_shipped_defaults_are_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(WindowsConfig, "configs/windows.yaml") == load_config(WindowsConfig, ROOT / "configs/windows.yaml")
    assert load_config(ChannelsConfig, "channels.yaml").channels["PPG"].band_hz == (0.5, 10.0)
    for missing in ("configs/nope.yaml", "elsewhere/windows.yaml"):  # no fallback but for configs/<name>
        with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
            load_config(WindowsConfig, missing)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "windows.yaml").write_text("stride_s: 5\n")  # a local copy wins
    assert load_config(WindowsConfig, "configs/windows.yaml").stride_s == 5.0
    assert (ROOT / "configs").resolve() == (ROOT / "platform" / "biofm" / "configs")  # one copy in the repository
