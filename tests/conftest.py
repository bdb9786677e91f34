"""Shared pytest fixtures. Fixture modules live next to this file and are registered here."""

from pgcluster import pg_cluster, pg_url

__all__ = ["pg_cluster", "pg_url"]
