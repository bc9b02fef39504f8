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
        """Take the lock, or raise :class:`DataDirInUse` at once (never waits, not even on a
        frozen disk: a folder or lock file that exists is not created again, as creating
        waits for the disk to take writes); OSError when the folder cannot hold the file."""
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise DataDirInUse(self._in_use(holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _in_use(self, holder: str) -> str:
        """Who holds the lock, for the operator: the bridge whose pid is in the file, or, once
        that one has exited, its spool writer process (stuck on a disk that takes no write)."""
        if holder.isdigit() and not _alive(int(holder)):
            return (
                f"data_dir {self.path.parent} is still locked by the spool writer process of "
                f"agi-bridge pid {holder}, which has exited (lock {self.path}): the writer ends "
                "once its last commit is done, which a frozen or failing disk holds until it "
                "takes writes again (`ps` shows it as agi_bridge.spool_writer). Thaw or fix "
                "the disk, then start the bridge"
            )
        who = f"pid {holder}" if holder.isdigit() else "another process"
        return (
            f"data_dir {self.path.parent} is in use by a running agi-bridge ({who}, lock "
            f"{self.path}): one bridge per spool. Stop that one first, or give this one its "
            "own data_dir"
        )

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


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: it exists (signal 0 sends nothing) and is not a
    zombie (exited, its status not yet collected by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to ask (or not ours to see): it exists
    return stat[stat.rindex(")") + 2] != "Z"
