import subprocess
import sys

import numpy as np
import pytest
import torch

from biofm.errors import BiofmError
from biofm.model.ssl import (MaskedSignalModel, MultiResolutionSTFTLoss, masked_mse, random_mask,
                             ttm_config)
from biofm.train import checkpoint
from biofm.train.evaluate import interpolate_masked
from biofm.model.ssl import window_masks
from biofm.train.pretrain import _lr_factor
from biofm.train.ray_run import mixed_precision, seed_epoch, worker_cpus


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MaskedSignalModel(ttm_config(2, num_layers=2)).eval()


def test_encoder_shapes(model):
    x = torch.randn(4, 2, 1250)
    assert model.encoder(x).shape == (4, 2, 10, 192)
    assert model.encoder.tokens(x).shape == (4, 10, 192)
    recon, latents = model(x, random_mask(4, 2, 10, 0.4))
    assert recon.shape == (4, 2, 1250) and latents.shape == (4, 2, 10, 192)
    assert len(model.encoder.layers) == 2


def test_random_mask_counts_and_modes():
    g = torch.Generator().manual_seed(0)
    m = random_mask(64, 2, 10, 0.4, generator=g)
    assert m.shape == (64, 2, 10) and (m.sum(dim=(1, 2)) == 8).all()
    assert not (m[:, 0] == m[:, 1]).all()  # cells are chosen independently per channel
    same = random_mask(64, 2, 10, 0.4, same_across_channels=True, generator=g)
    assert (same[:, 0] == same[:, 1]).all() and (same.sum(dim=(1, 2)) == 8).all()
    assert torch.equal(random_mask(3, 2, 10, 0.4, generator=torch.Generator().manual_seed(5)),
                       random_mask(3, 2, 10, 0.4, generator=torch.Generator().manual_seed(5)))


def test_masked_cells_are_hidden_from_the_encoder(model):
    x = torch.randn(2, 2, 1250)
    mask = random_mask(2, 2, 10, 0.4, generator=torch.Generator().manual_seed(1))
    cells = mask.repeat_interleave(125, dim=-1)
    y = x.clone()
    y[cells] += 100.0  # change only what is masked
    with torch.no_grad():
        assert torch.allclose(model(x, mask)[0], model(y, mask)[0])
        assert not torch.allclose(model(x, ~mask)[0], model(y, ~mask)[0])


def test_masked_mse_counts_only_masked_cells():
    x = torch.zeros(1, 2, 1250)
    mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    mask[0, 1, 3] = True
    recon = torch.zeros_like(x)
    recon[0, 0] = 5.0                      # error outside the mask: ignored
    recon[0, 1, 375:500] = 2.0             # error inside the masked cell
    assert masked_mse(recon, x, mask, 125).item() == pytest.approx(4.0)


def test_stft_loss():
    loss = MultiResolutionSTFTLoss()
    t = torch.arange(1250) / 125
    x = torch.sin(2 * torch.pi * 1.2 * t).repeat(2, 2, 1)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-4)
    near, far = loss(0.9 * x, x).item(), loss(torch.randn_like(x), x).item()
    assert 0 < near < far


def test_window_masks_depend_on_the_window_not_the_order():
    a = window_masks(["1", "2", "3"], [0, 5, 7], 2, 10, 0.4, seed=9)
    b = window_masks(["3", "1", "2"], [7, 0, 5], 2, 10, 0.4, seed=9)
    assert torch.equal(a[[2, 0, 1]], b) and (a.sum(dim=(1, 2)) == 8).all()
    assert not torch.equal(a, window_masks(["1", "2", "3"], [0, 5, 7], 2, 10, 0.4, seed=10))


def test_an_epoch_run_again_draws_what_it_drew_the_first_time():
    """seed_epoch before each epoch: a restarted worker redoing epoch 3 draws the same masks and
    dropout as the lost one did, whatever ran before it; other epochs and ranks draw others."""
    def draws(seed, rank, epoch, before=0):
        torch.rand(before)  # whatever the process drew earlier (a fresh worker draws nothing)
        seed_epoch(seed, rank, epoch)
        return random_mask(16, 2, 10, 0.4), torch.nn.functional.dropout(torch.ones(64), 0.5)

    first, again = draws(0, 0, 3, before=1000), draws(0, 0, 3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (draws(0, 0, 4), draws(0, 1, 3), draws(1, 0, 3)):
        assert not torch.equal(first[0], other[0])


def test_learning_rate_schedule():
    assert _lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert _lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert _lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert _lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_linear_interpolation_baseline_is_exact_on_a_ramp():
    x = np.tile(np.linspace(-1, 1, 1250, dtype=np.float32), (1, 1, 1))
    mask = np.zeros((1, 1, 10), dtype=bool)
    mask[0, 0, [2, 3, 7]] = True
    np.testing.assert_allclose(interpolate_masked(x, mask, 125), x, atol=1e-5)


def test_checkpoint_round_trip_and_bad_files(tmp_path, model):
    path = checkpoint.save(tmp_path / "m.pt", model.state_dict(), {"channels": ["PPG", "ECG"]}, {"epoch": 3})
    blob = checkpoint.load(path)
    assert blob["description"] == {"channels": ["PPG", "ECG"]} and blob["training"]["epoch"] == 3
    assert torch.equal(blob["model"]["decoder.weight"], model.state_dict()["decoder.weight"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BiofmError, match="junk.pt is not a biofm checkpoint: torch.load cannot read it") as e:
        checkpoint.load(tmp_path / "junk.pt")
    assert "weights_only" not in str(e.value)  # torch's advice to load unsafely is not passed on
    with pytest.raises(BiofmError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_encoder_export_loads_with_tsfm_public_alone(tmp_path, model):
    """In a fresh interpreter that never imports biofm, as tsfm_public users load TTM checkpoints."""
    model.encoder.save_pretrained(tmp_path / "encoder")
    x = torch.randn(2, 2, 1250)
    np.save(tmp_path / "x.npy", x.numpy())
    code = "\n".join([
        "import sys, numpy as np, torch",
        "from tsfm_public.models.tinytimemixer import TinyTimeMixerForPrediction",
        "m = TinyTimeMixerForPrediction.from_pretrained(sys.argv[1]).eval()",
        "with torch.no_grad():",
        "    y = m.backbone(past_values=torch.from_numpy(np.load(sys.argv[2])).transpose(1, 2)).last_hidden_state",
        "np.save(sys.argv[3], y.numpy())",
        "assert 'biofm' not in sys.modules",
    ])
    done = subprocess.run([sys.executable, "-c", code, "encoder", "x.npy", "y.npy"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model.encoder(x).numpy()
    assert expected.shape == (2, 2, 10, 192)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)


def test_training_workers_fit_the_cluster_cpus():
    assert worker_cpus(1.0, 1, 2) == 1.0
    assert worker_cpus(1.0, 1, 1) == 1.0      # one core is enough: the worker reads its own batches
    assert worker_cpus(1.0, 4, 2) == 0.5      # four workers on two cores: half a CPU each
    assert worker_cpus(1.0, 4, 64) == 1.0     # a big cluster keeps what was asked
    with pytest.raises(BiofmError, match="has none"):
        worker_cpus(1.0, 1, 0)


def test_mixed_precision_is_off_on_the_cpu_and_picks_bf16_or_fp16_on_a_gpu(monkeypatch):
    autocast, scaler = mixed_precision(True, torch.device("cpu"))
    with autocast():
        y = torch.nn.Linear(4, 2)(torch.ones(3, 4))
    assert y.dtype == torch.float32 and not scaler.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else GradScaler disables itself
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        autocast, scaler = mixed_precision(True, torch.device("cuda"))
        assert autocast.keywords == {"dtype": dtype, "enabled": True} and autocast.args == ("cuda",)
        # fp16 needs gradient scaling (small gradients underflow in fp16); bf16 has fp32's range
        assert scaler.is_enabled() == (dtype == torch.float16)
        if scaler.is_enabled():
            assert scaler.get_scale() == 65536.0
    autocast, _ = mixed_precision(False, torch.device("cuda"))  # --no-amp
    assert autocast.keywords["enabled"] is False


def test_history_plots_have_y_labels_whole_epochs_and_one_axis_per_scale(monkeypatch, tmp_path):
    from biofm.train import plots

    shown = {}
    monkeypatch.setattr(plots, "save_png", lambda fig, path, dpi=100: shown.update(fig=fig))
    history = [{"epoch": e, "train_loss": 3.0 - e / 10, "val_loss": 3.1 - e / 10, "train_stft": 7.0 - e / 5}
               for e in (1, 2, 3)]
    plots.plot_history(history, {"total": ("loss", ("train_loss", "val_loss")), "STFT": ("STFT loss", ("train_stft",))},
                       str(tmp_path / "x.png"))
    axes = shown["fig"].axes
    assert [a.get_ylabel() for a in axes] == ["loss", "STFT loss"]
    assert [len(a.get_lines()) for a in axes] == [2, 1]  # the STFT term (~7) does not flatten the losses (~3)
    for a in axes:
        ticks = [t for t in a.get_xticks() if a.get_xlim()[0] <= t <= a.get_xlim()[1]]
        assert ticks == [1, 2, 3]


def test_an_absent_channel_is_left_out_of_both_losses():
    """A corpus source without ECG gives it as a row of zeros: the masked MSE and the STFT loss
    are those of its PPG alone, whatever the model reconstructs in the ECG row."""
    from biofm.model.ssl import present_channels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 1250, generator=g)
    x[1:3, 1] = 0  # windows 1 and 2 lack ECG
    recon = torch.randn(4, 2, 1250, generator=g)
    mask = random_mask(4, 2, 10, 0.4, generator=g)
    present = present_channels(x)
    assert present.tolist() == [[True, True], [True, False], [True, False], [True, True]]
    stft = MultiResolutionSTFTLoss()
    rows = present.flatten()
    flat = lambda t: t.flatten(0, 1)[rows][:, None]  # noqa: E731 - the present rows as [N, 1, T]
    expected_mse = masked_mse(flat(recon), flat(x), mask.flatten(0, 1)[rows][:, None], 125)
    assert torch.allclose(masked_mse(recon, x, mask & present[..., None], 125), expected_mse)
    assert torch.allclose(stft(recon, x, present), stft(flat(recon), flat(x)))
    recon[1:3, 1] += 100.0  # the absent rows' reconstruction does not count
    assert torch.allclose(masked_mse(recon, x, mask & present[..., None], 125), expected_mse)
    assert not torch.allclose(masked_mse(recon, x, mask, 125), expected_mse)


def test_a_mask_token_fills_the_masked_cells_and_learns():
    """With mask_input token, a masked cell's samples are the channel's learned patch (what the
    cell held is still hidden), and the token gets a gradient."""
    from biofm.model.ssl import targets

    torch.manual_seed(0)
    model = MaskedSignalModel(ttm_config(2, num_layers=1, d_model=32), mask_input="token", decoder="mixer").eval()
    assert model.mask_token.shape == (2, 125) and isinstance(model.decoder, torch.nn.Module)
    x = torch.randn(2, 2, 1250)
    mask = random_mask(2, 2, 10, 0.4, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[mask.repeat_interleave(125, dim=-1)] += 100.0
    recon, _ = model(x, mask)
    assert torch.allclose(recon, model(y, mask)[0]) and recon.shape == (2, 2, 1250)
    with torch.no_grad():
        model.mask_token.add_(1.0)
    assert not torch.allclose(recon, model(x, mask)[0])
    masked_mse(model(x, mask)[0], targets(x, 125, "patch"), mask, 125).backward()
    assert model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask_input must be one of"):
        MaskedSignalModel(ttm_config(2, num_layers=1, d_model=32), mask_input="noise")


def test_patch_targets_are_each_patch_z_scored():
    from biofm.model.ssl import targets

    x = torch.randn(3, 2, 1250) * 3 + 5
    t = targets(x, 25, "patch").unflatten(-1, (50, 25))
    assert torch.allclose(t.mean(-1), torch.zeros(3, 2, 50), atol=1e-5)
    assert torch.allclose(t.std(-1), torch.ones(3, 2, 50), atol=1e-2)
    assert targets(x, 25, "window") is x
    assert targets(torch.zeros(1, 1, 125), 25, "patch").abs().max() == 0   # an absent channel stays zeros


def test_the_spectral_term_is_the_masked_errors_in_band_energy_and_sees_phase():
    """An in-band error on the masked cells counts as much as its masked MSE; the same error out of
    band counts nothing; a sine shifted by half a period (equal magnitude spectrum) counts fully,
    where the seed's STFT term hardly sees it."""
    from biofm.model.ssl import band_bins, band_spectral_mse

    t = torch.arange(1250) / 125
    bins = band_bins([(0.5, 10.0)], 1250, 125.0)
    cells = torch.ones(1, 1, 1250)
    target = torch.sin(2 * torch.pi * 1.2 * t)[None, None]
    shifted = torch.sin(2 * torch.pi * 1.2 * t + torch.pi)[None, None]
    assert band_spectral_mse(shifted, target, cells, bins).item() == pytest.approx(((shifted - target) ** 2).mean().item(), rel=1e-3)
    out_of_band = target + torch.sin(2 * torch.pi * 30.0 * t)[None, None]
    assert band_spectral_mse(out_of_band, target, cells, bins).item() < 1e-3
    stft = MultiResolutionSTFTLoss()
    assert stft(shifted, target).item() < 0.05 * band_spectral_mse(shifted, target, cells, bins).item()
    half = torch.zeros(1, 1, 1250)
    half[..., :625] = 1
    err = band_spectral_mse(shifted, target, half, bins).item()  # per masked sample: the same as on every cell
    assert err == pytest.approx(band_spectral_mse(shifted, target, cells, bins).item(), rel=0.05)


def test_ppg_ecg_alignment_prefers_each_windows_own_pair_and_ignores_unpaired_windows():
    from biofm.model.ssl import alignment_loss

    torch.manual_seed(0)
    model = MaskedSignalModel(ttm_config(2, num_layers=1, d_model=32, dropout=0.0), align_dim=16)
    x = torch.randn(6, 2, 1250)
    present = torch.ones(6, 2, dtype=torch.bool)
    present[5, 1] = False
    x[5, 1] = 0
    loss = alignment_loss(model, x, present, 0, 1, 0.1)
    y = x.clone()
    y[5, 0] = torch.randn(1250)                    # the unpaired window: no part in the loss
    assert alignment_loss(model, y, present, 0, 1, 0.1).item() == pytest.approx(loss.item(), abs=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        step_loss = alignment_loss(model, x, present, 0, 1, 0.1)
        step_loss.backward()
        optimizer.step()
    assert step_loss.item() < 0.5 * loss.item() and 0 < loss.item()
    assert alignment_loss(model, x, torch.zeros(6, 2, dtype=torch.bool), 0, 1, 0.1).item() == 0


def test_the_floors_of_a_periodic_signal():
    """A pulse of period 100 samples (75 bpm at 125 Hz): the one-period copy finds the period and
    fills the masked cells exactly, the first patch (from a period later) and two patches in a
    row (from what it filled) included; on a pulse with 3% beat-to-beat jitter it stays well
    below linear interpolation and zeros."""
    from biofm.train.evaluate import beat_period, period_copy
    from conftest import heartbeat_signals

    t = np.arange(1250) / 125.0
    pulse = np.sin(2 * np.pi * 1.25 * t) + 0.5 * np.sin(4 * np.pi * 1.25 * t + 1.0)
    mask = np.zeros((1, 1, 10), bool)
    mask[0, 0, [0, 3, 4, 8]] = True
    hidden = np.repeat(mask, 125, axis=-1)
    assert beat_period(pulse * ~hidden[0, 0], ~hidden[0, 0], 125.0) == 100
    copied = period_copy(pulse[None, None], mask, 125, 125.0)
    np.testing.assert_allclose(copied, pulse[None, None], atol=1e-9)
    ppg = heartbeat_signals(10.0, 125.0, hr_bpm=72.0, seed=0)[0]
    x = ((ppg - ppg.mean()) / ppg.std())[None, None]
    mask[0, 0] = False
    mask[0, 0, [2, 5, 6]] = True
    hidden = np.repeat(mask, 125, axis=-1)
    err = ((period_copy(x, mask, 125, 125.0) - x) ** 2)[hidden].mean()
    # 0.43, against 1.38 for interpolation and 1.10 for zeros: a beat that comes 25 ms early is a miss
    assert err < 0.5 and ((interpolate_masked(x, mask, 125) - x) ** 2)[hidden].mean() > 2.5 * err
    assert (x[hidden] ** 2).mean() > 2 * err
