"""Read + decode + preprocess throughput and memory of the shard reader.

Compares, on the shared CIFAR-10 shards (../shared/data/cifar10):
- ``ray``:   ``pipeline.dataset.read_shards`` consumed with ``iter_batches`` (all CPUs);
- ``plain``: a single-process ``webdataset`` + PIL loop with the same preprocessing.

Each measurement runs in a fresh subprocess. Memory: a sampler thread reads
``/proc/<pid>/smaps_rollup`` of the driver and all its descendants (Ray's
gcs_server, raylet, agents and workers are all started under the driver) every
0.2 s and records the peak of the *summed PSS*: proportional set size counts a
shared page (Ray's object store in /dev/shm, shared libraries) once across the
tree instead of once per process, so the sum is the physical memory the whole
job holds. The driver's own peak RSS is reported beside it. ``rss_growth_10x``
is the tree's peak PSS reading the shard list repeated 10 times divided by the
peak reading it once: streaming keeps it near 1.

    python benchmarks/data_read.py [--size 32] [--shards DIR]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SHARDS = ROOT.parent / "shared" / "data" / "cifar10"


# ---------------------------------------------------------------- memory of a process tree


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return found


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _smaps_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # the process ended between listing and reading
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of this process tree and this process's RSS; keeps the peaks (MiB)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.tree_pss, self.driver_rss, self.processes = interval, 0.0, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = _tree(os.getpid())
        self.processes = max(self.processes, len(pids))
        self.tree_pss = max(self.tree_pss, sum(_smaps_kib(p, "Pss") for p in pids) / 1024)
        self.driver_rss = max(self.driver_rss, _smaps_kib(os.getpid(), "Rss") / 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


# ---------------------------------------------------------------- the two readers (run in a subprocess)


def run_ray(urls: list[str], size: int) -> dict:
    import ray

    from pipeline.dataset import read_shards

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    startup = time.perf_counter() - started
    # Warm-up: start the worker processes outside the timed read.
    for _ in read_shards(urls[:1], size).iter_batches(batch_size=256):
        break
    images = errors = 0
    with PeakMemory() as memory:
        started = time.perf_counter()
        for batch in read_shards(urls, size).iter_batches(batch_size=256, batch_format="numpy"):
            images += len(batch["label"])
            errors += sum(e is not None for e in batch["error"])
        seconds = time.perf_counter() - started
    ray.shutdown()
    return dict(images=images, errors=errors, seconds=seconds, startup_s=startup,
                tree_pss_mib=memory.tree_pss, driver_rss_mib=memory.driver_rss, processes=memory.processes)


def run_plain(urls: list[str], size: int) -> dict:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from l2r.images import resize_and_crop

    images = 0
    with PeakMemory() as memory:
        started = time.perf_counter()
        for sample in wds.WebDataset(urls, shardshuffle=False):
            array = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            resize_and_crop(array, size)
            int(sample["cls"])
            images += 1
        seconds = time.perf_counter() - started
    return dict(images=images, errors=0, seconds=seconds, startup_s=0.0,
                tree_pss_mib=memory.tree_pss, driver_rss_mib=memory.driver_rss, processes=memory.processes)


def measure(mode: str, urls: list[str], size: int) -> dict:
    """Run one measurement in a fresh interpreter; return its JSON result."""
    command = [sys.executable, __file__, "--child", mode, "--size", str(size), "--urls", json.dumps(urls)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(DEFAULT_SHARDS), help="folder of CIFAR-10 shards")
    parser.add_argument("--size", type=int, default=32, help="output image size")
    parser.add_argument("--child", choices=["ray", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        runner = run_ray if args.child == "ray" else run_plain
        print(json.dumps(runner(json.loads(args.urls), args.size)))
        return

    from l2r.shard_reader import expand_urls

    urls = expand_urls(args.shards)
    print(f"{len(urls)} shards from {args.shards}; {os.cpu_count()} CPUs; output {args.size}x{args.size}")
    plain = measure("plain", urls, args.size)
    ray_1x = measure("ray", urls, args.size)
    ray_10x = measure("ray", urls * 10, args.size)
    for name, r in (("plain webdataset+PIL, 1 process", plain), ("ray read_shards 1x", ray_1x), ("ray read_shards 10x", ray_10x)):
        print(f"{name:34s} {r['images']:>7d} images in {r['seconds']:6.1f} s = {r['images_per_s']:8.0f} img/s; "
              f"peak tree PSS {r['tree_pss_mib']:7.0f} MiB ({r['processes']} processes), driver RSS {r['driver_rss_mib']:5.0f} MiB"
              + (f"; ray.init {r['startup_s']:.1f} s" if r["startup_s"] else ""))
    growth = ray_10x["tree_pss_mib"] / ray_1x["tree_pss_mib"]
    print(f"memory growth 10x / 1x (tree PSS): {growth:.2f}; driver RSS: {ray_10x['driver_rss_mib'] / ray_1x['driver_rss_mib']:.2f}")
    print(json.dumps({
        "ray_images_per_s": round(ray_1x["images_per_s"], 1),
        "plain_images_per_s": round(plain["images_per_s"], 1),
        "ray_10x_images_per_s": round(ray_10x["images_per_s"], 1),
        "rss_growth_10x": round(growth, 3),
        "driver_rss_growth_10x": round(ray_10x["driver_rss_mib"] / ray_1x["driver_rss_mib"], 3),
        "peak_tree_pss_mib_1x": round(ray_1x["tree_pss_mib"], 1),
        "peak_tree_pss_mib_10x": round(ray_10x["tree_pss_mib"], 1),
        "images_1x": ray_1x["images"],
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
