import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BIOFM = str(Path(sys.executable).parent / "biofm")  # the console script installed beside python

from biofm import output
from biofm.cli import main
from conftest import REAL_BUTPPG, REAL_VITAL, ROOT, requires_realdata, write_case


@pytest.mark.parametrize("cmd", [
    [BIOFM, "--help"],
    ["prepare-splits", "--help"],
    ["build-windows", "--help"],
    [sys.executable, str(ROOT / "jobs/build_windows.py"), "--help"],
    [sys.executable, str(ROOT / "jobs/prepare_splits.py"), "--help"],
    ["tune", "--help"],
    [sys.executable, str(ROOT / "jobs/tune_finetune.py"), "--help"],
    ["tune-report", "--help"],
    ["pipeline", "--help"],
    [sys.executable, str(ROOT / "jobs/pipeline.py"), "--help"],
])
def test_every_command_has_help(cmd, capsys):
    """The console script and the jobs in their own processes; the subcommands in this one."""
    if cmd[0] in (BIOFM, sys.executable):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        text = done.stdout
    else:
        with pytest.raises(SystemExit) as done:
            main(cmd)
        assert done.value.code == 0
        text = capsys.readouterr().out
    assert "usage:" in text
    if "build-windows" in cmd or str(ROOT / "jobs/build_windows.py") in cmd:
        for flag in ("--channels-yaml", "--windows-yaml", "--split-file", "--split", "--outdir",
                     "--source", "--api-url", "--overwrite", "--address"):
            assert flag in text
    if "tune" in cmd or str(ROOT / "jobs/tune_finetune.py") in cmd:
        for flag in ("--config", "--pretrained", "--data-dir", "--output-dir", "--num-samples", "--resume"):
            assert flag in text
    if "pipeline" in cmd or str(ROOT / "jobs/pipeline.py") in cmd:
        for flag in ("--config", "--set", "--output-dir", "--force", "--address"):
            assert flag in text


@pytest.fixture(autouse=True)
def elsewhere(monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # default configs come with the package, not the checkout


@pytest.fixture
def splits(tmp_path):
    assert main(["prepare-splits", "--mode", "fasttrack", "--case-set", "bis", "--output", str(tmp_path)]) == 0
    return tmp_path / "splits_fasttrack.json"


def test_unreachable_api_exits_2_with_advice(tmp_path, splits, dead_url, capsys):
    rc = main(["build-windows", "--split-file", str(splits), "--api-url", dead_url, "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot reach the VitalDB API at {dead_url}" in err and "--source" in err


def test_build_windows_from_folder(ray_session, tmp_path, capsys):
    for c in ("101", "102"):
        write_case(tmp_path / "mirror" / "vital_files", f"0{c}", duration_s=30)
    (tmp_path / "s.json").write_text(json.dumps({"train": ["101", "102"]}))
    rc = main(["build-windows", "--split-file", str(tmp_path / "s.json"), "--source", str(tmp_path / "mirror"),
               "--outdir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[build-windows train] 2/2 cases (0 skipped), 6 windows kept" in out
    assert "2/2 cases ok, 6 windows" in out
    assert sorted(p.name for p in (tmp_path / "out" / "train").glob("*.parquet")) == ["101.parquet", "102.parquet"]


def test_command_line_flags_override_the_config_and_are_checked(monkeypatch, capsys):
    from biofm import cli

    parse = cli.build_parser().parse_args
    cfg = cli._pretrain_config(parse(["pretrain", "--epochs", "3", "--channels", "PPG", "--no-amp"]))
    assert (cfg.epochs, cfg.channels, cfg.amp, cfg.batch_size) == (3, ("PPG",), False, 128)  # rest from the YAML
    cfg = cli._finetune_config(parse(["finetune", "--head-epochs", "1", "--init", "scratch"]))
    assert (cfg.head_epochs, cfg.init, cfg.epochs) == (1, "scratch", 30)
    seen = {}
    monkeypatch.setattr("biofm.tune.run_search", lambda tcfg, base, *a, **k: seen.update(tcfg=tcfg, base=base))
    assert main(["tune", "--num-samples", "3"]) == 0
    assert seen["tcfg"].num_samples == 3 and seen["base"].head_epochs == 5

    bad = {("pretrain", "--mask-ratio", "1.5"): "mask_ratio must be in (0, 1)",
           ("finetune", "--head-epochs", "9", "--epochs", "3"): "head_epochs (stage 1) must be between 0 and epochs (3)"}
    for argv, message in bad.items():  # test_bad_inputs.py has the rest
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "command-line flags (over configs/" in err and message in err, err


@pytest.mark.slow
@requires_realdata(REAL_VITAL)
@requires_realdata(REAL_BUTPPG)
def test_the_main_commands_run_from_any_folder_and_print_only_biofms_lines(ray_session, tmp_path):
    """From a folder that holds no configs/: the main command (the quick configuration, offline,
    with a Tune search and embeddings added), then predict with its model. Its classifier beats
    chance on its test split. Quiet: every line on stdout and stderr is one of biofm's (a worker's
    with Ray's "(name pid=N)" in front), without colour codes, also while another Ray instance
    runs on the machine (the session's: Train's placement-group cleaner printed a traceback per
    run until its processes were told their own instance's address), and whether Ray deduplicates
    its lines or not (the pipeline runs with RAY_DEDUP_LOGS=0, as Ray's docs tell users to set to
    see every worker's line; predict with Ray's default). --verbose shows Ray's lines."""
    tune = ("{mode: grid, max_epochs: 2, grace_period: 1, max_concurrent_trials: 1, cpus_per_trial: 0.5, "
            "search: {init: {grid: [scratch]}, head_epochs: {grid: [1]}, batch_size: {grid: [16]}}}")  # one trial
    pipeline = subprocess.run([BIOFM, "pipeline", "--output-dir", "run",
                               "--set", f"vital_source={REAL_VITAL}", "--set", f"case_set={REAL_VITAL}",
                               "--set", f"butppg_raw_dir={REAL_BUTPPG}", "--set", f"tune={tune}",
                               "--set", "embed={split: val}"], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert pipeline.returncode == 0, pipeline.stderr[-3000:]
    predict = subprocess.run([BIOFM, "predict", "--model", "run/but_ppg_finetuned/best_model.pt", "--input",
                              str(REAL_VITAL), "--output", "predictions", "--plots", "1"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)
    assert predict.returncode == 0, predict.stderr[-3000:]
    biofms = re.compile(r"^(\(\w+ pid=\d+(, ip=[\d.]+)?\) )?" + output.PROGRESS_LINES)
    for done in (pipeline, predict):
        lines = (done.stdout + done.stderr).splitlines()
        assert lines and [line for line in lines if not biofms.match(line)] == [], done.stdout + done.stderr
        assert "\x1b[" not in done.stdout + done.stderr
    printed = pipeline.stdout
    assert "[pipeline] done: ran splits, windows, pretrain, butppg, finetune, tune, embed" in printed
    assert "[tune] trial" in printed and "[pipeline] next: biofm predict --model" in printed
    assert re.search(r"\[pipeline\] PPG quality: test AUROC [\d.]+, balanced accuracy [\d.]+ on 16 BUT-PPG", printed)
    assert "[pipeline] this was a smoke test of the installation, not a result" in printed
    test = json.loads((tmp_path / "run" / "but_ppg_finetuned" / "test_metrics.json").read_text())["test"]
    assert test["auroc"] > 0.5 and test["n"] == 16, test  # README: 0.855 (seed 0)
    ppg = json.loads((tmp_path / "run" / "foundation_model" / "ssl_evaluation.json").read_text())["masked_mse"]["PPG"]
    assert ppg["model"] < 0.9 * ppg["zero"] and ppg["model"] < ppg["linear_interp"], ppg  # README: PPG cells follow the pulse
    assert "[predict] 6/6 recordings (0 skipped)" in predict.stdout
    verbose = subprocess.run([BIOFM, "--verbose", "prepare-butppg", "--raw-dir", str(REAL_BUTPPG), "--outdir",
                              "but_ppg"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert verbose.returncode == 0 and "Started a local Ray instance" in verbose.stderr, verbose.stderr[-2000:]
    assert "[prepare-task] butppg-quality: 51 windows from 51/51 recordings" in verbose.stdout
    offline = subprocess.run([BIOFM, "pipeline", "--set", "api_url=http://127.0.0.1:9"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)  # configs/pipeline.yaml, then the source check
    assert offline.returncode == 2 and "cannot reach the VitalDB API" in offline.stderr, offline.stderr[-2000:]
    assert not (tmp_path / "configs").exists()


def test_every_flag_has_help_and_biofm_has_a_version(capsys):
    from biofm import __version__, cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    assert len(commands) == 16
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"biofm {name} {action.option_strings or action.dest} has no help"
    text = commands["prepare-splits"].format_help()
    assert "(default: fasttrack)" in text and "``" not in parser.format_help()
    summaries = parser.format_help() + "".join(sub.description or "" for sub in commands.values())
    for stale in ("split VitalDB cases into", "VitalDB cases ->", "fine-tune for PPG quality", "PPG-quality predictions"):
        assert stale not in summaries, stale   # commands take any source and any task
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"biofm {__version__}"


def test_a_stopped_workers_shutdown_traceback_stays_off_the_terminal_and_other_tracebacks_do_not():
    """The quiet stderr filter: Ray's C++ log copies and known notes (the driver's, and those Ray
    forwards from its workers and raylet when its deduplication is off) and the traceback of a
    worker whose SIGTERM (the driver's exit) landed in a garbage-collection callback (as a CI run
    printed it) are dropped;
    biofm's lines, the lines between, and any other traceback pass whole and in order."""
    trial = "(finetune_trial pid=32294) "
    sigterm = [trial + line for line in (
        "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f1a8c307b00>",
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
        "    def _remove(item, selfref=ref(self)):", "",
        '  File "/venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
        "    raise_sys_exit_with_custom_error_message(",
        '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
        "SystemExit: 1")]
    other = ["Exception ignored in: <function Foo.__del__ at 0x1>", "Traceback (most recent call last):",
             '  File "x.py", line 3, in __del__', "RuntimeError: a real problem"]
    native = "[2026-12-02 00:35:12,771 E 31067 31067] core_worker.cc:2465: Actor with class name: 'X'"
    # with RAY_DEDUP_LOGS=0, Ray forwards its other processes' copies and notes, each with its prefix
    forwarded = ["(TrainController pid=4120) " + native + " and ID: '1f' has constructor arguments in the object store",
                 "(raylet) [2026-12-02 00:35:13,002 I 31010 31010] worker_pool.cc:581: note",
                 "(raylet) 12 PYTHON worker processes have been started on node: 3f with address: 127.0.0.1"]
    mine = [trial + "[finetune] epoch 1/2 stage 1 train loss 0.6", "[pipeline] done: ran tune", "[tune] trial t1"]
    lines = [mine[0], native, *forwarded, *sigterm[:4], mine[1], *sigterm[4:], *other, mine[2], sigterm[0], sigterm[1]]
    got = [b.decode() for b in output.without_ray_noise(line.encode() + b"\n" for line in lines)]
    # a cut-off block (the pipe closed) is written as it was
    assert [g.rstrip("\n") for g in got] == [mine[0], mine[1], *other, mine[2], sigterm[0], sigterm[1]]
