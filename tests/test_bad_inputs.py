"""Every bad input a user can give a command: one line on stderr, ``biofm COMMAND: error: ...``,
and a non-zero exit. Flag errors are said before torch and Ray load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from biofm.cli import main
from conftest import REAL_BUTPPG, REAL_VITAL, requires_realdata, write_pretrained


# (argv, what the error says); {file}: an existing file, {dir}: an empty folder, {splits}: a
# splits file with one train case, {no_cases}: one with none, {bad_yaml}: windows.yaml with a typo,
# {broken_yaml}: a config that is not YAML
FLAG_CASES = [
    (["pretrain", "--epochs", "-3"], "biofm pretrain: error: argument --epochs: must be >= 1, got -3"),
    (["pretrain", "--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["pretrain", "--batch-size", "many"], "argument --batch-size: expected an integer, got 'many'"),
    (["pretrain", "--output-dir", "{file}"], "biofm pretrain: error: --output-dir {file} is a file, not a folder"),
    (["finetune", "--epochs", "1"], "head_epochs (stage 1) must be between 0 and epochs (1), got 5: lower "
                                    "head_epochs (--head-epochs) or raise epochs"),
    (["finetune", "--head-epochs", "-1"], "argument --head-epochs: must be >= 0, got -1"),
    (["finetune", "--output-dir", "{file}"], "--output-dir {file} is a file, not a folder"),
    (["finetune-cv", "--folds", "1"], "argument --folds: must be >= 2, got 1"),
    (["tune", "--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
    (["tune", "--output-dir", "{file}"], "--output-dir {file} is a file, not a folder"),
    (["embed", "--checkpoint", "c.pt", "--data-dir", "d", "--output", "o", "--batch-size", "0"],
     "biofm embed: error: argument --batch-size: must be >= 1, got 0"),
    (["embed", "--checkpoint", "c.pt", "--data-dir", "d", "--output", "{file}"], "--output {file} is a file, not a folder"),
    (["embed", "--checkpoint", "c.pt", "--data-dir", "d", "--output", "o", "--num-gpus", "-1"],
     "argument --num-gpus: must be >= 0, got -1"),
    (["predict", "--model", "m.pt", "--input", "i", "--output", "o", "--batch-size", "0"],
     "biofm predict: error: argument --batch-size: must be >= 1, got 0"),
    (["predict", "--model", "m.pt", "--input", "i", "--output", "{file}"], "--output {file} is a file, not a folder"),
    (["predict", "--model", "m.pt", "--input", "i", "--output", "o", "--plots", "-2"], "argument --plots: must be >= 0"),
    (["build-windows", "--split-file", "s.json", "--outdir", "{file}"], "--outdir {file} is a file, not a folder"),
    (["prepare-butppg", "--raw-dir", "r", "--outdir", "{file}"], "--outdir {file} is a file, not a folder"),
    (["prepare-splits", "--case-set", "{nofmt}", "--output", "o"],
     "no recordings in {nofmt}: expected .vital, WFDB (.hea), EDF/BDF, CSV/TSV or MATLAB/NumPy (.mat, .npz, .npy) files "
     "(unsupported_format: 1 other files)"),
    (["prepare-splits", "--case-set", "{mixed}", "--output", "o"],
     "{mixed} holds recordings in 2 formats (1 edf, 2 csv files): name one with a prefix, e.g. --source edf:{mixed}"),
    (["prepare-splits", "--output", "{file}"], "--output {file} is a file, not a folder"),
    (["smoke", "--output-dir", "{file}"], "--output-dir {file} is a file, not a folder"),
    (["evaluate-ssl", "--output", "{dir}"], "--output {dir} is a folder: name the JSON file to write"),
    (["pretrain", "--mask-ratio", "1.5"], "mask_ratio must be in (0, 1)"),
    (["pipeline", "--set", "max_epochs=3"], "unknown key 'max_epochs'"),
    (["pipeline", "--set", "pretrain={epochs: 1"],
     "biofm pipeline: error: --set pretrain: not valid YAML: expected ',' or '}', but got '<stream end>' at line 1, "
     "column 11"),
    (["pretrain", "--config", "{broken_yaml}"],
     "biofm pretrain: error: {broken_yaml}: not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, "
     "column 1"),
    (["pipeline", "--force", "training"], "--force: unknown stage(s) ['training']"),
    (["pretrain", "--no-such-flag"], "biofm: error: unrecognized arguments: --no-such-flag"),
    (["build-windows", "--windows-yaml", "{bad_yaml}", "--split-file", "{splits}", "--outdir", "o"],
     "biofm build-windows: error: {bad_yaml}: unknown key 'strid_s' (allowed: "),
    (["build-windows", "--split-file", "{splits}", "--channels-yaml", "{trackless}", "--channels", "PPG", "TEMP",
      "--outdir", "o"], "channel(s) ['TEMP'] have no track names or aliases in channels.yaml"),
    (["build-windows", "--split-file", "{splits}", "--split", "holdout", "--outdir", "o"], "has no split 'holdout'"),
    (["build-windows", "--split-file", "{no_cases}", "--outdir", "o"], "the case list is empty"),
    (["build-windows", "--split-file", "{dir}/none.json", "--outdir", "o"], "none.json"),
    (["prepare-task", "--task", "af", "--raw-dir", "{dir}", "--outdir", "o"],
     "biofm prepare-task: error: unknown task 'af': the built-in tasks are butppg-quality, butppg-hr, arrhythmia-af, "
     "arrhythmia-rhythm, ppgbp-sbp, ppgbp-dbp, ppgbp-hypertension, troika-hr, capnobase-rr, cinc2017-rhythm; for your "
     "own labels pass --labels TABLE"),
    (["prepare-task", "--task", "arrhythmia-af", "--raw-dir", "{dir}", "--outdir", "o"],
     "{dir} holds no MPA_<id>.mat files: point --raw-dir at the PPG arrhythmia set"),
    (["prepare-task", "--task", "arrhythmia-af", "--labels", "{labels}", "--raw-dir", "{dir}", "--outdir", "o"],
     "--labels makes a task of your own: name it otherwise than the built-in arrhythmia-af"),
    (["prepare-task", "--task", "mine", "--labels", "{dir}/cols.csv", "--raw-dir", "{dir}", "--outdir", "o"],
     "has columns ['recording', 'start', 'subject']: a label table needs recording, start_s, subject_id and one of label (classes) or target"),
    (["prepare-task", "--task", "mine", "--labels", "{labels}", "--classes", "good", "poor", "--raw-dir", "{dir}",
      "--outdir", "o"], "{labels}: labels {'noisy': 1} (label: rows) are not among the classes ['good', 'poor']"),
    (["prepare-task", "--task", "mine", "--labels", "{labels}", "--raw-dir", "{dir}", "--outdir", "{file}"],
     "--outdir {file} is a file, not a folder"),
    (["benchmark", "--encoder", "e.pt", "--tasks", "t", "--output", "o", "--resamples", "0"],
     "biofm benchmark: error: argument --resamples: must be >= 1, got 0"),
    (["benchmark", "--encoder", "e.pt", "--tasks", "t", "--output", "{file}"], "--output {file} is a file, not a folder"),
]


def _filled(argv: list[str], message: str, tmp_path) -> tuple[list[str], str]:
    file, folder = tmp_path / "a_file", tmp_path / "empty"
    file.write_text("x")
    folder.mkdir(exist_ok=True)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["1"], "val": [], "test": []}))
    (tmp_path / "no_cases.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    (tmp_path / "windows.yaml").write_text("window_s: 10\nstrid_s: 5\n")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    (tmp_path / "channels.yaml").write_text("channels:\n  PPG: {band_hz: [0.5, 10], aliases: [PPG]}\n"
                                            "  TEMP: {band_hz: [0.01, 0.1]}\n")
    (tmp_path / "labels.csv").write_text("recording,start_s,subject_id,label\nr1,0,s1,good\nr1,10,s1,noisy\n"
                                         "r2,0,s2,poor\n")
    (folder / "cols.csv").write_text("recording,start,subject\nr1,0,s1\n")
    for name in ("nofmt/notes.txt", "mixed/a.edf", "mixed/b.csv", "mixed/sub/c.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    fill = {"{labels}": str(tmp_path / "labels.csv"), "{file}": str(file), "{dir}": str(folder), "{splits}": str(tmp_path / "splits.json"),
            "{no_cases}": str(tmp_path / "no_cases.json"), "{bad_yaml}": str(tmp_path / "windows.yaml"),
            "{broken_yaml}": str(tmp_path / "broken.yaml"),
            "{trackless}": str(tmp_path / "channels.yaml"),
            "{nofmt}": str(tmp_path / "nofmt"), "{mixed}": str(tmp_path / "mixed")}
    for k, v in fill.items():
        argv, message = [a.replace(k, v) for a in argv], message.replace(k, v)
    return argv, message


def test_each_flag_error_is_one_line_before_torch_and_ray_load(tmp_path):
    """All the flag cases in one fresh process: each exits 2 with its one line, and neither torch,
    Ray nor tsfm_public was imported for any of them."""
    cases = [_filled(argv, message, tmp_path) for argv, message in FLAG_CASES]
    script = ("import json, sys\nfrom biofm.cli import main\ncodes = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    try:\n        codes.append(main(argv))\n    except SystemExit as e:\n        codes.append(e.code)\n"
              "    sys.stderr.flush()\n"
              "print(json.dumps([codes, [m for m in ('torch', 'ray', 'tsfm_public') if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in cases])], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    codes, heavy = json.loads(done.stdout.splitlines()[-1])
    lines = done.stderr.splitlines()
    assert codes == [2] * len(cases) and len(lines) == len(cases), (codes, done.stderr)
    for (argv, message), line in zip(cases, lines):
        assert line.startswith("biofm") and ": error: " in line and message in line, (argv, line)
    assert heavy == [], f"imported before the flags were checked: {heavy}"


@requires_realdata(REAL_BUTPPG)
@requires_realdata(REAL_VITAL)
def test_each_data_error_is_one_line_and_a_non_zero_exit(butppg_data, tmp_path, capsys):
    """Errors found in the data: a windows root instead of one split, recordings that all fail to
    read (nothing produced), a split with channels the model does not read."""
    from biofm.dataset import read_data_spec
    from biofm.train import checkpoint
    from biofm.train.finetune import build_classifier
    from biofm.config import FinetuneConfig

    fm = write_pretrained(tmp_path / "fm.pt")
    model, desc = build_classifier(FinetuneConfig(), fm, read_data_spec(butppg_data / "train"))
    clf = checkpoint.save(tmp_path / "clf.pt", model.state_dict(), {**desc, "threshold": 0.5})
    older = checkpoint.save(tmp_path / "older.pt", {k: v for k, v in model.state_dict().items()
                                                    if not k.startswith("norm.")}, {**desc, "threshold": 0.5})
    text_only = tmp_path / "texts"
    text_only.mkdir()
    (text_only / "1.vital").write_text("not a recording")
    (text_only / "2.vital").write_text("nor this")
    typed = tmp_path / "linked"  # errors name the path as typed, not where its link points
    typed.symlink_to(butppg_data)
    cases = [
        (["embed", "--checkpoint", fm, "--data-dir", str(typed), "--output", str(tmp_path / "e")],
         f"{typed} holds the splits test, train, val, not one split: choose one, e.g. {typed}/val"),
        (["predict", "--model", clf, "--input", str(text_only), "--output", str(tmp_path / "p")],
         f"no window to rate: 2 of 2 recordings skipped (corrupt_file 2); each with its reason in "
         f"{tmp_path / 'p' / 'manifest.json'}"),
        (["predict", "--model", clf, "--input", str(tmp_path / "absent"), "--output", str(tmp_path / "q")], "absent"),
        (["predict", "--model", older, "--input", str(REAL_VITAL), "--output", str(tmp_path / "r")],
         f"{older} was fine-tuned by an older biofm, whose classifier had no feature norm: fine-tune it again"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"biofm {argv[0]}: error: ") and message in err[0], (argv, err)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["recordings_skipped"] == 2  # still written


@pytest.mark.parametrize("command, flag, shown", [
    ("pretrain", "--epochs", "(default: 100, from configs/ssl_pretrain.yaml)"),
    ("pretrain", "--batch-size", "(default: 128, from configs/ssl_pretrain.yaml)"),
    ("pretrain", "--channels", "(default: PPG ECG, from configs/ssl_pretrain.yaml)"),
    ("finetune", "--epochs", "(default: 30, from configs/finetune_butppg.yaml)"),
    ("finetune", "--head-epochs", "(default: 5, from configs/finetune_butppg.yaml)"),
    ("finetune", "--lr", "(default: 2e-05, from configs/finetune_butppg.yaml)"),
    ("tune", "--num-samples", "(default: 16, from configs/tune_finetune.yaml)"),
])
def test_help_shows_the_default_each_flag_takes_from_its_yaml(command, flag, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    text = text[text.index("options:"):]  # past the usage line
    after = text[text.index(flag + " "):]
    assert shown in after[:400], after[:400]
