"""Callbacks, one per file, named for what they do.

The data flow's own (``train.py`` always adds them): :class:`~tsd.callbacks.ack.AckAfterStep`
(acknowledge a batch after its optimiser step) and :class:`~tsd.callbacks.weight_sync.WeightSync`
(the policy clock and the weight publication). Configured in ``configs/callbacks/``:
:class:`~tsd.callbacks.mean_at_k.MeanAtKEval`, :class:`~tsd.callbacks.export.ExportPolicy`,
:class:`~tsd.callbacks.log_line.LogLine`, :class:`~tsd.callbacks.resume_log.ResumeLog` (a resumed
run's CSV log as one run); :class:`~tsd.callbacks.run_config.LogRunConfig` when a logger is on, :class:`~tsd.callbacks.progress.StepProgressBar` when the progress bar is.
"""

from tsd.callbacks.ack import AckAfterStep
from tsd.callbacks.export import ExportPolicy
from tsd.callbacks.log_line import LogLine
from tsd.callbacks.mean_at_k import MeanAtKEval
from tsd.callbacks.progress import StepProgressBar
from tsd.callbacks.resume_log import ResumeLog
from tsd.callbacks.run_config import LogRunConfig
from tsd.callbacks.weight_sync import WeightSync

__all__ = [
    "AckAfterStep",
    "ExportPolicy",
    "LogLine",
    "LogRunConfig",
    "MeanAtKEval",
    "ResumeLog",
    "StepProgressBar",
    "WeightSync",
]
