"""Two nodes, rehearsed on one machine: two torchrun agents on loopback (``--nnodes 2``, c10d
rendezvous), one rank each, run ``strategy=generator_trainer`` with the Redis buffer (one trainer,
one generator, on different "nodes"). The run must complete, both nodes must agree on the run id
and the stream, and when one node dies (its agent and its rank, SIGKILL: what a machine that
vanishes does) the other must stop within seconds, saying why.

    python -m pytest tests/test_multinode.py -q -s

The commands are docs/distributed.md's with 127.0.0.1 for the rendezvous host.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
#: a two-node run takes ~30-60 s here (two Python start-ups on two shared cores); this bounds a hang
TIMEOUT = 300
PEER_TIMEOUT_S = 10

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.distributed,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table (Linux)"),
]


class Node:
    """One "node": a torchrun agent in its own session, its output in ``log``."""

    def __init__(self, name: str, log: Path, args: list[str], cwd: Path) -> None:
        self.name, self.log = name, log
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline",
        }
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tree(self) -> list[int]:
        """The agent and every process below it (its ranks run in sessions of their own)."""
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with suppress(OSError, IndexError, ValueError):
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(d.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def kill(self) -> None:
        """The machine is gone: every process of the node at once."""
        for pid in self.tree():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _start(tmp_path: Path, redis_url: str, policy_dir: str, overrides: list[str]) -> tuple[list[Node], str]:
    """The same command on both nodes (docs/distributed.md's), a fixed run directory; returns the nodes and
    the stream prefix."""
    prefix = f"tsd-test:multinode:{uuid.uuid4().hex[:8]}"
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"rehearsal-{port}",
        "--max-restarts", "0",
        str(ROOT / "train.py"),
        "experiment=cispo_countdown", "debug=smoke", f"model.name_or_path={policy_dir}",
        "strategy=generator_trainer", "buffer=redis", f"buffer.url={redis_url}", f"buffer.stream={prefix}",
        "trainer.devices=1", "trainer.num_nodes=2", f"strategy.peer_timeout_s={PEER_TIMEOUT_S}",
        "callbacks.eval=null", "callbacks.export=null", "callbacks.checkpoint=null",
        "hydra.run.dir=outputs/rehearsal", *overrides,
    ]  # fmt: skip
    first = Node("a", tmp_path / "node_a.log", cmd, tmp_path)
    # b starts once a listens on the rendezvous port: a hosts the rendezvous and the job's store, as
    # the --rdzv-endpoint node of a cluster does
    deadline = time.monotonic() + 120
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert first.proc.poll() is None and time.monotonic() < deadline, first.text()[-3000:]
        time.sleep(0.1)
    return [first, Node("b", tmp_path / "node_b.log", cmd, tmp_path)], prefix


def _stop_all(nodes: list[Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.kill()


def _role(node: Node) -> str | None:
    m = re.search(r"rank \d \((trainer|generator) \d of 1\): process groups ready", node.text())
    return m.group(1) if m else None


def test_two_nodes_train_to_the_end_on_one_run_id_and_one_stream(policy_dir, redis_url, tmp_path):
    t0 = time.monotonic()
    nodes, prefix = _start(tmp_path, redis_url, policy_dir, ["trainer.max_steps=6"])
    try:
        codes = [n.wait(TIMEOUT) for n in nodes]
        seconds = time.monotonic() - t0
        logs = [n.text() for n in nodes]
        assert codes == [0, 0], "\n".join(t[-3000:] for t in logs)
    finally:
        _stop_all(nodes)
    print(f"\ntwo nodes: the run completed in {seconds:.1f}s (both agents started to both exited)")
    assert sorted(_role(n) or "" for n in nodes) == ["generator", "trainer"]
    # both nodes derived the same run id (the same working directory and hydra.run.dir) ...
    run_ids = [set(re.findall(r"run id: ([0-9a-f]{16})", t)) for t in logs]
    assert len(run_ids[0]) == 1 and run_ids[0] == run_ids[1], run_ids
    (run_id,) = run_ids[0]
    # ... and the same stream, checked on the job's store by every rank against rank 0
    stream = f"{prefix}:{run_id}"
    agreed = [re.findall(r"agrees with rank 0 on (\{.*\})", t) for t in logs]
    assert all(a and json.loads(a[0]) == {"buffer": stream} for a in agreed), agreed
    res = json.loads((tmp_path / "outputs" / "rehearsal" / "results.json").read_text())
    assert res["global_step"] == 6 and res["run_id"] == run_id and res["buffer/produced"] > 0
    trainer_log = next(t for n, t in zip(nodes, logs) if _role(n) == "trainer")
    generator_log = next(t for n, t in zip(nodes, logs) if _role(n) == "generator")
    assert "all 1 generators stopped" in trainer_log and "stopped (done)" in generator_log
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(stream)  # the finished run deleted its stream
    client.close()


@pytest.mark.parametrize("victim", ["b", "a"], ids=["a node dies", "the store's node dies"])
def test_a_node_that_dies_stops_the_other_within_seconds(victim, policy_dir, redis_url, tmp_path):
    """Kill node b: node a's rank sees b's rank fall silent (its peer watch: a heartbeat on the job's
    store) and stops after strategy.peer_timeout_s, naming the lost rank. Kill node a, which hosts
    the rendezvous and the job's store (node 0 of a cluster, the --rdzv-endpoint host): b loses the
    store at once (torchrun's agent, the weight receiver or the peer watch says so). Either way it
    stops long before data.max_wait (600 s) or strategy.sync_timeout_s (300 s) would stop it."""
    # no weight sync after the start: the trainer waits on Redis, where no collective would notice
    # the dead generator (a sync would: its broadcast fails, and says so)
    nodes, _ = _start(tmp_path, redis_url, policy_dir, ["trainer.max_steps=100000", "data.sync_every=100000"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all(_role(n) for n in nodes) or not any("step 3/" in n.text() for n in nodes):
            assert all(n.proc.poll() is None for n in nodes), "\n".join(n.text()[-3000:] for n in nodes)
            assert time.monotonic() < deadline, "\n".join(n.text()[-3000:] for n in nodes)
            time.sleep(0.2)
        dead = next(n for n in nodes if n.name == victim)
        survivor = next(n for n in nodes if n is not dead)
        lost = re.search(r"(rank \d \((?:trainer|generator) \d of 1\)): process groups ready", dead.text())[1]
        t0 = time.monotonic()
        dead.kill()
        code = survivor.wait(PEER_TIMEOUT_S + 60)
        seconds = time.monotonic() - t0
        out = survivor.text()
        print(
            f"\nnode {victim} ({lost}) killed: node {survivor.name} stopped {seconds:.1f}s later (exit {code})"
        )
        assert code not in (None, 0), out[-4000:]
        if victim == "b":  # the store is alive: only the peer watch can tell
            assert f"{lost} gave no sign of life for {PEER_TIMEOUT_S} s" in out, out[-4000:]
            assert seconds >= PEER_TIMEOUT_S - 1
        else:
            said = re.search(
                r"the job's store at .* cannot be reached|weight receiver failed \(trainer rank 0 gone"
                r"|The connection to the C10d store has failed",  # torchrun's agent: its rendezvous is gone
                out,
            )
            assert said, out[-4000:]
        assert seconds < PEER_TIMEOUT_S + 30, out[-4000:]
    finally:
        _stop_all(nodes)
