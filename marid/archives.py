"""Content checks for image uploads: qemu disks (docs/api.md §12.3), docker archives
(docs/manifest.md §9.2).

Uploaded archives are untrusted: nothing here extracts to disk, reads more than a capped
manifest into memory, or raises on a malformed file.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

QCOW2_MAGIC = b"QFI\xfb"
MANIFEST = "manifest.json"
MAX_MANIFEST_SIZE = 1024 * 1024
# `docker save` writes a few members per layer; this only bounds memory on a hostile tar.
MAX_MEMBERS = 100_000
_MAX_LINK_HOPS = 8


@dataclass(frozen=True)
class _Image:
    """One entry of manifest.json."""

    config: str
    repo_tags: list[str]
    layers: list[str]


def is_qcow2(head: bytes) -> bool:
    """Whether `head` (the first bytes of an upload) starts with the QCOW2 magic."""
    return head.startswith(QCOW2_MAGIC)


def is_docker_archive(path: Path) -> bool:
    """Whether `path` is an uncompressed `docker save` tar whose manifest.json checks out."""
    return _read_images(path) is not None


def docker_archive_tags(path: Path) -> list[str]:
    """The RepoTags of every image in a `docker save` tar; raises ValueError for other files."""
    images = _read_images(path)
    if images is None:
        raise ValueError(f"{path.name} is not a docker image archive")
    return [tag for image in images for tag in image.repo_tags]


def _read_images(path: Path) -> list[_Image] | None:
    # Mode "r:" refuses compressed tars: `docker save` does not compress, and listing a
    # compressed tar would mean decompressing all of it (a cheap decompression bomb).
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = _index(tar)
            raw = _read_manifest(tar, members.get(MANIFEST)) if members else None
    except (tarfile.TarError, OSError, EOFError):
        return None
    images = _parse_manifest(raw) if raw is not None else None
    if images is None or members is None:
        return None
    referenced = [name for image in images for name in (image.config, *image.layers)]
    if not all(_resolves_to_file(members, name) for name in referenced):
        return None
    return images


def _index(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo] | None:
    """Members by normalised name (the last one wins, as on extraction); None if any is unsafe."""
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        # An absolute or `..` name is a path-traversal attempt: no honest `docker save` writes one.
        parts = member.name.split("/")
        if count > MAX_MEMBERS or member.name.startswith("/") or ".." in parts:
            return None
        members[posixpath.normpath(member.name)] = member
    return members


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> bytes | None:
    if member is None or not member.isfile() or member.size > MAX_MANIFEST_SIZE:
        return None
    stream = tar.extractfile(member)
    if stream is None:
        return None
    with stream:
        return stream.read(MAX_MANIFEST_SIZE + 1)


def _parse_manifest(raw: bytes) -> list[_Image] | None:
    try:
        data = json.loads(raw)
    # ValueError covers bad JSON and bad UTF-8; RecursionError a deeply nested document.
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, list) or not data:
        return None
    images: list[_Image] = []
    for entry in data:
        image = _parse_image(entry)
        if image is None:
            return None
        images.append(image)
    return images


def _parse_image(entry: object) -> _Image | None:
    if not isinstance(entry, dict):
        return None
    config, tags, layers = entry.get("Config"), entry.get("RepoTags"), entry.get("Layers")
    # RepoTags is null for an image saved by ID.
    if isinstance(config, str) and _is_str_list(layers) and (tags is None or _is_str_list(tags)):
        return _Image(config=config, repo_tags=tags or [], layers=layers)
    return None


def _is_str_list(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _resolves_to_file(members: dict[str, tarfile.TarInfo], name: str) -> bool:
    # Older `docker save` output links a repeated layer to its first copy, so links are followed.
    # Member names never leave the root (see _index), so a target that does matches nothing.
    current = posixpath.normpath(name)
    for _ in range(_MAX_LINK_HOPS):
        member = members.get(current)
        if member is None:
            return False
        if member.isfile():
            return True
        if member.issym():
            target = posixpath.join(posixpath.dirname(current), member.linkname)
            current = posixpath.normpath(target)
        elif member.islnk():
            current = posixpath.normpath(member.linkname)
        else:
            return False
    return False
