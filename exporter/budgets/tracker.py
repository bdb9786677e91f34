"""Budget spend at every instant = stored spend (every replica's flushed reports, from the
database) + this replica's unflushed reports (its WAL), exact in Decimal.

The unflushed part lives in a `Ledger` per WAL segment and is fed by ingest (`on_durable`), by
the WAL at start-up (`load_wal`) and by the last state saved to the data dir (`budgets.json`),
so neither a flush, a refresh nor a restart with the database down makes spend read low.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from exporter.budgets import snapshot
from exporter.budgets.index import QueryKinds, SpecIndex
from exporter.budgets.ledger import Ledger, Segment
from exporter.budgets.model import DIMS, Budget, BudgetView, cost_decimal
from exporter.budgets.spend import SpendQuery, SpendReader, split_rows
from exporter.budgets.statefile import StateWriter
from exporter.budgets.walread import WalReader, read_segments
from exporter.budgets.window import HOUR
from exporter.config import BudgetSpec, Settings
from exporter.selfmetrics import SelfMetrics

__all__ = ["BudgetTracker", "SpendReader"]

log = logging.getLogger(__name__)

#: a hung database must not hold `db_lock` (and so the flusher's commits) for long
QUERY_TIMEOUT_S = 30.0
#: how long a flush waits for the state file before unlinking committed segments
STATE_WAIT_S = 5.0
QUERY_RESULTS = ("read", "skipped", "failed")  # llm_usage_budget_spend_queries_total


class _Report(Protocol):
    user: str
    team: str
    api_key_id: str
    model: str
    completed_at: datetime | None
    cost_usd: Any


class BudgetTracker:
    def __init__(
        self,
        specs: Sequence[BudgetSpec],
        spend: SpendReader,
        *,
        gauge_caps: Mapping[str, int] | None = None,
        on_overflow: Callable[[str], None] | None = None,
        state_path: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.budgets = [Budget(i, s) for i, s in enumerate(specs)]
        self._by_name = {b.name: b for b in self.budgets}
        self._index = SpecIndex(self.budgets)
        self._kinds = QueryKinds(self.budgets)
        self._spend = spend
        self._clock = clock
        self._caps = dict(gauge_caps or {})
        self._on_overflow = on_overflow
        self._state = (
            StateWriter(state_path, lambda: snapshot.capture(self.budgets, self._ledger))
            if state_path is not None
            else None
        )
        self._ledger = Ledger()
        #: reports made durable but not yet summed into the ledger (see `on_durable`)
        self._queued: list[tuple[int, Sequence[_Report]]] = []
        #: budgets matched so far, over every group of reports (the work guard test reads it)
        self.matches = 0
        #: held by each spend query and by the flusher around each commit + drop, so a query
        #: never runs between a commit and the ledger learning of it
        self.db_lock = asyncio.Lock()
        self._epoch = 0  # spend queries started so far
        self._read_at: dict[tuple[Any, ...], str] = {}  # kind → database version it was read at
        #: spend queries per kind of budget: run, skipped (read at the same version), failed
        self.queries = dict.fromkeys(QUERY_RESULTS, 0)
        self._failing = False
        self._in_file: set[int] = set()  # WAL segments the state file read at start holds
        now = clock()
        for b in self.budgets:
            b.roll(now)
            if not b.spec.per:
                b.gauge_values[""] = None
        if state_path is not None:
            self._restore(state_path)

    @classmethod
    def from_settings(
        cls, settings: Settings, spend: SpendReader, self_metrics: SelfMetrics
    ) -> BudgetTracker:
        """The app's tracker: gauges in the self-metrics registry, capped like the labels,
        its state file in the data dir."""
        from exporter.budgets.gauges import BudgetCollector

        tracker = cls(
            settings.budgets,
            spend,
            gauge_caps={"user": settings.max_users, "team": settings.max_teams,
                        "api_key_id": settings.max_users, "model": settings.max_models},
            on_overflow=self_metrics.overflow,
            state_path=settings.data_dir / "budgets.json" if settings.budgets else None,
        )  # fmt: skip
        self_metrics.registry.register(BudgetCollector(tracker))
        return tracker

    @property
    def enabled(self) -> bool:
        return bool(self.budgets)

    # -- unflushed spend: ingest, WAL replay, flusher ----------------------------------------
    def on_durable(self, seq: int, reports: Sequence[_Report]) -> None:
        """Reports of WAL segment `seq` are durable: count their spend as unflushed. Only
        queued here; the queue is summed (`_drain`) once per event-loop pass for every request
        that became durable in it (one WAL group commit), and before anything reads spend, so
        every read still sees every durable report."""
        if not self.budgets:
            return
        if not self._queued:
            with contextlib.suppress(RuntimeError):  # no loop: drained by the next read
                asyncio.get_running_loop().call_soon(self._drain)
        self._queued.append((seq, reports))

    def _drain(self) -> None:
        """Sum the queued reports per segment, identity and minute (window edges fall on
        whole minutes in every zone since 1972), then match each group once: the cost is
        O(groups × matching budgets), never reports × budgets."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        by_seq: dict[int, dict[tuple[str, str, str, str, datetime], Decimal]] = {}
        for seq, reports in queued:
            groups = by_seq.get(seq)
            if groups is None:
                groups = by_seq[seq] = {}
            for r in reports:
                if r.cost_usd and r.completed_at is not None:
                    key = (r.user, r.team, r.api_key_id, r.model,
                           r.completed_at.replace(second=0, microsecond=0))  # fmt: skip
                    cost = cost_decimal(r.cost_usd)
                    groups[key] = groups[key] + cost if key in groups else cost
        for seq, groups in by_seq.items():
            self._add_groups(self._ledger.segment(seq), groups)

    @property
    def ledger(self) -> Ledger:
        """The unflushed spend, with every durable report in it."""
        self._drain()
        return self._ledger

    def _add_groups(
        self, seg: Segment, groups: Mapping[tuple[str, str, str, str, datetime], Decimal]
    ) -> None:
        if not groups:
            return
        matched: dict[tuple[str, str, str, str], list[Budget]] = {}
        acc: dict[tuple[int, str, datetime], Decimal] = {}  # the batch's sums, then the ledger
        for (user, team, api_key_id, model, at), amount in groups.items():
            ids = (user, team, api_key_id, model)
            budgets = matched.get(ids)
            if budgets is None:
                budgets = matched[ids] = self._index.matching(*ids)
                self.matches += len(budgets)
            for b in budgets:
                per = b.spec.per
                key = (b.index, ids[_DIM[per]] if per else "", b.key_of(at))
                acc[key] = acc[key] + amount if key in acc else amount
        ledger = self._ledger
        for (i, value, at), amount in acc.items():
            ledger.add(seg, (i, value), at, amount)
            b = self.budgets[i]
            if b.spec.per and value not in b.gauge_values:
                self._note_value(b, value)

    async def load_wal(self, wal: WalReader) -> int:
        """Rebuild the unflushed ledger from the WAL's sealed segments (after `wal.open()`,
        before the flusher starts); returns the reports read."""
        if not self.budgets:
            return 0
        # a segment the state file holds as dropped was committed, and killed before its
        # unlink: its spend is in the ledger already (and its rows in the database)
        segments = [seg for seg in wal.sealed_segments() if seg.seq not in self._in_file]
        rows = await asyncio.to_thread(read_segments, wal, segments)
        n = 0
        for seq, reports in rows:
            groups: dict[tuple[str, str, str, str, datetime], Decimal] = {}
            for user, team, key, model, at, cost in reports:
                n += 1
                if cost:
                    k = (user, team, key, model, at.replace(second=0, microsecond=0))
                    groups[k] = groups[k] + cost if k in groups else cost
            self._add_groups(self._ledger.segment(seq), groups)
        if n:
            log.info("budgets: %d unflushed report(s) read back from the WAL", n)
        return n

    def on_committed(self, seq: int) -> None:
        """The flusher committed segment `seq` (under `db_lock`); it unlinks it from the WAL
        after `before_drop`."""
        self._drain()  # the segment's spend is in the ledger before it is marked
        if self._ledger.mark_dropped(seq, self._epoch):
            self._save()

    async def before_drop(self) -> None:
        """Wait for the state file to hold the committed segments' spend before the WAL
        forgets them: a restart with the database down then finds that spend in one of the
        two. A write stalled past STATE_WAIT_S only delays that (logged), never the drop."""
        if self._state is None:
            return
        try:
            async with asyncio.timeout(STATE_WAIT_S):
                await self._state.written()
        except TimeoutError:
            log.warning("budgets: %s not written after %.0f s; dropping WAL segments anyway",
                        self._state.path, STATE_WAIT_S)  # fmt: skip

    # -- stored spend ------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read stored spend: one grouped query per (window, fixed fields, template field),
        except for the kinds read since the database last changed (`SpendSession.version`:
        an idle database costs one probe per refresh, not a query per kind)."""
        self._drain()
        now = self._clock()
        refreshed = now.isoformat()
        error: Exception | None = None
        kinds = self._kinds.at(now)
        read_at, self._read_at = self._read_at, {}  # kinds read at the version they hold
        try:  # the database may be down: keep serving the last values
            async with contextlib.AsyncExitStack() as stack:
                read, version, probed = self._spend, None, 0
                if isinstance(read, SpendQuery):  # one connection for every kind
                    async with asyncio.timeout(QUERY_TIMEOUT_S):
                        session = await stack.enter_async_context(read.session())
                    async with self.db_lock, asyncio.timeout(QUERY_TIMEOUT_S):
                        self._epoch += 1
                        read, probed, version = session, self._epoch, await session.version()
                for sig, members in kinds.items():
                    if version is not None and read_at.get(sig) == version:
                        for b in members:  # nothing committed since: as read at the probe
                            b.epoch, b.refreshed_at, b.refreshed_json = probed, now, refreshed
                        self._read_at[sig] = version
                        self.queries["skipped"] += 1
                        continue
                    try:
                        await self._refresh_kind(read, sig, members, now, refreshed)
                    except Exception as exc:
                        error = exc
                        self.queries["failed"] += 1
                        if read is not self._spend:
                            break  # its connection is likely gone: the next round has a new one
                    else:
                        self.queries["read"] += 1
                        if version is not None:  # read after the probe: holds while it does
                            self._read_at[sig] = version
                    await asyncio.sleep(0)  # this kind's rows, the next query: separate passes
        except Exception as exc:  # opening or closing the connection, the probe
            error = exc
            self.queries["failed"] += 1
        self._ledger.collect_seen(self.budgets)
        self._save()
        if error is not None and not self._failing:
            log.warning(
                "budgets: spend query failed (%s: %s); keeping last values",
                type(error).__name__,
                str(error)[:300],
            )
        elif error is None and self._failing:
            log.info("budgets: spend query works again")
        self._failing = error is not None

    async def _refresh_kind(
        self, read: SpendReader, sig: tuple[Any, ...], members: list[Budget], now: datetime,
        refreshed: str,
    ) -> None:  # fmt: skip
        start, end, rolling, fixed, per = sig
        fields = [DIMS[i] for i in fixed]
        group = [*fields, per] if per else fields
        filters = {DIMS[i]: sorted({str(b.fixed[i]) for b in members}) for i in fixed}
        async with self.db_lock, asyncio.timeout(QUERY_TIMEOUT_S):
            self._epoch += 1
            epoch = self._epoch
            stored = await read(start, end, filters, group)
            head = {}
            if rolling:
                head = await read(start, start + HOUR, filters, group)
        stored_by, head_by = split_rows(stored, len(fields)), split_rows(head, len(fields))
        for b in members:
            prefix = tuple(str(b.fixed[i]) for i in fixed)
            new, new_head = stored_by.get(prefix, {}), head_by.get(prefix, {})
            if new != b.stored:  # the same map when unchanged: the state file's cache
                b.stored = new
            if new_head != b.head:
                b.head = new_head
            b.covered, b.epoch, b.refreshed_at = (start, end), epoch, now
            b.refreshed_json = refreshed
            if per:
                for value in b.stored:
                    if value not in b.gauge_values:
                        self._note_value(b, value)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Refresh until `stop` is set; stopped between rounds, never mid-query (a hung query
        ends at QUERY_TIMEOUT_S)."""
        while not stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    # -- read side ---------------------------------------------------------------------------
    def view(self, b: Budget, value: str, now: datetime | None = None) -> BudgetView:
        b.roll(self._clock() if now is None else now)
        pending = self.ledger.pending((b.index, value), b.start, b.end, b.epoch, b.covered)
        return BudgetView(b, value, b.stored_for(value), pending)

    def values(self, b: Budget) -> list[str]:
        """Every template value with spend in the stored result or the ledger ('' if none)."""
        if not b.spec.per:
            return [""]
        seen = dict.fromkeys(b.stored)
        keys = [*self.ledger.live_keys(), *(k for s in self.ledger.dropped() for k in s.entries)]
        for i, value in keys:
            if i == b.index:
                seen[value] = None
        return sorted(seen)

    def states(self) -> list[BudgetView]:
        now = self._clock()
        return [self.view(b, v, now) for b in self.budgets for v in self.values(b)]

    def gauge_views(self) -> Iterable[BudgetView]:
        now = self._clock()
        for b in self.budgets:
            for v in b.gauge_values:
                yield self.view(b, v, now)

    def check(self, user: str, team: str, api_key_id: str, model: str) -> dict[str, Any]:
        """Is one more request within every budget that matches it? Each matching budget's
        view is built and rendered once; the verdict is read from the rendered status."""
        now = self._clock()
        ids = (user, team, api_key_id, model)
        budgets = [
            self.view(b, ids[_DIM[b.spec.per]] if b.spec.per else "", now).as_json()
            for b in self._index.matching(*ids)
        ]
        refused = [j for j in budgets if j["status"] == "exceeded"]
        return {
            "allowed": not refused,
            "exceeded": [j["budget"] for j in refused],
            "refused_by": [{"budget": j["budget"], "resets_at": j["resets_at"]} for j in refused],
            "budgets": budgets,
        }

    # -- gauges: template values up to the label cap of their dimension ------------------------
    def _note_value(self, b: Budget, value: str) -> None:
        cap = self._caps.get(b.spec.per or "", 2000)
        if len(b.gauge_values) < cap:
            b.gauge_values[value] = None
        elif self._on_overflow is not None:
            self._on_overflow("budget")

    # -- the state file: stored spend + dropped-but-not-yet-seen spend survive a restart -----
    def _save(self) -> None:
        """Have the state file rewritten (on its thread, if the content changed)."""
        if self._state is not None:
            self._state.request()

    @property
    def state_writes(self) -> int:
        """State files written so far."""
        return self._state.writes if self._state is not None else 0

    async def close(self) -> None:
        """At shutdown, after the flusher and the refresher stopped: write the final state
        (refresh times included) and wait for it."""
        if self._state is not None:
            self._drain()
            await self._state.close()

    def _restore(self, path: Path) -> None:
        try:
            loaded, self._in_file = snapshot.load(path, self._by_name, self.ledger)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("budgets: ignoring unreadable %s (%s)", path, exc)
            return
        if loaded:
            log.info("budgets: stored spend of %d budget(s) restored from %s", loaded, path)


_DIM = {d: i for i, d in enumerate(DIMS)}
