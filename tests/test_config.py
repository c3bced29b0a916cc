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
    ("window_s: ten\n", "window_s: expected float, got 'ten'"),
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
    with pytest.raises(ConfigError, match="0 < low < high"):
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
