"""Ray job entrypoint for `biofm finetune-cv` (same flags)."""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("finetune-cv")
