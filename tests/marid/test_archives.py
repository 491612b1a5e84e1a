import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from marid import archives
from marid.archives import MAX_MANIFEST_SIZE, docker_archive_tags, is_docker_archive, is_qcow2

CONFIG = "0b2f1a.json"
LAYER = "5d1e7c/layer.tar"
MANIFEST = [{"Config": CONFIG, "RepoTags": ["alpine:3.19"], "Layers": [LAYER]}]


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def manifest_bytes(manifest: Any) -> bytes:
    return json.dumps(manifest).encode()


def docker_tar(
    path: Path,
    manifest: bytes | None = None,
    extra: dict[str, bytes] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """A tar laid out like legacy `docker save` output; `skip` leaves named members out."""
    files = {
        CONFIG: b'{"architecture": "amd64"}',
        "5d1e7c/VERSION": b"1.0",
        "5d1e7c/json": b"{}",
        LAYER: b"\x00" * 2048,
        "repositories": b'{"alpine": {"3.19": "5d1e7c"}}',
        "manifest.json": manifest if manifest is not None else manifest_bytes(MANIFEST),
        **(extra or {}),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            if name not in skip:
                add_file(tar, name, data)
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return docker_tar(tmp_path / "image.tar")


def test_docker_save_archive_is_valid(archive: Path) -> None:
    assert is_docker_archive(archive)
    assert docker_archive_tags(archive) == ["alpine:3.19"]


def test_oci_layout_archive_with_several_images(tmp_path: Path) -> None:
    # Docker 25+ writes content-addressed blobs and still a top-level manifest.json.
    cfg_a, cfg_b, layer = "blobs/sha256/aa", "blobs/sha256/bb", "blobs/sha256/cc"
    manifest = [
        {"Config": cfg_a, "RepoTags": ["app:1", "app:latest"], "Layers": [layer]},
        {"Config": cfg_b, "RepoTags": None, "Layers": [layer], "LayerSources": {}},
        {"Config": cfg_a, "RepoTags": ["scratch:empty"], "Layers": []},
    ]
    path = tmp_path / "oci.tar"
    with tarfile.open(path, "w") as tar:
        add_dir(tar, "blobs")
        for name in (cfg_a, cfg_b, layer, "index.json", "oci-layout"):
            add_file(tar, name, b"{}")
        add_file(tar, "manifest.json", manifest_bytes(manifest))
    assert is_docker_archive(path)
    assert docker_archive_tags(path) == ["app:1", "app:latest", "scratch:empty"]


def test_dot_slash_member_names_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dot.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "./" + CONFIG, b"{}")
        add_file(tar, "./" + LAYER, b"layer")
        add_file(tar, "./manifest.json", manifest_bytes(MANIFEST))
    assert is_docker_archive(path)


def test_archive_without_manifest_is_invalid(tmp_path: Path) -> None:
    path = docker_tar(tmp_path / "image.tar", skip=("manifest.json",))
    assert not is_docker_archive(path)
    with pytest.raises(ValueError, match="not a docker image archive"):
        docker_archive_tags(path)


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        b"\xff\xfe[]",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to overflow the JSON parser
        manifest_bytes({"Config": CONFIG, "Layers": [LAYER]}),
        manifest_bytes([]),
        manifest_bytes([1]),
        manifest_bytes([{"RepoTags": ["a:b"], "Layers": [LAYER]}]),
        manifest_bytes([{"Config": 1, "RepoTags": ["a:b"], "Layers": [LAYER]}]),
        manifest_bytes([{"Config": CONFIG, "RepoTags": "alpine:3.19", "Layers": [LAYER]}]),
        manifest_bytes([{"Config": CONFIG, "RepoTags": [3], "Layers": [LAYER]}]),
        manifest_bytes([{"Config": CONFIG, "RepoTags": ["a:b"]}]),
        manifest_bytes([{"Config": CONFIG, "RepoTags": ["a:b"], "Layers": LAYER}]),
        manifest_bytes([{"Config": CONFIG, "RepoTags": ["a:b"], "Layers": [None]}]),
        manifest_bytes([*MANIFEST, "extra"]),
    ],
)
def test_malformed_manifest_is_invalid(tmp_path: Path, manifest: bytes) -> None:
    assert not is_docker_archive(docker_tar(tmp_path / "image.tar", manifest=manifest))


@pytest.mark.parametrize("missing", [LAYER, CONFIG])
def test_manifest_referencing_a_missing_file_is_invalid(tmp_path: Path, missing: str) -> None:
    assert not is_docker_archive(docker_tar(tmp_path / "image.tar", skip=(missing,)))


def test_manifest_is_read_up_to_one_mebibyte(tmp_path: Path) -> None:
    body = manifest_bytes(MANIFEST)
    fits = body + b" " * (MAX_MANIFEST_SIZE - len(body))
    assert is_docker_archive(docker_tar(tmp_path / "fits.tar", manifest=fits))
    too_big = fits + b" "
    assert not is_docker_archive(docker_tar(tmp_path / "big.tar", manifest=too_big))


def test_the_last_manifest_wins_as_on_extraction(tmp_path: Path) -> None:
    path = tmp_path / "twice.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, CONFIG, b"{}")
        add_file(tar, LAYER, b"layer")
        add_file(tar, "manifest.json", b"garbage")
        add_file(tar, "manifest.json", manifest_bytes(MANIFEST))
    assert is_docker_archive(path)
    with tarfile.open(path, "a") as tar:
        add_file(tar, "manifest.json", b"garbage")
    assert not is_docker_archive(path)


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "../evil", "5d1e7c/../../evil", "a/.."])
def test_absolute_or_dotdot_member_names_make_it_invalid(tmp_path: Path, name: str) -> None:
    path = docker_tar(tmp_path / "image.tar", extra={name: b"payload"})
    assert not is_docker_archive(path)


def test_manifest_that_is_not_a_regular_file_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, CONFIG, b"{}")
        add_file(tar, LAYER, b"layer")
        add_file(tar, "real.json", manifest_bytes(MANIFEST))
        add_link(tar, "manifest.json", "real.json")
    assert not is_docker_archive(path)


def link_archive(path: Path, kind: bytes, target: str) -> Path:
    """Layer 2 of the manifest is a link to `target`, as older `docker save` writes for repeats."""
    second = "9a8b7c/layer.tar"
    manifest = [{"Config": CONFIG, "RepoTags": ["a:b"], "Layers": [LAYER, second]}]
    with tarfile.open(path, "w") as tar:
        add_file(tar, CONFIG, b"{}")
        add_file(tar, LAYER, b"layer")
        add_dir(tar, "9a8b7c")
        add_link(tar, second, target, kind)
        add_file(tar, "manifest.json", manifest_bytes(manifest))
    return path


@pytest.mark.parametrize(
    ("kind", "target", "valid"),
    [
        (tarfile.SYMTYPE, "../5d1e7c/layer.tar", True),
        (tarfile.LNKTYPE, LAYER, True),
        (tarfile.SYMTYPE, "../../etc/passwd", False),
        (tarfile.SYMTYPE, "/etc/passwd", False),
        (tarfile.SYMTYPE, "layer.tar", False),  # points at itself
        (tarfile.SYMTYPE, "../5d1e7c", False),  # a directory
        (tarfile.LNKTYPE, "nowhere/layer.tar", False),
    ],
)
def test_layers_may_be_links_within_the_archive(
    tmp_path: Path, kind: bytes, target: str, valid: bool
) -> None:
    assert is_docker_archive(link_archive(tmp_path / "links.tar", kind, target)) is valid


def test_layer_that_is_a_directory_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "dir.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, CONFIG, b"{}")
        add_dir(tar, LAYER)
        add_file(tar, "manifest.json", manifest_bytes(MANIFEST))
    assert not is_docker_archive(path)


def test_too_many_members_is_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = docker_tar(tmp_path / "image.tar")  # 6 members
    monkeypatch.setattr(archives, "MAX_MEMBERS", 6)
    assert is_docker_archive(path)
    monkeypatch.setattr(archives, "MAX_MEMBERS", 5)
    assert not is_docker_archive(path)


def test_truncated_archive_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, "manifest.json", manifest_bytes(MANIFEST))
        add_file(tar, CONFIG, b"{}")
        add_file(tar, LAYER, b"\x01" * 4096)
    assert is_docker_archive(path)
    data = path.read_bytes()
    # Cut inside the last layer's data: every header is still there, its content is not.
    path.write_bytes(data[: data.index(b"\x01" * 4096) + 1000])
    assert not is_docker_archive(path)


def test_gzipped_docker_archive_is_invalid(archive: Path, tmp_path: Path) -> None:
    compressed = tmp_path / "image.tar.gz"
    compressed.write_bytes(gzip.compress(archive.read_bytes()))
    assert not is_docker_archive(compressed)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"QFI\xfb" + b"\x00" * 1020, b"\x00" * 10240, gzip.compress(b"x")],
)
def test_files_that_are_not_tar_archives_are_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "upload"
    path.write_bytes(content)
    assert not is_docker_archive(path)


def test_missing_path_or_directory_is_invalid(tmp_path: Path) -> None:
    assert not is_docker_archive(tmp_path / "nope.tar")
    assert not is_docker_archive(tmp_path)


def test_nothing_is_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = docker_tar(tmp_path / "image.tar")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert is_docker_archive(path)
    docker_archive_tags(path)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"QFI\xfb\x00\x00\x00\x03", True),
        (b"QFI\xfb", True),
        (b"QFI", False),
        (b"", False),
        (b"qfi\xfb\x00\x00\x00\x03", False),
        (b"\x00QFI\xfb", False),
    ],
)
def test_is_qcow2(head: bytes, expected: bool) -> None:
    assert is_qcow2(head) is expected
