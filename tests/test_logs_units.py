"""The log pipeline's parts in-process: the per-class rate limit, the redactor, the formats."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from exporter.logevents import EventCounts, RateLimitFilter, request_event
from exporter.logs import configure
from exporter.redact import Redactor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, RateLimitFilter, Clock, EventCounts]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    clock, counts = Clock(), EventCounts()
    limiter = RateLimitFilter(interval=60, counts=counts, clock=clock)
    handler.addFilter(limiter)
    logger = logging.getLogger("test.logs.units")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream, limiter, clock, counts
    logger.handlers.clear()


def test_one_line_per_event_class_per_interval_then_the_suppressed_count(captured) -> None:  # type: ignore[no-untyped-def]
    logger, stream, limiter, clock, counts = captured
    for i in range(5):
        request_event(logger, "unauthorized", "GET", f"/v1/stats?token=t{i}", "10.0.0.1", "no")
        clock.now += 1
    request_event(logger, "bad_body", "POST", "/v1/usage", "10.0.0.2", "not JSON")
    clock.now += 60
    request_event(logger, "unauthorized", "GET", "/v1/stats", "10.0.0.1", "no")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "WARNING unauthorized: GET /v1/stats from 10.0.0.1: no",
        "WARNING bad_body: POST /v1/usage from 10.0.0.2: not JSON",
        "WARNING unauthorized: GET /v1/stats from 10.0.0.1: no (4 similar suppressed in 65s)",
    ]
    assert counts.logged["unauthorized"] == 2 and counts.suppressed["unauthorized"] == 4
    assert counts.logged["bad_body"] == 1 and counts.suppressed["bad_body"] == 0
    assert limiter.pending() == []


def test_unclassed_warnings_are_limited_by_template_and_info_is_not(captured) -> None:  # type: ignore[no-untyped-def]
    logger, stream, limiter, _clock, counts = captured
    for i in range(100):
        logger.error("accept failed: %s", i)
        logger.info("flushed %d", i)
    lines = stream.getvalue().splitlines()
    assert lines.count("ERROR accept failed: 0") == 1
    assert len([ln for ln in lines if ln.startswith("ERROR")]) == 1
    assert len([ln for ln in lines if ln.startswith("INFO")]) == 100
    assert counts.suppressed["test.logs.units"] == 99
    assert limiter.pending() == [("test.logs.units: accept failed: %s", 99, 0.0)]


def test_event_key_narrows_the_window_but_not_the_metric(captured) -> None:  # type: ignore[no-untyped-def]
    logger, stream, _limiter, _clock, counts = captured
    for model in ("a", "b", "a"):
        logger.warning(
            "no price for %s", model, extra={"event": "unpriced_model", "event_key": model}
        )
    assert stream.getvalue().splitlines() == ["WARNING no price for a", "WARNING no price for b"]
    assert counts.logged["unpriced_model"] == 2 and counts.suppressed["unpriced_model"] == 1


SECRET = "sk-live-Zx9Yw8Vu7Ts6Rq5P"


@pytest.mark.parametrize(
    "text",
    [
        f"b'Authorization: Bearer {SECRET}\\x01'",
        f"GET /v1/stats?limit=5&token={SECRET} HTTP/1.1",
        f"POST /x?api_key={SECRET}&b=1",
        f"password={SECRET}",
        f"postgresql+asyncpg://app:{SECRET}@db:5432/usage",
        f"X-Api-Key: {SECRET}",
        f'{{"access_token": "{SECRET}"}}',
        f"Authorization: Basic {SECRET}",
        f"Bearer%20{SECRET}",
    ],
)
def test_redactor_hides_credentials_in_free_text(text: str) -> None:
    assert SECRET not in Redactor()(text)


def test_redactor_masks_configured_tokens_anywhere_and_keeps_prose() -> None:
    token = "custom-format-token-without-keyword"
    redact = Redactor([token])
    assert token not in redact(f"user {token} posted")
    for prose in (
        "body is not valid JSON: expected a string key: line 1 column 2",
        "authorization: Extra inputs are not permitted",
        "no price for model 'gpt-4o' (provider 'openai'): cost counted as 0",
        "flush: committed 3 segment(s), 120 report(s), 119 new",
    ):
        assert redact(prose) == prose


def test_json_and_text_lines_carry_utc_and_the_request_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            configure("info", fmt, [SECRET])
            log = logging.getLogger(f"exporter.units_test.{fmt}")
            request_event(log, "forbidden", "GET", f"/v1/stats?token={SECRET}", "::1", "scope")
            log.warning("leaked %s", SECRET)
        err = capsys.readouterr().err.splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    first = json.loads(err[0])
    assert first["ts"].endswith("+00:00") and len(first["ts"]) == len(
        "2026-01-01T00:00:00.000+00:00"
    )
    assert {k: first[k] for k in ("event", "method", "path", "peer", "reason")} == {
        "event": "forbidden",
        "method": "GET",
        "path": "/v1/stats",
        "peer": "::1",
        "reason": "scope",
    }
    assert err[2].split(" ", 1)[0].endswith("+00:00")
    assert "forbidden: GET /v1/stats from ::1: scope" in err[2]
    assert not [line for line in err if SECRET in line]
