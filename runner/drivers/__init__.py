"""Execution drivers: where a build's jobs run (docs/manifest.md §9)."""
