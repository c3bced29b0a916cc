"""Installs that reproduce what CI tested: pinned versions, ranges that admit them, and a
non-editable install that runs from any folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, run_ok

PINNED = "-e '.[dev]' -c constraints.txt"  # what the README's and CI's pip install take


def _pins() -> dict[str, str]:
    lines = [x.strip() for x in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [x.split("==") for x in lines if x and not x.startswith("#")]
    assert all(len(p) == 2 for p in pins), "every line of constraints.txt pins one exact version"
    return {canonicalize_name(name): version for name, version in pins}


def test_constraints_pin_every_dependency_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"
    for major_broke_before in ("ray", "transformers"):
        spec = next(Requirement(d).specifier for d in project["dependencies"] if Requirement(d).name == major_broke_before)
        assert any(s.operator == "<" for s in spec), f"{major_broke_before} needs an upper bound"


def test_readme_and_ci_install_the_pinned_versions():
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[:readme.index("## ", readme.index("```bash"))]
    assert f"pip install {PINNED}" in first_screen
    assert re.search(rf"^pip install (-q )?{re.escape(PINNED)} ", (ROOT / ".ci" / "run").read_text(), re.M)
    assert re.search(r"pip install -e '\.\[dev\]' --upgrade --upgrade-strategy eager", readme)  # the newest versions


@pytest.mark.slow
def test_a_non_editable_install_runs_from_any_folder(tmp_path):
    """``pip install .`` (not editable) of the package alone, then the commands from elsewhere."""
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    shutil.copytree(ROOT / "platform", src / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run_ok([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(src)], tmp_path,
         timeout=300)
    shutil.rmtree(src)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout
    where = run_ok([sys.executable, "-c", "import biofm.config as c; print(c.resolve('configs/pipeline.yaml'))"], work, env)
    assert where.strip() == str(site / "biofm" / "configs" / "pipeline.yaml")
    assert "--set" in run_ok([str(site / "bin" / "biofm"), "pipeline", "--help"], work, env)
    run_ok([str(site / "bin" / "biofm"), "prepare-splits", "--mode", "fasttrack", "--case-set", "bis", "--output", "."],
         work, env)
    assert len(json.loads((work / "splits_fasttrack.json").read_text())["train"]) > 0
