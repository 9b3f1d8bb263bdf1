"""Where a training step's time goes, for a training config (default: the MobileNetV1 at 160 px).

Builds the config's target and explainer, takes `--batch` photos of its training data (decoded as
the training reader does, then the config's random crops), and times `--repeats` steps of
`l2r.objective.objective_backward` in parts:

- `target_passes_s`: stage one of the two-stage backward (`_chunked_mask_grad`: every perturbed
  image through the target, forward and backward to the masks), timed by wrapping it;
- `sinkhorn_s`: the soft masks (Gumbel-Sinkhorn ranking and mask upsampling) forward and backward,
  timed alone on the step's own scores, grid and temperature (the step's autograd backward runs
  it inside the explainer's backward, where it cannot be timed apart);
- `step_s`: the whole `objective_backward` (explainer forward/backward included).

Also counts the target passes per training image (forward and backward). The last line is JSON.

    python benchmarks/step_breakdown.py [--config jobs/configs/imagenet-sample-mobilenet.yaml] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "imagenet-sample-mobilenet.yaml"))
    p.add_argument("--batch", type=int, default=None, help="images per step (default: the config's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import l2r.objective as objective
    from l2r.augment import random_resized_crop
    from l2r.explainer import build_explainer
    from l2r.images import to_tensor
    from pipeline.config import load_config
    from l2r.shard_reader import expand_urls, iter_shard
    from pipeline.train_data import training_read_size
    from pipeline.train_target import make_target

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    dcfg, ocfg = config["data"], objective.ObjectiveConfig(**config["objective"])
    batch = args.batch or config["train"]["batch_size"]
    size, crop_pct = training_read_size(dcfg)
    rows = []
    for url in expand_urls(dcfg["train"]):
        for row in iter_shard(url, size, crop_pct, holdout_every=dcfg["holdout_every"], part="train"):
            if row["error"] is None:
                rows.append(row)
            if len(rows) == batch:
                break
        if len(rows) == batch:
            break
    images = to_tensor(np.stack([r["image"] for r in rows]))
    labels = torch.tensor([r["label"] for r in rows])
    if dcfg["augment"]["crop_scale"] is not None:
        images = random_resized_crop(images, dcfg["image_size"], dcfg["augment"]["crop_scale"], dcfg["augment"]["flip"],
                                     generator=torch.Generator().manual_seed(0))
    target, _ = make_target(config)
    explainer = build_explainer(dict(config["explainer"]), target)

    timed = {"target_passes_s": 0.0}
    original = objective._chunked_mask_grad
    captured = {}

    def chunked(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        timed["target_passes_s"] += time.perf_counter() - start
        return out

    original_soft = objective.soft_masks

    def soft(scores, grid, size, tau, cfg, noise, generator=None):
        captured.update(scores=scores.detach(), grid=grid, size=size, tau=tau)
        return original_soft(scores, grid, size, tau, cfg, noise, generator)

    objective._chunked_mask_grad, objective.soft_masks = chunked, soft
    if ocfg.chunk_size is None:
        raise SystemExit("this breakdown times the two-stage (chunked) backward: set objective.chunk_size")
    steps, target_passes, sinkhorn = [], [], []
    try:
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            timed["target_passes_s"] = 0.0
            explainer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = objective.objective_backward(explainer, target, images, labels, ocfg, 0.5,
                                               generator=torch.Generator().manual_seed(repeat))
            step = time.perf_counter() - start
            scores = captured["scores"].clone().requires_grad_(True)
            start = time.perf_counter()
            masks = original_soft(scores, captured["grid"], captured["size"], captured["tau"], ocfg, True,
                                  torch.Generator().manual_seed(repeat))
            masks.sum().backward()
            alone = time.perf_counter() - start
            if repeat:
                steps.append(step)
                target_passes.append(timed["target_passes_s"])
                sinkhorn.append(alone)
            print(f"step {repeat}: {step:.2f} s, target passes {timed['target_passes_s']:.2f} s, "
                  f"sinkhorn {alone:.2f} s, grid {out['grid']}", file=sys.stderr, flush=True)
    finally:
        objective._chunked_mask_grad, objective.soft_masks = original, original_soft

    targets_per_image = 1 if ocfg.targets in ("prediction", "ground_truth") else 2
    passes = targets_per_image * 2 * ocfg.k_train  # perturbed images per training image, each forward + backward
    step_s = statistics.median(steps)
    result = {
        "config": Path(args.config).name, "batch": batch, "image_size": dcfg["image_size"],
        "threads": torch.get_num_threads(), "step_s": round(step_s, 3),
        "target_passes_s": round(statistics.median(target_passes), 3),
        "sinkhorn_s": round(statistics.median(sinkhorn), 3),
        "target_share": round(statistics.median(target_passes) / step_s, 3),
        "sinkhorn_share": round(statistics.median(sinkhorn) / step_s, 3),
        "target_forward_passes_per_image": passes + 1, "target_backward_passes_per_image": passes,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
