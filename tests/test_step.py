"""The training step: no host syncs, a NaN/Inf skip decided on the device, the compiled forward
pass equal to the eager one, and the learning-rate rule for large batches."""

import dataclasses

import pytest
import torch

from biofm.config import PretrainConfig, load_config
from biofm.errors import ConfigError
from biofm.model.classifier import Classifier
from biofm.model.ssl import MaskedSignalModel, random_mask, ttm_config
from biofm.train.pretrain import TERMS, pretraining_losses
from biofm.train.step import adamw, compiled_for_batch, host_syncs, step, use_compile, where_kept

CPU = torch.device("cpu")
SPEC = {"filters": {"PPG": {"band_hz": [0.5, 10.0]}, "ECG": {"band_hz": [0.5, 40.0]}}, "window_samples": 1250,
        "sample_rate_hz": 125.0}
SEED_RECIPE = load_config(PretrainConfig, "configs/ssl_pretrain_seed.yaml")   # 1 s patches, MSE + 0.3 STFT
EVERY_TERM = dataclasses.replace(SEED_RECIPE, spectral_weight=1.0, align_weight=0.5, mask_input="token", decoder="mixer",
                                 target_norm="patch")


def scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


def test_the_counter_sees_what_would_make_the_host_wait():
    x = torch.randn(4, 3)
    with host_syncs() as counts:
        x.sum().item()
        float(x.max())
        if x.sum() > 0:
            pass
        x[x > 0].sum()           # a boolean index: its size depends on the data
        x[x > 0] = 0
        torch.nonzero(x)
        torch.bincount(torch.tensor([0, 2]))
        x.repeat_interleave(2, dim=0)  # a number of repeats: no read
    assert dict(counts) == {"_local_scalar_dense": 3, "boolean index": 2, "nonzero": 1, "bincount": 1}


def test_a_pretraining_and_a_fine_tuning_step_read_nothing_back():
    """Three pretraining steps with every loss term, mask token and mixer decoder (a PPG-only
    window among them: absent ECG) and three fine-tuning steps, the loss sums kept as the loops
    keep them: no scalar read, no data-dependent shape."""
    torch.manual_seed(0)
    model = MaskedSignalModel.of(ttm_config(2, num_layers=1, d_model=32), dataclasses.asdict(EVERY_TERM))
    losses, params = pretraining_losses(model, EVERY_TERM, SPEC), list(model.parameters())
    optimizer = adamw(params, lr=1e-3)
    x = torch.randn(8, 2, 1250)
    x[3, 1] = 0
    sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
    with host_syncs() as counts:
        for _ in range(3):
            terms = losses(x, random_mask(8, 2, 10, 0.4))
            skipped = step(terms[0], optimizer, scaler(), params, 1.0)
            sums[:-1] += where_kept(skipped, terms.detach().double() * len(x))
            sums[-1] += skipped
    assert dict(counts) == {} and sums[-1] == 0 and torch.isfinite(sums).all() and (sums[:-1] > 0).all()

    head = Classifier(model.encoder, num_classes=2)
    trained = [p for p in head.parameters() if p.requires_grad]
    optimizer = adamw(trained, lr=1e-3)
    y, present = torch.tensor([0, 1] * 4), torch.ones(8, 2, dtype=torch.bool)
    with host_syncs() as counts:
        for _ in range(3):
            logits = head(x, present)
            loss = torch.nn.functional.cross_entropy(logits, y)
            skipped = step(loss, optimizer, scaler(), trained, 1.0)
            correct = where_kept(skipped, (logits.argmax(-1) == y).sum())
    assert dict(counts) == {} and 0 <= int(correct) <= 8


def test_a_non_finite_step_is_skipped_on_the_device_and_leaves_everything_as_it_was():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = adamw(layer.parameters(), lr=0.1, weight_decay=0.05)
    x = torch.randn(16, 4)
    assert step(layer(x).pow(2).mean(), optimizer, scaler(), list(layer.parameters()), 1.0).item() == 0.0
    before = ({k: v.clone() for k, v in layer.state_dict().items()},
              {k: v.clone() for k, v in optimizer.state[layer.weight].items()})
    for poison in (float("nan"), float("inf")):
        bad = x.clone()
        bad[0, 0] = poison
        assert step(layer(bad).pow(2).mean(), optimizer, scaler(), list(layer.parameters()), 1.0).item() == 1.0
        assert all(torch.equal(v, before[0][k]) for k, v in layer.state_dict().items())
        assert all(torch.equal(v, before[1][k]) for k, v in optimizer.state[layer.weight].items())  # moments, step 1
    # a finite loss whose gradient overflows: skipped on the gradient's norm
    huge = torch.full((16, 4), 3e38)
    assert step(layer(huge).sum() * 0, optimizer, scaler(), list(layer.parameters()), 1.0).item() == 1.0
    assert optimizer.state[layer.weight]["step"].item() == 1
    assert step(layer(x).pow(2).mean(), optimizer, scaler(), list(layer.parameters()), 1.0).item() == 0.0
    assert optimizer.state[layer.weight]["step"].item() == 2 and not torch.equal(layer.weight, before[0]["weight"])
    assert torch.equal(where_kept(torch.tensor(1.0), torch.tensor([float("nan"), 2.0])), torch.zeros(2))


@pytest.mark.slow
def test_the_compiled_forward_pass_trains_as_the_eager_one():
    """The pretraining losses compiled by torch.compile (inductor, on the CPU) and eager, from the
    same weights over 6 steps of the same batches, masks and dropout draws: the first step's
    gradient within 1e-3 of its norm (float32 sums in another order), every step's losses within
    1e-3 (relative; Adam turns those differences into slightly other weights). An epoch's last,
    smaller batch runs eagerly, without a second compile. With both losses the model traces as
    one graph."""
    import torch._dynamo
    import torch._inductor.config

    def run(compiled: bool):
        torch.manual_seed(0)
        model = MaskedSignalModel(ttm_config(2, num_layers=1, d_model=32, dropout=0.1))
        losses = pretraining_losses(model, SEED_RECIPE, SPEC)
        forward = compiled_for_batch(losses, 8, CPU) if compiled else losses
        params = list(model.parameters())
        optimizer = adamw(params, lr=1e-3)
        g = torch.Generator().manual_seed(1)
        seen, first_grad = [], None
        for size in (8, 8, 8, 8, 8, 5):
            x = torch.randn(size, 2, 1250, generator=g)
            mask = random_mask(size, 2, 10, 0.4, generator=g)
            terms = forward(x, mask)
            step(terms[0], optimizer, scaler(), params, 1.0)
            first_grad = first_grad if first_grad is not None else torch.cat([p.grad.flatten() for p in params])
            seen.append(terms.detach())
        return torch.stack(seen), first_grad

    torch._dynamo.reset()
    for recipe in (SEED_RECIPE, EVERY_TERM):
        model = MaskedSignalModel.of(ttm_config(2, num_layers=1, d_model=32), dataclasses.asdict(recipe))
        explained = torch._dynamo.explain(pretraining_losses(model, recipe, SPEC))(torch.randn(4, 2, 1250),
                                                                                  random_mask(4, 2, 10, 0.4))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), recipe
    eager_losses, eager_grad = run(False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True):  # dropout draws as eager's
        compiled_terms, compiled_grad = run(True)
    assert torch.linalg.norm(compiled_grad - eager_grad) < 1e-3 * torch.linalg.norm(eager_grad)
    torch.testing.assert_close(compiled_terms, eager_losses, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(eager_losses[0], eager_losses[-2])  # it trained
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the batch of 5 was not compiled


@pytest.mark.slow
def test_inference_compiled_or_in_bf16_gives_the_eager_latents():
    """embed's encoder call: compiled for full batches (a partial one eager), equal to eager
    within 1e-4; in bf16 within 3% of the latents' spread; on a CPU, by default, eager itself."""
    from biofm.infer import inference
    from biofm.model.ssl import Encoder

    torch.manual_seed(0)
    encoder = Encoder(ttm_config(2, num_layers=1, d_model=32)).eval()
    x = torch.randn(11, 2, 1250)
    with torch.no_grad():
        expected = encoder(x)
    compiled = inference(encoder, CPU, 8, compile=True)
    torch.testing.assert_close(torch.cat([compiled(x[:8]), compiled(x[8:])]), expected, rtol=1e-4, atol=1e-5)
    bf16 = inference(encoder, CPU, 8, compile=False, bf16=True)(x)
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - expected).abs().max() < 0.03 * expected.std()
    assert torch.equal(inference(encoder, CPU, 8)(x), expected)


def test_compile_is_on_for_a_gpu_and_off_for_a_cpu_unless_set():
    assert use_compile(None, torch.device("cuda")) and not use_compile(None, CPU)
    assert use_compile(True, CPU) and not use_compile(False, torch.device("cuda"))


def test_the_learning_rate_rule_for_the_global_batch():
    cfg = PretrainConfig(lr=5e-4, batch_size=1024, base_batch_size=128)
    assert cfg.peak_lr() == 5e-4  # none: as given
    assert dataclasses.replace(cfg, lr_scaling="linear").peak_lr() == pytest.approx(4e-3)
    assert dataclasses.replace(cfg, lr_scaling="sqrt").peak_lr() == pytest.approx(5e-4 * 8 ** 0.5)
    assert dataclasses.replace(cfg, lr_scaling="sqrt", batch_size=256).peak_lr(workers=2) == pytest.approx(1e-3)
    from biofm.config import from_dict

    with pytest.raises(ConfigError, match="lr_scaling must be one of none, linear, sqrt, got 'cube'"):
        from_dict(PretrainConfig, {"lr_scaling": "cube"}, "x.yaml")
