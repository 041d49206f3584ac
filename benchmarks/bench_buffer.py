"""Buffer throughput: MemoryBuffer (baseline) vs JSON encode/decode alone vs RedisBuffer.

    python benchmarks/bench_buffer.py                    # starts a throwaway redis-server
    python benchmarks/bench_buffer.py --url redis://host:6379/0 --n 1000 --tokens 200

Measures records/s for ``put`` (XADD, via the capped put script) and for ``get`` + ``ack``
(XREADGROUP + XACK/XDEL) over ``--n`` typical trajectories (``--tokens`` completion tokens with
full-precision log-probs), with the trainer's batch size for ``get``. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tsd.buffers.base import Buffer
from tsd.buffers.memory import MemoryBuffer
from tsd.buffers.redis import RedisBuffer
from tsd.rl.trajectory import Trajectory


def make_trajectories(n: int, tokens: int, prompt_tokens: int = 48, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    return [
        Trajectory(
            problem_id=i,
            prompt_ids=[rng.randrange(150_000) for _ in range(prompt_tokens)],
            completion_ids=[rng.randrange(150_000) for _ in range(tokens)],
            behaviour_logprobs=[-rng.expovariate(2.0) for _ in range(tokens)],  # full float64 repr
            reward=rng.uniform(-1, 1),
            correct=rng.random() < 0.3,
            policy_version=i // 64,
            rollout="mcts",
            stats={"search/nodes": 96.0, "search/depth": 5.0, "search/sims": 64.0},
        )
        for i in range(n)
    ]


def bench(buf: Buffer, trajs: list[Trajectory], put_batch: int, get_batch: int) -> tuple[float, float]:
    """Seconds to put everything, then to get + ack everything."""
    t0 = time.perf_counter()
    for i in range(0, len(trajs), put_batch):
        buf.put(trajs[i : i + put_batch])
    t1 = time.perf_counter()
    got = 0
    while got < len(trajs):
        items = buf.get(get_batch, timeout=5.0)
        if not items:
            raise RuntimeError(f"{type(buf).__name__}: only {got} of {len(trajs)} came back")
        buf.ack([it.id for it in items])
        got += len(items)
    return t1 - t0, time.perf_counter() - t1


def json_only(trajs: list[Trajectory], put_batch: int, get_batch: int) -> tuple[float, float]:
    """The serialisation floor Redis pays on top of the memory buffer (no network)."""
    t0 = time.perf_counter()
    blobs = [t.to_json() for t in trajs]
    t1 = time.perf_counter()
    for b in blobs:
        Trajectory.from_json(b)
    return t1 - t0, time.perf_counter() - t1


@contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from redis_server import redis_server  # the same throwaway server the tests use

    with redis_server() as started:
        yield started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="existing Redis (default: start a throwaway redis-server)")
    p.add_argument("--n", type=int, default=1000, help="trajectories per run")
    p.add_argument("--tokens", type=int, default=200, help="completion tokens per trajectory")
    p.add_argument("--put-batch", type=int, default=16, help="trajectories per put (one rollout batch)")
    p.add_argument("--get-batch", type=int, default=32, help="trajectories per get (trainer batch B)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = p.parse_args()

    trajs = make_trajectories(args.n, args.tokens)
    record_kb = sum(len(t.to_json()) for t in trajs) / len(trajs) / 1024
    print(
        f"{args.n} trajectories x {args.tokens} tokens, {record_kb:.1f} KiB JSON each; "
        f"put batch {args.put_batch}, get batch {args.get_batch}; best of {args.repeats}\n"
    )

    def best(run: Callable[[], tuple[float, float]]) -> tuple[float, float]:
        runs = [run() for _ in range(args.repeats)]
        return min(r[0] for r in runs), min(r[1] for r in runs)

    rows: list[tuple[str, float, float]] = []
    rows.append(("memory", *best(lambda: bench(MemoryBuffer(), trajs, args.put_batch, args.get_batch))))
    rows.append(("json only", *best(lambda: json_only(trajs, args.put_batch, args.get_batch))))
    with redis_url(args.url) as url:
        stream = f"tsd-bench:{uuid.uuid4().hex[:8]}"
        buf = RedisBuffer(url, stream=stream, maxlen=max(10_000, args.n))
        try:
            rows.append(("redis", *best(lambda: bench(buf, trajs, args.put_batch, args.get_batch))))
        finally:
            buf._r.delete(stream)
            buf.close()

    base_put, base_get = args.n / rows[0][1], args.n / rows[0][2]
    print(
        f"{'backend':<10} {'put rec/s':>12} {'get+ack rec/s':>14} {'put MB/s':>9} {'vs memory (put / get)':>24}"
    )
    for name, t_put, t_get in rows:
        put_rate, get_rate = args.n / t_put, args.n / t_get
        # the memory buffer moves references, not bytes: no MB/s for it
        mb = f"{put_rate * record_kb / 1024:.1f}" if name != "memory" else "-"
        print(
            f"{name:<10} {put_rate:>12,.0f} {get_rate:>14,.0f} {mb:>9} "
            f"{put_rate / base_put:>11.4f} / {get_rate / base_get:.4f}"
        )


if __name__ == "__main__":
    main()
