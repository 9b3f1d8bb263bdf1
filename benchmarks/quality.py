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
    python benchmarks/quality.py --target-info runs/vit_cifar10.safetensors.json \
        --explainer ~/l2r_runs/cifar10-vit/explainer        # the ViT target (benchmarks/train_vit.py)

The target is the shared ResNet-20 unless ``--target-info`` names the JSON that
``benchmarks/train_vit.py`` writes beside its weights; with a ViT target the baselines are the
ViT ones (vit_cam and attention rollout in place of Grad-CAM).

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
VIT_BASELINES = ("vit_cam", "rollout", "ig", "saliency", "rise", "random", "gaussian")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="first N images of the shards")
    p.add_argument("--explainer", help="explainer artifact folder (omit: baselines only)")
    p.add_argument("--methods", help=f"baselines to compare (default: {','.join(BASELINES)}; "
                   f"for a ViT: {','.join(VIT_BASELINES)})")
    p.add_argument("--target-info", help="JSON of the target (spec, kwargs, mean, std, input_size), e.g. from "
                   "benchmarks/train_vit.py; its weights are the same path without .json")
    p.add_argument("--shards", default=str(DEFAULT_SHARDS))
    p.add_argument("--checkpoint", help="target weights (default: the shared ResNet-20, or --target-info's)")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--refine-steps", type=int, default=0, help="test-time refinement of the l2r maps (l2r.refine)")
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
    from pipeline.report import ReportConfig, write_report
    from pipeline.report_stats import markdown_table, summarize

    target = {"target": SPEC, "checkpoint": str(CHECKPOINT), "model_kwargs": {}, "mean": MEAN, "std": STD,
              "input_size": (SIZE, SIZE)}
    if args.target_info:
        info = json.loads(Path(args.target_info).read_text())
        target = {"target": info["spec"], "checkpoint": args.target_info.removesuffix(".json"),
                  "model_kwargs": info.get("kwargs") or {}, "mean": tuple(info["mean"]), "std": tuple(info["std"]),
                  "input_size": tuple(info["input_size"])}
    if args.checkpoint:
        target["checkpoint"] = args.checkpoint
    is_vit = "vit" in target["target"]
    methods = [m.strip() for m in (args.methods or ",".join(VIT_BASELINES if is_vit else BASELINES)).split(",")
               if m.strip()]
    if args.explainer:
        methods = [EXPLAINER_METHOD, *methods]
    work = Path(args.output or tempfile.mkdtemp(prefix="l2r-bench-quality-"))
    shard_dir = work / "shards"
    shards = subset_shards(args.shards, args.images, 500, shard_dir)
    (shard_dir / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CIFAR10_CLASSES)}))

    config = AttributeConfig(
        shards=shards, output=str(work / "results"), **target, explainer=args.explainer, methods=methods, steps=args.steps,
        reference=args.reference, refine_steps=args.refine_steps, device=args.device, actors=args.actors, batch_size=args.batch_size,
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
    print(f"CIFAR-10 test, first {run['images']} images, target {target['target']}, {args.steps} steps, "
          f"reference {args.reference}, target class = prediction; {seconds:.0f} s")
    print(markdown_table(stats))
    cost = {m: s["cost"]["forward_passes"] + s["cost"]["backward_passes"] for m, s in stats.items()
            if s["cost"]["forward_passes"] is not None}
    print(json.dumps({
        "deletion_auc": {m: s["deletion_auc"]["mean"] for m, s in stats.items()},
        "insertion_auc": {m: s["insertion_auc"]["mean"] for m, s in stats.items()},
        "cost": cost,
        "images": run["images"], "errors": run["errors"], "seconds": seconds,
        "explainer": args.explainer, "target": target["target"], "steps": args.steps, "reference": args.reference,
    }))


if __name__ == "__main__":
    main()
