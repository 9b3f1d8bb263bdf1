"""Training an explainer, one step at a time, in plain PyTorch (no Ray): the learning-rate schedule,
the optimiser, one optimisation step and the exact held-out validation.

The Ray Train worker loop (`pipeline/train_worker.py`) calls these; so do the benchmarks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from l2r import storage
from l2r.images import to_tensor
from l2r.metrics import deletion_insertion
from l2r.objective import objective_backward


def lr_factor(step: int, total: int, warmup: float = 0.06, warmup_div: float = 25.0, final_div: float = 1e4) -> float:
    """Multiplier of the base lr: linear lr/warmup_div -> lr over warmup*total steps, cosine to lr/warmup_div/final_div."""
    start = 1.0 / warmup_div
    end = start / final_div
    warm = max(1, round(warmup * total))
    if step < warm:
        return start + (1.0 - start) * step / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(explainer: torch.nn.Module, tcfg: dict, total: int):
    params = [p for p in explainer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, tcfg["warmup"], tcfg["warmup_div"], tcfg["final_div"])
    )
    return optimizer, scheduler


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def train_step(explainer, target, optimizer, scheduler, images, labels, progress, ocfg, grad_clip, autocast=False):
    """objective_backward + clip + AdamW + schedule; returns the objective's floats plus lr."""
    optimizer.zero_grad(set_to_none=True)
    out = objective_backward(explainer, target, images, labels, ocfg, progress, autocast=autocast)
    params = [p for p in explainer.parameters() if p.requires_grad]
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    out["lr"] = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return out


def validate(explainer, target, images, vcfg) -> dict:
    """Exact deletion/insertion AUCs (l2r.metrics) of the explainer's maps for the top-1 class."""
    was_training = explainer.training
    explainer.eval()
    deletion, insertion = [], []
    with torch.no_grad():
        for chunk in images.split(vcfg["batch_size"]):
            preds = target(chunk).argmax(1)
            maps = explainer(chunk, preds)
            res = deletion_insertion(target, chunk, maps, preds, steps=vcfg["steps"], reference=vcfg["reference"])
            deletion.append(res["deletion_auc"])
            insertion.append(res["insertion_auc"])
    explainer.train(was_training)
    return {
        "val_deletion_auc": float(torch.cat(deletion).mean()),
        "val_insertion_auc": float(torch.cat(insertion).mean()),
        "val_images": int(images.shape[0]),
    }


def load_val_images(urls: list[str], dcfg: dict, count: int, part: str = "all",
                    options: dict | None = None) -> torch.Tensor:
    """The first `count` good rows of the val shards (`part` of the holdout rule), read without Ray, as
    float (N,3,H,W)."""
    from l2r.shard_reader import iter_shard

    rows = []
    for url in urls:
        for row in iter_shard(url, dcfg["image_size"], dcfg["crop_pct"], holdout_every=dcfg["holdout_every"],
                              part=part, filesystem=storage.filesystem_for(url, options)):
            if row["error"] is None:
                rows.append(row["image"])
            if len(rows) >= count:
                return to_tensor(np.stack(rows))
    if not rows:
        raise ValueError(f"no readable validation images in {urls}")
    return to_tensor(np.stack(rows))
