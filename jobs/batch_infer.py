"""Entrypoint for `ray job submit -- python jobs/batch_infer.py ...`: the same flags as `raydeeplab predict`."""

import sys

from raydeeplab.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
