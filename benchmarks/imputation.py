"""The `impute` reference (ROAD's noisy linear imputation): its cost and its reference solver.

- impute_vs_black: exact deletion/insertion curves (l2r.metrics, 21 steps) per second with the
  impute reference over the same with black, same model, images and maps, same run. The
  ResNet-20 on 32-px CIFAR-10 and the MobileNetV1 on 160-px ImageNet photos.
- impute_vs_gradcam_road: our batched imputation against pytorch-grad-cam's NoisyLinearImputer
  (a sparse direct solve per image on the CPU), on the same images and the same masks (the
  top 10..90 % of smooth maps: blob-shaped holes, as deletion curves remove), 32 and 160 px;
  with the largest difference between the two (noise off).

    python benchmarks/imputation.py [--device cpu|cuda]

Maps are smooth random fields (bilinear 4x4 noise): large holes, the solver's hardest case.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import MODELS, build  # noqa: E402
from l2r.imputation import impute  # noqa: E402
from l2r.metrics import deletion_insertion  # noqa: E402
from l2r.shard_reader import iter_shard  # noqa: E402


def real_images(model: str, count: int, shard: str | None = None) -> torch.Tensor:
    m = MODELS[model]
    shard = shard or m["shards"].replace("{0000..0001}", "0000")
    rows = []
    for row in iter_shard(shard, (m["size"], m["size"]), m["crop_pct"]):
        if row["image"] is not None:
            rows.append(torch.as_tensor(row["image"]))
        if len(rows) == count:
            break
    images = torch.stack(rows)
    if images.shape[-1] == 3:  # HWC
        images = images.permute(0, 3, 1, 2)
    return images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)


def smooth_maps(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(count, 1, 4, 4, generator=generator), size=(size, size), mode="bilinear")[:, 0]


def curves_per_second(target, images, maps, reference, steps, forward_batch, repeats=2) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        deletion_insertion(target, images, maps, steps=steps, reference=reference, max_batch=forward_batch)
        if images.is_cuda:
            torch.cuda.synchronize()
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def road_masks(maps: torch.Tensor) -> torch.Tensor:
    """For each map, the top 10, 20, .., 90 % removed: (B*9, 1, H, W)."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    masks = []
    for percent in range(10, 100, 10):
        threshold = flat.quantile(1 - percent / 100, dim=1).view(b, 1, 1)
        masks.append(maps >= threshold)
    return torch.stack(masks, dim=1).reshape(-1, 1, *maps.shape[-2:])


def versus_gradcam(images: torch.Tensor, maps: torch.Tensor, device) -> dict:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    masks = road_masks(maps)
    repeated = images.repeat_interleave(9, dim=0)
    imputer = NoisyLinearImputer(noise=0.0)
    start = time.perf_counter()
    theirs = torch.stack([imputer(image, (~mask[0]).float()) for image, mask in zip(repeated, masks)])
    their_seconds = time.perf_counter() - start
    impute(repeated[:2].to(device), masks[:2].to(device), noise=0.0)  # warm-up
    start = time.perf_counter()
    ours = impute(repeated.to(device), masks.to(device), noise=0.0)
    if ours.is_cuda:
        torch.cuda.synchronize()
    our_seconds = time.perf_counter() - start
    return {"images": len(repeated), "ours_per_s": len(repeated) / our_seconds,
            "gradcam_per_s": len(repeated) / their_seconds, "ratio": their_seconds / our_seconds,
            "max_abs_difference": float((ours.cpu() - theirs).abs().max())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--images", default="resnet20=64,mobilenet=8", help="images per model for the curves")
    p.add_argument("--road-images", default="32=16,160=4", help="images per size against pytorch-grad-cam")
    p.add_argument("--cifar-shard", help="CIFAR-10 shard (default: the shared test-0000.tar)")
    p.add_argument("--cifar-checkpoint", help="ResNet-20 weights (default: the shared file)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps}

    curves = {}
    for item in args.images.split(","):
        model, count = item.split("=")
        cifar = model == "resnet20"
        target, m = build(model, args.cifar_checkpoint if cifar else None)
        target = target.to(device).eval()
        images = real_images(model, int(count), args.cifar_shard if cifar else None).to(device)
        maps = smooth_maps(len(images), m["size"]).to(device)
        forward_batch = 64 if m["size"] <= 64 else 16
        black = curves_per_second(target, images, maps, "black", args.steps, forward_batch)
        imputed = curves_per_second(target, images, maps, "impute", args.steps, forward_batch)
        curves[model] = {"size": m["size"], "images": len(images), "black_per_s": black, "impute_per_s": imputed,
                         "ratio": imputed / black}
        print(f"{model} {m['size']} px: black {black:.1f} images/s, impute {imputed:.1f} images/s, "
              f"ratio {imputed / black:.3f}", file=sys.stderr, flush=True)
    result["curves"] = curves

    road = {}
    model_of_size = {MODELS[name]["size"]: name for name in MODELS}
    for item in args.road_images.split(","):
        size, count = (int(v) for v in item.split("="))
        model = model_of_size[size]
        images = real_images(model, count, args.cifar_shard if model == "resnet20" else None)
        road[size] = versus_gradcam(images, smooth_maps(count, size, seed=1), device)
        print(f"{size} px: ours {road[size]['ours_per_s']:.1f} masks/s, pytorch-grad-cam "
              f"{road[size]['gradcam_per_s']:.1f} masks/s, ratio {road[size]['ratio']:.1f}, "
              f"max |difference| {road[size]['max_abs_difference']:.1e}", file=sys.stderr, flush=True)
    result["versus_gradcam"] = road
    result["impute_vs_black"] = min(c["ratio"] for c in curves.values()) if curves else None
    result["impute_vs_gradcam_road"] = min(r["ratio"] for r in road.values()) if road else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
