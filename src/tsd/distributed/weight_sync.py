"""Weight sync from trainer rank 0 to the generator ranks, without stalling either side.

Two channels:

- **control**, on the c10d store every rank already shares (the rendezvous ``TCPStore``, or the
  torchrun agent's store): a counter ``seq`` of announced weight broadcasts (and a key per
  announcement, which a waiting receiver wakes up on at once), a ``stop`` key, and a ``done``
  counter the generators bump on their way out. Store reads never block on a peer, so a
  generator can wait for the next sync for as long as training takes between syncs (minutes, with
  an evaluation in between) without a collective timing out.
- **data**, a dedicated process group ``{trainer rank 0} ∪ generators`` (gloo on CPU, NCCL on GPU;
  built directly on the job's store, outside the trainers' default group, see :func:`sync_group`)
  carrying one broadcast per sync: a header ``[version, layout fingerprint, numel]`` (int64), then
  the weights as one flat buffer per dtype. A generator enters a broadcast only after it has seen
  its announcement, so every broadcast completes within the group's timeout (``sync_timeout_s``),
  and a dead peer turns into an error instead of a hang.

Protocol (trainer rank 0 = sender, each generator = one receiver thread)::

    sender                               receiver thread (generator)
    seq += 1, announced/<seq> (store)    wait: announced/<consumed+1> ? -> join the broadcast
    broadcast header    (sync group)     check version, fingerprint
    broadcast buffers   (sync group)     unflatten -> stage (newest wins)
    ...                                  generator loop swaps staged weights in between rollouts
    stop = "done"       (store)          woken, stop set -> generator finishes its rollout, exits
    wait done == G      (store)          done += 1

Both sides flatten the same :class:`WeightLayout` (the policy's ``state_dict()`` keys, sorted,
with their shapes and dtypes), so only tensor data crosses the wire; the fingerprint in the header
catches a generator whose model differs from the trainers'.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: namespace of the control keys in the c10d store
CONTROL_PREFIX = "tsd/control/"


def sync_group(store: dist.Store, rank: int, size: int, backend: str, timeout: timedelta) -> Any:
    """A process group of ``size`` members on ``store``, not registered with ``torch.distributed``:
    trainer rank 0 already has a default group (the trainers) and the generators need none (vLLM
    makes its own), so the sync group is built directly, as ``new_group`` would build it inside.
    Used only through :func:`broadcast` (rank 0 is the source)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("weight sync: this torch build has no NCCL; set strategy.backend=gloo")
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    raise ValueError(f"weight sync: backend must be 'gloo' or 'nccl', got {backend!r}")


def shutdown_group(group: Any) -> None:
    """Shut a group made by :func:`sync_group` down now (its threads joined, NCCL's communicator
    destroyed), as ``destroy_process_group`` does for the groups in torch's registry; any later
    collective on it fails. A group left to the interpreter's exit is destroyed during libtorch's
    own teardown, which can abort the process."""
    try:
        group.shutdown()
    except Exception as e:  # noqa: BLE001 - leaving anyway; a peer may be gone
        log.debug("sync group shutdown: %s", e)


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    """Broadcast ``tensor`` in place from the group's rank 0 (trainer rank 0); blocks until done."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    group.broadcast([tensor], opts).wait()


class ControlChannel:
    """Out-of-band signals between trainer rank 0 and the generators, on the c10d store."""

    def __init__(self, store: dist.Store) -> None:
        self.store = dist.PrefixStore(CONTROL_PREFIX, store)

    def announce(self) -> int:
        """One more weight broadcast is coming; returns how many have been announced."""
        n = int(self.store.add("seq", 1))
        self.store.set(f"announced/{n}", "1")  # what a waiting receiver wakes up on
        return n

    def announced(self) -> int:
        return int(self.store.add("seq", 0))

    def wait_announced(self, n: int, timeout_s: float) -> bool:
        """Block until broadcast ``n`` is announced or the trainers say stop (True), or
        ``timeout_s`` passes (False): the store wakes the receiver the moment the key is set, so a
        sync waits for no poll."""
        try:
            self.store.wait([f"announced/{n}"], timedelta(seconds=timeout_s))
        except RuntimeError:  # DistStoreError: timed out
            return False
        return True

    def stop(self, reason: str) -> None:
        """Tell the generators to finish their rollout and leave (``reason``: "done" or an error).
        The key of the announcement that will now never come is set too, which wakes a receiver
        waiting for it (:meth:`wait_announced`)."""
        self.store.set("stop", reason)
        self.store.set(f"announced/{self.announced() + 1}", "stop")

    def stop_reason(self) -> str | None:
        if not self.store.check(["stop"]):
            return None
        return self.store.get("stop").decode()

    def generator_done(self) -> None:
        self.store.add("done", 1)

    def generators_done(self) -> int:
        return int(self.store.add("done", 0))


@dataclass(frozen=True)
class WeightLayout:
    """What a sync carries: the names, shapes and dtypes of a ``state_dict``, in sorted key order;
    a tensor that aliases another one (tied embeddings: ``lm_head.weight`` *is*
    ``embed_tokens.weight``) is carried once, and the receiver's state has the alias point at the
    same tensor (``aliases``: alias name -> the name it shares with)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> WeightLayout:
        # the first name of a shared tensor in the module's own order is kept (embed_tokens before
        # lm_head: the name vLLM loads a tied embedding by), the later ones are its aliases
        aliases: list[tuple[str, str]] = []
        first: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
        for k, t in state.items():
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
            if t.numel() and key in first:
                aliases.append((k, first[key]))
            else:
                first[key] = k
        aliased = {a for a, _ in aliases}
        names = sorted(k for k in state if k not in aliased)
        return cls(
            tuple(names),
            tuple(tuple(state[k].shape) for k in names),
            tuple(state[k].dtype for k in names),
            tuple(sorted(aliases)),
        )

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def fingerprint(self) -> int:
        """A 62-bit digest of the layout (same on every process for the same model)."""
        text = "|".join(f"{n}:{s}:{d}" for n, s, d in zip(self.names, self.shapes, self.dtypes))
        text += "|" + ",".join(f"{a}={b}" for a, b in self.aliases)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2

    @property
    def bucket_dtypes(self) -> list[torch.dtype]:
        """One flat buffer per dtype, in order of first appearance."""
        return list(dict.fromkeys(self.dtypes))

    def flatten(self, state: Mapping[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """``state`` as one flat tensor per dtype, on ``device`` (an alias is not sent again)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"weight sync: state dict lacks {missing[:5]} (of {len(missing)})")
        out = []
        for dt in self.bucket_dtypes:
            parts = [state[n].detach().reshape(-1).to(dt) for n, d in zip(self.names, self.dtypes) if d == dt]
            out.append(torch.cat(parts).to(device))  # (numel of this dtype,)
        return out

    def empty_buckets(self, device: torch.device) -> list[torch.Tensor]:
        sizes: dict[torch.dtype, int] = dict.fromkeys(self.bucket_dtypes, 0)
        for s, d in zip(self.shapes, self.dtypes):
            sizes[d] += int(torch.Size(s).numel())
        return [torch.empty(sizes[d], dtype=d, device=device) for d in self.bucket_dtypes]

    def unflatten(self, buckets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`: views into ``buckets`` by name, an alias the same view as
        the tensor it shares."""
        offsets = dict.fromkeys(self.bucket_dtypes, 0)
        by_dtype = dict(zip(self.bucket_dtypes, buckets))
        out: dict[str, torch.Tensor] = {}
        for n, s, d in zip(self.names, self.shapes, self.dtypes):
            k = int(torch.Size(s).numel())
            out[n] = by_dtype[d][offsets[d] : offsets[d] + k].view(s)
            offsets[d] += k
        for alias, target in self.aliases:
            out[alias] = out[target]
        return out


class WeightSender:
    """Trainer rank 0's end of the sync group."""

    def __init__(self, layout: WeightLayout, group: Any, device: torch.device) -> None:
        """
        Args:
            layout: what every sync carries (the trainers' policy's layout).
            group: the sync group (this rank is its rank 0, the source of every broadcast).
            device: where the flattened buckets are put before the broadcast.
        """
        self.layout, self.group, self.device = layout, group, device

    def handshake(self) -> None:
        """First broadcast on the sync group: the layout, so a mismatched generator fails at start."""
        self._header(0)

    def send(self, state: Mapping[str, torch.Tensor], version: int, control: ControlChannel) -> int:
        """Announce, then broadcast ``state`` tagged with ``version``; returns the bytes sent."""
        buckets = self.layout.flatten(state, self.device)
        control.announce()
        self._header(version)
        for b in buckets:
            broadcast(self.group, b)
        return sum(b.numel() * b.element_size() for b in buckets)

    def _header(self, version: int) -> None:
        h = torch.tensor([version, self.layout.fingerprint, self.layout.numel], dtype=torch.int64)
        broadcast(self.group, h.to(self.device))


class LayoutMismatchError(RuntimeError):
    """The trainers' policy is not the generator's (different model or dtype)."""


class WeightReceiver:
    """A generator's end of the sync group: a daemon thread that sleeps on the control channel
    until a broadcast is announced, joins it, and stages the newest weights for the generator loop.

    ``take()`` returns the staged ``(state, version)`` once (or None); ``stopped`` is set when the
    trainers say stop; ``error`` holds what killed the thread (raise it with :meth:`check`)."""

    def __init__(
        self,
        layout: WeightLayout,
        group: Any,
        device: torch.device,
        control: ControlChannel,
        wait_s: float = 600.0,
    ) -> None:
        """
        Args:
            layout: what every sync carries (this generator's policy's layout).
            group: the sync group (trainer rank 0 + the generators).
            device: where the received buckets live (this rank's GPU under NCCL, else the CPU).
            control: the control keys on the job's store.
            wait_s: longest single wait for an announcement before waiting again (only a bound
                on one store call: an announcement or the stop wakes the thread at once).
        """
        self.layout, self.group, self.device = layout, group, device
        self.control, self.wait_s = control, wait_s
        self.stopped = threading.Event()
        self.stop_reason: str | None = None
        self.error: BaseException | None = None
        self.received = 0
        self._consumed = 0
        self._lock = threading.Lock()
        self._staged: tuple[dict[str, torch.Tensor], int] | None = None
        self._thread = threading.Thread(target=self._run, name="tsd-weight-receiver", daemon=True)

    def handshake(self) -> None:
        self._header()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def take(self) -> tuple[dict[str, torch.Tensor], int] | None:
        with self._lock:
            staged, self._staged = self._staged, None
        return staged

    def check(self) -> None:
        if self.error is not None:
            first = (str(self.error).strip().splitlines() or [type(self.error).__name__])[0]
            raise RuntimeError(
                f"generator weight receiver failed (trainer rank 0 gone? its node down, or it crashed: "
                f"see its log): {type(self.error).__name__}: {first[:300]}"
            ) from self.error

    def _header(self) -> int:
        h = torch.zeros(3, dtype=torch.int64, device=self.device)
        broadcast(self.group, h)
        version, fp, numel = (int(x) for x in h.tolist())
        if fp != self.layout.fingerprint or numel != self.layout.numel:
            raise LayoutMismatchError(
                f"the trainers' policy ({numel} elements, layout {fp:x}) is not this generator's "
                f"({self.layout.numel} elements, layout {self.layout.fingerprint:x}): every rank must load "
                "the same model.name_or_path and model.dtype"
            )
        return version

    def _receive_one(self) -> None:
        version = self._header()
        buckets = self.layout.empty_buckets(self.device)
        for b in buckets:
            broadcast(self.group, b)
        if self.device.type == "cuda":  # NCCL's wait() orders streams, not the host: finish first
            torch.cuda.current_stream(self.device).synchronize()
        state = self.layout.unflatten(buckets)
        with self._lock:
            self._staged = (state, version)  # newest wins: an unconsumed older one is dropped
        self.received += 1

    def _run(self) -> None:
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while True:
                # broadcasts first: the sender sets stop only after its last broadcast returned
                if self.control.announced() > self._consumed:
                    self._receive_one()
                    self._consumed += 1
                    continue
                reason = self.control.stop_reason()
                if reason is not None:
                    self.stop_reason = reason
                    return
                # sleep until the next announcement or the stop (woken at once, not polled); a
                # timeout (no sync for wait_s: a long evaluation) only goes round again
                self.control.wait_announced(self._consumed + 1, self.wait_s)
        except BaseException as e:  # a dead trainer (store gone), a sync timeout, a layout mismatch
            self.error = e
        finally:
            self.stopped.set()
