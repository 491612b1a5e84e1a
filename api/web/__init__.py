"""The web interface (docs/web.md): server-rendered pages at the server root, beside the API
under /api. Pages use the same domain functions and access rules as the API's handlers, so a
page shows nothing the API would hide from its user; a signed-in browser holds a session
(marid/sessions.py) instead of a token."""

from __future__ import annotations

from pathlib import Path

import jinja2
from aiohttp import web

from marid.api.web import pages

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"


def setup(app: web.Application) -> None:
    """Add the pages and their static files to the root application."""
    app[pages.TEMPLATES] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the test, not the page
        trim_blocks=True,
        lstrip_blocks=True,
    )
    pages.add_filters(app[pages.TEMPLATES])
    app.add_routes(pages.routes)
    app.router.add_static("/static", STATIC, append_version=True, name="static")
