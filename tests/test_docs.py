"""The docs site builds with warnings as errors (a broken link or a page missing from the nav
fails), and its reference pages come from the code: every command and every config key."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys

from biofm import cli, config
from conftest import ROOT


def test_the_docs_build_strict_and_the_reference_covers_every_command_and_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    commands = (tmp_path / "site" / "reference" / "commands" / "index.html").read_text()
    names = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(names) == 16 and all(f"biofm {name}" in commands for name in names)
    assert "(default: 100, from configs/ssl_pretrain.yaml)" in " ".join(commands.split())  # help as printed
    configs = (tmp_path / "site" / "reference" / "configs" / "index.html").read_text()
    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    for name in hooks.CONFIGS:
        fields = [f.name for f in dataclasses.fields(getattr(config, name))]
        assert set(hooks.field_docs(getattr(config, name))) == set(fields), name   # every key's meaning, from the code
        for field in fields:
            assert f"<code>{field}</code>" in configs, (name, field)
    assert "samples per patch (a masked cell); divides the window" in configs
    for page in ("getting-started", "data", "pretraining", "finetuning", "clusters", "performance", "development"):
        assert (tmp_path / "site" / page / "index.html").stat().st_size > 5_000, page
