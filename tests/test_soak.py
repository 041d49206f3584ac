"""Weeks of runs on one Redis server, in short: 30 runs in a row (one Hydra multirun of
``python train.py``, as a sweep runs them) on a real redis-server, each rejecting a few records.
The server's keys and memory must stay bounded: a finished run deletes its stream, and its dead
letters expire (``buffer.dead_ttl_s``, short here). A sampler thread reads the key count and
``used_memory`` all along; the figures are printed (``-s`` shows them).

    python -m pytest tests/test_soak.py -q -s
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RUNS = 30
DEAD_TTL_S = 2.0


class ServerWatch:
    """Samples the keys under ``prefix`` and the server's ``used_memory`` every ``every_s`` seconds
    on its own connection, until stopped."""

    def __init__(self, url: str, prefix: str, every_s: float = 0.1) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix, self.every_s = prefix, every_s
        self.samples: list[tuple[int, int]] = []  # (keys under the prefix, used_memory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        keys = sum(1 for _ in self.client.scan_iter(f"{self.prefix}:*", count=1000))
        return keys, int(self.client.info("memory")["used_memory"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> ServerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _runs(seeds: range, prefix: str, redis_url: str, policy_dir: str, sweep: Path) -> list[dict]:
    """``python train.py -m ... seed=<seeds>``: one run per seed, in a row; their results."""
    args = [
        "-m",
        "experiment=cispo_countdown",
        "debug=smoke",
        f"model.name_or_path={policy_dir}",
        "buffer=redis",
        f"buffer.url={redis_url}",
        f"buffer.stream={prefix}",
        f"buffer.dead_ttl_s={DEAD_TTL_S}",
        # every run rejects 2 records (versions ahead of any trainer): dead letters on each run
        "rollout._target_=test_isolation.PoisonedGroupRollout",
        "+rollout.poison=2",
        "trainer.max_steps=2",
        *("callbacks.eval=null", "callbacks.export=null", "callbacks.checkpoint=null"),
        f"seed=range({seeds.start},{seeds.stop})",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=sweep.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the runs did not finish within 600 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == len(seeds), out[-4000:]
    return results


def _settled(watch: ServerWatch) -> tuple[int, int]:
    """(keys, used_memory) once the last runs' dead letters have expired."""
    deadline = time.monotonic() + DEAD_TTL_S + 10
    while watch.sample()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    return watch.sample()


@pytest.mark.slow
@pytest.mark.redis
def test_thirty_runs_in_a_row_leave_the_server_as_they_found_it(policy_dir, redis_url, tmp_path):
    """Two sweeps of 15 runs; after each the server holds no key of them, and the second sweep adds
    nothing to the memory the first one left (a one-time rise, about 0.45 MiB here, is the server's
    own: its tables and script cache grow once and are not given back)."""
    prefix = f"tsd-test:soak:{uuid.uuid4().hex[:8]}"
    half = RUNS // 2
    watch = ServerWatch(redis_url, prefix)
    keys0, mem0 = watch.sample()
    t0 = time.monotonic()
    with watch:
        results = _runs(range(0, half), prefix, redis_url, policy_dir, tmp_path / "first")
        keys1, mem1 = _settled(watch)
        results += _runs(range(half, RUNS), prefix, redis_url, policy_dir, tmp_path / "second")
        runs_s = time.monotonic() - t0
        keys2, mem2 = _settled(watch)
    watch.client.close()

    assert len({r["run_id"] for r in results}) == RUNS
    counts = [(r["run_id"], r["buffer/dropped_invalid"], r["buffer/dead_letters"]) for r in results]
    assert all(d == 2 == dl for _, d, dl in counts), f"(run, dropped_invalid, dead_letters): {counts}"
    left = sum(r["buffer/left"] for r in results)  # what each run's stream held when it finished
    max_keys = max(k for k, _ in watch.samples)
    max_mem = max(m for _, m in watch.samples)
    mib = 2**20
    print(
        f"\nsoak: {RUNS} runs in {runs_s:.0f}s; keys under the prefix: {keys0} before, {keys1} after "
        f"{half} runs, {keys2} after {RUNS}, at most {max_keys} at any time; used_memory: "
        f"{mem0 / mib:.2f} MiB before, {mem1 / mib:.2f} MiB after {half} runs, {mem2 / mib:.2f} MiB after "
        f"{RUNS}, at most {max_mem / mib:.2f} MiB; without deletion and expiry {2 * RUNS} keys and "
        f"{left} trajectories would have stayed"
    )
    assert keys0 == keys1 == keys2 == 0
    # at any moment: the running run's stream and dead letters, and the dead letters of the runs that
    # finished in the last DEAD_TTL_S seconds (a run takes about a second here); all 60 keys if
    # nothing were removed
    assert max_keys <= 2 + 2 * DEAD_TTL_S / min(1.0, runs_s / RUNS) + 2, watch.samples
    assert left >= 4 * RUNS  # every run left trajectories behind: there was something to remove
    # bounded: 15 more runs leave nothing behind (client buffers and allocator slack aside)
    assert mem2 - mem1 < 64 * 1024, (mem0, mem1, mem2)
    assert mem2 - mem0 < 1 * mib, (mem0, mem1, mem2)
