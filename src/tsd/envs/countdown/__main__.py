"""``python -m tsd.envs.countdown generate --out DIR ...`` (see :mod:`tsd.envs.countdown.cli`)."""

import sys

from tsd.envs.countdown.cli import main

sys.exit(main())
