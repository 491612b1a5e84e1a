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

Values without an `x` never appear in the output. One with an `x` can be formed by a `xxxxxx`
and the text after it: values `abc` and `xa` turn `abca` into `xxxxxxa`.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

MASK = "xxxxxx"
NUL = "NUL"
CHUNK_LIMIT = 65536  # docs/api.md §19: an SSE output chunk is at most 64 KiB


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
        values = {s.replace("\0", NUL) for s in secrets if s}
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
