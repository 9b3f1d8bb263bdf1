"""The Ray Train worker loop of a training run (`train_loop_per_worker`).

Each worker builds the frozen target (a replica per worker, no gradients) and the explainer (DDP via
`prepare_model`), reads its share of the stream with `get_dataset_shard("train").iter_torch_batches`,
and runs `l2r.training.train_step`; rank 0 validates, checkpoints, writes the metrics and, at the end,
the artifact.

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

import shutil
import sys
import time
from pathlib import Path

import torch

from l2r import storage as l2r_storage
from l2r.artifact import start_from
from l2r.augment import augment
from l2r.explainer import build_explainer
from l2r.objective import ObjectiveConfig
from l2r.training import load_val_images, make_optimizer, train_step, unwrap, validate
from pipeline.checkpoints import restore_checkpoint, save_checkpoint
from pipeline.config import storage_options
from pipeline.metrics_log import MetricsLog
from pipeline.progress import quiet_train_reports
from pipeline.train_artifact import write_artifact
from pipeline.train_progress import write_progress
from pipeline.train_target import make_target


def _mean_across_workers(values: dict, device) -> dict:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def build_or_resume(config: dict, device):
    """(target, its record, explainer, optimiser, scheduler, data position): fresh, from the latest
    checkpoint of this run (a resume), or with the weights of train.init_from (fine-tuning)."""
    import ray.train
    import ray.train.torch

    tcfg = config["train"]
    target, record = make_target(config, device)
    explainer = build_explainer(dict(config["explainer"]), target)
    position = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "images": 0}
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint)
        explainer.load_state_dict(state["explainer"])
        position = dict(state["position"])
    elif tcfg["init_from"]:
        start_from(explainer, tcfg["init_from"], record, storage_options(config))
    explainer = ray.train.torch.prepare_model(explainer)  # device + DDP when world > 1
    optimizer, scheduler = make_optimizer(explainer, tcfg, int(tcfg["steps"]))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return target, record, explainer, optimizer, scheduler, position


def open_keys_file(config: dict, rank: int):
    """debug.record_keys: <run_dir>/keys/rank<N>.txt, appended to (a resumed attempt adds its lines)."""
    if l2r_storage.is_url(config["run_dir"]):
        raise ValueError("debug.record_keys writes into the run directory with appends: local storage only")
    keys_dir = Path(config["run_dir"]) / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    return open(keys_dir / f"rank{rank}.txt", "a")


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

    target, record, explainer, optimizer, scheduler, position = build_or_resume(config, device)
    start_step = position["step"]
    torch.manual_seed(config["seed"] * 1000003 + rank * 7919 + start_step)

    val_images = None
    if rank == 0 and config.get("val_urls"):
        val_images = load_val_images(config["val_urls"], dcfg, vcfg["images"], config.get("val_part", "all"),
                                     storage_options(config)).to(device)
    metrics_log = MetricsLog(config, start_step) if rank == 0 else None
    keys_file = open_keys_file(config, rank) if config["debug"]["record_keys"] else None

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
                ckpt, ckpt_dir = save_checkpoint(explainer, optimizer, scheduler, position, config)
            if final and rank == 0:
                write_artifact(unwrap(explainer), record, config, step)
            if rank == 0:
                metrics_log.append(metrics)
                write_progress(config, metrics, total)
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
