"""Starting the masked signal model from IBM's published Tiny Time Mixer weights.

``init`` is ``random`` or a checkpoint: a Hugging Face id (``ibm-granite/granite-timeseries-ttm-r2``)
or a local folder laid out as IBM publishes them (``config.json`` + ``model.safetensors``), with
an optional ``@revision`` (``...-ttm-r2@1536-96-r2``).

From a checkpoint the encoder adopts its architecture (adaptive-patching levels, layers per
level, d_model, expansion, patch length, context length) and keeps biofm's choices: channels
mixed (``mix_channel``) and no built-in scaling (windows are z-scored per channel, which is what
TTM's std scaling does to them). A window of T samples shorter than the context L is zero-padded
at its end: patches start at the window's start (128 samples at 125 Hz = 1.02 s per patch for
the r2 1536 models) and the ``ceil(T / patch)`` patches that hold window samples are masked,
reconstructed and pooled; the all-padding patches are not. A window longer than the context is
refused (a shorter window or a longer-context checkpoint is the fix). Every tensor whose name
and shape match loads; the channel-mixing blocks, which IBM's channel-independent checkpoints
lack, start as the identity (their MLP's last layer zeroed), so at step 0 the encoder computes
what the published backbone does on each channel.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig

from biofm.config import PretrainConfig
from biofm.errors import BiofmError, ConfigError
from biofm.model.ssl import MaskedSignalModel, ttm_config

ADOPTED = ("d_model", "num_layers", "adaptive_patching_levels", "expansion_factor", "patch_length", "context_length",
           "gated_attn", "norm_mlp", "norm_eps", "self_attn", "self_attn_heads", "use_positional_encoding",
           "positional_encoding_type")
CORE = ("encoder.ttm.encoder.patcher.", ".patch_mixer.", ".feature_mixer.")  # must load from the checkpoint
UNSUPPORTED = {"resolution_prefix_tuning": False, "register_tokens": 0, "fft_length": 0, "multi_scale": False}

_IBM = {"num_input_channels": 1, "mode": "common_channel", "scaling": "std", "adaptive_patching_levels": 3,
        "num_layers": 2, "expansion_factor": 2, "gated_attn": True, "norm_mlp": "LayerNorm",
        "use_positional_encoding": False, "dropout": 0.2, "head_dropout": 0.2, "prediction_length": 96,
        "decoder_mode": "common_channel", "decoder_num_layers": 2, "decoder_d_model": 128}
PUBLISHED = {  # the architectures of IBM's checkpoints (their config.json; tsfm_public's model table)
    "r1-512-96": {**_IBM, "context_length": 512, "patch_length": 64, "patch_stride": 64, "d_model": 192},
    "r2-1536-96": {**_IBM, "context_length": 1536, "patch_length": 128, "patch_stride": 128, "d_model": 384},
}


def parse(init: str) -> tuple[str, str | None]:
    """``"<id or folder>[@revision]"`` -> ``(source, revision)``."""
    source, _, revision = init.partition("@")
    if not source:
        raise ConfigError(f"init {init!r}: expected 'random', a Hugging Face id or a folder, optionally @revision")
    return source, revision or None


def fetch(source: str, revision: str | None) -> Path:
    """The local folder of a checkpoint: ``source`` itself, or the Hugging Face cache's snapshot
    (downloaded when the hub is reachable)."""
    if Path(source).expanduser().is_dir():
        if revision:
            raise ConfigError(f"init {source}@{revision}: a local folder has no revisions")
        return Path(source).expanduser()
    if source.startswith(("/", ".", "~")):
        raise BiofmError(f"init {source}: no such folder (a Hugging Face id reads owner/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = f"{source}@{revision}" if revision else source
    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=[
            "config.json", "*.safetensors", "pytorch_model.bin"]))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face hub is unreachable"
        download = f"hf download {source}" + (f" --revision {revision}" if revision else "")
        raise BiofmError(
            f"cannot get {name}: {why} and the cache ({constants.HF_HUB_CACHE}) does not hold it "
            f"({str(e).splitlines()[0]}). Download it where there is network ({download}) and copy the cache, "
            "or give a local folder: --init /path/to/folder (config.json + model.safetensors)") from None
    except (HfHubHTTPError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise BiofmError(f"cannot get {name} from the Hugging Face hub: {type(e).__name__}: {first} (neither a "
                         "local folder nor a model id it knows)") from None


def write_stand_in(folder: str | Path, name: str, seed: int = 0) -> Path:
    """A folder laid out as IBM publishes TTM checkpoints (``TinyTimeMixerForPrediction
    .save_pretrained``: ``config.json`` + ``model.safetensors``) with the published architecture
    ``name`` (a key of ``PUBLISHED``) and random weights: what tests and offline trials load in
    place of the download."""
    from tsfm_public.models.tinytimemixer import TinyTimeMixerForPrediction

    torch.manual_seed(seed)
    TinyTimeMixerForPrediction(TinyTimeMixerConfig(**PUBLISHED[name])).save_pretrained(str(folder))
    return Path(folder)


def weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise BiofmError(f"{folder} holds no model.safetensors or pytorch_model.bin: not a TTM checkpoint folder")


def read_checkpoint(folder: Path) -> tuple[TinyTimeMixerConfig, dict[str, torch.Tensor]]:
    """A published checkpoint's config and its backbone's tensors as stored (names without
    ``backbone.``): read from the file, so that a tensor it lacks is never filled in at random."""
    path = weights_file(folder)
    try:
        config = TinyTimeMixerConfig.from_pretrained(str(folder))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # json, safetensors and torch raise many kinds for a broken folder
        raise BiofmError(f"{folder} is not a TTM checkpoint: {type(e).__name__}: {e}") from None
    if config.model_type != "tinytimemixer":
        raise BiofmError(f"{folder} holds a {config.model_type!r} model, not a Tiny Time Mixer")
    return config, {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}


def encoder_config(published: TinyTimeMixerConfig, channels: int, window_samples: int,
                   dropout: float) -> TinyTimeMixerConfig:
    """biofm's encoder config on a published checkpoint's architecture (module docstring)."""
    for key, plain in UNSUPPORTED.items():
        if getattr(published, key, plain) != plain:
            raise BiofmError(f"the checkpoint uses {key}={getattr(published, key)!r}, which biofm's encoder does not "
                             "support: choose a TTM checkpoint without it (r1, or r2 without prefix tuning)")
    if window_samples > published.context_length:
        raise BiofmError(
            f"the checkpoint's context is {published.context_length} samples, shorter than the {window_samples}-sample "
            f"windows: use a checkpoint with a longer context (ibm-granite/granite-timeseries-ttm-r2@1536-96-r2 takes "
            f"10 s at 125 Hz) or windows of at most {published.context_length} samples (window_s in windows.yaml)")
    adopted = {k: getattr(published, k) for k in ADOPTED}
    return ttm_config(channels, adopted.pop("num_layers"), adopted.pop("d_model"), adopted.pop("context_length"),
                      adopted.pop("patch_length"), dropout, signal_length=window_samples, **adopted)


def identity_channel_mixing(model: MaskedSignalModel) -> None:
    """Every channel-mixing block adds zero to its input (the last layer of its MLP zeroed)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("channel_feature_mixer"):
                module.mlp.fc2.weight.zero_()
                module.mlp.fc2.bias.zero_()


def initial_model(cfg: PretrainConfig, window_samples: int) -> tuple[MaskedSignalModel, dict]:
    """The masked signal model pretraining starts from (``cfg.init``: random weights of
    ``cfg``'s architecture, or a published checkpoint's architecture and weights) and the record
    of what loaded: ``source``, ``revision``, ``sha256`` of the weights file,
    ``tensors_loaded``/``tensors_new``, ``params_loaded``/``params_new``, the names of the new
    tensors and of the checkpoint's backbone tensors left unused."""
    torch.manual_seed(cfg.seed)
    recipe = dataclasses.asdict(cfg)
    if cfg.init == "random":
        if window_samples % cfg.patch_length:
            raise ConfigError(f"patch_length {cfg.patch_length} does not divide the {window_samples}-sample windows: "
                              f"choose a divisor (125, 50 and 25 divide 10 s at 125 Hz)")
        model = MaskedSignalModel.of(ttm_config(len(cfg.channels), cfg.num_layers, cfg.d_model, window_samples,
                                                cfg.patch_length, cfg.dropout), recipe)
        return model, {"source": "random", "revision": None, "folder": None, "sha256": None, "weights": "random",
                       **_counts(model.state_dict(), [])}
    source, revision = parse(cfg.init)
    folder = fetch(source, revision)
    published, weights = read_checkpoint(folder)
    model = MaskedSignalModel.of(encoder_config(published, len(cfg.channels), window_samples, cfg.dropout), recipe)
    state = model.state_dict()
    if not cfg.init_weights:
        return model, {"source": source, "revision": revision, "folder": str(folder), "sha256": None,
                       "weights": "random", **_counts(state, [])}
    identity_channel_mixing(model)
    loaded = []
    for key, value in state.items():
        theirs = weights.get(key.removeprefix("encoder.ttm."))
        if key.startswith("encoder.ttm.") and theirs is not None and theirs.shape == value.shape:
            value.copy_(theirs)  # state_dict() shares the parameters' storage: this loads them
            loaded.append(key)
    counts = _counts(state, loaded)
    core_new = [k for k in counts["new"] if k.startswith(CORE[0]) or any(c in k for c in CORE[1:])]
    if core_new or not loaded:
        raise BiofmError(f"{cfg.init}: the core mixers did not load ({len(core_new)} tensors, e.g. {core_new[:3]}): the "
                         "checkpoint's names or shapes do not match a TTM backbone of its own config")
    with open(weights_file(folder), "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    counts["unused"] = sorted(set(weights) - {k.removeprefix("encoder.ttm.") for k in loaded})
    return model, {"source": source, "revision": revision, "folder": str(folder), "sha256": sha256,
                   "weights": "loaded", **counts}


def _counts(state: dict[str, torch.Tensor], loaded: list[str]) -> dict:
    new = [k for k in state if k not in set(loaded)]
    return {"tensors_loaded": len(loaded), "tensors_new": len(new),
            "params_loaded": sum(state[k].numel() for k in loaded), "params_new": sum(state[k].numel() for k in new),
            "new": new, "unused": []}


def describe(record: dict) -> str:
    """One line on what an initialisation loaded."""
    name = f"{record['source']}{'@' + record['revision'] if record['revision'] else ''}"
    if record["weights"] == "random":
        where = "" if record["source"] == "random" else f" on the architecture of {name}"
        return f"random weights{where} ({record['params_new']:,} parameters)"
    mixing = sum("channel_feature_mixer" in k for k in record["new"])
    return (f"{name}: loaded {record['tensors_loaded']} tensors ({record['params_loaded']:,} parameters); new "
            f"{record['tensors_new']} ({record['params_new']:,} parameters: {mixing} of channel mixing, as the "
            f"identity, and the decoder); {len(record['unused'])} of the checkpoint's backbone tensors unused")
