"""Entrypoint for `ray job submit -- python jobs/train.py ...`: the same flags as `raydeeplab train`."""

import sys

from raydeeplab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
