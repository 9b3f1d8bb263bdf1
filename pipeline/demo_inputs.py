"""The demo's inputs, made on the fly when a training config names none: synthetic shards with known
evidence masks (`data.train: null`) and a small target fitted on them (`target.fit_steps`)."""

from __future__ import annotations

import io

import numpy as np
import torch

from l2r import storage as l2r_storage
from l2r.images import to_tensor
from pipeline.config import storage_options
from pipeline.progress import Progress
from pipeline.train_target import make_target


def prepare_synthetic(config: dict) -> tuple[str, str]:
    """Demo data: synthetic train/val shards written once into <run_dir>/data (reused on rerun)."""
    from l2r.shard_reader import expand_urls
    from l2r.shards import make_shards

    scfg = config["data"]["synthetic"]
    out = f"{config['run_dir']}/data"
    filesystem = l2r_storage.filesystem_for(out, storage_options(config))
    specs = []
    for prefix, count, seed in (("train", scfg["train"], config["seed"]), ("val", scfg["val"], config["seed"] + 1)):
        spec = f"{out}/{prefix}-*.tar"
        try:
            expand_urls(spec, filesystem)
        except FileNotFoundError:
            make_shards(out, synthetic=count, size=scfg["size"], num_classes=scfg["num_classes"], prefix=prefix,
                        max_count=scfg["shard_size"], seed=seed, progress=False, filesystem=filesystem)
        specs.append(spec)
    return specs[0], specs[1]


def fit_target(config: dict, urls: list[str]) -> str:
    """Demo only: fit the (untrained) target on the training shards for target.fit_steps; returns its weight file.

    A target that already has a checkpoint is never touched. The file is <run_dir>/target.pt,
    reused on a rerun, so the artifact's target checksum stays the same.
    """
    from l2r.shard_reader import iter_shard

    tcfg, dcfg = config["target"], config["data"]
    destination = f"{config['run_dir']}/target.pt"
    options = storage_options(config)
    if l2r_storage.exists(destination, options):
        return destination
    torch.manual_seed(config["seed"])
    # The demo's own small model: trained here from its constructor's random weights.
    target, _ = make_target({**config, "target": {**tcfg, "checkpoint": None}})
    net = target.net
    net.requires_grad_(True)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=tcfg["fit_lr"], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, tcfg["fit_lr"], total_steps=tcfg["fit_steps"])

    def rows():
        while True:
            for url in urls:
                for row in iter_shard(url, dcfg["image_size"], dcfg["crop_pct"], holdout_every=dcfg["holdout_every"],
                                      part="train", filesystem=l2r_storage.filesystem_for(url, options)):
                    if row["error"] is None and row["label"] >= 0:
                        yield row

    stream = rows()
    progress = Progress("fit target", tcfg["fit_steps"], "step", interval=10.0)
    for step in range(tcfg["fit_steps"]):
        chunk = [next(stream) for _ in range(tcfg["fit_batch_size"])]
        images = to_tensor(np.stack([r["image"] for r in chunk]))
        if torch.rand(()) < 0.5:
            images = images.flip(-1)
        labels = torch.tensor([r["label"] for r in chunk])
        loss = torch.nn.functional.cross_entropy(net(target.normalise(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.update(step + 1, loss=loss.item())
    progress.close()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    l2r_storage.write_bytes(destination, buffer.getvalue(), options)
    return destination
