"""Held-out quality at a realistic resolution: the MobileNetV1 explainer against every baseline.

On the photos that `jobs/configs/imagenet-sample-mobilenet.yaml` holds back from training (1 in 5
of the shared ImageNet sample, `--holdout-every 5`: 100 photos of 100 classes never trained on),
with the shared MobileNetV1 0.5 at 160 px as the target, this runs the attribution job for each
reference (`black`, `mean`, `blur`): once for the baselines (gradcam, ig, saliency, rise, random,
gaussian), once for `l2r` and, with `--refine-steps`, once more for `l2r` with test-time refinement. Per reference it prints mean exact deletion / insertion AUC and insertion - deletion
with 95 % bootstrap intervals, the paired difference to l2r (the same images resampled for both;
an interval that excludes 0 is a difference), and the target passes per image for one map.

    python benchmarks/imagenet_sample.py --explainer imagenet-sample-mobilenet \
        --output runs/imagenet-sample-eval [--refine-steps 20] [--references black,mean,blur]

Reruns with the same `--output` reuse finished results (the attribution job skips finished shards).
`--report` also writes the report (`report.html`, the gallery) of l2r and the one-pass baselines, black.
The last line printed is JSON: {reference: {method: {deletion, insertion, ins_minus_del, ...}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
SHARD = SHARED / "data" / "imagenet-sample" / "val-0000.tar"
CLASSES = SHARED / "data" / "imagenet-sample" / "classes.json"
# The shared model as a user names it (not the artifact's recorded paths, which are those of the
# machine it was trained on); the job checks that it is the model the explainer was trained for.
TARGET = dict(spec=f"{SHARED}/models/mobilenet_v1.py:MobileNetV1", checkpoint=str(SHARED / "models" / "mobilenet_v1_0.5_160.pth"),
              background_logit=True, mean=(0.50196,) * 3, std=(0.50196,) * 3, input_size=(160, 160), crop_pct=0.875)
BASELINES = ("gradcam", "ig", "saliency", "rise", "random", "gaussian")
REFINED = "l2r+refine"


def run(config, label: str) -> dict:
    """Run (or resume) one attribution; {method: {key: (deletion, insertion)}} and the cost per method."""
    from pipeline.attribute import read_results, run_attribution

    start = time.perf_counter()
    run_attribution(config, log=lambda line: print(f"[{label}] {line}", file=sys.stderr, flush=True))
    print(f"[{label}] {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    rows = read_results(config.output).to_pylist()
    cost = {row["method"]: (row.get("forward_passes") or 0) + (row.get("backward_passes") or 0)
            for row in rows if not row.get("error")}
    return {"scores": scores_by_method(rows), "cost": cost}


def scores_by_method(rows) -> dict:
    """{method: {key: (deletion AUC, insertion AUC)}} of result rows without an error, for `statistics`."""
    scores = {}
    for row in rows:
        if not row.get("error"):
            scores.setdefault(row["method"], {})[row["key"]] = (row["deletion_auc"], row["insertion_auc"])
    return scores


def statistics(scores: dict, reference_method: str, resamples: int) -> dict:
    """Means with intervals, and differences to `reference_method` paired per image."""
    from l2r.reporting.stats import bootstrap_means

    keys = sorted(set.intersection(*(set(s) for s in scores.values())))
    columns = {}
    for method, per_key in scores.items():
        values = np.array([per_key[k] for k in keys], dtype=float)
        columns[f"{method}|deletion"] = values[:, 0]
        columns[f"{method}|insertion"] = values[:, 1]
        columns[f"{method}|ins_minus_del"] = values[:, 1] - values[:, 0]
    for method in scores:
        if method != reference_method:
            for metric in ("deletion", "insertion", "ins_minus_del"):
                columns[f"{method}|{reference_method}_minus_method_{metric}"] = (
                    columns[f"{reference_method}|{metric}"] - columns[f"{method}|{metric}"])
    intervals = bootstrap_means(columns, resamples=resamples)
    out = {"images": len(keys)}
    for name, values in columns.items():
        method, metric = name.split("|")
        out.setdefault(method, {})[metric] = {"mean": float(values.mean()),
                                              "ci": [round(v, 4) for v in intervals[name]]}
    return out


def markdown(stats: dict, cost: dict, reference_method: str) -> str:
    lines = [f"| method | deletion | insertion | ins - del | {reference_method} - method: del / ins / ins-del "
             "(paired 95 % CI) | passes/img |", "| --- | --- | --- | --- | --- | --- |"]
    for method, s in stats.items():
        if method == "images":
            continue

        def cell(metric):
            return f"{s[metric]['mean']:.3f} [{s[metric]['ci'][0]:.3f}, {s[metric]['ci'][1]:.3f}]"

        diff = "" if method == reference_method else " / ".join(
            f"{s[f'{reference_method}_minus_method_{m}']['mean']:+.3f} "
            f"[{s[f'{reference_method}_minus_method_{m}']['ci'][0]:+.3f}, {s[f'{reference_method}_minus_method_{m}']['ci'][1]:+.3f}]"
            for m in ("deletion", "insertion", "ins_minus_del"))
        lines.append(f"| {method} | {cell('deletion')} | {cell('insertion')} | {cell('ins_minus_del')} | {diff} | "
                     f"{cost.get(method, '')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--explainer", help="the imagenet-sample-mobilenet explainer artifact (omit: baselines only)")
    p.add_argument("--output", required=True, help="folder for the results (reused by a rerun)")
    p.add_argument("--shards", default=str(SHARD))
    p.add_argument("--holdout-every", type=int, default=5)
    p.add_argument("--references", default="black,mean,blur")
    p.add_argument("--methods", default=",".join(BASELINES))
    p.add_argument("--refine-steps", type=int, default=0, help="also l2r with this many test-time refinement steps")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--actors", type=int, default=None, help="attribution actors (default: the job's plan)")
    p.add_argument("--batch-size", type=int, default=None, help="images per actor call (default: the job's)")
    p.add_argument("--report", action="store_true", help="write the report (gallery) for the black reference")
    args = p.parse_args(argv)

    from l2r.methods.learned import NAME as EXPLAINER_METHOD
    from pipeline.attribute import AttributeConfig

    out = Path(args.output)
    baselines = tuple(m for m in args.methods.split(",") if m)
    results = {}
    for reference in [r for r in args.references.split(",") if r]:
        common = dict(target=TARGET, shards=args.shards, explainer=args.explainer, protocol={"steps": args.steps, "reference": reference},
                      holdout_every=args.holdout_every, actors=args.actors, batch_size=args.batch_size)
        scores, cost = {}, {}
        runs = [("baselines", dict(methods=baselines))] if baselines else []
        if args.explainer:
            runs.append(("l2r", dict(methods=(EXPLAINER_METHOD,))))
        if args.explainer and args.refine_steps:
            runs.append(("l2r_refined", dict(methods=(EXPLAINER_METHOD,), refine_steps=args.refine_steps)))
        for label, extra in runs:
            got = run(AttributeConfig(output=str(out / reference / label), **common, **extra), f"{reference}/{label}")
            rename = {EXPLAINER_METHOD: REFINED} if label == "l2r_refined" else {}
            for method, per_key in got["scores"].items():
                scores[rename.get(method, method)] = per_key
                cost[rename.get(method, method)] = got["cost"].get(method)
        stats = statistics(scores, EXPLAINER_METHOD if args.explainer else baselines[0], args.resamples)
        print(f"\nreference {reference}: {stats['images']} held-out photos, K={args.steps}, target = top-1 prediction")
        print(markdown(stats, cost, EXPLAINER_METHOD if args.explainer else baselines[0]), flush=True)
        results[reference] = {"images": stats["images"], **{
            m: {"deletion": round(s["deletion"]["mean"], 4), "insertion": round(s["insertion"]["mean"], 4),
                "ins_minus_del": round(s["ins_minus_del"]["mean"], 4), "cost": cost.get(m)}
            for m, s in stats.items() if m != "images"}}
    if args.report and args.explainer:
        # The report reads one output folder: l2r and the one-pass baselines again, on the black reference.
        from l2r.reporting.report import ReportConfig, write_report

        folder = out / "report-black"
        methods = (EXPLAINER_METHOD, *[m for m in baselines if m not in ("ig", "rise")])
        run(AttributeConfig(target=TARGET, shards=args.shards, explainer=args.explainer,
                            protocol={"steps": args.steps, "reference": "black"}, holdout_every=args.holdout_every, methods=methods,
                            actors=args.actors, batch_size=args.batch_size,
                            output=str(folder)), "report")
        write_report(ReportConfig(results=str(folder), gallery=8), log=lambda line: None)
        print(f"report: {folder / 'report' / 'report.html'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
