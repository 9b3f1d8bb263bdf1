"""Exact deletion/insertion throughput against the target model's bare forward rate.

Computing K-step deletion and insertion curves needs at least 2K+1 forwards per
image done naively (K per curve plus the prediction), so `forward_rate / (2K+1)`
is the bound a straightforward batched implementation can reach; sharing the
clean and reference images between the curves lets l2r go slightly past it.

    python benchmarks/metrics.py [--images 256 --batch 256 --steps 21 --device cpu]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from l2r.classifier import build_target
from l2r.metrics import deletion_insertion

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT.parent / "shared" / "models" / "resnet20-12fca82f.th"


def target_model(device):
    if RESNET20.exists():
        model = build_target("l2r.zoo.resnet20:resnet20", checkpoint=str(RESNET20), input_size=(32, 32))
    else:  # a fresh clone without ../shared: a small timm CNN of similar cost
        model = build_target("timm:resnet10t", model_kwargs={"num_classes": 10}, random_init=True, input_size=(32, 32))
    return model.to(device)


@torch.inference_mode()
def forward_rate(model, images, batch, repeats):
    model(images[:batch])  # warm-up
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for chunk in images.split(batch):
            model(chunk)
            n += len(chunk)
    if images.is_cuda:
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = target_model(args.device)
    h, w = model.input_size
    images = torch.rand(args.images, 3, h, w, device=args.device)
    maps = torch.rand(args.images, h, w, device=args.device)

    deletion_insertion(model, images[:8], maps[:8], steps=args.steps, max_batch=args.batch)  # warm-up
    # Interleave the baseline and the metric so load from elsewhere hits both alike.
    rates, speeds = [], []
    for _ in range(args.rounds):
        rates.append(forward_rate(model, images, args.batch, repeats=2))
        start = time.perf_counter()
        deletion_insertion(model, images, maps, steps=args.steps, max_batch=args.batch)
        if images.is_cuda:
            torch.cuda.synchronize()
        speeds.append(args.images / (time.perf_counter() - start))
    rate, images_per_s = sum(rates) / len(rates), sum(speeds) / len(speeds)
    bound = rate / (2 * args.steps + 1)
    print(f"target {model.spec} on {args.device}: bare forward {rate:.0f} images/s at batch {args.batch}")
    print(f"exact deletion+insertion, K={args.steps}: {images_per_s:.1f} images/s; bound {bound:.1f}")
    print(json.dumps({
        "device": args.device, "steps": args.steps, "batch": args.batch, "forward_images_per_s": rate,
        "images_per_s": images_per_s, "bound_images_per_s": bound, "fraction_of_bound": images_per_s / bound,
    }))


if __name__ == "__main__":
    main()
