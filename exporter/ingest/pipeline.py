"""Validated items → durable (WAL) → counted live. The one path every report takes.

Dedupe (live counters; the database's unique key is the stored truth): a report whose
request_id is already durable is a duplicate; one whose first copy is still being written
waits for that write and becomes the accepted copy if it fails, so a 202 "duplicate" is never
given for a report that is nowhere. Reports outside the time window are refused: older than
`max_report_age` (the audit rows that de-duplicate them may be gone by retention) or past
`max_future_skew` in the future.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from exporter.ingest.adapters import FALLBACK_COST, ShapeError, adapt
from exporter.ingest.adapters.otel import DEFAULT_USER_ATTRIBUTES
from exporter.ingest.canonical import canonical_reports
from exporter.ingest.dedupe import RecentIds
from exporter.ingest.outcome import Backpressure, IngestResult, describe
from exporter.ingest.window import Prepared, TimeWindow
from exporter.live.usage_metrics import UsageMetrics
from exporter.money import CostOverCap, json_default, parse_cost
from exporter.pricing import Pricer, Unpriced
from exporter.selfmetrics import SelfMetrics
from exporter.usage import UsageReport
from exporter.wal import Record, WalBroken, WalClosed, WalFull, WriteAheadLog

__all__ = ["Backpressure", "IngestResult", "Ingestor", "Prepared", "describe", "key_alias"]

log = logging.getLogger(__name__)
_BATCH = TypeAdapter(list[UsageReport])
_estimated = attrgetter("estimated")
_UNPRICED_LOGGED_MAX = 1000  # distinct models named in "no price" log lines


def key_alias(raw_key: str) -> str:
    """A short, stable, non-reversible alias for a raw API key (never stored or logged)."""
    digest = hashlib.blake2b(raw_key.encode(), digest_size=6, person=b"llm-usage-key").hexdigest()
    return f"key-{digest}"


def _fallback_cost(value: float | None) -> Decimal | None:
    """A client's own price, exact; unusable (negative, NaN) → None; over the cap raises."""
    if value is None:
        return None
    try:
        return parse_cost(value)
    except CostOverCap:
        raise
    except ValueError:
        return None


class Ingestor:
    """Owns the accept path; the HTTP handlers only decode bodies and encode answers."""

    def __init__(
        self,
        *,
        wal: WriteAheadLog,
        usage: UsageMetrics,
        self_metrics: SelfMetrics,
        pricer: Pricer | None,
        recent: RecentIds,
        bytes_per_input_token: float,
        tokens_per_output_chunk: float,
        retry_after: int = 5,
        user_attributes: Sequence[str] = DEFAULT_USER_ATTRIBUTES,
        max_report_age: timedelta | None = None,
        max_future_skew: timedelta | None = None,
    ) -> None:
        self._wal = wal
        self._usage = usage
        self._m = self_metrics
        self._pricer = pricer
        self._recent = recent
        self._bytes_per_token = bytes_per_input_token
        self._tokens_per_chunk = tokens_per_output_chunk
        self._retry_after = retry_after
        self._user_attributes = tuple(user_attributes)
        self._window = TimeWindow(max_report_age, max_future_skew)
        self._unpriced_logged: set[str] = set()
        for reason in Unpriced:  # every reason exposed from the start (0 until one happens)
            self_metrics.unpriced.labels(reason.value)
        #: request_id → outcome of the WAL write carrying its first copy (True: durable)
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        wal.on_failure.append(lambda kind: self_metrics.wal_failures.labels(kind).inc())
        self_metrics.wal_broken.set_function(lambda: 0 if wal.broken_reason is None else 1)
        #: requests prepared by each path (the per-request work guard test reads them)
        self.prepared = {"canonical": 0, "general": 0}
        #: called with (wal segment seq, reports) once reports are durable
        self.on_durable: list[Callable[[int, Sequence[UsageReport]], None]] = []

    def adapt(self, raw: Any) -> tuple[Mapping[str, Any], float | None]:
        """The canonical mapping and the client's fallback cost (kept out of the model)."""
        out = adapt(raw, key_alias, self._user_attributes)
        if FALLBACK_COST not in out:
            return out, None
        rest = dict(out)
        fallback = rest.pop(FALLBACK_COST)
        return rest, fallback if type(fallback) is float else None

    def validate(self, raw: Any, now: datetime) -> UsageReport:
        mapping, fallback = self.adapt(raw)
        return self._complete(UsageReport.model_validate(mapping), now, fallback)

    def _complete(
        self, report: UsageReport, now: datetime, fallback: float | None = None
    ) -> UsageReport:
        self._complete_all([report], now, None if fallback is None else {0: fallback})
        return report

    def _complete_all(
        self, reports: list[UsageReport], now: datetime, fallbacks: dict[int, float] | None
    ) -> None:
        """Defaults that need the receive time or settings: time, estimates, price. One loop
        per batch (a method call per report was ~10 % of this work); `fallbacks` by index."""
        price = self._pricer.price if self._pricer is not None else None
        for i, report in enumerate(reports):
            fields = report.__dict__  # plain writes: pydantic's __setattr__ costs ~0.3 µs each
            if fields["completed_at"] is None:
                fields["completed_at"] = now
            if not fields["completed"]:
                report.estimate_incomplete_stream(self._bytes_per_token, self._tokens_per_chunk)
            if fields["cost_usd"] is not None:
                fields["cost_sent"] = True  # set here only, never by the client
                fields["unpriced_reason"] = ""
                continue
            fields["cost_sent"] = False
            cost = Unpriced.UNKNOWN_MODEL if price is None else price(fields)
            if isinstance(cost, Unpriced):
                self._unpriced(fields, cost, fallbacks.get(i) if fallbacks else None)
                continue
            fields["cost_usd"] = cost
            if fields["unpriced_reason"]:
                fields["unpriced_reason"] = ""

    def validate_batch(
        self, items: list[Any], pre_errors: dict[int, str] | None, now: datetime
    ) -> tuple[list[UsageReport], list[dict[str, Any]]]:
        """One pydantic call for the whole batch (≈20% cheaper per item than one call each);
        only a batch with an invalid item is validated again item by item, for the reasons."""
        errors: list[dict[str, Any]] = []
        adapted: list[Mapping[str, Any]] = []
        fallbacks: dict[int, float] = {}
        for i, raw in enumerate(items):
            if pre_errors and i in pre_errors:
                errors.append({"index": i, "error": pre_errors[i]})
                continue
            try:
                mapping, fallback = self.adapt(raw)
            except ShapeError as exc:
                errors.append({"index": i, "error": str(exc)})
                continue
            if fallback is not None:
                fallbacks[len(adapted)] = fallback
            adapted.append(mapping)
        if not errors:
            if self._pricer is not None:
                self._pricer.refresh_if_due()
            try:
                valid = _BATCH.validate_python(adapted)
                self._complete_all(valid, now, fallbacks)
                return self._window.keep(valid, None, errors, now)
            except (ValidationError, CostOverCap):
                pass  # validated again item by item below, for the reasons
        indexed: list[tuple[int, UsageReport]] = []
        for i, raw in enumerate(items):
            if pre_errors and i in pre_errors:
                continue
            try:
                indexed.append((i, self.validate(raw, now)))
            except ValidationError as exc:
                errors.append({"index": i, "error": describe(exc)})
            except CostOverCap as exc:
                errors.append({"index": i, "error": f"cost_usd: {exc}"})
            except ShapeError:
                pass  # already reported above
        return self._window.keep([r for _, r in indexed], [i for i, _ in indexed], errors, now)

    def prepare(self, items: list[Any], pre_errors: dict[int, str] | None = None) -> Prepared:
        """The general path: items decoded from a body, of any shape (see `validate_batch`)."""
        self.prepared["general"] += 1
        return self.validate_batch(items, pre_errors, datetime.now(UTC))

    def prepare_canonical(self, body: bytes, max_items: int) -> Prepared | None:
        """The fast path (exporter.ingest.canonical): a JSON body of canonical reports, from
        its bytes; None when the body needs the general path (`prepare` after parsing) for
        its answer: another shape, an invalid item, a cost over the cap, too many items."""
        reports = canonical_reports(body)
        if reports is None or not 0 < len(reports) <= max_items:
            return None
        now = datetime.now(UTC)
        if self._pricer is not None:
            self._pricer.refresh_if_due()
        try:
            self._complete_all(reports, now, None)
        except CostOverCap:
            return None
        self.prepared["canonical"] += 1
        return self._window.keep(reports, None, [], now)

    @staticmethod
    def _unpriced(fields: dict[str, Any], why: Unpriced, fallback: float | None) -> None:
        """No price at the report's own time: the client's own cost (`fallback`, e.g.
        LiteLLM's response_cost, then kept like a sent cost), else None and the reason.
        CostOverCap (from pricing, or a fallback over the cap) raises: the item is refused."""
        sent = _fallback_cost(fallback)
        if sent is not None:
            fields["cost_usd"] = sent
            fields["cost_sent"] = True
            fields["unpriced_reason"] = ""
        else:
            fields["unpriced_reason"] = why.value

    def _count_unpriced(self, accepted: Sequence[UsageReport]) -> None:
        """Once per distinct accepted report (duplicates never reach here); one log line per
        unpriced model."""
        for r in accepted:
            reason = r.unpriced_reason
            if not reason:
                continue
            self._m.unpriced.labels(reason).inc()
            logged = self._unpriced_logged
            if r.model not in logged and len(logged) < _UNPRICED_LOGGED_MAX:
                logged.add(r.model)
                log.warning(
                    "no price for model %r (provider %r, service tier %r): %s; stored with "
                    "cost NULL; add it to the price file, then run `llm-usage-exporter reprice`",
                    r.model,
                    r.provider,
                    r.service_tier,
                    reason,
                    extra={"event": "unpriced_model", "event_key": ("unpriced", r.model)},
                )

    async def ingest(
        self, items: list[Any], pre_errors: dict[int, str] | None = None
    ) -> IngestResult:
        return await self.accept(*self.prepare(items, pre_errors))

    async def accept(
        self, reports: list[UsageReport], errors: list[dict[str, Any]]
    ) -> IngestResult:
        """Prepared reports → durable (WAL) → counted live. One coroutine down to the WAL's
        future (each layer of `await` cost a single report ~1–2 µs of frames and resumes)."""
        result = IngestResult(errors=errors)
        if errors:
            reasons: dict[str, int] = {}
            for e in errors:
                reason = e.pop("reason", "invalid")
                reasons[reason] = reasons.get(reason, 0) + 1
            for reason, n in reasons.items():
                self._m.rejected.labels(reason).inc(n)
        batch_ids: set[str] = set()
        pending = reports
        while pending:
            # the fresh ids are claimed before awaiting, so a concurrent retry waits for this
            # write's outcome
            outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            fresh, waiting = self._classify(pending, batch_ids, result, outcome)
            if fresh:
                try:
                    payload = orjson.dumps([r.__dict__ for r in fresh], default=json_default)
                    seq = await self._wal.submit(payload, len(fresh))
                except (WalFull, WalClosed, WalBroken, OSError) as exc:
                    self._settle(fresh, outcome, durable=False)
                    self._m.rejected.labels("backpressure").inc(len(fresh))
                    raise Backpressure(str(exc), self._retry_after) from exc
                except BaseException:
                    self._settle(fresh, outcome, durable=False)
                    raise
                self._settle(fresh, outcome, durable=True)
                self._durable(seq, fresh)
                result.accepted += len(fresh)
            else:
                outcome.set_result(False)  # nobody waits on it
            pending = await self._outcome_of_first_copies(waiting, batch_ids, result) if (
                waiting) else []  # fmt: skip
        return result

    def _classify(
        self,
        reports: list[UsageReport],
        batch_ids: set[str],
        result: IngestResult,
        outcome: asyncio.Future[bool],
    ) -> tuple[list[UsageReport], list[tuple[UsageReport, asyncio.Future[bool]]]]:
        """New reports to write (claimed for `outcome`), and retries whose first copy is
        still being written."""
        fresh: list[UsageReport] = []
        waiting: list[tuple[UsageReport, asyncio.Future[bool]]] = []
        duplicates = 0
        inflight, recent = self._inflight, self._recent
        for report in reports:
            rid = report.__dict__["request_id"]
            first = inflight.get(rid)
            if first is not None and rid not in batch_ids:
                waiting.append((report, first))
            elif rid in batch_ids or rid in recent:
                duplicates += 1
            else:
                fresh.append(report)
                inflight[rid] = outcome
            batch_ids.add(rid)
        if fresh:
            recent.add_all([r.__dict__["request_id"] for r in fresh])
        if duplicates:
            result.duplicates += duplicates
            self._m.duplicates.inc(duplicates)
        return fresh, waiting

    async def _outcome_of_first_copies(
        self,
        waiting: list[tuple[UsageReport, asyncio.Future[bool]]],
        batch_ids: set[str],
        result: IngestResult,
    ) -> list[UsageReport]:
        """Wait for the first copies; a retry whose first copy failed is the new first copy."""
        await asyncio.wait({f for _, f in waiting})  # never cancels the shared futures
        again: list[UsageReport] = []
        durable = 0
        for report, first in waiting:
            if first.result():
                durable += 1
            else:
                again.append(report)
                batch_ids.discard(report.request_id)
        if durable:
            result.duplicates += durable
            self._m.duplicates.inc(durable)
        return again

    def _durable(self, seq: int, accepted: list[UsageReport]) -> None:
        """Reports now in the WAL: live counters, self-metrics, listeners (budgets, flusher)."""
        self._usage.observe_many(accepted)
        estimated = sum(map(_estimated, accepted))
        self._m.received.inc(len(accepted))
        self._count_unpriced(accepted)
        if estimated:
            self._m.estimated.inc(estimated)
        for listener in self.on_durable:
            listener(seq, accepted)

    def _settle(
        self, accepted: list[UsageReport], outcome: asyncio.Future[bool], *, durable: bool
    ) -> None:
        inflight = self._inflight
        for r in accepted:
            rid = r.__dict__["request_id"]
            if inflight.get(rid) is outcome:
                del inflight[rid]
            if not durable:
                self._recent.discard(rid)
        outcome.set_result(durable)

    def remember_replayed(self, record: Record) -> None:
        """Start-up: ids still in the WAL are known, so a retry after a restart is a
        duplicate (counted once live). Runs in the WAL's loader thread, before serving."""
        try:
            reports = orjson.loads(record.payload)
        except orjson.JSONDecodeError:
            return
        for r in reports:
            rid = r.get("request_id") if isinstance(r, dict) else None
            if isinstance(rid, str):
                self._recent.add(rid)
