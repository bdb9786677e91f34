"""The SQLite flush in its own process, so its CPU never holds the serving process's GIL.

In process, the SQLite flush runs off the event loop (a worker thread binds, aiosqlite's
thread runs the statements) but still in the serving process: ~26 µs of Python per report
that holds the GIL against ingest. `FlushProcess` hands each batch to a long-lived child
(`store.flush_child`), started on the first write (and again after it died), which owns its
own sqlite3 connection on the same file with the same pragmas. The parent only joins the WAL
payloads into one message and waits, in an executor thread, for the reply.

Exactly once, whatever happens to the child:

- it is killed or dies mid-write: SQLite rolls its transaction back (or it had committed and
  the retry is de-duplicated); the write raises `FlushProcessDied` (unavailable: counted,
  retried with the flusher's backoff), and the next write starts a new child;
- the flusher abandons a write (`write_timeout`) or is cancelled: the child is SIGKILLed and
  reaped before the cancellation goes on, so it cannot commit behind the retry's back (nor
  outside the budgets' commit lock);
- the parent dies (even SIGKILL): the child gets SIGKILL (PR_SET_PDEATHSIG, set from the loop
  thread that started it) or sees its socket close; no orphan is left.

Errors come back rebuilt (`flush_wire`), so `classify` treats them exactly as in process.
The child is started with `subprocess` (`python -m exporter.store.flush_child`), not
multiprocessing's "spawn": the same fresh interpreter, but the parent's `__main__` (a test
runner, a console script) is not imported again, and nothing but one socket is inherited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

import exporter
from exporter.store.flush_wire import FlushProcessDied, error_from_json, pack_request

__all__ = ["FlushProcess"]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
_PACKAGE_ROOT = str(Path(exporter.__file__).resolve().parent.parent)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _exchange(conn: Connection, proc: subprocess.Popen[bytes], payloads: Sequence[bytes]) -> Any:
    """One request and its reply (in an executor thread); the child's death is an error."""
    try:
        conn.send_bytes(pack_request(payloads))
        return orjson.loads(conn.recv_bytes())
    except (EOFError, OSError):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
        raise FlushProcessDied(
            f"the SQLite flush process (pid {proc.pid}) died mid-write "
            f"({_exit_text(proc.poll())}); nothing it had not committed is kept"
        ) from None


class FlushProcess:
    """One child process writing batches to the SQLite file at `path`."""

    def __init__(self, path: str, dims_keys: tuple[str, ...]) -> None:
        self.path = os.path.abspath(path)  # the child's working directory is not ours to trust
        self.dims_keys = dims_keys
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()
        #: children started so far (the first, and one per respawn after a death)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The running child's pid, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def _start(self) -> tuple[Connection, subprocess.Popen[bytes]]:
        """Start the child (on the loop thread: PR_SET_PDEATHSIG follows the starting thread)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            proc = subprocess.Popen(
                # -P: not the working directory's modules, the parent's exporter (PYTHONPATH)
                [sys.executable, "-P", "-m", "exporter.store.flush_child", str(theirs.fileno()),
                 str(os.getpid()), self.path, orjson.dumps(list(self.dims_keys)).decode()],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn, self._proc = Connection(ours.detach()), proc
        self.starts += 1
        log.debug("SQLite flush process started (pid %d)", proc.pid)
        return self._conn, proc

    def _discard(self) -> None:
        conn, self._conn, self._proc = self._conn, None, None
        if conn is not None:
            conn.close()

    async def write(self, payloads: Sequence[bytes]) -> tuple[int, int, int]:
        """(received, inserted, rollup rows) of one transaction in the child."""
        async with self._lock:
            if self._conn is None or self._proc is None or self._proc.poll() is not None:
                self._discard()
                conn, proc = self._start()
            else:
                conn, proc = self._conn, self._proc
            exchange = asyncio.get_running_loop().run_in_executor(
                None, _exchange, conn, proc, payloads
            )
            try:
                reply = await asyncio.shield(exchange)
            except asyncio.CancelledError:
                # abandoned (write_timeout, shutdown): the child must not commit later
                proc.kill()
                with contextlib.suppress(Exception):
                    await exchange  # ends once the child is dead and reaped
                self._discard()
                raise
            except FlushProcessDied:
                self._discard()
                raise
        if "ok" in reply:
            received, inserted, rollups = reply["ok"]
            return int(received), int(inserted), int(rollups)
        raise error_from_json(reply["error"])

    async def close(self) -> None:
        """Stop the child after the write in progress: it exits when its socket closes."""
        async with self._lock:
            proc = self._proc
            self._discard()
            if proc is None:
                return
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("SQLite flush process (pid %d) did not exit; killing it", proc.pid)
                proc.kill()
                await asyncio.to_thread(proc.wait)
