"""Running `serve`: one process per data dir, and connections that cannot exhaust the process.

- An exclusive `flock` on `<data_dir>/lock` (holding our pid): a second process on the same
  data dir would replay and delete the first one's WAL segments; it refuses to start instead.
- The soft RLIMIT_NOFILE is raised to the hard limit, and connections are capped below it
  (a reserve stays for the WAL, the database and the listening socket). At the cap the oldest
  idle keep-alive connection is closed to make room; if none is idle, the new one gets a
  503 and is closed, so the process never runs out of descriptors.
- aiohttp's keep-alive timer closes a connection that stays idle, or has not completed its
  request head (a slowloris), for `http_keepalive_timeout`; a watchdog cuts a request whose
  body is not fully received `http_body_timeout` after its head.
- OS errors reported on the loop (EMFILE on accept, ...) are counted and logged once a
  minute per errno, never per event.
- After start-up the garbage collector's objects so far (imports, price tables, the app) are
  frozen (`tune_gc`): a full pass over those ~135k objects stalled the loop ~90 ms every few
  seconds under single-report load; frozen, a full pass walks only what came after.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from exporter import __version__
from exporter.appkeys import SELF_METRICS
from exporter.config import Settings
from exporter.errors import StartupError
from exporter.http_errors import quiet_handler
from exporter.selfmetrics import SelfMetrics

__all__ = [
    "DataDirLock",
    "DataDirLocked",
    "accept_backlog",
    "connection_cap",
    "raise_nofile_limit",
    "run",
    "tune_gc",
]

log = logging.getLogger(__name__)

#: descriptors kept for everything that is not a client connection
FD_RESERVE_MIN = 64
WATCHDOG_INTERVAL_S = 1.0
SHUTDOWN_TIMEOUT_S = 10.0
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 38\r\nConnection: close\r\n\r\n{"error": "too many open connections"}'
)


class DataDirLocked(Exception):
    """Another process holds the data dir."""


class DataDirLock:
    """`flock(LOCK_EX | LOCK_NB)` on `<data_dir>/lock`, held (fd open) for the process life.
    The kernel releases it when the process dies, however it dies: no stale lock files."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data dir {self.path.parent.resolve()} is in use by another process "
                f"(pid {holder}); stop it or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 65536), hard))
            soft = max(soft, 65536)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def accept_backlog(fd_limit: int) -> int:
    """asyncio accepts up to `backlog` sockets in one go before any close runs: part of the
    reserve, so a burst of connections can never take the last descriptors."""
    return max(16, min(128, fd_limit // 8))


def connection_cap(fd_limit: int, configured: int | None) -> int:
    """Connections allowed: the limit minus a reserve (≥ 64 or 10%, plus the accept
    backlog), or less if configured."""
    reserve = max(FD_RESERVE_MIN, fd_limit // 10) + accept_backlog(fd_limit)
    cap = max(16, fd_limit - reserve)
    if configured is not None and configured > cap:
        log.warning("http_max_connections %d is above what %d file descriptors allow; "
                    "using %d", configured, fd_limit, cap)  # fmt: skip
        return cap
    return configured if configured is not None else cap


def tune_gc() -> None:
    """Freeze what start-up built: it is never garbage, so no full pass walks it again. The
    thresholds stay CPython's: a young threshold of 20k cut the young passes 4× but let a
    failed flush's garbage pile up (RSS +100 MB in `test_database_outage_under_load`)."""
    gc.collect()
    gc.freeze()


class _Refuse(asyncio.Protocol):
    """Over the cap with nobody idle to evict: a real 503, then close."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


def _is_idle(handler: RequestHandler) -> bool:
    """No request being handled and none queued (idle keep-alive, or an incomplete head)."""
    return not getattr(handler, "_request_in_progress", True) and not getattr(
        handler, "_messages", True
    )


class ConnectionCount:
    """Accepted sockets not yet given back to the kernel, over every listening socket."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0

    def lost(self) -> None:
        self.open -= 1


class GuardedSite(web.SockSite):
    """A site on a socket bound before start-up, whose protocol factory enforces the
    connection cap. The count includes closing sockets, so evictions in flight never let
    the process run past its descriptors."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *, count: ConnectionCount,
                 backlog: int, metrics: SelfMetrics) -> None:  # fmt: skip
        super().__init__(runner, sock, backlog=backlog)
        self.count = count
        self.metrics = metrics

    def _connections(self) -> dict[RequestHandler, Any]:
        server = self._runner.server
        conns: dict[RequestHandler, Any] = getattr(server, "_connections", {})
        return conns

    def _factory(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        self.count.open += 1
        if self.count.open > self.count.cap:
            conns = self._connections()
            idle = next((h for h in conns if _is_idle(h)), None)  # oldest first
            if idle is None:
                self.metrics.http_connections_closed.labels("refused_cap").inc()
                return _Refuse(self.count.lost)
            idle.force_close()
            conns.pop(idle, None)
            self.metrics.http_connections_closed.labels("evicted_idle").inc()
        return quiet_handler(server)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        if not getattr(server, "_counted", False):  # one wrap per server, whatever the sites
            aiohttp_lost = server.connection_lost
            count = self.count

            def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
                count.lost()
                aiohttp_lost(handler, exc)

            server.connection_lost = connection_lost  # type: ignore[method-assign]
            server._counted = True  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, sock=self._sock, backlog=self._backlog
        )


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address `host` resolves to, as asyncio's
    create_server would make them; a port in use fails here, before any start step ran.
    `reuse_port`: SO_REUSEPORT, so `serve --workers N` processes share one port (the kernel
    spreads connections over their listening sockets)."""
    sockets: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:  # asyncio's rule: a family not enabled
                    raise
                sockets.pop().close()
        if not sockets:
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


async def _watch_bodies(
    sites: list[GuardedSite], body_timeout: float, metrics: SelfMetrics
) -> None:
    """Cut requests whose body is still incomplete `body_timeout` after their head."""
    first_seen: dict[int, float] = {}
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        now = time.monotonic()
        live: dict[int, float] = {}
        for handler in list(sites[0]._connections()):  # one server behind every site
            request = getattr(handler, "_current_request", None)
            if request is None or request.content.is_eof():
                continue
            key = id(request)
            started = first_seen.get(key, now)
            live[key] = started
            if now - started > body_timeout:
                metrics.http_connections_closed.labels("body_timeout").inc()
                handler.force_close()
        first_seen = live


class _OsErrorLog:
    """Loop exception handler: OS errors counted, and logged through the per-class rate limit
    (exporter.logevents) once a minute per errno."""

    def __init__(self, metrics: SelfMetrics) -> None:
        self.metrics = metrics

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not isinstance(exc, OSError):
            loop.default_exception_handler(context)
            return
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        self.metrics.os_errors.labels(name).inc()
        log.error("%s: %s", context.get("message", "OS error"), exc,
                  extra={"event": "os_error", "event_key": ("os_error", name)})  # fmt: skip


async def _serve(
    app: web.Application, settings: Settings, sockets: list[socket.socket], fd_limit: int
) -> None:
    loop = asyncio.get_running_loop()
    metrics = app[SELF_METRICS]
    loop.set_exception_handler(_OsErrorLog(metrics))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        handle_signals=False,
        keepalive_timeout=settings.http_keepalive_timeout,
    )
    try:
        await runner.setup()  # the app's start steps: WAL open, background jobs
        # what start-up built lives as long as the process: out of the GC's full passes
        tune_gc()
        try:
            count = ConnectionCount(connection_cap(fd_limit, settings.http_max_connections))
            log.info("open-file limit %d: at most %d connections", fd_limit, count.cap)
            sites = [GuardedSite(runner, sock, count=count, backlog=accept_backlog(fd_limit),
                                 metrics=metrics) for sock in sockets]  # fmt: skip
            for site in sites:
                await site.start()
            metrics.http_connection_limit.set(count.cap)
            metrics.http_connections.set_function(lambda: count.open)
            port = sockets[0].getsockname()[1]
            log.info("llm-usage-exporter %s listening on http://%s:%d (data dir %s)",
                     __version__, settings.host, port, settings.data_dir.resolve())  # fmt: skip
            watchdog = loop.create_task(
                _watch_bodies(sites, settings.http_body_timeout, metrics), name="body-watchdog"
            )
            await stop.wait()
            log.info("shutting down")
            watchdog.cancel()
        finally:
            await runner.cleanup()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for sock in sockets:
            sock.close()


def run(
    make_app: Callable[[Settings], web.Application],
    settings: Settings,
    listen: Callable[[], list[socket.socket]] | None = None,
) -> int:
    """The `serve` command after its settings checks: lock the data dir, bind, run until a
    signal. Start-up failures raise StartupError (one line, exit 1). `listen` binds the
    sockets instead of `bind(host, port)` (a worker of `serve --workers`: exporter/workers.py)."""
    lock = DataDirLock(settings.data_dir)
    try:
        lock.acquire()
    except DataDirLocked as exc:
        raise StartupError(str(exc)) from None
    try:
        sockets = listen() if listen is not None else bind(settings.host, settings.port)
        fd_limit = raise_nofile_limit()
        asyncio.run(_serve(make_app(settings), settings, sockets, fd_limit))
    finally:
        lock.release()
    return 0
