"""Mutation testing of the core modules with mutmut (configured in pyproject.toml, [tool.mutmut]).

mutmut makes each small change to the code (a mutant: ``<`` for ``<=``, ``+ 1`` for ``- 1``, a
constant altered) and runs the fast tests against it; a mutant the tests still pass is a change
they cannot see. mutmut imports the mutated code from ``./``, ``src/`` or ``source/`` only, and
biofm's source root is ``platform/``: this job copies the repository's tracked files into a work
folder with ``platform/`` as ``src/`` (and the [tool.mutmut] paths with it), runs ``mutmut run``
there, and prints the score and every surviving mutant with its diff.

    python jobs/mutation.py --workdir /tmp/biofm-mutation --max-children 2

Writes <workdir>/mutation.json (counts by status, survivors). Every run starts from a fresh copy:
mutmut's cache of earlier results does not notice changed tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_with_src_layout(workdir: Path) -> None:
    """The tracked files of the repository under ``workdir``, ``platform/`` renamed ``src/``."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        source, target = ROOT / name, workdir / re.sub(r"^platform/", "src/", name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.unlink(missing_ok=True)
            target.symlink_to(os.readlink(source).replace("platform/", "src/"))
        else:
            shutil.copy2(source, target)
    pyproject = workdir / "pyproject.toml"
    head, _, mutmut = pyproject.read_text().partition("[tool.mutmut]")
    pyproject.write_text(head + "[tool.mutmut]" + mutmut.replace('"platform/', '"src/'))
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (workdir / "shared").symlink_to(shared)  # tests find ../shared/realdata beside their root


def results(workdir: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, ...) from ``mutmut results --all true``."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], cwd=workdir, capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            found[name] = status
    return found


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/biofm-mutation")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    args = ap.parse_args(argv)
    if shutil.which("mutmut") is None:
        sys.exit("mutation: mutmut is not installed (pip install mutmut)")
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    copy_with_src_layout(workdir)
    subprocess.run(["mutmut", "run", "--max-children", str(args.max_children)], cwd=workdir)
    status = results(workdir)
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    killed = counts.get("killed", 0) + counts.get("timeout", 0)  # a mutant that hangs the tests is caught too
    survivors = sorted(n for n, s in status.items() if s == "survived")
    report = {"mutants": len(status), "by_status": counts, "killed_share": killed / max(len(status), 1),
              "survivors": {n: subprocess.run(["mutmut", "show", n], cwd=workdir, capture_output=True,
                                              text=True).stdout for n in survivors}}
    (workdir / "mutation.json").write_text(json.dumps(report, indent=1))
    for name, diff in report["survivors"].items():
        print(f"--- survived: {name}\n{diff}")
    print(f"[mutation] {len(status)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + f"; killed {100 * report['killed_share']:.1f}% -> {workdir / 'mutation.json'}")
    return report


if __name__ == "__main__":
    main()
