"""The package layering of docs/architecture.md, read from the source's imports.

Three layers: the domain (data, rules, SQL) at the bottom, the processes above it, and the
command-line entry points on top. A module may import from its own layer's package and from
the layers below, never above, and the processes never import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import marid

PACKAGE = Path(marid.__file__).parent
ENTRY_POINTS = {"marid.cli", "marid.up", "marid.__main__"}
PROCESSES = ("marid.api", "marid.runner", "marid.scheduler")


def layer(module: str) -> str:
    """'entry', a process package's name, or 'domain' for a module of marid."""
    if module in ENTRY_POINTS:
        return "entry"
    for process in PROCESSES:
        if module == process or module.startswith(process + "."):
            return process
    return "domain"


def may_import(importer: str, imported: str) -> bool:
    """The import table: entry -> anything; process -> itself and the domain; domain -> domain."""
    if not imported.startswith("marid"):
        # The domain has no HTTP server in it: aiohttp belongs to the API process.
        return not (layer(importer) == "domain" and imported.split(".")[0] == "aiohttp")
    source, target = layer(importer), layer(imported)
    return source == "entry" or target == "domain" or source == target


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, function-level ones included."""
    found = []
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = (package or module_name(path)).split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from marid import cli` imports the module marid.cli
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name if _is_module(name) else base) for name in names]
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    base = PACKAGE.parent / relative
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def sources() -> list[Path]:
    # rglob does not follow the symlinked process packages (marid/api -> ../api): walk them.
    roots = [PACKAGE, *(PACKAGE / name.split(".")[1] for name in PROCESSES)]
    return sorted({path for root in roots for path in root.rglob("*.py")})


def test_every_package_imports_only_what_its_layer_may() -> None:
    violations = [
        f"{module_name(path)}:{line} imports {imported}"
        for path in sources()
        for line, imported in imports(path)
        if not may_import(module_name(path), imported)
    ]
    assert violations == []


def test_the_walk_sees_every_layer() -> None:
    layers = {layer(module_name(path)) for path in sources()}
    assert layers == {"entry", "domain", *PROCESSES}


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("marid.builds", "marid.runner.worker", False),
        ("marid.builds", "marid.cli", False),
        ("marid.builds", "aiohttp.web", False),
        ("marid.builds", "asyncpg", True),
        ("marid.api.builds", "marid.builds", True),
        ("marid.api.builds", "marid.scheduler.loop", False),
        ("marid.runner.worker", "marid.api.http", False),
        ("marid.scheduler.hooks", "marid.up", False),
        ("marid.up", "marid.api.server", True),
    ],
)
def test_the_table_refuses_imports_upwards_and_across(
    importer: str, imported: str, allowed: bool
) -> None:
    assert may_import(importer, imported) is allowed
