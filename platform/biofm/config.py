"""Typed configs loaded from ``configs/*.yaml``.

One loader for every config: :func:`load_config` reads YAML into a frozen pydantic dataclass,
which checks types and values and rejects unknown keys; every error names the file (or flag)
and the key. :func:`with_overrides` applies command-line flags or a pipeline's overrides on top,
checked the same way. The configs shipped with biofm are package data: ``configs/<name>.yaml``
is read from the working directory when it is there, else from the package (so commands work
from any folder); ``configs/`` in the repository is the same folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import json
import typing
from pathlib import Path
from typing import Any

import pydantic
import pydantic.dataclasses
import yaml

from biofm.errors import ConfigError

# frozen dataclasses that pydantic validates on construction (also through dataclasses.replace)
config_class = functools.partial(pydantic.dataclasses.dataclass, frozen=True,
                                 config=pydantic.ConfigDict(extra="forbid"))


@config_class
class ChannelSpec:
    """One signal channel: where to find it in a recording and how to clean it."""

    #: Chebyshev II band-pass `[low, high]`, Hz
    band_hz: tuple[float, float]
    #: `.vital` track names, tried in order
    tracks: tuple[str, ...] = ()
    #: the signal's names in WFDB, EDF, CSV and array files (case-insensitive; the first found wins)
    aliases: tuple[str, ...] = ()
    #: order of the band-pass filter (1-10)
    filter_order: int = 4
    #: stop-band attenuation of the filter, dB
    stopband_db: float = 40.0
    #: beat detector that checks windows: `ppg`, `ecg` or `none`
    quality: str = "none"

    def __post_init__(self):
        low, high = self.band_hz
        if not 0 < low < high:
            raise ValueError(f"band_hz must satisfy 0 < low < high, got {list(self.band_hz)}")
        if self.quality not in ("ppg", "ecg", "none"):
            raise ValueError(f"quality must be one of ppg, ecg, none, got {self.quality!r}")
        if not 1 <= self.filter_order <= 10:
            raise ValueError(f"filter_order must be in 1..10, got {self.filter_order}")
        if self.stopband_db <= 0:
            raise ValueError(f"stopband_db must be positive, got {self.stopband_db}")


@config_class
class ChannelsConfig:
    #: channel name -> its ChannelSpec
    channels: dict[str, ChannelSpec]

    def select(self, names: typing.Sequence[str]) -> dict[str, ChannelSpec]:
        """The specs of ``names``, in that order; an unknown name is a :class:`ConfigError`."""
        unknown = [n for n in names if n not in self.channels]
        if unknown:
            raise ConfigError(
                f"unknown channel(s) {unknown}; channels.yaml defines {sorted(self.channels)}"
            )
        return {n: self.channels[n] for n in names}


@config_class
class ArrayLayout:
    """Where a MATLAB or NumPy file holds its signals (see :mod:`biofm.sources.arrays`). A signal's
    name is matched to a channel by ``channels.yaml``'s aliases, as a CSV column is."""

    #: glob of the file names this layout reads
    files: str
    #: signal name -> variable: a name, a struct path (`signal/pleth/y`) or a row (`sig[1]`)
    signals: dict[str, str]
    #: sampling rate, Hz: a number or the variable holding it
    rate_hz: float | str
    #: glob of label files lying beside the recordings (not read as recordings)
    labels: str | None = None


@config_class
class LayoutsConfig:
    #: layout name (the `array:NAME` prefix) -> its ArrayLayout
    layouts: dict[str, ArrayLayout]


@config_class
class WindowsConfig:
    """Windowing and window-quality thresholds. Times in seconds, rates in Hz."""

    #: rate every signal is resampled to, Hz
    sample_rate_hz: float = 125.0
    #: window length, s
    window_s: float = 10.0
    #: step between window starts, s
    stride_s: float = 10.0
    #: fewest detected beats a kept window holds
    min_beats: int = 3
    #: `[low, high]` heart rate a kept window's beats imply, beats/min
    hr_bpm: tuple[float, float] = (30.0, 200.0)
    #: largest share of missing samples
    max_nan_fraction: float = 0.05
    #: largest share of samples in stuck runs (1 s or more of equal values)
    max_flat_fraction: float = 0.2
    #: largest share of samples at the window's extremes (clipping)
    max_clip_fraction: float = 0.05
    #: a stretch where the pulse falls below this share of its usual amplitude is lost signal
    signal_loss_ratio: float = 0.2
    #: longest lost-signal stretch a kept window holds, s
    max_signal_loss_s: float = 1.5
    #: PPG: lowest mean correlation of beats with their average beat
    ppg_min_template_match: float = 0.65
    #: PPG: upper edge of the pulse band, Hz (raised to 2.5 x the beat rate where that is higher)
    ppg_pulse_band_hz: float = 7.0
    #: PPG: lowest share of the filter band's power that lies in the pulse band
    ppg_min_pulse_band_power: float = 0.85
    #: ECG: lowest mean correlation of beats with their average beat
    ecg_min_template_match: float = 0.66
    #: ECG: lowest agreement of two QRS detectors
    ecg_min_beat_agreement: float = 0.8

    def __post_init__(self):
        if self.sample_rate_hz <= 0 or self.window_s <= 0 or self.stride_s <= 0:
            raise ValueError("sample_rate_hz, window_s and stride_s must be positive")
        n = self.window_s * self.sample_rate_hz
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"window_s * sample_rate_hz must be a whole number of samples, got {n}")
        if self.min_beats < 1:
            raise ValueError(f"min_beats must be >= 1, got {self.min_beats}")
        if not 0 < self.hr_bpm[0] < self.hr_bpm[1]:
            raise ValueError(f"hr_bpm must satisfy 0 < low < high, got {list(self.hr_bpm)}")
        if self.ppg_pulse_band_hz <= 0:
            raise ValueError(f"ppg_pulse_band_hz must be positive, got {self.ppg_pulse_band_hz}")
        if self.max_signal_loss_s <= 0:
            raise ValueError(f"max_signal_loss_s must be positive, got {self.max_signal_loss_s}")
        for name in ("max_nan_fraction", "max_flat_fraction", "max_clip_fraction", "signal_loss_ratio",
                     "ppg_min_pulse_band_power", "ecg_min_beat_agreement"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("ppg_min_template_match", "ecg_min_template_match"):
            if not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [-1, 1] (a correlation), got {getattr(self, name)}")

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate_hz))


def resolve(path: str | Path) -> Path:
    """Where a config file is: ``path`` as given when it exists; else, for ``configs/<name>`` or a
    bare ``<name>``, the default shipped in the package."""
    path = Path(path)
    if path.is_file() or path.is_absolute() or path.parent not in (Path("."), Path("configs")):
        return path
    shipped = importlib.resources.files("biofm") / "configs" / path.name
    return Path(str(shipped)) if shipped.is_file() else path


def load_config(cls: type, path: str | Path):
    """Read the YAML file at ``path`` (see :func:`resolve`) into the config class ``cls``."""
    found = resolve(path)
    if not found.is_file():
        raise ConfigError(f"config file not found: {path}")
    return from_dict(cls, parse_yaml(found.read_text(), str(path)) or {}, where=str(path))


def parse_yaml(text: str, where: str):
    """``text`` as YAML; a malformed one is a one-line :class:`ConfigError` saying where and what
    (``{epochs: 1`` -> "...: not valid YAML: expected ',' or '}' at line 1, column 11")."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML: {what}{at}") from None


def from_dict(cls: type, data: Any, where: str):
    """Build config class ``cls`` from a mapping; ``where`` prefixes every error message."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    try:
        return pydantic.TypeAdapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(_describe(cls, err) for err in e.errors())) from None


def _describe(cls: type, err: dict) -> str:
    """One validation error as ``key.path: what is wrong``."""
    *parent, last = err["loc"] or ("",)
    at = ".".join(map(str, parent))
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = ", ".join(f.name for f in dataclasses.fields(_class_at(cls, parent)))
        return f"{at + ': ' if at else ''}unknown key {last!r} (allowed: {allowed})"
    if err["type"] == "missing":
        return f"{at + ': ' if at else ''}missing required key {last!r}"
    key = ".".join(map(str, err["loc"]))
    message = err["msg"].removeprefix("Value error, ")
    shown = "" if err["type"] == "value_error" else f", got {err['input']!r}"
    return f"{key + ': ' if key else ''}{message}{shown}"


def _class_at(cls: type, loc) -> type:
    """The config class found at ``loc`` (field names and mapping keys) below ``cls``."""
    for name in loc:
        cls = typing.get_type_hints(cls)[name] if dataclasses.is_dataclass(cls) else typing.get_args(cls)[1]
    return cls


def to_jsonable(cfg) -> dict:
    """A config as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(*cfgs) -> str:
    """A short stable hash of configs: equal configs give equal hashes across runs and machines."""
    blob = json.dumps([to_jsonable(c) for c in cfgs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@config_class
class PretrainConfig:
    """Masked signal modeling on the TTM encoder (``configs/ssl_pretrain.yaml``).

    A split whose windows take at most ``cache_mb`` MB in memory (float32: 10 kB per 2-channel
    window) is read once into each worker's memory; larger ones stream from Parquet every epoch,
    files in a new order (:mod:`biofm.train.batches`). Published TTM weights (``init``) bring
    their architecture, which replaces ``d_model`` and ``num_layers``
    (:mod:`biofm.model.ttm_weights`). The loss is the weighted sum of the four ``*_weight`` terms
    (:mod:`biofm.model.ssl`); ``docs/pretraining.md`` has the study that chose the defaults.
    """

    #: the encoder's channels, by name
    channels: tuple[str, ...] = ("PPG", "ECG")
    #: `random`, or published TTM weights (Hugging Face id or folder, `@revision` optional)
    init: str = "random"
    #: false: only the published architecture, random weights (a control)
    init_weights: bool = True
    #: width of the mixer layers
    d_model: int = 192
    #: mixer layers of the encoder
    num_layers: int = 4
    #: dropout in the encoder
    dropout: float = 0.1
    #: share of patches masked per window and channel
    mask_ratio: float = 0.4
    #: mask the same patches in every channel
    mask_same_across_channels: bool = False
    #: samples per patch (a masked cell); divides the window
    patch_length: int = 125
    #: what a masked patch shows the encoder: `zeros` or a learned `token`
    mask_input: str = "zeros"
    #: reconstruct the z-scored `window`, or each `patch` z-scored on its own
    target_norm: str = "window"
    #: `linear` head or a small `mixer`
    decoder: str = "linear"
    #: weight of the masked MSE
    mse_weight: float = 1.0
    #: weight of the seed's multi-resolution STFT loss (whole window, log magnitudes)
    stft_weight: float = 0.0
    #: FFT sizes of the STFT loss, samples
    stft_ffts: tuple[int, ...] = (64, 128, 256)
    #: weight of the masked error's in-band spectrum (complex, masked cells only)
    spectral_weight: float = 0.0
    #: weight of PPG-ECG alignment (InfoNCE, windows holding both)
    align_weight: float = 0.0
    #: temperature of the alignment's InfoNCE
    align_temperature: float = 0.1
    #: passes over the training windows
    epochs: int = 100
    #: windows per step and worker
    batch_size: int = 128
    #: peak learning rate (AdamW)
    lr: float = 5e-4
    #: AdamW weight decay
    weight_decay: float = 0.05
    #: linear warm-up, then cosine decay to zero, epochs
    warmup_epochs: float = 5.0
    #: largest gradient norm
    grad_clip: float = 1.0
    #: mixed precision on a GPU
    amp: bool = True
    #: seed of weights, masks and shuffling
    seed: int = 0
    #: seed of the fixed validation masks
    val_mask_seed: int = 1234
    #: Ray Train workers
    num_workers: int = 1
    #: CPUs per worker (lowered to fit the cluster)
    cpus_per_worker: float = 1.0
    #: train on GPUs (null: when the cluster has them)
    use_gpu: bool | None = None
    #: restarts from the last checkpoint after a lost worker
    max_failures: int = 2
    #: non-finite losses in a row before the run stops
    max_bad_steps: int = 20
    #: a split at most this size (MB) is held in memory and reshuffled every epoch
    cache_mb: float = 256.0
    #: windows in the streaming shuffle buffer (0: always stream)
    shuffle_buffer: int = 4096
    #: peak lr for another global batch: `none`, `linear` or `sqrt`
    lr_scaling: str = "none"
    #: the global batch `lr` is given for
    base_batch_size: int = 128
    #: `torch.compile` the model and losses (null: on a GPU)
    compile: bool | None = None
    #: TF32 matmuls on a GPU
    tf32: bool = True

    def peak_lr(self, workers: int = 1) -> float:
        """``lr`` scaled for the global batch (``batch_size`` x ``workers``) against
        ``base_batch_size`` by ``lr_scaling``: ``linear`` (Goyal et al. 2017), ``sqrt`` (Adam's
        noise scale; Malladi et al. 2022) or ``none``. The warm-up stays ``warmup_epochs``."""
        ratio = self.batch_size * workers / self.base_batch_size
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scaling]

    def __post_init__(self):
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise ValueError(f"lr_scaling must be one of none, linear, sqrt, got {self.lr_scaling!r}")
        if self.base_batch_size < 1:
            raise ValueError(f"base_batch_size must be >= 1, got {self.base_batch_size}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("epochs, batch_size and num_workers must be >= 1")
        if self.lr <= 0 or self.cpus_per_worker <= 0:
            raise ValueError("lr and cpus_per_worker must be positive")
        if self.cache_mb < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"cache_mb and shuffle_buffer must be >= 0, got {self.cache_mb}, {self.shuffle_buffer}")
        if not self.channels:
            raise ValueError("channels must not be empty")
        choices = {"mask_input": ("zeros", "token"), "target_norm": ("window", "patch"), "decoder": ("linear", "mixer")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        weights = (self.mse_weight, self.stft_weight, self.spectral_weight, self.align_weight)
        if min(weights) < 0 or not sum(weights) > 0:
            raise ValueError(f"mse_weight, stft_weight, spectral_weight and align_weight must be >= 0, one of them > 0, "
                             f"got {weights}")
        if self.align_weight > 0 and not {"PPG", "ECG"} <= set(self.channels):
            raise ValueError(f"align_weight aligns PPG with ECG: channels must hold both, got {list(self.channels)}")
        if self.patch_length < 1 or self.align_temperature <= 0:
            raise ValueError("patch_length must be >= 1 and align_temperature > 0")


@config_class
class CorpusSource:
    """One source of a pretraining corpus. The keys marked build-corpus say how ``biofm
    build-corpus`` makes ``path`` from recordings (:mod:`biofm.corpus`); a task's labels give the
    floors per class."""

    #: a build-windows output folder (or URI), relative to the corpus YAML
    path: str
    #: draws of each window per epoch on average (2: twice; 0.5: half of them)
    weight: float = 1.0
    #: the source's name in the history (default: the folder's)
    name: str = ""
    #: build-corpus: the recordings' folder under `--raw-root` (`csv:`, `array:`, ... picks a format)
    raw: str = ""
    #: build-corpus: read it as this built-in task (labels kept, unused in pretraining)
    task: str = ""
    #: build-corpus: only these recordings (default: all)
    cases: tuple[str, ...] = ()
    #: build-corpus: the channels to read
    channels: tuple[str, ...] = ("PPG", "ECG")
    #: build-corpus: sampling rate of a CSV without a time column, Hz
    rate_hz: float | None = None
    #: build-corpus: share of recordings (a task's: subjects) kept for validation
    val_share: float = 0.2

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if not 0 <= self.val_share < 1:
            raise ValueError(f"val_share must be in [0, 1), got {self.val_share}")


@config_class
class CorpusConfig:
    """A corpus YAML (``biofm pretrain --data-dir corpus.yaml``): its ``sources``, relative paths
    taken from the YAML's folder."""

    #: the corpus's sources (CorpusSource)
    sources: tuple[CorpusSource, ...]

    def __post_init__(self):
        if not self.sources:
            raise ValueError("a corpus needs at least one source")


@config_class
class ButppgConfig:
    """BUT-PPG preprocessing (``configs/butppg.yaml``)."""

    #: channel order of the windows
    channels: tuple[str, ...] = ("ACC_X", "ACC_Y", "ACC_Z", "PPG", "ECG")
    #: which PPG colour channel of the recording
    ppg_signal: int = 0
    #: subject shares of train, val, test
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: seed of the subject split
    seed: int = 0

    def __post_init__(self):
        if "PPG" not in self.channels:
            raise ValueError(f"channels must include PPG, got {list(self.channels)}")
        if self.ppg_signal < 0:
            raise ValueError(f"ppg_signal must be >= 0, got {self.ppg_signal}")


@config_class
class FinetuneConfig:
    """Staged fine-tuning of a pretrained encoder on a task (``configs/finetune_butppg.yaml``).

    The encoder's channels the task lacks are absent, the task's the encoder lacks are added
    (``inflation``). Stage 1 trains the head for ``head_epochs`` with the encoder frozen; stage 2
    (the remaining ``epochs - head_epochs``) also trains the last ``unfreeze_last_n`` mixer layers
    at ``lr``.
    """

    #: the model's channels (null: the task's); missing ones are absent or added
    channels: tuple[str, ...] | None = None
    #: the checkpoint's channels, checked (null: any)
    pretrain_channels: tuple[str, ...] | None = None
    #: `pretrained` encoder, or `scratch` (random weights, all trained)
    init: str = "pretrained"
    #: how added channels' weights start: `preserve`, `mean` or `random`
    inflation: str = "preserve"
    #: all epochs, both stages
    epochs: int = 30
    #: stage 1: epochs training the head alone
    head_epochs: int = 5
    #: stage 2: encoder layers trained too (0: a linear probe)
    unfreeze_last_n: int = 2
    #: stage 2 learning rate of the encoder layers
    lr: float = 2e-5
    #: learning rate of the head
    head_lr: float = 1e-3
    #: AdamW weight decay
    weight_decay: float = 0.01
    #: windows per step and worker
    batch_size: int = 32
    #: `weighted` loss, balanced `sampler` (binary) or `none`
    class_balance: str = "weighted"
    #: `huber` or `mse` on the standardised target
    regression_loss: str = "huber"
    #: dropout before the head
    dropout: float = 0.1
    #: largest gradient norm
    grad_clip: float = 1.0
    #: mixed precision on a GPU
    amp: bool = True
    #: seed of weights and shuffling
    seed: int = 0
    #: Ray Train workers
    num_workers: int = 1
    #: CPUs per worker
    cpus_per_worker: float = 1.0
    #: share of a GPU per worker, on a GPU
    gpus_per_worker: float = 1.0
    #: train on GPUs (null: when the cluster has them)
    use_gpu: bool | None = None
    #: restarts from the last checkpoint after a lost worker
    max_failures: int = 1

    def __post_init__(self):
        choices = {"init": ("pretrained", "scratch"), "inflation": ("preserve", "mean", "random"),
                   "class_balance": ("weighted", "sampler", "none"), "regression_loss": ("huber", "mse")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.head_epochs <= self.epochs:
            raise ValueError(f"head_epochs (stage 1) must be between 0 and epochs ({self.epochs}), got "
                             f"{self.head_epochs}: lower head_epochs (--head-epochs) or raise epochs")
        if self.unfreeze_last_n < 0 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("unfreeze_last_n must be >= 0, batch_size and num_workers >= 1")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("lr and head_lr must be positive")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")


SEARCH_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


@config_class
class TuneSearchConfig:
    """A Ray Tune search over fine-tuning schedules (``configs/tune_finetune.yaml``).

    ``search`` maps FinetuneConfig fields to one of ``{loguniform: [lo, hi]}``,
    ``{uniform: [lo, hi]}``, ``{randint: [lo, hi]}`` (both ends included), ``{choice: [...]}``
    or ``{grid: [...]}``. ``mode: grid`` runs every combination of the ``grid`` values once;
    ``random`` draws ``num_samples`` configurations (crossed with any ``grid`` entries). ASHA
    stops poor trials on val AUROC after ``grace_period`` epochs. Each trial trains one worker
    with ``cpus_per_trial`` CPUs and ``gpus_per_trial`` of a GPU (0: CPU only). A trial whose
    process dies (its node lost) is started again up to ``trial_max_failures`` times and continues
    its fine-tuning run from that run's last checkpoint.
    """

    #: the fine-tuning YAML the trials change
    finetune_config: str = "configs/finetune_butppg.yaml"
    #: `random` draws, or every `grid` combination
    mode: str = "random"
    #: random mode: configurations drawn
    num_samples: int = 8
    #: epochs of a trial that ASHA does not stop
    max_epochs: int = 12
    #: epochs before ASHA may stop a trial
    grace_period: int = 3
    #: ASHA keeps 1 in this many trials per rung
    reduction_factor: int = 2
    #: CPUs per trial
    cpus_per_trial: float = 0.5
    #: share of a GPU per trial (0: CPU only)
    gpus_per_trial: float = 0.0
    #: trials running at once
    max_concurrent_trials: int = 2
    #: restarts of a trial whose process died
    trial_max_failures: int = 2
    #: seed of the search
    seed: int = 0
    #: FinetuneConfig key -> `{loguniform: [lo, hi]}` (or `uniform`, `randint`), `{choice: [...]}` or `{grid: [...]}`
    search: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("random", "grid"):
            raise ValueError(f"mode must be random or grid, got {self.mode!r}")
        if min(self.num_samples, self.max_epochs, self.grace_period, self.max_concurrent_trials) < 1:
            raise ValueError("num_samples, max_epochs, grace_period and max_concurrent_trials must be >= 1")
        if self.grace_period >= self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must be below max_epochs ({self.max_epochs}), "
                             "or ASHA can stop no trial")
        if (self.reduction_factor < 2 or self.cpus_per_trial <= 0 or not 0 <= self.gpus_per_trial <= 1
                or self.trial_max_failures < 0):
            raise ValueError("need reduction_factor >= 2, cpus_per_trial > 0, 0 <= gpus_per_trial <= 1, "
                             "trial_max_failures >= 0")
        fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"channels", "pretrain_channels", "epochs"}
        for key, spec in self.search.items():
            if key not in fields:
                raise ValueError(f"search: unknown key {key!r} (searchable: {', '.join(sorted(fields))})")
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS
                    and isinstance(next(iter(spec.values())), list)):
                raise ValueError(f"search.{key}: expected one of {{{', '.join(SEARCH_KINDS)}}}: [values], got {spec!r}")
            kind, values = next(iter(spec.items()))
            if kind in ("loguniform", "uniform", "randint") and len(values) != 2:
                raise ValueError(f"search.{key}: {kind} takes [low, high], got {values}")
            if self.mode == "grid" and kind not in ("grid", "choice"):
                raise ValueError(f"search.{key}: mode grid needs grid or choice lists, got {kind}")


STAGES = ("splits", "windows", "pretrain", "butppg", "finetune", "tune", "embed")
EMBED_KEYS = {"split": "val", "tokens": False, "batch_size": 256}  # the pipeline's embed section and its defaults


@config_class
class PipelineConfig:
    """The end-to-end pipeline (``configs/pipeline.yaml``, ``configs/smoke.yaml``).

    Every stage writes under ``output_dir``. VitalDB: ``case_set`` (a vitaldb case set, a case
    list file or a folder of .vital files) split by ``split_mode``; the first ``max_cases``
    ``{split: n}`` of each split are windowed from ``vital_source`` (``api``, a folder, or a
    cloud URI). BUT-PPG: read from ``butppg_raw_dir``, downloaded there first from PhysioNet (or
    ``physionet_url``) when ``butppg_download`` and the folder holds no RECORDS. ``pretrain``,
    ``butppg``, ``finetune`` and ``tune`` override fields of the YAML configs they name; ``tune: null``
    leaves the search out. ``embed`` (``{split, tokens, batch_size}``; null: left out) adds the
    embeddings of a VitalDB split by the foundation model. Relative paths are relative to the
    working directory.
    """

    #: every stage writes under it
    output_dir: str = "runs/quick"
    #: the channels YAML
    channels_yaml: str = "configs/channels.yaml"
    #: the windows YAML
    windows_yaml: str = "configs/windows.yaml"
    #: VitalDB case set, a case list file or a folder of .vital files
    case_set: str = "bis"
    #: `fasttrack` or `full` VitalDB split
    split_mode: str = "fasttrack"
    #: seed of the case split
    split_seed: int = 0
    #: case shares of train, val, test
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: `{train: n, val: n}`: the first n cases of each split are windowed
    max_cases: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 6, "val": 2})
    #: `api`, a folder or a cloud URI holding the .vital files
    vital_source: str = "api"
    #: VitalDB API address (null: the public one)
    api_url: str | None = None
    #: the pretraining YAML
    pretrain_config: str = "configs/ssl_pretrain.yaml"
    #: keys of the pretraining YAML overridden
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the BUT-PPG YAML
    butppg_config: str = "configs/butppg.yaml"
    #: keys of the BUT-PPG YAML overridden
    butppg: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the BUT-PPG recordings' folder
    butppg_raw_dir: str = "data/but_ppg_raw"
    #: download BUT-PPG there when it holds no RECORDS
    butppg_download: bool = True
    #: PhysioNet address (null: the public one)
    physionet_url: str | None = None
    #: the fine-tuning YAML
    finetune_config: str = "configs/finetune_butppg.yaml"
    #: keys of the fine-tuning YAML overridden
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the Tune YAML
    tune_config: str = "configs/tune_finetune.yaml"
    #: keys of the Tune YAML overridden (null: no search)
    tune: dict[str, Any] | None = None
    #: `{split, tokens, batch_size}`: embed a VitalDB split (null: no embedding)
    embed: dict[str, Any] | None = None

    def __post_init__(self):
        if self.split_mode not in ("fasttrack", "full"):
            raise ValueError(f"split_mode must be fasttrack or full, got {self.split_mode!r}")
        for split, n in self.max_cases.items():
            if split not in ("train", "val") or n < 1:
                raise ValueError(f"max_cases: expected {{train: n, val: n}} with n >= 1, got {dict(self.max_cases)}")
        unknown = sorted(set(self.embed or {}) - set(EMBED_KEYS))
        if unknown or (self.embed or {}).get("split", "val") not in ("train", "val"):
            raise ValueError(f"embed: expected {{split: train|val, tokens: bool, batch_size: n}}, got {self.embed}")


def with_overrides(cls: type, path: str | Path, overrides: dict, where: str):
    """``cls`` loaded from ``path``, then ``overrides`` (field: value, from YAML or command-line
    flags) applied and checked like the file's own keys; errors name ``where`` and ``path``."""
    return from_dict(cls, {**to_jsonable(load_config(cls, path)), **overrides}, f"{where} (over {path})")
