"""One way to reach bytes: URIs (``s3://bucket/key`` or local paths) through fsspec.

Every read and write in the project goes through here, so local folders and object
storage behave the same. Writes are atomic: a reader never sees a half-written file
(local files are written aside and renamed; an S3 PUT is atomic by itself).
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Iterator

import fsspec

S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
DRIVE = re.compile(r"^[A-Za-z]:")  # C: - on Windows, joining it drops everything before it


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI; S3 honours ``AWS_ENDPOINT_URL``."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get(S3_ENDPOINT_ENV)
        fs = fsspec.filesystem(
            "s3", client_kwargs={"endpoint_url": endpoint} if endpoint else {}
        )
        return fs, uri[len("s3://") :].rstrip("/") if uri != "s3://" else ""
    if is_remote(uri):
        protocol, path = uri.split("://", 1)
        return fsspec.filesystem(protocol), path
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def normalize(uri: str) -> str:
    """Canonical spelling: absolute local paths, ``s3://bucket/key`` without a trailing slash."""
    fs, path = filesystem(uri)
    return unstrip(fs, path)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`filesystem`: a path inside ``fs`` back to a URI."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols else f"{protocols[0]}://{path}"


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def relative_to(uri: str, root: str) -> str:
    """Path of ``uri`` below ``root`` with '/' separators (both canonical)."""
    uri, root = normalize(uri), normalize(root)
    if not is_inside(uri, root):
        raise ValueError(f"{uri} is not inside {root}")
    return uri[len(root) :].lstrip("/").replace(os.sep, "/")


class UnsafePathError(ValueError):
    """A relative name that would resolve outside the folder it is joined to."""


def child(root: str, relpath: str) -> str:
    """``root/relpath``, proven to stay inside ``root`` on local disks and object stores alike.

    Names come from outside (manifests, S3 keys, which are literal and may hold ``..``), so
    they are refused, never repaired: a repaired name could land on another input's output.
    Both separators count, as a key written here may later be copied to a Windows disk.
    """
    segments = relpath.replace("\\", "/").split("/")
    if relpath.startswith(("/", "\\")):
        raise UnsafePathError(f"{relpath!r} is absolute")
    if ".." in segments:
        raise UnsafePathError(f"{relpath!r} has a '..' segment")
    if any(DRIVE.match(segment) for segment in segments):
        raise UnsafePathError(f"{relpath!r} has a drive segment")
    return join(root, relpath)


def is_inside(uri: str, root: str) -> bool:
    uri, root = normalize(uri), normalize(root)
    return uri == root or uri.startswith(root.rstrip("/") + "/")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def list_files(root: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Every file below ``root`` (recursive, sorted), optionally filtered by extension.

    Only names are held in memory; the bytes are read later, by the workers.
    """
    fs, path = filesystem(root)
    if fs.isfile(path):
        files = [path]
    else:
        files = fs.find(path)
    out = []
    for f in files:
        name = posixpath.basename(f)
        if name.startswith("."):
            continue  # our own in-flight temporaries and hidden files
        if extensions and not name.lower().endswith(extensions):
            continue
        out.append(unstrip(fs, f))
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: local files go to a hidden sibling first, then are renamed."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)  # a single PUT: visible whole or not at all
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def remove(uri: str) -> None:
    """Delete a file or a whole folder (recursively)."""
    fs, path = filesystem(uri)
    fs.rm(path, recursive=True)


def download_dir(uri: str, local_dir: str) -> str:
    """Copy a remote folder (a model preset) into ``local_dir``; returns ``local_dir``."""
    fs, path = filesystem(uri)
    tmp = f"{local_dir}.{uuid.uuid4().hex}.partial"
    fs.get(path.rstrip("/") + "/", tmp, recursive=True)
    if os.path.exists(local_dir):  # another process finished first
        fsspec.filesystem("file").rm(tmp, recursive=True)
    else:
        os.replace(tmp, local_dir)
    return local_dir


def upload_dir(local_dir: str, uri: str) -> None:
    fs, path = filesystem(uri)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(uri, rel), f.read())


def iter_lines(uri: str) -> Iterator[str]:
    fs, path = filesystem(uri)
    with fs.open(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line
