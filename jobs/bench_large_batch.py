"""Large batches that still learn: val loss per epoch at batch 128 against large batches under each
learning-rate rule (``lr_scaling``: none, sqrt, linear; configs/ssl_pretrain.yaml otherwise).

Real windows: the 35 patients of the PPG arrhythmia set (``prepare-task arrhythmia-af``'s
preprocessing, labels unused), split by patient 80/20 into train and val, pretraining a PPG-only
encoder for ``--epochs`` from the same initial weights (seed 0), one Ray Train worker, on this
machine's CPU. Prints and writes (``--out``) the val loss of every run per epoch and its ratio to
batch 128's; the target is within 5% (ratio <= 1.05) at every epoch after the warm-up.

    python jobs/bench_large_batch.py --realdata ../shared/realdata --epochs 6 --batch-sizes 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--realdata", default="../shared/realdata", help="folder with ppg_arrhythmia/")
    p.add_argument("--workdir", default="/tmp/biofm-large-batch")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024], help="large batches, against 128")
    p.add_argument("--rules", nargs="+", default=["none", "sqrt", "linear"], choices=["none", "sqrt", "linear"])
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    from biofm import output

    output.configure(False, own_process=True)
    from biofm.config import ChannelsConfig, PretrainConfig, WindowsConfig, load_config
    from biofm.tasks import TASKS, prepare_task
    from biofm.train.pretrain import pretrain

    real, work = Path(args.realdata).resolve(), Path(args.workdir)
    if not (real / "ppg_arrhythmia").is_dir():
        raise SystemExit(f"bench_large_batch: {real}/ppg_arrhythmia is absent: point --realdata at shared/realdata")
    data = work / "windows"
    if not (data / "val").is_dir():
        ppg = load_config(ChannelsConfig, "configs/channels.yaml").select(["PPG"])
        prepare_task(TASKS["arrhythmia-af"], real / "ppg_arrhythmia", data, ppg,
                     load_config(WindowsConfig, "configs/windows.yaml"), (0.8, 0.2, 0.0), 0)
    base = dataclasses.replace(load_config(PretrainConfig, "configs/ssl_pretrain.yaml"), channels=("PPG",),
                               epochs=args.epochs, warmup_epochs=args.warmup_epochs, use_gpu=False, cpus_per_worker=2.0)
    runs = {"128": dataclasses.replace(base, batch_size=128)} | {
        f"{b} {rule}": dataclasses.replace(base, batch_size=b, lr_scaling=rule) for b in args.batch_sizes for rule in args.rules}
    results = {}
    for name, cfg in runs.items():
        out = work / f"run_{name.replace(' ', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        pretrain(cfg, str(data), str(out))
        history = json.loads((out / "training_history.json").read_text())
        results[name] = {"batch_size": cfg.batch_size, "lr_scaling": cfg.lr_scaling, "peak_lr": cfg.peak_lr(),
                         "val_loss": [h["val_loss"] for h in history], "val_masked_mse": [h["val_masked_mse"] for h in history],
                         "windows_per_s": [h["windows_per_s"] for h in history], "seconds": time.perf_counter() - t0}
        print(f"[bench] {name}: peak lr {cfg.peak_lr():.2e}, val loss " +
              " ".join(f"{v:.4f}" for v in results[name]["val_loss"]), flush=True)
    ref = results["128"]["val_loss"]
    print(f"\n{'run':14s} {'peak lr':>9s}  val loss / batch 128's, epochs 1..{args.epochs}")
    for name, r in results.items():
        r["ratio_to_128"] = [v / b for v, b in zip(r["val_loss"], ref)]
        print(f"{name:14s} {r['peak_lr']:9.2e}  " + " ".join(f"{x:.3f}" for x in r["ratio_to_128"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
