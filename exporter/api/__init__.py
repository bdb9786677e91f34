"""Read API: budgets (state and enforcement checks)."""
