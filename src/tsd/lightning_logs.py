"""Lightning's log lines through the run's own logging: each printed once, without advertising.

Importing ``lightning`` gives its logger a console handler of its own (``INFO: ...`` on stderr),
and its records still propagate to the root logger, whose handlers Hydra configured (the console
and ``<run dir>/train.log``): every Lightning line ("GPU available: ...", "`Trainer.fit`
stopped ...") came twice. ``lightning.pytorch`` and ``lightning.fabric`` do the same, and stop
propagating, when they are imported before logging is configured; their lines then miss the log
file. And each ``Trainer`` logs a "💡 Tip: ..." for Lightning's cloud products (litlogger,
litmodels) that no setting turns off.
"""

from __future__ import annotations

import logging

#: the loggers that ``import lightning`` gives console handlers of their own
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
#: where ``rank_zero_info`` logs (whichever of Lightning's modules was imported last sets it)
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
TIP = "💡 Tip:"


class DropTips(logging.Filter):
    """Drops Lightning's advertising lines (``💡 Tip: ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP)


def route_lightning_logs() -> None:
    """Once the root logger has handlers (Hydra's), Lightning's loggers give up their own console
    handlers and propagate to them; with none (logging not configured) Lightning keeps its own, so
    its lines still show. Its tips are dropped either way. Idempotent; call it after importing
    ``lightning``, before building the ``Trainer``."""
    if logging.getLogger().hasHandlers():
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's console handler, not a file
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
