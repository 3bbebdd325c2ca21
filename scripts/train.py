"""Thin launcher for Composer's multi-process runner:

    composer -n 8 scripts/train.py yamls/pretrain/ma-125m.yaml key=value ...
"""

import sys

from mixattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
