"""YAML read as literal text, safely (docs/manifest.md §1, §4 rules 1-2).

Scalars keep their source text (`1.10`, `yes`, `010` stay as written; null is None), merge
keys work, and hostile input is refused: oversized documents, deep nesting, too many aliases
and alias bombs (nodes are counted as if every alias were expanded).

marid's limits are checked on the raw text before the YAML parser sees it (`_screen`), so a
refusal reads the same whatever limits the installed PyYAML or libyaml has of its own (libyaml
stops at 1000 flow levels with its own message, and scans far ahead of the events it hands
out); the builder checks the exact depth again on the events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml

# Guards for hostile input: the API caps bodies at 1 MiB; aliases can multiply a small
# document (a "billion laughs"), so nodes are counted as if every alias were expanded.
MAX_BYTES = 1024**2
MAX_NODES = 50_000
MAX_DEPTH = 64
MAX_ALIASES = 1000
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
    _screen(text)
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


# Where a plain scalar may end: block context (`key: value # comment`) and flow context.
_PLAIN_END = re.compile(r":(?=[ \t]|$)|[ \t]#")
_PLAIN_END_FLOW = re.compile(r"[,\[\]{}]|:(?=[ \t,\[\]{}]|$)|[ \t]#")
_QUOTE_END = {"'": re.compile(r"(?:[^']|'')*'"), '"': re.compile(r'(?:[^"\\]|\\.)*"')}
_KEY_COLON = re.compile(r"[ \t]*:(?=[ \t]|$)")
_NAME_END = re.compile(r"[ \t,\[\]{}]|$")  # of an anchor, alias or tag


def _screen(text: str) -> None:
    """Refuse text nested deeper than MAX_DEPTH or with more than MAX_ALIASES aliases.

    A light lexer, not a parser: it follows quotes, comments, block scalars and flow
    brackets, and counts a block collection at each column where a `- ` entry or a `key:`
    stands. It never counts more levels than the document has (a sequence at its key's
    column is not counted, so it may count half as many); the builder checks the exact
    depth on the parser's events afterwards.
    """
    screen = _Screen()
    for line in text.split("\n"):
        screen.line(line.rstrip("\r"))


class _Screen:
    def __init__(self) -> None:
        self.columns: list[int] = []  # block collections open, by indentation column
        self.flow = 0  # [ and { open
        self.quote = ""  # the quote of a quoted scalar that goes on to the next line
        self.literal: int | None = None  # in a | or > scalar: lines indented more are text
        self.aliases = 0

    def line(self, line: str) -> None:
        if self.quote:
            pos = self._quoted(line, 0)
            if not self.quote:
                self._scan(line, pos, node=False)
            return
        content = line.lstrip(" ")
        column = len(line) - len(content)
        if self.literal is not None:
            if not content.strip() or column > self.literal:
                return
            self.literal = None
        if not self.flow:
            if not content.strip() or content.startswith(("#", "%")):
                return
            if content.startswith(("---", "...")) and content[3:4] in ("", " ", "\t"):
                self.columns, column = [], column + 3  # a new document starts at the top
            while self.columns and self.columns[-1] > column:
                self.columns.pop()
        self._scan(line, column, node=True)

    def _open(self, column: int) -> None:
        """A block collection (sequence entry or mapping key) at `column`."""
        while self.columns and self.columns[-1] > column:
            self.columns.pop()
        if not self.columns or self.columns[-1] < column:
            self.columns.append(column)
            self._check()

    def _check(self) -> None:
        if len(self.columns) + self.flow > MAX_DEPTH:
            _stop(f"is too deeply nested: more than {MAX_DEPTH} levels")

    def _quoted(self, line: str, pos: int) -> int:
        """Past the closing quote of the current quoted scalar, or the line's end."""
        end = _QUOTE_END[self.quote].match(line, pos)
        if end is None:
            return len(line)
        self.quote = ""
        return end.end()

    def _key_at(self, line: str, start: int, end: int) -> None:
        """A scalar ran from `start` to `end`: in block context, a `:` after it makes it a key."""
        if not self.flow and _KEY_COLON.match(line, end):
            self._open(start)

    def _indicator(self, after: str) -> bool:
        """Whether a `:` followed by `after` separates a key from its value."""
        return after in ("", " ", "\t") or (self.flow > 0 and after in ",[]{}")

    def _scan(self, line: str, pos: int, node: bool) -> None:
        """Follow one line from `pos`; `node`: a node may start there."""
        while pos < len(line):
            char = line[pos]
            after = line[pos + 1 : pos + 2]
            if char in " \t":
                pos += 1
            elif char == "#" and (pos == 0 or line[pos - 1] in " \t"):
                return  # a comment
            elif node and char in "-?" and after in ("", " ", "\t") and not self.flow:
                self._open(pos)  # `- item` or `? key`
                pos += 1
            elif char in "[{" and (node or self.flow):
                self.flow += 1
                self._check()
                pos += 1
                node = True
            elif char in "]}" and self.flow:
                self.flow -= 1
                pos += 1
                node = False
            elif (char == "," and self.flow) or (char == ":" and self._indicator(after)):
                pos += 1
                node = True
            elif node and char in "'\"":
                self.quote = char
                end = self._quoted(line, pos + 1)
                if self.quote:
                    return
                self._key_at(line, pos, end)
                pos, node = end, False
            elif node and char in "|>" and not self.flow:
                self.literal = self.columns[-1] if self.columns else -1
                return  # the lines indented under it are its text
            elif node and char in "*&!":
                if char == "*":
                    self.aliases += 1
                    if self.aliases > MAX_ALIASES:
                        _stop(f"is too large: more than {MAX_ALIASES} aliases")
                name_end = _NAME_END.search(line, pos + 1)
                pos = name_end.start() if name_end else len(line)
                node = char != "*"  # an anchor or a tag comes before its node
            else:  # a plain scalar
                plain_end = (_PLAIN_END_FLOW if self.flow else _PLAIN_END).search(line, pos + 1)
                end = plain_end.start() if plain_end else len(line)
                self._key_at(line, pos, end)
                pos, node = end, False


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
