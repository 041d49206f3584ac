"""Files a kill cannot leave half-written: written next to their path, fsynced, renamed over it.

    write_atomic(path, lambda f: torch.save(obj, f))      # checkpoints (tsd.checkpoint_io)
    write_text_atomic(out / "results.json", json.dumps(res))

``os.replace`` is atomic on POSIX within one file system, so ``path`` always holds the previous
content or the new one, whole: a resumable study that reads ``results.json`` as "this run is done"
never finds a truncated one. The temporary file is ``.<name>.<pid>.tmp`` in the same directory; one
that a killed writer left is removed by the next write of the same path (one writer per path).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a file system that cannot is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, rename it over ``path`` and
    fsync the directory. On any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        with contextlib.suppress(OSError):
            stale.unlink()
            log.info("removed %s, the temporary file of an interrupted write", stale)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` of ``text`` in UTF-8."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))
