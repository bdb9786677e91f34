"""The SQLite flush process: `python -m exporter.store.flush_child FD PARENT_PID PATH DIMS`.

Started by `store.flush_process.FlushProcess` (never by hand). It owns one sqlite3 connection
on the serving process's database file, with the engine's pragmas (`db.configure_sqlite`:
WAL, busy_timeout, synchronous=FULL, `dec_add`), and runs the exactly-once batch write of
`write_sqlite` (the same `prepare` and `_write_rows`) in one BEGIN … COMMIT per request, so
none of the flush's CPU holds the serving process's GIL.

On the socket FD, one request is one message (`flush_wire.pack_request`: the WAL record
payloads, length-prefixed). One reply per request: `{"ok": [received, inserted, rollup_rows]}`
or `{"error": …}` (`flush_wire.error_to_json`, rebuilt by the parent for `classify`).

It exits when the socket closes (the parent closed it, or died) and, through PR_SET_PDEATHSIG,
when the parent dies mid-write: a transaction it had not committed is rolled back by SQLite.
It ignores SIGINT and SIGTERM (a Ctrl-C or a `kill` of the process group): the parent stops it
after its final flush.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection

import orjson

from exporter.sched import BACKGROUND_NICE, background_process
from exporter.store.db import configure_sqlite
from exporter.store.flush_wire import error_to_json, unpack_request
from exporter.store.write_sqlite import _write_rows, prepare

__all__ = ["main", "serve", "write"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the parent dies (Linux); exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the closed socket still ends us
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    configure_sqlite(db)  # isolation_level None: BEGIN and COMMIT are ours
    return db


def write(
    db: sqlite3.Connection, payloads: Sequence[bytes], dims_keys: tuple[str, ...]
) -> list[int]:
    """[received, inserted, rollup rows] of one transaction (write_sqlite.write_sqlite's)."""
    received, rows = prepare(payloads)
    if not rows:
        return [received, 0, 0]
    db.execute("BEGIN")
    try:
        inserted, rollups = _write_rows(db, rows, dims_keys)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return [received, inserted, rollups]


def serve(conn: Connection, path: str, dims_keys: tuple[str, ...]) -> None:
    """Answer requests until the socket closes."""
    db: sqlite3.Connection | None = None
    try:
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                if db is None:
                    db = _open(path)
                reply: dict[str, object] = {"ok": write(db, unpack_request(message), dims_keys)}
            except Exception as exc:
                reply = {"error": error_to_json(exc)}
                if db is not None and db.in_transaction:  # a failed ROLLBACK: start afresh
                    db.close()
                    db = None
            del message
            try:
                conn.send_bytes(orjson.dumps(reply))
            except OSError:
                return
    finally:
        if db is not None:
            db.close()


def main(argv: Sequence[str]) -> int:
    fd, parent_pid, path, dims = argv
    _die_with_parent(int(parent_pid))
    background_process(BACKGROUND_NICE)  # its CPU yields to ingest (docs/operations.md)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    serve(Connection(int(fd)), path, tuple(orjson.loads(dims)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
