"""A long-lived Ray on this machine that commands attach to (`ray start --head` once, then
`--address` or RAY_ADDRESS): the command joins it instead of starting Ray, prints only its own
lines, and says in one line what to do when it cannot join."""

from __future__ import annotations

import subprocess

import pytest

from conftest import write_case
from ray_cluster import LocalCluster
from test_cli import BIOFM


@pytest.fixture(scope="module")
def head():
    cluster = LocalCluster(head_cpus=2)   # token authentication on, as Ray 2.60's `ray start --head`
    yield cluster
    cluster.stop()


@pytest.mark.slow  # a cluster of its own
def test_a_command_attaches_to_a_running_ray_and_says_why_when_it_cannot(head, tmp_path):
    for case in ("1", "2"):
        write_case(tmp_path / "vital", case, duration_s=30.0, seed=int(case))
    run = lambda *args, env=head.env: subprocess.run([BIOFM, *args], cwd=tmp_path, env=env, capture_output=True,
                                                     text=True, timeout=180)
    assert run("prepare-splits", "--mode", "full", "--case-set", "vital", "--ratios", "1", "0", "0",
               "--output", "splits").returncode == 0
    address = f"127.0.0.1:{head.port}"
    build = ["build-windows", "--split-file", "splits/splits_full.json", "--source", "vital", "--outdir", "windows"]
    done = run("--verbose", *build, "--address", address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Connecting to existing Ray cluster at address" in done.stderr and "Started a local Ray" not in done.stderr
    assert "[build-windows train] 2/2 cases ok, 6 windows" in done.stdout
    quiet = run(*build, "--overwrite", env={**head.env, "RAY_ADDRESS": address})   # RAY_ADDRESS: the same
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
    assert all(line.startswith("[build-windows") for line in quiet.stdout.splitlines()), quiet.stdout
    no_token = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    refused = run(*build, "--overwrite", "--address", address, env=no_token)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"biofm build-windows: error: cannot connect to the Ray cluster at {address}: it uses token authentication "
        "(ray start --head turns it on): set RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token (ray "
        "get-auth-token) or RAY_AUTH_TOKEN_PATH"], refused.stderr[-3000:]
    silent = run(*build, "--overwrite", "--address", "127.0.0.1:9")
    assert silent.returncode == 2 and len(silent.stderr.splitlines()) == 1
    assert "cannot connect to the Ray cluster at 127.0.0.1:9 (Connection refused): is it running?" in silent.stderr
