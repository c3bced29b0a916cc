"""Ray job: VitalDB cases -> windows Parquet. Same flags as `biofm build-windows`.

    ray job submit --working-dir . -- python jobs/build_windows.py --split-file data/splits_fasttrack.json ...
"""

import sys

from biofm.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-windows", *sys.argv[1:]]))
