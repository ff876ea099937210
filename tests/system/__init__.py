"""End to end: the CLI, the server, faults, and the real default pair (skipped only where it is absent)."""
