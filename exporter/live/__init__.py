"""Live Prometheus counters: bounded label sets and a fast text renderer."""
