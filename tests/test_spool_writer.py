"""The spool writer's group commit window: serve() in a thread, over a real socket pair, on a
real SQLite file, driven as the bridge drives it."""

from __future__ import annotations

import select
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from agi_bridge import spool_writer
from agi_bridge.spool import SPOOL_FILE
from agi_bridge.spool_writer import MAX_BATCH, RECEIVE_BYTES, frame, unframe

# Far longer than any test runs: a job that waited it out would fail the test's deadline.
WINDOW = 30.0
# How long a test lets an answer take that comes at once: generous for a loaded 2-core box,
# and a third of WINDOW.
PROMPTLY = 10.0
# How long a test watches for an answer that must not come while a window is open.
NO_ANSWER = 0.3


class Bridge:
    """The bridge's end of the socket pair: sends jobs, reads the writer's answers."""

    def __init__(self, sock: socket.socket, writer: threading.Thread) -> None:
        self.sock = sock
        self.writer = writer
        self._in = bytearray()

    def add(self, *uniqueids: str) -> None:
        """Send one ``add`` job (a stop by extension) per call uniqueid."""
        fields = ("stop", "410", "Fred", None, "extension")
        self.sock.sendall(
            b"".join(frame(("add", (fields, u, 1_800_000_000.0, 0.0, False))) for u in uniqueids)
        )

    def answers(self, timeout: float) -> list[object]:
        """The answers that have come within ``timeout`` seconds of waiting on the socket
        (returns as soon as one has; [] when none did)."""
        deadline = time.monotonic() + timeout
        while not (messages := unframe(self._in)):
            left = max(deadline - time.monotonic(), 0)
            if not select.select([self.sock], [], [], left)[0]:
                return []
            data = self.sock.recv(RECEIVE_BYTES)
            if not data:
                return []
            self._in += data
        return messages

    def close_and_wait(self) -> list[object]:
        """Close the bridge's end (its stop): serve() must return within PROMPTLY; every
        answer it sent until then."""
        self.sock.shutdown(socket.SHUT_WR)
        self.writer.join(PROMPTLY)
        assert not self.writer.is_alive(), f"serve() still runs {PROMPTLY} s after end of file"
        messages: list[object] = []
        while batch := self.answers(0):
            messages += batch
        return messages


@contextmanager
def writer(path: Path, *, window: float) -> Iterator[Bridge]:
    """serve() with ``window`` in a thread on the spool at ``path``; yields the bridge's end."""
    ours, theirs = socket.socketpair()
    connection = spool_writer.connect(str(path), fsync=False, migrate=True)
    thread = threading.Thread(
        target=spool_writer.serve,
        args=(theirs.fileno(), connection, str(path)),
        kwargs={"window": window},
    )
    thread.start()
    try:
        with ours:
            yield Bridge(ours, thread)
    finally:
        thread.join(PROMPTLY)  # end of file (ours closed): serve() returns
        theirs.close()


def pending(path: Path) -> list[str]:
    """The call uniqueids of the pending entries, read from the file by a connection of its
    own (what is there is committed)."""
    with closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT call_uniqueid FROM pending ORDER BY id")]


def committed(answer: object, count: int) -> None:
    """``answer`` is one batch's answer, ``count`` jobs, each succeeded."""
    assert isinstance(answer, tuple)
    outcomes, lost, damaged = answer
    assert (lost, damaged) == (None, None)
    assert len(outcomes) == count
    assert all(isinstance(value, int) and error is None for value, error in outcomes)


def commit_alone(bridge: Bridge, uniqueid: str) -> None:
    """Add one job and see it committed alone and at once; a batch has just ended then, so
    the window is open for the next job."""
    bridge.add(uniqueid)
    (answer,) = bridge.answers(PROMPTLY)
    committed(answer, 1)


def test_a_job_after_a_quiet_spell_is_committed_at_once(tmp_path: Path) -> None:
    """The first job after a quiet spell is committed and answered without waiting the window."""
    path = tmp_path / SPOOL_FILE
    with writer(path, window=WINDOW) as bridge:
        commit_alone(bridge, "1.1")
        assert pending(path) == ["1.1"]


def test_jobs_arriving_within_the_window_share_one_commit(tmp_path: Path) -> None:
    """Under load (a job right after a batch), the writer waits for more and commits them in
    one batch with one answer."""
    path = tmp_path / SPOOL_FILE
    with writer(path, window=WINDOW) as bridge:
        commit_alone(bridge, "1.1")  # a batch just ended: the next job lingers
        bridge.add("1.2")
        assert bridge.answers(NO_ANSWER) == [], "answered alone: no window"
        bridge.add("1.3")
        (answer,) = bridge.close_and_wait()
        committed(answer, 2)
    assert pending(path) == ["1.1", "1.2", "1.3"]


def test_the_bridge_closing_its_end_commits_an_open_window_at_once(tmp_path: Path) -> None:
    """End of file while a window is open (a stop, a bridge leaving a frozen disk): the writer
    commits what it holds and returns without waiting the window out."""
    path = tmp_path / SPOOL_FILE
    with writer(path, window=WINDOW) as bridge:
        commit_alone(bridge, "1.1")
        bridge.add("1.2")
        (answer,) = bridge.close_and_wait()
        committed(answer, 1)
    assert pending(path) == ["1.1", "1.2"]


def test_a_full_batch_is_committed_without_waiting_the_window_out(tmp_path: Path) -> None:
    """MAX_BATCH jobs gathered in a window are committed at once, before the window ends."""
    path = tmp_path / SPOOL_FILE
    with writer(path, window=WINDOW) as bridge:
        commit_alone(bridge, "1.0")
        bridge.add(*(f"2.{n}" for n in range(MAX_BATCH)))
        (answer,) = bridge.answers(PROMPTLY)
        committed(answer, MAX_BATCH)
        assert len(pending(path)) == 1 + MAX_BATCH
