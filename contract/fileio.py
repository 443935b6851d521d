"""Atomic file writes: a reader sees the old file or the whole new one, never half of it (one home for the rule).

The data pipeline (reports, markers, pack.json) and the trainer (config.yaml, checkpoint metadata)
both write small files that another process may read at any moment, or that a killed job may leave
half-written. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: str | bytes, durable: bool = False) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path`: a temporary file beside it, then os.replace.

    The temporary name carries the process id, so two processes writing the same path never share one.
    durable=True also fsyncs the file and its directory (the write survives a power loss, not only a
    killed process; checkpoints use it). Raises OSError from the file system; the temporary file is
    removed on failure.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(path: str | Path, obj: Any, durable: bool = False) -> None:
    """`obj` as indented JSON with a final newline at `path`, atomically (see write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n", durable)
