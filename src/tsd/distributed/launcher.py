"""How the ranks of a :class:`~tsd.distributed.strategy.GeneratorTrainerStrategy` run start.

Two modes, chosen by the cluster environment Lightning detected:

- **fork** (one machine, ``trainer.devices=N``, nothing launched us): ``trainer.fit`` forks N
  children *after* Hydra has made the run directory and ``train()`` has built every object, so
  there is one run directory, nothing is pickled, and each child inherits the loaded policy.
  Children ``0..T-1`` run Lightning's fit; children ``T..N-1`` run the generator loop instead.
  When every child has finished, the parent gets back what rank 0 knows (final weights, metrics,
  global step, callback states such as the eval history, the datamodule's counters), so the code
  after ``trainer.fit`` (``train.py`` writing ``results.json``) sees the finished run. If any child
  fails, the others are stopped within a grace period and the error names the failed rank's role.
  The children die with the parent, however it dies (SIGTERM, SIGKILL, a crash): each asks the
  kernel for SIGKILL when its parent exits (Linux ``prctl(PR_SET_PDEATHSIG)``) and, on any OS,
  a watchdog thread kills it when its parent process is gone (:func:`die_with_parent`). Without
  that, ranks forked by a killed ``train.py`` trained on to ``max_steps``.
- **external** (torchrun, SLURM ``srun``: one process per rank, already started): no fork; a
  trainer rank runs fit in place, a generator rank runs the generator loop and returns ``None``
  from ``trainer.fit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.multiprocessing as mp
from lightning.fabric.strategies.launchers.multiprocessing import _check_bad_cuda_fork
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer import call
from lightning.pytorch.trainer.states import TrainerFn
from torch.multiprocessing.spawn import ProcessException

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

#: seconds a failed job's other ranks get to leave by themselves, then again after SIGTERM
GRACE_S = 5.0
#: how often a forked rank's watchdog looks for its parent
WATCHDOG_S = 0.5
#: linux/prctl.h
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, poll_s: float = WATCHDOG_S) -> None:
    """Make this forked process die when ``parent_pid`` (the process that forked it) exits.

    Two mechanisms, because each has a gap: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux) has the
    kernel send SIGKILL the moment the parent exits, but only exists on Linux and fires on the
    exit of the parent *thread* that forked; the watchdog thread checks ``os.getppid()`` every
    ``poll_s`` seconds (an orphan is re-parented) and works everywhere. If the parent is already
    gone by the time this runs, the process dies at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.warning(
                    "prctl(PR_SET_PDEATHSIG) failed (errno %d); the watchdog remains", ctypes.get_errno()
                )
        except (OSError, AttributeError) as e:
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable (%s); the watchdog remains", e)
    if os.getppid() != parent_pid:  # the parent died before the kernel could be asked
        os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="tsd-parent-watchdog", daemon=True).start()


class SplitRanks(Protocol):
    """What the launcher needs of its strategy (:class:`~tsd.distributed.strategy.GeneratorTrainerStrategy`
    is one): which rank this process is, what a generator rank runs, how the groups are torn down.
    The strategy imports the launcher; the launcher knows the strategy only through this."""

    cluster_environment: Any
    checkpoint_io: Any

    @property
    def is_generator(self) -> bool: ...

    @property
    def num_processes(self) -> int: ...

    @property
    def global_rank(self) -> int: ...

    def set_world_ranks(self) -> None: ...

    def describe_rank(self, rank: int) -> str: ...

    def run_generator(self) -> None: ...

    def destroy_groups(self) -> None: ...

    def lightning_module_state_dict(self) -> dict[str, Any]: ...


class GeneratorTrainerLauncher(_MultiProcessingLauncher):
    """Runs trainer ranks through Lightning's fit and generator ranks through the generator loop."""

    def __init__(self, strategy: SplitRanks, start_method: str = "fork") -> None:
        super().__init__(strategy, start_method=start_method)  # type: ignore[arg-type]
        self._gt = strategy
        self._parent_pid = os.getpid()  # the process that forks the ranks (set again in _fork)

    @property
    def is_interactive_compatible(self) -> bool:
        return self._start_method == "fork"

    # ------------------------------------------------------------------ entry
    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        env = self._gt.cluster_environment
        assert env is not None
        if env.creates_processes_externally:
            return self._run_rank(function, args, kwargs)
        return self._fork(function, args, kwargs, trainer)

    def _run_rank(self, function: Callable, args: Any, kwargs: Any) -> Any:
        """This process is one rank of an externally launched job."""
        try:
            if self._gt.is_generator:
                self._gt.run_generator()
                return None
            return function(*args, **kwargs)
        finally:
            self._gt.destroy_groups()

    # ------------------------------------------------------------------ fork mode
    def _fork(self, function: Callable, args: Any, kwargs: Any, trainer: pl.Trainer | None) -> Any:
        if self._start_method in ("fork", "forkserver"):
            _check_bad_cuda_fork()
        env = self._gt.cluster_environment
        assert env is not None
        had_port = "MASTER_PORT" in os.environ
        os.environ["MASTER_PORT"] = str(env.main_port)  # chosen once, here, for every child
        context = mp.get_context(self._start_method)
        return_queue = context.SimpleQueue()
        self._parent_pid = os.getpid()
        try:
            procs = mp.start_processes(
                self._wrapping_function,
                args=[trainer, function, args, kwargs, return_queue],
                nprocs=self._gt.num_processes,
                start_method=self._start_method,
                join=False,
            )
            self.procs = procs.processes
            try:
                while not procs.join(grace_period=GRACE_S):
                    pass
            except ProcessException as e:
                raise RuntimeError(
                    f"{self._gt.describe_rank(e.error_index)} failed; the other ranks were stopped. "
                    f"Its error:\n{e}"
                ) from None
        finally:
            if not had_port:  # a Hydra multirun's next job picks its own port
                os.environ.pop("MASTER_PORT", None)
            self._end_rank_groups()
        worker_output = return_queue.get()
        if trainer is None:
            return worker_output
        self._already_fit |= trainer.state.fn == TrainerFn.FITTING
        self._recover_results_in_main_process(worker_output, trainer)
        return worker_output.trainer_results

    def _end_rank_groups(self) -> None:
        """Every process left in a rank's process group (an engine process a killed rank could not
        shut down: re-parented to init, it held its memory for good) is killed."""
        for proc in getattr(self, "procs", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _wrapping_function(  # type: ignore[override]
        self,
        process_idx: int,
        trainer: pl.Trainer | None,
        function: Callable,
        args: Any,
        kwargs: Any,
        return_queue: Any,
        global_states: Any = None,
    ) -> None:
        die_with_parent(self._parent_pid)  # a rank must not outlive train.py
        # a process group of its own: what it starts (a vLLM engine process and its workers) is in
        # it, so that the launcher can end them with the rank, however the rank ended
        os.setpgid(0, 0)
        _set_num_threads_if_needed(num_processes=self._gt.num_processes)
        os.environ["LOCAL_RANK"] = str(process_idx)
        self._gt.set_world_ranks()
        try:
            if self._gt.is_generator:
                self._gt.run_generator()
                return
            results = function(*args, **kwargs)
            if trainer is not None:
                results = self._collect_rank_zero_results(trainer, results)  # collective on trainers
            if process_idx == 0:
                return_queue.put(results)
        finally:
            self._gt.destroy_groups()

    # ------------------------------------------------------------------ results back to the parent
    def _collect_rank_zero_results(self, trainer: pl.Trainer, results: Any) -> _WorkerOutput | None:
        # the full (unsharded) weights, gathered by every trainer rank, land on rank 0 only
        state_dict = self._gt.lightning_module_state_dict()
        if self._gt.global_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._gt.checkpoint_io.save_checkpoint(state_dict, weights_path)
        return _WorkerOutput(None, weights_path, trainer.state, results, self.get_extra_results(trainer))

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        module_state: dict[str, Any] = {}
        trainer.lightning_module.on_save_checkpoint(module_state)
        dm = getattr(trainer, "datamodule", None)
        state = {
            "fit_loop": trainer.fit_loop.state_dict(),
            "callbacks": call._call_callbacks_state_dict(trainer),
            "datamodule": dm.state_dict() if dm is not None else None,
            "module": module_state,
        }
        buf = io.BytesIO()
        torch.save(state, buf)  # bytes, not tensors: nothing shared-memory crosses the queue
        extra["tsd_state_bytes"] = buf.getvalue()
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        # our own forked rank 0, but still no arbitrary unpickling: plain containers, numbers, tensors
        state = torch.load(io.BytesIO(extra["tsd_state_bytes"]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])  # global_step, progress
        call._call_callbacks_load_state_dict(trainer, {"callbacks": state["callbacks"]})
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and state["datamodule"] is not None:
            dm.load_state_dict(state["datamodule"])
        if state["module"]:
            trainer.lightning_module.on_load_checkpoint(state["module"])
