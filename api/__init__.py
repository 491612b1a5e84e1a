"""The aiohttp REST API (spec/API.md)."""
