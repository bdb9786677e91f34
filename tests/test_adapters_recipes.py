"""Every row of docs/clients.md names tests that exist (a recipe nobody runs is a guess), and
every README shape example is accepted and carries a request id."""

from __future__ import annotations

import ast
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("OpenAI Python SDK", "Anthropic Python SDK", "OpenTelemetry GenAI", "OpenLLMetry",
           "OpenLIT", "LiteLLM", "Vercel AI SDK", "GPUStack")  # fmt: skip


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return {n.name for n in tree.body if isinstance(n, functions) and n.name.startswith("test_")}


def test_every_client_recipe_names_existing_tests() -> None:
    doc = (ROOT / "docs" / "clients.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and "tests/" in line]
    for client in CLIENTS:
        assert any(row.startswith(f"| {client}") for row in rows), client
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row)
        assert refs, row
        for path, name in refs:
            assert name in _tests_in(ROOT / path), f"{path}::{name} (docs/clients.md)"


def _readme_examples() -> list[dict[str, object]]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| shape | example item |") :].split("\n\n", 1)[0]
    return [orjson.loads(m) for m in re.findall(r"^\| [^|]+ \| `(\{.*?\})`", table, re.M)]


async def test_readme_shape_examples_are_accepted_and_idempotent(make_client: MakeClient) -> None:
    examples = _readme_examples()
    assert len(examples) == 7
    client = await make_client()
    for example in examples:
        for duplicates in (0, 1):  # every example carries a request id: a re-post changes nothing
            resp = await client.post("/v1/usage", json=example)
            answer = await resp.json()
            assert resp.status == 202, (example, answer)
            assert (answer["accepted"], answer["duplicates"]) == (1 - duplicates, duplicates)
