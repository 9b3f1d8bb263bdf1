"""Attribution quality on CIFAR-10: a trained explainer against every applicable baseline.

On the first ``--images`` images of the shared CIFAR-10 test shards, with the shared
ResNet-20 as the target, this runs the attribution job (``pipeline.attribute.run_attribution``)
with ``l2r`` (when ``--explainer`` names an artifact, e.g. the training job's cifar10 config
output) and the baselines that apply to a CNN (gradcam, ig, saliency, rise, random,
gaussian), then the report's summary (``pipeline.report``): mean exact deletion / insertion
AUC per method with bootstrap intervals and the cost per image.

    python benchmarks/quality.py --images 500 --explainer ~/l2r_runs/cifar10/explainer
    python benchmarks/quality.py --images 200                    # baselines only
    python benchmarks/quality.py --images 200 --output runs/quality   # keep Parquet + report.html

Prints the Markdown table; the last line is JSON: ``{"deletion_auc": {method: mean},
"insertion_auc": {method: mean}, "cost": {method: target passes per image}, ...}`` (cost =
forward + backward passes of the target to produce one map; the exact curves cost the same
2K-1 forwards for every method and are not counted).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import CHECKPOINT, MEAN, SIZE, SPEC, STD, subset_shards  # noqa: E402

DEFAULT_SHARDS = ROOT.parent / "shared" / "data" / "cifar10" / "test-0000.tar"
BASELINES = ("gradcam", "ig", "saliency", "rise", "random", "gaussian")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="first N images of the shards")
    p.add_argument("--explainer", help="explainer artifact folder (omit: baselines only)")
    p.add_argument("--methods", default=",".join(BASELINES), help="baselines to compare")
    p.add_argument("--shards", default=str(DEFAULT_SHARDS))
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--reference", default="black", choices=["black", "mean", "blur"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--actors", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--output", help="keep the results and write the HTML report here (default: a temporary folder)")
    p.add_argument("--gallery", type=int, default=8)
    args = p.parse_args(argv)

    from benchmarks.resnet20 import CIFAR10_CLASSES
    from pipeline.attribute import EXPLAINER_METHOD, AttributeConfig, read_results, run_attribution
    from pipeline.report import ReportConfig, markdown_table, summarize, write_report

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.explainer:
        methods = [EXPLAINER_METHOD, *methods]
    work = Path(args.output or tempfile.mkdtemp(prefix="l2r-bench-quality-"))
    shard_dir = work / "shards"
    shards = subset_shards(args.shards, args.images, 500, shard_dir)
    (shard_dir / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CIFAR10_CLASSES)}))

    config = AttributeConfig(
        shards=shards, output=str(work / "results"), target=SPEC, checkpoint=args.checkpoint, mean=MEAN, std=STD,
        input_size=(SIZE, SIZE), explainer=args.explainer, methods=methods, steps=args.steps,
        reference=args.reference, device=args.device, actors=args.actors, batch_size=args.batch_size,
        overwrite=True,
    )
    start = time.perf_counter()
    run = run_attribution(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    if args.output:
        report = write_report(ReportConfig(results=config.output, gallery=args.gallery, resamples=args.resamples),
                              log=lambda line: None)
        stats = report["methods"]
    else:
        stats = summarize(read_results(config.output), resamples=args.resamples, methods=methods)
    print(f"CIFAR-10 test, first {run['images']} images, ResNet-20 target, {args.steps} steps, "
          f"reference {args.reference}, target class = prediction; {seconds:.0f} s")
    print(markdown_table(stats))
    cost = {m: s["cost"]["forward_passes"] + s["cost"]["backward_passes"] for m, s in stats.items()
            if s["cost"]["forward_passes"] is not None}
    print(json.dumps({
        "deletion_auc": {m: s["deletion_auc"]["mean"] for m, s in stats.items()},
        "insertion_auc": {m: s["insertion_auc"]["mean"] for m, s in stats.items()},
        "cost": cost,
        "images": run["images"], "errors": run["errors"], "seconds": seconds,
        "explainer": args.explainer, "steps": args.steps, "reference": args.reference,
    }))


if __name__ == "__main__":
    main()
