"""The code cites the user's documents in docs/, and every section it cites exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/([a-z]+)\.md(?: §(\d+(?:\.\d+)*))?")
# The contract documents the project started from live outside the repository.
OUTSIDE = re.compile(r"(?<![\w/])(?:(?:API|MANIFEST|EXTENSIONS)\.md|spec/)")


def cited_files() -> list[Path]:
    """What users and engineers read citations in: the source, SQL, configuration, docs."""
    found = [ROOT / "config.example.yaml", ROOT / "README.md"]
    for folder, pattern in [
        ("marid", "*.py"),
        ("api", "*.py"),
        ("runner", "**/*.py"),
        ("scheduler", "*.py"),
        ("migrations", "*.sql"),
        ("docs", "*.md"),
        ("tests", "**/*.py"),
    ]:
        found += (ROOT / folder).glob(pattern)
    return sorted(found)


def sections(doc: Path) -> set[str]:
    """The numbers of the document's numbered headings: `## 7. Builds` -> 7, `### 7.4 …`."""
    heading = re.compile(r"#{2,4} (\d+(?:\.\d+)*)\.? ")
    return {m[1] for line in doc.read_text().splitlines() if (m := heading.match(line))}


def test_every_citation_names_a_document_and_section_that_exist() -> None:
    docs = {path.stem: sections(path) for path in (ROOT / "docs").glob("*.md")}
    broken = [
        f"{path.relative_to(ROOT)}: {match[0]}"
        for path in cited_files()
        for match in CITATION.finditer(path.read_text())
        if match[1] not in docs or (match[2] and match[2] not in docs[match[1]])
    ]
    assert broken == []


def test_nothing_cites_documents_outside_the_repository() -> None:
    outside = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in cited_files()
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert outside == []


def test_the_checks_see_the_documents() -> None:
    assert {"api", "manifest", "configuration", "architecture"} <= {
        path.stem for path in (ROOT / "docs").glob("*.md")
    }
    assert "7.4" in sections(ROOT / "docs" / "api.md")
    assert CITATION.search("see docs/api.md §7.4.")[2] == "7.4"  # type: ignore[index]
