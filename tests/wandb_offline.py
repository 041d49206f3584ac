"""Read an offline W&B run back: the records of ``wandb/offline-run-*/run-<id>.wandb``.

wandb >= 0.2x writes ``config.yaml`` and ``wandb-summary.json`` only when a run is synced, and no
longer ships a Python reader of its transaction log, so the tests read the log themselves. Its
format: a 7-byte header (``:W&B``, magic ``0xBEE1`` little-endian, version 0), then LevelDB's log
format (32 KiB blocks; each chunk is crc32 (4) + length (2, LE) + type (1: full, 2: first,
3: middle, 4: last) + payload; a block tail shorter than a chunk header is zero padding). Each
reassembled payload is one ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024


def items_to_dict(items) -> dict[str, Any]:
    """History/summary/config items -> a dict; an item with a ``nested_key`` path (a logged media
    object's fields) lands in nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a W&B transaction log"
    records, pending, pos = [], b"", len(HEADER)
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # zero padding at the end of a block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # preallocated zeros: end of the log
            break
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        else:
            raise ValueError(f"{path}: chunk type {kind} at byte {pos}")
        r = pb.Record()
        r.ParseFromString(pending)
        records.append(r)
    return records


class OfflineRun:
    """One offline run directory: its run record, config, history rows, metric definitions, summary
    and media files."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        (log,) = run_dir.glob("run-*.wandb")
        self.records = read_records(log)
        kinds = lambda k: [getattr(r, k) for r in self.records if r.WhichOneof("record_type") == k]  # noqa: E731
        runs = kinds("run")
        self.run = runs[0]
        self.config: dict[str, Any] = {}
        for rec in [r.config for r in runs] + kinds("config"):
            self.config.update(items_to_dict(rec.update))
        self.history = [items_to_dict(h.item) for h in kinds("history")]
        self.metrics = kinds("metric")
        self.summary: dict[str, Any] = {}
        for s in kinds("summary"):
            self.summary.update(items_to_dict(s.update))
        self.exits = kinds("exit")

    def media(self, pattern: str) -> list[Path]:
        return sorted((self.dir / "files" / "media").rglob(pattern))


def offline_runs(save_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(d) for d in sorted((save_dir / "wandb").glob("offline-run-*"))]
