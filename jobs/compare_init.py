"""Random against IBM initialisation of the foundation model, on the same architecture and data.

For each of ``random`` (the published checkpoint's architecture, random weights) and ``ibm`` (its
weights): pretrain on <windows>/{train,val}, evaluate-ssl's masked MSE on val against its
baselines (zero, linear interpolation), and subject-wise finetune-cv on <butppg> (fine-tuned and
linear probe, AUROC mean ± std over the folds). One table: <output>/compare_init.md (and .json).

    python jobs/compare_init.py --init ibm-granite/granite-timeseries-ttm-r2@1536-96-r2 \\
        --windows data/vitaldb_windows --butppg data/but_ppg --output artifacts/compare_init

Without network, ``--stand-in r2-1536-96`` writes a folder laid out as IBM publishes it (that
architecture, random weights) and starts from it: the job runs end to end, but both rows then
start from random weights and the comparison means nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

VARIANTS = ("finetuned", "linear_probe")


def variant_configs(pre, init: str) -> dict:
    """``random`` and ``ibm`` pretraining configs: the same but for the weights."""
    return {"random": dataclasses.replace(pre, init=init, init_weights=False),
            "ibm": dataclasses.replace(pre, init=init, init_weights=True)}


def format_table(rows: dict[str, dict]) -> str:
    """One Markdown row per initialisation."""
    head = ("| init | pretrain val loss | masked MSE: model | zero | linear interp. | finetune-cv AUROC: fine-tuned "
            "| linear probe |\n|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, r in rows.items():
        mse, cv = r["masked_mse"], r["cv_auroc"]
        lines.append(f"| {name} | {r['val_loss']:.4f} | {mse['model']:.4f} | {mse['zero']:.4f} | "
                     f"{mse['linear_interp']:.4f} | " + " | ".join(
                         f"{cv[v]['mean']:.3f} ± {cv[v]['std']:.3f}" for v in VARIANTS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", help="IBM's TTM: a Hugging Face id[@revision] or its folder")
    p.add_argument("--stand-in", choices=["r1-512-96", "r2-1536-96"],
                   help="offline: start from a stand-in folder of this published architecture (random weights)")
    p.add_argument("--windows", default="data/vitaldb_windows", help="build-windows output (train/ and val/)")
    p.add_argument("--butppg", default="data/but_ppg", help="prepare-butppg output")
    p.add_argument("--output", default="artifacts/compare_init", help="runs, compare_init.md and .json")
    p.add_argument("--pretrain-config", default="configs/ssl_pretrain.yaml", help="pretraining YAML (init is set here)")
    p.add_argument("--finetune-config", default="configs/finetune_butppg.yaml", help="fine-tuning YAML")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the YAML's)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs (default: the YAML's), at most half of them head only")
    p.add_argument("--folds", type=int, default=5, help="finetune-cv folds (subjects)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    args = p.parse_args()
    from biofm import output

    output.configure(verbose=False)  # before the libraries are imported: they read it then
    from biofm.config import FinetuneConfig, PretrainConfig, with_overrides
    from biofm.errors import ConfigError
    from biofm.model.ttm_weights import write_stand_in
    from biofm.train.evaluate import evaluate_ssl
    from biofm.train.pretrain import pretrain
    from biofm.train.transfer import cross_validate

    if bool(args.init) == bool(args.stand_in):
        raise ConfigError("give --init (IBM's checkpoint) or --stand-in (offline trial), one of them")
    out = Path(args.output)
    init = args.init or str(write_stand_in(out / f"stand_in_{args.stand_in}", args.stand_in))
    pre = with_overrides(PretrainConfig, args.pretrain_config, {"epochs": args.epochs} if args.epochs else {},
                         "compare_init")
    fine = with_overrides(FinetuneConfig, args.finetune_config, {}, "compare_init")
    if args.finetune_epochs:
        fine = dataclasses.replace(fine, epochs=args.finetune_epochs,  # both stages keep some epochs
                                   head_epochs=min(fine.head_epochs, max(1, args.finetune_epochs // 2)))
    rows = {}
    for name, cfg in variant_configs(pre, init).items():
        fm = out / name / "foundation_model"
        final = pretrain(cfg, args.windows, fm, address=args.address)
        ssl = evaluate_ssl(fm / "best_model.pt", args.windows, "val")
        cv = cross_validate(fine, str(fm / "best_model.pt"), args.butppg, out / name / "cv", folds=args.folds,
                            variants=VARIANTS, address=args.address)
        rows[name] = {"val_loss": final["val_loss"], "masked_mse": ssl["masked_mse"]["overall"],
                      "cv_auroc": {v: cv["summary"][v]["auroc"] for v in VARIANTS},
                      "init": json.loads((fm / "training_config.json").read_text())["init"]}
    table = format_table(rows)
    note = (f"init: {init}" + (" (a stand-in of random weights: this table shows the job runs, not what IBM's "
                               "weights are worth)" if args.stand_in else "") +
            f"; {pre.epochs} pretraining epochs; finetune-cv over {args.folds} folds of subjects")
    (out / "compare_init.md").write_text(f"{table}\n\n{note}\n")
    (out / "compare_init.json").write_text(json.dumps({"init": init, "stand_in": bool(args.stand_in), "rows": rows},
                                                      indent=1, default=str))
    print(f"\n{table}\n\n{note}")


if __name__ == "__main__":
    main()
