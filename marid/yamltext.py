"""YAML read as literal text, safely (MANIFEST.md §1, §4 rules 1-2).

Scalars keep their source text (`1.10`, `yes`, `010` stay as written; null is None), merge
keys work, and hostile input is refused: oversized documents, deep nesting, and alias bombs
(nodes are counted as if every alias were expanded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml

# Guards for hostile input: the API caps bodies at 1 MiB; aliases can multiply a small
# document (a "billion laughs"), so nodes are counted as if every alias were expanded.
MAX_BYTES = 1024**2
MAX_NODES = 50_000
MAX_DEPTH = 64
_NULL_TAG = "tag:yaml.org,2002:null"
_NULLS = ("", "~", "null", "Null", "NULL")  # YAML 1.1 plain nulls
# libyaml parses ~30x faster than the pure-Python parser: a 1 MiB body stays cheap.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LoadError(Exception):
    """Why a document was refused, worded to follow "Manifest " (e.g. "is not valid YAML: …")."""


def _stop(message: str) -> NoReturn:
    raise LoadError(message)


def load(text: str) -> Any:
    """The document's value: mappings, lists, literal-text scalars, None for null; raises
    LoadError for invalid, oversized or hostile input."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\ud800"
        code = ord(text[exc.start])
        _stop(f"is not valid YAML: unacceptable character #x{code:04x}: surrogate")
    if size > MAX_BYTES:
        _stop(f"is too large: more than {MAX_BYTES} bytes")
    try:
        return _compose(text)
    except yaml.YAMLError as exc:
        _stop(f"is not valid YAML: {_detail(exc)}")


def _detail(exc: yaml.YAMLError) -> str:
    """One line: the parser's problem and where it is."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        return " ".join(f"{problem}{_at(mark)}".split())
    return str(exc).splitlines()[0]  # e.g. "unacceptable character #x0000: …"


def _at(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _compose(text: str) -> Any:
    builder = _Builder()
    for event in yaml.parse(text, Loader=_LOADER):
        builder.feed(event)
    return builder.root


class _MergeKey(str):
    """A plain `<<` scalar: as a mapping key it merges mappings in (YAML 1.1 merge key)."""


@dataclass
class _Open:
    """A sequence or mapping being built; `weight` counts its nodes, aliases expanded."""

    value: list[Any] | dict[str, Any]
    anchor: str | None
    weight: int = 1
    key: Any = None
    has_key: bool = False
    merged: dict[str, Any] = field(default_factory=dict)  # from `<<`; own keys win


class _Builder:
    """Python values from parser events: scalars stay their literal text, null is None.

    An alias shares the anchored value (no copy) but counts as all of its nodes.
    """

    def __init__(self) -> None:
        self.root: Any = None
        self.stack: list[_Open] = []
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.nodes = 0
        self.documents = 0
        self.mark: Any = None

    def feed(self, event: yaml.Event) -> None:
        self.mark = event.start_mark
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                problem = "expected a single document in the stream"
                _stop(f"is not valid YAML: {problem}{_at(event.start_mark)}")
        elif isinstance(event, yaml.ScalarEvent):
            self._add(_scalar(event), 1, event.anchor)
        elif isinstance(event, yaml.AliasEvent):
            self._alias(event)
        elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
            if len(self.stack) >= MAX_DEPTH:
                _stop(f"is too deeply nested: more than {MAX_DEPTH} levels")
            self._count(1)
            empty: list[Any] | dict[str, Any] = (
                [] if isinstance(event, yaml.SequenceStartEvent) else {}
            )
            self.stack.append(_Open(empty, event.anchor))
        elif isinstance(event, yaml.SequenceEndEvent | yaml.MappingEndEvent):
            done = self.stack.pop()
            if done.merged and isinstance(done.value, dict):
                done.value = {**done.merged, **done.value}
            self._place(done.value, done.weight, done.anchor)

    def _alias(self, event: yaml.AliasEvent) -> None:
        # Anchors are registered when their node is complete, so an alias cannot
        # refer to an enclosing node: no cycles.
        if event.anchor is None or event.anchor not in self.anchors:
            problem = f"found undefined alias {event.anchor}"
            _stop(f"is not valid YAML: {problem}{_at(event.start_mark)}")
        value, weight = self.anchors[event.anchor]
        self._add(value, weight, None)

    def _add(self, value: Any, weight: int, anchor: str | None) -> None:
        self._count(weight)
        self._place(value, weight, anchor)

    def _count(self, weight: int) -> None:
        self.nodes += weight
        if self.nodes > MAX_NODES:
            _stop(f"is too large: more than {MAX_NODES} YAML nodes once aliases expand")

    def _place(self, value: Any, weight: int, anchor: str | None) -> None:
        if anchor is not None:
            self.anchors[anchor] = (value, weight)
        if not self.stack:
            self.root = value
            return
        parent = self.stack[-1]
        parent.weight += weight
        if isinstance(value, _MergeKey) and (isinstance(parent.value, list) or parent.has_key):
            value = str(value)  # `<<` merges only as a key
        if isinstance(parent.value, list):
            parent.value.append(value)
        elif not parent.has_key:
            parent.key, parent.has_key = value, True
        else:
            if isinstance(parent.key, _MergeKey):
                self._merge(parent, value)
            elif isinstance(parent.key, str):  # null and collection keys are ignored
                parent.value[parent.key] = value
            parent.has_key = False

    def _merge(self, parent: _Open, value: Any) -> None:
        mappings = value if isinstance(value, list) else [value]
        if not all(isinstance(mapping, dict) for mapping in mappings):
            problem = "expected a mapping or list of mappings for merging"
            _stop(f"is not valid YAML: {problem}{_at(self.mark)}")
        for mapping in mappings:  # the first mapping given wins
            for key, item in mapping.items():
                parent.merged.setdefault(key, item)


def _scalar(event: yaml.ScalarEvent) -> str | None:
    """The literal text of a scalar (`1.10`, `yes`, `010` unchanged); None for null."""
    plain = event.tag is None and event.implicit[0]
    if event.tag == _NULL_TAG or (plain and event.value in _NULLS):
        return None
    return _MergeKey(event.value) if plain and event.value == "<<" else event.value
