"""Thin entry point: ``python train.py [experiment=...] [key=value ...]`` (see src/tsd/train.py)."""

from tsd.train import cli

if __name__ == "__main__":
    cli()
