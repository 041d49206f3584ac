"""Thin entry point: ``python train.py [experiment=...] [key=value ...]`` (see src/tsd/train.py)."""

from tsd.train import main

if __name__ == "__main__":
    main()
