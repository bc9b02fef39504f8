"""One bridge per data folder: an exclusive ``flock`` on a file in it, held for the life of the
process and taken before anything else (ports, spool).

Two bridges sharing a spool each release the other's leases and send its entries: every stop
in flight goes out twice. The lock is advisory and per open file, so it dies with the process
(even ``kill -9``), never needs cleaning up, and the ``spool`` commands, which are meant to run
beside a bridge, simply do not take it. The spool's writer process inherits it: the folder stays
locked until the last process that may still write the spool is gone.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

LOCK_FILE: Final = "agi-bridge.lock"
# The pid written into the lock file is for the operator's message only: a few digits.
MAX_PID_TEXT: Final = 32


class DataDirInUse(OSError):
    """Another process holds the data folder's lock; the message names both. An OSError, as
    a port in use is: the command line reports both as "cannot start"."""


class DataDirLock:
    """The data folder's lock. :meth:`acquire` once, :meth:`release` at exit (or let the
    process end)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`DataDirInUse` at once (never waits); OSError when
        the folder cannot hold the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise DataDirInUse(
                f"data_dir {self.path.parent} is in use by a running agi-bridge ({who}, lock "
                f"{self.path}): one bridge per spool. Stop that one first, or give this one "
                "its own data_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def fileno(self) -> int:
        """The lock's file descriptor, for a child that must hold the lock as long as it lives
        (the spool's writer process); ValueError when not held."""
        if self._fd is None:
            raise ValueError(f"the lock {self.path} is not held")
        return self._fd

    def release(self) -> None:
        """Give the lock up (idempotent). Nothing is written: on a frozen or dead disk a
        write would hang the exit. The file stays, with the last pid in it (the next holder
        writes its own): removed, a process that opened it just before would lock a file
        nobody else sees any more."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
