"""Channel names live in marid/channels.py only (docs/architecture.md §4): every NOTIFY and
LISTEN of the source names its channel through those constants."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from marid import channels

ROOT = Path(__file__).resolve().parent.parent
NAMES = {value for key, value in vars(channels).items() if key.isupper()}
# SQL that names a channel itself instead of taking it as a parameter.
INLINE = re.compile(r"pg_notify\s*\(\s*'|\b(?:LISTEN|UNLISTEN|NOTIFY)\s+\"?marid_", re.I)
# Strings that are spelled like a channel but are not one.
NOT_CHANNELS = {("marid/metrics.py", "marid_builds")}  # the gauge of builds queued or running


def sources() -> list[Path]:
    """The domain modules and the process packages (marid/api etc. are links to the latter)."""
    found = list((ROOT / "marid").glob("*.py"))
    for folder in ("api", "runner", "scheduler"):
        found += (ROOT / folder).rglob("*.py")
    return sorted(path for path in found if path != ROOT / "marid" / "channels.py")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes: prose may name a channel."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def spelled_out(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    prose = docstrings(tree)
    where = path.relative_to(ROOT).as_posix()
    return [
        f"{where}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
        if (node.value in NAMES and (where, node.value) not in NOT_CHANNELS)
        or INLINE.search(node.value)
    ]


def test_no_source_spells_out_a_channel_name() -> None:
    assert [line for path in sources() for line in spelled_out(path)] == []


def test_the_check_sees_every_module_and_channel() -> None:
    assert len(sources()) > 50  # the symlinked process packages included
    assert {
        "marid_builds",
        "marid_kill",
        "marid_output",
        "marid_access",
        "marid_hooks",
        "marid_crons",
    } == NAMES
    assert INLINE.search("SELECT pg_notify('marid_kill', $1)")
    assert INLINE.search("LISTEN marid_output")
    assert not INLINE.search("SELECT pg_notify($1, $2)")


def test_migrations_notify_only_channels_of_the_module() -> None:
    """Triggers cannot take a Python constant: a channel they spell out must be one of
    marid/channels.py's."""
    spelled = {
        match
        for path in (ROOT / "migrations").glob("*.sql")
        for match in re.findall(r"pg_notify\s*\(\s*'([^']*)'", path.read_text())
    }
    assert spelled and spelled <= NAMES
