"""The ``biofm`` command. Each subcommand parses flags and calls one library function."""

from __future__ import annotations

import argparse
import sys

from biofm.errors import BiofmError


def _prepare_splits(args) -> int:
    from biofm.splits import prepare_splits

    ratios = tuple(args.ratios)
    out = prepare_splits(args.mode, args.case_set, args.output, seed=args.seed, ratios=ratios)
    print(f"wrote {out}")
    return 0


def _build_windows(args) -> int:
    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.preprocess import build_windows
    from biofm.sources.vitaldb import open_source
    from biofm.splits import load_split

    channels = load_config(ChannelsConfig, args.channels_yaml).select(args.channels)
    windows = load_config(WindowsConfig, args.windows_yaml)
    case_ids = load_split(args.split_file, args.split)
    source = open_source(args.source, args.api_url)
    inputs = {"split_file": args.split_file, "split": args.split, "channels_yaml": args.channels_yaml,
              "windows_yaml": args.windows_yaml, "source": args.source}
    m = build_windows(case_ids, source, channels, windows, args.outdir, args.split,
                      overwrite=args.overwrite, address=args.address, inputs=inputs)
    print(f"[build-windows {args.split}] {m['cases_ok']}/{m['cases_in']} cases ok, "
          f"{m['windows_kept']} windows -> {args.outdir}/{args.split} "
          f"(skipped: {m['skip_reasons'] or 'none'})")
    return 0


def _pretrain_config(args):
    import dataclasses

    from biofm.config import PretrainConfig, load_config

    cfg = load_config(PretrainConfig, args.config)
    overrides = {"channels": tuple(args.channels) if args.channels else None, "mask_ratio": args.mask_ratio,
                 "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                 "num_workers": args.num_workers, "use_gpu": args.use_gpu, "amp": False if args.no_amp else None}
    try:
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        from biofm.errors import ConfigError

        raise ConfigError(f"{args.config} with command-line overrides: {e}") from None


def _pretrain(args) -> int:
    from biofm.train.pretrain import pretrain

    cfg = _pretrain_config(args)
    final = pretrain(cfg, args.data_dir, args.output_dir, resume=args.resume, address=args.address)
    print(f"[pretrain] done: epoch {final['epoch']}, val loss {final['val_loss']:.4f} -> {args.output_dir}")
    return 0


def _smoke(args) -> int:
    from biofm.train.evaluate import smoke

    m = smoke(args.data_dir, args.output_dir, max_windows=args.max_windows)
    for name, ok in m["checks"].items():
        print(f"[smoke] {name:15s} {'ok' if ok else 'FAILED'}")
    print(f"[smoke] loss {m['loss_before']:.4f} -> {m['loss_after']:.4f}, {m['runtime_s']} s -> {args.output_dir}")
    return 0 if m["passed"] else 1


def _evaluate_ssl(args) -> int:
    import json

    from biofm.train.evaluate import evaluate_ssl, format_table

    result = evaluate_ssl(args.checkpoint, args.data_dir, args.split)
    print(format_table(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    else:
        print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="biofm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-splits", help="split VitalDB cases into train/val/test by case",
                       description="Split cases into train/val/test (by case, deterministic).")
    p.add_argument("--mode", choices=["fasttrack", "full"], default="fasttrack",
                   help="fasttrack: a deterministic subset of 70 cases; full: all of them")
    p.add_argument("--case-set", default="bis",
                   help="a vitaldb case set (bis, tiva, ...), a text file of case ids, or a folder of .vital files")
    p.add_argument("--output", default="data", help="folder for splits_<mode>.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                   metavar=("TRAIN", "VAL", "TEST"))
    p.set_defaults(func=_prepare_splits)

    p = sub.add_parser("build-windows", help="VitalDB cases -> quality-checked windows in Parquet (Ray Data)",
                       description="Read cases, resample, band-pass, cut windows, reject bad ones, "
                                   "write Parquet and manifest.json. Rerunning resumes.")
    p.add_argument("--channels-yaml", default="configs/channels.yaml")
    p.add_argument("--windows-yaml", default="configs/windows.yaml")
    p.add_argument("--split-file", required=True, help="splits JSON from prepare-splits")
    p.add_argument("--split", default="train")
    p.add_argument("--outdir", default="data/vitaldb_windows")
    p.add_argument("--channels", nargs="+", default=["PPG", "ECG"], help="channels, in order")
    p.add_argument("--source", default="api",
                   help="'api' (VitalDB open dataset), a folder of .vital files, or a cloud URI (s3://...)")
    p.add_argument("--api-url", default=None, help="base URL of the API or a mirror (with --source api)")
    p.add_argument("--overwrite", action="store_true", help="delete this split's output and start over")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.set_defaults(func=_build_windows)

    p = sub.add_parser("pretrain", help="self-supervised pretraining of the TTM encoder (Ray Train)",
                       description="Masked signal modeling on <data-dir>/train, validated on <data-dir>/val. "
                                   "Flags override the YAML config.")
    p.add_argument("--config", default="configs/ssl_pretrain.yaml")
    p.add_argument("--data-dir", default="data/vitaldb_windows")
    p.add_argument("--channels", nargs="+", default=None)
    p.add_argument("--output-dir", default="artifacts/foundation_model")
    p.add_argument("--mask-ratio", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (DDP when > 1)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="train on GPUs (default: when present)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("smoke", help="one CPU epoch on 64 real windows; checks shapes, finiteness, loss decrease",
                       description="Fast end-to-end check of the model on real windows; exits 1 if a check fails.")
    p.add_argument("--data-dir", default="data/vitaldb_windows")
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--output-dir", default="artifacts/smoke")
    p.set_defaults(func=_smoke)

    p = sub.add_parser("evaluate-ssl", help="masked-cell MSE of a pretrained model against baselines",
                       description="Model vs predicting zero vs linear interpolation, on the same fixed masks.")
    p.add_argument("--checkpoint", default="artifacts/foundation_model/best_model.pt")
    p.add_argument("--data-dir", default="data/vitaldb_windows")
    p.add_argument("--split", default="val")
    p.add_argument("--output", default=None, help="write the JSON here instead of printing it")
    p.set_defaults(func=_evaluate_ssl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BiofmError as e:
        print(f"biofm {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_job(command: str) -> None:
    """Entry point of ``jobs/<command>.py``: the same flags as ``biofm <command>``."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
