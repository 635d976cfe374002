"""Entrypoint for `ray job submit -- python jobs/evaluate.py ...`: the same flags as `raydeeplab evaluate`."""

import sys

from raydeeplab.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
