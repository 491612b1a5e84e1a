"""Execution drivers: where a build's jobs run (EXTENSIONS.md h)."""
