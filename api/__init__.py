"""The aiohttp REST API (docs/api.md)."""
