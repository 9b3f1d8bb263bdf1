"""What a second actor or worker buys, and what the attribution driver costs as the data grows.

On the shared CIFAR-10 test shards and ResNet-20 (an untrained explainer for attribution:
throughput does not depend on training), each measurement in a fresh process with its own
local Ray:

- ``attribute_speedup_2_actors``: job images/s with 2 CPU actors (1 torch thread each) over
  1 actor (1 thread), same images (``--actor-images``), K=21, method l2r; also after start-up;
- ``train_speedup_2_workers``: training images/s (the `cifar10` config with the CPU overrides of
  benchmarks/RESULTS.md, "Training step cost"; the second report window, so start-up is excluded)
  with 2 Ray Train workers of one thread each over 1 worker with every core (``cpus_per_worker: auto``);
- ``driver_peak_rss_growth_10x``: the attribution driver's peak RSS (its own process, from
  ``getrusage``) with 10x the images over 1x (K=3 and the ``random`` method, so that many images
  run in little time: the driver's work does not depend on the method);
- ``driver_cpu_s_per_1000_images``: the driver's own CPU seconds per 1,000 images at 10x;
- the same driver figures with large maps: the shared MobileNetV1 at 160 px on the 500 shared
  ImageNet photos (``driver_160px``), where each row carries a 160x160 map.

    python benchmarks/scaling.py [--images 300] [--train-steps 10]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.attribute import CHECKPOINT, DEFAULT_SHARDS, MEAN, SIZE, SPEC, STD, subset_shards  # noqa: E402

SHARED = ROOT.parent / "shared"

ATTRIBUTE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipeline.attribute import AttributeConfig, run_attribution
config = AttributeConfig(**json.loads(sys.argv[1]))
start = time.perf_counter()
summary = run_attribution(config, log=lambda line: None)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"images": summary["images"], "seconds": seconds, "images_per_s": summary["images"] / seconds,
                  "after_startup_images_per_s": summary["images"] / (seconds - summary["startup_seconds"]),
                  "driver_peak_rss_mb": usage.ru_maxrss / 1024, "driver_cpu_s": usage.ru_utime + usage.ru_stime}}))
"""

TRAIN = """
import json, sys
sys.path.insert(0, {root!r})
from pipeline.config import load_config
from pipeline.train import run
config = load_config({root!r} + "/jobs/configs/cifar10.yaml", json.loads(sys.argv[1]), json.loads(sys.argv[2]))
run(config, verbose=False)
"""


def in_fresh_process(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT)), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return done.stdout


def attribute(shards: list[str], explainer: str | None, out: str, **options) -> dict:
    config = dict(shards=shards, output=out, target=dict(spec=SPEC, checkpoint=str(CHECKPOINT), mean=MEAN, std=STD,
                  input_size=(SIZE, SIZE)), explainer=explainer, overwrite=True, progress_interval=3600)
    config.update(options)
    return json.loads(in_fresh_process(ATTRIBUTE, json.dumps(config)).strip().splitlines()[-1])


def train(storage: str, name: str, workers: int, steps: int) -> float:
    sets = ["objective.grid_max=16", "objective.k_train=8", "train.lr=0.001", f"train.steps={steps}",
            f"train.report_every={steps // 2}", f"train.checkpoint_every={steps}", "val.every=0",
            "val.images=16", f"data.train={SHARED}/data/cifar10/train-*.tar",
            f"data.val={SHARED}/data/cifar10/test-0000.tar", f"target.checkpoint={CHECKPOINT}",
            "run.cpus_per_worker=auto", "data.shuffle_buffer=0"]
    flags = {"storage": storage, "name": name, "workers": workers}
    in_fresh_process(TRAIN, json.dumps(sets), json.dumps(flags))
    metrics = [json.loads(line) for line in Path(storage, name, "metrics.jsonl").read_text().splitlines()]
    return metrics[-1]["images_per_s"]  # the second window: start-up excluded


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="images of the 1x runs (10x for the driver's)")
    p.add_argument("--actor-images", type=int, default=1000, help="images of the 1 vs 2 actor runs")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--only", choices=["actors", "driver", "train"], help="one of the three measurements")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)

    import torch

    from l2r.classifier import build_target
    from l2r.explainer import build_explainer, save_explainer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="l2r-bench-scaling-"))
    torch.manual_seed(0)
    target = build_target(SPEC, checkpoint=str(CHECKPOINT), mean=MEAN, std=STD, input_size=(SIZE, SIZE))
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 32,
                                 "head_dim": 16}, target=target)
    save_explainer(work / "explainer", explainer, {"note": "untrained, for throughput"})
    explainer_dir = str(work / "explainer")
    one = subset_shards(str(DEFAULT_SHARDS), args.images, 100, work / "one")
    ten = subset_shards(str(DEFAULT_SHARDS), args.images, 100, work / "ten", repeat=10)

    result = {}
    if args.only in (None, "actors"):
        shards = subset_shards(str(DEFAULT_SHARDS), args.actor_images, 250, work / "actors")
        actors = {n: attribute(shards, explainer_dir, str(work / f"out-actors{n}"), actors=n, threads=1)
                  for n in (1, 2)}
        result["attribute_speedup_2_actors"] = round(actors[2]["images_per_s"] / actors[1]["images_per_s"], 3)
        result["attribute_speedup_2_actors_after_startup"] = round(
            actors[2]["after_startup_images_per_s"] / actors[1]["after_startup_images_per_s"], 3)
        result["attribute"] = {n: {k: round(v, 2) for k, v in r.items()} for n, r in actors.items()}
    if args.only in (None, "driver"):
        result.update(measure_driver(one, ten, explainer_dir, work))
    if not args.skip_train and args.only in (None, "train"):
        rates = {n: train(str(work / "runs"), f"workers{n}", n, args.train_steps) for n in (1, 2)}
        result["train_speedup_2_workers"] = round(rates[2] / rates[1], 3)
        result["train_images_per_s"] = {n: round(r, 2) for n, r in rates.items()}
    result.update(images=args.images, cpus=os.cpu_count())
    print(json.dumps(result))
    return result


def measure_driver(one: list[str], ten: list[str], explainer_dir: str, work: Path) -> dict:
    result = {}
    # One actor: the driver's work is what is measured, not the pool's start-up.
    driver = {label: attribute(shards, explainer_dir, str(work / f"out-driver{label}"), methods=("random",), protocol={"steps": 3},
                               actors=1, threads=1)
              for label, shards in (("1x", one), ("10x", ten))}
    result["driver_peak_rss_growth_10x"] = round(driver["10x"]["driver_peak_rss_mb"] / driver["1x"]["driver_peak_rss_mb"], 3)
    result["driver_cpu_s_per_1000_images"] = round(driver["10x"]["driver_cpu_s"] / driver["10x"]["images"] * 1000, 2)
    result["driver"] = {label: {k: round(v, 2) for k, v in r.items()} for label, r in driver.items()}
    photos = SHARED / "data" / "imagenet-sample" / "val-0000.tar"
    if photos.is_file():
        stats = (0.50196,) * 3
        large = attribute([str(photos)], None, str(work / "out-driver160"), methods=("random",), protocol={"steps": 3},
                          target=dict(spec=f"{SHARED / 'models' / 'mobilenet_v1.py'}:MobileNetV1",
                                      checkpoint=str(SHARED / "models" / "mobilenet_v1_0.5_160.pth"),
                                      background_logit=True, input_size=(160, 160), crop_pct=0.875, mean=stats,
                                      std=stats), batch_size=16, actors=1,
                          threads=1)
        result["driver_160px"] = {k: round(v, 2) for k, v in large.items()}
        result["driver_160px"]["driver_cpu_s_per_1000_images"] = round(large["driver_cpu_s"] / large["images"] * 1000, 2)
    return result


if __name__ == "__main__":
    main()
