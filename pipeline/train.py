"""Distributed explainer training: Ray Data stream -> Ray Train workers -> an explainer artifact.

The driver (`run`, this module) resolves the data (shard URLs; the demo's synthetic shards and
fitted target, `pipeline.demo_inputs`, when the config names none), saves the config, plans the
workers' CPUs and starts a `TorchTrainer` whose workers run `pipeline.train_worker` (the per-step
torch code is `l2r.training`; checkpoints `pipeline.checkpoints`; the artifact
`pipeline.train_artifact`; metrics.jsonl `pipeline.metrics_log`; the progress line
`pipeline.train_progress`).

Run directory `<storage>/<name>/`: `config.yaml` (the user's config), `run.json` (what the driver
derived), Ray Train's `checkpoint_*` dirs (each a `state.pt`: explainer, optimiser, scheduler, step,
data position, config), `explainer/`
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

Resume and failures: see `pipeline.train_worker`.
"""

from __future__ import annotations

import json
import math
import os
import sys

from l2r import storage as l2r_storage
from pipeline.config import derived_state, dump_config, storage_options
from pipeline.demo_inputs import fit_target, prepare_synthetic
from pipeline.progress import quiet_ray_data, ray_init_kwargs, train_logging_config, verbose_requested
from pipeline.ray_connect import init_ray
from pipeline.train_artifact import finished_artifact, initial_explainer
from pipeline.train_data import data_identity, to_training_columns, training_read_size
from pipeline.train_progress import PROGRESS_FILE, ProgressWatcher
from pipeline.train_worker import train_loop_per_worker

DERIVED_FILE = "run.json"  # beside config.yaml: what the driver derived from it (config.derived_state)


def _first(spec) -> str:
    return spec if isinstance(spec, str) else spec[0]


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


def run(config: dict, verbose: bool = True, ray_logs: bool = False, show_config: bool = True) -> str:
    """Train an explainer as configured (see pipeline.config); returns the artifact's location.

    `verbose`: print the resolved config, a progress line and the outcome; `ray_logs`: Ray's own
    INFO lines too (off by default, see `pipeline.progress`); `show_config`: the resolved config
    on the console (it is saved as <run_dir>/config.yaml either way, loadable with --config; what the driver
    derives from it goes to <run_dir>/run.json).
    """
    given, config = config, dict(config)
    if verbose and show_config:
        print("resolved config:\n" + dump_config(config), flush=True)
    if not verbose_requested(ray_logs):
        quiet_ray_data()
    train_urls, train_filesystem = resolve_inputs(config)
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
    config["run"] = {**config["run"], "cpus_per_worker": start_ray_and_plan_cpus(config, ray_logs)}
    options = storage_options(config)
    l2r_storage.write_text(f"{config['run_dir']}/config.yaml", dump_config(given), options)
    l2r_storage.write_text(f"{config['run_dir']}/{DERIVED_FILE}", json.dumps(derived_state(given, config), indent=1),
                           options)
    trainer = make_trainer(config, training_dataset(config, train_urls, train_filesystem, verbose), ray_logs)
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


def resolve_inputs(config: dict) -> tuple[list[str], object]:
    """Fills what the run derives from its config (run_dir, import paths, val URLs, the data's identity,
    the fine-tuning start, the demo's fitted target); returns (training shard URLs, their filesystem)."""
    from l2r.shard_reader import expand_urls

    config["run_dir"] = f"{config['run']['storage'].rstrip('/')}/{config['name']}"
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
    return train_urls, train_filesystem


def start_ray_and_plan_cpus(config: dict, ray_logs: bool) -> float:
    """Joins or starts Ray; returns the CPUs per worker (run.cpus_per_worker, "auto" resolved)."""
    import ray

    rcfg, dcfg = config["run"], config["data"]
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
    needed = rcfg["workers"] * resolved + dcfg["read_cpus"]
    if ray.cluster_resources().get("CPU", 0) < needed:
        print(f"warning: the cluster has {ray.cluster_resources().get('CPU', 0)} CPUs; workers and one reader "
              f"need {needed} (reading may stall unless it scales up)", flush=True)
    return resolved


def training_dataset(config: dict, train_urls: list[str], filesystem, verbose: bool):
    """The Ray Data stream the workers share: decoded training rows, reduced to the training columns."""
    from pipeline.dataset import read_shards

    dcfg = config["data"]
    ds = read_shards(train_urls, *training_read_size(dcfg), num_cpus=dcfg["read_cpus"],
                     holdout_every=dcfg["holdout_every"], part="train", filesystem=filesystem)
    ds = ds.map_batches(to_training_columns, batch_format="numpy", num_cpus=dcfg["read_cpus"])
    if dcfg["materialize"]:
        ds = ds.materialize()
        if verbose:
            print(f"training data materialized: {ds.count()} rows in the object store", flush=True)
    return ds


def make_trainer(config: dict, dataset, ray_logs: bool):
    """The `TorchTrainer`: one worker group of run.workers, checkpoints and failures on the run's storage."""
    import ray.train
    from ray.train.torch import TorchTrainer

    rcfg = config["run"]
    scaling = ray.train.ScalingConfig(
        num_workers=rcfg["workers"],
        use_gpu=bool(rcfg["gpus"]),
        resources_per_worker={"CPU": rcfg["cpus_per_worker"], **({"GPU": 1} if rcfg["gpus"] else {}),
                              **(rcfg["worker_resources"] or {})},
    )
    # Ray Train's checkpoints go through the same fsspec filesystem and options as everything else.
    storage_filesystem, storage_path = l2r_storage.pyarrow_filesystem(config["run"]["storage"].rstrip("/"),
                                                                      storage_options(config))
    run_config = ray.train.RunConfig(
        name=config["name"],
        storage_path=storage_path,
        storage_filesystem=storage_filesystem,
        failure_config=ray.train.FailureConfig(max_failures=rcfg["max_failures"]),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config["train"]["keep_checkpoints"]),
        logging_config=train_logging_config(ray_logs),
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=config, scaling_config=scaling,
                        run_config=run_config, datasets={"train": dataset})
