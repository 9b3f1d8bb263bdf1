"""End-to-end throughput of the attribution job against its bound and against a naive loop.

On the shared CIFAR-10 test shards (a subset of ``--images``, copied into shards of
``--shard-size`` without re-encoding) with the ResNet-20 target and an untrained explainer
(throughput does not depend on training), this measures, in one run:

- ``job``: ``pipeline.attribute.run_attribution`` (Ray start-up excluded; actor start-up,
  model loading, reading, decoding, the map, the exact curves, heatmap encoding and Parquet
  writing included), in images/s;
- ``bound``: ``forward_rate / (2K+1)``: bare target forwards of the same model at the job's
  forward batch size, with the same number of torch threads, measured before and after the
  job (the mean of the two; a shared machine drifts). The two curves need 2K forwards plus
  one for the prediction; ``l2r.metrics`` shares their end points (2K-1 per image, the
  reference once per batch), and the map (the explainer) costs about one to two more;
- ``naive``: what a user would write first: per image, the map, then the curves one
  perturbation at a time (2K+2 single-image forwards).

    python benchmarks/attribute.py [--images 2000] [--device cpu|cuda] [--actors N] [--threads T]

On a shared CPU machine wall-clock rates drift with other load, so CPU runs also report
the same ratios per CPU second: the CPU time of every process of the job (driver, Ray's own
processes, read tasks, actors; read from /proc) against the bare forward's CPU time.
The bound for ``--actors`` > 1 is measured with actors x threads torch threads in one process.

The last line printed is JSON: images_per_s, bound_images_per_s, fraction_of_bound,
naive_images_per_s, speedup_vs_naive, the CPU-time ratios, and the settings.
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
SPEC = "benchmarks.resnet20:resnet20"
MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32


def subset_shards(spec: str, images: int, shard_size: int, folder: Path, repeat: int = 1) -> list[str]:
    """Copy the first `images` samples of the shards into shards of `shard_size` (bytes unchanged),
    `repeat` times over (copies get new keys: enough images for a steady state from little data)."""
    from pipeline.data import expand_urls

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


def tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of this process and all its descendants (Ray starts under us)."""
    from benchmarks.data_read import _tree

    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in _tree(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            times[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return times


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def forward_rate(target, batch: int, device, seconds: float = 4.0) -> tuple[float, float]:
    """Bare target forwards (images) per wall second and per CPU second at a batch size."""
    import torch

    x = torch.rand(batch, 3, SIZE, SIZE, device=device)
    with torch.inference_mode():
        for _ in range(2):
            target(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            target(x)
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)


def naive_rate(target, explainer, shards: list[str], steps: int, images: int, device) -> tuple[float, float]:
    """Images per wall second and per CPU second of a per-image loop, one perturbation per forward."""
    import torch

    from l2r.images import to_tensor
    from pipeline.data import iter_shard

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=str(DEFAULT_SHARDS))
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeat", type=int, default=1, help="copies of the image subset (a GPU needs many images)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--actor-cpus", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--forward-batch", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="the job's precision; the bound stays fp32 eager forwards")
    p.add_argument("--steps", type=int, default=21)
    p.add_argument("--explainer-dim", type=int, default=32)
    p.add_argument("--naive-images", type=int, default=None, help="default: 30 on CPU, 100 on GPU")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import ray
    import torch

    from l2r.classifier import build_target
    from l2r.explainer import build_explainer, save_explainer
    from pipeline.attribute import AttributeConfig, run_attribution

    cpus = os.cpu_count() or 1
    gpu = args.device == "cuda"
    threads = args.threads
    batch_size = args.batch_size or (256 if gpu else 64)
    forward_batch = args.forward_batch or (1024 if gpu else 128)
    device = torch.device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="l2r-bench-attr-"))
    shards = subset_shards(args.shards, args.images, args.shard_size, work / "shards", args.repeat)

    torch.manual_seed(0)
    target = build_target(SPEC, checkpoint=args.checkpoint, mean=MEAN, std=STD, input_size=(SIZE, SIZE))
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"],
                                 "dim": args.explainer_dim, "head_dim": max(8, args.explainer_dim // 2)}, target=target)
    save_explainer(work / "explainer", explainer, {"note": "untrained, for throughput"})
    target.to(device)
    explainer.to(device).eval()

    torch.set_num_threads(threads * (1 if gpu else args.actors))
    rate_before, cpu_rate_before = forward_rate(target, forward_batch, device)
    ray.init(num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    config = AttributeConfig(
        shards=shards, output=str(work / "out"), target=SPEC, checkpoint=args.checkpoint, mean=MEAN, std=STD,
        input_size=(SIZE, SIZE), explainer=str(work / "explainer"), methods=("l2r",), steps=args.steps,
        device=args.device, actors=args.actors, actor_cpus=args.actor_cpus, threads=threads,
        batch_size=batch_size, forward_batch=forward_batch, precision=args.precision, overwrite=True,
        progress_interval=60,
    )
    cpu_before = tree_cpu_seconds()
    start = time.perf_counter()
    summary = run_attribution(config)
    job_seconds = time.perf_counter() - start
    job_cpu = cpu_delta(cpu_before, tree_cpu_seconds())
    ray.shutdown()
    torch.set_num_threads(threads * (1 if gpu else args.actors))
    rate_after, cpu_rate_after = forward_rate(target, forward_batch, device)
    rate, cpu_rate = (rate_before + rate_after) / 2, (cpu_rate_before + cpu_rate_after) / 2
    job_rate = summary["images"] / job_seconds

    torch.set_num_threads(threads)
    naive, naive_cpu = naive_rate(target, explainer, shards, args.steps,
                                  args.naive_images or (100 if gpu else 30), device)
    passes = 2 * args.steps + 1
    bound = rate / passes
    result = {
        "images_per_s": round(job_rate, 2),
        "bound_images_per_s": round(bound, 2),
        "fraction_of_bound": round(job_rate / bound, 3),
        "naive_images_per_s": round(naive, 3),
        "speedup_vs_naive": round(job_rate / naive, 1),
        # Per CPU second of every process of the job (driver, Ray, readers, actors) against the
        # bare forward's images per CPU second: immune to other load on a shared machine.
        "images_per_cpu_s": round(summary["images"] / job_cpu, 2) if not gpu else None,
        "fraction_of_bound_cpu_time": round(summary["images"] / job_cpu / (cpu_rate / passes), 3) if not gpu else None,
        "speedup_vs_naive_cpu_time": round(summary["images"] / job_cpu / naive_cpu, 1) if not gpu else None,
        "forward_rate": round(rate, 1),
        "forward_rate_before_after": [round(rate_before, 1), round(rate_after, 1)],
        "forward_rate_per_cpu_s": round(cpu_rate, 1),
        "job_cpu_seconds": round(job_cpu, 1),
        "images": summary["images"],
        "errors": summary["errors"],
        "job_seconds": round(job_seconds, 1),
        "device": args.device if not gpu else torch.cuda.get_device_name(0),
        "actors": args.actors,
        "threads_per_actor": threads,
        "batch_size": batch_size,
        "forward_batch": forward_batch,
        "steps": args.steps,
        "precision": args.precision,
        "explainer_dim": args.explainer_dim,
        "cpus": cpus,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
