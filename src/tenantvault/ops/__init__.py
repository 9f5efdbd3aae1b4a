"""One function per operator command, each returning a report: what the CLI calls,
and what a scheduler may call."""
