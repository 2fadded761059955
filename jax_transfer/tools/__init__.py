"""Command-line tools that are not training runs (checkpoint import)."""
