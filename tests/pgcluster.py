"""A throwaway PostgreSQL 15 cluster for tests and benchmarks.

We run as root in CI and `initdb` refuses root, so the cluster runs as the `postgres` system
user in a temp dir it owns, on 127.0.0.1 and a free port. Anything that goes wrong raises with
the server log attached: tests that need Postgres fail loudly, they never skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
_SERVICE_USER = "postgres"


class PgClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or used."""


class PgCluster:
    """initdb + pg_ctl around a temp directory; `stop()`/`start()` simulate an outage."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pw = pwd.getpwnam(_SERVICE_USER)
            except KeyError as exc:
                raise PgClusterError(f"running as root but no {_SERVICE_USER!r} user") from exc
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)

    # -- process control -----------------------------------------------------------------
    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", _SERVICE_USER, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise PgClusterError(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                f"--- server log ---\n{self.server_log()}"
            )
        return proc

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-8000:]
        except OSError:
            return "(no server log)"

    def init(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise PgClusterError(f"PostgreSQL binaries not found in {PG_BIN}")
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        opts = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                "-c listen_addresses=127.0.0.1",
                f"-c fsync={'on' if self.fsync else 'off'}",
                "-c synchronous_commit=on",
                "-c full_page_writes=off",
                "-c max_connections=100",
                "-c shared_buffers=128MB",
                "-c log_min_messages=warning",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", opts, "start")  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                         check=False).returncode == 0:  # fmt: skip
                return
            time.sleep(0.1)
        raise PgClusterError(f"postgres did not become ready:\n{self.server_log()}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases ---------------------------------------------------------------------------
    def psql(self, sql: str, db: str = "postgres") -> str:
        proc = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db, "-c", sql],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise PgClusterError(f"psql failed: {proc.stderr}\n{self.server_log()}")
        return proc.stdout

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, db: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{db}"


def start_cluster(*, fsync: bool = False) -> PgCluster:
    cluster = PgCluster(fsync=fsync)
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One cluster per test session; a failure to start it fails the tests that need it."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database for one test, as an asyncpg SQLAlchemy URL."""
    name = pg_cluster.create_database()
    try:
        yield pg_cluster.url(name)
    finally:
        pg_cluster.drop_database(name)
