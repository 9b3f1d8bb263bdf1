"""The `impute` reference (ROAD's noisy linear imputation): its cost and its accuracy.

Masks come from real maps: per image, the chains of nested masks that a deletion curve and a
reversed deletion (insertion) curve remove at K=21 steps, for l2r (the shipped explainer),
Grad-CAM and the random control, on the shared photos and models.

- accuracy: the largest difference between `impute_chains` (noise off) and an exact float64
  sparse direct solve of the same system, over every step of every chain, at 32 px (CIFAR-10),
  160 px (ImageNet photos) and 224 px (the same photos and maps, resized); the target is a tenth
  of ROAD's noise sigma (`l2r.imputation.ERROR_TARGET`).
- impute_vs_gradcam_road_<size>: masks per second of `impute_chains` over pytorch-grad-cam's
  NoisyLinearImputer (a sparse direct solve per mask on the CPU), on the same masks.
- impute_vs_black_<size>: the attribution job (`pipeline.attribute.run_attribution`; one actor,
  one thread, methods l2r, gradcam, saliency, random, gaussian; the same images and plan) in
  images per second with the impute reference over the same with black, per image of work
  (maps and curves, the rows' `seconds` + `eval_seconds`); `job_<size>.job_ratio` is the same
  over the whole job's wall time, start-up included.
  ResNet-20 at 32 px (explainer `cifar10-resnet20`), MobileNetV1 at 160 px
  (`imagenet-sample-mobilenet`).

    python benchmarks/imputation.py [--device cpu|cuda] [--job-images 32=256,160=16]

The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import MODELS, build, subset_shards  # noqa: E402
from l2r.imputation import ERROR_TARGET, impute_chains, neighbour_kernel  # noqa: E402
from l2r.perturbation import deletion_counts, fractions  # noqa: E402
from l2r.ranking import pixel_ranks  # noqa: E402
from l2r.shard_reader import iter_shard  # noqa: E402

JOB_METHODS = ("l2r", "gradcam", "saliency", "random", "gaussian")
MAP_METHODS = ("l2r", "gradcam", "random")
EXPLAINERS = {"resnet20": "cifar10-resnet20", "mobilenet": "imagenet-sample-mobilenet"}
MODEL_OF_SIZE = {32: "resnet20", 160: "mobilenet"}


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


def exact_imputation(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The imputation system solved exactly (float64, a sparse LU): image (C, H, W), removed (H, W).

    The same equations as l2r.imputation and pytorch-grad-cam: each removed pixel is the weighted
    mean of its in-image neighbours. Returns the image in float64 with the removed pixels solved.
    """
    import scipy.sparse as sparse
    from scipy.sparse.linalg import splu

    c, h, w = image.shape
    values = image.double().reshape(c, -1).numpy()
    flat = removed.reshape(-1).numpy().astype(bool)
    unknowns = np.flatnonzero(flat)
    out = values.copy()
    if len(unknowns) == 0:
        return torch.from_numpy(out.reshape(c, h, w))
    variable = np.full(h * w, -1)
    variable[unknowns] = np.arange(len(unknowns))
    ys, xs = unknowns // w, unknowns % w
    kernel = neighbour_kernel(dtype=torch.float64)[0, 0].numpy()
    diagonal, rhs = np.zeros(len(unknowns)), np.zeros((len(unknowns), c))
    rows, cols, entries = [np.arange(len(unknowns))], [np.arange(len(unknowns))], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            weight = kernel[1 + dy, 1 + dx]
            ny, nx = ys + dy, xs + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            diagonal[inside] += weight
            source, neighbour = np.flatnonzero(inside), ny[inside] * w + nx[inside]
            free = flat[neighbour]
            rows.append(source[free])
            cols.append(variable[neighbour[free]])
            entries.append(np.full(int(free.sum()), -weight))
            np.add.at(rhs, source[~free], weight * values[:, neighbour[~free]].T)
    matrix = sparse.csc_matrix((np.concatenate([diagonal] + entries), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(len(unknowns),) * 2)
    out[:, unknowns] = splu(matrix).solve(rhs).T
    return torch.from_numpy(out.reshape(c, h, w))


def real_maps(model: str, count: int, shard: str | None = None,
              checkpoint: str | None = None) -> tuple[torch.Tensor, dict]:
    """Images and their maps for the predicted class: {method: (B, H, W)} for MAP_METHODS."""
    from l2r.artifact import resolve_explainer
    from l2r.explainer import load_explainer
    from l2r.methods import attribute

    target, _ = build(model, checkpoint)
    target.eval()
    images = real_images(model, count, shard)
    with torch.no_grad():
        targets = target(images).argmax(dim=1)
        explainer, _ = load_explainer(resolve_explainer(EXPLAINERS[model]), target=target)
        maps = {"l2r": explainer.eval()(images, targets)[:, 0].float()}
    for method in MAP_METHODS[1:]:
        maps[method] = attribute(method, target, images, targets)[0]
    return images, maps


def curve_chains(maps: torch.Tensor, steps: int = 21) -> torch.Tensor:
    """Per map, its deletion and reversed-deletion masks at the K-2 inner steps: (2B, K-2, H, W)."""
    b, h, w = maps.shape
    ranks = pixel_ranks(maps.float())
    counts = deletion_counts(fractions(steps), h * w)[1:-1]
    return torch.cat([(order[:, None] < counts[None, :, None]).view(b, -1, h, w)
                      for order in (ranks, h * w - 1 - ranks)])


def chain_sets(images: torch.Tensor, maps: dict, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images per chain, chains) over all maps; resized to `size` first if given."""
    if size is not None:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        maps = {k: F.interpolate(v[:, None], size=(size, size), mode="bilinear")[:, 0] for k, v in maps.items()}
    chains = torch.cat([curve_chains(m) for m in maps.values()])
    return images.repeat(2 * len(maps), 1, 1, 1), chains


def accuracy(images: torch.Tensor, chains: torch.Tensor, device) -> dict:
    """Our chained solve against the exact one on every mask: the largest |difference|."""
    ours = impute_chains(images.to(device), chains.to(device), noise=0.0).cpu().double()
    worst = 0.0
    for n in range(len(chains)):
        for s in range(chains.shape[1]):
            removed = chains[n, s]
            exact = exact_imputation(images[n], removed)
            worst = max(worst, float((ours[n, s] - exact)[:, removed].abs().max()))
    return {"masks": chains.shape[0] * chains.shape[1], "max_abs_difference": worst,
            "within_target": worst < ERROR_TARGET}


def versus_gradcam(images: torch.Tensor, chains: torch.Tensor, device) -> dict:
    """Masks/s of ours and of pytorch-grad-cam on the same masks, timed in the order theirs, ours,
    ours, theirs: a load that drifts during the run then weighs on both alike."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    masks = chains.flatten(0, 1)
    repeated = images.repeat_interleave(chains.shape[1], dim=0)
    imputer = NoisyLinearImputer(noise=0.0)

    def theirs():
        for image, mask in zip(repeated, masks):
            imputer(image, (~mask).float())

    def ours():
        impute_chains(images.to(device), chains.to(device), noise=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    impute_chains(images[:1].to(device), chains[:1].to(device), noise=0.0)  # warm-up
    seconds = {theirs: 0.0, ours: 0.0}
    for solver in (theirs, ours, ours, theirs):
        start = time.perf_counter()
        solver()
        seconds[solver] += time.perf_counter() - start
    their_seconds, our_seconds = seconds[theirs] / 2, seconds[ours] / 2
    return {"masks": len(masks), "ours_per_s": len(masks) / our_seconds, "gradcam_per_s": len(masks) / their_seconds,
            "ratio": their_seconds / our_seconds}


def job_rates(model: str, count: int, device: str, work: Path, shards: str | None = None,
              checkpoint: str | None = None) -> dict:
    """The attribution job's images/s (after start-up) with black and with impute, same images and plan."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.attribute import run_attribution
    from l2r.metrics import Protocol
    from l2r.target_spec import TargetSpec
    from pipeline.attribute_config import AttributeConfig

    m = MODELS[model]
    shards = subset_shards(shards or m["shards"], count, count, work / model / "shards")
    rates = {}
    for reference in ("black", "impute"):
        config = AttributeConfig(
            shards=shards, output=str(work / model / reference),
            target=TargetSpec(m["spec"], checkpoint=checkpoint or m["checkpoint"], mean=m["mean"], std=m["std"],
                              input_size=(m["size"], m["size"]), crop_pct=m["crop_pct"],
                              background_logit=m["background_logit"]),
            explainer=EXPLAINERS[model], methods=JOB_METHODS, protocol=Protocol(reference=reference),
            device=device, actors=1, threads=1, overwrite=True, progress_interval=600)
        start = time.perf_counter()
        summary = run_attribution(config)
        seconds = time.perf_counter() - start
        parts = sorted(str(path) for path in (work / model / reference).rglob("*.parquet"))
        rows = pa.concat_tables([pq.read_table(part, columns=["seconds", "eval_seconds"]) for part in parts]).to_pandas()
        work_seconds = float(rows["seconds"].sum() + rows["eval_seconds"].sum())
        rates[reference] = {"images": summary["images"], "errors": summary["errors"], "job_seconds": round(seconds, 1),
                            "job_images_per_s": summary["images"] / seconds, "work_seconds": round(work_seconds, 1),
                            "images_per_s": summary["images"] / work_seconds}
    # The ratio of the per-image work (maps and curves, as the rows record it): the job's
    # steady state, without the start-up that a short run would otherwise share out.
    rates["ratio"] = rates["impute"]["images_per_s"] / rates["black"]["images_per_s"]
    rates["job_ratio"] = rates["impute"]["job_images_per_s"] / rates["black"]["job_images_per_s"]
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--map-images", default="32=8,160=2", help="images per size for accuracy and pytorch-grad-cam")
    p.add_argument("--accuracy-sizes", default="32,160,224", help="224: the 160-px photos and maps resized")
    p.add_argument("--job-images", default="32=256,160=16", help="images per size for the job's ratio ('' skips)")
    p.add_argument("--cifar-shard", help="CIFAR-10 shard (default: the shared test-0000.tar)")
    p.add_argument("--cifar-checkpoint", help="ResNet-20 weights (default: the shared file)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (the job's actor: one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result = {"device": str(device), "threads": torch.get_num_threads(), "steps": 21,
              "error_target": ERROR_TARGET}

    sets = {}
    for item in filter(None, args.map_images.split(",")):
        size, count = (int(v) for v in item.split("="))
        model = MODEL_OF_SIZE[size]
        cifar = model == "resnet20"
        sets[size] = real_maps(model, count, args.cifar_shard if cifar else None, args.cifar_checkpoint if cifar else None)

    accuracies = {}
    for size in (int(v) for v in args.accuracy_sizes.split(",") if v and sets):
        source = size if size in sets else max(sets)
        images, chains = chain_sets(*sets[source], size=None if size == source else size)
        accuracies[size] = accuracy(images, chains, device)
        print(f"{size} px: {accuracies[size]['masks']} masks, max |ours - exact| "
              f"{accuracies[size]['max_abs_difference']:.1e}", file=sys.stderr, flush=True)
    result["accuracy"] = accuracies
    result["max_abs_difference"] = max(a["max_abs_difference"] for a in accuracies.values()) if accuracies else None

    for size in sets:
        road = versus_gradcam(*chain_sets(*sets[size]), device)
        result[f"versus_gradcam_{size}"] = road
        result[f"impute_vs_gradcam_road_{size}"] = road["ratio"]
        print(f"{size} px: ours {road['ours_per_s']:.1f} masks/s, pytorch-grad-cam {road['gradcam_per_s']:.1f} "
              f"masks/s, ratio {road['ratio']:.1f}", file=sys.stderr, flush=True)

    if args.job_images:
        import ray

        from pipeline.ray_connect import init_ray

        init_ray("local", num_cpus=2, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        with tempfile.TemporaryDirectory(prefix="l2r-bench-impute-") as work:
            for item in args.job_images.split(","):
                size, count = (int(v) for v in item.split("="))
                model = MODEL_OF_SIZE[size]
                cifar = model == "resnet20"
                job = job_rates(model, count, device.type, Path(work), args.cifar_shard if cifar else None,
                                args.cifar_checkpoint if cifar else None)
                result[f"job_{size}"] = job
                result[f"impute_vs_black_{size}"] = job["ratio"]
                print(f"job {size} px: black {job['black']['images_per_s']:.2f} images/s, impute "
                      f"{job['impute']['images_per_s']:.2f} images/s, ratio {job['ratio']:.2f} "
                      f"(whole job {job['job_ratio']:.2f})", file=sys.stderr, flush=True)
        ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
