"""Which ranks of a job train and which generate (``strategy.layout``).

Every rank has a *job rank* (what torchrun, SLURM or the fork launcher numbers it: node after
node, ``node x ranks_per_node + local rank``) and a *logical rank*, what the rest of tsd (and
Lightning) calls its global rank: trainers ``0..T-1``, then generators ``T..W-1``. Two layouts map
one to the other:

- ``blocked`` (the default): logical = job rank; the first T ranks train. On 2 nodes x 4 GPUs with
  2 trainers, both trainers share node 0 (their FSDP collectives stay inside one node).
- ``per_node``: every node the same mix: its last ``G / nodes`` local ranks generate, the others
  train; trainers are numbered node after node, and so are the generators. On 2 nodes x 2 ranks with
  2 generators, each node holds a trainer and a generator, so the trainers' collectives cross the
  nodes (what ``scripts/multinode_exits.py --nproc-per-node 2`` rehearses).

Job rank 0 (node 0, local rank 0) is logical rank 0, trainer 0, in both: it hosts the job's store
in fork mode and does the logging, checkpoints, evaluation and export.

    python -m pytest tests/test_placement.py -q -k layout
"""

from __future__ import annotations

from tsd.config import ConfigError

LAYOUTS = ("blocked", "per_node")


def logical_ranks(world: int, generators: int, nodes: int, layout: str) -> list[int]:
    """``out[job_rank]`` = the logical rank: trainers ``0..T-1``, generators ``T..W-1``."""
    if layout not in LAYOUTS:
        raise ConfigError(f"strategy.layout: {layout!r} is out of range (accepted: one of {LAYOUTS})")
    trainers = world - generators
    if layout == "blocked" or nodes <= 1:
        return list(range(world))
    per_node, g = divmod(world, nodes)[0], generators // nodes
    if world % nodes or generators % nodes or per_node - g < 1:
        raise ConfigError(
            f"strategy.layout: per_node needs the same mix on every node: {generators} generators over "
            f"{nodes} nodes of {world // max(nodes, 1)} ranks (accepted: num_generators a multiple of the "
            "nodes, leaving at least one trainer per node; or layout=blocked)"
        )
    t = per_node - g
    out = []
    for job in range(world):
        node, local = divmod(job, per_node)
        out.append(trainers + node * g + (local - t) if local >= t else node * t + local)
    return out
