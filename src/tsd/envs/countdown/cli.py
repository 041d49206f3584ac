"""The Countdown command line: write the splits to disk.

python -m tsd.envs.countdown generate --out data/countdown --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tsd.envs.countdown.splits import generate_splits, write_jsonl


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tsd.envs.countdown generate --out DIR [--seed S] [--train N] [--test M] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m tsd.envs.countdown", description="Countdown splits: generate and write them"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write DIR/train.jsonl and DIR/test.jsonl")
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed")
    gen.add_argument(
        "--train", dest="n_train", type=int, default=20000, metavar="N", help="number of train problems"
    )
    gen.add_argument(
        "--test", dest="n_test", type=int, default=820, metavar="M", help="number of test problems"
    )
    gen.add_argument("--count", type=int, default=4, metavar="C", help="integers per problem")
    gen.add_argument("--low", type=int, default=1, metavar="L", help="smallest input integer")
    gen.add_argument("--high", type=int, default=13, metavar="H", help="largest input integer")
    gen.add_argument(
        "--max-target", dest="max_target", type=int, default=100, metavar="T", help="largest target"
    )
    args = parser.parse_args(argv)

    kwargs = {
        k: getattr(args, k) for k in ("seed", "n_train", "n_test", "count", "low", "high", "max_target")
    }
    try:
        train, test = generate_splits(**kwargs)
    except ValueError as e:
        gen.error(str(e))
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"wrote {len(train)} train problems to {out / 'train.jsonl'}")
    print(f"wrote {len(test)} test problems to {out / 'test.jsonl'}")
    return 0
