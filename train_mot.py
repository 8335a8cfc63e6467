"""Entry point: `python train_mot.py [RECIPE.toml] [--key=value ...]`, the same as `mot train`."""

import sys

from mot.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
