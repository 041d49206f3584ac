"""Which runs hold keys on a Redis server, and cleaning them.

    python -m tsd.buffers.admin list                          # every run under tsd:trajectories
    python -m tsd.buffers.admin --url redis://host:6379/0 list --stream tsd:trajectories
    python -m tsd.buffers.admin clean RUN_ID [RUN_ID ...]     # those runs' stream and dead letters
    python -m tsd.buffers.admin clean --idle 86400            # runs nothing was written to for a day
    python -m tsd.buffers.admin clean --all --dry-run         # what --all would delete

A run's keys are its stream ``<stream>:<run_id>`` and its dead letters ``<stream>:<run_id>:dead``
(:class:`~tsd.buffers.redis.RedisBuffer`). A finished run deletes its stream and its dead letters
expire, and so do a killed run's keys (``buffer.ttl_s``, ``buffer.dead_ttl_s``): this command is for
looking, and for servers that ran older code or shorter-lived experiments. ``clean`` deletes only
the keys it lists and never a run that was written to in the last ``--idle`` seconds; ``--all``
does not ask. The URL comes from ``--url``, else ``$TSD_REDIS_URL``, else the local default, as for
the buffer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from tsd.buffers.base import BufferConnectionError
from tsd.buffers.redis import DEFAULT_URL, ENV_URL, redact_url
from tsd.resume import RUN_ID_PATTERN

DEFAULT_STREAM = "tsd:trajectories"
DEAD_SUFFIX = ":dead"


@dataclass
class RunKeys:
    """What one run holds on the server."""

    run_id: str
    #: the keys, stream first (either may be missing)
    keys: list[str] = field(default_factory=list)
    entries: int = 0  # in the stream: undelivered + pending
    pending: int = 0  # delivered, not acked
    dead_letters: int = 0
    #: seconds since anything was last written to either key (None: unknown)
    idle_s: float | None = None
    #: seconds until the first of its keys expires (None: a key without expiry)
    expires_in_s: float | None = None
    no_expiry: list[str] = field(default_factory=list)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _s(x: bytes | str) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def _run_of(key: str, prefix: str) -> str | None:
    """The run id a key of ``prefix`` belongs to, None for a key that is not a run's."""
    rest = key[len(prefix) + 1 :] if key.startswith(prefix + ":") else ""
    if rest.endswith(DEAD_SUFFIX):
        rest = rest[: -len(DEAD_SUFFIX)]
    return rest if RUN_ID_PATTERN.fullmatch(rest) else None


def _last_write_s(client: redis.Redis, key: str, now_ms: int) -> float | None:
    """Seconds since the newest entry of a stream was added (its id is its time), or since the key
    was last touched when it never had one (OBJECT IDLETIME; None where the server does not say)."""
    try:
        last = _s(client.xinfo_stream(key)["last-generated-id"])
        ms = int(last.split("-")[0])
        if ms > 0:
            return max(0.0, (now_ms - ms) / 1000)
        idle = client.object("idletime", key)
        return float(idle) if idle is not None else None
    except (redis.ResponseError, ValueError):
        return None


def find_runs(client: redis.Redis, prefix: str = DEFAULT_STREAM) -> list[RunKeys]:
    """Every run with a stream or dead letters under ``prefix``, most recently written first."""
    runs: dict[str, RunKeys] = {}
    now_ms = int(time.time() * 1000)
    for raw in client.scan_iter(match=f"{_glob_escape(prefix)}:*", count=1000, _type="stream"):
        key = _s(raw)
        run_id = _run_of(key, prefix)
        if run_id is None:
            continue
        run = runs.setdefault(run_id, RunKeys(run_id))
        idle = _last_write_s(client, key, now_ms)  # before other reads: OBJECT IDLETIME counts them
        if idle is not None:
            run.idle_s = idle if run.idle_s is None else min(run.idle_s, idle)
        ttl_ms = client.pttl(key)
        if ttl_ms == -2:  # expired or deleted since the scan
            continue
        if ttl_ms == -1:
            run.no_expiry.append(key)
        else:
            s = ttl_ms / 1000
            run.expires_in_s = s if run.expires_in_s is None else min(run.expires_in_s, s)
        if key.endswith(DEAD_SUFFIX):
            run.dead_letters = int(client.xlen(key))
            run.keys.append(key)
        else:
            run.entries = int(client.xlen(key))
            with_group = client.xinfo_groups(key)
            run.pending = sum(int(g["pending"]) for g in with_group)
            run.keys.insert(0, key)
    out = [r for r in runs.values() if r.keys]
    return sorted(out, key=lambda r: (r.idle_s is None, r.idle_s or 0.0, r.run_id))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def format_runs(runs: Sequence[RunKeys]) -> str:
    rows = [("run_id", "entries", "pending", "dead_letters", "last_write", "expires_in", "keys")]
    for r in runs:
        expiry = "never (" + ", ".join(r.no_expiry) + ")" if r.no_expiry else _age(r.expires_in_s)
        rows.append(
            (
                r.run_id,
                str(r.entries),
                str(r.pending),
                str(r.dead_letters),
                _age(r.idle_s) + (" ago" if r.idle_s is not None else ""),
                expiry,
                " ".join(r.keys),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def _connect(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as e:
        client.close()
        raise BufferConnectionError(f"cannot reach Redis at {redact_url(url)}: {e}") from None
    except redis.ResponseError as e:  # NOAUTH, WRONGPASS
        client.close()
        raise BufferConnectionError(f"Redis at {redact_url(url)} refused us: {e}") from None
    return client


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tsd.buffers.admin",
        description="List the tsd runs that hold keys on a Redis server, and clean them.",
    )
    ap.add_argument(
        "--url",
        default=None,
        help=f"redis://[:password@]host:port/db (default ${ENV_URL}, else {DEFAULT_URL})",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for name, what in (("list", "list the runs and their keys"), ("clean", "delete runs' keys")):
        p = sub.add_parser(name, help=what)
        p.add_argument(
            "--stream", default=DEFAULT_STREAM, help=f"the buffer.stream prefix (default {DEFAULT_STREAM})"
        )
        if name == "clean":
            p.add_argument("run_ids", nargs="*", help="the runs to clean")
            p.add_argument(
                "--idle", type=float, default=None, help="every run not written to for this many seconds"
            )
            p.add_argument("--all", action="store_true", help="every run under the prefix")
            p.add_argument(
                "--dry-run", action="store_true", help="list what would be deleted, delete nothing"
            )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "clean":
        chosen = sum((bool(args.run_ids), args.idle is not None, args.all))
        if chosen != 1:
            ap.error("clean: give run ids, or --idle SECONDS, or --all (one of them)")
        if args.idle is not None and not args.idle > 0:
            ap.error(f"clean --idle: {args.idle} is out of range (accepted: seconds > 0)")
        bad = [r for r in args.run_ids if not RUN_ID_PATTERN.fullmatch(r)]
        if bad:
            ap.error(f"clean: {bad[0]!r} is not a run id (1-64 letters, digits, '_', '.', '-')")
    url = args.url or os.environ.get(ENV_URL) or DEFAULT_URL
    try:
        client = _connect(url)
    except BufferConnectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        runs = find_runs(client, args.stream)
        if args.command == "list":
            info: dict[str, Any] = client.info("memory")
            print(
                f"{redact_url(url)}: {len(runs)} runs under {args.stream}:*, used_memory {info['used_memory_human']}"
            )
            if runs:
                print(format_runs(runs))
            return 0
        if args.all:
            victims = runs
        elif args.idle is not None:
            victims = [r for r in runs if r.idle_s is not None and r.idle_s >= args.idle]
        else:
            wanted = set(args.run_ids)
            victims = [r for r in runs if r.run_id in wanted]
            for missing in sorted(wanted - {r.run_id for r in victims}):
                print(f"{missing}: no keys under {args.stream}:{missing}")
        keys = [k for r in victims for k in r.keys]
        if args.dry_run:
            print(f"would delete {len(keys)} keys of {len(victims)} runs (dry run)")
        elif keys:
            deleted = int(client.delete(*keys))
            # the runs' consumer heartbeats (strings that expire by themselves within buffer.heartbeat_s)
            beats = [
                k
                for r in victims
                for k in client.scan_iter(f"{_glob_escape(args.stream)}:{r.run_id}:alive:*")
            ]
            if beats:
                client.delete(*beats)
            print(f"deleted {deleted} keys of {len(victims)} runs")
        else:
            print("nothing to delete")
        if victims:
            print(format_runs(victims))
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
