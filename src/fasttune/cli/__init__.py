"""The fasttune command: one module per command."""
