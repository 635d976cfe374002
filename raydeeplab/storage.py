"""One way to reach bytes: URIs (``s3://bucket/key`` or local paths) through fsspec.

Every read and write in the project goes through here, so local folders and object
storage behave the same. Writes are atomic: a reader never sees a half-written file
(local files are written aside and renamed; an S3 PUT is atomic by itself).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import posixpath
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

import fsspec
import pyarrow
import pyarrow.fs

from raydeeplab.errors import UserError, cause_text

S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Local copies of what is costly to make again: s3:// presets (presets/), XLA executables (xla/).
CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "raydeeplab")
DRIVE = re.compile(r"^[A-Za-z]:")  # C: - on Windows, joining it drops everything before it
# An object store that fails transiently (restarting, 5xx, SlowDown) is retried for this long per
# read or write, waiting RETRY_FIRST_WAIT, then twice as long each time up to RETRY_MAX_WAIT (jittered).
RETRY_SECONDS, RETRY_FIRST_WAIT, RETRY_MAX_WAIT = 60.0, 0.5, 8.0
TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504",
}  # fmt: skip

logger = logging.getLogger(__name__)
T = TypeVar("T")
LIST_PAGE = 1000  # keys in one ListObjectsV2 answer (S3's most)
LAST_CHAR = "\U0010ffff"  # sorts after every character, in S3's UTF-8 byte order as in Python's
LISTING_THREADS = 16  # concurrent requests while splitting a prefix


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI; S3 honours ``AWS_ENDPOINT_URL``."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get(S3_ENDPOINT_ENV)
        # AWS's "standard" retries (3 attempts, ~2 s in all) unless AWS_RETRY_MODE says otherwise:
        # botocore's legacy default spends 10 s on an endpoint that is simply not there.
        retries = {} if "AWS_RETRY_MODE" in os.environ else {"retries": {"mode": "standard"}}
        # No listings cache: this process watches prefixes others write (Ray Train's checkpoints,
        # a preset overwritten in place), and a cached listing hid them from it.
        fs = fsspec.filesystem(
            "s3",
            client_kwargs={"endpoint_url": endpoint} if endpoint else {},
            config_kwargs=retries,
            use_listings_cache=False,
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
    return retrying(lambda: fs.exists(path), uri)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying(lambda: fs.isdir(path), uri)


def list_files(root: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Every file below ``root`` (recursive, sorted), optionally filtered by extension.

    Only names are held in memory; the bytes are read later, by the workers.
    """
    fs, path = filesystem(root)
    if is_remote(root):
        files = retrying(lambda: [path] if fs.isfile(path) else fs.find(path), root)
    else:
        files = [path] if os.path.isfile(path) else list(local_files(path))
    out = []
    for f in files:
        name = posixpath.basename(f)
        if name.startswith("."):
            continue  # our own in-flight temporaries and hidden files
        if extensions and not name.lower().endswith(extensions):
            continue
        out.append(unstrip(fs, f))
    return sorted(out)


def local_files(folder: str) -> Iterator[str]:
    """Every file below a local ``folder``, one folder's iterator at a time (a caller that stops
    early never lists a flat folder whole), following links to folders (fsspec's ``find`` listed
    a link below the top level as a file, and its images were dropped), each real folder once,
    and never into a link to a folder above it (a loop, which would otherwise list everything
    again under a longer name before the real folder's own)."""
    folders, seen = [folder], set()
    while folders:
        current = folders.pop()
        here = os.path.realpath(current)
        if here in seen:  # reached again through links: a cycle of them, or two links to it
            continue
        seen.add(here)
        try:
            entries = os.scandir(current)
        except OSError:  # gone or unreadable: nothing below it, as os.walk and fsspec's find say
            continue
        with entries:
            for entry in entries:
                if not entry.is_dir():
                    yield entry.path
                elif not (entry.is_symlink() and (here + os.sep).startswith(os.path.realpath(entry.path) + os.sep)):
                    folders.append(entry.path)


def s3_folder(path: str) -> tuple[str, str]:
    """``bucket/folder`` (an S3 path as :func:`filesystem` gives it) -> (bucket, the key prefix of
    everything inside it: ``folder/``, or "" for the whole bucket)."""
    bucket, _, key = path.partition("/")
    return bucket, key + "/" if key else ""


def s3_keys(bucket: str, prefix: str, start_after: str = "", max_keys: int = LIST_PAGE) -> tuple[list[str], bool]:
    """(keys, more to come): one ListObjectsV2 answer, keys that start with ``prefix`` (a string,
    not a folder) and sort after ``start_after``, in S3's order."""
    fs, _ = filesystem(f"s3://{bucket}")
    args = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys, **({"StartAfter": start_after} if start_after else {})}
    answer = retrying(lambda: fs.call_s3("list_objects_v2", **args), f"s3://{bucket}/{prefix}")
    return [entry["Key"] for entry in answer.get("Contents", [])], bool(answer.get("IsTruncated"))


def iter_s3_keys(bucket: str, prefix: str, page: int = LIST_PAGE) -> Iterator[str]:
    """Every key that starts with ``prefix``, one page held at a time."""
    after = ""
    while True:
        keys, more = s3_keys(bucket, prefix, after, page)
        yield from keys
        if not (more and keys):
            return
        after = keys[-1]


def split_s3_prefix(bucket: str, prefix: str, want: int, page: int = LIST_PAGE) -> tuple[list[str], list[str]]:
    """(keys, prefixes) that name every key starting with ``prefix`` exactly once, in key order,
    with about ``want`` prefixes (or fewer) when there are many keys: each prefix can be listed
    by its own task, so a flat prefix of millions of keys is not one listing.

    A prefix with more than one page of keys is split, breadth first, by the character after the
    longest prefix all its keys share. The first page shows the first characters in use; each
    further one costs one request that skips every key starting with the last (StartAfter =
    prefix + c + LAST_CHAR). A key equal to a split prefix goes to ``keys``. Nothing is assumed
    of the names: hashes, sequence numbers and folders all split (sequence numbers by one digit
    a level).
    """

    def all_start_with(p: str, common: str) -> bool:  # no key of p sorts past common's keys
        return not s3_keys(bucket, p, common + LAST_CHAR, 1)[0]

    def split(p: str) -> tuple[list[str], list[str]] | None:
        first, more = s3_keys(bucket, p, "", page)
        if not more:
            return None
        # Skip the levels every key shares (in/img_000 of in/img_00012345.jpg ...): the longest
        # prefix of the page's common one that every key starts with, by binary search.
        common = os.path.commonprefix([first[0], first[-1]])
        low, high = len(p), len(common)
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if all_start_with(p, common[:middle]) else (low, middle - 1)
        p = common[:low]
        chars = sorted({key[len(p)] for key in first if len(key) > len(p)})
        after = p + chars[-1] + LAST_CHAR if chars else p
        while following := s3_keys(bucket, p, after, 1)[0]:
            key = following[0]
            if not chars or chars[-1] != key[len(p)]:
                chars.append(key[len(p)])
            # past every key of that character; past this key alone if it holds LAST_CHAR itself
            after = max(p + key[len(p)] + LAST_CHAR, key)
        return [p] * (first[0] == p), [p + c for c in chars]

    keys: list[str] = []
    done: list[str] = []
    frontier = [prefix]
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        while frontier and len(done) + len(frontier) < want:
            chunk, frontier = frontier[:LISTING_THREADS], frontier[LISTING_THREADS:]
            for p, parts in zip(chunk, pool.map(split, chunk)):
                if parts is None:
                    done.append(p)
                else:
                    keys += parts[0]
                    frontier += parts[1]
        # Listed in key order, the first prefix is split down to one page: the first images are
        # read after one listing request, not after a whole prefix's.
        units = sorted(done + frontier)
        while units and units[0] not in done and (parts := split(units[0])) is not None:
            keys += parts[0]
            units = sorted(parts[1] + units[1:])
    return sorted(keys), units


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retrying(lambda: fs.cat_file(path), uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: local files go to a hidden sibling first, then are renamed."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        retrying(lambda: fs.pipe_file(path, data), uri)  # a single PUT: visible whole or not at all
        return
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    # not named after ``name``: a name of 214+ bytes (70 CJK characters) made it too long to create
    tmp = os.path.join(directory, f".{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: the partial file would hold on to the space it got
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove(uri: str) -> None:
    """Delete a file or a whole folder (recursively)."""
    fs, path = filesystem(uri)
    retrying(lambda: fs.rm(path, recursive=True), uri)


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


def pyarrow_filesystem(uri: str) -> pyarrow.fs.PyFileSystem:
    """A pyarrow filesystem over ``uri``'s store (for Ray Train's checkpoints and run snapshot)
    whose every call retries like :func:`retrying`: Ray Train's controller ends a run it cannot
    write its snapshot for, and botocore alone gives up after a second of 503s."""
    return pyarrow.fs.PyFileSystem(RetryingHandler(filesystem(uri)[0], uri))


class RetryingHandler(pyarrow.fs.FSSpecHandler):
    """fsspec behind pyarrow, each call under :func:`retrying`; files opened for reading retry
    each read too (a checkpoint is downloaded one 50 MiB GET at a time); writes spool to local
    disk and upload whole on close (:class:`UploadOnClose`)."""

    UNRETRIED = (
        "fs", "uri", "get_type_name", "normalize_path", "open_input_stream", "open_input_file", "open_output_stream",
    )  # fmt: skip

    def __init__(self, fs: fsspec.AbstractFileSystem, uri: str):
        super().__init__(fs)
        self.uri = uri

    def __eq__(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.fs == other.fs

    def __getattribute__(self, name):
        method = super().__getattribute__(name)
        if name.startswith("_") or name in RetryingHandler.UNRETRIED or not callable(method):
            return method
        uri = super().__getattribute__("uri")
        return lambda *args: retrying(lambda: method(*args), uri)

    def open_input_stream(self, path):
        return pyarrow.PythonFile(reader(self.fs, path, self.uri), mode="r")

    open_input_file = open_input_stream

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(UploadOnClose(self.fs, path, self.uri), mode="w")


class UploadOnClose:
    """A writable file spooled to local disk and uploaded whole, with retries, when closed: with
    s3fs the upload happens on close, which nothing else would retry."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, uri: str):
        import tempfile

        self.fs, self.path, self.uri = fs, path, uri
        self.spool = tempfile.NamedTemporaryFile(prefix="raydeeplab-upload-")
        self.closed = False

    def write(self, data) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        self.spool.flush()

    def tell(self) -> int:
        return self.spool.tell()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.spool.flush()
            retrying(lambda: self.fs.put_file(self.spool.name, self.path), self.uri)
        finally:
            self.spool.close()


def open_input(uri: str, text: bool = False) -> io.BufferedReader | io.TextIOWrapper:
    """``uri`` opened for streaming reads (a manifest, a Parquet shard), its open and every read
    under :func:`retrying`, as whole-object reads are: s3fs and botocore alone give up on a store
    that refuses connections for a few seconds."""
    binary = reader(*filesystem(uri), uri)
    return io.TextIOWrapper(binary, encoding="utf-8-sig") if text else binary  # -sig: a BOM is not text


def reader(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> io.BufferedReader:
    """``path`` in ``fs`` (the store of ``uri``) opened, and read, under :func:`retrying`."""
    return io.BufferedReader(RetryingReads(retrying(lambda: fs.open(path, "rb"), uri), uri))


class RetryingReads(io.RawIOBase):
    """An fsspec file whose reads are retried; a read that fails leaves the position unchanged,
    so trying again is safe."""

    def __init__(self, file, uri: str):
        self.file, self.uri = file, uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return retrying(lambda: self.file.readinto(buffer), self.uri)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        super().close()


def iter_lines(uri: str) -> Iterator[str]:
    with open_input(uri, text=True) as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def retrying(action: Callable[[], T], uri: str) -> T:
    """``action()``, again while the object store behind ``uri`` fails transiently (see
    :func:`is_transient`), with jittered exponential backoff; once RETRY_SECONDS have passed
    (plus the last attempt, itself retried ~3 times by botocore) the last error is raised.
    Local files are not retried: a full or read-only disk does not heal by waiting."""
    deadline = time.monotonic() + RETRY_SECONDS
    attempt = 0
    while True:
        try:
            return action()
        except Exception as err:
            cap = min(RETRY_MAX_WAIT, RETRY_FIRST_WAIT * 2**attempt)
            wait = cap / 2 + random.uniform(0, cap / 2)  # jitter: workers that failed together spread out
            if not is_remote(uri) or not is_transient(err) or time.monotonic() + wait > deadline:
                raise
            attempt += 1
            logger.warning("%s: %s; retry %d in %.1f s", uri, cause_text(err), attempt, wait)
            time.sleep(wait)


def causes(err: BaseException) -> list[BaseException]:
    """``err`` and what it was raised from, outermost first (s3fs raises OSError from botocore's
    ClientError, which holds the store's answer)."""
    chain = [err]
    while (nested := chain[-1].__cause__ or chain[-1].__context__) is not None and nested not in chain:
        chain.append(nested)
    return chain


def store_answers(err: BaseException) -> list[tuple[str | None, int | None]]:
    """``(error code, HTTP status)`` of each object-store answer in ``err``'s chain."""
    responses = [e.response for e in causes(err) if isinstance(getattr(e, "response", None), dict)]
    return [(r.get("Error", {}).get("Code"), r.get("ResponseMetadata", {}).get("HTTPStatusCode")) for r in responses]


def is_transient(err: BaseException) -> bool:
    """Whether waiting may help: the store unreachable (refused, reset, timed out), a 5xx answer,
    or throttling (SlowDown, 429). Not: missing keys, denied access, a missing bucket."""
    import aiohttp
    import botocore.exceptions as boto

    network = (boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientConnectionError, ConnectionError, TimeoutError)
    if any(isinstance(e, network) for e in causes(err)):
        return True
    return any(str(code) in TRANSIENT_CODES or (status or 0) >= 500 or status == 429 for code, status in store_answers(err))


# ---------------------------------------------------------------- errors a user can fix


class StorageError(UserError):
    """A folder or bucket that cannot be reached, read or written; says which and what to do.
    Raised in a Ray Data task, it gets Ray's retry advice appended on new lines: the message is
    the first line."""

    def __str__(self) -> str:
        return super().__str__().split("\n", 1)[0]


CREDENTIALS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
DENIED = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
CREDENTIAL_VARIABLES = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
NEEDS = {"read": "s3:GetObject and s3:ListBucket", "write": "s3:PutObject"}


def explain(err: BaseException, uri: str, access: str) -> str | None:
    """Plain words for why ``uri`` could not be reached, and what to do; ``None`` when ``err`` is
    not about reaching storage. ``access`` is "read" or "write"."""
    import botocore.exceptions as boto

    chain = causes(err)
    codes = [code for code, _ in store_answers(err)]
    code = str(codes[0]) if codes else None
    endpoint = os.environ.get(S3_ENDPOINT_ENV) or "AWS"
    if any(isinstance(e, (boto.NoCredentialsError, boto.PartialCredentialsError)) for e in chain):
        return f"no object-store credentials found; set {CREDENTIAL_VARIABLES}"
    if code in CREDENTIALS_REFUSED:
        return f"the object store at {endpoint} refused the credentials ({code}); check {CREDENTIAL_VARIABLES}"
    if code == "NoSuchBucket":
        return why_missing(uri)
    if any(isinstance(e, (boto.EndpointConnectionError, boto.ConnectTimeoutError)) for e in chain):
        return f"cannot reach the object store at {endpoint} ({cause_text(err)}); check AWS_ENDPOINT_URL and the network"
    if is_remote(uri) and is_transient(err):
        return f"the object store at {endpoint} kept failing for {RETRY_SECONDS:.0f} s ({code or cause_text(err)}); rerun later: finished inputs are kept"
    if code in DENIED or (is_remote(uri) and isinstance(err, PermissionError)):
        return f"access denied on {access} ({code or cause_text(err)}); these credentials need {NEEDS[access]} there"
    if isinstance(err, PermissionError) or getattr(err, "errno", None) == errno.EROFS:
        return f"cannot {access} here ({cause_text(err)}); choose a folder you can {access}"
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left ({cause_text(err)}); free some or choose a folder with room"
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return f"part of the path is a file, not a folder ({cause_text(err)}); choose a folder"
    if isinstance(err, FileNotFoundError):
        return "no such file or folder"
    return None


def store_failure(err: BaseException, flag: str, uri: str, access: str) -> StorageError | None:
    """A :class:`StorageError` when ``err`` stops every read or write under ``flag`` (credentials,
    access, a missing bucket, a store down past the retries, a read-only or full disk), so a job
    ends with one line instead of failing each input; None when it concerns this object alone (a
    missing key, an unreadable local file, a name the folder cannot hold)."""
    missing_bucket = any(code == "NoSuchBucket" for code, _ in store_answers(err))
    if not is_remote(uri) and access == "read":
        return None
    if isinstance(err, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return None
    if isinstance(err, FileNotFoundError) and not missing_bucket:
        return None
    reason = explain(err, uri, access)
    return StorageError(f"{flag} {uri}: {reason}") if reason else None


@contextlib.contextmanager
def reaching(flag: str, uri: str, access: str = "read"):
    """Turns a failure to reach ``uri`` into one :class:`StorageError` naming ``flag``, the cause
    and the fix; any other error passes through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        reason = explain(err, uri, access)
        if reason is None:
            raise
        raise StorageError(f"{flag} {uri}: {reason}") from err


def check_reachable(uri: str) -> None:
    """One listing of an ``s3://`` URI that raises what the store answered (credentials refused,
    access denied, no such bucket): s3fs's ``exists()`` turns those into ``False`` for a bucket."""
    if uri.startswith("s3://"):
        fs, path = filesystem(uri)
        bucket, _, key = path.partition("/")
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)


def why_missing(uri: str) -> str:
    """Why ``exists(uri)`` is False, in words: a whole bucket missing is told apart."""
    if uri.startswith("s3://"):
        bucket = uri[len("s3://") :].split("/", 1)[0]
        if not exists(f"s3://{bucket}"):
            endpoint = os.environ.get(S3_ENDPOINT_ENV) or "AWS"
            return f"bucket {bucket!r} does not exist at {endpoint}; check the bucket name and AWS_ENDPOINT_URL"
    return "no such file or folder; check the path or prefix"


def check_writable(uri: str) -> None:
    """Write and delete a hidden probe under ``uri`` before any work is spent on outputs."""
    probe = join(uri, f".raydeeplab-write-check-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    with contextlib.suppress(Exception):  # a store may allow PutObject but not DeleteObject
        remove(probe)


def has_files(root: str, extensions: tuple[str, ...]) -> bool:
    """Whether any non-hidden file below ``root`` ends with one of ``extensions``; stops at the
    first, holding one listing page (S3) or one folder's iterator (local) at a time: fsspec's
    walk() would list a flat prefix of millions of keys whole before looking at one."""
    fs, path = filesystem(root)
    if fs.isfile(path):
        return path.lower().endswith(extensions)

    def wanted(name: str) -> bool:
        return not name.startswith(".") and name.lower().endswith(extensions)

    if root.startswith("s3://"):
        return any(wanted(posixpath.basename(k)) for k in iter_s3_keys(*s3_folder(path)))
    if not is_remote(root):
        return any(wanted(os.path.basename(name)) for name in local_files(path))
    return any(any(map(wanted, files)) for _, _, files in fs.walk(path))
