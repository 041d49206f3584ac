"""Thin entry point: ``python eval.py [model.name_or_path=DIR] [eval.k=16] [search=mcts]``."""

from tsd.evaluate import main

if __name__ == "__main__":
    main()
