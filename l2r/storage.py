"""One way to reach storage: a local path or any fsspec URL (s3://, gs://, memory://, ...).

Every file the project reads or writes outside the model cache goes through here, with the
same ``storage_options`` (credentials, endpoint): the jobs take them once (``--storage-options``)
and hand them to every process, so a worker on another node reaches the same place the driver
named. Local paths are made absolute (a Ray worker may run in another directory); a local path
on a multi-node cluster is only right on a shared filesystem.

Writes are whole-file: locally under a hidden temporary name, then renamed (atomic); on object
stores an object appears only when its upload completes, which is atomic too.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid


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
    fs, path, _ = resolve(url, storage_options, filesystem)
    return fs.exists(path)


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
    """Write a whole file atomically (parents created)."""
    with atomic_writer(url, storage_options, filesystem) as f:
        f.write(data)


def write_text(url, text: str, storage_options: dict | None = None) -> None:
    write_bytes(url, text.encode(), storage_options)


def write_json(url, document, storage_options: dict | None = None, filesystem=None) -> None:
    write_bytes(url, (json.dumps(document, indent=2, default=str) + "\n").encode(), storage_options, filesystem)


def read_bytes(url, storage_options: dict | None = None, filesystem=None) -> bytes:
    fs, path, _ = resolve(url, storage_options, filesystem)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url, storage_options: dict | None = None, filesystem=None):
    """The parsed document, or None when the file is absent or not (yet) valid JSON."""
    try:
        return json.loads(read_bytes(url, storage_options, filesystem))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def listing(url, storage_options: dict | None = None, filesystem=None) -> list[str]:
    """The URLs of the files directly in a folder; an absent folder (an empty prefix) is empty."""
    fs, path, local = resolve(url, storage_options, filesystem)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    base = str(url).rstrip("/")
    return [join(base, e.rstrip("/").rsplit("/", 1)[-1]) for e in entries if e.rstrip("/") != path]


def remove(url, storage_options: dict | None = None, recursive: bool = False, filesystem=None) -> None:
    """Remove a file (or a folder with ``recursive``); absent is fine."""
    fs, path, _ = resolve(url, storage_options, filesystem)
    try:
        fs.rm(path, recursive=recursive)
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
