"""llm-usage-exporter: who spends what on LLMs, as Prometheus metrics and billable rollups."""

__version__ = "0.1.0"
