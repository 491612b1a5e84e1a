import pytest

from marid import mime

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

# Expected values are what Go's net/http.DetectContentType returns; many rows come from Go's own
# sniff_test.go so the port can be checked against the reference implementation's table.
CASES = [
    # Text and markup.
    (b"", TEXT),
    (b"\x01\x02\x03", BINARY),
    (b"<HtMl><bOdY>blah blah blah</body></html>", HTML),
    (b"<HTML></HTML>", HTML),
    (b"   <!DOCTYPE HTML>...", HTML),
    (b"\r\n<html>...", HTML),
    (b"\t\x0c <p>para</p>", HTML),
    (b"<!-- comment -->", HTML),
    (b"<br>", HTML),
    ("This is not HTML. It has ☃ though.".encode(), TEXT),
    (b"\n<?xml!", "text/xml; charset=utf-8"),
    (b'<?xml version="1.0"?><a/>', "text/xml; charset=utf-8"),
    (b"%PDF-1.7\n", "application/pdf"),
    (b"%!PS-Adobe-3.0\n", "application/postscript"),
    (b"\xfe\xff\x00h", "text/plain; charset=utf-16be"),
    (b"\xff\xfeh\x00", "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbfhello", TEXT),
    # Images.
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"\x00\x00\x02\x00", "image/x-icon"),
    (b"BM...", "image/bmp"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a...", "image/gif"),
    (b"RIFF\x00\x00\x00\x00WEBPVP", "image/webp"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
    # Audio and video.
    (b"MThd\x00\x00\x00\x06\x00\x01", "audio/midi"),
    (b"ID3\x03\x00\x00\x00\x00\x0f", "audio/mpeg"),
    (b"RIFFb\xb8\x00\x00WAVEfmt \x12\x00\x00\x00\x06", "audio/wave"),
    (b"RIFF,\x00\x00\x00WAVEfmt \x12\x00\x00\x00\x06", "audio/wave"),
    (
        b"FORM\x00\x00\x00\x00AIFFCOMM\x00\x00\x00\x12\x00\x01\x00\x00\x57\x55\x00\x10\x40\x0d",
        "audio/aiff",
    ),
    (b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x7e\x46\x00\x00", "application/ogg"),
    (b"owow\x00", BINARY),
    (b"oooS\x00", BINARY),
    (b"oggS\x00", BINARY),
    (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom<\x06t\xbfmdat", "video/mp4"),
    (b"RIFF,O\n\x00AVI LIST\xc0", "video/avi"),
    (b"RIFF,\n\x00\x00AVI LIST\xc0", "video/avi"),
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81", "video/webm"),
    # Go dropped the audio/basic (".snd") signature along with the WHATWG spec.
    (b".snd\x00\x00\x00\x18\x00\x00\x00\x00", BINARY),
    # Fonts.
    (b"\x00" * 34 + b"LP\x00\x00", "application/vnd.ms-fontobject"),
    (b"\x00\x01\x00\x00\x00\x17\x01\x00\x00\x04\x01\x60\x4f", "font/ttf"),
    (b"OTTO\x00\x0e\x00\x80\x00\x03\x00\x60BASE", "font/otf"),
    (b"ttcf\x00\x01\x00\x00", "font/collection"),
    (b"wOFF\x00\x01\x00\x00\x00\x00\x30\x54\x00\x0d\x00\x00", "font/woff"),
    (b"wOF2\x00\x01\x00\x00\x00", "font/woff2"),
    # Archives and code.
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "application/x-gzip"),
    (b"PK\x03\x04\x14\x00\x00\x00", "application/zip"),
    (b"Rar!\x1a\x07\x00", "application/x-rar-compressed"),
    (b"Rar!\x1a\x07\x01\x00", "application/x-rar-compressed"),
    (b"Rar \x1a\x07\x00", BINARY),
    (b"Rar \x1a\x07\x01\x00", BINARY),
    (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
    (b"7z\xbc\xaf\x27\x1c\x00\x04", BINARY),  # not in Go's table
]


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_detect_matches_go(data: bytes, expected: str) -> None:
    assert mime.detect(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"<html",  # a tag needs one more byte after it
        b"<html\n>",  # and that byte must be a space or ">", not other whitespace
        b"<!DOCTYPE html\n PUBLIC",
        b"<htmlx>",
        b"<?xm",  # the XML pattern needs all 5 bytes
    ],
)
def test_markup_without_a_tag_terminator_is_plain_text(data: bytes) -> None:
    assert mime.detect(data) == TEXT


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\n%PDF-1.7", TEXT),
        (b" GIF89a", TEXT),
        (b"\t\x89PNG\r\n\x1a\n", BINARY),
    ],
)
def test_binary_signatures_do_not_skip_leading_whitespace(data: bytes, expected: str) -> None:
    # Only the HTML and XML signatures skip whitespace in Go; the rest fall to the text check.
    assert mime.detect(data) == expected


def test_a_bom_needs_four_bytes() -> None:
    # Go's BOM patterns are 4 bytes long with a zero mask at the end, so a bare BOM is too short.
    assert mime.detect(b"\xfe\xff") == TEXT
    assert mime.detect(b"\xfe\xff\x00") == BINARY


def test_embedded_opentype_matches_any_34_bytes_before_lp() -> None:
    # Go issue 77172: the EOT mask ignores the first 34 bytes, so this prose is a "font".
    text = b"Hello!! Do you wanna learn about NLP?"
    assert mime.detect(text) == "application/vnd.ms-fontobject"
    assert mime.detect(text.lower()) == TEXT


def test_mp4_needs_a_whole_box_with_an_mp4_brand() -> None:
    box = b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isomavc1"
    assert mime.detect(box) == BINARY
    # The brand at offset 12 is the minor version and never counts.
    minor = b"\x00\x00\x00\x10ftypisommp41"
    assert mime.detect(minor) == BINARY
    # The box must fit in the data and its size be a multiple of 4.
    body = b"ftypmp42\x00\x00\x00\x00mp42isom"
    assert mime.detect(b"\x00\x00\x00\x18" + body) == "video/mp4"
    assert mime.detect(b"\x00\x00\x00\x20" + body) == BINARY
    assert mime.detect(b"\x00\x00\x00\x17" + body) == BINARY


def test_only_the_first_512_bytes_are_considered() -> None:
    assert mime.detect(b"a" * 512 + b"\x00") == TEXT
    assert mime.detect(b"a" * 511 + b"\x00") == BINARY


def test_whitespace_only_is_plain_text() -> None:
    assert mime.detect(b" \t\r\n\x0c" * 200) == TEXT


def test_vertical_tab_is_binary_but_escape_is_not() -> None:
    # 0x0B is a binary data byte while 0x1B (ESC, ANSI colours in logs) is allowed.
    assert mime.detect(b"line\x0bline") == BINARY
    assert mime.detect(b"\x1b[31mred\x1b[0m") == TEXT
