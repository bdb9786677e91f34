"""Python SDK for llm-usage-exporter: report LLM usage from apps and agent pipelines.

    from exporter.client import UsageClient, instrument, node
    usage = UsageClient("http://127.0.0.1:9470", token)
    client = instrument(openai.AsyncOpenAI(), usage, user="alice")

Imports no server code: only the standard library and aiohttp (and opentelemetry-api, when
installed, for the active span's ids). See docs/sdk.md.
"""

from exporter.client.client import ClientStats, UsageClient
from exporter.client.context import Frame, current_frame, node, trace_fields
from exporter.client.extract import usage_from_response
from exporter.client.instrument import instrument
from exporter.client.sync import SyncUsageClient
from exporter.client.tracker import UsageTracker

__all__ = [
    "ClientStats",
    "Frame",
    "SyncUsageClient",
    "UsageClient",
    "UsageTracker",
    "current_frame",
    "instrument",
    "node",
    "trace_fields",
    "usage_from_response",
]
