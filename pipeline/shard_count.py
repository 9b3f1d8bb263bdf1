"""How many samples a job's shards hold, known before any image is decoded: the total behind the
attribution job's ETA from its first finished batch.

A local, uncompressed shard is counted exactly by walking its tar headers: `tarfile` seeks over
each payload, so a shard costs two small reads per member (0.4 s for 5,000 CIFAR-10 samples, most
of it `tarfile`'s own parsing). Counting stops after `COUNT_SECONDS`, so that thousands of shards
do not delay the start; the rest are estimated from their sizes. On an object store (s3://, gs://)
each of those seeks would be a ranged request, or fsspec's read-ahead would fetch the whole shard,
as costly as the job's own read; there a shard's size comes from the listing the shards were found
with (fsspec caches it) and is divided by the bytes per sample of the shards counted so far, or of
the first MiB of the first remote shard (one ranged read for the whole job): an estimate for shards
of similar images. Past `COUNT_SECONDS` (thousands of shards named by a brace pattern, one
metadata request each), the remaining remote shards count as the mean of those sized, as does a
shard that cannot be counted or sized."""

from __future__ import annotations

import io
import tarfile
import time

from l2r import storage
from l2r.shard_reader import _KEY_AND_SUFFIX, in_part

PREFIX_BYTES = 1 << 20  # read of a remote shard's start, for its bytes per sample
COUNT_SECONDS = 2.0  # exact counting of local shards stops here (about 25,000 samples); sizes after that


def count_samples(fileobj) -> tuple[int, int, bool]:
    """(samples, end, complete) of an uncompressed tar read from `fileobj` without reading payloads:
    the samples (runs of members with one key, as `l2r.shard_reader.iter_shard` groups them) whose
    members all lie in the readable part, the byte offset where the last of them ends, and whether
    the archive was read to its end (a cut prefix gives complete False and leaves its last,
    possibly partial, sample out)."""
    samples, key, end, complete = 0, None, 0, True
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as archive:
            for info in archive:
                match = _KEY_AND_SUFFIX.match(info.name) if info.isreg() else None
                if match is None:
                    continue
                if match.group(1) != key:
                    if key is not None:
                        samples, end = samples + 1, info.offset
                    key = match.group(1)
            last_end = archive.offset
        # tarfile takes a cut inside a header for the end of the archive: the end marker decides.
        fileobj.seek(last_end)
        complete = fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
    except (tarfile.ReadError, EOFError):
        complete = False
    if key is not None and complete:
        samples, end = samples + 1, last_end
    return samples, end, complete


def _local_count(path: str) -> int:
    with open(path, "rb", buffering=0) as raw:  # unbuffered: a seek does not refill an 8 KiB buffer
        samples, _, complete = count_samples(raw)
    if not complete:
        raise tarfile.ReadError(f"{path}: not an uncompressed, complete tar")
    return samples


def _prefix_count(fs, path: str) -> tuple[int, int]:
    """(samples, bytes) of the whole samples in the first PREFIX_BYTES of a shard."""
    with fs.open(path, "rb", block_size=PREFIX_BYTES) as remote:  # one request, not a 5 MB read-ahead
        prefix = remote.read(PREFIX_BYTES)
    samples, end, complete = count_samples(io.BytesIO(prefix))
    return samples, (len(prefix) if complete else end)


def _kept(samples: float, holdout_every: int, part: str, exact: bool = False) -> float:
    """How many of a shard's samples the job reads (`l2r.shard_reader.in_part`), for an exact count or an estimate."""
    if exact:
        return float(sum(in_part(i, holdout_every, part) for i in range(int(samples))))
    return samples * (1.0 if part == "all" or holdout_every <= 0 else
                      1 / holdout_every if part == "holdout" else 1 - 1 / holdout_every)


def expected_samples(urls: list[str], filesystem=None, holdout_every: int = 0, part: str = "all",
                     count_seconds: float = COUNT_SECONDS) -> list[float]:
    """Per shard, the number of samples the job will read from it: exact for the local shards
    counted within `count_seconds`, from the shard's size for the others (see the module docstring);
    past `count_seconds`, remote shards take the mean of those sized before (no more requests).
    An empty list when nothing could be counted: the caller has no total then."""
    started = time.perf_counter()
    counts: list[float | None] = []
    measured_samples = measured_bytes = 0  # what the bytes per sample come from
    for url in urls:
        try:
            fs, path, local = storage.resolve(url, filesystem=filesystem)
            in_budget = time.perf_counter() - started < count_seconds
            if not local and not in_budget and any(c is not None for c in counts):
                counts.append(None)  # no more requests: the mean of the shards sized so far
                continue
            size = fs.size(path)  # on an object store, often from the listing the shards were found with
            if local and in_budget:
                n = _local_count(path)
                measured_samples, measured_bytes = measured_samples + n, measured_bytes + size
                counts.append(_kept(n, holdout_every, part, exact=True))
                continue
            if not measured_samples:
                measured_samples, measured_bytes = _prefix_count(fs, path)
                if not measured_samples:
                    raise ValueError(f"no whole sample in the first {PREFIX_BYTES} bytes of {url}")
            counts.append(_kept(size * measured_samples / measured_bytes, holdout_every, part))
        except (OSError, ValueError, tarfile.TarError, EOFError):
            counts.append(None)  # e.g. a compressed or unreadable shard: the job reports it by name
    known = [c for c in counts if c is not None]
    if not known:
        return []
    mean = sum(known) / len(known)
    return [mean if c is None else c for c in counts]
