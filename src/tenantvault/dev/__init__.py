"""Development tooling: the embedded PostgreSQL + OpenBao stack, the demo, the ER
diagram. Runtime code never imports it."""
