"""HTTP out: the read API (budgets) and the service's own pages (landing, health, readiness)."""
