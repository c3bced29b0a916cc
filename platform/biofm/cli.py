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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BiofmError as e:
        print(f"biofm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
