"""The ``biofm`` command. Each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import functools
import sys

from biofm.errors import BiofmError, ConfigError


def _output_folder(location: str, flag: str) -> None:
    """A folder the command writes into must not be a file: said before any work."""
    from biofm import storage

    if storage.is_file(location):
        raise ConfigError(f"{flag} {location} is a file, not a folder: choose a folder")


def _prepare_splits(args) -> int:
    from biofm.splits import prepare_splits

    _output_folder(args.output, "--output")
    ratios = tuple(args.ratios)
    out = prepare_splits(args.mode, args.case_set, args.output, seed=args.seed, ratios=ratios)
    print(f"[prepare-splits] wrote {out}")
    return 0


def _build_windows(args) -> int:
    _output_folder(args.outdir, "--outdir")
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import build_windows
    from biofm.sources.formats import open_source
    from biofm.splits import load_split

    channels = load_config(ChannelsConfig, args.channels_yaml).select(args.channels)
    windows = load_config(WindowsConfig, args.windows_yaml)
    case_ids = load_split(args.split_file, args.split)
    source = open_source(args.source, args.api_url, args.rate_hz)
    inputs = {"split_file": args.split_file, "split": args.split, "channels_yaml": args.channels_yaml,
              "windows_yaml": args.windows_yaml, "source": args.source, "rate_hz": args.rate_hz}
    m = build_windows(case_ids, source, channels, windows, args.outdir, args.split,
                      overwrite=args.overwrite, address=args.address, inputs=inputs)
    print(f"[build-windows {args.split}] {m['cases_ok']}/{m['cases_in']} cases ok, "
          f"{m['windows_kept']} windows -> {args.outdir}/{args.split} "
          f"(skipped: {m['skip_reasons'] or 'none'})")
    return 0


def _build_corpus(args) -> int:
    _output_folder(args.outdir, "--outdir")
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.corpus import build_corpus

    counts = build_corpus(args.corpus, args.raw_root, args.outdir, load_config(ChannelsConfig, args.channels_yaml),
                          load_config(WindowsConfig, args.windows_yaml), args.seed, args.address)
    total = {s: sum(c.get(s, 0) for c in counts.values()) for s in ("train", "val")}
    print(f"[build-corpus] {len(counts)} sources, {total['train']} train + {total['val']} val windows -> "
          f"{args.outdir}/corpus.yaml (biofm pretrain --data-dir {args.outdir}/corpus.yaml)")
    return 0


def _flags(**values) -> dict:
    """The command-line flags that were given (argparse leaves the others None)."""
    return {k: v for k, v in values.items() if v is not None}


def _pretrain_config(args):
    from biofm.config import PretrainConfig, with_overrides

    return with_overrides(PretrainConfig, args.config, _flags(
        channels=args.channels, init=args.init, mask_ratio=args.mask_ratio, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, num_workers=args.num_workers, use_gpu=args.use_gpu, amp=False if args.no_amp else None,
        lr_scaling=args.lr_scaling, compile=args.compile), "command-line flags")


def _pretrain(args) -> int:
    cfg = _pretrain_config(args)  # a wrong value is said before torch and Ray load
    _output_folder(args.output_dir, "--output-dir")
    from biofm.train.pretrain import pretrain

    data = args.data_dir[0] if len(args.data_dir) == 1 else args.data_dir
    final = pretrain(cfg, data, args.output_dir, resume=args.resume, address=args.address)
    print(f"[pretrain] done: epoch {final['epoch']}, val loss {final['val_loss']:.4f} -> {args.output_dir}")
    return 0


def _smoke(args) -> int:
    _output_folder(args.output_dir, "--output-dir")
    from biofm.train.evaluate import smoke

    m = smoke(args.data_dir, args.output_dir, max_windows=args.max_windows)
    for name, ok in m["checks"].items():
        print(f"[smoke] {name:15s} {'ok' if ok else 'FAILED'}")
    print(f"[smoke] loss {m['loss_before']:.4f} -> {m['loss_after']:.4f}, {m['runtime_s']} s -> {args.output_dir}")
    return 0 if m["passed"] else 1


def _evaluate_ssl(args) -> int:
    import json

    from biofm import storage

    if args.output and storage.is_dir(args.output):
        raise ConfigError(f"--output {args.output} is a folder: name the JSON file to write")
    from biofm.train.evaluate import evaluate_ssl, format_table

    result = evaluate_ssl(args.checkpoint, args.data_dir[0] if len(args.data_dir) == 1 else args.data_dir, args.split)
    print(format_table(result))
    if args.output:
        storage.write_text(args.output, json.dumps(result, indent=1))
    else:
        print(json.dumps(result, indent=1))
    return 0


def _prepare_task(args) -> int:
    from biofm.config import ButppgConfig, ChannelsConfig, WindowsConfig, load_config
    from biofm.tasks import TASKS, builtin_task, table_task

    if args.labels and args.task in TASKS:
        raise ConfigError(f"--labels makes a task of your own: name it otherwise than the built-in {args.task}")
    task, rows = table_task(args.task, args.labels, args.classes) if args.labels else (builtin_task(args.task), None)
    butppg = load_config(ButppgConfig, args.config)
    channels = load_config(ChannelsConfig, args.channels_yaml).select(args.channels or task.channels or butppg.channels)
    windows = load_config(WindowsConfig, args.windows_yaml)
    _output_folder(args.outdir, "--outdir")
    from biofm.sources.butppg import download, raw_folder
    from biofm.tasks import prepare_task

    if args.download:
        download(raw_folder(args.raw_dir), args.physionet_url)
    prepare_task(task, args.raw_dir, args.outdir, channels, windows, split_ratios=tuple(args.split_ratios or butppg.split_ratios),
                 seed=butppg.seed if args.seed is None else args.seed,
                 ppg_signal=butppg.ppg_signal if args.ppg_signal is None else args.ppg_signal, label_rows=rows,
                 address=args.address, fit=args.fit, rate_hz=args.rate_hz)
    return 0


def _finetune_config(args):
    from biofm.config import FinetuneConfig, with_overrides

    cfg = with_overrides(FinetuneConfig, args.config, _flags(
        channels=args.finetune_channels, pretrain_channels=args.pretrain_channels,
        unfreeze_last_n=args.unfreeze_last_n, epochs=args.epochs,
        head_epochs=args.head_epochs, lr=args.lr, batch_size=args.batch_size, init=args.init,
        inflation=args.inflation, num_workers=args.num_workers, use_gpu=args.use_gpu,
        amp=False if args.no_amp else None), "command-line flags")
    return cfg


def _finetune(args) -> int:
    cfg = _finetune_config(args)  # a wrong value is said before torch and Ray load
    _output_folder(args.output_dir, "--output-dir")
    from biofm.train.finetune import finetune
    from biofm.train.transfer import compare_variants

    if args.baselines:
        compare_variants(cfg, args.pretrained, args.data_dir, args.output_dir, address=args.address)
    else:
        finetune(cfg, args.pretrained, args.data_dir, args.output_dir, address=args.address, resume=args.resume)
    return 0


def _finetune_cv(args) -> int:
    cfg = _finetune_config(args)
    _output_folder(args.output_dir, "--output-dir")
    from biofm.train.transfer import cross_validate

    cross_validate(cfg, args.pretrained, args.data_dir, args.output_dir,
                   folds=args.folds, variants=args.variants, seed=args.seed, address=args.address)
    return 0


def _tune(args) -> int:
    from biofm.config import FinetuneConfig, TuneSearchConfig, load_config, with_overrides
    from biofm.tune import run_search

    tcfg = with_overrides(TuneSearchConfig, args.config, _flags(num_samples=args.num_samples), "command-line flags")
    base = load_config(FinetuneConfig, args.finetune_config or tcfg.finetune_config)
    _output_folder(args.output_dir, "--output-dir")
    exp = run_search(tcfg, base, args.pretrained, args.data_dir, args.output_dir, name=args.name,
                     resume=args.resume, address=args.address)
    print(f"[tune] experiment in {exp}; analyse it again with: biofm tune-report {exp}")
    return 0


def _embed(args) -> int:
    _output_folder(args.output, "--output")
    from biofm.infer import embed

    embed(args.checkpoint, args.data_dir, args.output, batch_size=args.batch_size, concurrency=args.concurrency,
          num_gpus=args.num_gpus, tokens=args.tokens, address=args.address, compile=args.compile, bf16=args.bf16)
    return 0


def _predict(args) -> int:
    _output_folder(args.output, "--output")
    from biofm.infer import predict

    predict(args.model, args.input, args.output, batch_size=args.batch_size, plots=args.plots, address=args.address)
    return 0


def _benchmark(args) -> int:
    from biofm.config import FinetuneConfig, load_config

    finetune = load_config(FinetuneConfig, args.finetune) if args.finetune else None
    _output_folder(args.output, "--output")
    from biofm.benchmark import benchmark

    benchmark(args.encoder, args.tasks, args.output, folds=args.folds, resamples=args.resamples, seed=args.seed,
              fixed_split=args.fixed_split, batch_size=args.batch_size, finetune=finetune, address=args.address)
    return 0


def _tune_report(args) -> int:
    from biofm.tune import analyse

    summary = analyse(args.experiment)
    print(f"[tune-report] {summary['trials']} trials: {summary['completed']} completed, "
          f"{summary['stopped_early']} stopped early, {summary['errors']} failed"
          + (f"; best {summary['best_trial']} ({summary['metric_name']} {summary['best']:.4f}) -> "
             f"{args.experiment}/best_config.yaml" if "best_trial" in summary else ""))
    return 0


def _pipeline(args) -> int:
    from biofm.config import PipelineConfig, parse_yaml, with_overrides
    from biofm.pipeline import run_pipeline

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = parse_yaml(value, f"--set {key}")
    cfg = with_overrides(PipelineConfig, args.config, {**overrides, **_flags(output_dir=args.output_dir)}, "--set")
    run_pipeline(cfg, force=tuple(args.force), address=args.address)
    return 0


def _task_source_flags(p) -> None:
    p.add_argument("--config", default="configs/butppg.yaml", help="BUT-PPG's channel order and PPG colour channel; "
                   "the split ratios and seed")
    p.add_argument("--channels-yaml", default="configs/channels.yaml", help="channel filters")
    p.add_argument("--windows-yaml", default="configs/windows.yaml", help="rate and window length")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def _finetune_flags(p) -> None:
    config = "configs/finetune_butppg.yaml"

    def flag(*names, **kwargs):
        _from_config(p.add_argument(*names, **kwargs), config, "FinetuneConfig", names[0][2:].replace("-", "_"))

    p.add_argument("--config", default=config, help=CONFIG_HELP)
    p.add_argument("--pretrained", default="artifacts/foundation_model/best_model.pt",
                   help="pretraining checkpoint (best_model.pt)")
    p.add_argument("--data-dir", default="data/but_ppg", help="output of prepare-butppg")
    p.add_argument("--pretrain-channels", nargs="+", default=None, metavar="NAME",
                   help="the pretraining checkpoint's channels, checked (default: whatever it has)")
    p.add_argument("--finetune-channels", nargs="+", default=None, metavar="NAME",
                   help="the model's channels, by name (default: the config's; null there: the task's); the "
                        "encoder's the task lacks are absent, the task's it lacks are added")
    flag("--unfreeze-last-n", type=AT_LEAST_0, default=None, help="mixer layers trained in stage 2")
    flag("--epochs", type=COUNT, default=None, help="all epochs, stage 1 included")
    flag("--head-epochs", type=AT_LEAST_0, default=None, help="stage 1: head-only epochs")
    flag("--lr", type=POSITIVE, default=None, help="learning rate of the unfrozen encoder layers")
    flag("--batch-size", type=COUNT, default=None, help="records per batch")
    flag("--init", choices=["pretrained", "scratch"], default=None,
         help="start from the pretrained encoder, or the same architecture with random weights")
    flag("--inflation", choices=["preserve", "mean", "random"], default=None, help="how the new channels' weights start")
    flag("--num-workers", type=COUNT, default=None, help="Ray Train workers (DDP when > 1)")
    flag("--use-gpu", action="store_true", default=None, help="train on GPUs (null: when present)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)


def _number(kind: type, low: float, above: bool = False):
    """An argparse type: ``kind`` (int or float) at least ``low`` (more than it, with ``above``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, AT_LEAST_0, POSITIVE = _number(int, 1), _number(int, 0), _number(float, 0, above=True)


def _from_config(action: argparse.Action, path: str, config_class: str, field: str) -> None:
    """Mark a flag whose default is ``field`` of the YAML ``path`` (``biofm.config.<config_class>``):
    its help shows that value, read when help is shown."""
    action.from_config = (path, config_class, field)


def _config_default(path: str, config_class: str, field: str) -> str:
    from biofm import config

    value = getattr(config.load_config(getattr(config, config_class), path), field)
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else "null" if value is None else str(value)
    return shown.replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """An error in the flags is one line (and the way to the help), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONFIG_HELP = "YAML config (configs/<name> is read from here if present, else from the package); flags override it"
ADDRESS_HELP = "Ray cluster address (default: RAY_ADDRESS, else a local Ray)"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, where it has one worth stating."""

    def _get_help_string(self, action):
        help = action.help or ""
        if hasattr(action, "from_config"):
            path = action.from_config[0]
            return f"{help} (default: {_config_default(*action.from_config)}, from {path})"
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in help:
            return help
        return f"{help} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from biofm import __version__

    parser = _Parser(prog="biofm", formatter_class=_HelpFormatter, description=(
        "biofm: VitalDB preprocessing (Ray Data), TTM pretraining (Ray Train), BUT-PPG fine-tuning and "
        "schedule search (Ray Tune). Run `biofm COMMAND --help` for a command's flags."))
    parser.add_argument("--version", action="version", version=f"biofm {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and the libraries' own log lines and warnings (hidden by default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    p = sub.add_parser("prepare-splits", help="split recordings (VitalDB cases, or a folder in any format) into train/val/test",
                       description="Split the recordings into train/val/test (by recording, deterministic).")
    p.add_argument("--mode", choices=["fasttrack", "full"], default="fasttrack",
                   help="fasttrack: a deterministic subset of 70 cases; full: all of them")
    p.add_argument("--case-set", default="bis",
                   help="a vitaldb case set (bis, tiva, ...), a text file of case ids, or a folder of recordings "
                        "(.vital, WFDB, EDF, CSV, MATLAB/NumPy; a wfdb: ... prefix names the format)")
    p.add_argument("--output", default="data", help="folder for splits_<mode>.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and the split")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                   metavar=("TRAIN", "VAL", "TEST"), help="shares of the cases per split")
    p.set_defaults(func=_prepare_splits)

    p = sub.add_parser("build-windows", help="recordings (VitalDB, WFDB, EDF, CSV, MATLAB/NumPy) -> quality-checked windows "
                                             "in Parquet (Ray Data)",
                       description="Read recordings, resample, band-pass, cut windows, reject bad ones, "
                                   "write Parquet and manifest.json. Rerunning resumes.")
    p.add_argument("--channels-yaml", default="configs/channels.yaml", help="channel tracks and filters")
    p.add_argument("--windows-yaml", default="configs/windows.yaml", help="window length and quality rules")
    p.add_argument("--split-file", required=True, help="splits JSON from prepare-splits")
    p.add_argument("--split", default="train", help="which split of --split-file to window")
    p.add_argument("--outdir", default="data/vitaldb_windows", help="windows go to <outdir>/<split>/ (a folder or URI)")
    p.add_argument("--channels", nargs="+", default=["PPG", "ECG"], help="channels, in order")
    p.add_argument("--source", default="api",
                   help="'api' (VitalDB open dataset), or a folder or cloud URI (s3://...) of .vital, WFDB, EDF, CSV "
                        "or MATLAB/NumPy recordings; a prefix (wfdb:, edf:, csv:, array:, vital:) names the format of "
                        "a mixed folder")
    p.add_argument("--api-url", default=None, help="base URL of the API or a mirror (with --source api)")
    p.add_argument("--rate-hz", type=POSITIVE, default=None,
                   help="sample rate of CSV files without a time column and of arrays that name no rate")
    p.add_argument("--overwrite", action="store_true", help="delete this split's output and start over")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_build_windows)

    p = sub.add_parser("build-corpus", help="a corpus YAML's sources, from their recordings -> windows, one folder each",
                       description="Windows every source of a corpus YAML (raw:, task:, cases:, channels: per source) "
                                   "from --raw-root into <outdir>/<path>, and copies the YAML to <outdir>/corpus.yaml "
                                   "for biofm pretrain --data-dir.")
    p.add_argument("--corpus", default="configs/corpus_realdata.yaml", help="the corpus YAML")
    p.add_argument("--raw-root", required=True, help="the folder its sources' raw: paths are under")
    p.add_argument("--outdir", default="data/corpus", help="where the sources' windows and corpus.yaml go")
    p.add_argument("--channels-yaml", default="configs/channels.yaml", help="channel tracks and filters")
    p.add_argument("--windows-yaml", default="configs/windows.yaml", help="window length and quality rules")
    p.add_argument("--seed", type=int, default=0, help="seed of each source's train/val split")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_build_corpus)

    p = sub.add_parser("pretrain", help="self-supervised pretraining of the TTM encoder (Ray Train)",
                       description="Masked signal modeling on <data-dir>/train, validated on <data-dir>/val (several "
                                   "--data-dir: one corpus). "
                                   "Flags override the YAML config.")
    p.add_argument("--config", default="configs/ssl_pretrain.yaml", help=CONFIG_HELP)

    def flag(*names, **kwargs):
        _from_config(p.add_argument(*names, **kwargs), "configs/ssl_pretrain.yaml", "PretrainConfig",
                     names[0][2:].replace("-", "_"))

    p.add_argument("--data-dir", nargs="+", default=["data/vitaldb_windows"],
                   help="windows from build-windows (train/ and val/); several, or a corpus YAML (sources: "
                        "[{path, weight, name}]): one corpus, each source's windows counted per epoch, a channel a "
                        "source lacks given as absent (zeros, left out of the loss)")
    flag("--channels", nargs="+", default=None, help="channels to train on, in order")
    flag("--init", default=None, metavar="random|ID_OR_FOLDER[@REVISION]",
                   help="random weights, or IBM's published TTM (a Hugging Face id such as "
                        "ibm-granite/granite-timeseries-ttm-r2@1536-96-r2, or its folder): its architecture and weights")
    p.add_argument("--output-dir", default="artifacts/foundation_model", help="artifacts and checkpoints")
    flag("--mask-ratio", type=POSITIVE, default=None, help="share of (channel, 1 s patch) cells masked")
    flag("--epochs", type=COUNT, default=None, help="training epochs")
    flag("--batch-size", type=COUNT, default=None, help="windows per batch and worker")
    flag("--lr", type=POSITIVE, default=None, help="peak learning rate (AdamW)")
    flag("--num-workers", type=COUNT, default=None, help="Ray Train workers (DDP when > 1)")
    flag("--use-gpu", action="store_true", default=None, help="train on GPUs (null: when present)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    flag("--lr-scaling", choices=["none", "sqrt", "linear"], default=None,
         help="scale --lr for the global batch (batch size x workers) against base_batch_size")
    flag("--compile", action=argparse.BooleanOptionalAction, default=None,
         help="torch.compile the model and losses (null: on a GPU, off on a CPU)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("smoke", help="one CPU epoch on 64 real windows; checks shapes, finiteness, loss decrease",
                       description="Fast end-to-end check of the model on real windows; exits 1 if a check fails.")
    p.add_argument("--data-dir", default="data/vitaldb_windows", help="windows from build-windows (uses train/)")
    p.add_argument("--max-windows", type=COUNT, default=64, help="windows trained on")
    p.add_argument("--output-dir", default="artifacts/smoke", help="best_model.pt and smoke_metrics.json")
    p.set_defaults(func=_smoke)

    p = sub.add_parser("evaluate-ssl", help="masked-cell MSE of a pretrained model against the floors",
                       description="The model against predicting zero, linear interpolation and copying one beat "
                                   "period earlier, on the same fixed masks: overall, per channel, per source of a "
                                   "corpus and per class of a task's windows.")
    p.add_argument("--checkpoint", default="artifacts/foundation_model/best_model.pt", help="pretraining checkpoint")
    p.add_argument("--data-dir", nargs="+", default=["data/vitaldb_windows"],
                   help="windows from build-windows or prepare-task; several, or a corpus YAML: one corpus")
    p.add_argument("--split", default="val", help="split to evaluate on")
    p.add_argument("--output", default=None, help="write the JSON here instead of printing it")
    p.set_defaults(func=_evaluate_ssl)

    from biofm.tasks import TASKS

    p = sub.add_parser("prepare-task", help="a labelled task (built in, or your label table) -> windows in Parquet, split by subject",
                       description="Reads the task's recordings, prepares each labelled 10 s window with the training "
                                   "preprocessing (quality checked, never dropped), splits subjects into train/val/test "
                                   f"(Ray Data). Built-in tasks: {', '.join(TASKS)}.")
    p.add_argument("--task", required=True, help="a built-in task, or the name of yours (with --labels)")
    p.add_argument("--raw-dir", required=True, help="the recordings, in their published layout: BUT-PPG 2.0.0 (with "
                   "RECORDS), the PPG arrhythmia set (MPA_*.mat), PPG-BP (0_subject/ and its xlsx), TROIKA "
                   "(DATA_*.mat or TEST_*.mat with their truth files), CapnoBase (*_8min.mat), CinC 2017 (A*.mat, "
                   "REFERENCE.csv); for a label table, a folder of recordings in any format build-windows reads "
                   "(.vital, WFDB, EDF/BDF, CSV/TSV, MATLAB/NumPy; a prefix such as csv: names one)")
    p.add_argument("--outdir", required=True, help="train/val/test Parquet and manifest.json")
    p.add_argument("--labels", default=None, help="your label table (CSV or Parquet): recording, start_s, subject_id, "
                   "label or target")
    p.add_argument("--classes", nargs="+", default=None, help="the label table's classes in order (default: its labels, sorted)")
    p.add_argument("--channels", nargs="+", default=None, help="channels, in order (default: the task's: PPG for the "
                   "arrhythmia set and PPG-BP, ACC_X ACC_Y ACC_Z PPG for TROIKA, ECG for CinC 2017, PPG ECG for "
                   "CapnoBase and a label table, the --config's for BUT-PPG)")
    p.add_argument("--split-ratios", nargs=3, type=_number(float, 0), default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="subjects per split (default: the --config's)")
    p.add_argument("--seed", type=int, default=None, help="seed of the subject split (default: the --config's)")
    p.add_argument("--ppg-signal", type=AT_LEAST_0, default=None,
                   help="which PPG signal of a recording that has several: BUT-PPG's colour channel (default: the "
                        "--config's), TROIKA's wrist PPG 0 or 1 (default 0)")
    p.add_argument("--fit", choices=["tile", "concat", "pad"], default=None,
                   help="how PPG-BP's 2.1 s segments become a 10 s window: each segment held at its last value (pad, "
                        "the default: it served the encoder best on validation), repeated (tile), or a subject's "
                        "three end to end and repeated (concat)")
    p.add_argument("--rate-hz", type=POSITIVE, default=None,
                   help="sample rate of a label table's CSV files without a time column (and arrays that name none)")
    _task_source_flags(p)
    p.set_defaults(func=_prepare_task, download=False, physionet_url=None)

    p = sub.add_parser("prepare-butppg", help="BUT-PPG records -> 5-channel 10 s rows in Parquet, split by subject",
                       description="prepare-task --task butppg-quality: read BUT-PPG (PhysioNet layout), resample and "
                                   "filter PPG/ECG/ACC to [5, 1250], label from quality-hr-ann.csv, split by subject (Ray Data).")
    p.add_argument("--raw-dir", required=True, help="the BUT-PPG 2.0.0 folder (with RECORDS)")
    p.add_argument("--outdir", default="data/but_ppg", help="train/val/test Parquet and manifest.json")
    p.add_argument("--download", action="store_true", help="first fetch the dataset from PhysioNet into --raw-dir")
    p.add_argument("--physionet-url", default=None, help="PhysioNet's files URL (default https://physionet.org/files/) or a mirror laid "
                   "out like it (with --download)")
    _task_source_flags(p)
    p.set_defaults(func=_prepare_task, task="butppg-quality", labels=None, classes=None, channels=None, split_ratios=None,
                   seed=None, ppg_signal=None, fit=None, rate_hz=None)

    p = sub.add_parser("finetune", help="fine-tune a pretrained encoder on a task's channels, in stages (Ray Train)",
                       description="The encoder adapted to the task's channels by name (those it lacks inflated, its "
                                   "own the task lacks absent). Stage 1: head only; stage 2: head + last N mixer "
                                   "layers. Best epoch by the task's val figure (AUROC, macro-F1 or MAE); a binary "
                                   "task's threshold chosen on val; metrics on test.")
    _finetune_flags(p)
    p.add_argument("--output-dir", default="artifacts/but_ppg_finetuned", help="artifacts and checkpoints")
    p.add_argument("--baselines", action="store_true",
                   help="also train from scratch and a linear probe, and compare them in report.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("finetune-cv", help="subject-wise cross-validation of fine-tuning against its baselines",
                       description="Pools every window of a prepared task, splits subjects into folds, and "
                                   "fine-tunes each variant per fold; writes cv_report.json.")
    _finetune_flags(p)
    p.add_argument("--output-dir", default="artifacts/but_ppg_cv", help="per-fold runs and cv_report.json")
    p.add_argument("--folds", type=_number(int, 2), default=5, help="subject-wise folds")
    p.add_argument("--variants", nargs="+", choices=["finetuned", "scratch", "linear_probe"],
                   default=["finetuned", "scratch", "linear_probe"], help="what to train per fold")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds")
    p.set_defaults(func=_finetune_cv)

    p = sub.add_parser("tune", help="search fine-tuning schedules with Ray Tune (ASHA on the task's val figure: AUROC, macro-F1 or MAE)",
                       description="One fine-tuning run per trial; poor schedules stop early. --resume "
                                   "finishes an interrupted experiment without rerunning completed trials.")
    p.add_argument("--config", default="configs/tune_finetune.yaml", help=CONFIG_HELP)
    p.add_argument("--finetune-config", default=None, help="base fine-tuning config (default: the tune config's)")
    p.add_argument("--pretrained", default="artifacts/foundation_model/best_model.pt", help="pretraining checkpoint")
    p.add_argument("--data-dir", default="data/but_ppg", help="output of prepare-butppg")
    p.add_argument("--output-dir", default="artifacts/tune", help="experiments go here")
    p.add_argument("--name", default="finetune_schedules", help="experiment name (a folder in --output-dir)")
    _from_config(p.add_argument("--num-samples", type=COUNT, default=None, help="configurations drawn (mode random)"),
                 "configs/tune_finetune.yaml", "TuneSearchConfig", "num_samples")
    p.add_argument("--resume", action="store_true", help="finish an interrupted experiment, retrying failed trials")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_tune)

    p = sub.add_parser("pipeline", help="every stage from one config: splits, windows, pretrain, BUT-PPG, finetune, tune, embed",
                       description="Runs prepare-splits, build-windows (train, val), pretrain, prepare-butppg, "
                                   "finetune and, with a tune or embed section, tune and embed. A stage whose output was made "
                                   "from the same settings is skipped; an interrupted one continues.")
    p.add_argument("--config", default="configs/pipeline.yaml", help=CONFIG_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a pipeline config key (value in YAML), e.g. --set vital_source=/data/vital")
    p.add_argument("--output-dir", default=None, help="where every stage writes (default: the config's output_dir)")
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                   help="rerun these stages even if up to date: splits windows pretrain butppg finetune tune embed")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_pipeline)

    p = sub.add_parser("embed", help="embeddings of a windows split with a trained encoder (Ray Data)",
                       description="Streams the split through an actor pool holding the encoder (a pretraining "
                                   "checkpoint, or a fine-tuned classifier's) and writes Parquet: ids, window_idx, "
                                   "start_s, embedding [D] (the classifier's pooling), optionally tokens [P, D].")
    p.add_argument("--checkpoint", required=True, help="best_model.pt of pretrain or finetune")
    p.add_argument("--data-dir", required=True, help="a split folder of build-windows or prepare-butppg (or a URI)")
    p.add_argument("--output", required=True, help="embeddings/ and manifest.json go here")
    p.add_argument("--batch-size", type=COUNT, default=256, help="windows per model call")
    p.add_argument("--concurrency", type=COUNT, default=None,
                   help="actors holding the model (default: the free CPUs less one; with --num-gpus, one per GPU share)")
    p.add_argument("--num-gpus", type=_number(float, 0), default=0.0, help="GPUs per actor (0: CPU)")
    p.add_argument("--tokens", action="store_true", help="also write the per-patch latents [P, D]")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoder for full batches (default: on a GPU, off on a CPU)")
    p.add_argument("--bf16", action="store_true", help="run the encoder in bf16 autocast (a GPU's tensor cores)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_embed)

    p = sub.add_parser("predict", help="a fine-tuned model's answers on new recordings, in its task's words (Ray Data)",
                       description="Recordings (a folder in any format build-windows reads, or a BUT-PPG folder) go "
                                   "through the model's own preprocessing (its data spec: rate, window, filters, "
                                   "z-score, channel order; absent channels marked absent) and the model: "
                                   "predictions.parquet, summary.csv, manifest.json (skipped recordings with "
                                   "their reason) and timeline PNGs.")
    p.add_argument("--model", required=True, help="best_model.pt of biofm finetune (holds the threshold chosen on val)")
    p.add_argument("--input", required=True,
                   help="a folder of recordings (.vital, WFDB, EDF, CSV, MATLAB/NumPy; a prefix such as wfdb: names the "
                        "format of a mixed folder), or a BUT-PPG folder (with RECORDS)")
    p.add_argument("--output", required=True, help="where the predictions go (a folder or URI)")
    p.add_argument("--batch-size", type=COUNT, default=256, help="windows per model call")
    p.add_argument("--plots", type=AT_LEAST_0, default=5, help="timeline PNGs for the first N recordings")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("benchmark", help="is the encoder any good? probes on frozen embeddings over labelled tasks, "
                       "with 95%% CIs and baselines (Ray)",
                       description="Per task (prepare-task's folders): embeddings of every encoder and of the same "
                                   "architecture with random weights, hand-crafted features and the trivial answer, "
                                   "probed on the same subject-wise folds (regularisation by an inner CV on the "
                                   "training folds); 95% CIs by resampling subjects, paired for differences. Writes "
                                   "benchmark.json, benchmark.md, forest plots and out-of-fold predictions.")
    p.add_argument("--encoder", nargs="+", required=True, metavar="[NAME=]CHECKPOINT",
                   help="best_model.pt of pretrain or finetune; NAME= names its row (default: its folder)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK_DIR", help="folders written by prepare-task")
    p.add_argument("--output", required=True, help="where the report goes (a folder or URI)")
    p.add_argument("--folds", type=_number(int, 2), default=5, help="subject-wise folds (at most the subjects)")
    p.add_argument("--fixed-split", action="store_true", help="the task's own split instead: train + val against test")
    p.add_argument("--resamples", type=COUNT, default=1000, help="bootstrap resamples of subjects")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the bootstrap and the random weights")
    p.add_argument("--batch-size", type=COUNT, default=256, help="windows per model call")
    p.add_argument("--finetune", nargs="?", const="configs/finetune_butppg.yaml", default=None, metavar="CONFIG",
                   help="also fine-tune the first encoder on every fold, in stages, with this fine-tuning YAML "
                   "(its channels: the task's; default configs/finetune_butppg.yaml)")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("tune-report", help="analyse a tune experiment folder (no Ray needed)",
                       description="Table of trials, best_config.yaml (for finetune --config), PNGs.")
    p.add_argument("experiment", help="the experiment folder, e.g. artifacts/tune/finetune_schedules")
    p.set_defaults(func=_tune_report)
    return parser


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """``own_process``: called as the ``biofm`` script or a job's entry point (see
    :func:`biofm.output.configure`)."""
    from biofm import output

    args = build_parser().parse_args(argv)
    output.configure(args.verbose, own_process)
    try:
        return args.func(args)
    except BiofmError as e:
        print(f"biofm {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_job(command: str) -> None:
    """Entry point of ``jobs/<command>.py``: the same flags as ``biofm <command>``."""
    sys.exit(main([command, *sys.argv[1:]], own_process=True))


def script() -> None:
    """Entry point of the ``biofm`` script."""
    sys.exit(main(own_process=True))


if __name__ == "__main__":
    script()
