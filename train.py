"""Train a detector: python train.py [key=value ...] (see `python train.py help`)."""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]] if sys.argv[1:2] != ["help"] else ["help"]))
