"""Channel inflation 2 -> 5, the classifier's stages, and the classification metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biofm.errors import BiofmError
from biofm.model.classifier import Classifier, inflate_encoder
from biofm.model.ssl import Encoder, ttm_config
from biofm.train.metrics import choose_threshold, classification_metrics

NEW = ["ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG"]


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    enc = Encoder(ttm_config(2, num_layers=3, dropout=0.0)).eval()
    with torch.no_grad():  # make the channel mixing non-trivial, as after pretraining
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def signals(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 1250, generator=g)


def test_preserve_reproduces_the_pretrained_ppg_and_ecg_latents(pretrained):
    big = inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], NEW, "preserve").eval()
    x2 = signals()
    x5 = torch.zeros(4, 5, 1250)
    x5[:, 3:] = x2
    with torch.no_grad():
        want, got = pretrained(x2), big(x5)
    assert got.shape == (4, 5, 10, 192)
    assert (got[:, 3:] - want).abs().max().item() <= 1e-4
    x5[:, :3] = torch.randn(4, 3, 1250)  # the new channels' content does not leak into PPG/ECG
    with torch.no_grad():
        assert (big(x5)[:, 3:] - want).abs().max().item() <= 1e-4


def test_channels_are_mapped_by_name_not_position(pretrained):
    order = ["ECG", "ACC_X", "PPG"]
    big = inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], order, "preserve").eval()
    x2 = signals()
    x3 = torch.stack([x2[:, 1], torch.zeros(4, 1250), x2[:, 0]], dim=1)
    with torch.no_grad():
        want, got = pretrained(x2), big(x3)
    assert (got[:, 2] - want[:, 0]).abs().max() <= 1e-4 and (got[:, 0] - want[:, 1]).abs().max() <= 1e-4


@pytest.mark.parametrize("init", ["mean", "random"])
def test_other_initialisations_open_the_channel_mixing(pretrained, init):
    big = inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], NEW, init).eval()
    x5 = torch.zeros(4, 5, 1250)
    x5[:, 3:] = signals()
    with torch.no_grad():
        base = big(x5)[:, 3:]
        x5[:, :3] = torch.randn(4, 3, 1250)
        assert (big(x5)[:, 3:] - base).abs().max() > 1e-3  # ACC now reaches PPG/ECG
    gate = next(v for k, v in big.state_dict().items() if k.endswith("channel_feature_mixer.gating_block.attn_layer.bias"))
    old_gate = next(v for k, v in pretrained.state_dict().items() if k.endswith("channel_feature_mixer.gating_block.attn_layer.bias"))
    torch.testing.assert_close(gate[3:], old_gate)
    if init == "mean":
        torch.testing.assert_close(gate[:3], old_gate.mean().expand(3))


def test_inflation_refuses_a_missing_pretrained_channel(pretrained):
    with pytest.raises(BiofmError, match=r"\['ECG'\] are not among"):
        inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], ["PPG", "ACC_X"])


def _step(model, trainable):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 5, 1250)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(trainable)
    return changed


def test_stage_one_trains_only_the_head_and_stage_two_the_last_layers(pretrained):
    model = Classifier(inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], NEW))
    trainable = model.set_stage(1, unfreeze_last_n=2)
    assert trainable == ["head.weight", "head.bias"]
    assert _step(model, trainable) == {"head.weight", "head.bias"}
    trainable = model.set_stage(2, unfreeze_last_n=2)
    layers = {f"encoder.ttm.encoder.mlp_mixer_encoder.mixers.{i}" for i in (1, 2)}
    assert {".".join(n.split(".")[:6]) for n in trainable if n.startswith("encoder.")} == layers
    changed = _step(model, trainable)
    assert any(n.startswith("encoder.ttm.encoder.mlp_mixer_encoder.mixers.2") for n in changed)
    assert not any(n.startswith(("encoder.ttm.encoder.mlp_mixer_encoder.mixers.0", "encoder.ttm.encoder.patcher"))
                   for n in changed)
    assert len(model.set_stage(2, unfreeze_last_n=0)) == 2  # a linear probe
    assert len(model.set_stage(1, 2, train_encoder=True)) == len(list(model.parameters()))


def test_stage_one_runs_the_frozen_encoder_in_eval_mode():
    """In stage 1 the frozen encoder's dropout is off while the head's is on; in stage 2, and
    when the whole model trains (scratch), the encoder trains too."""
    model = Classifier(Encoder(ttm_config(5, num_layers=2, dropout=0.5)), dropout=0.5)
    x = torch.randn(3, 5, 1250)
    model.set_stage(1, unfreeze_last_n=2)
    model.train()
    assert not model.encoder.training and model.head.training and model.dropout.training
    assert torch.equal(model.features(x), model.features(x))     # no dropout in the features
    assert not torch.equal(model(x), model(x))                    # the head's dropout is on
    model.set_stage(2, unfreeze_last_n=2)
    model.train()
    assert model.encoder.training and not torch.equal(model.features(x), model.features(x))
    model.set_stage(1, unfreeze_last_n=2, train_encoder=True)
    assert model.train().encoder.training
    model.set_stage(1, unfreeze_last_n=2)
    assert not model.eval().training and not model.encoder.training


def test_the_head_sees_standardised_features_and_trains_on_a_batch_of_one():
    """Training: each pooled feature is standardised over the batch (mean 0, variance 1) and the
    running statistics move towards the batch's; a batch of one record (the last of an epoch)
    uses the running statistics. Evaluation uses them too."""
    model = Classifier(Encoder(ttm_config(5, num_layers=2)), dropout=0.0)
    model.set_stage(1, unfreeze_last_n=2)
    model.train()
    x = torch.randn(16, 5, 1250) * 3 + 1
    seen = {}
    model.head.register_forward_hook(lambda m, args, out: seen.update(z=args[0].detach()))
    model(x)
    z = seen["z"]
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=0, unbiased=False), torch.ones(z.shape[1]), atol=1e-2, rtol=0)  # v / (v + eps)
    features = model.features(x)
    torch.testing.assert_close(model.norm.running_mean, 0.1 * features.mean(dim=0))  # momentum 0.1 from 0
    assert model(x[:1]).shape == (1, 2)  # no "expected more than 1 value per channel"
    one = seen["z"]
    torch.testing.assert_close(one, (features[:1] - model.norm.running_mean)
                               / torch.sqrt(model.norm.running_var + model.norm.eps))
    model.eval()
    model(x[:1])
    torch.testing.assert_close(seen["z"], one)


def test_absent_channels_are_left_out_of_the_pooled_features(pretrained):
    model = Classifier(inflate_encoder(pretrained.state_dict(), pretrained.config, ["PPG", "ECG"], NEW)).eval()
    x = torch.randn(2, 5, 1250)
    present = torch.tensor([[False, False, False, True, True]] * 2)
    with torch.no_grad():
        pooled = model.features(x, present)
        torch.testing.assert_close(pooled, model.encoder(x)[:, 3:].mean(dim=(1, 2)))
        assert model(x, present).shape == (2, 2)


def test_metrics_and_threshold_on_known_numbers():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.55, 0.9])
    m = classification_metrics(y, p, threshold=0.5)
    assert m["confusion"] == [[3, 1], [0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 6) and m["balanced_accuracy"] == pytest.approx((0.75 + 1) / 2)
    assert m["auroc"] == pytest.approx(7 / 8) and m["f1_good"] == pytest.approx(0.8)
    t = choose_threshold(y, p)
    assert t == pytest.approx(0.55)
    assert classification_metrics(y, p, t)["balanced_accuracy"] == pytest.approx(0.875)
    one = classification_metrics(np.zeros(3), np.array([0.1, 0.7, 0.2]))
    assert np.isnan(one["auroc"]) and one["accuracy"] == pytest.approx(2 / 3)
    assert choose_threshold(np.zeros(3), np.array([0.1, 0.7, 0.2])) == 0.5


def test_every_metric_and_the_edge_cases():
    y = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    p = np.array([0.9, 0.4, 0.35, 0.8, 0.1, 0.6, 0.7, 0.2])
    m = classification_metrics(y, p, threshold=0.5)
    assert m == {"n": 8, "positives": 5, "threshold": 0.5, "accuracy": 0.625, "balanced_accuracy": pytest.approx(0.6333333),
                 # AUROC: 10 of the 15 (good, poor) pairs ranked right; AUPRC: mean precision at each good
                 "auroc": pytest.approx(10 / 15), "auprc": pytest.approx((1 + 1 + 3 / 4 + 4 / 6 + 5 / 7) / 5),
                 "f1_good": pytest.approx(2 / 3),
                 "confusion": [[2, 1], [2, 3]]}
    one = classification_metrics(np.ones(4), np.array([0.2, 0.6, 0.7, 0.9]))
    assert np.isnan(one["balanced_accuracy"]) and np.isnan(one["auprc"]) and one["confusion"] == [[0, 0], [1, 3]]
    assert choose_threshold(np.array([0, 1]), np.array([0.9, 0.1])) == 1.0      # inverted: nothing passes
    all_good = classification_metrics(np.ones(3), np.array([0.6, 0.7, 0.9]))
    assert all_good["confusion"] == [[0, 0], [0, 3]] and all_good["f1_good"] == 1.0  # 2 x 2 with one class too
    assert classification_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]))["f1_good"] == 0.0  # no good at all
    assert choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.4, 0.8])) == 0.4


def test_metric_keys_and_warnings_speak_of_the_tasks_classes():
    from biofm.train.metrics import classification_metrics, classifier_warnings, slug

    y8 = np.array([0, 1, 1, 1, 0, 1, 1, 1])
    m = classification_metrics(y8, y8 * 0.6 + 0.2, positive="AF")
    assert m["f1_af"] == 1.0 and "f1_good" not in m
    assert classifier_warnings(m, "test", ("other rhythm", "AF"))[0].startswith(
        "the test split has 8 windows (6 AF, 2 other rhythm): too few")
    assert (slug("other rhythm"), slug("breaths/min"), slug("~")) == ("other_rhythm", "breaths_min", "positive")


def test_warnings_for_small_splits_and_no_better_than_baselines():
    from biofm.train.metrics import classification_metrics, classifier_warnings

    y8 = np.array([0, 1, 1, 1, 0, 1, 1, 1])
    small = classification_metrics(y8, y8 * 0.6 + 0.2)
    assert classifier_warnings(small, "test") == [
        "the test split has 8 windows (6 good, 2 poor): too few for its metrics to mean much (want >= 30, >= 5 of each class)"]
    y = np.array([0, 1] * 20)
    flat = classification_metrics(y, np.full(40, 0.7), threshold=0.5)  # one answer for every record
    assert classifier_warnings(flat, "val") == ["val AUROC 0.500 does not beat chance (0.5)",
                                                "val balanced accuracy 0.500 does not beat predicting one class for every record (0.5)"]
    assert classifier_warnings(classification_metrics(y, y * 0.8 + 0.1), "val") == []
    thirty = np.array([0] * 5 + [1] * 25)                  # the smallest split that means something
    assert classifier_warnings(classification_metrics(thirty, thirty * 0.8 + 0.1), "val") == []
    for short in (thirty[1:], np.r_[thirty[1:], 1]):       # 29 records; 30 with 4 poor
        assert "too few for its metrics" in classifier_warnings(classification_metrics(short, short * 0.8 + 0.1), "val")[0]
    assert classifier_warnings(classification_metrics(y, 0.5 + (y - 0.5) * 0.01), "val") == []  # 0.505 vs 0.495
