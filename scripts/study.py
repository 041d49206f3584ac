"""The laptop study: every method at matched compute, one learning-rate grid on a validation slice,
three seeds, the article's evaluation; and the report of the workers x iterations sweep. The design
and the logic are in :mod:`tsd.eval.study`.

    python scripts/study.py plan                          # every run and its command, nothing run
    python scripts/study.py run --parallel 2              # run what is missing (resumable)
    python scripts/study.py report --doc docs/study.md     # tables, paired intervals, curves; the page's block
    python scripts/study.py all --parallel 2              # run, then report
"""

import sys

from tsd.eval.study import main

if __name__ == "__main__":
    sys.exit(main())
