"""Two-node loopback runs under torchrun, one after another, counting how many end with exit 0 on
both nodes (the SIGABRT some rank sets had at exit, in FSDP2-on-gloo teardown).

    python scripts/multinode_exits.py --runs 50                      # 2 agents x 1 rank (trainer | generator)
    python scripts/multinode_exits.py --runs 10 --nproc-per-node 2   # 2 agents x 2 ranks: a trainer and a
                                                                     # generator on each (strategy.layout=per_node)

Each run is the command of docs/distributed.md ("Several nodes: torchrun") on 127.0.0.1: two
torchrun agents (``--nnodes 2``, c10d rendezvous), the cispo smoke run on the bundled tiny policy,
a real ``redis-server`` on a free port. A run counts as clean when both agents exit 0 and no rank
was reported killed by a signal; the logs of the others are kept in ``--out``. Prints one line per
run and the count.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' throwaway redis-server

#: what torchrun's agent prints about a rank a signal ended (SIGABRT: "Signal 6", exitcode -6)
SIGNALLED = re.compile(r"exitcode\s*:\s*-\d+|Signal \d+ \(SIG\w+\) received|SIGABRT|core dumped")


def start(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    with open(log, "w") as f:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def one_run(
    i: int, a: argparse.Namespace, redis_url: str, out: Path
) -> tuple[list[int | None], float, list[str]]:
    from redis_server import free_port

    work = Path(tempfile.mkdtemp(prefix=f"tsd-multinode-{i}-"))
    port = free_port()
    ranks = 2 * a.nproc_per_node
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", str(a.nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"exits-{port}",
        "--max-restarts", "0",
        str(ROOT / "train.py"),
        "experiment=cispo_countdown", "debug=smoke", f"trainer.max_steps={a.steps}",
        "strategy=generator_trainer", "buffer=redis", f"buffer.url={redis_url}", f"buffer.stream=tsd-exits-{port}",
        f"trainer.devices={a.nproc_per_node}", "trainer.num_nodes=2",
        f"strategy.num_generators={a.generators or ranks // 2}", *([f"strategy.layout={a.layout}"] if a.layout else []),
        "callbacks.eval=null", "callbacks.export=null", "callbacks.checkpoint=null",
        "hydra.run.dir=outputs/run",
    ]  # fmt: skip
    t0 = time.monotonic()
    logs = [work / "node_a.log", work / "node_b.log"]
    nodes = [start(cmd, logs[0], work)]
    deadline = time.monotonic() + 120
    while True:  # b starts once a listens: a hosts the rendezvous, as node 0 of a cluster does
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if nodes[0].poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    nodes.append(start(cmd, logs[1], work))
    codes: list[int | None] = []
    for n in nodes:
        try:
            codes.append(n.wait(timeout=a.timeout))
        except subprocess.TimeoutExpired:
            os.killpg(n.pid, 9)
            n.wait()
            codes.append(None)
    seconds = time.monotonic() - t0
    signalled = [
        f"{p.stem}: {m.group(0)}" for p in logs for m in SIGNALLED.finditer(p.read_text(errors="replace"))
    ]
    if codes != [0, 0] or signalled or i == 0:  # the first run's logs are kept to read the roles
        keep = out / f"run{i:03d}"
        keep.mkdir(parents=True, exist_ok=True)
        for p in logs:
            shutil.copy(p, keep / p.name)
    shutil.rmtree(work, ignore_errors=True)
    return codes, seconds, signalled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--nproc-per-node", type=int, default=1, help="ranks per agent (1 or 2)")
    ap.add_argument("--generators", type=int, default=None, help="default: half the ranks")
    ap.add_argument(
        "--layout", default=None, help="strategy.layout (default: per_node with 2 ranks per node)"
    )
    ap.add_argument("--steps", type=int, default=3, help="trainer.max_steps of each run")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one agent may take")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "multinode_exits", help="logs of unclean runs"
    )
    a = ap.parse_args(argv)
    if a.layout is None and a.nproc_per_node > 1:
        a.layout = "per_node"
    from redis_server import redis_server

    clean = 0
    t_all = time.monotonic()
    with redis_server() as url:
        for i in range(a.runs):
            codes, seconds, signalled = one_run(i, a, url, a.out)
            if i == 0:
                roles = sorted(
                    set(
                        re.findall(
                            r"(rank \d+ \((?:trainer|generator) \d+ of \d+\)): process groups ready",
                            "".join(p.read_text(errors="replace") for p in (a.out / "run000").glob("*.log")),
                        )
                    )
                )
                print(f"roles (kept in {a.out / 'run000'}): {roles}", flush=True)
            ok = codes == [0, 0] and not signalled
            clean += ok
            print(
                f"run {i + 1:3d}/{a.runs}: exit codes {codes}, {seconds:5.1f}s"
                + ("" if ok else f"  NOT CLEAN {signalled[:3]} (logs: {a.out / f'run{i:03d}'})"),
                flush=True,
            )
    print(
        f"\n{clean} of {a.runs} runs exited 0 on both nodes with no rank signalled "
        f"({a.nproc_per_node} rank(s) per node, layout {a.layout}; {time.monotonic() - t_all:.0f}s)"
    )
    return 0 if clean == a.runs else 1


if __name__ == "__main__":
    sys.exit(main())
