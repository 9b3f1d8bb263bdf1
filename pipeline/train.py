"""Distributed explainer training: Ray Data stream -> Ray Train workers -> an explainer artifact.

The driver (`run`) resolves the data (shard URLs; synthetic shards written into the run
directory when the config names none), optionally fits a demo target, saves the config, and
starts a `TorchTrainer`. Each worker (`train_loop_per_worker`) builds the frozen target (a
replica per worker, no gradients) and the explainer (DDP via `prepare_model`), reads its
share of the stream with `get_dataset_shard("train").iter_torch_batches`, and runs
`l2r.objective.objective_backward` + AdamW.

Run directory `<storage>/<name>/`: `config.yaml`, Ray Train's `checkpoint_*` dirs (each a
`state.pt`: explainer, optimiser, scheduler, step, data position, config), `explainer/`
(the final artifact, `l2r.artifact.write_artifact`), `metrics.jsonl` (every report), `data/`
(demo shards), `target.pt` (demo target), `keys/` (debug.record_keys, local storage only). The
run directory, the data and the target checkpoint are reached through `l2r.storage` with
`run.storage_options` (credentials, endpoint; never written to the run's files), from the
driver and from every worker alike: on several nodes, use an s3:// (or other fsspec) storage.

Reported metrics (means over the window since the last report, averaged over workers): loss,
auc_desc, auc_asc, peak, tau, grid, lr, grad_norm, compute_s (time in `train_step`),
step_time_s (loop time per step, data and Ray included), images_per_s (all workers), step,
resumed_from (the checkpoint step the current attempt started at), epoch, images_seen; with
validation also val_deletion_auc, val_insertion_auc (exact, top-1 target, `val.reference`).

Resume and failures: a rerun with the same storage and name, or a worker group restarted
by `FailureConfig(max_failures)`, loads the latest checkpoint and continues at its step
(the step count, LR schedule and tau annealing are continuous). Data position: the
checkpoint records the epoch and how many batches each worker had taken in it; on resume
each worker reads and discards that many batches of the new epoch stream before training.
So the same number of samples is skipped, but not necessarily the same samples: Ray
Data's split across workers is dynamic, so resuming mid-epoch may repeat some samples and
miss others of that epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from l2r import storage as l2r_storage
from l2r.artifact import (describe_start, local_artifact, read_target_record, resolve_explainer, save_artifact,
                          start_from)
from l2r.augment import augment, decode_size
from l2r.explainer import CONFIG_FILE as EXPLAINER_FILE, build_explainer
from l2r.images import to_tensor
from l2r.metrics import deletion_insertion
from l2r.objective import ObjectiveConfig, objective_backward
from l2r.target_record import TargetRecord, check_same_target
from pipeline.config import dump_config, recorded_config
from pipeline.progress import (Progress, quiet_ray_data, quiet_train_reports, ray_init_kwargs, train_logging_config,
                               verbose_requested)
from pipeline.ray_connect import init_ray

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"  # the latest report, read by the driver's progress line


# ---------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: float = 0.06, warmup_div: float = 25.0, final_div: float = 1e4) -> float:
    """Multiplier of the base lr: linear lr/warmup_div -> lr over warmup*total steps, cosine to lr/warmup_div/final_div."""
    start = 1.0 / warmup_div
    end = start / final_div
    warm = max(1, round(warmup * total))
    if step < warm:
        return start + (1.0 - start) * step / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(explainer: torch.nn.Module, tcfg: dict, total: int):
    params = [p for p in explainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, tcfg["warmup"], tcfg["warmup_div"], tcfg["final_div"])
    )
    return optimizer, scheduler


# ---------------------------------------------------------------- models


def target_record(config: dict) -> TargetRecord:
    """The training target as a `TargetRecord` (the same record the artifact and attribution use)."""
    tcfg = config["target"]
    return TargetRecord(
        spec=tcfg["spec"], checkpoint=tcfg["checkpoint"], random_init=bool(tcfg["random_init"]),
        init_seed=int(tcfg["init_seed"]), kwargs=tcfg["kwargs"],
        mean=tcfg["mean"], std=tcfg["std"], input_size=tcfg["input_size"], crop_pct=config["data"]["crop_pct"],
        background_logit=bool(tcfg["background_logit"]), class_names=tcfg["class_names"],
    )


def make_target(config: dict, device="cpu"):
    """(target model, its built record)."""
    record = target_record(config)
    target = record.build(device, storage_options(config))
    target.gradient_checkpointing = bool(config["target"]["gradient_checkpointing"])
    return target, record


def _first(spec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def storage_options(config: dict) -> dict | None:
    """fsspec options for every URL of the run (run.storage_options)."""
    return config["run"].get("storage_options")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------- one step, validation


def train_step(explainer, target, optimizer, scheduler, images, labels, progress, ocfg, grad_clip, autocast=False):
    """objective_backward + clip + AdamW + schedule; returns the objective's floats plus lr."""
    optimizer.zero_grad(set_to_none=True)
    out = objective_backward(explainer, target, images, labels, ocfg, progress, autocast=autocast)
    params = [p for p in explainer.parameters() if p.requires_grad]
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    out["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return out


def validate(explainer, target, images, vcfg) -> dict:
    """Exact deletion/insertion AUCs (l2r.metrics) of the explainer's maps for the top-1 class."""
    was_training = explainer.training
    explainer.eval()
    deletion, insertion = [], []
    with torch.no_grad():
        for chunk in images.split(vcfg["batch_size"]):
            preds = target(chunk).argmax(1)
            maps = explainer(chunk, preds)
            res = deletion_insertion(target, chunk, maps, preds, steps=vcfg["steps"], reference=vcfg["reference"])
            deletion.append(res["deletion_auc"])
            insertion.append(res["insertion_auc"])
    explainer.train(was_training)
    return {
        "val_deletion_auc": float(torch.cat(deletion).mean()),
        "val_insertion_auc": float(torch.cat(insertion).mean()),
        "val_images": int(images.shape[0]),
    }


def load_val_images(urls: list[str], dcfg: dict, count: int, part: str = "all",
                    options: dict | None = None) -> torch.Tensor:
    """The first `count` good rows of the val shards (`part` of the holdout rule), read without Ray, as
    float (N,3,H,W)."""
    from l2r.shard_reader import iter_shard

    rows = []
    for url in urls:
        for row in iter_shard(url, dcfg["image_size"], dcfg["crop_pct"], holdout_every=dcfg["holdout_every"],
                              part=part, filesystem=l2r_storage.filesystem_for(url, options)):
            if row["error"] is None:
                rows.append(row["image"])
            if len(rows) >= count:
                return to_tensor(np.stack(rows))
    if not rows:
        raise ValueError(f"no readable validation images in {urls}")
    return to_tensor(np.stack(rows))


# ---------------------------------------------------------------- the Ray Train loop


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


def _save_checkpoint(explainer, optimizer, scheduler, position: dict, config: dict):
    import ray.train

    directory = tempfile.mkdtemp(prefix="l2r_ckpt_")
    torch.save(
        {
            "explainer": unwrap(explainer).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": position,
            "config": recorded_config(config),
        },
        os.path.join(directory, STATE_FILE),
    )
    (Path(directory) / "config.yaml").write_text(dump_config(config))
    return ray.train.Checkpoint.from_directory(directory), directory


def _mean_across_workers(values: dict, device) -> dict:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    for path in config.get("import_paths", []):  # user model specs (package.module:callable)
        if path not in sys.path:
            sys.path.insert(0, path)
    if not config.get("ray_logs"):
        quiet_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["run"]["cpus_per_worker"])))
    tcfg, vcfg, dcfg = config["train"], config["val"], config["data"]
    total = int(tcfg["steps"])
    ocfg = ObjectiveConfig(**config["objective"])
    autocast = device.type == "cuda" and bool(tcfg["bf16"])

    target, record = make_target(config, device)
    explainer = build_explainer(dict(config["explainer"]), target)
    position = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "images": 0}
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        explainer.load_state_dict(state["explainer"])
        position = dict(state["position"])
    elif tcfg["init_from"]:
        start_from(explainer, tcfg["init_from"], record, storage_options(config))
    explainer = ray.train.torch.prepare_model(explainer)  # device + DDP when world > 1
    optimizer, scheduler = make_optimizer(explainer, tcfg, total)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    start_step = position["step"]
    torch.manual_seed(config["seed"] * 1000003 + rank * 7919 + start_step)

    val_images = None
    if rank == 0 and config.get("val_urls"):
        val_images = load_val_images(config["val_urls"], dcfg, vcfg["images"], config.get("val_part", "all"),
                                     storage_options(config)).to(device)
    keys_file = None
    metrics_log = MetricsLog(config, start_step) if rank == 0 else None
    if config["debug"]["record_keys"]:
        if l2r_storage.is_url(config["run_dir"]):
            raise ValueError("debug.record_keys writes into the run directory with appends: local storage only")
        keys_dir = Path(config["run_dir"]) / "keys"
        keys_dir.mkdir(parents=True, exist_ok=True)
        keys_file = open(keys_dir / f"rank{rank}.txt", "a")

    step = start_step
    window: dict[str, float] = {}
    window_steps, window_images, window_start = 0, 0, time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    explainer.train()
    while step < total:
        skip = position["batches_in_epoch"]
        batches = shard.iter_torch_batches(
            batch_size=tcfg["batch_size"],
            drop_last=True,
            local_shuffle_buffer_size=dcfg["shuffle_buffer"] or None,
            local_shuffle_seed=config["seed"] + position["epoch"] * world + rank if dcfg["shuffle_buffer"] else None,
        )
        for batch in batches:
            if skip > 0:  # resume: data this epoch already consumed (see module docstring)
                skip -= 1
                continue
            fail = config["debug"]["fail_at_step"]
            if fail is not None and step == fail and start_step == 0 and rank == config["debug"]["fail_rank"]:
                raise RuntimeError(f"debug.fail_at_step: worker {rank} fails at step {step} (testing)")
            images = batch["image"].permute(0, 3, 1, 2).float().div_(255.0)
            images = augment(images, dcfg["image_size"], **dcfg["augment"])
            labels = batch["label"]
            if keys_file is not None:
                keys_file.write("".join(f"{step}\t{i}\n" for i in batch["sample_id"].tolist()))
                keys_file.flush()
            started = time.perf_counter()
            out = train_step(
                explainer, target, optimizer, scheduler, images, labels, step / total, ocfg, tcfg["grad_clip"], autocast
            )
            out["compute_s"] = time.perf_counter() - started  # vs step_time_s: what data and Ray add
            step += 1
            position.update(step=step, batches_in_epoch=position["batches_in_epoch"] + 1,
                            images=position["images"] + images.shape[0] * world)
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + float(v)
            window_steps += 1
            window_images += images.shape[0] * world

            final = step == total
            has_val = bool(config.get("val_urls"))
            val_now = has_val and (final or bool(vcfg["every"] and step % vcfg["every"] == 0))
            ckpt_now = final or (tcfg["checkpoint_every"] and step % tcfg["checkpoint_every"] == 0)
            if not (final or ckpt_now or val_now or step % tcfg["report_every"] == 0):
                continue
            elapsed = time.perf_counter() - window_start
            metrics = _mean_across_workers({k: v / window_steps for k, v in window.items()}, device)
            # resumed_from: the checkpoint step this attempt started at (0: from scratch).
            metrics.update(step=step, resumed_from=start_step, epoch=position["epoch"], images_seen=position["images"],
                           images_per_s=window_images / max(elapsed, 1e-9), step_time_s=elapsed / window_steps)
            if val_now and rank == 0:
                metrics.update(validate(unwrap(explainer), target, val_images, vcfg))
            ckpt, ckpt_dir = None, None
            if ckpt_now and rank == 0:
                ckpt, ckpt_dir = _save_checkpoint(explainer, optimizer, scheduler, position, config)
            if final and rank == 0:
                write_artifact(unwrap(explainer), record, config, step)
            if rank == 0:
                metrics_log.append(metrics)
                l2r_storage.write_text(f"{config['run_dir']}/{PROGRESS_FILE}", json.dumps({**metrics, "total": total}),
                                       storage_options(config))
            ray.train.report(metrics, checkpoint=ckpt)
            if ckpt_dir:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            window, window_steps, window_images, window_start = {}, 0, 0, time.perf_counter()
            if final:
                break
        if step < total:  # the epoch ran out: start the next one
            if position["batches_in_epoch"] == 0:
                raise ValueError(f"worker {rank} got no full batch of {tcfg['batch_size']} in an epoch: too little data")
            position.update(epoch=position["epoch"] + 1, batches_in_epoch=0)
    if start_step >= total and rank == 0:
        # A rerun of a finished run: nothing to train, rewrite the artifact from the checkpoint.
        write_artifact(unwrap(explainer), record, config, step)
    if keys_file is not None:
        keys_file.close()


class MetricsLog:
    """<run_dir>/metrics.jsonl, one line per report, written by rank 0. Locally it is appended to;
    object stores cannot append, so there the whole file is rewritten at each report (it is small).
    A resumed run keeps the lines up to its checkpoint's step: the steps after it are trained again."""

    def __init__(self, config: dict, start_step: int):
        self.url, self.options = f"{config['run_dir']}/metrics.jsonl", storage_options(config)
        self.append_locally = not l2r_storage.is_url(self.url)
        self.lines = []
        if not self.append_locally:
            try:
                text = l2r_storage.read_bytes(self.url, self.options).decode()
            except FileNotFoundError:
                text = ""
            self.lines = [line for line in text.splitlines() if line.strip() and json.loads(line)["step"] <= start_step]

    def append(self, metrics: dict) -> None:
        line = json.dumps({**metrics, "time": time.time()})
        if self.append_locally:
            os.makedirs(os.path.dirname(self.url), exist_ok=True)
            with open(self.url, "a") as f:
                f.write(line + "\n")
            return
        self.lines.append(line)
        l2r_storage.write_text(self.url, "\n".join(self.lines) + "\n", self.options)


# ---------------------------------------------------------------- artifact


def artifact_metadata(config: dict, step: int) -> dict:
    """What the artifact records besides the target record (`l2r.artifact.write_artifact` adds that)."""
    return {
        "steps": step,
        "run_name": config["name"],
        "data": config["data_identity"],
        "image_size": config["data"]["image_size"],
        "crop_pct": config["data"]["crop_pct"],
        "objective": ObjectiveConfig(**config["objective"]).to_dict(),
        "train": config["train"],
        "workers": config["run"]["workers"],
        "import_paths": config.get("import_paths", []),
        **({"init_from": config["init_from"]} if config.get("init_from") else {}),
    }


def write_artifact(explainer, record: TargetRecord, config: dict, step: int) -> str:
    """The artifact into <run_dir>/explainer (written locally, then copied when the storage is remote)."""
    destination = f"{config['run_dir']}/explainer"
    metadata = artifact_metadata(config, step)
    if not l2r_storage.is_url(destination):
        save_artifact(destination, explainer, record, metadata)
        return destination
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(tmp, explainer, record, metadata)
        l2r_storage.put_folder(tmp, destination, storage_options(config))
    return destination


# ---------------------------------------------------------------- driver


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


def prepare_synthetic(config: dict) -> tuple[str, str]:
    """Demo data: synthetic train/val shards written once into <run_dir>/data (reused on rerun)."""
    from l2r.shard_reader import expand_urls
    from l2r.shards import make_shards

    scfg = config["data"]["synthetic"]
    out = f"{config['run_dir']}/data"
    filesystem = l2r_storage.filesystem_for(out, storage_options(config))
    specs = []
    for prefix, count, seed in (("train", scfg["train"], config["seed"]), ("val", scfg["val"], config["seed"] + 1)):
        spec = f"{out}/{prefix}-*.tar"
        try:
            expand_urls(spec, filesystem)
        except FileNotFoundError:
            make_shards(out, synthetic=count, size=scfg["size"], num_classes=scfg["num_classes"], prefix=prefix,
                        max_count=scfg["shard_size"], seed=seed, progress=False, filesystem=filesystem)
        specs.append(spec)
    return specs[0], specs[1]


def fit_target(config: dict, urls: list[str]) -> str:
    """Demo only: fit the (untrained) target on the training shards for target.fit_steps; returns its weight file.

    A target that already has a checkpoint is never touched. The file is <run_dir>/target.pt,
    reused on a rerun, so the artifact's target checksum stays the same.
    """
    from l2r.shard_reader import iter_shard

    tcfg, dcfg = config["target"], config["data"]
    destination = f"{config['run_dir']}/target.pt"
    options = storage_options(config)
    if l2r_storage.exists(destination, options):
        return destination
    torch.manual_seed(config["seed"])
    # The demo's own small model: trained here from its constructor's random weights.
    target, _ = make_target({**config, "target": {**tcfg, "checkpoint": None}})
    net = target.net
    net.requires_grad_(True)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=tcfg["fit_lr"], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, tcfg["fit_lr"], total_steps=tcfg["fit_steps"])

    def rows():
        while True:
            for url in urls:
                for row in iter_shard(url, dcfg["image_size"], dcfg["crop_pct"], holdout_every=dcfg["holdout_every"],
                                      part="train", filesystem=l2r_storage.filesystem_for(url, options)):
                    if row["error"] is None and row["label"] >= 0:
                        yield row

    stream = rows()
    progress = Progress("fit target", tcfg["fit_steps"], "step", interval=10.0)
    for step in range(tcfg["fit_steps"]):
        chunk = [next(stream) for _ in range(tcfg["fit_batch_size"])]
        images = to_tensor(np.stack([r["image"] for r in chunk]))
        if torch.rand(()) < 0.5:
            images = images.flip(-1)
        labels = torch.tensor([r["label"] for r in chunk])
        loss = torch.nn.functional.cross_entropy(net(target.normalise(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step + 1, loss=loss.item())
    progress.close()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    l2r_storage.write_bytes(destination, buffer.getvalue(), options)
    return destination


class ProgressWatcher:
    """The driver's progress line: polls the progress file rank 0 writes at every report."""

    FIELDS = {"loss": "loss", "auc_desc": "soft del", "auc_asc": "soft ins", "val_deletion_auc": "val del",
              "val_insertion_auc": "val ins", "images_per_s": "img/s"}

    def __init__(self, url: str, total: int, poll_seconds: float = 1.0, options: dict | None = None):
        import threading

        self.url, self.poll_seconds, self.options = url, poll_seconds, options
        self.progress = Progress("train", total, "step", interval=30.0)
        self.seen = None
        self.stopped = threading.Event()
        self._remove_stale()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _remove_stale(self):
        l2r_storage.remove(self.url, self.options)  # a resumed run's old file would look like progress

    def _read(self) -> dict | None:
        try:
            return l2r_storage.read_json(self.url, self.options)
        except OSError:
            return None

    def _watch(self):
        while not self.stopped.wait(self.poll_seconds):
            self._show()

    def _show(self):
        report = self._read()
        if report is None or report.get("step") == self.seen:
            return
        self.seen = report["step"]
        fields = {label: report.get(key) for key, label in self.FIELDS.items()}
        fields["img/s"] = round(fields["img/s"], 1) if fields["img/s"] is not None else None
        self.progress.update(report["step"], force="val_deletion_auc" in report, **fields)

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=5)
        self._show()
        self.progress.close()


def worker_cpus(run_config: dict, node_cpus: list[float]) -> float:
    """CPUs (and torch threads) per training worker. "auto": a node's CPUs shared by the workers
    placed on it, so a lone worker gets every core of its machine."""
    value = run_config["cpus_per_worker"]
    if value != "auto":
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"run.cpus_per_worker must be a positive number or 'auto', got {value!r}")
        return value
    if not node_cpus:
        raise ValueError("run.cpus_per_worker=auto: the cluster has no node with CPUs")
    per_node = math.ceil(run_config["workers"] / len(node_cpus))
    return max(1, int(max(node_cpus) // per_node))


def training_read_size(dcfg: dict) -> tuple:
    """(size, crop_pct) the training reader decodes at: the model input, or with random crops the
    whole centre square they are taken from (l2r.augment)."""
    if dcfg["augment"]["crop_scale"] is None:
        return dcfg["image_size"], dcfg["crop_pct"]
    return decode_size(dcfg["image_size"], dcfg["crop_pct"]), 1.0


def initial_explainer(config: dict, options: dict | None) -> tuple[dict, dict]:
    """train.init_from resolved where the workers can read it (a shipped name -> its folder, a relative
    folder -> absolute), checked before Ray starts (it exists; the same target as far as the config
    says; the workers compare the weights), and what the artifact will record of it."""
    given = str(config["train"]["init_from"])
    path = given if "://" in given else str(Path(resolve_explainer(given)).resolve())
    folder = local_artifact(path, options)
    check_same_target(read_target_record(folder), target_record(config), f"{given} (train.init_from)")
    return {**config["train"], "init_from": path}, {"explainer": given, **describe_start(folder)}


def finished_artifact(config: dict) -> str | None:
    """The run's artifact if it already holds the last step of this same training, else None."""
    artifact = f"{config['run_dir']}/explainer"
    try:
        document = l2r_storage.read_json(f"{artifact}/{EXPLAINER_FILE}", storage_options(config))
    except OSError:
        return None
    if not isinstance(document, dict):
        return None
    metadata, target = document.get("metadata", {}), document.get("metadata", {}).get("target") or {}
    same = (metadata.get("train") == config["train"]  # steps included
            and metadata.get("objective") == ObjectiveConfig(**config["objective"]).to_dict()
            and metadata.get("data") == config["data_identity"]
            # the same target: a changed model or checkpoint under the same run name trains again
            and all(target.get(key) == json.loads(json.dumps(config["target"].get(key)))
                    for key in ("spec", "checkpoint", "kwargs")))
    return artifact if same else None


def run(config: dict, verbose: bool = True, ray_logs: bool = False, show_config: bool = True) -> str:
    """Train an explainer as configured (see pipeline.config); returns the artifact's location.

    `verbose`: print the resolved config, a progress line and the outcome; `ray_logs`: Ray's own
    INFO lines too (off by default, see `pipeline.progress`); `show_config`: the resolved config
    on the console (it is saved as <run_dir>/config.yaml either way).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from l2r.shard_reader import expand_urls
    from pipeline.dataset import read_shards

    config = dict(config)
    if verbose and show_config:
        print("resolved config:\n" + dump_config(config), flush=True)
    if not verbose_requested(ray_logs):
        quiet_ray_data()
    storage = config["run"]["storage"].rstrip("/")
    config["run_dir"] = f"{storage}/{config['name']}"
    # User model specs import from the launch directory (the uploaded working dir under `ray job submit`).
    config["import_paths"] = [os.getcwd()]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    train_spec, val_spec = config["data"]["train"], config["data"]["val"]
    if train_spec is None:
        synthetic_train, synthetic_val = prepare_synthetic(config)
        train_spec = synthetic_train
        val_spec = val_spec or synthetic_val
    options = storage_options(config)
    train_filesystem = l2r_storage.filesystem_for(_first(train_spec), options)
    train_urls = expand_urls(train_spec, train_filesystem)
    config["val_urls"] = expand_urls(val_spec, l2r_storage.filesystem_for(_first(val_spec), options)) if val_spec else []
    if val_spec is None and config["data"]["holdout_every"]:  # validate on what training holds back
        config["val_urls"], config["val_part"] = train_urls, "holdout"
    config["data_identity"] = data_identity(train_urls, config["data"], options)
    if config["train"]["init_from"]:
        config["train"], config["init_from"] = initial_explainer(config, options)
    if config["target"]["checkpoint"] is None and config["target"]["fit_steps"] > 0:
        config["target"] = {**config["target"], "checkpoint": fit_target(config, train_urls)}

    if verbose:
        print(f"training data: {len(train_urls)} shards, sha256 {config['data_identity']['sha256'][:16]}; "
              f"target checkpoint: {config['target']['checkpoint']}", flush=True)
    finished = finished_artifact(config)
    if finished is not None:
        if verbose:
            print(f"already trained: {finished} holds step {config['train']['steps']} of this run "
                  f"(a new --name, or more --steps, trains again)", flush=True)
        return finished

    config["ray_logs"] = verbose_requested(ray_logs)
    dcfg = config["data"]
    rcfg = config["run"] = dict(config["run"])
    resolved = None
    if not ray.is_initialized():
        # A new local Ray declares enough logical CPUs for the workers plus a reader, or Ray Data
        # waits forever for a CPU the trainers hold. A joined cluster (`ray job submit`) has its own.
        local = worker_cpus(rcfg, [os.cpu_count() or 1])
        needed = rcfg["workers"] * local + dcfg["read_cpus"]
        if not init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), **ray_init_kwargs(ray_logs)):
            resolved = local
    if resolved is None:  # joined a cluster: "auto" from its nodes (the reader's share is left to it)
        resolved = worker_cpus(rcfg, [node["Resources"].get("CPU", 0) - dcfg["read_cpus"] for node in ray.nodes()
                                      if node.get("Alive") and node["Resources"].get("CPU", 0) > 0])
    rcfg["cpus_per_worker"] = resolved
    needed = rcfg["workers"] * rcfg["cpus_per_worker"] + dcfg["read_cpus"]
    l2r_storage.write_text(f"{config['run_dir']}/config.yaml", dump_config(config), options)
    if ray.cluster_resources().get("CPU", 0) < needed:
        print(f"warning: the cluster has {ray.cluster_resources().get('CPU', 0)} CPUs; workers and one reader "
              f"need {needed} (reading may stall unless it scales up)", flush=True)
    ds = read_shards(train_urls, *training_read_size(dcfg), num_cpus=dcfg["read_cpus"],
                     holdout_every=dcfg["holdout_every"], part="train", filesystem=train_filesystem)
    ds = ds.map_batches(to_training_columns, batch_format="numpy", num_cpus=dcfg["read_cpus"])
    if dcfg["materialize"]:
        ds = ds.materialize()
        if verbose:
            print(f"training data materialized: {ds.count()} rows in the object store", flush=True)

    scaling = ray.train.ScalingConfig(
        num_workers=rcfg["workers"],
        use_gpu=bool(rcfg["gpus"]),
        resources_per_worker={"CPU": rcfg["cpus_per_worker"], **({"GPU": 1} if rcfg["gpus"] else {}),
                              **(rcfg["worker_resources"] or {})},
    )
    # Ray Train's checkpoints go through the same fsspec filesystem and options as everything else.
    storage_filesystem, storage_path = l2r_storage.pyarrow_filesystem(storage, options)
    run_config = ray.train.RunConfig(
        name=config["name"],
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=ray.train.FailureConfig(max_failures=rcfg["max_failures"]),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config["train"]["keep_checkpoints"]),
        logging_config=train_logging_config(ray_logs),
    )
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, scaling_config=scaling, run_config=run_config,
        datasets={"train": ds},
    )
    watcher = (ProgressWatcher(f"{config['run_dir']}/{PROGRESS_FILE}", config["train"]["steps"], options=options)
               if verbose else None)
    try:
        result = trainer.fit()
    finally:
        if watcher is not None:
            watcher.stop()
    artifact = f"{config['run_dir']}/explainer"
    if verbose:
        if result.metrics:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
            print(f"final metrics: {shown}")
        print(f"explainer artifact: {artifact}", flush=True)
    return artifact
