"""Ray job entrypoint for `biofm prepare-task` (same flags)."""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("prepare-task")
