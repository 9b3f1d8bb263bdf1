"""Attribution quality on CIFAR-10: a trained explainer against every applicable baseline.

On the first ``--images`` images of the shared CIFAR-10 test shards, with the shared
ResNet-20 as the target, this runs the attribution job (``pipeline.attribute.run_attribution``)
with ``l2r`` (when ``--explainer`` names an artifact, e.g. the training job's cifar10 config
output) and the baselines that apply to a CNN (gradcam, ig, saliency, rise, random,
gaussian), then the report's summary (``l2r.reporting.report``): mean exact deletion / insertion
AUC per method with bootstrap intervals and the cost per image.

    python benchmarks/quality.py --images 500 --explainer ~/l2r_runs/cifar10/explainer
    python benchmarks/quality.py --images 200                    # baselines only
    python benchmarks/quality.py --images 200 --output runs/quality   # keep Parquet + report.html
    python benchmarks/quality.py --target-info runs/vit_cifar10.safetensors.json \
        --explainer ~/l2r_runs/cifar10-vit/explainer        # the ViT target (benchmarks/train_vit.py)
    python benchmarks/quality.py --images 1000 --explainer cifar10-vit --reference impute,black,mean,blur
    python benchmarks/quality.py --images 1000 --explainer cifar10-vit --reference impute,black \
        --from-results runs/quality     # the tables of a kept (or stopped) run, without running it again
    python benchmarks/quality.py --explainer runs/other/explainer --reference impute,black \
        --baselines-from runs/quality   # a new explainer against a kept run's baseline maps

``--baselines-from`` runs the job for the explainer alone, on a kept run's images, and takes every
baseline's rows from that run (their maps depend only on the target, images and protocol, which must
match): comparing a new explainer costs minutes instead of RISE's and IG's passes again.

The target is the explainer's own (the one its artifact records) when ``--explainer`` is given,
else the shared ResNet-20; ``--target-info`` names the JSON that ``benchmarks/train_vit.py`` writes
beside its weights instead. With a ViT target the baselines are the ViT ones (vit_cam and attention
rollout in place of Grad-CAM).

``--reference`` takes several references: the job runs once with the first (every map computed
and scored there), and the stored maps (their exact rankings) are scored again under each other
reference with the same metric (``l2r.metrics.deletion_insertion``), so RISE's 1,000 target
passes per image are paid once. The job runs the eager fp32 path (``fast_path="eager"``), the
reference every score here shares.

Prints the Markdown tables; the last line is JSON: ``{"references": {reference: {"deletion_auc":
{method: mean}, "insertion_auc": {method: mean}, "paired": ...}}, "cost": {method: target passes
per image}, ...}`` (cost =
forward + backward passes of the target to produce one map; the exact curves cost the same
2K-1 forwards for every method and are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import CHECKPOINT, MEAN, SIZE, SPEC, STD, subset_shards  # noqa: E402
from l2r.perturbation import REFERENCES  # noqa: E402

DEFAULT_SHARDS = ROOT.parent / "shared" / "data" / "cifar10" / "test-0000.tar"
BASELINES = ("gradcam", "ig", "saliency", "rise", "random", "gaussian")
VIT_BASELINES = ("vit_cam", "rollout", "ig", "saliency", "rise", "random", "gaussian")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="first N images of the shards")
    p.add_argument("--explainer", help="explainer: a shipped name (cifar10-resnet20, cifar10-vit) or an artifact "
                   "folder (omit: baselines only)")
    p.add_argument("--methods", help=f"baselines to compare (default: {','.join(BASELINES)}; "
                   f"for a ViT: {','.join(VIT_BASELINES)})")
    p.add_argument("--target-info", help="JSON of the target (spec, kwargs, mean, std, input_size), e.g. from "
                   "benchmarks/train_vit.py; its weights are the same path without .json")
    p.add_argument("--shards", default=str(DEFAULT_SHARDS))
    p.add_argument("--checkpoint", help="target weights (default: the explainer's target, the shared ResNet-20, "
                   "or --target-info's)")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--refine-steps", type=int, default=0, help="test-time refinement of the l2r maps (l2r.refine)")
    p.add_argument("--reference", default="black", help=f"one or several of {','.join(REFERENCES)}, comma-separated")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--actors", type=int)
    p.add_argument("--threads", type=int, help="torch threads per actor")
    p.add_argument("--rescore-threads", type=int, help="torch threads for the re-scoring under the other references, "
                   "which runs alone after the job (default: torch's, every core)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--output", help="keep the results and write the HTML report here (default: a temporary folder)")
    p.add_argument("--gallery", type=int, default=8)
    p.add_argument("--from-results", metavar="DIR", help="tabulate an earlier run's --output folder instead of running "
                   "the job (its committed shards: a stopped run counts the shards it finished); same other flags")
    p.add_argument("--baselines-from", metavar="DIR", help="a kept run's --output folder: run only the explainer on "
                   "its images and take the baselines' rows from it (same target and protocol)")
    args = p.parse_args(argv)
    if args.baselines_from and (args.from_results or not args.explainer):
        p.error("--baselines-from needs --explainer and excludes --from-results")
    references = [r.strip() for r in args.reference.split(",") if r.strip()]
    unknown = [r for r in references if r not in REFERENCES]
    if unknown or not references:
        p.error(f"unknown reference {unknown}; choose from {REFERENCES}")

    from l2r.zoo.resnet20 import CIFAR10_CLASSES
    from l2r.methods.learned import NAME as EXPLAINER_METHOD
    from pipeline.attribute import AttributeConfig, read_results, run_attribution
    from l2r.reporting.report import ReportConfig, write_report
    from l2r.reporting.stats import markdown_table, summarize
    from l2r.results import Stats

    target = {"spec": SPEC, "checkpoint": str(CHECKPOINT), "kwargs": {}, "mean": MEAN, "std": STD,
              "input_size": (SIZE, SIZE)}
    if args.target_info:
        info = json.loads(Path(args.target_info).read_text())
        target = {"spec": info["spec"], "checkpoint": args.target_info.removesuffix(".json"),
                  "kwargs": info.get("kwargs") or {}, "mean": tuple(info["mean"]), "std": tuple(info["std"]),
                  "input_size": tuple(info["input_size"])}
    elif args.explainer:
        from l2r.artifact import local_artifact, read_target_spec

        target = {k: v for k, v in read_target_spec(local_artifact(args.explainer)).to_dict().items()
                  if k not in ("weight_source", "weights_sha256", "num_classes", "class_names")}
    if args.checkpoint:
        target["checkpoint"] = args.checkpoint
    is_vit = "vit" in target["spec"]
    methods = [m.strip() for m in (args.methods or ",".join(VIT_BASELINES if is_vit else BASELINES)).split(",")
               if m.strip()]
    if args.explainer:
        methods = [EXPLAINER_METHOD, *methods]
    work = Path(args.from_results or args.output or tempfile.mkdtemp(prefix="l2r-bench-quality-"))
    shard_dir = work / "shards"
    if args.from_results or args.baselines_from:  # the shards it read, as they are (--images does not apply)
        shard_dir = Path(args.baselines_from or args.from_results) / "shards"
        shards = sorted(str(path) for path in shard_dir.glob("*.tar"))
    else:
        shards = subset_shards(args.shards, args.images, 500, shard_dir)
        (shard_dir / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CIFAR10_CLASSES)}))

    config = AttributeConfig(
        shards=shards, output=str(work / "results"), target=target, explainer=args.explainer,
        methods=[EXPLAINER_METHOD] if args.baselines_from else methods,
        protocol={"steps": args.steps, "reference": references[0]}, refine_steps=args.refine_steps,
        device=args.device, actors=args.actors,
        threads=args.threads, batch_size=args.batch_size, fast_path="eager", overwrite=True,
    )
    start = time.perf_counter()
    if args.from_results:
        table = read_results(config.output)
        if not table.num_rows:
            p.error(f"{config.output}: no finished shard to tabulate")
        counted = Stats(dict.fromkeys(table.column("method").to_pylist()))  # the job's own counts
        counted.add_table(table)
        run = {"images": counted.images, "errors": counted.errors}
    else:
        run = run_attribution(config, log=lambda line: print(line, file=sys.stderr, flush=True))
        table = read_results(config.output)
        if args.baselines_from:
            table = with_kept_baselines(table, config.output, Path(args.baselines_from) / "results", methods)
    seconds = time.perf_counter() - start
    if args.output or args.from_results:
        write_report(ReportConfig(results=config.output, gallery=args.gallery, resamples=args.resamples),
                     log=lambda line: None)
    cost = {}
    for m, s in summarize(table, resamples=1, methods=methods).items():
        if s["cost"]["forward_passes"] is not None:
            cost[m] = s["cost"]["forward_passes"] + s["cost"]["backward_passes"]
    results = {}
    for reference in references:
        began = time.perf_counter()
        if reference != references[0] and args.baselines_from:
            table = rescore_with_kept(table, config, reference, args.rescore_threads, Path(args.baselines_from))
        elif reference != references[0]:
            table = rescore(table, config, reference, args.rescore_threads)
        stats = summarize(table, resamples=args.resamples, methods=methods)
        print(f"\nCIFAR-10 test, first {run['images']} images, target {config.target.spec}, {args.steps} steps, "
              f"reference {reference}, target class = prediction; "
              f"{seconds if reference == references[0] else time.perf_counter() - began:.0f} s")
        print(markdown_table(stats))
        results[reference] = {"deletion_auc": {m: s["deletion_auc"]["mean"] for m, s in stats.items()},
                              "insertion_auc": {m: s["insertion_auc"]["mean"] for m, s in stats.items()}}
        if args.explainer:
            # l2r - method on the same images, resampled together (an interval without 0 is a difference).
            from benchmarks.imagenet_sample import markdown as paired_markdown
            from benchmarks.imagenet_sample import scores_by_method
            from benchmarks.imagenet_sample import statistics as paired_statistics

            paired = paired_statistics(scores_by_method(table.to_pylist()), EXPLAINER_METHOD, args.resamples)
            print(f"\npaired, {paired['images']} images, reference {reference}:")
            print(paired_markdown(paired, cost, EXPLAINER_METHOD))
            results[reference]["paired"] = {
                m: {k: v for k, v in s.items() if k.startswith(f"{EXPLAINER_METHOD}_minus")}
                for m, s in paired.items() if m not in ("images", EXPLAINER_METHOD)}
    print(json.dumps({
        "references": results, "cost": cost, "images": run["images"], "errors": run["errors"], "seconds": seconds,
        "explainer": args.explainer, "target": config.target.spec, "steps": args.steps,
    }))


def with_kept_baselines(table, output: str, kept: Path, methods: list[str]):
    """`table` (the explainer's rows) with the baseline rows of the kept results folder `kept`, after
    checking that both runs explained the same target on the same images under the same protocol."""
    import pyarrow as pa

    from l2r.methods.learned import NAME as EXPLAINER_METHOD
    from pipeline.attribute import read_results
    from l2r.reporting.report import read_manifest

    ours, theirs = read_manifest(output)["identity"], read_manifest(str(kept))
    if theirs is None:
        raise SystemExit(f"--baselines-from: {kept} has no manifest.json")
    theirs = theirs["identity"]
    for name, a, b in (("protocol", ours["protocol"], theirs["protocol"]),
                       ("target weights", ours["target"]["weights_sha256"], theirs["target"]["weights_sha256"]),
                       ("target", ours["target"]["spec"], theirs["target"]["spec"]),
                       ("crop", ours["crop_pct"], theirs["crop_pct"])):
        if a != b:
            raise SystemExit(f"--baselines-from {kept}: its {name} {b!r} differs from this run's {a!r}")
    kept_table = read_results(str(kept))
    baselines = [m for m in methods if m != EXPLAINER_METHOD]
    missing = sorted(set(baselines) - set(kept_table.column("method").to_pylist()))
    if missing:
        raise SystemExit(f"--baselines-from {kept}: no rows for {missing}")
    keys = set(table.column("key").to_pylist())
    rows = [r for r in kept_table.to_pylist() if r["method"] in baselines]
    if {r["key"] for r in rows} != keys:
        raise SystemExit(f"--baselines-from {kept}: its images differ from this run's")
    return pa.concat_tables([table, pa.Table.from_pylist(rows, schema=table.schema)])


def rescore_with_kept(table, config, reference: str, threads: int | None, kept: Path):
    """`rescore` for a --baselines-from table: the explainer's rows scored now, the baselines' rows
    scored once and kept beside the kept run (`rescored/<reference>.parquet`), since their maps are fixed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from l2r.methods.learned import NAME as EXPLAINER_METHOD

    ours = table.filter(pc.equal(table.column("method"), EXPLAINER_METHOD))
    baselines = table.filter(pc.not_equal(table.column("method"), EXPLAINER_METHOD))
    cache = kept / "rescored" / f"{reference}.parquet"
    scored = pq.read_table(cache, schema=table.schema) if cache.exists() else None
    if scored is None or method_keys(scored) != method_keys(baselines):
        scored = rescore(baselines, config, reference, threads)
        cache.parent.mkdir(exist_ok=True)
        pq.write_table(scored, cache)
    return pa.concat_tables([rescore(ours, config, reference, threads), scored])


def method_keys(table) -> list[tuple[str, str]]:
    """The table's (method, image key) pairs, sorted: which rows it holds, whatever their order."""
    return sorted(zip(table.column("method").to_pylist(), table.column("key").to_pylist()))


def rescore(table, config, reference: str, threads: int | None = None):
    """The results table with every stored map scored again under `reference` (same target, images,
    target classes and steps; the stored ranking is the map's exact order)."""
    import numpy as np
    import pyarrow as pa
    import torch

    from l2r.images import decode_heatmap, to_tensor
    from l2r.metrics import deletion_insertion
    from l2r.shard_reader import iter_shard
    from l2r.results import SCHEMA

    if threads:
        torch.set_num_threads(threads)
    target = config.target_spec().build("cpu")
    size = tuple(config.target.input_size or target.input_size)
    images = {}
    for url in sorted(set(table.column("source").to_pylist())):
        for sample in iter_shard(url, size, config.target.crop_pct):
            if sample["error"] is None:
                images[(url, sample["key"])] = sample["image"]
    rows = table.to_pylist()
    valid = [r for r in rows if r["error"] is None]
    for start in range(0, len(valid), 256):
        chunk = valid[start:start + 256]
        scores = deletion_insertion(
            target, to_tensor(np.stack([images[(r["source"], r["key"])] for r in chunk])),
            torch.from_numpy(np.stack([decode_heatmap(r["heatmap"]) for r in chunk])),
            torch.tensor([r["target"] for r in chunk]), dataclasses.replace(config.protocol, reference=reference))
        for j, r in enumerate(chunk):
            for name in ("deletion_auc", "insertion_auc"):
                r[name] = float(scores[name][j])
            for name in ("deletion_curve", "insertion_curve"):
                r[name] = scores[name][j].tolist()
    return pa.Table.from_pylist(rows, schema=SCHEMA)


if __name__ == "__main__":
    main()
