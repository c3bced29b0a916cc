"""Ray job entrypoint for `biofm pipeline` (same flags): every stage from one config."""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("pipeline")
