"""marid: shared domain and data code. Never imports aiohttp."""

__version__ = "0.1.0"
