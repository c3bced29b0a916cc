"""What a person sees in the terminal: biofm's own progress lines, not Ray's and the libraries'.

:func:`configure` runs once per command, before Ray starts. Quiet (the default): Ray's info and
warning lines (the driver's, Ray Data's, Ray Train's controllers and workers'), Python
deprecation and user warnings (in Ray's workers too), Ray Tune's trial tables, known harmless
lines of Ray's raylet and core (:data:`RAY_NOISE`), and Hugging Face's progress bars stay out of
the terminal; Ray keeps its log files (``/tmp/ray/session_latest/logs``) as always. ``--verbose``
leaves everything as the libraries set it. Whatever the mode, Ray prints no colour codes when
stdout is not a terminal.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator

QUIET = "BIOFM_QUIET"


# biofm's own progress lines: Ray's log deduplication would fold those of two worker processes
# (a restarted worker's epoch lines after the lost one's) into "[repeated 2x across cluster]"
PROGRESS_LINES = r"\[(pipeline|pretrain|finetune|build-windows|prepare-butppg|prepare-splits|prepare-task|benchmark|embed|predict|tune|smoke)[\] ]"


# Lines of Ray's other processes that the driver forwards, known and harmless: the core's note on
# actors with restarts and arguments in the object store (Train's PreemptionWatcher, Data's map
# workers: ray#53727), the raylet's count of worker processes started, Train's cleanup actor's note
RAY_NOISE = (r"Actor with class name: '.+' and ID: '\w+' has constructor arguments",
             r"PYTHON worker processes have been started on node",
             r"Detected that the Ray Train controller actor \(\w+\) is dead")

# a line of Ray's C++ logging: "[2026-12-02 00:35:12,771 E 31067 31067] core_worker.cc:2465: ..."
NATIVE_LOG_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
NOISE = re.compile("|".join(RAY_NOISE).encode())
# A worker stopped when the driver exits gets SIGTERM, and Ray's handler raises SystemExit; when
# that lands inside a garbage-collection callback, Python prints "Exception ignored in: ..." and
# the traceback, which Ray forwards: "(name pid=N) Exception ignored in: ..." to "SystemExit: 1"
IGNORED_START = re.compile(rb"^(\(\w+ pid=\d+[^)]*\) )?Exception ignored in: ")
EXCEPTION_LINE = re.compile(rb"^(\(\w+ pid=\d+[^)]*\) )?[A-Za-z_][\w.]*(Error|Exit|Exception|Interrupt)\b")
WORKER_PREFIX = re.compile(rb"^(\((?:\w+ pid=\d+|raylet)[^)]*\) )?")


def without_ray_noise(lines) -> Iterator[bytes]:
    """``lines`` (bytes) less Ray's C++ log copies and :data:`RAY_NOISE`, the driver's own and
    those Ray forwards from its other processes ("(name pid=N) " in front: all of them when
    ``RAY_DEDUP_LOGS=0`` turns Ray's own filter off), and the traceback of a worker's SIGTERM at
    shutdown (above). A traceback is held until its exception line while the other processes'
    lines pass; any other "Exception ignored" traceback passes whole, and one cut off too."""
    held: dict[bytes, list[bytes]] = {}  # per process (its "(name pid=N) " prefix)
    for line in lines:
        process = WORKER_PREFIX.match(line).group(0)
        if NATIVE_LOG_LINE.match(line, len(process)) or NOISE.search(line):
            continue
        if process not in held and not IGNORED_START.match(line):
            yield line
            continue
        block = held.setdefault(process, [])
        block.append(line)
        if EXCEPTION_LINE.match(line) or len(block) > 50:
            del held[process]
            if not (b"in sigterm_handler" in b"".join(block) and b"SystemExit" in line):
                yield from block
    for block in held.values():
        yield from block


def configure(verbose: bool, own_process: bool = False) -> None:
    """Before Ray starts. ``own_process``: the command owns this process (the ``biofm`` script, a
    job's entry point), so a quiet run also drops Ray's C++ log copies from its stderr."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES)  # read when ray is first imported
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # "(RayTrainWorker pid=...)" without colour codes
    if verbose:
        os.environ.pop(QUIET, None)
        return
    os.environ[QUIET] = "1"
    if own_process:
        _drop_native_log_lines()
    quiet_env = {
        "RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(RAY_NOISE),  # read when ray is first imported
        # Tune's new output engine prints its experiment table and TensorBoard hint even when
        # silent; the legacy one, at verbose 0 (:func:`tune_verbosity`), prints nothing
        "RAY_AIR_NEW_OUTPUT": "0",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",  # Ray's workers too
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    for name, value in quiet_env.items():
        os.environ.setdefault(name, value)
    _ignore_warnings()


_pump: threading.Thread | None = None


def _drop_native_log_lines() -> None:
    """Ray's C++ core in this process writes its log file in Ray's log folder and copies its errors
    to stderr (fd 2). Fd 2 becomes a pipe; a thread passes every line on to the real stderr
    except those copies and a stopped worker's shutdown traceback (:func:`without_ray_noise`).
    At exit the pipe closes and the thread drains it. Once per process."""
    global _pump
    if _pump is not None:
        return
    sys.stderr.flush()
    saved, real_stderr, (read_end, write_end) = os.dup(2), os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(real_stderr, "wb", buffering=0) as out:
            for line in without_ray_noise(pipe):
                out.write(line)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the thread reads to its end
        _pump.join(timeout=2)

    _pump = threading.Thread(target=pump, name="biofm-stderr", daemon=True)
    _pump.start()
    atexit.register(restore)


def _ignore_warnings() -> None:
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.simplefilter("ignore", category)


def configure_worker(quiet_run: bool) -> None:
    """In a Ray Train worker of a quiet run (on any node): Ray's info lines that bypass Train's
    log level (they log to the root logger) and library warnings stay out of the driver's output."""
    if quiet_run:
        logging.getLogger().setLevel(logging.WARNING)
        _ignore_warnings()


def quiet() -> bool:
    return bool(os.environ.get(QUIET))


def ray_init_options() -> dict:
    """Extra ``ray.init`` options: the driver's Ray loggers at ERROR when quiet."""
    return {"logging_level": logging.ERROR} if quiet() else {}


def quiet_ray_data() -> None:
    """Ray Data configures its own loggers: its execution lines at ERROR when quiet."""
    if quiet():
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def tune_verbosity() -> int | None:
    """Ray Tune's ``RunConfig(verbose=...)``: no trial tables when quiet (None: Tune's default)."""
    return 0 if quiet() else None


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: its controllers and workers log warnings
    and errors only when quiet."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING" if quiet() else "INFO")
