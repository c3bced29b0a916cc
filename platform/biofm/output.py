"""What a person sees in the terminal: biofm's own progress lines, not Ray's and the libraries'.

:func:`configure` runs once per command, before Ray starts. Quiet (the default): Ray's info and
warning lines (the driver's, Ray Data's, Ray Train's controllers and workers'), Python
deprecation and user warnings (in Ray's workers too) and Hugging Face's progress bars stay out of
the terminal; Ray keeps its log files (``/tmp/ray/session_latest/logs``) as always. ``--verbose``
leaves everything as the libraries set it.
"""

from __future__ import annotations

import logging
import os
import warnings

QUIET = "BIOFM_QUIET"


# biofm's own progress lines: Ray's log deduplication would fold those of two worker processes
# (a restarted worker's epoch lines after the lost one's) into "[repeated 2x across cluster]"
PROGRESS_LINES = r"\[(pipeline|pretrain|finetune|build-windows|prepare-butppg|prepare-splits|embed|predict|tune|smoke)[\] ]"


def configure(verbose: bool) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES)  # read when ray is first imported
    if verbose:
        os.environ.pop(QUIET, None)
        return
    os.environ[QUIET] = "1"
    quiet_env = {
        # read when ray is first imported: the driver drops this known, harmless line that Ray's
        # core logs for actors such as Train's PreemptionWatcher and Data's map workers (ray#53727)
        "RAY_DEDUP_LOGS_SKIP_REGEX": r"Actor with class name: '[^']+' and ID: '\w+' has constructor arguments",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",  # Ray's workers too
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    for name, value in quiet_env.items():
        os.environ.setdefault(name, value)
    _ignore_warnings()


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


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)``: its controllers and workers log warnings
    and errors only when quiet."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING" if quiet() else "INFO")
