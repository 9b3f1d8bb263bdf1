"""Evidence localisation on synthetic data: pointing game and mask AUROC per method.

The synthetic dataset (``l2r.synthetic``) decides each label by one class object whose
pixel mask is known. This script fits a small target (ResNet-8 for 32 px, one block per
stage) on generated images in-process, writes held-out shards with masks
(``l2r.shards``), runs the attribution job with ``with_mask`` (evidence scores per row)
and prints the report's summary: deletion / insertion AUC, pointing game accuracy and mean
mask AUROC per method, with bootstrap intervals.

    python benchmarks/evidence.py [--images 200] [--fit-steps 300] [--explainer DIR --target-checkpoint F]

An explainer is only meaningful for the target it was trained on: pass ``--explainer`` with
``--target-checkpoint`` (the target that explainer was trained against, e.g. the demo run's
``target.pt``); without them the script fits its own target and compares the baselines.
The last line printed is JSON: ``{"pointing_game": {method: value}, "mask_auroc": {...},
"deletion_auc": {...}, "insertion_auc": {...}, "target_accuracy": value}``.
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

SPEC = "l2r.zoo.resnet20:ResNetCifar"
KWARGS = {"blocks_per_stage": 1, "num_classes": 10}
SIZE = 32
BASELINES = ("gradcam", "ig", "saliency", "rise", "random", "gaussian")


def fit_target(path: Path, steps: int, batch: int = 64, seed: int = 0, log=print) -> None:
    """Fit the small target on freshly generated synthetic images (seed != the held-out seed)."""
    import numpy as np
    import torch

    from l2r import synthetic
    from l2r.classifier import build_target
    from l2r.images import to_tensor

    torch.manual_seed(seed)
    target = build_target(SPEC, model_kwargs=KWARGS, input_size=(SIZE, SIZE))
    net = target.net
    net.requires_grad_(True)
    net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=steps)
    samples = synthetic.generate(steps * batch, SIZE, seed=seed + 1000)
    start = time.perf_counter()
    for step in range(steps):
        chunk = [next(samples) for _ in range(batch)]
        images = to_tensor(np.stack([c[0] for c in chunk]))
        labels = torch.tensor([c[2] for c in chunk])
        loss = torch.nn.functional.cross_entropy(net(target.normalise(images)), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"fit target: step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    torch.save(net.state_dict(), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="held-out synthetic images")
    p.add_argument("--fit-steps", type=int, default=300, help="target fitting steps (batch 64)")
    p.add_argument("--target-checkpoint", help="use this target (l2r.zoo.resnet20:ResNetCifar, 1 block per stage)")
    p.add_argument("--explainer", help="explainer artifact trained for --target-checkpoint")
    p.add_argument("--methods", default=",".join(BASELINES))
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--reference", default="black", choices=["black", "mean", "blur", "impute"])
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--output", help="keep shards, results and report.html here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.explainer and not args.target_checkpoint:
        p.error("--explainer needs --target-checkpoint (the target it was trained for)")

    from l2r.methods.learned import NAME as EXPLAINER_METHOD
    from pipeline.attribute import AttributeConfig, read_results, run_attribution
    from l2r.reporting.report import ReportConfig, write_report
    from l2r.reporting.stats import markdown_table, summarize
    from l2r.shards import make_shards

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(args.output or tempfile.mkdtemp(prefix="l2r-bench-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.target_checkpoint
    if checkpoint is None:
        checkpoint = str(work / "target.pt")
        fit_target(Path(checkpoint), args.fit_steps, log=log)
    shards = make_shards(str(work / "shards"), synthetic=args.images, size=SIZE, prefix="val", max_count=500,
                         seed=7, progress=False)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.explainer:
        methods = [EXPLAINER_METHOD, *methods]
    config = AttributeConfig(shards=shards, output=str(work / "results"),
                             target={"spec": SPEC, "checkpoint": checkpoint, "kwargs": KWARGS, "input_size": SIZE},
                             explainer=args.explainer, methods=methods,
                             protocol={"steps": args.steps, "reference": args.reference}, with_mask=True, overwrite=True)
    start = time.perf_counter()
    run_attribution(config, log=log)
    seconds = time.perf_counter() - start
    table = read_results(config.output)
    rows = [r for r in table.select(["method", "pred", "label", "error"]).to_pylist()
            if r["method"] == methods[0] and r["error"] is None]
    accuracy = sum(r["pred"] == r["label"] for r in rows) / max(len(rows), 1)
    if args.output:
        report = write_report(ReportConfig(results=config.output, resamples=args.resamples), log=lambda line: None)
        stats = report["methods"]
    else:
        stats = summarize(table, resamples=args.resamples, methods=methods)
    print(f"synthetic shapes, {len(rows)} held-out images at {SIZE} px, target accuracy {accuracy:.3f}, "
          f"{args.steps} steps, reference {args.reference}; attribution {seconds:.0f} s")
    print(markdown_table(stats))

    def means(name):
        return {m: (s[name] or {}).get("mean") for m, s in stats.items()}

    print(json.dumps({"pointing_game": means("pointing_game"), "mask_auroc": means("mask_auroc"),
                      "deletion_auc": means("deletion_auc"), "insertion_auc": means("insertion_auc"),
                      "target_accuracy": accuracy, "images": len(rows), "seconds": seconds}))


if __name__ == "__main__":
    main()
