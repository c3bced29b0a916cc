"""Shared fixtures: one local Ray per session, recordings in the real file formats, HTTP servers."""

from __future__ import annotations

import gzip
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import vitaldb

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
REAL_VITAL = REALDATA / "vital"
REAL_BUTPPG = REALDATA / "butppg"


def requires_realdata(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data folder {path} is absent")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    yield ray
    ray.shutdown()


def heartbeat_signals(duration_s: float, fs: float = 500.0, hr_bpm: float = 72.0, seed: int = 0):
    """A PPG-like and an ECG-like trace ``[T]`` at ``fs`` Hz: one pulse / one QRS per beat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * fs)) / fs
    beats = np.cumsum(60.0 / hr_bpm * (1 + 0.03 * rng.standard_normal(int(duration_s * hr_bpm / 60) + 2)))
    ppg, ecg = np.zeros_like(t), np.zeros_like(t)
    for b in beats:
        ppg += np.exp(-((t - b - 0.15) / 0.08) ** 2) + 0.4 * np.exp(-((t - b - 0.45) / 0.1) ** 2)
        ecg += np.exp(-((t - b) / 0.012) ** 2) + 0.25 * np.exp(-((t - b - 0.3) / 0.06) ** 2)
    ppg += 0.02 * rng.standard_normal(t.size)
    ecg += 0.01 * rng.standard_normal(t.size)
    return ppg, ecg


def write_vital(path: Path, tracks: dict[str, tuple[np.ndarray, float]], dtstart: float = 1.7e9) -> Path:
    """Write ``{track name: (samples, rate Hz)}`` as a .vital file with the vitaldb package's writer."""
    vf = vitaldb.VitalFile()
    vf.dtstart = dtstart
    vf.dtend = dtstart + max(len(x) / fs for x, fs in tracks.values())
    for name, (x, fs) in tracks.items():
        vf.add_track(name, [{"dt": dtstart, "val": np.asarray(x, dtype=np.float32)}], srate=fs)
    vf.to_vital(str(path))
    return path


def write_case(folder: Path, case_id: str, duration_s: float = 60.0, ppg=None, ecg=None,
               names=("SNUADC/PLETH", "SNUADC/ECG_II"), fs: float = 500.0, seed: int = 0) -> Path:
    """A VitalDB-layout case (SNUADC tracks at 500 Hz) as ``<folder>/<case_id>.vital``."""
    p, e = heartbeat_signals(duration_s, fs, seed=seed)
    tracks = {}
    if names[0]:
        tracks[names[0]] = (p if ppg is None else ppg, fs)
    if names[1]:
        tracks[names[1]] = (e if ecg is None else ecg, fs)
    folder.mkdir(parents=True, exist_ok=True)
    return write_vital(folder / f"{case_id}.vital", tracks)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def http_server():
    """An HTTP server on 127.0.0.1. ``server.routes[path] = [(status, body), ...]`` answers the
    listed responses in turn (the last one repeats); ``server.hits[path]`` counts requests."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            srv = self.server
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            answers = srv.routes.get(self.path, [(404, b"not found")])
            status, body = answers[min(srv.hits[self.path], len(answers)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    server.routes, server.hits = {}, {}
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_url():
    """A URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)
