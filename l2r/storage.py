"""One way to reach storage: a local path or any fsspec URL (s3://, gs://, memory://, ...).

Every file the project reads or writes outside the model cache goes through here, with the
same ``storage_options`` (credentials, endpoint): the jobs take them once (``--storage-options``)
and hand them to every process, so a worker on another node reaches the same place the driver
named. Local paths are made absolute (a Ray worker may run in another directory); a local path
on a multi-node cluster is only right on a shared filesystem.

Writes are whole-file: locally under a hidden temporary name, then renamed (atomic); on object
stores an object appears only when its upload completes, which is atomic too.

An object store that fails requests for a while (a dropped connection, a 5xx, a server restarting)
is retried: each whole-file call on a URL (read, write, exists, listing, remove) is tried up to
``RETRY_ATTEMPTS`` times with doubling waits, then fails with a ``StorageUnavailable`` naming the
URL. A failed attempt commits nothing, so a retried write never leaves half a file. Local paths are
not retried: a full disk or a missing file is not transient.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid

RETRY_ATTEMPTS = 5
RETRY_FIRST_WAIT_S = 0.5  # then 1, 2, 4 s: about 7.5 s of waiting before giving up
# Answers that retrying cannot change.
PERMANENT_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
                    ValueError, TypeError, KeyError)

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class StorageUnavailable(OSError):
    """An object-store call that kept failing after its retries; the message names the URL."""


def _transient(error: BaseException) -> bool:
    """Connection errors, timeouts and server errors of object-store clients (s3fs, gcsfs, botocore, aiohttp)."""
    if isinstance(error, PERMANENT_ERRORS) or getattr(error, "errno", None) in FULL_DISK:
        return False
    module = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or module in ("botocore", "aiohttp", "urllib3", "requests", "google")


def _with_retries(what: str, url, local: bool, call):
    """``call()``, retried with backoff while an object store fails; local paths are called once."""
    if local:
        return call()
    wait, started = RETRY_FIRST_WAIT_S, time.monotonic()
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except BaseException as error:
            if not _transient(error):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise StorageUnavailable(
                    f"{what} {url}: failed {attempt} times over {time.monotonic() - started:.1f} s "
                    f"(the object store did not answer); last error: {type(error).__name__}: {error}") from error
            time.sleep(wait)
            wait *= 2


def is_url(url) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def resolve(url, storage_options: dict | None = None, filesystem=None):
    """(fsspec filesystem, path without protocol, is_local) for a path or URL.

    ``filesystem`` overrides the one the URL names (e.g. an s3fs instance already set up)."""
    import fsspec

    url = str(url)
    if filesystem is not None:
        fs, path = filesystem, filesystem._strip_protocol(url)
    else:
        fs, path = fsspec.core.url_to_fs(url, **((storage_options or {}) if is_url(url) else {}))
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    local = "file" in protocols or "local" in protocols
    if local:
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/", local


def filesystem_for(url, storage_options: dict | None = None):
    """The fsspec filesystem of a URL (None for a local path): what readers that take a
    ``filesystem=`` argument need."""
    if not is_url(url):
        return None
    return resolve(url, storage_options)[0]


def absolute(url) -> str:
    """A URL unchanged; a local path made absolute."""
    url = str(url)
    return url if is_url(url) else os.path.abspath(url.removeprefix("file://"))


def join(url, *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url, storage_options: dict | None = None, filesystem=None) -> bool:
    fs, path, local = resolve(url, storage_options, filesystem)
    return _with_retries("checking", url, local, lambda: fs.exists(path))


@contextlib.contextmanager
def atomic_writer(url, storage_options: dict | None = None, filesystem=None):
    """A binary file to stream into; the file appears whole when the block ends, or not at all
    when it raises (locally: a hidden temporary file renamed; object stores: an upload that is
    only completed on success)."""
    fs, path, local = resolve(url, storage_options, filesystem)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            if error.errno in FULL_DISK and not error.filename:  # a write or fsync: say which file
                raise OSError(error.errno, error.strerror, path) from error
            raise
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            # Discard, not commit: fsspec's buffered files upload on close, multipart ones abort here.
            getattr(f, "discard", lambda: None)()
            raise
        f.close()


def write_bytes(url, data: bytes, storage_options: dict | None = None, filesystem=None) -> None:
    """Write a whole file atomically (parents created); retried while an object store fails."""

    def write():
        with atomic_writer(url, storage_options, filesystem) as f:
            f.write(data)

    _with_retries("writing", url, resolve(url, storage_options, filesystem)[2], write)


def write_text(url, text: str, storage_options: dict | None = None) -> None:
    write_bytes(url, text.encode(), storage_options)


def write_json(url, document, storage_options: dict | None = None, filesystem=None) -> None:
    write_bytes(url, (json.dumps(document, indent=2, default=str) + "\n").encode(), storage_options, filesystem)


def read_bytes(url, storage_options: dict | None = None, filesystem=None) -> bytes:
    fs, path, local = resolve(url, storage_options, filesystem)

    def read():
        with fs.open(path, "rb") as f:
            return f.read()

    return _with_retries("reading", url, local, read)


def read_json(url, storage_options: dict | None = None, filesystem=None):
    """The parsed document, or None when the file is absent or not (yet) valid JSON."""
    try:
        return json.loads(read_bytes(url, storage_options, filesystem))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def listing(url, storage_options: dict | None = None, filesystem=None) -> list[str]:
    """The URLs of the files directly in a folder; an absent folder (an empty prefix) is empty."""
    fs, path, local = resolve(url, storage_options, filesystem)

    def ls():
        fs.invalidate_cache(path)
        return fs.ls(path, detail=False)

    try:
        entries = _with_retries("listing", url, local, ls)
    except FileNotFoundError:
        return []
    base = str(url).rstrip("/")
    return [join(base, e.rstrip("/").rsplit("/", 1)[-1]) for e in entries if e.rstrip("/") != path]


def remove(url, storage_options: dict | None = None, recursive: bool = False, filesystem=None) -> None:
    """Remove a file (or a folder with ``recursive``); absent is fine."""
    fs, path, local = resolve(url, storage_options, filesystem)
    try:
        _with_retries("removing", url, local, lambda: fs.rm(path, recursive=recursive))
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def put_folder(local_folder, url, storage_options: dict | None = None) -> None:
    """Copy the files of a local folder into a folder at ``url`` (each file written atomically)."""
    for name in sorted(os.listdir(local_folder)):
        with open(os.path.join(local_folder, name), "rb") as f:
            write_bytes(join(url, name), f.read(), storage_options)


def open_file(url, mode: str = "rb", storage_options: dict | None = None, filesystem=None):
    """An open file object (for streaming reads and writes that need not be atomic)."""
    fs, path, local = resolve(url, storage_options, filesystem)
    if local and "w" in mode:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def pyarrow_filesystem(url, storage_options: dict | None = None):
    """(pyarrow filesystem, path) for libraries that take pyarrow's (Ray Train's storage):
    the same fsspec filesystem and options, wrapped. None for a local path."""
    if not is_url(url):
        return None, absolute(url)
    import pyarrow.fs

    fs, path, _ = resolve(url, storage_options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
