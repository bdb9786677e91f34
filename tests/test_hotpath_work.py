"""Work per request on the single-report path, counted (not timed), so a regression in it fails
deterministically on any box: one WAL file-thread call per group commit and no executor hop,
budget matching once per distinct identity per commit (not per report × budget), no log
record for an accepted report, and the prebuilt 202 body equal to the general answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from helpers import report

from exporter.appkeys import BUDGETS, INGESTOR, WAL
from exporter.config import BudgetSpec
from exporter.ingest.pipeline import IngestResult

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
N = 32


class CountingExecutor(ThreadPoolExecutor):
    """A real executor that counts what the loop hands it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submits = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submits += 1
        return super().submit(fn, *args, **kwargs)


def _specs() -> list[BudgetSpec]:
    """200 budgets; an identity below matches its user's, its team's, the global and the
    per-user template budget, and none of the others."""
    specs = [BudgetSpec(name=f"user-{i}", user=f"u{i}", window="day", limit_usd=Decimal(50))
             for i in range(150)]  # fmt: skip
    specs += [BudgetSpec(name=f"team-{i}", team=f"t{i}", window="month", limit_usd=Decimal(500))
              for i in range(40)]  # fmt: skip
    specs += [BudgetSpec(name=f"model-{i}", model=f"m{i}", window="week", limit_usd=Decimal(9))
              for i in range(8)]  # fmt: skip
    specs.append(BudgetSpec(name="global", window="day", limit_usd=Decimal(10**5)))
    specs.append(BudgetSpec(name="per-user", per="user", window="month", limit_usd=Decimal(20)))
    return specs


def _matches(spec: BudgetSpec, ids: dict[str, str]) -> bool:
    """The oracle: a spec matches when every field it fixes equals the report's."""
    return all(getattr(spec, f) in (None, ids[f]) for f in ("user", "team", "api_key_id", "model"))


def _identity(i: int) -> dict[str, str]:
    k = i % 4  # four distinct identities over the N reports
    return {"user": f"u{k}", "team": f"t{k}", "api_key_id": "", "model": "gpt-4o-mini"}


def _priced(request_id: str) -> dict[str, Any]:
    """A report of a model the bundled prices know (an unknown one logs once, rightly)."""
    return report(request_id=request_id, model="gpt-4o-mini", provider="openai")


async def test_concurrent_single_reports_share_one_file_thread_call_and_no_executor_hop(
    make_client: MakeClient,
) -> None:
    client = await make_client(budgets=_specs())
    ingestor, wal, tracker = client.app[INGESTOR], client.app[WAL], client.app[BUDGETS]
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    costs = [Decimal(f"0.{i + 1:04d}") for i in range(N)]
    items = [report(request_id=f"hot-{i}", cost_usd=float(costs[i]), **_identity(i))
             for i in range(N)]  # fmt: skip
    calls0, matches0 = wal.files.calls, tracker.matches

    results = await asyncio.gather(*(ingestor.ingest([item]) for item in items))
    await asyncio.sleep(0)  # the pass after the commit: the budget queue is summed

    assert [r.accepted for r in results] == [1] * N
    assert wal.files.calls - calls0 == 1  # N appends, one group commit, one thread call
    assert executor.submits == 0  # no run_in_executor per request or per commit
    expected = 0  # budgets matched once per distinct identity, however many reports
    for ids in {orjson.dumps(_identity(i)): _identity(i) for i in range(N)}.values():
        expected += sum(_matches(s, ids) for s in _specs())
    assert tracker.matches - matches0 == expected
    assert expected == 4 * 4  # user, team, global, per-user template
    for k in range(4):
        answer = tracker.check(f"u{k}", f"t{k}", "", "gpt-4o-mini")
        spent = {b["budget"]: Decimal(b["spent_usd"]) for b in answer["budgets"]}
        assert spent[f"user-{k}"] == sum(c for i, c in enumerate(costs) if i % 4 == k)
        assert spent["global"] == sum(costs)
    executor.shutdown()


async def test_accepted_single_reports_log_nothing_and_get_the_general_answer(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("exporter")
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        answers = await asyncio.gather(*(
            client.post("/v1/usage", data=orjson.dumps(_priced(f"quiet-{i}")),
                        headers={"Content-Type": "application/json"}) for i in range(N)
        ))  # fmt: skip
        bodies = [(a.status, await a.read()) for a in answers]
        again = await client.post("/v1/usage", json=_priced("quiet-0"))
        dup = (again.status, await again.read())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == []
    general = orjson.dumps(IngestResult(accepted=1).as_json())
    assert bodies == [(202, general)] * N
    assert dup == (202, orjson.dumps(IngestResult(duplicates=1).as_json()))
