"""Batch attribution, the driver: shards -> maps of every method -> exact curves -> Parquet.

Data flow (one streaming Ray Data pipeline over every unfinished shard)::

    pipeline.dataset.read_shards (decode + preprocess, per-sample errors as rows)
      -> map_batches(AttributionWorker, ActorPoolStrategy(size=N))   models loaded once per actor;
         each actor writes its rows as part files of their shards (l2r.results.write_parts)
      -> the driver reads the parts' one-line summaries, in input order (preserve_order)
      -> when a shard is complete, a task merges its parts into parquet/<shard>.parquet
         (l2r.results.merge_parts, atomic), then the driver writes done/<shard>.json

No map, curve or row passes through the driver: it plans, tracks which shards are complete and
writes the manifest and markers. The output layout is in ``l2r.results``; the per-batch
work in ``pipeline.attributor``; the configuration in ``pipeline.attribute_config``.

Resumability: the driver consumes summaries in shard order, so when the first summary of shard
i+1 arrives (or the stream ends) shard i is complete. Its marker is written only after its
Parquet file is committed. A rerun skips shards with a marker and redoes the others under the
same names, so after a crash and a rerun every input key appears exactly once (per method). A
rerun into an output written with a different configuration (methods, protocol, models) is
refused unless ``overwrite`` is set.

Storage: shards, output, the target checkpoint and the explainer are all reached by their URL
with ``storage_options`` (``l2r.storage``), from every node. On a multi-node cluster, local paths
are only right on a shared filesystem: use s3:// (or another fsspec URL) there.
"""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Callable

from l2r import storage
from l2r.methods import control_names, explainer_names
from pipeline.attribute_config import AttributeConfig, all_methods, resolve_fast_path  # noqa: F401  (the job's API)
from pipeline.attributor import AttributionWorker
from pipeline.progress import Progress, quiet_ray_data
from pipeline.ray_connect import init_ray
from l2r.results import (DONE_DIR, MANIFEST, MANIFEST_VERSION, PARQUET_DIR, Output, Stats,
                              merge_parts, output_names, read_results)


__all__ = ["AttributeConfig", "MANIFEST", "all_methods", "read_results", "run_attribution"]


def explainer_identity(path: str) -> dict:
    from l2r.classifier import sha256_file
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



# CPU batches by image size, measured (benchmarks/RESULTS.md, "Attribution throughput on a CPU"):
# forwards of large images run at half speed in chunks of 128 (their activations leave the caches),
# and a smaller actor call shows its first results sooner.
CPU_SMALL_IMAGE_PIXELS = 64 * 64
CPU_BATCHES = {"small": {"batch_size": 64, "forward_batch": 64}, "large": {"batch_size": 16, "forward_batch": 16}}


def _cluster_plan(config: AttributeConfig, input_size: tuple[int, int] | None = None) -> dict:
    """Device, actor count, per-actor resources, batches and fast path, from the config, the
    cluster and the target's input size."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    fast_path = resolve_fast_path(config.fast_path, device)
    if device == "cuda":
        if gpus == 0:
            raise RuntimeError("device 'cuda' asked for, but the Ray cluster has no GPUs")
        actors = config.actors or max(1, int(gpus / config.actor_gpus))
        actor_cpus = config.actor_cpus if config.actor_cpus is not None else min(1.0, max(0.25, (cpus - 1) / actors))
        return {"device": "cuda", "actors": actors, "num_cpus": actor_cpus, "num_gpus": config.actor_gpus,
                "threads": config.threads or max(1, int(actor_cpus)), "batch_size": config.batch_size or 256,
                "forward_batch": config.forward_batch or 1024, "fast_path": fast_path}
    # The whole machine: one actor per CPU with one torch thread each (processes beat threads for the
    # small forwards of the curves: benchmarks/attribute.py measures both layouts). The actors' logical
    # CPUs leave room for two read tasks, so reading is never starved; their threads use every core.
    spare = max(cpus - 2 * config.read_cpus, 0.25)
    actors = config.actors or max(1, int(cpus))
    actor_cpus = config.actor_cpus if config.actor_cpus is not None else spare / actors
    if config.threads:
        threads = config.threads
    elif config.actor_cpus is not None:
        threads = max(1, int(actor_cpus))
    else:
        threads = max(1, int(cpus // actors))
    h, w = input_size or config.target.input_size or (32, 32)
    batches = CPU_BATCHES["small" if h * w <= CPU_SMALL_IMAGE_PIXELS else "large"]
    return {"device": "cpu", "actors": actors, "num_cpus": actor_cpus, "num_gpus": 0, "threads": threads,
            "batch_size": config.batch_size or batches["batch_size"],
            "forward_batch": config.forward_batch or batches["forward_batch"], "fast_path": fast_path}


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


def _sanity_plan(config: AttributeConfig, target) -> dict | None:
    """The layers each stage of the sanity check re-initialises (recorded in the manifest)."""
    if not config.sanity_stages:
        return None
    from l2r.sanity import cascade

    stages = cascade(target.net, config.sanity_stages)
    # Stage s re-initialises the first layers_per_stage[s] names of layers_top_first.
    return {"stages": len(stages), "seed": config.sanity_seed, "layers_per_stage": [len(s) for s in stages],
            "layers_top_first": stages[-1]}


def _identity(config: AttributeConfig, record, explainer: dict | None) -> dict:
    """What must match for a rerun to continue an earlier run's output."""
    return {
        "methods": list(config.methods),
        "method_options": config.method_options,
        "refine_steps": config.refine_steps if _learned(config) else 0,
        "protocol": config.protocol.to_dict(),
        "crop_pct": config.target.crop_pct,
        "target": record.to_dict(),
        "explainer_weights_sha256": explainer["weights_sha256"] if explainer else None,
        # Only when set, so outputs written before the option existed still resume.
        **({"with_mask": True} if config.with_mask else {}),
        **({"sanity": [config.sanity_stages, config.sanity_seed]} if config.sanity_stages else {}),
        **({"holdout_every": config.holdout_every} if config.holdout_every else {}),
        **({"precision": config.precision} if config.precision != "fp32" else {}),
        **({"allow_target_mismatch": True} if config.allow_target_mismatch else {}),
    }



def _learned(config: AttributeConfig) -> list[str]:
    """The methods of the run whose maps come from the trained explainer."""
    return [m for m in config.methods if m in explainer_names()]


def _check_explainer(config: AttributeConfig, record, log) -> dict | None:
    """The explainer's identity, after checking it was trained for this target (unless allowed)."""
    if not _learned(config):
        return None
    from l2r.artifact import local_artifact, read_target_spec
    from l2r.target_spec import check_same_target

    folder = local_artifact(config.explainer, config.storage_options)
    explainer = explainer_identity(folder)
    try:
        trained = read_target_spec(folder)
    except ValueError:  # an explainer saved without a record (not by the training job): nothing to check
        log(f"warning: {config.explainer} does not record the target it was trained for; not checked")
        return explainer
    if config.allow_target_mismatch:
        found = trained.differences(record)
        if found:
            log(f"warning: allow_target_mismatch: the explainer was trained for {trained.describe()}, "
                f"used with {record.describe()}: {'; '.join(found)}")
    else:
        check_same_target(trained, record, config.explainer)
    return explainer


def _warn_local_output(config: AttributeConfig, log) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_url(config.output):
        log(f"warning: the output {config.output} is a local path and the cluster has {len(nodes)} nodes: "
            "workers write their parts there on their own node, which is only right on a shared filesystem "
            "(use an s3:// or other fsspec URL)")


def run_attribution(config: AttributeConfig, log: Callable[[str], None] | None = None,
                    _fail_after_shards: int | None = None) -> dict:
    """Run (or resume) an attribution job; returns the summary (also written to the manifest).

    ``_fail_after_shards`` is a test hook: raise after committing that many shards, as a crash would.
    """
    import ray

    from l2r.shard_reader import expand_urls
    from pipeline.dataset import read_shards
    from pipeline.shard_count import expected_samples

    log = log or (lambda line: print(line, flush=True))
    started = time.time()
    shard_specs = _as_list(config.shards)
    filesystem = storage.filesystem_for(shard_specs[0], config.storage_options)
    urls = [storage.absolute(u) for u in expand_urls(config.shards, filesystem)]
    if len(set(urls)) != len(urls):
        raise ValueError("the same shard is listed twice")
    names = output_names(urls)
    output = Output(config.output, config.storage_options)

    record = config.target_spec()
    if record.random_init:
        log(f"warning: target {record.spec} has random weights (random_init): its maps explain an untrained model")
    target = record.build("cpu", config.storage_options)
    explainer = _check_explainer(config, record, log)
    identity = json.loads(json.dumps(_identity(config, record, explainer), default=str))
    previous = output.read_json(output.manifest_url)
    if previous is not None and previous.get("identity") != identity and not config.overwrite:
        raise ValueError(
            f"{config.output} holds results of a different configuration (methods, protocol or models); "
            "use another output folder, or overwrite=True (--overwrite) to start over"
        )
    if config.overwrite:
        output.remove_all()
    output.clean_temporary()
    output.clear_actor_starts()  # an interrupted run's

    stats = Stats(config.methods)
    todo, skipped = [], 0
    shard_log = {}
    stale = output.names_with_parts()  # what an interrupted run wrote of unfinished shards
    for url in urls:
        marker = output.finished(names[url], url)
        if marker is None:
            todo.append(url)
            if names[url] in stale:
                output.clear_parts(names[url])
        else:
            skipped += 1
            stats.add(marker["stats"])
            shard_log[url] = {"file": f"{PARQUET_DIR}/{names[url]}.parquet", **marker["stats"], "resumed": True}

    if not ray.is_initialized():
        init_ray(config.address, log_to_driver=False, logging_level="ERROR")
    quiet_ray_data()
    plan = _cluster_plan(config, target.input_size)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "config": config.to_dict(),
        "identity": identity,
        "target": identity["target"],
        "explainer": explainer,
        "protocol": {**config.protocol.to_dict(), "precision": config.precision, "fast_path": plan["fast_path"]},
        # Maps that know nothing of the image or model: a method should beat them (the report checks).
        "controls": [m for m in config.methods if m in control_names()],
        "sanity_check": _sanity_plan(config, target),
        "plan": plan,
        "versions": package_versions(),
        "layout": {"parquet": f"{PARQUET_DIR}/<shard>.parquet", "markers": f"{DONE_DIR}/<shard>.json"},
    }
    output.write_json(output.manifest_url, manifest)
    log(f"attribute: {len(urls)} shards ({skipped} already done, {len(todo)} to do); methods {','.join(config.methods)}; "
        f"{plan['actors']} {plan['device']} actor(s), batch {plan['batch_size']}")
    short = plan_shortfall(plan, config.read_cpus)
    if todo and short:
        log(f"warning: {short}")
    if todo:
        _warn_local_output(config, log)

    run_stats = Stats(config.methods)
    run_started = time.perf_counter()
    first_batch = None  # start-up (actors, model loading, first read) ends with the first summary
    actor_restarts = 0  # actors Ray restarted after they died; their batches were retried
    if todo:
        ds = read_shards(todo, target.input_size, crop_pct=config.target.crop_pct, with_mask=config.with_mask,
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
            # Two batches per actor at a time (one running, one queued): enough to keep it busy, and a
            # small job's batches spread over every actor instead of queueing on the first.
            compute=ray.data.ActorPoolStrategy(size=plan["actors"], max_tasks_in_flight_per_actor=2),
            batch_size=plan["batch_size"],
            batch_format="numpy",
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"] or None,
            resources=config.actor_resources or None,
            fn_constructor_kwargs={"config": config, "plan": plan, "record": record,
                                   "names": {url: names[url] for url in todo}},
        )
        ds.context.execution_options.preserve_order = True  # shard i is complete when shard i+1 starts
        ds.context.enable_progress_bars = config.ray_progress_bars
        # Merges are I/O: they take no CPU from the actors (which hold theirs for the whole run).
        merge = ray.remote(num_cpus=0, max_retries=3)(merge_parts)
        shards = _ShardTracker(todo, names, output, config, merge, log, skipped, len(urls), run_stats, run_started,
                               shard_log, _fail_after_shards)
        # The total, known before decoding (`pipeline.shard_count`), gives an ETA from the first batch;
        # a shard's real count replaces its estimate once the shard is committed.
        expected = expected_samples(todo, filesystem, config.holdout_every, "holdout")
        progress = Progress("attribute", round(sum(expected)) if expected else None, "images",
                            interval=config.progress_interval, log=log, start=0)
        try:
            for summaries in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if first_batch is None:
                    first_batch = time.perf_counter()
                for row in summaries.to_pylist():
                    part_stats = json.loads(row["stats"])
                    shards.add_part(row["source"], row["part"], part_stats)
                    run_stats.add(part_stats)
                shards.collect(block=False)
                if expected:
                    progress.total = max(round(shards.committed_images + sum(expected[shards.committed:])),
                                         run_stats.images)
                elif shards.committed:
                    progress.total = round(shards.committed_images / shards.committed * len(todo))
                progress.update(run_stats.images, errors=run_stats.errors, shard=f"{shards.current + 1}/{len(todo)}")
            shards.finish()
            actor_restarts = max(0, output.actor_starts() - plan["actors"])
            output.clear_actor_starts()
            if actor_restarts:
                log(f"warning: {actor_restarts} attribution actor(s) died (killed for memory?) and were restarted; "
                    "their batches were redone")
            progress.update(run_stats.images, force=True, errors=run_stats.errors, shard=f"{len(todo)}/{len(todo)}")
        except BaseException as error:
            shards.abandon()
            full = _full_disk(error)
            if full is not None:
                raise OSError(full.errno, f"{full.strerror or 'No space left on device'} under the output "
                              f"{config.output} ({full}); the {skipped + shards.committed} finished shard(s) are "
                              "kept: free space and rerun to finish the rest") from error
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
        "actor_restarts": actor_restarts,
        "methods": stats.means(),
    }
    manifest.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary,
                    counts={"images_in": stats.images, "rows_out": stats.rows, "images_errored": stats.errors,
                            "rows_errored": stats.error_rows, "actor_restarts_this_run": actor_restarts},
                    shards={url: shard_log.get(url) for url in urls})
    output.write_json(output.manifest_url, manifest)
    log(format_summary(summary))
    return summary


def _full_disk(error: BaseException | None) -> OSError | None:
    """The full-disk OSError behind ``error`` (Ray wraps a task's exception, and Ray Data wraps it again)."""
    seen, first = set(), error
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) in storage.FULL_DISK:
            return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    # An exception that crossed processes keeps its chain only as text (pickling drops __cause__).
    found = re.search(r"\[Errno (\d+)\] ([^\n:']+)(?:: '([^'\n]+)')?", str(first)) if first is not None else None
    if found and int(found[1]) in storage.FULL_DISK:
        return OSError(int(found[1]), found[2], found[3])
    return None


class _ShardTracker:
    """The driver's record of the running shards: their parts as reported, the merge of each
    complete shard, and its marker once the merge has committed the shard's Parquet file."""

    def __init__(self, todo, names, output, config, merge, log, skipped, total, run_stats, run_started,
                 shard_log, fail_after=None):
        self.todo, self.names, self.output, self.config, self.merge, self.log = todo, names, output, config, merge, log
        self.order = {url: i for i, url in enumerate(todo)}
        self.parts = {url: [] for url in todo}
        self.stats = {url: Stats(config.methods) for url in todo}
        self.started = {}
        self.current = 0  # shards before this one are complete (their merge submitted)
        self.merging = {}  # ObjectRef -> url
        self.committed = 0
        self.committed_images = 0
        self.skipped, self.total, self.run_stats, self.run_started = skipped, total, run_stats, run_started
        self.shard_log, self.fail_after = shard_log, fail_after

    def add_part(self, source: str, part: str, part_stats: dict) -> None:
        i = self.order.get(source)
        if i is None or i < self.current:
            raise RuntimeError(f"rows of shard {source!r} arrived out of order")
        while self.current < i:
            self._complete(self.todo[self.current])
        self.started.setdefault(source, time.perf_counter())
        self.parts[source].append(part)
        self.stats[source].add(part_stats)

    def _complete(self, url: str) -> None:
        self.started.setdefault(url, time.perf_counter())
        ref = self.merge.remote(self.output.url, self.config.storage_options, self.names[url], self.parts[url])
        self.merging[ref] = url
        self.current += 1

    def collect(self, block: bool) -> None:
        """Write the markers of the shards whose merge has finished (all of them with ``block``)."""
        import ray

        if not self.merging:
            return
        ready, _ = ray.wait(list(self.merging), num_returns=len(self.merging) if block else 1,
                            timeout=None if block else 0)
        for ref in ready:
            url = self.merging.pop(ref)
            rows = ray.get(ref)
            self._mark(url, rows)

    def _mark(self, url: str, rows: int) -> None:
        name, stats = self.names[url], self.stats[url]
        seconds = time.perf_counter() - self.started[url]
        marker = {"source": url, "file": f"{PARQUET_DIR}/{name}.parquet", "rows": rows, "seconds": seconds,
                  "stats": stats.to_dict()}
        self.output.write_json(self.output.marker_url(name), marker)
        self.shard_log[url] = {"file": marker["file"], **stats.to_dict(), "seconds": seconds}
        self.committed += 1
        self.committed_images += stats.images
        elapsed = time.perf_counter() - self.run_started
        self.log(f"  [{self.skipped + self.committed}/{self.total}] {name}: {stats.images} images, {stats.errors} "
                 f"errors; run: {self.run_stats.images} images in {elapsed:.1f} s "
                 f"({self.run_stats.images / max(elapsed, 1e-9):.1f} images/s)")
        if self.fail_after is not None and self.committed >= self.fail_after:
            raise RuntimeError(f"test hook: failing after {self.committed} shards")

    def finish(self) -> None:
        while self.current < len(self.todo):
            self._complete(self.todo[self.current])
        while self.merging:
            self.collect(block=True)

    def abandon(self) -> None:
        """After a failure: let running merges end (a rerun must not race them); write no marker."""
        import ray

        if self.merging:
            ray.wait(list(self.merging), num_returns=len(self.merging), timeout=60)
            self.merging.clear()


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

