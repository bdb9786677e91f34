"""The canonical fast path (exporter.ingest.canonical): a JSON body of canonical reports is
validated from its bytes in one call, and gives exactly what the general path gives.

Work is counted, not timed (`Ingestor.prepared`): a canonical batch takes the fast path once
and the general path never; any body the fast path refuses is answered by the general path,
so per-item indexes and reasons are the general path's own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from helpers import make_settings, report

from exporter.app import create_app
from exporter.appkeys import INGESTOR, WAL
from exporter.ingest.dedupe import RecentIds
from exporter.ingest.pipeline import Ingestor
from exporter.money import json_default

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
DONE = "2026-11-30T12:00:00Z"


def _item(i: int, **fields: Any) -> dict[str, Any]:
    base = report(
        request_id=f"c-{i}",
        model="gpt-4o-mini",
        provider="openai",
        user=f"u{i % 3}",
        input_tokens=100 + i,
        output_tokens=20 + i,
        completed_at=DONE,
    )
    base.update(fields)
    return base


#: bodies the fast path must take (its result is compared with the general path's)
TAKEN: dict[str, bytes] = {
    "batch": orjson.dumps([_item(i) for i in range(20)]),
    "one object": orjson.dumps(_item(0)),
    "whitespace around": b"  \n" + orjson.dumps([_item(1)]) + b"\n ",
    "client cost, float and text": orjson.dumps(
        [_item(2, cost_usd=0.30000000000000004), _item(3, cost_usd="1.25")]
    ),
    "provider inferred from the model id": orjson.dumps(
        [
            _item(4, model="openai/gpt-4o", provider=""),
            _item(5, model="claude-3-5-haiku-latest", provider=""),
        ]
    ),
    "provider alias": orjson.dumps([_item(6, provider="OpenAI"), _item(7, provider="bedrock")]),
    "unknown model": orjson.dumps([_item(8, model="no-such-model-anywhere")]),
    "error status, cache and reasoning": orjson.dumps(
        [
            _item(
                9,
                status="error",
                cached_input_tokens=50,
                reasoning_tokens=10,
                started_at="2026-11-30T11:59:59+01:00",
                duration_ms=12.5,
            )
        ]
    ),
    "unix completed_at, tags, stream": orjson.dumps(
        [_item(10, completed_at=1764504000.25, tags={"env": "prod"}, stream=True)]
    ),
    "incomplete stream estimated": orjson.dumps(
        [
            _item(
                11,
                completed=False,
                input_tokens=0,
                output_tokens=0,
                request_content_bytes=4000,
                output_chunk_count=7,
            )
        ]
    ),
    "duplicate key: the last wins in both": b'[{"model": "x", "model": "gpt-4o", '
    b'"request_id": "dup-key", "completed_at": "' + DONE.encode() + b'"}]',
}

#: bodies the fast path must hand to the general path (shapes, aliases, invalid items, ...)
REFUSED: dict[str, bytes] = {
    "operation alias": orjson.dumps([_item(0, operation="chat.completions")]),
    "status alias": orjson.dumps([_item(0, status="ok")]),
    "LiteLLM shape": orjson.dumps(
        [
            {
                "call_type": "acompletion",
                "model": "gpt-4o",
                "prompt_tokens": 3,
                "completion_tokens": 4,
            }
        ]
    ),
    "GPUStack shape": orjson.dumps([{"model": "m", "input_token": 3, "output_token": 4}]),
    "usage body": orjson.dumps([{"model": "gpt-4o", "usage": {"prompt_tokens": 3}}]),
    "unknown field": orjson.dumps([_item(0, colour="red")]),
    "fallback cost key": orjson.dumps([_item(0, fallback_cost_usd=0.5)]),
    "second item invalid": orjson.dumps([_item(0), _item(1, input_tokens=-1)]),
    "arithmetic": orjson.dumps([_item(0, cached_input_tokens=10**6)]),
    "NUL in an id": orjson.dumps([_item(0, user="a\x00b")]),
    "NaN": b'[{"model": "gpt-4o", "duration_ms": NaN}]',
    "1e400": b'[{"model": "gpt-4o", "duration_ms": 1e400}]',
    "lone surrogate": b'[{"model": "gpt-4o", "user": "\\ud800"}]',
    "not JSON": b"[{",
    "NDJSON as application/json": orjson.dumps(_item(0)) + b"\n" + orjson.dumps(_item(1)),
    "empty batch": b"[]",
    "too many items": orjson.dumps([_item(i) for i in range(6)]),
    "scalar": b"42",
    "cost over the cap": orjson.dumps([_item(0, cost_usd="1000001")]),
}
MAX_ITEMS = 1000  # "too many items" is tried with a limit of 5


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    return create_app(make_settings(tmp_path))[INGESTOR]


def _general(ingestor: Ingestor, body: bytes) -> tuple[list[dict[str, Any]], list[Any]]:
    doc = orjson.loads(body)
    reports, errors = ingestor.prepare(doc if isinstance(doc, list) else [doc])
    return [dict(r.__dict__) for r in reports], errors


@pytest.mark.parametrize("name", sorted(TAKEN))
def test_a_body_the_fast_path_takes_gives_the_general_paths_reports(
    ingestor: Ingestor, name: str
) -> None:
    body = TAKEN[name]
    fast = ingestor.prepare_canonical(body.strip(), MAX_ITEMS)
    assert fast is not None, name
    reports, errors = fast
    assert errors == []
    general, general_errors = _general(ingestor, body)
    assert general_errors == []
    assert [dict(r.__dict__) for r in reports] == general
    assert ingestor.prepared == {"canonical": 1, "general": 1}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_body_the_fast_path_refuses_is_left_to_the_general_path(
    ingestor: Ingestor, name: str
) -> None:
    limit = 5 if name == "too many items" else MAX_ITEMS
    assert ingestor.prepare_canonical(REFUSED[name].strip(), limit) is None
    assert ingestor.prepared == {"canonical": 0, "general": 0}


def test_a_report_without_completed_at_gets_the_receive_time(ingestor: Ingestor) -> None:
    item = _item(0)
    del item["completed_at"]
    before = datetime.now(UTC)
    fast = ingestor.prepare_canonical(orjson.dumps([item]), MAX_ITEMS)
    assert fast is not None
    done = fast[0][0].completed_at
    assert done is not None and before <= done <= datetime.now(UTC)


async def test_a_canonical_batch_takes_the_fast_path_once_and_the_wal_holds_the_general_paths_rows(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client()
    ingestor, wal = client.app[INGESTOR], client.app[WAL]
    body = TAKEN["batch"]
    answer = await client.post("/v1/usage", data=body, headers={"Content-Type": "application/json"})
    assert answer.status == 202
    assert await answer.json() == {"accepted": 20, "duplicates": 0, "rejected": 0, "errors": []}
    assert ingestor.prepared == {"canonical": 1, "general": 0}
    (segment,) = [s for s in wal._segments if s.size]
    stored = [r for rec in wal.read(segment) for r in orjson.loads(rec.payload)]
    oracle = create_app(make_settings(tmp_path / "oracle"))[INGESTOR]
    expected, _ = _general(oracle, body)
    assert stored == orjson.loads(orjson.dumps(expected, default=json_default))


async def test_a_batch_with_an_invalid_item_is_answered_by_the_general_path(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    ingestor = client.app[INGESTOR]
    answer = await client.post(
        "/v1/usage",
        data=REFUSED["second item invalid"],
        headers={"Content-Type": "application/json"},
    )
    doc = await answer.json()
    assert answer.status == 202
    assert (doc["accepted"], doc["rejected"]) == (1, 1)
    assert doc["errors"][0]["index"] == 1
    assert "input_tokens" in doc["errors"][0]["error"]
    assert ingestor.prepared == {"canonical": 0, "general": 1}


def test_recent_ids_add_all_keeps_what_one_add_each_keeps() -> None:
    one, many = RecentIds(5), RecentIds(5)
    batches = [["a", "b"], ["c", "d", "e", "f"], ["g"], ["h", "i", "j", "k", "l", "m", "n"]]
    for batch in batches:
        for rid in batch:
            one.add(rid)
        many.add_all(batch)
        assert list(one._seen) == list(many._seen)
    assert list(many._seen) == ["j", "k", "l", "m", "n"]
    assert len(RecentIds(0)) == 0
    zero = RecentIds(0)
    zero.add_all(["x"])
    assert "x" not in zero
