"""Shared pytest fixtures. Fixture modules live next to this file and are registered here."""

import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import make_settings, token_settings
from pgcluster import pg_cluster, pg_url

from exporter.app import create_app

__all__ = ["make_client", "pg_cluster", "pg_url"]

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path) -> MakeClient:
    """A live app on a loopback port per call, each with its own data dir; `with_tokens=True`
    configures the ingest/read/admin tokens of tests/helpers.py."""
    counter = itertools.count()

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("data_dir", tmp_path / f"data{next(counter)}")
        tokens = overrides.pop("with_tokens", False)
        settings = (
            token_settings(tmp_path, **overrides)
            if tokens
            else make_settings(tmp_path, **overrides)
        )
        client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
        return client

    return make
