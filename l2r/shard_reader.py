"""Read WebDataset shards (local or any fsspec URL) into decoded, preprocessed rows.

Every row has ``key`` (the sample's ``__key__``), ``source`` (the shard URL),
``image`` (uint8 H, W, 3 after ``l2r.images.resize_and_crop``), ``label`` (int64,
-1 without a ``.cls``), ``error`` (None, or ``"<kind>: <detail>"``; the image is
zeros then) and, with ``with_mask``, ``mask`` (bool H, W from ``mask.png``).

Why we read tars ourselves instead of ``ray.data.read_webdataset``: Ray's reader
fails the whole dataset when one shard is truncated or unreadable (the
``tarfile`` error escapes its read task) and on non-contiguous keys. Here one
shard is streamed with Python's ``tarfile`` over ``fsspec`` and each sample turned
into a row with ``sample_to_row``, catching errors per sample and per shard, so a
bad sample or a broken shard becomes an error row naming it and the rest is still
read. ``iter_shard`` gives the rows; ``read_shard_batches`` the Arrow batches that
the jobs' Ray Data reader (``pipeline.dataset.read_shards``, one Ray task per
shard) yields as it goes, so memory stays bounded by Ray's streaming backpressure.

Error kinds: ``missing image``, ``empty member``, ``corrupt image``, ``bad label``,
``missing mask``, ``corrupt mask``, ``duplicate member``, ``unreadable shard``
(a shard-level row: truncated or unreadable tar; its ``key`` is the sample cut
short, or "").
"""

from __future__ import annotations

import collections
import re
import tarfile
from typing import Iterable, Iterator

import numpy as np

from l2r import storage
from l2r.images import ImageDecodeError, decode_image, decode_mask, resize_and_crop, resize_and_crop_mask

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
LABEL_SUFFIX = "cls"
MASK_SUFFIX = "mask.png"

# webdataset's rule: the key is the member path up to the first dot of its base name.
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
# A member is read into memory whole: one announcing more (a corrupt or hostile header) is not read.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_LABEL = 2**31 - 1
# Pseudo-suffix of a member that is not read, with the reason (a per-sample error).
SKIPPED = "__skipped__"
_BRACES = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ---------------------------------------------------------------- shard URLs


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0099}`` (zero padding kept) and ``{a,b}`` brace patterns, left to right."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"unsupported brace pattern {{{body}}} in {pattern!r}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [url for option in options for url in expand_braces(head + option + tail)]


def _as_url(fs, path: str, original: str) -> str:
    # Keep local paths plain; give remote paths their protocol back (glob drops it).
    return fs.unstrip_protocol(path) if "://" in original else path


def expand_urls(spec: str | list[str], filesystem=None) -> list[str]:
    """Shard URLs from a spec or a list of specs, in the order given (sorted within a glob or folder).

    Each spec may be a file, a folder (its ``*.tar``), a glob, or a brace pattern
    (``train-{0000..0099}.tar``), locally or as any fsspec URL (``s3://b/x-{0..3}.tar``,
    ``s3://b/prefix/*.tar``). Raises ``FileNotFoundError`` naming the spec when
    nothing matches or a named shard does not exist.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError("no shard spec given")
    urls: list[str] = []
    for one_spec in specs:
        found: list[str] = []
        for item in expand_braces(str(one_spec)):
            fs, path, _ = storage.resolve(item, filesystem=filesystem)
            if _GLOB_CHARS.search(path):
                matches = fs.glob(path, detail=True)
                found += [_as_url(fs, p, item) for p in sorted(matches) if matches[p]["type"] == "file"]
                continue
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard {item!r} does not exist (from spec {one_spec!r})") from None
            if info["type"] != "directory":
                found.append(item)
                continue
            found += sorted(
                _as_url(fs, e["name"], item)
                for e in fs.ls(path, detail=True)
                if e["type"] == "file" and e["name"].endswith(".tar") and not e["name"].rsplit("/", 1)[-1].startswith(".")
            )
        if not found:
            raise FileNotFoundError(f"no shards match {one_spec!r}")
        urls += found
    return urls


# ---------------------------------------------------------------- one sample -> one row


def size_pair(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)


def _parse_label(data: bytes) -> int:
    text = bytes(data).decode("ascii", errors="strict").strip()
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"not a non-negative integer: {text[:40]!r}")
    if len(text) > 10 or int(text) > MAX_LABEL:
        raise ValueError(f"out of range: {text[:40]} (at most {MAX_LABEL})")
    return int(text)


def sample_to_row(key: str, source: str, members: dict, image_size, crop_pct: float = 1.0, with_mask: bool = False) -> dict:
    """Turn one sample's raw member bytes ({suffix: bytes}) into a row; never raises for bad data."""
    h, w = size_pair(image_size)
    row = {"key": key, "source": source, "image": None, "label": -1, "error": None}
    if with_mask:
        row["mask"] = None
    errors = []
    duplicates = members.get("__duplicates__")
    if duplicates:
        errors.append(f"duplicate member: {', '.join(duplicates)}")
    errors += members.get(SKIPPED, [])

    if LABEL_SUFFIX in members:
        data = members[LABEL_SUFFIX]
        if len(data) == 0:
            errors.append(f"empty member: {key}.{LABEL_SUFFIX}")
        else:
            try:
                row["label"] = _parse_label(data)
            except (ValueError, UnicodeDecodeError) as exc:
                errors.append(f"bad label: {exc}")

    image_suffix = next((s for s in IMAGE_SUFFIXES if s in members), None)
    image_shape = None
    if image_suffix is None:
        errors.append(f"missing image: no .{'/.'.join(IMAGE_SUFFIXES)} member")
    elif len(members[image_suffix]) == 0:
        errors.append(f"empty member: {key}.{image_suffix}")
    else:
        try:
            decoded = decode_image(members[image_suffix])
            image_shape = decoded.shape[:2]  # the mask must have it too
            row["image"] = resize_and_crop(decoded, (h, w), crop_pct)
        except ImageDecodeError as exc:
            errors.append(f"corrupt image: {exc}")

    if with_mask:
        if MASK_SUFFIX not in members:
            errors.append(f"missing mask: no .{MASK_SUFFIX} member")
        elif len(members[MASK_SUFFIX]) == 0:
            errors.append(f"empty member: {key}.{MASK_SUFFIX}")
        else:
            try:
                mask = decode_mask(members[MASK_SUFFIX])
                if image_shape is not None and mask.shape != image_shape:
                    errors.append(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from the image's "
                                  f"{image_shape[1]}x{image_shape[0]}: {key}.{MASK_SUFFIX}")
                else:
                    row["mask"] = resize_and_crop_mask(mask, (h, w), crop_pct)
            except ImageDecodeError as exc:
                errors.append(f"corrupt mask: {exc}")

    if errors:
        row["error"] = "; ".join(errors)
        row["image"] = None
    if row["image"] is None:
        row["image"] = np.zeros((h, w, 3), dtype=np.uint8)
    if with_mask and (row["mask"] is None or errors):
        row["mask"] = np.zeros((h, w), dtype=bool)
    return row


def shard_error_row(source: str, reason: str, image_size, with_mask: bool = False, key: str = "") -> dict:
    """A row reporting a shard-level failure (truncated or unreadable tar)."""
    h, w = size_pair(image_size)
    row = {"key": key, "source": source, "image": np.zeros((h, w, 3), np.uint8), "label": -1, "error": reason}
    if with_mask:
        row["mask"] = np.zeros((h, w), dtype=bool)
    return row


# ---------------------------------------------------------------- one shard -> rows


def _iter_tar_members(fileobj) -> Iterator[tuple[str, str, bytes]]:
    """(key, suffix, bytes) for every regular, non-hidden member, in archive order.

    Python's ``tarfile`` treats a cut inside a header, or at a member boundary, as
    a normal end of archive, silently losing the rest of the shard (Ray's reader
    inherits this). So after the last member we check for the end-of-archive
    zero block and raise ``tarfile.ReadError`` when it is missing.

    Members are only read into memory, never extracted, so names such as ``/etc/x.png`` or
    ``../x.png`` write nothing anywhere. A link, or a member announcing more than
    ``MAX_MEMBER_BYTES``, is not read: it comes as ``(key, SKIPPED, reason)`` (a per-sample error).
    """
    with tarfile.open(fileobj=fileobj, mode="r:*") as archive:
        for info in archive:
            match = _KEY_AND_SUFFIX.match(info.name)
            if match is None:  # no suffix, or a hidden file such as ._foo.jpg
                continue
            key, suffix = match.groups()
            if info.issym() or info.islnk():
                kind = "symbolic" if info.issym() else "hard"
                yield key, SKIPPED, f"{kind} link not followed: {info.name} -> {info.linkname}"
            elif not info.isreg():
                continue
            elif info.size > MAX_MEMBER_BYTES:
                yield key, SKIPPED, f"member too large: {info.name} announces {info.size} bytes (at most {MAX_MEMBER_BYTES})"
            else:
                yield key, suffix.lower(), archive.extractfile(info).read()
        if archive.fileobj is fileobj:  # uncompressed: compressed streams detect truncation themselves
            fileobj.seek(archive.offset)
            end = fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker at byte {archive.offset} (truncated or corrupt)")


SPLIT_PARTS = ("all", "train", "holdout")


def in_part(position: int, holdout_every: int, part: str) -> bool:
    """The fixed train/holdout rule: the sample at 0-based `position` in its shard (archive order) is
    held out when position % holdout_every == holdout_every - 1, so 1 in `holdout_every`, spread evenly
    through the shard (a class-sorted shard gives a holdout across all of its classes)."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"unknown split part {part!r}; choose one of {SPLIT_PARTS}")
    if part == "all" or holdout_every <= 0:
        return True
    held_out = position % holdout_every == holdout_every - 1
    return held_out if part == "holdout" else not held_out


def iter_shard(url: str, image_size, crop_pct: float = 1.0, with_mask: bool = False, filesystem=None,
               holdout_every: int = 0, part: str = "all") -> Iterator[dict]:
    """Rows of one shard, without Ray. A shard that cannot be opened or is cut short ends with an error row.

    `holdout_every` > 0 with `part` "train" or "holdout" keeps one side of the split rule of `in_part`
    (the other side's samples are not decoded).
    """
    current_key, members, done = None, {}, 0
    in_part(0, holdout_every, part)  # an unknown part fails here, before any reading
    try:
        fs, path, _ = storage.resolve(url, filesystem=filesystem)
        with fs.open(path, "rb") as fileobj:
            for key, suffix, data in _iter_tar_members(fileobj):
                if key != current_key:
                    if current_key is not None:
                        if in_part(done, holdout_every, part):
                            yield sample_to_row(current_key, url, members, image_size, crop_pct, with_mask)
                        done += 1
                    current_key, members = key, {}
                if suffix == SKIPPED:
                    members.setdefault(SKIPPED, []).append(data)
                    continue
                if suffix in members:
                    members.setdefault("__duplicates__", []).append(f"{key}.{suffix}")
                members[suffix] = data
        if current_key is not None and in_part(done, holdout_every, part):
            yield sample_to_row(current_key, url, members, image_size, crop_pct, with_mask)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        # The sample being read when the shard broke is lost; name it so it can be traced.
        reason = f"unreadable shard: {url}: {type(exc).__name__}: {exc} (after {done} samples)"
        reason = "; ".join([reason, *members.get(SKIPPED, [])])  # e.g. the member that announced too much
        yield shard_error_row(url, reason, image_size, with_mask, key=current_key or "")


def rows_to_batch(rows: list[dict], with_mask: bool = False) -> dict:
    """Stack row dicts into a column batch (numpy arrays; error is an object array of str/None)."""
    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "image": np.stack([r["image"] for r in rows]),
        "label": np.array([r["label"] for r in rows], dtype=np.int64),
        "error": np.array([r["error"] for r in rows], dtype=object),
    }
    if with_mask:
        batch["mask"] = np.stack([r["mask"] for r in rows])
    return batch


def _to_arrow(batch: dict):
    """A column batch as a pyarrow table with fixed types, so blocks with and without errors agree."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    columns = {
        "key": pa.array(list(batch["key"]), pa.string()),
        "source": pa.array(list(batch["source"]), pa.string()),
        "image": ArrowTensorArray.from_numpy(batch["image"]),
        "label": pa.array(batch["label"], pa.int64()),
        "error": pa.array(list(batch["error"]), pa.string()),
    }
    if "mask" in batch:
        columns["mask"] = ArrowTensorArray.from_numpy(batch["mask"])
    return pa.table(columns)


def read_shard_batches(batch, image_size, crop_pct, with_mask, filesystem, rows_per_batch, holdout_every, part):
    """A batch of shard URLs (column "url") -> a stream of Arrow row batches (a Ray Data map_batches function)."""
    rows = []
    for url in batch["url"]:
        for row in iter_shard(str(url), image_size, crop_pct, with_mask, filesystem, holdout_every, part):
            rows.append(row)
            if len(rows) >= rows_per_batch:
                yield _to_arrow(rows_to_batch(rows, with_mask))
                rows = []
    if rows:
        yield _to_arrow(rows_to_batch(rows, with_mask))


# ---------------------------------------------------------------- surfacing skipped samples


def error_kind(reason: str) -> str:
    """The kind of an error string, e.g. ``corrupt image`` (the text before the first colon)."""
    return reason.split(":", 1)[0]


class ErrorTally:
    """Counts rows and errors while a job consumes rows or batches; keeps the first examples."""

    def __init__(self, max_examples: int = 20):
        self.max_examples = max_examples
        self.rows = 0
        self.errors = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.examples: list[dict] = []

    def add_row(self, row: dict) -> None:
        self.rows += 1
        reason = row.get("error")
        if reason is None:
            return
        self.errors += 1
        for part in str(reason).split("; "):
            self.by_kind[error_kind(part)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"key": row.get("key"), "source": row.get("source"), "error": reason})

    def add_batch(self, batch: dict) -> None:
        """A column batch as from ``iter_batches`` (needs key, source, error)."""
        for key, source, reason in zip(batch["key"], batch["source"], batch["error"]):
            self.add_row({"key": key, "source": source, "error": reason})

    def summary(self) -> dict:
        return {"rows": self.rows, "errors": self.errors, "by_kind": dict(self.by_kind), "examples": list(self.examples)}


def summarize_errors(rows: Iterable[dict], max_examples: int = 20) -> dict:
    """``{"rows", "errors", "by_kind", "examples": [{"key", "source", "error"}]}`` for rows or a Ray Dataset.

    A Dataset is read once more (only key/source/error are kept); a job that already
    iterates the data should feed an ``ErrorTally`` instead.
    """
    tally = ErrorTally(max_examples)
    if hasattr(rows, "iter_batches"):
        for batch in rows.select_columns(["key", "source", "error"]).iter_batches(batch_size=1024, batch_format="numpy"):
            tally.add_batch(batch)
    else:
        for row in rows:
            tally.add_row(row)
    return tally.summary()
