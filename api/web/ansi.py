"""Terminal output as HTML (docs/web.md §3.3): ANSI SGR colours and styles become classes
(the Content Security Policy allows no inline style), every other escape sequence is dropped,
a carriage return starts its line over as a terminal would, and everything is escaped.
api/web/static/log.js does the same for the lines that arrive live."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from html import escape

# CSI (parameter, intermediate and final bytes), OSC ... BEL/ST, and two-byte escapes.
_ESCAPE = re.compile(r"\x1b(?:\[([0-?]*)[ -/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Style:
    fg: int | None = None  # 0-15
    bg: int | None = None
    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False

    def css(self) -> str:
        names = []
        if self.fg is not None:
            names.append(f"fg{self.fg}")
        if self.bg is not None:
            names.append(f"bg{self.bg}")
        names += [n for n, on in (("b", self.bold), ("d", self.dim), ("i", self.italic),
                                  ("u", self.underline)) if on]  # fmt: skip
        return " ".join(names)


def _color_256(n: int) -> int | None:
    """The 16-colour index nearest to xterm colour `n` (only 0-15 map exactly)."""
    if n < 16:
        return n
    if n >= 232:  # greys
        return 0 if n < 238 else 8 if n < 250 else 7
    n -= 16
    r, g, b = n // 36, (n // 6) % 6, n % 6
    bright = max(r, g, b) >= 4
    index = (1 if r >= 2 else 0) | (2 if g >= 2 else 0) | (4 if b >= 2 else 0)
    return index + (8 if bright else 0)


def _rgb(r: int, g: int, b: int) -> int:
    index = (1 if r >= 128 else 0) | (2 if g >= 128 else 0) | (4 if b >= 128 else 0)
    return index + (8 if max(r, g, b) >= 200 else 0)


def apply(style: Style, params: str) -> Style:
    """`style` after the SGR sequence ESC [ params m."""
    codes = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else [0]
    i = 0
    while i < len(codes):
        code = codes[i]
        if code == 0:
            style = Style()
        elif code == 1:
            style = replace(style, bold=True)
        elif code == 2:
            style = replace(style, dim=True)
        elif code == 3:
            style = replace(style, italic=True)
        elif code == 4:
            style = replace(style, underline=True)
        elif code == 22:
            style = replace(style, bold=False, dim=False)
        elif code == 23:
            style = replace(style, italic=False)
        elif code == 24:
            style = replace(style, underline=False)
        elif 30 <= code <= 37:
            style = replace(style, fg=code - 30)
        elif 90 <= code <= 97:
            style = replace(style, fg=code - 90 + 8)
        elif 40 <= code <= 47:
            style = replace(style, bg=code - 40)
        elif 100 <= code <= 107:
            style = replace(style, bg=code - 100 + 8)
        elif code == 39:
            style = replace(style, fg=None)
        elif code == 49:
            style = replace(style, bg=None)
        elif code in (38, 48) and i + 1 < len(codes):
            color: int | None = None
            if codes[i + 1] == 5 and i + 2 < len(codes):
                color, i = _color_256(codes[i + 2]), i + 2
            elif codes[i + 1] == 2 and i + 4 < len(codes):
                color, i = _rgb(*codes[i + 2 : i + 5]), i + 4
            style = replace(style, fg=color) if code == 38 else replace(style, bg=color)
        i += 1
    return style


def render_line(line: str, style: Style) -> tuple[str, Style]:
    """One line (no newline) as HTML, and the style in force at its end."""
    if "\r" in line.rstrip("\r"):  # a progress bar: what the terminal shows last
        line = line.rstrip("\r").rsplit("\r", 1)[1]
    line = line.replace("\r", "")
    out: list[str] = []
    position = 0

    def text(piece: str) -> None:
        piece = _CONTROL.sub("", piece)
        if not piece:
            return
        css = style.css()
        out.append(f'<span class="{css}">{escape(piece)}</span>' if css else escape(piece))

    for match in _ESCAPE.finditer(line):
        text(line[position : match.start()])
        if match.group(2) == "m":
            style = apply(style, match.group(1) or "")
        position = match.end()
    text(line[position:])
    return "".join(out), style


def render(text: str) -> list[str]:
    """Each line of `text` as HTML (a last line without its newline included)."""
    style = Style()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rendered = []
    for line in lines:
        html, style = render_line(line, style)
        rendered.append(html)
    return rendered
