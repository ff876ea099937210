"""The `edgespec` command: one module per command group, shared options in `common`."""
