"""MIME type sniffing for objects (docs/api.md §14.1 `type`).

A port of Go's `net/http.DetectContentType` (src/net/http/sniff.go, the WHATWG MIME Sniffing
algorithm as Go implements it). Djinn CI stores that function's output, so the signature table,
its order and the returned strings must stay exactly as Go has them, quirks included: e.g. only
HTML and XML signatures skip leading whitespace, an HTML tag must be followed by a space or `>`,
and a BOM only counts when at least 4 bytes are present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

SNIFF_LEN = 512
FALLBACK = "application/octet-stream"

_WHITESPACE = b"\t\n\x0c\r "  # 0xWS in the WHATWG spec
_TAG_TERMINATORS = b" >"  # 0xTT in the WHATWG spec
# Bytes that make a resource binary (WHATWG "binary data byte").
_BINARY_BYTE = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")


class _Signature(Protocol):
    def match(self, data: bytes, first_non_ws: int) -> str | None: ...


@dataclass(frozen=True)
class _Exact:
    """A fixed prefix at offset 0 (Go's exactSig does not skip whitespace)."""

    prefix: bytes
    content_type: str

    def match(self, data: bytes, first_non_ws: int) -> str | None:
        return self.content_type if data.startswith(self.prefix) else None


@dataclass(frozen=True)
class _Masked:
    """`data[i] & mask[i] == pattern[i]` for every i, optionally after leading whitespace."""

    mask: bytes
    pattern: bytes
    content_type: str
    skip_ws: bool = False

    def __post_init__(self) -> None:
        # Go silently never matches on a length mismatch; fail loudly at import instead.
        if len(self.mask) != len(self.pattern):
            raise ValueError(f"mask and pattern differ in length for {self.content_type}")

    def match(self, data: bytes, first_non_ws: int) -> str | None:
        start = first_non_ws if self.skip_ws else 0
        window = data[start : start + len(self.pattern)]
        if len(window) < len(self.pattern):
            return None
        if all(b & m == p for b, m, p in zip(window, self.mask, self.pattern, strict=True)):
            return self.content_type
        return None


@dataclass(frozen=True)
class _Html:
    """A case-insensitive tag after leading whitespace, followed by a space or `>`."""

    tag: bytes

    def match(self, data: bytes, first_non_ws: int) -> str | None:
        data = data[first_non_ws:]
        if len(data) < len(self.tag) + 1:
            return None
        for want, got in zip(self.tag, data, strict=False):
            if ord("A") <= want <= ord("Z"):
                got &= 0xDF  # ASCII upper-casing, exactly as Go does it
            if want != got:
                return None
        if data[len(self.tag)] not in _TAG_TERMINATORS:
            return None
        return "text/html; charset=utf-8"


class _Mp4:
    """An ISO BMFF `ftyp` box whose major or a compatible brand starts with `mp4`."""

    def match(self, data: bytes, first_non_ws: int) -> str | None:
        if len(data) < 12:
            return None
        box_size = int.from_bytes(data[:4], "big")
        if len(data) < box_size or box_size % 4 != 0:
            return None
        if data[4:8] != b"ftyp":
            return None
        for start in range(8, box_size, 4):
            if start == 12:
                continue  # the minor version, not a brand
            if data[start : start + 3] == b"mp4":
                return "video/mp4"
        return None


class _Text:
    """No binary data byte after leading whitespace. Must be the last signature."""

    def match(self, data: bytes, first_non_ws: int) -> str | None:
        if _BINARY_BYTE.search(data, first_non_ws):
            return None
        return "text/plain; charset=utf-8"


_HTML_TAGS = (
    b"<!DOCTYPE HTML",
    b"<HTML",
    b"<HEAD",
    b"<SCRIPT",
    b"<IFRAME",
    b"<H1",
    b"<DIV",
    b"<FONT",
    b"<TABLE",
    b"<A",
    b"<STYLE",
    b"<TITLE",
    b"<B",
    b"<BODY",
    b"<BR",
    b"<P",
    b"<!--",
)

_RIFF_MASK = b"\xff\xff\xff\xff\x00\x00\x00\x00\xff\xff\xff\xff"

# Order matters: the first match wins (Go's sniffSignatures).
_SIGNATURES: tuple[_Signature, ...] = (
    *(_Html(tag) for tag in _HTML_TAGS),
    _Masked(b"\xff" * 5, b"<?xml", "text/xml; charset=utf-8", skip_ws=True),
    _Exact(b"%PDF-", "application/pdf"),
    _Exact(b"%!PS-Adobe-", "application/postscript"),
    # UTF byte order marks.
    _Masked(b"\xff\xff\x00\x00", b"\xfe\xff\x00\x00", "text/plain; charset=utf-16be"),
    _Masked(b"\xff\xff\x00\x00", b"\xff\xfe\x00\x00", "text/plain; charset=utf-16le"),
    _Masked(b"\xff\xff\xff\x00", b"\xef\xbb\xbf\x00", "text/plain; charset=utf-8"),
    # Images.
    _Exact(b"\x00\x00\x01\x00", "image/x-icon"),
    _Exact(b"\x00\x00\x02\x00", "image/x-icon"),
    _Exact(b"BM", "image/bmp"),
    _Exact(b"GIF87a", "image/gif"),
    _Exact(b"GIF89a", "image/gif"),
    _Masked(_RIFF_MASK + b"\xff\xff", b"RIFF\x00\x00\x00\x00WEBPVP", "image/webp"),
    _Exact(b"\x89PNG\r\n\x1a\n", "image/png"),
    _Exact(b"\xff\xd8\xff", "image/jpeg"),
    # Audio and video, in the order the WHATWG spec prescribes.
    _Masked(_RIFF_MASK, b"FORM\x00\x00\x00\x00AIFF", "audio/aiff"),
    _Masked(b"\xff\xff\xff", b"ID3", "audio/mpeg"),
    _Masked(b"\xff" * 5, b"OggS\x00", "application/ogg"),
    _Masked(b"\xff" * 8, b"MThd\x00\x00\x00\x06", "audio/midi"),
    _Masked(_RIFF_MASK, b"RIFF\x00\x00\x00\x00AVI ", "video/avi"),
    _Masked(_RIFF_MASK, b"RIFF\x00\x00\x00\x00WAVE", "audio/wave"),
    _Mp4(),
    _Exact(b"\x1a\x45\xdf\xa3", "video/webm"),
    # Fonts. Embedded OpenType: any 34 bytes, then "LP".
    _Masked(b"\x00" * 34 + b"\xff\xff", b"\x00" * 34 + b"LP", "application/vnd.ms-fontobject"),
    _Exact(b"\x00\x01\x00\x00", "font/ttf"),
    _Exact(b"OTTO", "font/otf"),
    _Exact(b"ttcf", "font/collection"),
    _Exact(b"wOFF", "font/woff"),
    _Exact(b"wOF2", "font/woff2"),
    # Archives. RAR follows RAR Labs' signatures rather than the spec's (whatwg/mimesniff#63).
    _Exact(b"\x1f\x8b\x08", "application/x-gzip"),
    _Exact(b"PK\x03\x04", "application/zip"),
    _Exact(b"Rar!\x1a\x07\x00", "application/x-rar-compressed"),
    _Exact(b"Rar!\x1a\x07\x01\x00", "application/x-rar-compressed"),
    _Exact(b"\x00asm", "application/wasm"),
    _Text(),
)


def detect(data: bytes) -> str:
    """The MIME type Go's `http.DetectContentType` gives `data` (only the first 512 bytes count)."""
    head = bytes(data[:SNIFF_LEN])
    first_non_ws = len(head) - len(head.lstrip(_WHITESPACE))
    for signature in _SIGNATURES:
        content_type = signature.match(head, first_non_ws)
        if content_type is not None:
            return content_type
    return FALLBACK
