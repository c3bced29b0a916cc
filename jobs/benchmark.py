"""Ray job entrypoint for `biofm benchmark` (same flags)."""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("benchmark")
