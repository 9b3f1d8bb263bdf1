"""The training data as the workers see it: rows of the Ray Data stream reduced to image, label and a
stable sample id; the size the reader decodes at; and the data's identity recorded in the artifact."""

from __future__ import annotations

import hashlib

import numpy as np

from l2r import storage as l2r_storage
from l2r.augment import decode_size


def sample_ids(keys, sources) -> np.ndarray:
    """A stable int64 id per (source, key): tensors only, as iter_torch_batches needs."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{s}\0{k}".encode(), digest_size=8).digest(), "little", signed=True)
         for k, s in zip(keys, sources)],
        dtype=np.int64,
    )


def to_training_columns(batch: dict) -> dict:
    """Ray Data map_batches: drop rows that failed to decode; keep image, label, sample_id."""
    good = np.array([e is None for e in batch["error"]], dtype=bool)
    return {
        "image": batch["image"][good],
        "label": batch["label"][good],
        "sample_id": sample_ids(batch["key"][good], batch["source"][good]),
    }


def training_read_size(dcfg: dict) -> tuple:
    """(size, crop_pct) the training reader decodes at: the model input, or with random crops the
    whole centre square they are taken from (l2r.augment)."""
    if dcfg["augment"]["crop_scale"] is None:
        return dcfg["image_size"], dcfg["crop_pct"]
    return decode_size(dcfg["image_size"], dcfg["crop_pct"]), 1.0


def data_identity(urls: list[str], dcfg: dict | None = None, options: dict | None = None) -> dict:
    """The training data's identity: its shard URLs, a hash of (URL, size) lines, and the split rule
    and augmentation (the held-out samples are those of `l2r.shard_reader.in_part`)."""
    digest = hashlib.sha256()
    for url in urls:
        fs, path, _ = l2r_storage.resolve(url, options)
        digest.update(f"{url}\t{fs.size(path)}\n".encode())
    identity = {"shards": urls, "sha256": digest.hexdigest()}
    if dcfg is not None and dcfg.get("holdout_every"):
        identity["holdout_every"] = int(dcfg["holdout_every"])
        identity["holdout_rule"] = "sample positions p in each shard with p % holdout_every == holdout_every - 1"
    if dcfg is not None and (dcfg["augment"]["crop_scale"] is not None or dcfg["augment"]["flip"]):
        identity["augment"] = dict(dcfg["augment"])
    return identity
