"""One server per data dir: an exclusive lock held for the process's life.

The lock file (``DATA_DIR/imagegate.lock``) is ``flock``-ed and names its holder (pid, host,
port, start time), so a second ``imagegate serve`` on the same data dir refuses to start with
a message saying who has it, before it touches the job store. The kernel drops the lock when the
holder dies (``kill -9`` included), so a stale file never blocks a restart.

Within one process the lock is re-entrant (counted), so the CLI can take it before the model
loads and the job store take it again when it opens.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import socket
import threading
from pathlib import Path

import msgspec

LOCK_NAME = "imagegate.lock"


class Holder(msgspec.Struct, kw_only=True):
    """Who holds a data dir."""

    pid: int
    host: str
    port: int | None = None
    started: str = ""

    def describe(self) -> str:
        """``pid 123 on host h (port 8000, started …)``."""
        where = f", port {self.port}" if self.port else ""
        return f"pid {self.pid} on host {self.host}{where}, started {self.started or '?'}"


class DataDirBusy(Exception):
    """Another process holds the data dir; the message names it."""

    def __init__(self, path: Path, holder: Holder | None) -> None:
        who = holder.describe() if holder else "another process (holder unknown)"
        super().__init__(f"the data dir {path.parent} is in use by {who}; stop that server or "
                         "pass another --data-dir")
        self.holder = holder


_held: dict[Path, list[int]] = {}  # lock path → [fd, count]
_guard = threading.Lock()


def read_holder(lock_path: Path) -> Holder | None:
    """The holder recorded in a lock file, if readable."""
    try:
        return msgspec.json.decode(lock_path.read_bytes(), type=Holder)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def acquire(data_dir: Path, port: int | None = None) -> Path:
    """Lock ``data_dir`` for this process (re-entrant); raise :class:`DataDirBusy` if taken."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / LOCK_NAME).resolve()
    with _guard:
        if path in _held:
            _held[path][1] += 1
            return path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(path, read_holder(path)) from None
        holder = Holder(pid=os.getpid(), host=socket.gethostname(), port=port,
                        started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, msgspec.json.encode(holder) + b"\n", 0)
        _held[path] = [fd, 1]
        return path


def release(data_dir: Path) -> None:
    """Drop one hold on ``data_dir``; the lock goes with the last one."""
    path = (data_dir / LOCK_NAME).resolve()
    with _guard:
        entry = _held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[path]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
