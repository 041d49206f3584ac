"""GeneratorTrainerStrategy: of the world's ranks, the last ``num_generators`` generate and the rest
train the policy under FSDP2 on their own process group (DESIGN.md "Distribution"; the seed
article's 6 generators + 2 trainers on 8 GPUs).

    python train.py experiment=cispo_countdown strategy=generator_trainer buffer=redis trainer.devices=3
    torchrun --nnodes 2 --nproc-per-node 4 ... train.py strategy=generator_trainer buffer=redis \\
        trainer.devices=4 trainer.num_nodes=2 hydra.run.dir=outputs/run1          # see docs/distributed.md

Ranks. With world size W and G generators, ranks ``0..T-1`` (T = W - G) are trainers and
``T..W-1`` generators, so global rank 0, which Lightning uses for logging and checkpoints, trains.

How a generator rank avoids the fit loop. :class:`~tsd.distributed.launcher.GeneratorTrainerLauncher`
runs Lightning's fit function only on trainer ranks; on a generator rank it calls
:meth:`run_generator` instead (in the forked child, or in place under torchrun/SLURM), which joins
the process groups, then runs :attr:`generator_main`: what
:class:`~tsd.generation.remote.RemoteGeneration` hands over in ``train.py`` (its rollout loop)
until the trainers say stop. Lightning never sees a generator rank, so no hook, logger or callback
runs there. The strategy knows ranks, process groups, sharding and checkpoints; what generation
is, and the weight sync's protocol, live in :mod:`tsd.generation.remote`.

Process groups. Every rank meets on one store (``torch.distributed.rendezvous("env://")``: the
TCPStore on ``MASTER_ADDR:MASTER_PORT``, or torchrun's agent store), then:

1. the trainers ``0..T-1`` form the *default* process group (gloo on CPU, NCCL on GPU; timeout
   ``timeout_s``). To Lightning, torchmetrics and anything else that uses the default group the
   world is the trainers (``trainer.world_size == T``), so their collectives never wait for a
   generator. FSDP2 ``fully_shard`` runs over a 1-D ``DeviceMesh`` of it;
2. ``{trainer rank 0} ∪ generators`` form the sync group, built directly on the store
   (:func:`~tsd.distributed.weight_sync.sync_group`; timeout ``sync_timeout_s``); the generators
   have no default group at all (a vLLM sampler makes its own);
3. a few keys on the store are the control channel (announcements, stop, done).

What is sharded. The module's ``policy`` (the LM + value head: what is trained) is sharded per
transformer block (``policy.transformer_blocks()``), the value head in a unit of its own, plus one
root unit (embeddings, final norm, LM head) (:func:`shard_policy`). The shards are the fp32 master
weights; the LM's units gather them in the compute dtype (``model.dtype``) and reduce gradients in
fp32, the value head's unit stays fp32 (:meth:`~tsd.models.precision.Precision.fsdp_policies`).
The frozen reference policy (``ref``, for the KL term) is replicated on every trainer, cast to the
compute dtype as the policy's shards are gathered in it (so that their log-probs are equal at step
0): it needs no gradients or optimiser state, and a replicated forward costs no communication. Trainer rank 0 also keeps an unsharded CPU copy of the policy in its compute dtypes
(the *shadow*): :meth:`full_policy` gathers the shards into it, in flat buckets
(:func:`~tsd.distributed.gather.gather_full_state`), and it is what the weight sync sends, and
what evaluation (:class:`~tsd.callbacks.mean_at_k.MeanAtKEval`) and export read.

Data. Each trainer rank reads its own ``data.batch_size`` trajectories from the shared Redis
buffer under its own consumer name: the global batch is ``data.batch_size x T``. Gradients are
averaged over the trainer group by FSDP; the loss's token normalisation is per rank (each rank
normalises by its own batch's tokens, then ranks are averaged), as in any data-parallel trainer.

Weight sync. Every ``data.sync_every`` optimiser steps :class:`~tsd.callbacks.weight_sync.WeightSync`
asks the generation to publish: :meth:`RemoteGeneration.publish <tsd.generation.remote.RemoteGeneration.publish>`
gathers (:meth:`full_policy`) and broadcasts on this strategy's sync group
(:mod:`tsd.distributed.weight_sync`: the protocol). Versions and lag are the policy clock's
(:mod:`tsd.data.policy_clock`).

Identity and liveness. Right after the rendezvous every rank checks that it has rank 0's job
identity (the Redis stream, which names the run: a node started elsewhere would derive another
run id) and, when each node has its own launcher (torchrun, SLURM), starts a
:class:`~tsd.distributed.peers.PeerWatch`: heartbeats on the store, so that a node that dies stops
the others within ``peer_timeout_s`` seconds, with a line naming the lost rank.

Stop. At teardown trainer rank 0 sets ``stop`` on the store; each generator finishes the rollout
in hand (its trajectories stay in the buffer, pending), bumps ``done`` and leaves; rank 0 waits
for all of them (at most ``stop_timeout_s``), then every rank destroys its process groups. A
generator that dies stops the job: in fork mode the launcher stops the other ranks and names the
failed rank; under torchrun the agent does; in any case the trainers raise after ``data.max_wait``
seconds without trajectories, and a sync broadcast fails after ``sync_timeout_s``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import nn

from tsd.checkpoint_io import AtomicCheckpointDefault
from tsd.config import ConfigError, check_choice, check_int, check_number
from tsd.distributed.gather import gather_full_state
from tsd.distributed.launcher import GeneratorTrainerLauncher
from tsd.distributed.peers import PeerWatch
from tsd.distributed.placement import narrow_to_rank_gpu
from tsd.distributed.roles import LAYOUTS, logical_ranks
from tsd.distributed.weight_sync import ControlChannel, shutdown_group, sync_group
from tsd.models.policy_value import PolicyValueModel
from tsd.models.precision import Precision

log = logging.getLogger(__name__)

# FSDP2 flags any view a wrapped module returns; PolicyValueModel's values are a squeeze() view
# and nothing downstream modifies them in place
warnings.filterwarnings("ignore", message=".*FSDP2-wrapped module .* returned a view tensor.*")


class GeneratorTrainerStrategy(AtomicCheckpointDefault, ParallelStrategy):  # type: ignore[misc]
    def __init__(
        self,
        num_generators: int = 1,
        backend: str | None = None,
        timeout_s: float = 1800.0,
        sync_timeout_s: float = 300.0,
        stop_timeout_s: float = 300.0,
        start_method: str = "fork",
        gather_bucket_mb: float = 64.0,
        peer_timeout_s: float = 30.0,
        device_memory_gib: float | None = None,
        layout: str = "blocked",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        """
        Args:
            num_generators: ranks that generate (the last ones); the rest train (article: 6 of 8).
            backend: process-group backend; None: gloo on CPU, nccl on GPU.
            timeout_s: timeout of the world and trainer groups (FSDP collectives; must exceed the
                longest stretch one trainer spends alone, e.g. rank 0's evaluation).
            sync_timeout_s: timeout of one weight broadcast to the generators.
            stop_timeout_s: at the end, how long rank 0 waits for the generators to finish their
                last rollout and leave.
            start_method: how single-machine ranks are started ("fork": after Hydra made the run
                directory, with nothing pickled); ignored under torchrun/SLURM.
            gather_bucket_mb: the full weights are gathered onto rank 0 in flat buckets of at most
                this many MB, one collective each (:func:`~tsd.distributed.gather.gather_full_state`);
                0: one collective per tensor (``get_model_state_dict``, the slower path it replaced,
                kept to measure against: ``benchmarks/bench_distributed.py``).
            peer_timeout_s: under torchrun or SLURM (one launcher per node), a rank that gives no
                sign of life for this long, or a job store that cannot be reached, stops every
                other rank with one line naming it (:mod:`tsd.distributed.peers`); 0 turns the
                watch off. On one machine the launcher watches its forked ranks itself.
            device_memory_gib: the memory of one rank's device, in GiB, that the run's memory plan
                (:mod:`tsd.distributed.memory_plan`, checked by ``train.py`` before anything is
                loaded) must fit; None: the GPU's own (NVML), on CPU the host's.
            layout: which ranks train (:mod:`tsd.distributed.roles`): ``"blocked"``, the first
                ones (all trainers on the first node(s)); ``"per_node"``, the first ones of every
                node (each node the same mix of trainers and generators).
            accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin:
                set by Lightning from ``trainer.*``.
        """
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        check_int(num_generators, "strategy.num_generators", low=1)
        for name, v in (
            ("timeout_s", timeout_s),
            ("sync_timeout_s", sync_timeout_s),
            ("stop_timeout_s", stop_timeout_s),
        ):
            check_number(v, f"strategy.{name}", low=0, low_open=True)
        check_choice(backend, "strategy.backend", (None, "gloo", "nccl"))
        check_choice(start_method, "strategy.start_method", ("fork", "spawn", "forkserver"))
        self.gather_bucket_mb = check_number(gather_bucket_mb, "strategy.gather_bucket_mb", low=0)
        self.peer_timeout_s = check_number(peer_timeout_s, "strategy.peer_timeout_s", low=0)
        if device_memory_gib is not None:
            check_number(device_memory_gib, "strategy.device_memory_gib", low=0, low_open=True)
        self.device_memory_gib = device_memory_gib
        self.layout = check_choice(layout, "strategy.layout", LAYOUTS)
        self._logical: list[int] | None = None  # job rank -> logical rank (roles.logical_ranks)
        self.num_generators = num_generators
        self._backend = backend
        self.timeout_s, self.sync_timeout_s, self.stop_timeout_s = timeout_s, sync_timeout_s, stop_timeout_s
        self._start_method = start_method
        self._num_nodes = 1
        #: what a generator rank runs once the process groups exist (set by the generation,
        #: :meth:`tsd.generation.remote.RemoteGeneration.attach`)
        self.generator_main: Callable[[GeneratorTrainerStrategy], None] | None = None
        self._store: dist.Store | None = None
        #: trainer rank 0 + the generators (a gloo/NCCL backend object, outside torch.distributed's
        #: registry); None on the other trainer ranks
        self.sync_group: Any = None
        self._mesh: Any = None
        #: the control keys on the job's store (announcements, stop, done)
        self.control: ControlChannel | None = None
        self._shadow: nn.Module | None = None
        self._gathered_step = -1
        self._stopped = False
        #: what every rank of the job must agree on before any work (set by the generation: the
        #: buffer the trajectories go through, which names the run); checked on the job's store
        self.job_identity: dict[str, str] | None = None
        self._peers: PeerWatch | None = None
        #: a generator rank narrowed CUDA_VISIBLE_DEVICES to its GPU (:mod:`tsd.distributed.placement`)
        self._own_gpu = False

    # ------------------------------------------------------------------ ranks
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        device = self.parallel_devices[self.local_rank]
        if self._own_gpu and device.type == "cuda":
            return torch.device("cuda", 0)  # the only GPU this process sees: its own
        return device

    @property
    def global_rank(self) -> int:
        """This rank's logical rank: trainers ``0..T-1``, generators ``T..W-1``, whatever the
        launcher numbered it (:mod:`tsd.distributed.roles`); what Lightning and tsd call its rank."""
        job = self.cluster_environment.global_rank() if self.cluster_environment is not None else 0
        if self.layout == "blocked":
            return job
        if self._logical is None:
            self._logical = logical_ranks(
                self.job_world_size, self.num_generators, self.num_nodes, self.layout
            )
        return self._logical[job]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def job_world_size(self) -> int:
        """Every rank of the job, generators included."""
        return self.cluster_environment.world_size() if self.cluster_environment is not None else 1

    @property
    def world_size(self) -> int:
        # what Lightning sees: the trainers (the generators never enter Lightning's loops)
        return self.num_trainers

    @property
    def num_trainers(self) -> int:
        return self.job_world_size - self.num_generators

    @property
    def is_generator(self) -> bool:
        return self.global_rank >= self.num_trainers

    @property
    def generator_index(self) -> int:
        """This generator's index among the generators (0 for the first generator rank)."""
        return self.global_rank - self.num_trainers

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for the sync group live: this rank's GPU under NCCL, else the CPU."""
        return self.root_device if self.process_group_backend == "nccl" else torch.device("cpu")

    def describe_rank(self, rank: int) -> str:
        if rank >= self.num_trainers:
            return f"rank {rank} (generator {rank - self.num_trainers} of {self.num_generators})"
        return f"rank {rank} (trainer {rank} of {self.num_trainers})"

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_trainers, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str:
        return self._backend or ("nccl" if self.root_device.type == "cuda" else "gloo")

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]

    def _configure_launcher(self) -> None:
        if self.num_trainers < 1:
            raise ConfigError(
                f"strategy.num_generators: {self.num_generators} generators leave no trainer in a world of "
                f"{self.job_world_size} processes; set trainer.devices (x trainer.num_nodes) to at least "
                f"{self.num_generators + 1}"
            )
        logical_ranks(
            self.job_world_size, self.num_generators, self.num_nodes, self.layout
        )  # refuses a bad mix
        self._launcher = GeneratorTrainerLauncher(self, start_method=self._start_method)

    # ------------------------------------------------------------------ process groups
    def _init_groups(self) -> None:
        """The job's store, the trainers' default process group (+ FSDP mesh), the sync group and
        the control channel."""
        if self._store is not None:
            return
        reset_seed()
        self.set_world_ranks()
        env = self.cluster_environment
        assert env is not None
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        W, T, rank = self.job_world_size, self.num_trainers, self.global_rank
        backend = self.process_group_backend
        timeout = timedelta(seconds=self.timeout_s)
        # one store for the whole job (the TCPStore on MASTER_ADDR:MASTER_PORT, or torchrun's)
        self._store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=W, timeout=timeout))
        if env.creates_processes_externally and self.peer_timeout_s > 0:  # one launcher per node
            self._peers = PeerWatch(
                env.main_address, env.main_port, rank, W, self.describe_rank, self.peer_timeout_s
            ).start()
        self._agree_on_identity()
        self.control = ControlChannel(self._store)
        if rank < T:
            # the trainers' default group: to Lightning (and torchmetrics, ...) the world is the trainers
            kwargs: dict[str, Any] = (
                {"device_id": self.root_device} if self.root_device.type == "cuda" else {}
            )
            store = dist.PrefixStore("tsd/trainers/", self._store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=T, timeout=timeout, **kwargs)
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.root_device.type, (T,), mesh_dim_names=("fsdp",))
        if rank == 0 or rank >= T:
            self.sync_group = sync_group(
                dist.PrefixStore("tsd/sync/", self._store),
                0 if rank == 0 else rank - T + 1,
                1 + self.num_generators,
                backend,
                timedelta(seconds=self.sync_timeout_s),
            )
        log.info(
            "%s: process groups ready (%s, %d trainers, %d generators)",
            self.describe_rank(rank),
            backend,
            T,
            W - T,
        )

    def _agree_on_identity(self) -> None:
        """Every rank has the job identity of rank 0 (the same run id, the same Redis stream): a
        node started in another directory, or with another ``run_id``, would write trajectories
        nobody reads, or wait for ones nobody writes."""
        if self.job_identity is None:
            return
        assert self._store is not None
        key = "tsd/identity"
        mine = json.dumps(self.job_identity, sort_keys=True)
        if self.global_rank == 0:
            self._store.set(key, mine)
        theirs = self._store.get(key).decode()  # waits for rank 0 to have set it
        if theirs != mine:
            raise ConfigError(
                f"run_id: {self.describe_rank(self.global_rank)} on {socket.gethostname()} has {mine}, rank 0 "
                f"has {theirs} (accepted: the same on every node: start each in the same working directory "
                "with the same hydra.run.dir, or give the same run_id=...)"
            )
        log.info("%s: agrees with rank 0 on %s", self.describe_rank(self.global_rank), mine)

    def destroy_groups(self) -> None:
        """Tear this rank's groups down, in order, before the interpreter exits: torch shuts down
        the groups in its registry (the trainers' default group, the FSDP mesh's) in
        ``destroy_process_group``, but not the sync group, which is built outside it
        (:func:`~tsd.distributed.weight_sync.sync_group`) and which the weight sender or receiver
        still held: it was destroyed only at interpreter exit, where its gloo threads (NCCL: its
        communicator and watchdog) met libtorch's exit-time teardown and could abort the process
        (SIGABRT, "terminate called without an active exception") after a run that had finished."""
        if self._peers is not None:
            self._peers.stop()  # this rank is done: its peers stop watching it
            self._peers = None
        group, self.sync_group = self.sync_group, None
        if group is not None:
            shutdown_group(group)
        self._mesh = None
        if _distributed_is_initialized():
            dist.destroy_process_group()
        self._store = None

    def _policy(self) -> PolicyValueModel:
        module = self.lightning_module
        policy = getattr(module, "policy", None)
        if not isinstance(policy, PolicyValueModel):
            raise TypeError(
                f"GeneratorTrainerStrategy: {type(module).__name__} has no `policy` module to shard and sync"
            )
        return policy

    # ------------------------------------------------------------------ generator ranks
    def run_generator(self) -> None:
        """A generator rank's whole life: join the groups, run :attr:`generator_main` until the
        trainers stop, say so on the control channel."""
        if self.generator_main is None:
            raise RuntimeError(
                "GeneratorTrainerStrategy: no generation was attached (generation=remote's attach() in "
                "train.py) before trainer.fit"
            )
        assert self.accelerator is not None
        if self.parallel_devices is not None and self.parallel_devices[self.local_rank].type == "cuda":
            # before CUDA starts: this process (its vLLM engine, in-process or not) sees its GPU only
            self._own_gpu = narrow_to_rank_gpu(self.local_rank) is not None
        self.accelerator.setup_device(self.root_device)  # before the first NCCL call
        self._init_groups()
        assert self.control is not None
        self.generator_main(self)
        self.control.generator_done()

    # ------------------------------------------------------------------ trainer ranks: Lightning hooks
    def setup_environment(self) -> None:
        super().setup_environment()
        self._init_groups()

    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        policy = self._policy()
        precision = self._precision()
        if self.global_rank == 0:
            self._shadow = precision.compute_copy(policy).to("cpu")
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        shard_policy(policy, self._mesh, precision)
        ref = getattr(self.lightning_module, "ref", None)
        if ref is not None:  # the reference computes as the sharded policy does: in the compute dtype
            precision.cast_(ref)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _precision(self) -> Precision:
        precision = getattr(self.lightning_module, "precision", None)
        if not isinstance(precision, Precision):
            raise TypeError(
                f"GeneratorTrainerStrategy: {type(self.lightning_module).__name__} has no `precision` "
                "(tsd.models.precision.Precision) saying which dtypes to shard and sync"
            )
        return precision

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def on_exception(self, exception: BaseException) -> None:
        if self.global_rank == 0 and self.control is not None and not self._stopped:
            with suppress(Exception):
                self.control.stop(f"error on trainer rank 0: {type(exception).__name__}")
            self._stopped = True

    def teardown(self) -> None:
        if self.global_rank == 0 and self.control is not None and not self._stopped:
            self._stop_generators()
        super().teardown()

    def _stop_generators(self) -> None:
        assert self.control is not None
        self._stopped = True
        self.control.stop("done")
        t0 = time.monotonic()
        while self.control.generators_done() < self.num_generators:
            if time.monotonic() - t0 > self.stop_timeout_s:
                log.warning(
                    "%d of %d generators did not finish within %.0fs (strategy.stop_timeout_s); leaving anyway",
                    self.num_generators - self.control.generators_done(),
                    self.num_generators,
                    self.stop_timeout_s,
                )
                return
            time.sleep(0.05)
        log.info("all %d generators stopped (%.1fs)", self.num_generators, time.monotonic() - t0)

    # ------------------------------------------------------------------ the full weights
    def full_policy(self, pl_module: Any) -> nn.Module | None:
        """The unsharded policy on rank 0 (its CPU shadow copy, holding the weights of the current
        optimiser step), None on the other trainer ranks. Collective over the trainers: every
        trainer rank must call it. Gathered once per optimiser step (the weight sync, evaluation
        and export of one step share it)."""
        step = pl_module.trainer.global_step
        if step != self._gathered_step:
            policy = self._policy()
            full: Mapping[str, Any] | None
            if self.gather_bucket_mb > 0:
                full = gather_full_state(policy, dst=0, bucket_bytes=int(self.gather_bucket_mb * 2**20))
            else:  # one collective per tensor
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(
                    policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
                )
            if self._shadow is not None and full is not None:
                self._shadow.load_state_dict(full)
            self._gathered_step = step
        return self._shadow

    # ------------------------------------------------------------------ collectives (the trainers' default group)
    def barrier(self, name: str | None = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, torch.Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    # ------------------------------------------------------------------ checkpoints: full state on rank 0
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the sharded model and its optimiser

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        assert self.model is not None
        return get_optimizer_state_dict(
            self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.model is not None
        set_model_state_dict(
            self.model,
            checkpoint["state_dict"],
            options=StateDictOptions(full_state_dict=True, strict=strict),
        )
        self._gathered_step = -1

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.model is not None
        # strict: every optimised parameter has state (under loss.c_value=0 the value head is frozen
        # and left out of the optimiser, so it needs none); a missing one is a real mismatch
        options = StateDictOptions(full_state_dict=True)
        for opt, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            set_optimizer_state_dict(self.model, opt, state, options=options)


def shard_policy(policy: PolicyValueModel, mesh: Any, precision: Precision) -> None:
    """FSDP2 over ``mesh``: one unit per transformer block, one for the value head, then the root
    (embeddings, final norm, LM head; tied embeddings stay in one unit). Every parameter is an fp32
    master (:meth:`Precision.masters_`; FSDP2 needs one dtype per unit, and a bf16 checkpoint
    without a value head would otherwise give a bf16 root beside a fresh fp32 head); the LM's
    units compute in the compute dtype, the value head's in fp32
    (:meth:`Precision.fsdp_policies`). ``score`` is a forward method too: the trainer's log-probs
    and values go through it."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    precision.masters_(policy)
    lm_mp, head_mp = precision.fsdp_policies()
    for block in policy.transformer_blocks():  # GPT2Block, LlamaDecoderLayer, ...
        fully_shard(block, mesh=mesh, mp_policy=lm_mp)
    fully_shard(policy.value_head, mesh=mesh, mp_policy=head_mp)
    fully_shard(policy, mesh=mesh, mp_policy=lm_mp)
    register_fsdp_forward_method(policy, "score")
