"""Batch attribution: shards -> maps of every method -> exact deletion/insertion curves -> Parquet.

Data flow (one streaming Ray Data pipeline over every unfinished shard)::

    pipeline.data.read_shards (decode + preprocess, per-sample errors as rows)
      -> map_batches(AttributionWorker, ActorPoolStrategy(size=N))   models loaded once per actor
      -> iter_batches in the driver, in input order (preserve_order)
      -> one Parquet file per input shard, streamed with pyarrow, committed atomically

Output layout under ``output`` (a local folder or any fsspec URL)::

    manifest.json                 config, model/explainer identity, protocol, versions, counts
    parquet/<shard>.parquet       one row per (image, method); read the folder with pandas/pyarrow
    done/<shard>.json             success marker, written last (rows, errors, AUC sums)

Resumability: the driver consumes rows in shard order, so when the first row of shard i+1
arrives (or the stream ends) shard i is complete. Its Parquet file is then committed (local:
written under a hidden temporary name and renamed; object stores: an object appears only
when its upload completes) and only then its marker is written. A rerun skips shards with a
marker and rewrites the others under the same names, so after a crash and a rerun every input
key appears exactly once (per method). A rerun into an output written with a different
configuration (methods, protocol, models) is refused unless ``overwrite`` is set.

Paths: the target checkpoint and the explainer folder are read by every actor, so on a
multi-node cluster they must be on shared storage (or the same path on every node).

Costs recorded per row: ``forward_passes`` / ``backward_passes`` (target passes per image
to produce the map; the evaluation's 2(K-2)+1 forwards are the same for every method) and
``seconds`` (wall seconds per image to produce the map, amortised over the batch);
``eval_seconds`` is the per-image time of the exact curves.

Evidence masks (``with_mask``, ``--masks``): for shards whose samples carry a ``mask.png``
(the synthetic data of ``pipeline.shards``), each row also gets ``pointing_hit`` (the map's
top pixel lies inside the mask) and ``mask_auroc`` (AUROC of the map's scores for telling
mask pixels from the rest, ties averaged), both from ``l2r.metrics`` on the method's raw map.
Both are null without the option, for error rows, and where undefined (an empty mask; for
``mask_auroc`` also a mask covering the whole image). With the option a sample without a
mask becomes an error row (``missing mask``), as ``pipeline.data.read_shards`` reports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from l2r.metrics import Protocol
from pipeline.progress import Progress, quiet_ray_data

EXPLAINER_METHOD = "l2r"
PARQUET_DIR = "parquet"
DONE_DIR = "done"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# bf16 autocasts the passes (softmax stays float32, l2r.classifier); the curves themselves are
# accumulated in float32 either way.
PRECISIONS = ("fp32", "bf16")

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
    ]
)


def all_methods() -> tuple[str, ...]:
    from l2r.baselines import METHODS

    return (EXPLAINER_METHOD, *METHODS)


@dataclass
class AttributeConfig:
    """Everything a run needs; recorded in the manifest."""

    shards: str | list[str]
    output: str
    target: str | None = None  # model spec: timm:NAME or package.module:callable; None: the explainer's
    checkpoint: str | None = None  # weight file, local or fsspec URL (timm: replaces the pretrained weights)
    random_init: bool = False  # explain an untrained model on purpose (recorded, warned about)
    init_seed: int = 0  # seeds the model's construction (weights not read from a file)
    background_logit: bool = False  # the model's logit 0 is a background class: dropped
    model_kwargs: dict = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None
    crop_pct: float = 1.0
    explainer: str | None = None  # artifact directory or URL (needed for method l2r)
    allow_target_mismatch: bool = False  # use the explainer with a target it was not trained for
    methods: tuple[str, ...] = (EXPLAINER_METHOD,)
    method_options: dict = field(default_factory=dict)  # {"rise": {"n_masks": 500}, ...}
    refine_steps: int = 0  # test-time refinement of the l2r map (l2r.refine)
    steps: int = Protocol.steps
    reference: str = Protocol.reference
    target_rule: str = Protocol.target  # prediction | ground_truth
    with_mask: bool = False  # read mask.png of each sample; add pointing_hit and mask_auroc
    holdout_every: int = 0  # > 0: only the samples a training run with data.holdout_every N held back
    device: str = "auto"  # auto (GPU actors when the cluster has GPUs) | cpu | cuda
    actors: int | None = None  # default: one per GPU; on CPU one per CPU left after reads
    actor_cpus: float | None = None  # default: 1 per GPU actor; on CPU what reads leave, shared
    actor_gpus: float = 1.0
    threads: int | None = None  # torch threads per actor (default from actor_cpus)
    batch_size: int | None = None  # images per actor call (default 64 CPU / 256 GPU)
    forward_batch: int | None = None  # perturbed images per target forward (128 CPU / 1024 GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast of every target/explainer pass; recorded in the protocol)
    read_cpus: float = 0.25
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs
    overwrite: bool = False
    progress_interval: float = 30.0
    ray_progress_bars: bool = False
    address: str | None = None  # ray.init address (None: RAY_ADDRESS or a local instance)

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        known = all_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {known}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeated: {self.methods}")
        if EXPLAINER_METHOD in self.methods and not self.explainer:
            raise ValueError("method 'l2r' needs an explainer artifact directory (explainer=...)")
        if self.target is None:
            if not self.explainer:
                raise ValueError("give the target model (target=... / --model) or an explainer artifact that records it")
            self._target_from_artifact()
        if self.refine_steps < 0:
            raise ValueError("refine_steps must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        extra = set(self.method_options) - set(self.methods)
        if extra:
            raise ValueError(f"method_options for methods not run: {sorted(extra)}")
        self.protocol  # validates steps/reference/target

    def _target_from_artifact(self) -> None:
        """Fill the target model from the explainer artifact's record (written by the training job)."""
        from l2r.artifact import local_artifact, read_target_record

        recorded = read_target_record(local_artifact(self.explainer, self.storage_options))
        self.target = recorded.spec
        self.checkpoint = recorded.checkpoint
        self.random_init = recorded.random_init
        self.init_seed = recorded.init_seed
        self.background_logit = recorded.background_logit
        self.model_kwargs = dict(recorded.kwargs)
        self.mean, self.std, self.input_size = recorded.mean, recorded.std, recorded.input_size
        self.crop_pct = recorded.crop_pct

    def target_record(self):
        """The target this run explains, as `l2r.target_record.TargetRecord` (not yet built)."""
        from l2r.target_record import TargetRecord

        checkpoint = self.checkpoint
        if checkpoint and "://" not in str(checkpoint):
            checkpoint = os.path.abspath(checkpoint)  # actors may run in another directory
        return TargetRecord(spec=self.target, checkpoint=checkpoint, random_init=self.random_init,
                            init_seed=self.init_seed, kwargs=self.model_kwargs, mean=self.mean, std=self.std,
                            input_size=self.input_size, crop_pct=self.crop_pct,
                            background_logit=self.background_logit)

    @property
    def protocol(self) -> Protocol:
        return Protocol(steps=self.steps, reference=self.reference, target=self.target_rule)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


# ---------------------------------------------------------------- the work on one batch (no Ray)


class Attributor:
    """Loads the target (and explainer) once; turns a batch of decoded rows into output rows."""

    def __init__(self, settings: dict):
        import torch

        from l2r.target_record import TargetRecord

        threads = settings.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(settings["device"])
        self.methods = tuple(settings["methods"])
        self.method_options = settings.get("method_options") or {}
        self.refine_steps = int(settings.get("refine_steps") or 0)
        self.protocol = Protocol(**settings["protocol"])
        self.forward_batch = int(settings["forward_batch"])
        self.precision = settings.get("precision") or "fp32"
        self.with_mask = bool(settings.get("with_mask"))
        record = TargetRecord.from_dict(settings["target"])
        expected = record.weights_sha256
        self.target = record.build(self.device, settings.get("storage_options"))
        if expected and record.weights_sha256 != expected:
            # E.g. a checkpoint path that holds another file on this node than on the driver's.
            raise RuntimeError(f"target {record.spec}: the weights loaded on this node (sha256 "
                               f"{record.weights_sha256[:16]}...) are not the driver's ({expected[:16]}...)")
        if self.device.type == "cuda":
            # cuDNN's fastest convolutions want NHWC; inputs are converted on the fly.
            self.target.to(memory_format=torch.channels_last)
        self.explainer = None
        self.explainer_forwards = 0
        if EXPLAINER_METHOD in self.methods:
            from l2r.artifact import local_artifact
            from l2r.explainer import load_explainer

            folder = local_artifact(settings["explainer"], settings.get("storage_options"))
            self.explainer, _ = load_explainer(folder, target=self.target)
            self.explainer.to(self.device).eval()
            # An explainer on the target's own layers runs the target once per map.
            self.explainer_forwards = 1 if self.explainer.config.get("backbone") == "target" else 0
        self.calls = 0

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _map(self, method, images, targets):
        """(maps (B,H,W), cost per image) for one method."""
        import torch

        if method == EXPLAINER_METHOD:
            with torch.no_grad():
                maps = self.explainer(images, targets)[:, 0].float()
            cost = {"forward_passes": self.explainer_forwards, "backward_passes": 0}
            if self.refine_steps:
                from l2r.refine import refine

                # Verified against the same exact protocol the rows are scored with.
                maps, extra = refine(self.target, images, maps, targets, steps=self.refine_steps,
                                     reference=self.protocol.reference, eval_steps=self.protocol.steps)
                cost = {k: cost[k] + extra[k] for k in cost}
            return maps.detach(), cost
        from l2r.baselines import attribute

        # Baselines make their maps in float32 whatever the precision: Captum and pytorch-grad-cam
        # hand activations and gradients to numpy, which has no bfloat16.
        with torch.autocast(self.device.type, enabled=False):
            return attribute(method, self.target, images, targets, **self.method_options.get(method, {}))

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, batch: dict) -> pa.Table:
        with self._autocast():
            return self._rows(batch)

    def _rows(self, batch: dict) -> pa.Table:
        import torch

        from l2r.images import encode_heatmap, to_tensor
        from l2r.metrics import predict

        self.calls += 1
        keys, sources = batch["key"], batch["source"]
        labels = np.asarray(batch["label"], dtype=np.int64)
        errors = [None if e is None else str(e) for e in batch["error"]]
        n = len(keys)
        if self.protocol.target == "ground_truth":
            errors = [e if e is not None or labels[i] >= 0 else "missing label: target rule 'ground_truth' needs a .cls member"
                      for i, e in enumerate(errors)]
        valid = np.array([e is None for e in errors], dtype=bool)
        idx = np.flatnonzero(valid)
        per_method = {}  # method -> dict of per-valid-image arrays
        pred = pred_prob = target = target_prob = None
        h, w = batch["image"].shape[1:3]
        masks = None
        if self.with_mask:
            if "mask" not in batch:
                raise ValueError("with_mask is set but the batch has no 'mask' column (read_shards(with_mask=True))")
            masks = torch.from_numpy(np.asarray(batch["mask"], dtype=bool)[idx]).to(self.device)
        if len(idx):
            images = to_tensor(batch["image"][idx]).to(self.device)
            clean = predict(self.target, images, self.forward_batch)
            pred_prob_t, pred_t = clean.max(dim=1)
            if self.protocol.target == "ground_truth":
                targets = torch.as_tensor(labels[idx], device=self.device)
            else:
                targets = pred_t
            target_prob_t = clean.gather(1, targets.view(-1, 1))[:, 0]
            pred, pred_prob = pred_t.cpu().numpy(), pred_prob_t.cpu().numpy()
            target, target_prob = targets.cpu().numpy(), target_prob_t.cpu().numpy()
            for method in self.methods:
                per_method[method] = self._run_method(method, images, targets, clean, len(idx), masks)

        position = {int(i): j for j, i in enumerate(idx)}
        rows = {name: [] for name in SCHEMA.names}
        for i in range(n):
            j = position.get(i)
            for method in self.methods:
                res = per_method.get(method)
                err = errors[i]
                if err is None and res["error"][j] is not None:
                    err = res["error"][j]
                ok = err is None
                rows["key"].append(str(keys[i]))
                rows["source"].append(str(sources[i]))
                rows["label"].append(int(labels[i]) if labels[i] >= 0 else None)
                rows["pred"].append(int(pred[j]) if j is not None else None)
                rows["pred_prob"].append(float(pred_prob[j]) if j is not None else None)
                rows["target"].append(int(target[j]) if j is not None else None)
                rows["target_prob"].append(float(target_prob[j]) if j is not None else None)
                rows["method"].append(method)
                rows["deletion_auc"].append(float(res["deletion_auc"][j]) if ok else None)
                rows["insertion_auc"].append(float(res["insertion_auc"][j]) if ok else None)
                rows["deletion_curve"].append(res["deletion_curve"][j] if ok else None)
                rows["insertion_curve"].append(res["insertion_curve"][j] if ok else None)
                rows["heatmap"].append(encode_heatmap(res["maps"][j]) if ok else None)
                rows["height"].append(int(h))
                rows["width"].append(int(w))
                rows["forward_passes"].append(res["forward_passes"] if j is not None else None)
                rows["backward_passes"].append(res["backward_passes"] if j is not None else None)
                rows["seconds"].append(res["seconds"] if j is not None else None)
                rows["eval_seconds"].append(res["eval_seconds"] if j is not None else None)
                rows["error"].append(err)
                evidence = ok and "pointing_hit" in res
                rows["pointing_hit"].append(res["pointing_hit"][j] if evidence else None)
                rows["mask_auroc"].append(res["mask_auroc"][j] if evidence else None)
        return pa.table(rows, schema=SCHEMA)

    def _run_method(self, method, images, targets, clean, b, masks=None) -> dict:
        import torch

        from l2r.metrics import deletion_insertion

        self._sync()
        start = time.perf_counter()
        try:
            maps, cost = self._map(method, images, targets)
        except Exception as exc:
            if self.calls == 1:
                # A method that fails on the first batch is misconfigured: fail the job loudly.
                raise RuntimeError(f"method {method!r} failed: {type(exc).__name__}: {exc}") from exc
            message = f"method failed: {method}: {type(exc).__name__}: {exc}"
            return {"error": [message] * b, "forward_passes": None, "backward_passes": None,
                    "seconds": None, "eval_seconds": None}
        maps = maps.reshape(b, *images.shape[-2:]).float()
        self._sync()
        seconds = (time.perf_counter() - start) / b
        bad = ~torch.isfinite(maps).all(dim=2).all(dim=1)
        if bad.any():
            maps = torch.where(bad[:, None, None], torch.zeros_like(maps), maps)
        start = time.perf_counter()
        result = deletion_insertion(self.target, images, maps, targets, steps=self.protocol.steps,
                                    reference=self.protocol.reference, max_batch=self.forward_batch,
                                    clean_probs=clean)
        self._sync()
        eval_seconds = (time.perf_counter() - start) / b
        bad = bad.cpu().numpy()
        evidence = {}
        if masks is not None:
            from l2r.metrics import mask_auroc, pointing_game

            empty = ~masks.flatten(1).any(dim=1)
            hits = pointing_game(maps, masks).cpu().tolist()
            aurocs = mask_auroc(maps, masks).cpu().tolist()
            evidence = {
                "pointing_hit": [None if e else bool(x) for x, e in zip(hits, empty.cpu().tolist())],
                "mask_auroc": [None if a != a else float(a) for a in aurocs],  # NaN: undefined
            }
        return {
            **evidence,
            "error": [f"method failed: {method}: map is not finite" if x else None for x in bad],
            "maps": maps.cpu().numpy(),
            "deletion_auc": result["deletion_auc"].float().cpu().numpy(),
            "insertion_auc": result["insertion_auc"].float().cpu().numpy(),
            "deletion_curve": list(result["deletion_curve"].float().cpu().numpy()),
            "insertion_curve": list(result["insertion_curve"].float().cpu().numpy()),
            "forward_passes": int(cost["forward_passes"]),
            "backward_passes": int(cost["backward_passes"]),
            "seconds": seconds,
            "eval_seconds": eval_seconds,
        }


class AttributionWorker:
    """The actor class given to ``map_batches``: one ``Attributor`` per actor."""

    def __init__(self, settings: dict):
        import torch

        settings = dict(settings)
        if settings["device"] == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a GPU actor was placed on a node without CUDA")
        self.attributor = Attributor(settings)

    def __call__(self, batch: dict) -> pa.Table:
        return self.attributor(batch)


# ---------------------------------------------------------------- output files


def _filesystem(url: str, filesystem=None, storage_options: dict | None = None):
    """(fsspec filesystem, path without protocol, is_local)."""
    import fsspec

    if filesystem is not None:
        fs, path = filesystem, filesystem._strip_protocol(url)
    else:
        options = (storage_options or {}) if "://" in url else {}
        fs, path = fsspec.core.url_to_fs(url, **options)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    local = "file" in protocols or "local" in protocols
    if local:
        path = os.path.abspath(path)
    return fs, path.rstrip("/"), local


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


class Output:
    """The output folder: per-shard Parquet files, success markers, the manifest."""

    def __init__(self, url: str, filesystem=None, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root, self.local = _filesystem(url, filesystem, storage_options)
        self.fs.makedirs(f"{self.root}/{PARQUET_DIR}", exist_ok=True)
        self.fs.makedirs(f"{self.root}/{DONE_DIR}", exist_ok=True)

    def parquet_path(self, name: str) -> str:
        return f"{self.root}/{PARQUET_DIR}/{name}.parquet"

    def marker_path(self, name: str) -> str:
        return f"{self.root}/{DONE_DIR}/{name}.json"

    def _write_bytes(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write_json(self, path: str, document: dict) -> None:
        self._write_bytes(path, (json.dumps(document, indent=2, default=str) + "\n").encode())

    def finished(self, name: str, source: str) -> dict | None:
        """The marker of a finished shard, or None. A marker for another source is a clash."""
        marker = self.read_json(self.marker_path(name))
        if marker is None or not self.fs.exists(self.parquet_path(name)):
            return None
        if marker.get("source") != source:
            raise ValueError(
                f"output {self.parquet_path(name)} holds shard {marker.get('source')!r}, not {source!r}: "
                "use another output folder for shards with the same names"
            )
        return marker

    def remove_all(self) -> None:
        """Forget every earlier result in this folder (our markers and Parquet files only)."""
        for sub, suffix in ((DONE_DIR, ".json"), (PARQUET_DIR, ".parquet")):
            for path in _listing(self.fs, f"{self.root}/{sub}"):
                if path.endswith(suffix):
                    self.fs.rm(path)
        self.fs.invalidate_cache()

    def open_shard(self, name: str) -> "ShardWriter":
        return ShardWriter(self, name)

    def clean_temporary(self) -> None:
        """Remove temporary files a crashed local run left behind (ours only: hidden .*.tmp-*)."""
        if not self.local:
            return
        for sub in (PARQUET_DIR, DONE_DIR, ""):
            folder = f"{self.root}/{sub}".rstrip("/")
            for entry in os.listdir(folder):
                if entry.startswith(".") and ".tmp-" in entry:
                    os.remove(f"{folder}/{entry}")


def _listing(fs, folder: str) -> list[str]:
    """File paths in a folder; an absent folder (an empty prefix on an object store) is empty."""
    try:
        return [p for p in fs.ls(folder, detail=False) if p.rstrip("/") != folder.rstrip("/")]
    except FileNotFoundError:
        return []


class ShardWriter:
    """Streams one shard's rows into a Parquet file; ``commit`` makes it visible atomically."""

    def __init__(self, output: Output, name: str, row_group_rows: int = 2048):
        import pyarrow.parquet as pq

        self.output, self.name, self.row_group_rows = output, name, row_group_rows
        self.final = output.parquet_path(name)
        if output.local:
            self.path = f"{os.path.dirname(self.final)}/.{name}.parquet.tmp-{uuid.uuid4().hex}"
            self.file = open(self.path, "wb")
        else:
            self.path = self.final  # an object appears only when its upload completes
            self.file = output.fs.open(self.path, "wb")
        self.writer = pq.ParquetWriter(self.file, SCHEMA, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending))
            self.pending, self.pending_rows = [], 0

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        if self.output.local:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.path, self.final)
        else:
            self.file.close()

    def abort(self) -> None:
        try:
            self.writer.close()
            self.file.close()
        except Exception:
            pass
        if self.output.local and os.path.exists(self.path):
            os.remove(self.path)


# ---------------------------------------------------------------- identity and statistics


def sha256_file(path) -> str:
    from l2r.classifier import sha256_file as sha

    return sha(path)


def explainer_identity(path: str) -> dict:
    from l2r.explainer import CONFIG_FILE, WEIGHTS_FILE

    folder = Path(path)
    return {
        "path": str(folder.resolve()),
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "document": json.loads((folder / CONFIG_FILE).read_text()),
    }


def package_versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("l2r", "torch", "timm", "ray", "pyarrow", "numpy", "fsspec", "s3fs", "captum", "grad-cam"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


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


# ---------------------------------------------------------------- the driver


def _cluster_plan(config: AttributeConfig) -> dict:
    """Device, actor count and per-actor resources, from the config and the cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda":
        if gpus == 0:
            raise RuntimeError("device 'cuda' asked for, but the Ray cluster has no GPUs")
        actors = config.actors or max(1, int(gpus / config.actor_gpus))
        actor_cpus = config.actor_cpus if config.actor_cpus is not None else min(1.0, max(0.25, (cpus - 1) / actors))
        return {"device": "cuda", "actors": actors, "num_cpus": actor_cpus, "num_gpus": config.actor_gpus,
                "threads": config.threads or max(1, int(actor_cpus)), "batch_size": config.batch_size or 256,
                "forward_batch": config.forward_batch or 1024}
    # Leave room for two read tasks so reading and writing are never starved by the actors.
    spare = max(cpus - 2 * config.read_cpus, 0.25)
    # Processes scale better than threads for the small forwards of the curves: one actor per
    # CPU, one thread each, unless told otherwise.
    actors = config.actors or max(1, int(spare))
    actor_cpus = config.actor_cpus if config.actor_cpus is not None else spare / actors
    threads = config.threads or max(1, int(actor_cpus))
    return {"device": "cpu", "actors": actors, "num_cpus": actor_cpus, "num_gpus": 0, "threads": threads,
            "batch_size": config.batch_size or 64, "forward_batch": config.forward_batch or 128}


def plan_shortfall(plan: dict, read_cpus: float) -> str | None:
    """Why the plan cannot run on the cluster as it is now, or None. The actors hold their CPUs for the
    whole run, so without room for one read task nothing is ever read (a silent stall, not an error)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    needed = plan["actors"] * plan["num_cpus"] + read_cpus
    if needed <= cpus + 1e-9:
        return None
    return (f"{plan['actors']} actor(s) x {plan['num_cpus']} CPU + {read_cpus} CPU for a read task = {needed} CPUs, "
            f"but the cluster has {cpus}: the job waits until the cluster grows (lower --actors/--actor-cpus, "
            "or leave --actor-cpus unset to let the job size them)")


def _identity(config: AttributeConfig, record, explainer: dict | None) -> dict:
    """What must match for a rerun to continue an earlier run's output."""
    return {
        "methods": list(config.methods),
        "method_options": config.method_options,
        "refine_steps": config.refine_steps if EXPLAINER_METHOD in config.methods else 0,
        "protocol": config.protocol.to_dict(),
        "crop_pct": config.crop_pct,
        "target": record.to_dict(),
        "explainer_weights_sha256": explainer["weights_sha256"] if explainer else None,
        # Only when set, so outputs written before the option existed still resume.
        **({"with_mask": True} if config.with_mask else {}),
        **({"holdout_every": config.holdout_every} if config.holdout_every else {}),
        **({"precision": config.precision} if config.precision != "fp32" else {}),
        **({"allow_target_mismatch": True} if config.allow_target_mismatch else {}),
    }


def _split_by_source(table: pa.Table):
    """Contiguous runs of one source: [(source, table slice)], in order."""
    sources = table.column("source").to_pylist()
    start = 0
    for i in range(1, len(sources) + 1):
        if i == len(sources) or sources[i] != sources[start]:
            yield sources[start], table.slice(start, i - start)
            start = i


def run_attribution(config: AttributeConfig, filesystem=None, output_filesystem=None,
                    log: Callable[[str], None] | None = None, _fail_after_shards: int | None = None) -> dict:
    """Run (or resume) an attribution job; returns the summary (also written to the manifest).

    ``filesystem`` / ``output_filesystem``: fsspec filesystems for the shards and the output
    (default: inferred from the URLs with ``config.storage_options``). ``_fail_after_shards``
    is a test hook: raise after committing that many shards, as a crash would.
    """
    import ray

    from pipeline.data import expand_urls, read_shards

    log = log or (lambda line: print(line, flush=True))
    started = time.time()
    if filesystem is None and config.storage_options and any("://" in s for s in _as_list(config.shards)):
        import fsspec

        protocol = next(s for s in _as_list(config.shards) if "://" in s).split("://", 1)[0]
        filesystem = fsspec.filesystem(protocol, **config.storage_options)
    urls = [u if "://" in u else os.path.abspath(u) for u in expand_urls(config.shards, filesystem)]
    if len(set(urls)) != len(urls):
        raise ValueError("the same shard is listed twice")
    names = output_names(urls)
    output = Output(config.output, output_filesystem, config.storage_options)

    record = config.target_record()
    if record.random_init:
        log(f"warning: target {record.spec} has random weights (random_init): its maps explain an untrained model")
    target = record.build("cpu", config.storage_options)
    explainer = None
    if EXPLAINER_METHOD in config.methods:
        from l2r.artifact import local_artifact, read_target_record
        from l2r.target_record import check_same_target

        folder = local_artifact(config.explainer, config.storage_options)
        explainer = explainer_identity(folder)
        try:
            trained = read_target_record(folder)
        except ValueError:  # an explainer saved without a record (not by the training job): nothing to check
            trained = None
            log(f"warning: {config.explainer} does not record the target it was trained for; not checked")
        if trained is None:
            pass
        elif config.allow_target_mismatch:
            found = trained.differences(record)
            if found:
                log(f"warning: allow_target_mismatch: the explainer was trained for {trained.describe()}, "
                    f"used with {record.describe()}: {'; '.join(found)}")
        else:
            check_same_target(trained, record, config.explainer)
    identity = json.loads(json.dumps(_identity(config, record, explainer), default=str))
    manifest_path = f"{output.root}/{MANIFEST}"
    previous = output.read_json(manifest_path)
    if previous is not None and previous.get("identity") != identity:
        if not config.overwrite:
            raise ValueError(
                f"{config.output} holds results of a different configuration (methods, protocol or models); "
                "use another output folder, or overwrite=True (--overwrite) to start over"
            )
    if config.overwrite:
        output.remove_all()
    output.clean_temporary()

    stats = Stats(config.methods)
    todo, skipped = [], 0
    shard_log = {}
    for url in urls:
        marker = output.finished(names[url], url)
        if marker is None:
            todo.append(url)
        else:
            skipped += 1
            stats.add(marker["stats"])
            shard_log[url] = {"file": f"{PARQUET_DIR}/{names[url]}.parquet", **marker["stats"], "resumed": True}

    if not ray.is_initialized():
        ray.init(address=config.address, log_to_driver=False, logging_level="ERROR")
    quiet_ray_data()
    plan = _cluster_plan(config)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "config": config.to_dict(),
        "identity": identity,
        "target": identity["target"],
        "explainer": explainer,
        "protocol": {**config.protocol.to_dict(), "precision": config.precision},
        "plan": plan,
        "versions": package_versions(),
        "layout": {"parquet": f"{PARQUET_DIR}/<shard>.parquet", "markers": f"{DONE_DIR}/<shard>.json"},
    }
    output.write_json(manifest_path, manifest)
    log(f"attribute: {len(urls)} shards ({skipped} already done, {len(todo)} to do); methods {','.join(config.methods)}; "
        f"{plan['actors']} {plan['device']} actor(s), batch {plan['batch_size']}")
    short = plan_shortfall(plan, config.read_cpus)
    if todo and short:
        log(f"warning: {short}")

    run_stats = Stats(config.methods)
    run_started = time.perf_counter()
    first_batch = None  # start-up (actors, model loading, first read) ends with the first batch
    if todo:
        settings = {
            "device": plan["device"],
            "threads": plan["threads"],
            "methods": list(config.methods),
            "method_options": config.method_options,
            "refine_steps": config.refine_steps,
            "with_mask": config.with_mask,
            "protocol": config.protocol.to_dict(),
            "forward_batch": plan["forward_batch"],
            "precision": config.precision,
            "target": record.to_dict(),
            "storage_options": config.storage_options,
            "explainer": (config.explainer if "://" in str(config.explainer) else str(Path(config.explainer).resolve()))
            if explainer else None,
        }
        ds = read_shards(todo, target.input_size, crop_pct=config.crop_pct, with_mask=config.with_mask,
                         filesystem=filesystem, num_cpus=config.read_cpus, rows_per_batch=plan["batch_size"],
                         holdout_every=config.holdout_every, part="holdout")
        # A read task's rows otherwise leave as one block of up to 128 MiB (a whole shard): one actor
        # would get all of it, and nothing would come back until it was done. Blocks of about one
        # batch of decoded images (uint8 image, bool mask) stream instead. (A repartition would do it
        # too, but its tasks ask for a whole CPU that the actors may hold: a deadlock on small machines.)
        height, width = target.input_size
        ds.context.target_max_block_size = plan["batch_size"] * height * width * 4
        # Ray Data stops a dataset after 30 min without a finished block. One batch of a costly
        # method (RISE: 1,000 target passes an image) at 160 px on one CPU thread takes longer than
        # that, and the run was lost. The job's own progress line shows that it is alive.
        ds.context.execution_no_progress_timeout_s = -1
        ds = ds.map_batches(
            AttributionWorker,
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            batch_size=plan["batch_size"],
            batch_format="numpy",
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"] or None,
            fn_constructor_kwargs={"settings": settings},
        )
        ds.context.execution_options.preserve_order = True  # shard i is complete when shard i+1 starts
        ds.context.enable_progress_bars = config.ray_progress_bars
        order = {url: i for i, url in enumerate(todo)}
        state = {"current": 0, "writer": None, "stats": None, "t0": time.perf_counter(), "committed": 0}
        # The total is estimated from the shards finished so far (shard sizes are not known up front).
        progress = Progress("attribute", None, "images", interval=config.progress_interval, log=log)

        def finish_current():
            i = state["current"]
            url = todo[i]
            writer = state["writer"] or output.open_shard(names[url])
            shard_stats = state["stats"] or Stats(config.methods)
            writer.commit()
            seconds = time.perf_counter() - state["t0"]
            marker = {"source": url, "file": f"{PARQUET_DIR}/{names[url]}.parquet", "rows": writer.rows,
                      "seconds": seconds, "stats": shard_stats.to_dict()}
            output.write_json(output.marker_path(names[url]), marker)
            shard_log[url] = {"file": marker["file"], **shard_stats.to_dict(), "seconds": seconds}
            elapsed = time.perf_counter() - run_started
            log(f"  [{skipped + i + 1}/{len(urls)}] {names[url]}: {shard_stats.images} images, {shard_stats.errors} errors; "
                f"run: {run_stats.images} images in {elapsed:.1f} s ({run_stats.images / max(elapsed, 1e-9):.1f} images/s)")
            state.update(current=i + 1, writer=None, stats=None, t0=time.perf_counter())
            state["committed"] += 1
            progress.total = round(run_stats.images / state["committed"] * len(todo))
            if _fail_after_shards is not None and state["committed"] >= _fail_after_shards:
                raise RuntimeError(f"test hook: failing after {state['committed']} shards")

        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if first_batch is None:
                    first_batch = time.perf_counter()
                table = table.cast(SCHEMA) if table.schema != SCHEMA else table
                for source, part in _split_by_source(table):
                    i = order.get(source)
                    if i is None or i < state["current"]:
                        raise RuntimeError(f"rows of shard {source!r} arrived out of order")
                    while state["current"] < i:
                        finish_current()
                    if state["writer"] is None:
                        state["writer"] = output.open_shard(names[source])
                        state["stats"] = Stats(config.methods)
                    state["writer"].write(part)
                    state["stats"].add_table(part)
                    run_stats.add_table(part)
                    progress.update(run_stats.images, errors=run_stats.errors,
                                    shard=f"{state['current'] + 1}/{len(todo)}")
            while state["current"] < len(todo):
                finish_current()
            progress.update(run_stats.images, force=True, errors=run_stats.errors, shard=f"{len(todo)}/{len(todo)}")
        except BaseException:
            if state["writer"] is not None:
                state["writer"].abort()
            raise
    seconds = time.perf_counter() - run_started
    stats.add(run_stats.to_dict())
    summary = {
        "output": config.output,
        "shards": len(urls),
        "shards_skipped": skipped,
        "shards_done": len(todo),
        "images": stats.images,
        "errors": stats.errors,
        "rows": stats.rows,
        "error_rows": stats.error_rows,
        "images_this_run": run_stats.images,
        "seconds": seconds,
        "images_per_s": run_stats.images / seconds if seconds > 0 and run_stats.images else 0.0,
        "startup_seconds": (first_batch - run_started) if first_batch is not None else None,
        "methods": stats.means(),
    }
    manifest.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary,
                    counts={"images_in": stats.images, "rows_out": stats.rows, "images_errored": stats.errors,
                            "rows_errored": stats.error_rows},
                    shards={url: shard_log.get(url) for url in urls})
    output.write_json(manifest_path, manifest)
    log(format_summary(summary))
    return summary


def _as_list(spec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def format_summary(summary: dict) -> str:
    evidence = any(m.get("pointing_game") is not None for m in summary["methods"].values())
    header = f"  {'method':<10} {'deletion_auc':>12} {'insertion_auc':>13} {'images':>7} {'errors':>6}"
    lines = [
        f"done: {summary['images']} images ({summary['errors']} errored) in {summary['shards']} shards "
        f"({summary['shards_skipped']} skipped as already done); this run {summary['images_this_run']} images "
        f"in {summary['seconds']:.1f} s = {summary['images_per_s']:.2f} images/s",
        header + (f" {'pointing':>8} {'mask_auroc':>10}" if evidence else ""),
    ]

    def fmt(value, width):
        return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"

    for method, m in summary["methods"].items():
        line = (f"  {method:<10} {fmt(m['deletion_auc'], 12)} {fmt(m['insertion_auc'], 13)} "
                f"{m['images']:>7} {m['errors']:>6}")
        if evidence:
            line += f" {fmt(m.get('pointing_game'), 8)} {fmt(m.get('mask_auroc'), 10)}"
        lines.append(line)
    return "\n".join(lines)


def read_results(output: str, filesystem=None, storage_options: dict | None = None) -> pa.Table:
    """All committed rows of an output folder (shards with a success marker) as one pyarrow Table."""
    import pyarrow.parquet as pq

    fs, root, _ = _filesystem(output, filesystem, storage_options)
    tables = []
    for marker in sorted(_listing(fs, f"{root}/{DONE_DIR}")):
        name = marker.rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith(".json"):
            continue
        with fs.open(f"{root}/{PARQUET_DIR}/{name[: -len('.json')]}.parquet", "rb") as f:
            tables.append(pq.read_table(f, schema=SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
