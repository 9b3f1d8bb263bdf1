"""Train a small timm ViT (patch 4) on the shared CIFAR-10 training shards: the ViT target of the
quality table (issue: baselines and comparison).

A user's classifier, trained here because no pretrained CIFAR ViT can be downloaded: timm's
`vit_tiny_patch16_224` architecture resized by kwargs (32 px input, patch 4 -> an 8x8 token grid,
narrower and shallower so that a CPU can train it and the explainer's 64 target passes per image
stay affordable). Standard recipe for ViTs on small data: random crop (pad 4) and flip, AdamW,
warm-up + cosine, label smoothing.

    python benchmarks/train_vit.py --epochs 6 --output runs/vit_cifar10.safetensors

Writes the weights (safetensors) and `<output>.json` with the model spec, kwargs, preprocessing
and test accuracy, i.e. everything `--model/--model-kwargs/--checkpoint` of the jobs need.
Last line JSON: {"test_accuracy": ..., "images_per_s": ..., "checkpoint": ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
SPEC = "timm:vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "num_classes": 10}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def load_split(pattern: str) -> tuple[torch.Tensor, torch.Tensor]:
    from l2r.shard_reader import expand_urls, iter_shard

    images, labels = [], []
    for url in expand_urls(pattern):
        for row in iter_shard(url, 32):
            if row["error"] is None:
                images.append(row["image"])
                labels.append(row["label"])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32 px crop of the 4 px zero-padded image and a random horizontal flip."""
    b = batch.shape[0]
    padded = F.pad(batch, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None]  # (B, 1, 32, 1)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :]  # (B, 1, 1, 32)
    crops = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


@torch.no_grad()
def accuracy(target, images, labels, batch=500) -> float:
    target.eval()
    correct = 0
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float() / 255
        correct += int((target(x).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--output", default=str(ROOT / "runs" / "vit_cifar10.safetensors"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    from l2r.classifier import build_target

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_split(str(CIFAR10 / "train-*.tar"))
    test_x, test_y = load_split(str(CIFAR10 / "test-*.tar"))
    print(f"train {len(train_x)} images, test {len(test_x)}", flush=True)

    target = build_target(SPEC, model_kwargs=KWARGS, random_init=True, mean=MEAN, std=STD, input_size=(32, 32))
    net = target.net
    net.requires_grad_(True)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr)
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = max(1, total // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(train_x[idx].float() / 255, generator)
            logits = net(target.normalise(x))
            loss = F.cross_entropy(logits, train_y[idx], label_smoothing=0.1)
            for group in optimiser.param_groups:
                group["lr"] = lr_at(step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            step += 1
            if step % 50 == 0:
                rate = step * args.batch_size / (time.perf_counter() - start)
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.3f} {rate:.0f} img/s", flush=True)
        print(f"epoch {epoch}: test accuracy {accuracy(target, test_x, test_y):.3f}", flush=True)
    seconds = time.perf_counter() - start

    test_accuracy = accuracy(target, test_x, test_y)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(output))
    info = {"spec": SPEC, "kwargs": KWARGS, "mean": MEAN, "std": STD, "input_size": [32, 32],
            "test_accuracy": test_accuracy, "epochs": args.epochs, "train_images": len(train_x)}
    Path(f"{output}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({"test_accuracy": test_accuracy, "images_per_s": step * args.batch_size / seconds,
                      "seconds": seconds, "checkpoint": str(output)}))


if __name__ == "__main__":
    main()
