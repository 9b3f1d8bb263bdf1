"""One training step: memory with and without chunking, and Ray Train's overhead per step.

    python benchmarks/train_step.py                 # CPU: about five minutes
    python benchmarks/train_step.py --device cuda   # memory from torch.cuda.max_memory_allocated

1. Memory: the same step (same batch, same random draws via one seeded generator) with
   `objective.chunk_size=None` and with `chunk_size=--chunk`, each in a fresh subprocess. On
   CPU the figure is the rise of the peak resident set (ru_maxrss) over the resident set just
   before the step; on CUDA it is max_memory_allocated over the memory allocated before it.
   The explainer's gradients of both runs are compared.
2. Ray overhead, same run, in `--rounds` rounds (each: the plain loop, then Ray Train
   materialized, then Ray Train streaming, back to back, so slow drifts in the machine's load
   hit all three alike):
   - the plain loop: the training loop as a plain process (same models, batch, threads, and
     Ray's worker niceness 15) on in-memory batches;
   - Ray Train with `data.materialize=true`: `pipeline.train.run`, one worker, the same shards
     decoded into the object store before training, so the worker reads decoded batches as the
     plain loop does. `ray_overhead` = the median over rounds of its step time / the plain
     loop's - 1: what Ray Train adds to a step.
   - Ray Train streaming (the default): Ray Data decodes while the worker trains, on the same
     cores here (`ray_streaming_vs_plain`).
   Step times are medians over report windows of `--report-every` steps, the first (start-up)
   window left out. `ray_loop_overhead`: inside the Ray runs, loop time per step (data wait,
   report, everything) / time inside `train_step` - 1.

The last line is JSON: chunked_memory_ratio (target <= 0.5), grad_max_abs_diff (<= 1e-5),
ray_overhead (fraction; target <= 0.1), ray_streaming_vs_plain, ray_loop_overhead, and the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from l2r.classifier import build_target  # noqa: E402
from l2r.explainer import build_explainer  # noqa: E402
from l2r.objective import ObjectiveConfig, objective_backward  # noqa: E402

EXPLAINER = {"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 32, "head_dim": 16}


def models(size: int, device: str, blocks: int = 3):
    torch.manual_seed(0)
    target = build_target("l2r.zoo.resnet20:ResNetCifar", model_kwargs={"blocks_per_stage": blocks},
                          input_size=(size, size)).to(device)
    explainer = build_explainer(EXPLAINER, target).to(device)
    return target, explainer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    """One step in this fresh process; writes {peak_bytes, grads} to args.out."""
    torch.set_num_threads(args.threads)
    device = args.device
    target, explainer = models(args.size, device)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    cfg = ObjectiveConfig(k_train=args.k_train, chunk_size=args.chunk if args.variant == "chunked" else None)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    started = time.perf_counter()
    out = objective_backward(explainer, target, images, labels, cfg, 0.5, generator=torch.Generator().manual_seed(2))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - started
    grads = {n: p.grad.detach().cpu() for n, p in explainer.named_parameters() if p.grad is not None}
    torch.save({"peak_bytes": peak, "seconds": seconds, "loss": out["loss"], "grads": grads}, args.out)


def memory_benchmark(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("full", "chunked"):
            out = f"{tmp}/{variant}.pt"
            subprocess.run([sys.executable, __file__, "--memory-child", variant, "--out", out,
                            "--device", args.device, "--size", str(args.size), "--batch", str(args.batch),
                            "--k-train", str(args.k_train), "--chunk", str(args.chunk),
                            "--threads", str(args.threads)], check=True)
            results[variant] = torch.load(out, weights_only=True)
    full, chunked = results["full"], results["chunked"]
    diff = max(float((full["grads"][n] - chunked["grads"][n]).abs().max()) for n in full["grads"])
    scale = max(float(g.abs().max()) for g in full["grads"].values())
    perturbed = args.batch * 2 * 2 * args.k_train
    print(f"memory: {perturbed} perturbed images a step; peak rise full {full['peak_bytes'] / 2**20:.0f} MiB "
          f"({full['seconds']:.2f}s), chunked by {args.chunk} {chunked['peak_bytes'] / 2**20:.0f} MiB "
          f"({chunked['seconds']:.2f}s); grad max |diff| {diff:.2e} (max |grad| {scale:.2e})")
    return {
        "chunked_memory_ratio": chunked["peak_bytes"] / full["peak_bytes"],
        "grad_max_abs_diff": diff,
        "grad_max_abs": scale,
        "peak_mib_full": full["peak_bytes"] / 2**20,
        "peak_mib_chunked": chunked["peak_bytes"] / 2**20,
        "step_s_full": full["seconds"],
        "step_s_chunked": chunked["seconds"],
        "perturbed_images_per_step": perturbed,
    }


def overhead_config(args, storage: str, name: str, materialize: bool = False) -> dict:
    from pipeline.config import load_config

    sets = [f"data.image_size={args.size}", f"target.input_size=[{args.size},{args.size}]",
            f"data.synthetic.size={args.size}", "data.synthetic.train=1024", "data.synthetic.val=16",
            "target.fit_steps=0", "target.kwargs={blocks_per_stage: 1, num_classes: 10}",
            f"objective.k_train={args.ray_k_train}", f"train.report_every={args.report_every}",
            "train.checkpoint_every=0", "val.every=0", "val.images=8", f"run.cpus_per_worker={args.threads}",
            f"data.materialize={str(materialize).lower()}"]
    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", sets,
                      {"storage": storage, "name": name,
                       "steps": args.steps, "batch_size": args.ray_batch, "workers": 1})
    cfg["run_dir"] = f"{storage}/{cfg['name']}"
    return cfg


def plain_child(args) -> None:
    """The training loop as a plain process, at Ray's worker niceness (RAY_worker_niceness, 15 by default)."""
    import numpy as np

    from l2r.images import to_tensor
    from l2r.shard_reader import expand_urls, iter_shard
    from l2r.training import make_optimizer, train_step
    from pipeline.demo_inputs import prepare_synthetic

    os.nice(int(os.environ.get("RAY_worker_niceness", 15)))
    torch.set_num_threads(args.threads)
    cfg = overhead_config(args, args.storage, "plain")
    train_spec, _ = prepare_synthetic(cfg)
    rows = [r for url in expand_urls(train_spec) for r in iter_shard(url, args.size)]
    images = to_tensor(np.stack([r["image"] for r in rows]))
    labels = torch.tensor([r["label"] for r in rows])
    target, explainer = models(args.size, "cpu", blocks=1)
    optimizer, scheduler = make_optimizer(explainer, cfg["train"], args.steps)
    ocfg = ObjectiveConfig(**cfg["objective"])
    times = []
    for step in range(args.steps):
        b = slice(step * args.ray_batch, (step + 1) * args.ray_batch)
        started = time.perf_counter()
        train_step(explainer, target, optimizer, scheduler, images[b], labels[b], step / args.steps, ocfg, 1.0)
        times.append(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(times))


def steady_step_s(step_times: list[float], window: int) -> float:
    """Median over windows of `window` steps of the mean step time, the first (start-up) window left out."""
    windows = [statistics.fmean(step_times[i:i + window]) for i in range(0, len(step_times) - window + 1, window)]
    return statistics.median(windows[1:])


def overhead_benchmark(args) -> dict:
    from pipeline.demo_inputs import prepare_synthetic
    from pipeline.train import run

    storage = tempfile.mkdtemp(prefix="l2r_bench_")
    os.chdir(ROOT)
    # One set of synthetic shards (the plain loop's) for every run, written once.
    shards = prepare_synthetic(overhead_config(args, storage, "plain"))
    rounds = []
    for r in range(args.rounds):
        out = f"{storage}/plain{r}.json"
        subprocess.run([sys.executable, __file__, "--plain-child", "--out", out, "--storage", storage]
                       + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                          ("size", "threads", "steps", "ray_batch", "ray_k_train", "report_every")], check=True)
        figures = {"plain": steady_step_s(json.loads(Path(out).read_text()), args.report_every)}
        # Ray Train: the real pipeline on the same shards (one worker, same threads and niceness).
        for variant in ("materialized", "streaming"):
            cfg = overhead_config(args, storage, f"{variant}{r}", materialize=variant == "materialized")
            cfg["data"]["train"], cfg["data"]["val"] = shards
            run(cfg, verbose=False)
            metrics = [json.loads(line) for line in Path(f"{cfg['run_dir']}/metrics.jsonl").read_text().splitlines()]
            steady = metrics[1:]  # the first window holds start-up
            figures[variant] = statistics.median(m["step_time_s"] for m in steady)
            figures[f"{variant}_loop"] = statistics.median(m["step_time_s"] / m["compute_s"] - 1.0 for m in steady)
        print(f"round {r}: plain loop {figures['plain']:.3f} s/step; Ray Train materialized {figures['materialized']:.3f}"
              f", streaming {figures['streaming']:.3f} s/step", flush=True)
        rounds.append(figures)

    def ratio(variant):
        return statistics.median(f[variant] / f["plain"] - 1.0 for f in rounds)

    return {"ray_overhead": ratio("materialized"), "ray_streaming_vs_plain": ratio("streaming"),
            "ray_loop_overhead": statistics.median(f[k] for f in rounds for k in ("materialized_loop", "streaming_loop")),
            "rounds": rounds, "ray_batch": args.ray_batch, "ray_k_train": args.ray_k_train}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per step (memory benchmark)")
    parser.add_argument("--k-train", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="steps (overhead benchmark)")
    parser.add_argument("--ray-batch", type=int, default=8, help="images per step (overhead benchmark)")
    parser.add_argument("--ray-k-train", type=int, default=8)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="overhead benchmark: plain/Ray rounds")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--memory-child", choices=["full", "chunked"], dest="variant")
    parser.add_argument("--plain-child", action="store_true")
    parser.add_argument("--storage")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.variant:
        memory_child(args)
        return
    if args.plain_child:
        plain_child(args)
        return
    result = {"device": args.device, "threads": args.threads, "batch": args.batch, "chunk": args.chunk,
              "k_train": args.k_train, "size": args.size}
    result.update(memory_benchmark(args))
    if not args.skip_ray:
        result.update(overhead_benchmark(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
