"""Support for the live budget tests: a service with budgets, a load thread that records when
each batch was sent and acknowledged, a poller of /v1/budgets/check and /metrics, and the
independent oracle (Decimal sums over the raw reports, windows computed with zoneinfo dates).

At a poll sent at `t0` and answered at `t1`, the truth is bracketed: every report acknowledged
before `t0` must be counted, and nothing not yet sent before `t1` can be.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from helpers import free_port, http, parse_metrics, start_service

Q = Decimal("1e-10")
_ids = itertools.count()


def cost_of(text: str) -> Decimal:
    """The documented rounding rule (docs/pricing.md): 1e-10 USD, half-even."""
    return Decimal(text).quantize(Q, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True)
class Sent:
    user: str
    team: str
    at: datetime
    cost: Decimal  # the oracle's exact cost
    cost_text: str  # what is sent, as a JSON number


@dataclass
class Batch:
    reports: list[Sent]
    sent: float
    acked: float | None = None  # monotonic time of the 202, None when not accepted


# -- the oracle --------------------------------------------------------------------------------


def in_calendar(window: str, tz: str, at: datetime, now: datetime) -> bool:
    """Same local day / ISO week / month as `now` in zone `tz`: the definition, not the code."""
    a, n = at.astimezone(ZoneInfo(tz)).date(), now.astimezone(ZoneInfo(tz)).date()
    if window == "day":
        return a == n
    if window == "week":
        return a.isocalendar()[:2] == n.isocalendar()[:2]
    return (a.year, a.month) == (n.year, n.month)


def in_rolling(hours: int, at: datetime, now: datetime) -> bool:
    """The current UTC hour and the `hours - 1` before it."""
    ha = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hn = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hn - timedelta(hours=hours - 1) <= ha <= hn


Pred = Callable[[Sent], bool]


def total(reports: Iterable[Sent], pred: Pred) -> Decimal:
    return sum((r.cost for r in reports if pred(r)), Decimal(0))


# -- the service ----------------------------------------------------------------------------------


def write_config(path: Path, budgets: Sequence[dict[str, Any]]) -> Path:
    lines = []
    for b in budgets:
        lines.append("[[budgets]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in b.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Replica:
    workdir: Path
    database_url: str
    config: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    starts: int = 0
    proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {"LLM_USAGE_WAL_DURABILITY": "os", "LLM_USAGE_CONFIG": str(self.config), **self.env}
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.workdir / "data"),
                "--database-url", self.database_url]  # fmt: skip
        self.proc = start_service(
            args, self.workdir / f"service-{self.starts}.log", port=self.port, env=env, timeout=60
        )
        if wait_ready:
            deadline = time.monotonic() + 30
            while http("GET", f"{self.url}/readyz")[0] != 200:
                assert time.monotonic() < deadline, self.proc.logs()
                time.sleep(0.05)

    def stop(self) -> int:
        code: int = self.proc.stop(timeout=60)
        return code

    def get(self, path: str, **params: str) -> Any:
        status, body, _ = http("GET", f"{self.url}{path}?{urlencode(params)}", timeout=10)
        assert status == 200, body
        return json.loads(body)

    def metrics(self) -> dict[Any, float]:
        status, body, _ = http("GET", f"{self.url}/metrics", timeout=10)
        assert status == 200
        return parse_metrics(body.decode())

    def post(self, reports: Sequence[Sent]) -> int:
        items = [
            {"request_id": f"bl-{next(_ids)}-{random.random()}", "model": "m", "user": r.user,
             "team": r.team, "input_tokens": 1, "completed_at": r.at.isoformat(),
             "cost_usd": "__COST__"}
            for r in reports
        ]  # fmt: skip
        body = json.dumps(items)
        for r in reports:  # costs as JSON number text with 12 decimals
            body = body.replace('"__COST__"', r.cost_text, 1)
        status, _, _ = http(
            "POST", f"{self.url}/v1/usage", body.encode(),
            {"Content-Type": "application/json"}, timeout=10,
        )  # fmt: skip
        return status


def make_report(user: str, team: str, rng: random.Random, at: datetime | None = None) -> Sent:
    """A report completed now (or at `at`) costing 0 to 1 USD with 12 decimals."""
    text = f"0.{rng.randrange(10**12):012d}"
    return Sent(user, team, at or datetime.now(UTC), cost_of(text), text)


# -- load and polling ------------------------------------------------------------------------------


class Load(threading.Thread):
    """Posts batches to the replicas in turn until stopped; records every batch."""

    def __init__(self, replicas: Sequence[Replica], users: Sequence[tuple[str, str]],
                 seed: int = 7, batch: int = 10, pause: float = 0.02) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.replicas = replicas
        self.users = users
        self.rng = random.Random(seed)
        self.batch = batch
        self.pause = pause
        self.batches: dict[int, list[Batch]] = {i: [] for i in range(len(replicas))}
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        for n in itertools.count():
            if self.stop_event.is_set() or n > 5000:
                return
            i = n % len(self.replicas)
            reports = [make_report(*self.rng.choice(self.users), self.rng)
                       for _ in range(self.batch)]  # fmt: skip
            b = Batch(list(reports), time.monotonic())
            with self.lock:
                self.batches[i].append(b)
            status = self.replicas[i].post(reports)
            assert status == 202, status
            b.acked = time.monotonic()
            time.sleep(self.pause)

    def snapshot(self, replica: int) -> list[Batch]:
        with self.lock:
            return list(self.batches[replica])


@dataclass
class Poll:
    sent: float
    received: float
    wall_sent: datetime
    wall_received: datetime
    check: dict[str, Any]
    gauges: dict[Any, float]


class Poller(threading.Thread):
    """GET the check endpoint and /metrics every 50 ms."""

    def __init__(self, replica: Replica, params: dict[str, str], every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.replica, self.params, self.every = replica, params, every
        self.polls: list[Poll] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        for _ in range(5000):
            if self.stop_event.is_set():
                return
            t0, w0 = time.monotonic(), datetime.now(UTC)
            check = self.replica.get("/v1/budgets/check", **self.params)
            gauges = self.replica.metrics()
            t1, w1 = time.monotonic(), datetime.now(UTC)
            self.polls.append(Poll(t0, t1, w0, w1, check, gauges))
            time.sleep(self.every)


def bracket(batches: Iterable[Batch], poll: Poll, pred: Pred,
            lag: float = 0.0) -> tuple[Decimal, Decimal]:  # fmt: skip
    """(must be counted, may be counted) at this poll: acknowledged `lag` s before it was sent,
    and sent before it was answered."""
    low = high = Decimal(0)
    for b in batches:
        if b.sent < poll.received:
            s = total(b.reports, pred)
            high += s
            if b.acked is not None and b.acked < poll.sent - lag:
                low += s
    return low, high
