"""The attribution job's output folder: its layout, the row schema, and how files are committed.

Layout under the output URL (a local folder or any fsspec URL)::

    manifest.json                 config, model/explainer identity, protocol, versions, counts
    parquet/<shard>.parquet       one row per (image, method); read the folder with pandas/pyarrow
    done/<shard>.json             success marker, written last (rows, errors, AUC sums)
    parts/<shard>/<id>.parquet    a running shard's batches, as the workers wrote them
    actors/<id>.json              one per actor start while a run is going (removed at its end)

The workers write: each actor writes the rows of every batch it finishes as a part file of
that batch's shard and hands back only a one-line summary (``write_parts``). When a shard is
complete, a task merges exactly the parts the driver was told about into the shard's Parquet
file, committed atomically (``merge_parts``), and removes the parts; the driver then writes
the marker. A part written by an attempt that failed before reporting is never merged, so
every input key appears exactly once. A rerun skips shards with a marker and starts the
others afresh (their stale parts removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pyarrow as pa

from l2r import storage

PARQUET_DIR = "parquet"
DONE_DIR = "done"
PARTS_DIR = "parts"
ACTORS_DIR = "actors"  # one file per attribution actor start: more starts than actors = restarts
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("label", pa.int64()),
        ("pred", pa.int64()),
        ("pred_prob", pa.float32()),
        ("target", pa.int64()),
        ("target_prob", pa.float32()),
        ("method", pa.string()),
        ("deletion_auc", pa.float32()),
        ("insertion_auc", pa.float32()),
        ("deletion_curve", pa.list_(pa.float32())),
        ("insertion_curve", pa.list_(pa.float32())),
        ("heatmap", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("forward_passes", pa.int64()),
        ("backward_passes", pa.int64()),
        ("seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("error", pa.string()),
        ("pointing_hit", pa.bool_()),
        ("mask_auroc", pa.float32()),
        # The sanity check (l2r.sanity): Spearman correlation of the map with the map on the target
        # randomised from the top, one value per cascade stage; null when the check is off.
        ("sanity_spearman", pa.list_(pa.float32())),
    ]
)


def output_names(urls: list[str]) -> dict[str, str]:
    """Shard URL -> output file stem: the shard's base name, plus a short hash where names clash."""
    stems = {}
    for url in urls:
        base = url.rstrip("/").rsplit("/", 1)[-1]
        stems[url] = base[: -len(".tar")] if base.endswith(".tar") else base
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        url: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"
        for url, stem in stems.items()
    }


def split_by_source(table: pa.Table):
    """Contiguous runs of one source: [(source, table slice)], in order."""
    sources = table.column("source").to_pylist()
    start = 0
    for i in range(1, len(sources) + 1):
        if i == len(sources) or sources[i] != sources[start]:
            yield sources[start], table.slice(start, i - start)
            start = i


class Output:
    """The output folder at a URL: manifest, per-shard Parquet files, markers and parts."""

    def __init__(self, url: str, storage_options: dict | None = None, filesystem=None):
        self.url = storage.absolute(url) if filesystem is None else str(url).rstrip("/")
        self.storage_options = storage_options
        self.filesystem = filesystem  # an fsspec filesystem already set up (tests); else from the URL

    def _path(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    @property
    def manifest_url(self) -> str:
        return self._path(MANIFEST)

    def parquet_url(self, name: str) -> str:
        return self._path(PARQUET_DIR, f"{name}.parquet")

    def marker_url(self, name: str) -> str:
        return self._path(DONE_DIR, f"{name}.json")

    def parts_url(self, name: str) -> str:
        return self._path(PARTS_DIR, name)

    def read_json(self, url: str) -> dict | None:
        return storage.read_json(url, self.storage_options, self.filesystem)

    def write_json(self, url: str, document: dict) -> None:
        storage.write_json(url, document, self.storage_options, self.filesystem)

    def finished(self, name: str, source: str) -> dict | None:
        """The marker of a finished shard, or None. A marker for another source is a clash."""
        marker = self.read_json(self.marker_url(name))
        if marker is None or not storage.exists(self.parquet_url(name), self.storage_options, self.filesystem):
            return None
        if marker.get("source") != source:
            raise ValueError(
                f"output {self.parquet_url(name)} holds shard {marker.get('source')!r}, not {source!r}: "
                "use another output folder for shards with the same names"
            )
        return marker

    def remove_all(self) -> None:
        """Forget every earlier result in this folder (our markers, Parquet files and parts only)."""
        for sub, suffix in ((DONE_DIR, ".json"), (PARQUET_DIR, ".parquet")):
            for url in storage.listing(self._path(sub), self.storage_options, self.filesystem):
                if url.endswith(suffix):
                    storage.remove(url, self.storage_options, filesystem=self.filesystem)
        storage.remove(self._path(PARTS_DIR), self.storage_options, recursive=True, filesystem=self.filesystem)

    def record_actor_start(self) -> None:
        storage.write_json(self._path(ACTORS_DIR, f"{uuid.uuid4().hex}.json"), {"pid": os.getpid()},
                           self.storage_options, self.filesystem)

    def actor_starts(self) -> int:
        return len(storage.listing(self._path(ACTORS_DIR), self.storage_options, self.filesystem))

    def clear_actor_starts(self) -> None:
        storage.remove(self._path(ACTORS_DIR), self.storage_options, recursive=True, filesystem=self.filesystem)

    def names_with_parts(self) -> set[str]:
        """The shards that have a parts folder (one listing, not one request per shard)."""
        return {url.rstrip("/").rsplit("/", 1)[-1]
                for url in storage.listing(self._path(PARTS_DIR), self.storage_options, self.filesystem)}

    def clear_parts(self, name: str) -> None:
        """Remove what an interrupted run left of a shard's parts (it is redone from the start)."""
        storage.remove(self.parts_url(name), self.storage_options, recursive=True, filesystem=self.filesystem)

    def clean_temporary(self) -> None:
        """Remove temporary files a crashed local run left behind (ours only: hidden .*.tmp-*)."""
        fs, root, local = storage.resolve(self.url, self.storage_options, self.filesystem)
        if not local:
            return
        for sub in (PARQUET_DIR, DONE_DIR, ""):
            folder = f"{root}/{sub}".rstrip("/")
            if os.path.isdir(folder):
                for entry in os.listdir(folder):
                    if entry.startswith(".") and ".tmp-" in entry:
                        os.remove(f"{folder}/{entry}")


def _parquet_bytes(tables: list[pa.Table]) -> bytes:
    """A part file: uncompressed, as it is read back once and merged (heatmaps are compressed already)."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, SCHEMA, compression="none") as writer:
        for table in tables:
            writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_parts(output: Output, names: dict[str, str], table: pa.Table) -> pa.Table:
    """Write a batch's rows as one part file per shard they belong to; returns the summaries
    (one row per part: source, part URL, rows, stats as JSON) that go back to the driver."""
    methods = list(dict.fromkeys(table.column("method").to_pylist()))
    summary = {"source": [], "part": [], "rows": [], "stats": []}
    for source, part in split_by_source(table):
        url = storage.join(output.parts_url(names[source]), f"{uuid.uuid4().hex}.parquet")
        storage.write_bytes(url, _parquet_bytes([part]), output.storage_options, output.filesystem)
        stats = Stats(methods)
        stats.add_table(part)
        summary["source"].append(source)
        summary["part"].append(url)
        summary["rows"].append(part.num_rows)
        summary["stats"].append(json.dumps(stats.to_dict()))
    return pa.table(summary, schema=PART_SUMMARY)


PART_SUMMARY = pa.schema([("source", pa.string()), ("part", pa.string()), ("rows", pa.int64()),
                          ("stats", pa.string())])


CONTROLS_KEY = b"l2r.controls"  # Parquet metadata: the methods that are controls (l2r.methods)


def file_schema() -> pa.Schema:
    """SCHEMA with the file metadata: which `method` values are controls, so a reader of the
    Parquet alone does not take a control for a method."""
    from l2r.methods import control_names

    return SCHEMA.with_metadata({CONTROLS_KEY: json.dumps(list(control_names())).encode()})


def merge_parts(output_url: str, storage_options: dict | None, name: str, parts: list[str],
                row_group_rows: int = 2048) -> int:
    """One shard's part files, in the order given, into its Parquet file (committed atomically);
    then its parts are removed. Returns the rows written."""
    import pyarrow.parquet as pq

    output = Output(output_url, storage_options)
    rows, pending = 0, []
    with storage.atomic_writer(output.parquet_url(name), storage_options) as f:
        # Streamed: at most one row group of the shard in memory.
        with pq.ParquetWriter(f, file_schema(), compression="zstd") as writer:
            for url in parts:
                with storage.open_file(url, "rb", storage_options) as part:
                    pending.append(pq.read_table(part, schema=SCHEMA))
                if sum(t.num_rows for t in pending) >= row_group_rows:
                    rows += _flush(writer, pending)
            rows += _flush(writer, pending)
    output.clear_parts(name)
    return rows


def _flush(writer, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    writer.write_table(table)
    pending.clear()
    return table.num_rows


class Stats:
    """Images, errors and AUC sums per method (and evidence-mask sums); adds up batches and shard markers."""

    def __init__(self, methods):
        self.methods = list(methods)
        self.images = 0
        self.errors = 0  # images with a decode/label error
        self.rows = 0
        self.error_rows = 0
        self.per_method = {m: {"n": 0, "deletion": 0.0, "insertion": 0.0, "errors": 0,
                               "pointing_n": 0, "pointing_hits": 0, "auroc_n": 0, "auroc": 0.0}
                           for m in self.methods}

    def add_table(self, table: pa.Table) -> None:
        methods = table.column("method").to_pylist()
        errors = table.column("error").to_pylist()
        dels = table.column("deletion_auc").to_pylist()
        ins = table.column("insertion_auc").to_pylist()
        hits = table.column("pointing_hit").to_pylist()
        aurocs = table.column("mask_auroc").to_pylist()
        first = self.methods[0]
        for m, e, da, ia, hit, auroc in zip(methods, errors, dels, ins, hits, aurocs):
            self.rows += 1
            s = self.per_method[m]
            if m == first:
                self.images += 1
            if e is not None:
                self.error_rows += 1
                s["errors"] += 1
                # An image is errored when its data could not be used (the same for every method).
                if m == first and not e.startswith("method failed"):
                    self.errors += 1
            else:
                s["n"] += 1
                s["deletion"] += da
                s["insertion"] += ia
                if hit is not None:
                    s["pointing_n"] += 1
                    s["pointing_hits"] += int(hit)
                if auroc is not None:
                    s["auroc_n"] += 1
                    s["auroc"] += auroc

    def add(self, other: dict) -> None:
        self.images += other["images"]
        self.errors += other["errors"]
        self.rows += other["rows"]
        self.error_rows += other["error_rows"]
        for m, s in other["per_method"].items():
            if m in self.per_method:
                for k in s:
                    self.per_method[m][k] += s[k]

    def to_dict(self) -> dict:
        return {"images": self.images, "errors": self.errors, "rows": self.rows, "error_rows": self.error_rows,
                "per_method": {m: dict(s) for m, s in self.per_method.items()}}

    def means(self) -> dict:
        return {
            m: {
                "deletion_auc": s["deletion"] / s["n"] if s["n"] else None,
                "insertion_auc": s["insertion"] / s["n"] if s["n"] else None,
                "images": s["n"],
                "errors": s["errors"],
                "pointing_game": s["pointing_hits"] / s["pointing_n"] if s["pointing_n"] else None,
                "mask_auroc": s["auroc"] / s["auroc_n"] if s["auroc_n"] else None,
            }
            for m, s in self.per_method.items()
        }



def read_results(output: str, filesystem=None, storage_options: dict | None = None) -> pa.Table:
    """All committed rows of an output folder (shards with a success marker) as one pyarrow Table."""
    import pyarrow.parquet as pq

    out = Output(output, storage_options, filesystem)
    tables = []
    for marker in sorted(storage.listing(storage.join(out.url, DONE_DIR), storage_options, filesystem)):
        name = marker.rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith(".json"):
            continue
        with storage.open_file(out.parquet_url(name[: -len(".json")]), "rb", storage_options, filesystem) as f:
            tables.append(pq.read_table(f, schema=SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
