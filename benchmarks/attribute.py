"""End-to-end throughput of the attribution job against the whole machine's bound and a naive loop.

Per model, on real images (the shared CIFAR-10 test shards for the ResNet-20 at 32 px; the
shared ImageNet photos for the MobileNetV1 0.5 at 160 px), copied into shards of
``--shard-size`` without re-encoding, with an explainer (an untrained one for the ResNet-20:
throughput does not depend on training; the shipped one for the MobileNet):

- ``job``: ``pipeline.attribute.run_attribution`` with the job's **default plan** (actors,
  threads, fast path) unless told otherwise, in images/s (Ray start-up excluded; actor start-up,
  model loading, reading, decoding, the map, the exact curves, heatmap encoding and the Parquet
  writes included);
- ``bound``: the whole machine's eager fp32 forward rate divided by 2K+1 (the two curves need 2K
  forwards plus one for the prediction). The forward rate is bare ``target(x)`` at the job's
  forward batch, measured at every process x thread layout of the machine's cores (1 x N threads,
  N x 1, and 2 x N/2 where N >= 4), all processes at once, and the best layout is taken; it is
  measured before and after the job (the mean: a shared machine drifts);
- ``naive`` (ResNet-20 only): what a user would write first: per image, the map, then the curves
  one perturbation at a time (2K+2 single-image forwards).

    python benchmarks/attribute.py [--models resnet20,mobilenet] [--images 1000] [--device cpu|cuda]

The last line printed is JSON: ``fraction_of_bound`` (ResNet-20, default plan, over the
whole-machine eager bound) and ``fraction_of_eager_bound`` (MobileNetV1 at 160 px, the job's
fast path, over the same kind of bound), then per model the rates, the layouts and the plan.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
DEFAULT_SHARDS = SHARED / "data" / "cifar10" / "test-{0000..0001}.tar"
CHECKPOINT = SHARED / "models" / "resnet20-12fca82f.th"
SPEC = "l2r.zoo.resnet20:resnet20"
MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32
MOBILENET_STATS = (0.50196, 0.50196, 0.50196)
MODELS = {
    "resnet20": {"shards": str(DEFAULT_SHARDS), "spec": SPEC, "checkpoint": str(CHECKPOINT), "mean": MEAN,
                 "std": STD, "size": SIZE, "crop_pct": 1.0, "background_logit": False, "explainer": None},
    "mobilenet": {"shards": str(SHARED / "data" / "imagenet-sample" / "val-0000.tar"),
                  "spec": f"{SHARED / 'models' / 'mobilenet_v1.py'}:MobileNetV1",
                  "checkpoint": str(SHARED / "models" / "mobilenet_v1_0.5_160.pth"), "mean": MOBILENET_STATS,
                  "std": MOBILENET_STATS, "size": 160, "crop_pct": 0.875, "background_logit": True,
                  "explainer": str(ROOT / "l2r" / "explainers" / "imagenet-sample-mobilenet")},
}


def build(model: str, checkpoint: str | None = None):
    """(target, its settings) for a model of MODELS."""
    from l2r.classifier import build_target

    m = MODELS[model]
    target = build_target(m["spec"], checkpoint=checkpoint or m["checkpoint"], mean=m["mean"], std=m["std"],
                          input_size=(m["size"], m["size"]), background_logit=m["background_logit"])
    return target, m


def subset_shards(spec: str, images: int, shard_size: int, folder: Path, repeat: int = 1) -> list[str]:
    """Copy the first `images` samples of the shards into shards of `shard_size` (bytes unchanged),
    `repeat` times over (copies get new keys: enough images for a steady state from little data)."""
    from l2r.shard_reader import expand_urls

    paths, out, count, current, members_in_sample = [], None, 0, None, []
    folder.mkdir(parents=True, exist_ok=True)

    def flush(sample):
        nonlocal out, count
        if out is None or count % shard_size == 0:
            if out is not None:
                out.close()
            paths.append(str(folder / f"bench-{len(paths):04d}.tar"))
            out = tarfile.open(paths[-1], "w")
        for info, data in sample:
            out.addfile(info, io.BytesIO(data))
        count += 1

    for url in expand_urls(spec):
        with tarfile.open(url) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key = info.name.split(".", 1)[0]
                if key != current and members_in_sample:
                    flush(members_in_sample)
                    members_in_sample = []
                    if count >= images:
                        break
                current = key
                members_in_sample.append((info, tar.extractfile(info).read()))
        if count >= images:
            break
    if members_in_sample and count < images:
        flush(members_in_sample)
    out.close()
    originals = list(paths)
    for copy in range(1, repeat):
        for source in originals:
            paths.append(str(folder / f"bench-{len(paths):04d}.tar"))
            with tarfile.open(source) as src, tarfile.open(paths[-1], "w") as dst:
                for info in src:
                    data = src.extractfile(info).read()
                    key, rest = info.name.split(".", 1)
                    info.name = f"{key}_r{copy}.{rest}"
                    dst.addfile(info, io.BytesIO(data))
    return paths


def forward_rate(target, batch: int, device, seconds: float = 4.0, size: int = 32, barrier=None) -> float:
    """Bare eager fp32 target forwards (images) per wall second at a batch size; ``barrier``: waited
    on after the warm-up (so that the processes of a layout measure at the same time)."""
    import torch

    x = torch.rand(batch, 3, size, size, device=device)
    with torch.inference_mode():
        for _ in range(2):
            target(x)
        if barrier is not None:
            barrier.wait()
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            target(x)
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def _layout_process(model: str, threads: int, batch: int, barrier, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    target, _ = build(model)
    queue.put(forward_rate(target, batch, torch.device("cpu"), size=MODELS[model]["size"], barrier=barrier))


def machine_forward_rate(model: str, batch: int, cpus: int) -> dict:
    """The best whole-machine forward rate over process x thread layouts (all processes at once)."""
    import multiprocessing

    layouts = {(1, cpus), (cpus, 1)} | ({(2, cpus // 2)} if cpus >= 4 else set())
    context = multiprocessing.get_context("spawn")
    rates = {}
    for processes, threads in sorted(layouts):
        queue, barrier = context.Queue(), context.Barrier(processes)
        workers = [context.Process(target=_layout_process, args=(model, threads, batch, barrier, queue))
                   for _ in range(processes)]
        for w in workers:
            w.start()
        total = sum(queue.get(timeout=600) for _ in workers)
        for w in workers:
            w.join()
        rates[f"{processes}x{threads}"] = round(total, 1)
    best = max(rates, key=rates.get)
    return {"rate": rates[best], "layout": best, "layouts": rates}


def naive_rate(target, explainer, shards: list[str], steps: int, images: int, device) -> tuple[float, float]:
    """Images per wall second and per CPU second of a per-image loop, one perturbation per forward."""
    import torch

    from l2r.images import to_tensor
    from l2r.shard_reader import iter_shard

    h = w = SIZE
    fracs = [k / (steps - 1) for k in range(steps)]
    done, start, cpu = 0, None, None
    for url in shards:
        for row in iter_shard(url, SIZE):
            if done == 2:  # warm-up excluded
                start, cpu = time.perf_counter(), time.process_time()
            x = to_tensor(row["image"]).to(device)
            with torch.no_grad():
                c = int(target(x[None]).argmax())
                heat = explainer(x[None], torch.tensor([c], device=device))[0, 0]
                order = torch.argsort(heat.flatten(), descending=True, stable=True)
                reference = torch.zeros_like(x)
                deletion, insertion = [], []
                for p in fracs:
                    mask = torch.zeros(h * w, device=device)
                    mask[order[: round(p * h * w)]] = 1
                    mask = mask.view(1, h, w)
                    deletion.append(float(target((x * (1 - mask) + reference * mask)[None])[0, c]))
                    insertion.append(float(target((reference * (1 - mask) + x * mask)[None])[0, c]))
                torch.trapezoid(torch.tensor(deletion), torch.tensor(fracs))
                torch.trapezoid(torch.tensor(insertion), torch.tensor(fracs))
            done += 1
            if done >= images + 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return images / (time.perf_counter() - start), images / (time.process_time() - cpu)
    raise ValueError("not enough images for the naive loop")


def run_model(model: str, args, work: Path, cpus: int) -> dict:
    import ray
    import torch

    from l2r.explainer import build_explainer, save_explainer
    from pipeline.attribute import AttributeConfig, run_attribution
    from pipeline.ray_connect import init_ray

    gpu = args.device == "cuda"
    device = torch.device(args.device)
    target, m = build(model, args.checkpoint if model == "resnet20" else None)
    if model == "resnet20" and args.shards:
        m = {**m, "shards": args.shards}
    from pipeline.attribute import CPU_BATCHES, CPU_SMALL_IMAGE_PIXELS

    # The bound runs at the job's own forward batch.
    cpu_batches = CPU_BATCHES["small" if m["size"] ** 2 <= CPU_SMALL_IMAGE_PIXELS else "large"]
    forward_batch = args.forward_batch or (1024 if gpu else cpu_batches["forward_batch"])
    shards = subset_shards(m["shards"], args.images, args.shard_size, work / model / "shards", args.repeat)
    explainer_dir = m["explainer"]
    explainer = None
    if explainer_dir is None:
        torch.manual_seed(0)
        explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"],
                                     "dim": args.explainer_dim, "head_dim": max(8, args.explainer_dim // 2)},
                                    target=target)
        explainer_dir = str(work / model / "explainer")
        save_explainer(explainer_dir, explainer, {"note": "untrained, for throughput"})

    def bound_rate() -> dict:
        if gpu:
            rate = forward_rate(target.to(device), forward_batch, device, size=m["size"])
            return {"rate": round(rate, 1), "layout": "1 GPU", "layouts": {"1 GPU": round(rate, 1)}}
        return machine_forward_rate(model, forward_batch, cpus)

    before = bound_rate()
    init_ray("local", num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    config = AttributeConfig(
        shards=shards, output=str(work / model / "out"), target=dict(
            spec=m["spec"], checkpoint=args.checkpoint if model == "resnet20" else m["checkpoint"], mean=m["mean"],
            std=m["std"], input_size=(m["size"], m["size"]), crop_pct=m["crop_pct"],
            background_logit=m["background_logit"]),
        explainer=explainer_dir, methods=("l2r",),
        protocol={"steps": args.steps}, device=args.device, actors=args.actors, actor_cpus=args.actor_cpus, threads=args.threads,
        batch_size=args.batch_size, forward_batch=args.forward_batch, precision=args.precision,
        fast_path=args.fast_path, allow_target_mismatch=explainer is None, overwrite=True, progress_interval=60,
    )
    start = time.perf_counter()
    summary = run_attribution(config)
    job_seconds = time.perf_counter() - start
    manifest = json.loads((work / model / "out" / "manifest.json").read_text())
    ray.shutdown()
    after = bound_rate()
    rate = (before["rate"] + after["rate"]) / 2
    passes = 2 * args.steps + 1
    job_rate = summary["images"] / job_seconds
    result = {
        "images_per_s": round(job_rate, 2),
        "bound_images_per_s": round(rate / passes, 2),
        "fraction": round(job_rate / (rate / passes), 3),
        # Without the start-up (actors, model loading, the first read): what a long job reaches.
        "fraction_after_startup": round(summary["images"] / (job_seconds - summary["startup_seconds"]) / (rate / passes), 3),
        "startup_seconds": round(summary["startup_seconds"], 1),
        "forward_rate": round(rate, 1),
        "forward_rate_before_after": [before["rate"], after["rate"]],
        "best_layout": before["layout"],
        "layouts_before": before["layouts"],
        "plan": manifest["plan"],
        "images": summary["images"],
        "errors": summary["errors"],
        "job_seconds": round(job_seconds, 1),
    }
    if model == "resnet20":
        torch.set_num_threads(1)
        naive = naive_rate(target.to(device), explainer.to(device).eval(), shards, args.steps,
                           args.naive_images or (100 if gpu else 30), device)[0]
        result.update(naive_images_per_s=round(naive, 3), speedup_vs_naive=round(job_rate / naive, 1))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,mobilenet", help="comma-separated, from " + ",".join(MODELS))
    p.add_argument("--shards", default=None, help="the ResNet-20's shards (default: the shared CIFAR-10 test shards)")
    p.add_argument("--checkpoint", default=str(CHECKPOINT), help="the ResNet-20's weights")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--repeat", type=int, default=1, help="copies of the image subset (a GPU needs many images)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--actors", type=int, default=None, help="default: the job's plan")
    p.add_argument("--threads", type=int, default=None, help="torch threads per actor (default: the job's plan)")
    p.add_argument("--actor-cpus", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--forward-batch", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the job's precision; the bound stays fp32 eager forwards")
    p.add_argument("--fast-path", default="auto", help="the job's fast path; the bound stays eager")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--explainer-dim", type=int, default=32)
    p.add_argument("--naive-images", type=int, default=None, help="default: 30 on CPU, 100 on GPU")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import torch

    cpus = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="l2r-bench-attr-"))
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    per_model = {model: run_model(model, args, work, cpus) for model in models}
    result = {}
    if "resnet20" in per_model:
        result["fraction_of_bound"] = per_model["resnet20"]["fraction"]
    if "mobilenet" in per_model:
        result["fraction_of_eager_bound"] = per_model["mobilenet"]["fraction"]
    result.update(per_model)
    result.update(device=args.device if args.device == "cpu" else torch.cuda.get_device_name(0), cpus=cpus,
                  steps=args.steps, precision=args.precision, fast_path=args.fast_path)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
