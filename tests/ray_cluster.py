"""A real Ray cluster on this machine for the tests: a head and worker nodes, each its own
`ray start --block` process (its own raylet, object store and agents) on 127.0.0.1, with token
authentication on as cluster.yaml starts every node, and jobs sent with `ray job submit`.

A node is lost as a preempted instance loses it: :meth:`LocalCluster.kill_node` SIGKILLs its
`ray start` process, its raylet and every worker it started, with no warning to Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1, none in ``taken`` (which they join): the sockets
    stay open until all are chosen, so the OS cannot hand out one port twice."""
    sockets, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            if s.getsockname()[1] not in taken:
                ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    taken.update(ports)
    return ports


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


class LocalCluster:
    """``head_cpus`` on the head, then :meth:`add_node` for worker nodes. ``env``: a client's
    environment (the token, ``extra_env`` such as the S3 server's); the nodes run with it too."""

    def __init__(self, head_cpus: int = 0, extra_env: dict | None = None, object_store_mb: int = 200):
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
        self.taken: set[int] = set()
        self.port, self.dashboard_port, client_port = free_ports(3, self.taken)
        self.object_store = str(object_store_mb * 1_000_000)
        token = Path(self.temp) / "auth_token"
        token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.env = {**os.environ, **(extra_env or {}), "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PATH": f"{RAY.parent}:{os.environ['PATH']}"}  # the job's `python` is this one
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(name, None)
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._start("head", ["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                             f"--ray-client-server-port={client_port}", f"--num-cpus={head_cpus}"], expect=1)

    def _node_ports(self) -> list[str]:
        """Ports of one node: Ray's fixed defaults would collide between nodes on one machine."""
        agent, agent_grpc, metrics, env_agent, manager, objects = free_ports(6, self.taken)
        return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
                f"--node-manager-port={manager}", f"--object-manager-port={objects}"]

    def _start(self, name: str, args: list[str], expect: int, timeout_s: float = 90) -> None:
        """Start node ``name`` with a temp dir of its own (a node's runtime-env agent deletes the
        unused job files in its own, which a shared one would take from under the others)."""
        temp = Path(self.temp) / name
        temp.mkdir()
        log = open(temp / "node.log", "w")
        self.nodes[name] = subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--object-store-memory={self.object_store}",
             f"--temp-dir={temp}", *self._node_ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while self.alive_nodes() < expect:  # one at a time: nodes started together time out on one machine
            if time.time() > deadline or self.nodes[name].poll() is not None:
                raise RuntimeError(f"Ray node {name} did not start:\n{(temp / 'node.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        """The nodes the head counts as alive (asked from a fresh driver process)."""
        code = ("import ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % f"127.0.0.1:{self.port}")
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0

    def add_node(self, cpus: int = 1) -> str:
        """Start a worker node with ``cpus`` CPUs; returns its name."""
        name = f"worker{len(self.nodes)}"
        expect = sum(p.poll() is None for p in self.nodes.values()) + 1
        self._start(name, [f"--address=127.0.0.1:{self.port}", f"--num-cpus={cpus}",
                           f"--resources={json.dumps({name: 1})}"], expect=expect)
        return name

    def workers(self) -> list[str]:
        return [n for n, p in self.nodes.items() if n != "head" and p.poll() is None]

    def node_running(self, what: str) -> str | None:
        """The first live worker node with a process whose command line contains ``what``."""
        for name in self.workers():
            for p in psutil.Process(self.nodes[name].pid).children(recursive=True):
                try:
                    if what in " ".join(p.cmdline()):
                        return name
                except psutil.NoSuchProcess:
                    pass
        return None

    def node_of(self, pid: int) -> str | None:
        """The live worker node whose processes include ``pid``."""
        for name in self.workers():
            if pid in {p.pid for p in psutil.Process(self.nodes[name].pid).children(recursive=True)}:
                return name
        return None

    def kill_node(self, name: str) -> float:
        """SIGKILL node ``name``: its raylet, agents and workers. Returns the time it was killed."""
        kill_tree(self.nodes[name].pid)
        self.nodes[name].wait(timeout=30)
        return time.time()

    def ray(self, *args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], cwd=ROOT, env=env or self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, entrypoint: list[str], timeout_s: float = 90) -> str:
        """``ray job submit --no-wait`` this checkout with configs/runtime_env.yaml; the job id."""
        deadline = time.time() + timeout_s
        while True:  # the job API answers once the head's dashboard and its agent are up
            done = self.ray("job", "submit", "--address", self.url, "--working-dir", ".", "--runtime-env",
                            "configs/runtime_env.yaml", "--no-wait", "--", *entrypoint)
            if done.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        said = done.stdout + done.stderr
        assert done.returncode == 0, said[-2000:]
        return next(w.strip("'") for w in said.split() if "raysubmit_" in w)

    def _job_api(self, path: str) -> dict:
        """The head's job REST API (what `ray job status/logs` ask), with the token: polling it
        costs no Python start-up, unlike the CLI, on a machine whose two cores run the cluster."""
        import urllib.request

        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"{self.url}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def logs(self, job_id: str) -> str:
        return self._job_api(f"{job_id}/logs")["logs"]

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, lower-cased."""
        return self._job_api(job_id)["status"].lower()

    def wait(self, job_id: str, timeout_s: float) -> tuple[str, str]:
        """Wait for the job to end (stopped if it runs past ``timeout_s``): (status, logs)."""
        deadline, status = time.time() + timeout_s, ""
        while time.time() < deadline and not any(s in status for s in ("succeeded", "failed", "stopped")):
            time.sleep(2)
            status = self.status(job_id)
        if not any(s in status for s in ("succeeded", "failed", "stopped")):
            self.ray("job", "stop", "--address", self.url, job_id, timeout=60)
        return status, self.logs(job_id)

    def wait_for_log(self, job_id: str, text: str, timeout_s: float, after: str = "") -> str:
        """Poll the job's logs until they hold ``text`` (after the last ``after``, if given);
        returns the logs (fails on timeout or when the job ends first)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            logs = self.logs(job_id)
            if text in (logs[logs.rfind(after):] if after in logs else "") if after else text in logs:
                return logs
            status = self.status(job_id)
            if any(s in status for s in ("succeeded", "failed", "stopped")):
                raise AssertionError(f"the job ended before {text!r}: {status}\n{logs[-4000:]}")
            time.sleep(1)
        raise AssertionError(f"no {text!r} in the job's logs after {timeout_s} s:\n{self.logs(job_id)[-4000:]}")

    def stop(self) -> None:
        """End every node (SIGTERM, then SIGKILL of whatever is left) and remove the temp dir."""
        live = [p for p in self.nodes.values() if p.poll() is None]
        family = [q.pid for p in live for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pid in family:
            kill_tree(pid)
        shutil.rmtree(self.temp, ignore_errors=True)
