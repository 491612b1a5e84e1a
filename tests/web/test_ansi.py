"""api/web/ansi.py: terminal output as HTML lines (docs/web.md §3.3)."""

from __future__ import annotations

import pytest

from marid.api.web import ansi


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("plain\n", ["plain"]),
        ("\x1b[31mred\x1b[0m plain\n", ['<span class="fg1">red</span> plain']),
        ("\x1b[1;92mbold green\x1b[m\n", ['<span class="fg10 b">bold green</span>']),
        ("\x1b[38;5;196mx\x1b[38;5;244my\x1b[48;5;21mz\n",
         ['<span class="fg9">x</span><span class="fg8">y</span><span class="fg8 bg12">z</span>']),
        ("\x1b[38;2;255;255;255mwhite\x1b[39m.\n", ['<span class="fg15">white</span>.']),
        ("\x1b[4munder\x1b[24m \x1b[3mit\x1b[23m\n",
         ['<span class="u">under</span> <span class="i">it</span>']),
        ("<b>&\"'\n", ["&lt;b&gt;&amp;&quot;&#x27;"]),
        ("10%\r50%\r100%\n", ["100%"]),
        ("line\r\n", ["line"]),
        ("\x1b]0;title\x07\x1b[2K\x1b[1Gok\x07\x00\n", ["ok"]),
        ("\x1b[33mspans\nlines\x1b[0m\nreset\n",
         ['<span class="fg3">spans</span>', '<span class="fg3">lines</span>', "reset"]),
        ("no newline", ["no newline"]),
        ("a\n\nb\n", ["a", "", "b"]),
    ],
)  # fmt: skip
def test_lines_render_as_html(text: str, lines: list[str]) -> None:
    assert ansi.render(text) == lines


def test_a_malformed_sequence_is_dropped_and_never_breaks_out_of_the_markup() -> None:
    assert ansi.render("\x1b[38;5mx\x1b[99;;mq\x1b[<script>\n") == ["xqcript&gt;"]
    assert ansi.render("\x1b<b>\n") == ["&lt;b&gt;"]
