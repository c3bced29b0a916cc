"""Ray job: VitalDB cases -> windows Parquet. Same flags as `biofm build-windows`.

    ray job submit --working-dir . -- python jobs/build_windows.py --split-file data/splits_fasttrack.json ...
"""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("build-windows")
