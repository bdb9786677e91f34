"""`serve --workers N`: one supervisor, N forked worker processes sharing one port.

One process runs one event loop: one core. Each worker is a whole service (its own WAL,
data-dir lock, flusher, live counters) on `<data_dir>/worker-<i>`, listening on `port` with
SO_REUSEPORT (the kernel spreads connections) and on its own `worker_port + i` (/metrics:
one Prometheus target per worker, summed `without (instance)`). Nothing is shared in memory:
the workers are replicas on one host, exactly once rests on the database's unique key
(docs/operations.md#several-cores-on-one-host).

The supervisor holds `<data_dir>/lock` and the port (a bound, never-listening SO_REUSEPORT
socket, so the port stays ours across worker restarts), flushes WAL left by a run with
another N (exporter/leftovers.py), migrates SQLite once (Postgres serializes the workers'
migrations on an advisory lock), then forks. A worker that dies is restarted with backoff
and logged once; one that dies `MAX_START_FAILURES` times in a row before it was up stops
everything with exit code 1. SIGTERM/SIGINT go to every worker, which drains as `serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from aiohttp import web
from prometheus_client import Gauge

from exporter.appkeys import SELF_METRICS
from exporter.backoff import backoff_delay
from exporter.config import Settings
from exporter.errors import ConfigError, StartupError, one_line
from exporter.leftovers import flush_leftovers, leftover_dirs, worker_dir
from exporter.server import DataDirLock, DataDirLocked, bind
from exporter.server import run as run_server
from exporter.startup import open_store, run_migrations
from exporter.store.db import backend_name

__all__ = ["MAX_START_FAILURES", "run_workers", "worker_ports", "worker_settings"]

log = logging.getLogger(__name__)

#: exits in a row before a worker was up, after which the supervisor gives up (exit 1)
MAX_START_FAILURES = 5
#: a worker up this long has "worked": its next crash restarts after the shortest delay
STABLE_S = 10.0
#: after SIGTERM, workers get this long to drain (final flush ≤ 30 s + connections ≤ 10 s)
STOP_GRACE_S = 60.0
_PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
WORKER_ONLY_METRICS = frozenset({"llm_usage_worker_restarts"})  #: only workers expose these
_RESTARTS_HELP = "Times the supervisor restarted this worker since it started (serve --workers)."

MakeApp = Callable[[Settings], web.Application]


def worker_ports(settings: Settings) -> list[int]:
    """Each worker's own port: `worker_port + i`, default `port + 1 + i`; 0 (ephemeral)
    for all of them when neither is set and `port` is 0."""
    base = settings.worker_port
    if base is None:
        base = settings.port + 1 if settings.port else 0
    if base == 0:
        return [0] * settings.workers
    ports = [base + i for i in range(settings.workers)]
    if ports[-1] > 65535:
        raise ConfigError(f"worker_port {base} + {settings.workers} workers passes port 65535")
    if settings.port in ports:
        raise ConfigError(
            f"port {settings.port} is also a worker's own port ({ports[0]}-{ports[-1]}): "
            "set worker_port outside it"
        )
    return ports


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: its own data dir, the supervisor's database (the SQLite
    default lives in `data_dir`, not in the worker's)."""
    return settings.model_copy(
        update={
            "data_dir": worker_dir(settings.data_dir, index),
            "database_url": settings.effective_database_url,
            "workers": 1,
        }
    )


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _exit_event(index: int, pid: int | None) -> dict[str, object]:
    """Every exit is one line (the rate limit of exporter.logevents keys it by pid)."""
    return {"event": "worker_exit", "event_key": ("worker_exit", index, pid)}


class _WorkerLogName(logging.Filter):
    """Every line a worker logs says which worker (the logger name gets `[w<i>]`)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[w{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL), so no orphan
    keeps the port and its data dir; it drains as on any SIGTERM."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    index: int
    settings: Settings
    own_port: int
    pid: int | None = None
    ready_fd: int | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    crashes: int = 0  # consecutive, for the restart backoff
    restarts: int = 0  # since the supervisor started (llm_usage_worker_restarts)
    start_failures: int = 0  # consecutive exits before it was up
    restart_at: float | None = 0.0  # due now


class Supervisor:
    """Forks, watches and restarts the workers; forwards SIGTERM/SIGINT to them."""

    def __init__(self, make_app: MakeApp, settings: Settings, shared_port: int,
                 keep: list[socket.socket]) -> None:  # fmt: skip
        self.make_app = make_app
        self.settings = settings
        self.shared_port = shared_port
        self.keep = keep  # the port reservation, closed in the workers
        self.pid = os.getpid()
        self.workers = [
            _Worker(i, worker_settings(settings, i), port)
            for i, port in enumerate(worker_ports(settings))
        ]
        self.stopping = False
        self.failed: str | None = None
        self._wake_fds: tuple[int, ...] = ()

    # -- in the worker -----------------------------------------------------------------------
    def _child(self, w: _Worker, ready_w: int) -> NoReturn:
        code = 1
        try:
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            for sock in self.keep:
                sock.close()
            for fd in self._wake_fds:
                os.close(fd)
            for other in self.workers:
                if other.ready_fd is not None:
                    os.close(other.ready_fd)
            _die_with_parent(self.pid)
            for handler in logging.getLogger().handlers:
                handler.addFilter(_WorkerLogName(w.index))
            host = self.settings.host

            async def up(_app: web.Application) -> None:
                os.write(ready_w, b"1")

            def make_app(s: Settings) -> web.Application:
                app = self.make_app(s)
                app.on_startup.append(up)  # after the WAL replay and start steps
                restarts = Gauge("llm_usage_worker_restarts", _RESTARTS_HELP, ["worker"],
                                 registry=app[SELF_METRICS].registry)  # fmt: skip
                restarts.labels(str(w.index)).set(w.restarts)
                return app

            def listen() -> list[socket.socket]:
                shared = bind(host, self.shared_port, reuse_port=True)
                try:
                    own = bind(host, w.own_port)
                except StartupError:
                    for sock in shared:
                        sock.close()
                    raise
                log.info("worker %d (pid %d): port %d shared, own port %d", w.index,
                         os.getpid(), self.shared_port, own[0].getsockname()[1])  # fmt: skip
                return shared + own

            code = run_server(make_app, w.settings, listen)
        except StartupError as exc:
            log.error("%s", one_line(exc))
            code = exc.exit_code
        except BaseException:
            log.exception("worker %d failed", w.index)
        finally:
            logging.shutdown()
            os._exit(code)

    # -- in the supervisor -------------------------------------------------------------------
    def _start(self, w: _Worker) -> None:
        ready_r, ready_w = os.pipe()
        # blocked across the fork: a SIGTERM for the new worker waits until it has its own
        # handlers (the supervisor's, inherited, would swallow it)
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                self._child(w, ready_w)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        os.close(ready_w)
        w.pid, w.ready_fd, w.ready_at = pid, ready_r, None
        w.started_at, w.restart_at = time.monotonic(), None

    def _close_ready(self, w: _Worker) -> None:
        if w.ready_fd is not None:
            os.close(w.ready_fd)
            w.ready_fd = None

    def _read_ready(self, w: _Worker) -> None:
        assert w.ready_fd is not None
        if os.read(w.ready_fd, 1):
            w.ready_at = time.monotonic()
            w.start_failures = 0
            log.info("worker %d (pid %s) is up", w.index, w.pid)
        self._close_ready(w)  # up, or exited (EOF): either way nothing more comes

    def _exited(self, w: _Worker, status: int) -> None:
        now = time.monotonic()
        how = _exit_text(status)
        self._close_ready(w)
        pid, w.pid = w.pid, None
        if self.stopping:
            log.info("worker %d (pid %s) stopped (%s)", w.index, pid, how)
            return
        w.restarts += 1
        if w.ready_at is None:
            w.start_failures += 1
            if w.start_failures >= MAX_START_FAILURES:
                self.failed = (f"worker {w.index} failed to start {w.start_failures} times in a "
                               f"row (last: {how}); its error is logged above")  # fmt: skip
                return
            delay = backoff_delay(w.start_failures, base=0.25, cap=5.0)
            log.error("worker %d (pid %s) exited with %s before it was up (attempt %d of %d); "
                      "retrying in %.1fs", w.index, pid, how, w.start_failures,
                      MAX_START_FAILURES, delay, extra=_exit_event(w.index, pid))  # fmt: skip
        else:
            w.crashes = 1 if now - w.ready_at >= STABLE_S else w.crashes + 1
            delay = backoff_delay(w.crashes, base=0.5, cap=30.0)
            log.error("worker %d (pid %s) exited with %s after %.1fs; its WAL is replayed by "
                      "its restart in %.1fs", w.index, pid, how, now - w.started_at,
                      delay, extra=_exit_event(w.index, pid))  # fmt: skip
        w.restart_at = now + delay

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in self.workers:
                if w.pid == pid:
                    self._exited(w, status)

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.pid is not None]

    def _wait(self, wake: int, timeout: float) -> None:
        fds = [wake] + [w.ready_fd for w in self.workers if w.ready_fd is not None]
        readable, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if wake in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake, 512)
        for w in self.workers:
            if w.ready_fd is not None and w.ready_fd in readable:
                self._read_ready(w)

    def _stop_all(self, wake: int) -> bool:
        """SIGTERM every worker and wait for them to drain; True when all exited in time."""
        for w in self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid or 0, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while self._alive() and time.monotonic() < deadline:
            self._reap()
            if self._alive():
                self._wait(wake, min(0.5, deadline - time.monotonic()))
        late = self._alive()
        for w in late:
            log.error("worker %d (pid %s) did not stop within %.0fs; killing it (its WAL is "
                      "replayed at the next start)", w.index, w.pid, STOP_GRACE_S)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid or 0, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid or 0, 0)
            w.pid = None
        return not late

    def run(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake_fds = (wake_r, wake_w)

        def on_stop(signum: int, _frame: object) -> None:
            self.stopping = True

        previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, on_stop),
                (signal.SIGINT, on_stop),
                (signal.SIGCHLD, lambda _s, _f: None),  # only to wake the select
            )
        }
        old_wakeup = signal.set_wakeup_fd(wake_w)
        log.info("supervisor (pid %d): %d workers on port %d, data in %s/worker-*",
                 self.pid, len(self.workers), self.shared_port,
                 self.settings.data_dir.resolve())  # fmt: skip
        try:
            while not self.stopping and self.failed is None:
                now = time.monotonic()
                for w in self.workers:
                    if w.pid is None and w.restart_at is not None and w.restart_at <= now:
                        self._start(w)
                due = [w.restart_at for w in self.workers if w.restart_at is not None]
                self._wait(wake_r, min([1.0, *(t - now for t in due)]))
                self._reap()
            if self.failed is not None:
                log.error("%s; stopping the other workers", self.failed)
            else:
                log.info("supervisor: stopping %d worker(s)", len(self._alive()))
            self.stopping = True
            clean = self._stop_all(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
        return 1 if self.failed is not None or not clean else 0


def _prepare(settings: Settings) -> None:
    """Before forking: flush WAL a run with another N left behind, and migrate SQLite once
    (its workers would otherwise race to create the schema)."""
    shared = settings.model_copy(update={"database_url": settings.effective_database_url})
    flush_leftovers(shared, leftover_dirs(settings.data_dir, settings.workers),
                    held=settings.data_dir)  # fmt: skip
    if settings.auto_migrate and backend_name(shared.effective_database_url) == "sqlite":

        async def migrate() -> None:
            store = open_store(shared)
            try:
                await run_migrations(store)
            finally:
                await store.close()

        asyncio.run(migrate())


def run_workers(make_app: MakeApp, settings: Settings) -> int:
    """`serve` with `workers` > 1: lock the data dir, hold the port, prepare, supervise."""
    lock = DataDirLock(settings.data_dir)
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise StartupError(str(exc)) from None
    try:
        worker_ports(settings)  # a bad port range is a config error before anything binds
        reservation = bind(settings.host, settings.port, reuse_port=True)
        try:
            port = reservation[0].getsockname()[1]
            _prepare(settings)
            return Supervisor(make_app, settings, port, reservation).run()
        finally:
            for sock in reservation:
                sock.close()
    finally:
        lock.release()
