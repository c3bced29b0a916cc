"""Ray job entrypoint for `biofm prepare-splits` (same flags)."""

import sys

from biofm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare-splits", *sys.argv[1:]]))
