"""Why no map beats both the random control's deletion and Grad-CAM's insertion at 32 px (black reference).

On CIFAR-10 with the shared ResNet-20 and the black reference, deleting scattered single pixels
is itself a strong attack on the CNN: the random control gets the lowest deletion AUC of all
methods, yet a near-zero insertion - difference. This script measures, on the same images, how
deletion and insertion move when a smooth map (Grad-CAM) is made more scattered:

1. Grad-CAM, ranks only;
2. Grad-CAM plus random noise inside its top fraction q of pixels (scattered where the deletion
   curve starts, coherent elsewhere), for several q and noise strengths;
3. scatter first: the top fraction q of pixels ordered at random, or by saliency (|gradient|) or
   gradient x input, then Grad-CAM's order for the rest (deletion starts with an attack,
   insertion keeps Grad-CAM's evidence after the first q);
4. the map optimised per image against the soft objective at pixel resolution (test-time
   refinement, `l2r.refine`, grid 32 = one cell per pixel, no verification): what the training
   objective itself pulls a map towards when nothing else constrains it.

    python benchmarks/tradeoff.py --images 48

Prints a Markdown table; the last line is JSON {name: [deletion_auc, insertion_auc]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.attribute import CHECKPOINT, MEAN, SIZE, SPEC, STD  # noqa: E402

SHARD = ROOT.parent / "shared" / "data" / "cifar10" / "test-0000.tar"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--refine-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from l2r.methods import attribute
    from l2r.classifier import build_target
    from l2r.images import to_tensor
    from l2r.metrics import deletion_insertion
    from l2r.refine import rank_uniform, refine
    from l2r.shard_reader import iter_shard

    rows = []
    for row in iter_shard(str(SHARD), SIZE):
        rows.append(row["image"])
        if len(rows) == args.images:
            break
    images = to_tensor(np.stack(rows))
    model = build_target(SPEC, CHECKPOINT, mean=MEAN, std=STD, input_size=(SIZE, SIZE)).eval()
    with torch.no_grad():
        targets = model(images).argmax(1)

    results = {}

    def score(name, maps):
        r = deletion_insertion(model, images, maps, targets, steps=21, reference="black")
        results[name] = [r["deletion_auc"].mean().item(), r["insertion_auc"].mean().item()]
        print(f"{name}: deletion {results[name][0]:.3f} insertion {results[name][1]:.3f}", file=sys.stderr, flush=True)

    gradcam, _ = attribute("gradcam", model, images, targets)
    ranks = rank_uniform(gradcam)
    noise = torch.rand(ranks.shape, generator=torch.Generator().manual_seed(0))
    score("random order", noise)
    score("gradcam", gradcam)
    for q in (0.2, 0.5):
        for strength in (0.2, 1.0):
            score(f"gradcam + noise {strength} in its top {q:.0%}", ranks + strength * noise * (ranks >= 1 - q))
    pixels = images.clone().requires_grad_(True)
    prob = model(pixels).gather(1, targets[:, None]).sum()
    grad, = torch.autograd.grad(prob, pixels)
    first_orders = {"random": rank_uniform(noise), "saliency": rank_uniform(grad.abs().sum(1)),
                    "grad x input": rank_uniform((grad * images).sum(1))}
    for q in (0.02, 0.05, 0.2):
        for name, order in first_orders.items():
            first = (order >= 1 - q).float()  # its top q: ranked above every Grad-CAM pixel, in its own order
            score(f"{name} first {q:.0%}, then gradcam", ranks + 2 * first * (1 + order))
    start = time.perf_counter()
    refined, cost = refine(model, images, gradcam, targets, steps=args.refine_steps, grid=SIZE, verify=False)
    seconds = time.perf_counter() - start
    score(f"gradcam refined per pixel ({args.refine_steps} steps, G={SIZE})", refined)

    print(f"CIFAR-10 test, first {args.images} images, ResNet-20, black reference, K=21 "
          f"(refinement: {seconds:.0f} s, {cost['forward_passes']} target passes per image)")
    print("| map | deletion AUC (lower better) | insertion AUC (higher better) | ins - del |")
    print("| --- | --- | --- | --- |")
    for name, (d, i) in results.items():
        print(f"| {name} | {d:.3f} | {i:.3f} | {i - d:.3f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
