"""Shared fixtures: one local Ray per session, recordings in the real file formats, HTTP and S3
servers on 127.0.0.1."""

from __future__ import annotations

import gzip
import logging
import os
import socket
import subprocess
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


def run_ok(cmd, cwd, env=None, timeout=180) -> str:
    """Run a command; fail the test with its output unless it exits 0. Returns its stdout."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``folder``: tag -> [(step, value)], read
    from the TFRecord framing (8-byte length, 4-byte CRC, the Event, 4-byte CRC) directly."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, at = f.read_bytes(), 0
        while at < len(data):
            n = struct.unpack("<Q", data[at:at + 8])[0]
            event = Event.FromString(data[at + 12:at + 12 + n])
            at += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def requires_realdata(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data folder {path} is absent")


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto) on 127.0.0.1 with an empty bucket ``biofm``, for the whole session.
    Yields the environment that points pyarrow (and so biofm and Ray) at it; it is also set in
    this process's environment, so a Ray head started from a test inherits it."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pyarrow.fs.FileSystem.from_uri("s3://biofm?allow_bucket_creation=true")[0].create_dir("biofm")
    yield env
    server.stop()
    for k, v in before.items():
        if v is None:
            del os.environ[k]
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3):
    """One local Ray instance for the whole test session (2 CPUs, no dashboard); its workers
    reach the session's S3 server."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **s3}})
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


def write_butppg(root: Path, records: dict[str, int], ecg: bool = True, ppg_signals: int = 1,
                 annotated: set[str] | None = None, listed: set[str] | None = None, seed: int = 0) -> Path:
    """A BUT-PPG folder in PhysioNet's layout written with wfdb: ``records`` maps id -> label.

    Each record gets ``<id>_PPG`` (30 Hz, ``ppg_signals`` colour channels, 10 s), ``<id>_ECG``
    (1000 Hz) when ``ecg``, and ``<id>_ACC`` (100 Hz, 3 axes) for ids >= 112001, as in the
    real dataset. ``annotated`` / ``listed`` limit which ids get a row in quality-hr-ann.csv /
    subject-info.csv (default: all). CSVs are UTF-8 with a BOM.
    """
    import wfdb

    root.mkdir(parents=True, exist_ok=True)
    for k, rid in enumerate(records):
        folder = root / rid
        folder.mkdir(exist_ok=True)
        ppg30, _ = heartbeat_signals(10.0, 30.0, hr_bpm=60 + 3 * k, seed=seed + k)
        colours = np.stack([ppg30 * (1 + i) + i for i in range(ppg_signals)], axis=1)
        wfdb.wrsamp(f"{rid}_PPG", fs=30, units=["NU"] * ppg_signals, sig_name=[f"PPG{i}" for i in range(ppg_signals)],
                    p_signal=colours, fmt=["16"] * ppg_signals, adc_gain=[1000.0] * ppg_signals,
                    baseline=[0] * ppg_signals, write_dir=str(folder))
        if ecg:
            _, ecg1k = heartbeat_signals(10.0, 1000.0, hr_bpm=60 + 3 * k, seed=seed + k)
            wfdb.wrsamp(f"{rid}_ECG", fs=1000, units=["mV"], sig_name=["ECG"], p_signal=ecg1k[:, None],
                        fmt=["16"], adc_gain=[1000.0], baseline=[0], write_dir=str(folder))
        if int(rid) >= 112001:
            acc = np.random.default_rng(seed + k).standard_normal((1000, 3)) * 0.1 + [0, 0, 1]
            wfdb.wrsamp(f"{rid}_ACC", fs=100, units=["g"] * 3, sig_name=["ACC_X", "ACC_Y", "ACC_Z"], p_signal=acc,
                        fmt=["16"] * 3, adc_gain=[1000.0] * 3, baseline=[0] * 3, write_dir=str(folder))
    (root / "RECORDS").write_text("".join(f"{r}/{r}_PPG\n" for r in records))
    annotated = set(records) if annotated is None else annotated
    listed = set(records) if listed is None else listed
    (root / "quality-hr-ann.csv").write_text(
        "ID,Quality,HR\n" + "".join(f"{r},{lab},{70 + i}\n" for i, (r, lab) in enumerate(records.items()) if r in annotated),
        encoding="utf-8-sig")
    (root / "subject-info.csv").write_text(
        "ID,Gender,Age [years],Height [cm],Weight [kg]\n"
        + "".join(f"{r},F,{20 + int(r[:3]) % 50},170,60\n" for r in records if r in listed), encoding="utf-8-sig")
    return root


def write_pretrained(path: Path, channels=("PPG", "ECG")) -> str:
    """A pretraining checkpoint in the real format (random weights, 2 mixer layers; PPG + ECG unless
    ``channels``), with the data spec of configs/channels.yaml and windows.yaml."""
    import json

    from biofm.config import ChannelsConfig, WindowsConfig, load_config
    from biofm.model.ssl import MaskedSignalModel, ttm_config
    from biofm.dataset import data_spec
    from biofm.train import checkpoint

    cfg = ttm_config(len(channels), num_layers=2)
    specs = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(list(channels))
    spec = data_spec(specs, load_config(WindowsConfig, ROOT / "configs/windows.yaml"))
    desc = {"kind": "masked_signal_model", "ttm_config": json.loads(json.dumps(cfg.to_dict(), default=str)),
            "channels": list(channels), "data_spec": spec}
    return checkpoint.save(path, MaskedSignalModel(cfg).state_dict(), desc)


@pytest.fixture(scope="session")
def butppg_data(ray_session, tmp_path_factory):
    """The real BUT-PPG subset prepared by prepare-butppg (train/val/test by subject)."""
    from biofm.config import ButppgConfig, ChannelsConfig, WindowsConfig, load_config
    from biofm.tasks import prepare_butppg

    if not REAL_BUTPPG.is_dir():
        pytest.skip(f"real data folder {REAL_BUTPPG} is absent")
    out = tmp_path_factory.mktemp("but_ppg")
    channels = load_config(ChannelsConfig, ROOT / "configs/channels.yaml").select(ButppgConfig().channels)
    prepare_butppg(REAL_BUTPPG, out, channels, load_config(WindowsConfig, ROOT / "configs/windows.yaml"), ButppgConfig())
    return out
