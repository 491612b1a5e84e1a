"""Job output: raw bytes in, masked text out (docs/manifest.md §6.12, docs/api.md §19).

The runner feeds a job's bytes to a `Masker` as they arrive and stores/streams what comes back.
Decoding is UTF-8 with invalid sequences replaced by U+FFFD; NUL characters become the three
characters `NUL`; then every occurrence of a masked value becomes `xxxxxx`. Masking runs after
the NUL rewrite so the stored text itself never contains a masked value (secrets are rewritten
the same way, although environment values cannot hold NUL anyway).

Matching is leftmost, then longest: scanning left to right, at each position the longest value
that occurs there is replaced whole and the scan resumes after it. Streaming gives exactly the
one-shot result however the bytes are split: text is held back only while its tail is a proper
prefix of some value (so fewer bytes than the longest value has), and a match is emitted only
once no longer value could still start at the same position. The UTF-8 decoder also keeps up to
3 bytes of an incomplete character, secrets or not, so it is not turned into U+FFFD.

A masked value also stands for the forms a shell's `set -x` trace gives it and for its lines of
`LINE_MIN` characters or more (`forms()`, issue 11 row 7): each is one more value to the matching
below, so they are masked like the value itself, split across feeds too.

Values without an `x` never appear in the output. One with an `x` can be formed by a `xxxxxx`
and the text after it: values `abc` and `xa` turn `abca` into `xxxxxxa`.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from dataclasses import dataclass

MASK = "xxxxxx"
NUL = "NUL"
CHUNK_LIMIT = 65536  # docs/api.md §19: an SSE output chunk is at most 64 KiB


LINE_MIN = 6  # the shortest line of a value masked on its own: variables.MIN_MASKED_LENGTH
_IFS = re.compile("[ \t\n]+")  # the shell's default field separators
_BASH_METAS = frozenset(" \t\n'\"\\|&;()<>!{}*[?]^$`")
_ANSIC = {"\a": "a", "\b": "b", "\t": "t", "\n": "n", "\v": "v", "\f": "f", "\r": "r", "\x1b": "E"}


def forms(secret: str) -> set[str]:
    """Every text that stands for `secret` in job output (docs/manifest.md §6.12): the value,
    its lines of `LINE_MIN` characters or more, and how `set -x` prints each of them quoted
    (bash, busybox ash; dash prints values as they are) or split into fields when unquoted."""
    pieces = {secret}
    if "\n" in secret:
        pieces |= {line for line in secret.split("\n") if len(line) >= LINE_MIN}
    out: set[str] = set()
    for piece in pieces:
        out |= {piece, _bash_inner(piece), *_ash_inner(piece)}
        out |= {_ansic_inner(piece, utf8) for utf8 in (True, False)}
        fields = _IFS.split(piece.strip(" \t\n"))
        joined = " ".join(fields)
        if len(joined) >= LINE_MIN:  # an unquoted `$SECRET` standing as its own words
            out |= {joined, " ".join(map(_ash_word, fields))}
            out |= {" ".join(_bash_word(f, utf8) for f in fields) for utf8 in (True, False)}
    return out


def _bash_inner(text: str) -> str:
    """`text` inside a word bash prints single-quoted: `it's` -> `it'\\''s`."""
    return text.replace("'", "'\\''")


def _ansic_inner(text: str, utf8: bool) -> str:
    """`text` inside a word bash prints as `$'...'` (it has no metas but characters the locale
    cannot print: controls, and in the C locale every byte of a non-ASCII character)."""
    return "".join(
        "\\" + _ANSIC[c]
        if c in _ANSIC
        else "".join(f"\\{byte:03o}" for byte in c.encode())
        if not _printable(c, utf8)
        else c
        for c in text
    )


def _printable(char: str, utf8: bool) -> bool:
    """Whether bash prints `char` as it is in a UTF-8 locale (`utf8`) or in the C locale."""
    return 32 <= ord(char) < 127 or (utf8 and ord(char) > 159)


def _ash_inner(text: str) -> list[str]:
    """`text` inside a word busybox ash prints single-quoted: each run of
    `'` becomes `'"'"'`; at the end of the word the closing `'` after the last run is left out."""
    inner = re.sub("'+", lambda run: "'\"" + run[0] + "\"'", text)
    return [inner, inner[:-1]] if text.endswith("'") else [inner]


def _bash_word(word: str, utf8: bool) -> str:
    """`word` as bash's `set -x` prints a whole word."""
    if word[0] in "~#" or any(c in _BASH_METAS for c in word):
        return "'" + _bash_inner(word) + "'"
    if not all(_printable(c, utf8) for c in word):
        return "$'" + _ansic_inner(word, utf8) + "'"
    return word


def _ash_word(word: str) -> str:
    """`word` as busybox ash's `set -x` prints a whole word: quoted unless every character is
    one of `+,-./0-9:@A-Z]^_a-z`; a word ending in `'` has no closing quote."""
    if all("+" <= c <= "z" and not (";" <= c <= "?") and c not in "`[\\" for c in word):
        return word
    return "'" + _ash_inner(word)[-1] + ("" if word.endswith("'") else "'")


class _Values:
    """The masked values of one build, compiled for searching; never empty."""

    def __init__(self, values: set[str]) -> None:
        # Longest first: Python's alternation takes the first alternative that matches, so this
        # makes every match the longest value occurring at its position.
        ordered = sorted(values, key=lambda s: (-len(s), s))
        self.count = len(ordered)
        self.longest = len(ordered[0])
        self.pattern = re.compile("|".join(map(re.escape, ordered)))
        self._by_first: dict[str, list[str]] = {}
        for value in ordered:
            self._by_first.setdefault(value[0], []).append(value)
        self._first = re.compile("[" + "".join(map(re.escape, self._by_first)) + "]")

    def open_starts(self, text: str) -> list[int]:
        """Positions among the last L-1 characters where the rest of `text` may begin a value."""
        starts = []
        for first in self._first.finditer(text, max(0, len(text) - self.longest + 1)):
            tail = text[first.start() :]
            if any(len(v) > len(tail) and v.startswith(tail) for v in self._by_first[first[0]]):
                starts.append(first.start())
        return starts


class Masker:
    """Incremental masking of one output stream; `finish()` ends it and makes it reusable."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = {f.replace("\0", NUL) for s in secrets if s for f in forms(s)}
        self._values = _Values(values) if values else None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that may still begin a masked value

    def __repr__(self) -> str:
        count = self._values.count if self._values else 0
        return f"Masker(<{count} values hidden>)"  # never show the values themselves

    def feed(self, data: bytes) -> str:
        """The masked text that is final once `data` has been appended to the stream."""
        return self._push(self._decoder.decode(data), final=False)

    def finish(self) -> str:
        """The rest of the masked text at the end of the stream; resets for a new stream."""
        text = self._push(self._decoder.decode(b"", final=True), final=True)
        self._decoder.reset()
        return text

    def mask_all(self, data: bytes) -> str:
        """The masked text of a whole stream at once (does not touch the streaming state)."""
        return self._mask(data.decode("utf-8", errors="replace").replace("\0", NUL))

    def _mask(self, text: str) -> str:
        return self._values.pattern.sub(MASK, text) if self._values else text

    def _push(self, decoded: str, *, final: bool) -> str:
        text = self._held + decoded.replace("\0", NUL)
        values = self._values
        starts = values.open_starts(text) if values and not final else []
        if values is None or not starts:
            self._held = ""
            return self._mask(text)
        out: list[str] = []
        pos = 0
        hold = starts[0]
        for match in values.pattern.finditer(text):
            # A match starting before the first open position is final: every alternative that
            # could win at its start, or at any position before it, was decided without
            # reaching the end of `text`.
            if match.start() >= hold:
                break
            out += (text[pos : match.start()], MASK)
            pos = match.end()
            hold = next((s for s in starts if s >= pos), len(text))
        out.append(text[pos:hold])
        self._held = text[hold:]
        return "".join(out)


def byte_length(text: str) -> int:
    """The length of `text` in UTF-8 bytes (EXT-d offsets count these)."""
    return len(text.encode("utf-8"))


def chunks(text: str, limit: int = CHUNK_LIMIT) -> list[str]:
    """`text` split into chunks of at most `limit` UTF-8 bytes, on character boundaries."""
    if limit < 4:
        raise ValueError("limit must be at least 4 bytes, the longest UTF-8 character")
    data = text.encode("utf-8")
    out: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + limit, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # a continuation byte
            end -= 1
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def char_boundary(data: bytes, offset: int) -> int:
    """`offset`, moved forward past UTF-8 continuation bytes to the next character start, so a
    client's byte offset inside a character never yields a broken chunk or a shifted id."""
    offset = max(0, min(offset, len(data)))
    while offset < len(data) and data[offset] & 0xC0 == 0x80:
        offset += 1
    return offset


# -- Stored output (docs/architecture.md §6.1, issue 10 part 6) --------------------------------

ROW_LIMIT = 1024 * 1024  # a finished job's output up to this many bytes stays in its row
EMBED_LIMIT = 1024 * 1024  # entities embed at most this many bytes of a job's output
DROP_LINE_MAX = 256  # bytes the drop line may take: the cap leaves room for it


@dataclass(frozen=True)
class Final:
    """A job's output as its runner stored it when the job ended: in the blob store
    (`blob_key`) or as `text` for the row. `head` and `tail` are the bytes kept before and
    after the drop line when the job printed more than builds.max_output, else None."""

    size: int  # bytes of the stored output
    printed: int  # bytes the job printed
    head: int | None = None
    tail: int | None = None
    blob_key: str | None = None
    text: str | None = None


def size_text(size: int) -> str:
    """`size` bytes for people: `512 B`, `3.5 KiB`, `136.0 MiB`, `2.1 GiB`."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} GiB"


def drop_line(dropped: int, printed: int) -> str:
    """The line that stands where output over builds.max_output was dropped."""
    line = (
        f"[marid: {size_text(dropped)} of output dropped here;"
        f" the job printed {size_text(printed)}]\n"
    )
    assert byte_length(line) <= DROP_LINE_MAX
    return line


def excerpt_line(shown: int, size: int, url: str) -> str:
    """The line that opens an embedded output cut to its last `shown` bytes of `size`."""
    return (
        f"[marid: {size_text(size - shown)} of this job's {size_text(size)} of output not"
        f" shown here; all of it: GET {url}]\n"
    )


def boundary_before(data: bytes, offset: int) -> int:
    """`offset`, moved back to the start of the character it falls in (0..len(data))."""
    offset = max(0, min(offset, len(data)))
    while 0 < offset < len(data) and data[offset] & 0xC0 == 0x80:
        offset -= 1
    return offset


class Capped:
    """Where each piece of one job's output goes when at most `max_output` bytes of it may be
    kept (builds.max_output, docs/architecture.md §6.1): its first half (the head) whole, then
    a window of the newest output. Offsets count the bytes the job printed, so live readers
    follow the newest output; the window's oldest chunks are forgotten as new ones arrive, so
    the head and the window never hold more than `max_output` less room for the drop line."""

    def __init__(self, max_output: int) -> None:
        self.head_max = max_output // 2
        self.window_max = max(0, max_output - self.head_max - DROP_LINE_MAX)
        self.printed = 0  # bytes placed so far: the next piece's offset
        self.head: int | None = None  # where the head ended, once output went past it
        self.head_newline = True  # whether the head ends a line
        self.window: list[tuple[int, int]] = []  # (start, end) of the chunks kept after it

    @property
    def dropped(self) -> int:
        """Bytes printed but kept neither in the head nor in the window."""
        if self.head is None:
            return 0
        return self.printed - self.head - self.tail

    @property
    def tail(self) -> int:
        return sum(end - start for start, end in self.window)

    def place(self, text: str) -> tuple[list[tuple[int, str]], tuple[int, int] | None]:
        """The chunks to store for `text`, as (offset, text), and the byte range whose stored
        chunks are to be forgotten (None: none)."""
        data = text.encode("utf-8")
        chunks: list[tuple[int, str]] = []
        if self.head is None:
            room = self.head_max - self.printed
            cut = len(data) if len(data) <= room else boundary_before(data, room)
            if cut:
                chunks.append((self.printed, data[:cut].decode("utf-8")))
                self.head_newline = data[cut - 1 : cut] == b"\n"
                self.printed += cut
            data = data[cut:]
            if not data:
                return chunks, None
            self.head = self.printed
        if len(data) > self.window_max:  # a piece longer than the window keeps its end
            skip = char_boundary(data, len(data) - self.window_max)
            self.printed += skip
            data = data[skip:]
        if data:
            chunks.append((self.printed, data.decode("utf-8")))
            self.window.append((self.printed, self.printed + len(data)))
            self.printed += len(data)
        keep_from = self.printed - self.window_max
        forgotten = [chunk for chunk in self.window if chunk[0] < keep_from]
        if not forgotten:
            return chunks, None
        self.window = self.window[len(forgotten) :]
        return chunks, (self.head, forgotten[-1][1])

    def drop_line(self) -> str:
        """The line between the head and the tail, on a line of its own."""
        return self.written().drop_line()

    def written(self) -> Written:
        """What was written of the job's output so far, for storing it once it ends."""
        return Written(self.printed, self.head, self.head_newline, self.tail)


@dataclass(frozen=True)
class Written:
    """A runner's account of one job's output when it ends (Capped.written): the bytes it
    printed, where the head ended (None: all of it was kept), whether the head ends a line,
    and the bytes of the window kept after it."""

    printed: int
    head: int | None = None
    head_newline: bool = True
    tail: int = 0

    @property
    def dropped(self) -> int:
        return 0 if self.head is None else self.printed - self.head - self.tail

    @property
    def rewritten(self) -> bool:
        """Whether the job's output is stored anew when it ends (cut, or too long for its
        row: marid/reports.py store_output), not joined in its row from its chunks."""
        return bool(self.dropped) or self.printed > ROW_LIMIT

    def drop_line(self) -> str:
        return ("" if self.head_newline else "\n") + drop_line(self.dropped, self.printed)

    def valid(self) -> bool:
        """Whether the account adds up (one sent over HTTP is checked before it is used)."""
        if self.printed < 0 or self.tail < 0:
            return False
        return self.head is None or (self.head >= 0 and self.head + self.tail <= self.printed)
