"""The deletion/insertion protocol as peers compute it, against l2r's exact metric.

Same model (the shared ResNet-20), same real CIFAR-10 test images, same maps (smooth random
fields turned into their pixel order, so every ranking agrees), black reference, K = 17 curve points so that
each step removes exactly HW/16 = 64 pixels in every implementation:

- Quantus (pip `quantus`, benchmark-only): `PixelFlipping` (deletion), softmax over the logits,
  baseline 0 (Quantus's own "black" is each image's minimum value, not 0: run separately as
  `quantus_own_black`, a difference of protocol). Quantus flips channel values, not pixels: the map is broadcast over the 3
  channels (a pixel's three values are adjacent in its order) and `features_in_step` must
  divide H x W, so it runs with 64 channel values a step, 48 steps; every third of its points
  (192 values = 64 whole pixels) is a point of the l2r curve.
- A plain per-image loop in the style of the RISE authors' `CausalMetric` (Petsiuk et al. 2018):
  one image at a time, one forward per step, deletion and insertion.
- l2r: `l2r.metrics.deletion_insertion`, batched.

Where the protocols coincide the curves are compared point by point. Quantus differs in two
ways: its curve has no p = 0 point (it starts after the first step) and its AUC is a trapezoid
with dx = 1 over its points, not over the fraction removed; and its points in between remove
one or two channels of a pixel. Its AUC, normalised to ours (the p = 0 segment added, divided
by the number of steps), is reported beside ours with the difference those in-between points
make. Quantus has no insertion counterpart of PixelFlipping with the same baseline.

    python benchmarks/peers.py [--images 64]

The last line is JSON: images/s of each and the ratios, the largest curve and AUC differences.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import build  # noqa: E402
from benchmarks.imputation import real_images, smooth_maps  # noqa: E402
from l2r.metrics import auc, deletion_insertion  # noqa: E402
from l2r.perturbation import deletion_counts, fractions  # noqa: E402
from l2r.ranking import pixel_ranks  # noqa: E402

STEPS = 17  # 16 intervals: 64 pixels each at 32 x 32


class Logits(nn.Module):
    """What Quantus is given: [0,1] images -> logits (it applies the softmax itself)."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x):
        return self.target.logits(x)


@torch.inference_mode()
def causal_metric_loop(target, images, maps, targets, steps):
    """One image at a time, one forward per step (the RISE authors' CausalMetric, single_run)."""
    h, w = images.shape[-2:]
    counts = deletion_counts(fractions(steps), h * w).tolist()
    deletion, insertion = [], []
    for image, saliency, c in zip(images, maps, targets.tolist()):
        order = pixel_ranks(saliency[None])[0].reshape(-1)  # 0 = most important
        curve_del, curve_ins = [], []
        for count in counts:
            removed = (order < count).reshape(1, h, w)
            curve_del.append(float(target(torch.where(removed, 0.0, image)[None])[0, c]))
            inserted = (order < count).reshape(1, h, w)  # the most important first, onto black
            curve_ins.append(float(target(torch.where(inserted, image, 0.0)[None])[0, c]))
        deletion.append(curve_del)
        insertion.append(curve_ins)
    return torch.tensor(deletion), torch.tensor(insertion)


def quantus_deletion(target, images, maps, targets, baseline=0.0):
    import quantus

    h, w = images.shape[-2:]
    metric = quantus.PixelFlipping(features_in_step=h * w // (STEPS - 1), perturb_baseline=baseline,
                                   normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    x = images.numpy()
    a = maps[:, None].expand(-1, 3, -1, -1).numpy().astype(np.float32)  # one value per channel value
    curves = metric(model=Logits(target).eval(), x_batch=x, y_batch=targets.numpy(), a_batch=a,
                    softmax=True, device="cpu", batch_size=len(x))
    return torch.tensor(np.asarray(curves, dtype=np.float64))


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    target, _ = build("resnet20")
    target.eval()
    images = real_images("resnet20", args.images)
    # Distinct values so that every ranking agrees: each smooth map is replaced by its pixels' order
    # (integers, exact in float32). Small noise is not enough: 1e-6 on values near 0.5 rounds to a
    # few float32 steps and leaves ties, which Quantus's argsort breaks differently from l2r.
    ranks = pixel_ranks(smooth_maps(len(images), 32))  # 0 = most important
    maps = (32 * 32 - 1 - ranks).float().view(-1, 32, 32)
    targets = target(images).argmax(dim=1)
    fracs = fractions(STEPS)

    ours, ours_s = timed(lambda: deletion_insertion(target, images, maps, targets, steps=STEPS, max_batch=64))
    (loop_del, loop_ins), loop_s = timed(causal_metric_loop, target, images, maps, targets, STEPS)
    result = {"images": len(images), "steps": STEPS, "threads": torch.get_num_threads(),
              "l2r_per_s": len(images) / ours_s, "loop_per_s": len(images) / loop_s,
              "l2r_over_loop": loop_s / ours_s,
              "loop_curve_max_diff": float(max((loop_del - ours["deletion_curve"].double()).abs().max(),
                                               (loop_ins - ours["insertion_curve"].double()).abs().max())),
              "loop_auc_max_diff": float(max((auc(loop_del, fracs) - ours["deletion_auc"]).abs().max(),
                                             (auc(loop_ins, fracs) - ours["insertion_auc"]).abs().max()))}
    try:
        quantus_curves, quantus_s = timed(quantus_deletion, target, images, maps, targets)
    except ImportError:
        print("quantus not installed (pip install quantus): skipped", file=sys.stderr)
    else:
        # Quantus: the points after each step (no p = 0), AUC with dx = 1 over them; 3 steps = 1 of ours.
        ours_points = ours["deletion_curve"][:, 1:].double()
        whole_pixels = quantus_curves[:, 2::3]
        quantus_auc = torch.trapezoid(quantus_curves, dx=1.0, dim=1)
        first_segment = (ours["deletion_curve"][:, 0].double() + quantus_curves[:, 0]) / 2
        as_ours = (quantus_auc + first_segment) / quantus_curves.shape[1]
        # The deletion half of l2r's work, for a like-for-like rate (l2r computes both curves at once).
        own_black, _ = timed(quantus_deletion, target, images, maps, targets, "black")
        own_auc = (torch.trapezoid(own_black, dx=1.0, dim=1) + first_segment) / own_black.shape[1]
        result["quantus_own_black_auc_mean_diff"] = float((own_auc - as_ours).mean())
        result.update({"quantus_per_s": len(images) / quantus_s, "l2r_over_quantus_deletion": quantus_s / (ours_s / 2),
                       "quantus_curve_max_diff": float((whole_pixels - ours_points).abs().max()),
                       "quantus_auc_max_diff": float((as_ours - ours["deletion_auc"].double()).abs().max()),
                       "quantus_auc_mean_diff": float((as_ours - ours["deletion_auc"].double()).mean())})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
