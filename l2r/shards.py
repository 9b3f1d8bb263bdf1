"""Write WebDataset shards from an ImageFolder tree, a CSV, or the synthetic generator.

Each sample becomes ``<key>.<ext>`` (the original image bytes, not re-encoded),
``<key>.cls`` (class index as ASCII digits) and, for synthetic data,
``<key>.mask.png``. Shards are ``<prefix>-0000.tar``, ``<prefix>-0001.tar``, ...
in ``output`` (a folder or any fsspec URL), with ``classes.json`` ({"0": name,
...}) beside them. A shard is closed before it would exceed ``max_count``
samples or ``max_size`` bytes.

Keys are stable and unique: the image's path relative to the root (or as
written in the CSV) without its extension, with every character outside
``[A-Za-z0-9_-]`` replaced by ``_`` (dots would split the webdataset key), and
``_2``, ``_3``... appended on a collision. Sample order is a permutation drawn
from ``seed``, so the same input and seed give the same shards.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from l2r import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# tar framing: a 512-byte header per member, data padded to 512, two zero blocks at the end.
_BLOCK = 512
_END_OF_ARCHIVE = 2 * _BLOCK


@dataclass
class SampleSource:
    """Where one sample's bytes come from: ``load()`` returns {suffix: bytes}."""

    key: str
    label: int
    load: Callable[[], dict]


def _key_from_path(relative_path: str) -> str:
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    return _UNSAFE_KEY_CHARS.sub("_", stem.replace("\\", "/").strip("/"))


def _unique_keys(candidates: list[str]) -> list[str]:
    seen: set[str] = set()
    keys = []
    for key in candidates:
        unique, n = key, 1
        while unique in seen:
            n += 1
            unique = f"{key}_{n}"
        seen.add(unique)
        keys.append(unique)
    return keys


def _file_loader(path: Path) -> Callable[[], dict]:
    suffix = path.suffix.lower().lstrip(".")
    return lambda: {suffix: path.read_bytes()}


def folder_samples(root) -> tuple[list[SampleSource], list[str]]:
    """Samples from an ImageFolder tree (one sub-folder per class, sorted by name) and the class names."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    paths, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                paths.append(path)
                labels.append(index)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    keys = _unique_keys([_key_from_path(p.relative_to(root).as_posix()) for p in paths])
    return [SampleSource(k, lbl, _file_loader(p)) for k, lbl, p in zip(keys, labels, paths)], classes


def csv_samples(csv_path) -> tuple[list[SampleSource], list[str]]:
    """Samples from a CSV of ``path,label`` (a header row is optional; paths relative to the CSV).

    Labels that are all integers are used as indices; otherwise class names are
    sorted and numbered.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    if any(len(r) < 2 for r in rows):
        raise ValueError(f"{csv_path}: every row needs path,label")
    raw_labels = [r[1].strip() for r in rows]
    if all(re.fullmatch(r"\d+", lbl) for lbl in raw_labels):
        labels = [int(lbl) for lbl in raw_labels]
        classes = [str(i) for i in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw_labels))
        labels = [classes.index(lbl) for lbl in raw_labels]
    paths = [(csv_path.parent / r[0].strip()) for r in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {csv_path} do not exist, e.g. {missing[0]}")
    keys = _unique_keys([_key_from_path(r[0].strip()) for r in rows])
    return [SampleSource(k, lbl, _file_loader(p)) for k, lbl, p in zip(keys, labels, paths)], classes


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_samples(n: int, size: int, seed: int = 0, num_classes: int = 10) -> tuple[list[SampleSource], list[str]]:
    """n generated samples (PNG image + mask.png), rendered lazily when written."""
    from l2r import synthetic

    def loader(i: int):
        def load():
            rng = np.random.default_rng([seed, i])
            image, mask, _ = synthetic.make_sample(rng, size, num_classes, label=i % num_classes)
            return {"png": _png_bytes(image), "mask.png": _png_bytes(mask.astype(np.uint8) * 255)}

        return load

    samples = [SampleSource(f"synthetic_{i:08d}", i % num_classes, loader(i)) for i in range(n)]
    return samples, synthetic.class_names(num_classes)


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


class ShardWriter:
    """Writes samples into numbered tar shards on any fsspec filesystem, rolling over at the limits."""

    def __init__(self, fs, directory: str, prefix: str, max_count: int | None, max_size: int | None):
        if not max_count and not max_size:
            raise ValueError("give max_count or max_size")
        self.fs, self.directory, self.prefix = fs, directory.rstrip("/"), prefix
        self.max_count, self.max_size = max_count, max_size
        self.paths: list[str] = []
        self._file = self._tar = None
        self._count = self._size = 0

    def _open_next(self) -> None:
        self.close()
        path = f"{self.directory}/{self.prefix}-{len(self.paths):04d}.tar"
        self._file = self.fs.open(path, "wb")
        # Stream mode: no seeking, so it works on object stores too.
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)
        self.paths.append(path)
        self._count = self._size = 0

    def write(self, key: str, members: dict) -> None:
        size = sum(_member_bytes(len(data)) for data in members.values())
        full = self._tar is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_size and self._count > 0 and self._size + size + _END_OF_ARCHIVE > self.max_size)
        )
        if self._tar is None or full:
            self._open_next()
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None


def write_shards(
    samples: list[SampleSource],
    classes: list[str],
    output: str,
    prefix: str = "train",
    max_count: int | None = 5000,
    max_size: int | None = None,
    seed: int = 0,
    filesystem=None,
    progress: bool = True,
) -> list[str]:
    """Shuffle samples with ``seed``, write them as shards plus ``classes.json``; return the shard URLs."""
    fs, directory, _ = storage.resolve(output, filesystem=filesystem)
    fs.makedirs(directory, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(samples))
    writer = ShardWriter(fs, directory, prefix, max_count, max_size)
    try:
        for index in tqdm(order, desc=f"writing {prefix} shards", unit="img", disable=not progress):
            sample = samples[index]
            members = sample.load()
            members["cls"] = str(sample.label).encode()
            writer.write(sample.key, members)
    finally:
        writer.close()
    with fs.open(f"{directory.rstrip('/')}/classes.json", "w") as f:
        json.dump({str(i): name for i, name in enumerate(classes)}, f, indent=1)
    remote = "://" in output
    return [fs.unstrip_protocol(p) if remote else p for p in writer.paths]


def parse_size(text: str | int | None) -> int | None:
    """Byte sizes like ``500000``, ``200MB``, ``1.5GB`` (powers of 1000) or ``64MiB`` (powers of 1024)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a byte size: {text!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def make_shards(
    output: str,
    folder: str | None = None,
    csv_file: str | None = None,
    synthetic: int | None = None,
    size: int = 32,
    num_classes: int = 10,
    prefix: str = "train",
    max_count: int | None = 5000,
    max_size: int | str | None = None,
    seed: int = 0,
    filesystem=None,
    progress: bool = True,
) -> list[str]:
    """Build shards from exactly one source: an ImageFolder ``folder``, a ``csv_file``, or ``synthetic`` N samples."""
    if sum(x is not None for x in (folder, csv_file, synthetic)) != 1:
        raise ValueError("give exactly one of folder, csv_file, synthetic")
    if folder is not None:
        samples, classes = folder_samples(folder)
    elif csv_file is not None:
        samples, classes = csv_samples(csv_file)
    else:
        samples, classes = synthetic_samples(synthetic, size, seed, num_classes)
    return write_shards(samples, classes, output, prefix, max_count, parse_size(max_size), seed, filesystem, progress)
