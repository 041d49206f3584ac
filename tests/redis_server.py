"""A throwaway real ``redis-server`` for tests (and ``benchmarks/bench_buffer.py``).

``redis_server()`` starts one on a free loopback port, in a temp dir, with persistence off,
waits until PING answers, yields its URL and kills it. ``redis_for_tests()`` yields
``$TSD_TEST_REDIS_URL`` instead when that is set (an already running server; tests use unique
keys and delete them). A test module turns either into a fixture::

    @pytest.fixture(scope="session")
    def redis_url():
        with redis_for_tests() as url:
            yield url

Both raise :class:`RedisServerNotFound` (turn it into ``pytest.skip(reason=str(e))``) when the
binary is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ENV_TEST_URL = "TSD_TEST_REDIS_URL"
MISSING_REASON = "redis-server binary not found (apt-get install redis-server)"


class RedisServerNotFound(RuntimeError):
    """No ``redis-server`` on PATH."""


def free_port() -> int:
    """A loopback TCP port nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(password: str | None = None, start_timeout: float = 10.0) -> Iterator[str]:
    """Start ``redis-server`` on 127.0.0.1:<free port>; yield ``redis://[:password@]127.0.0.1:port/0``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisServerNotFound(MISSING_REASON)
    workdir = Path(tempfile.mkdtemp(prefix="tsd-redis-"))
    proc: subprocess.Popen | None = None
    try:
        for _attempt in range(3):  # the free port can be taken between free_port() and bind
            port = free_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
            args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
            if password is not None:
                args += ["--requirepass", password]
            with open(workdir / "redis.log", "ab") as logf:
                proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
            auth = f":{password}@" if password is not None else ""
            url = f"redis://{auth}127.0.0.1:{port}/0"
            if _wait_for_ping(url, proc, start_timeout):
                break
            proc.kill()
            proc.wait()
        else:
            log = (workdir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server did not start; its log:\n{log}")
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_ping(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.02)
        return False
    finally:
        client.close()


@contextmanager
def redis_for_tests() -> Iterator[str]:
    """``$TSD_TEST_REDIS_URL`` if set, else a fresh :func:`redis_server`."""
    url = os.environ.get(ENV_TEST_URL)
    if url:
        yield url
        return
    with redis_server() as url:
        yield url
