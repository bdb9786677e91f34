"""Property: whatever valid reports arrive, in whatever batches, shapes and encodings, with
duplicates and invalid items mixed in, the /metrics counters equal the sums over the distinct
accepted reports. Each example runs a fresh app on a real loopback socket in a fresh data dir."""

from __future__ import annotations

import asyncio
import gzip
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer
from helpers import make_settings, parse_metrics, select, value
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from exporter.app import create_app

MODELS = ["model-a", "model-b", "model-c"]  # unpriced: cost is only what clients send
USERS = ["u1", "u2", "u3", ""]
OPERATIONS = ["chat", "embedding", "responses", "rerank"]
FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_tokens",
)
FAMILY = {
    "requests": "llm_requests_total",
    "errors": "llm_request_errors_total",
    "input_tokens": "llm_input_tokens_total",
    "output_tokens": "llm_output_tokens_total",
    "cached_input_tokens": "llm_cached_input_tokens_total",
    "cache_creation_input_tokens": "llm_cache_creation_input_tokens_total",
    "reasoning_tokens": "llm_reasoning_tokens_total",
    "cost_usd": "llm_cost_usd_total",
}


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """One report in canonical terms, plus the wire shape to send it in."""
    input_tokens = draw(st.integers(0, 2_000_000))
    cached = draw(st.integers(0, input_tokens))
    creation = draw(st.one_of(st.just(0), st.integers(0, input_tokens - cached)))
    output_tokens = draw(st.integers(0, 200_000))
    reasoning = draw(st.one_of(st.just(0), st.integers(0, output_tokens)))
    spec: dict[str, Any] = {
        "id": draw(st.one_of(st.none(), st.integers(0, 15))),  # small pool → duplicates
        "model": draw(st.sampled_from(MODELS)),
        "user": draw(st.sampled_from(USERS)),
        "operation": draw(st.sampled_from(OPERATIONS)),
        "status": draw(st.sampled_from(["success", "success", "error", "cancelled"])),
        "input_tokens": input_tokens,
        "cached_input_tokens": cached,
        "cache_creation_input_tokens": creation,
        "output_tokens": output_tokens,
        "reasoning_tokens": reasoning,
        # dyadic fractions add up exactly in any order
        "cost_usd": draw(st.integers(0, 4096)) / 1024,
        "invalid": draw(st.integers(0, 9)) == 0,
    }
    shapes = ["canonical"]
    if not creation:
        shapes.append("openai")
    if not reasoning:
        shapes.append("anthropic")
    if not creation and not reasoning:
        shapes.append("gpustack")
    spec["shape"] = draw(st.sampled_from(shapes))
    if spec["shape"] == "gpustack":
        spec["cost_usd"] = 0.0  # GPUStack bodies carry no cost
    return spec


def wire(spec: dict[str, Any], run: str) -> dict[str, Any]:
    """The report as a client would send it, in the spec's provider shape."""
    rid = {} if spec["id"] is None else {"request_id": f"{run}-{spec['id']}"}
    common = {
        **rid,
        "model": spec["model"],
        "user": spec["user"],
        "operation": spec["operation"],
        "status": spec["status"],
        "cost_usd": spec["cost_usd"],
    }
    shape = spec["shape"]
    if shape == "canonical":
        out = {**common, **{f: spec[f] for f in FIELDS}}
    elif shape == "openai":
        out = {
            **common,
            "usage": {
                "prompt_tokens": spec["input_tokens"],
                "completion_tokens": spec["output_tokens"],
                "total_tokens": spec["input_tokens"] + spec["output_tokens"],
                "prompt_tokens_details": {"cached_tokens": spec["cached_input_tokens"]},
                "completion_tokens_details": {"reasoning_tokens": spec["reasoning_tokens"]},
            },
        }
    elif shape == "anthropic":
        read, created = spec["cached_input_tokens"], spec["cache_creation_input_tokens"]
        out = {
            **common,
            "type": "message",
            "usage": {
                "input_tokens": spec["input_tokens"] - read - created,
                "cache_creation_input_tokens": created,
                "cache_read_input_tokens": read,
                "output_tokens": spec["output_tokens"],
            },
        }
    else:
        out = {
            **rid,
            "model": spec["model"],
            "user_id": spec["user"],
            "operation": spec["operation"],
            "status": spec["status"],
            "input_token": spec["input_tokens"],
            "output_token": spec["output_tokens"],
            "input_cached_token": spec["cached_input_tokens"],
            "request_count": 1,
        }
    if spec["invalid"]:
        out["model"] = ""  # rejected whatever the shape (provider shapes ignore unknown keys)
    return out


def expected(
    batches: list[list[dict[str, Any]]],
) -> tuple[dict[tuple[str, ...], dict[str, float]], int, int]:
    """Sums per (model, operation, user) over the distinct valid reports, in posting order."""
    sums: dict[tuple[str, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    seen: set[int] = set()
    accepted = duplicates = 0
    for batch in batches:
        for spec in batch:
            if spec["invalid"]:
                continue
            if spec["id"] is not None:
                if spec["id"] in seen:
                    duplicates += 1
                    continue
                seen.add(spec["id"])
            accepted += 1
            s = sums[(spec["model"], spec["operation"], spec["user"])]
            s["requests"] += 1
            s["errors"] += spec["status"] != "success"
            for f in (*FIELDS, "cost_usd"):
                s[f] += spec[f]
    return sums, accepted, duplicates


def encode(items: list[dict[str, Any]], how: str) -> tuple[bytes, dict[str, str]]:
    if how == "ndjson":
        return b"\n".join(orjson.dumps(i) for i in items), {"Content-Type": "application/x-ndjson"}
    body = orjson.dumps(items)
    if how == "gzip":
        return gzip.compress(body), {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    return body, {"Content-Type": "application/json"}


async def scenario(batches: list[list[dict[str, Any]]], encodings: list[str]) -> None:
    run = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(make_settings(Path(tmp), wal_durability="os"))
        async with TestClient(TestServer(app)) as client:
            for batch, how in zip(batches, encodings, strict=True):
                body, headers = encode([wire(s, run) for s in batch], how)
                resp = await client.post("/v1/usage", data=body, headers=headers)
                answer = await resp.json()
                n_invalid = sum(s["invalid"] for s in batch)
                assert len(answer["errors"]) == n_invalid, answer
                assert resp.status == (422 if n_invalid == len(batch) else 202), answer
            resp = await client.get("/metrics")
            samples = parse_metrics(await resp.text())

    sums, accepted, duplicates = expected(batches)
    for key, fields in sums.items():
        labels = dict(zip(("model", "operation", "user"), key, strict=True))
        for field, family in FAMILY.items():
            assert value(samples, family, **labels) == fields[field], (family, labels)
    exported = {
        tuple(dict(k[1])[n] for n in ("model", "operation", "user"))
        for k in select(samples, "llm_requests_total")
    }
    assert exported == set(sums)
    assert value(samples, "llm_usage_reports_received_total") == accepted
    assert value(samples, "llm_usage_reports_duplicate_total") == duplicates
    assert value(samples, "llm_usage_reports_rejected_total", reason="invalid") == sum(
        s["invalid"] for b in batches for s in b
    )


@settings(
    max_examples=30,
    deadline=None,
    # every example starts an app; shrinking a failure would take minutes, and the
    # assertion already names the family and labels that disagree
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    batches=st.lists(st.lists(specs(), min_size=1, max_size=12), min_size=1, max_size=5),
    data=st.data(),
)
def test_counters_equal_sums_of_distinct_accepted_reports(
    batches: list[list[dict[str, Any]]], data: st.DataObject
) -> None:
    encodings = [data.draw(st.sampled_from(["json", "ndjson", "gzip"])) for _ in batches]
    asyncio.run(scenario(batches, encodings))
