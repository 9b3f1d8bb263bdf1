"""Test helpers: small models (a two-class linear target, a tiny explainer) and tar shard writing."""
import io
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


def png_bytes(seed: int, size=(10, 12)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, samples, truncate_to=None):
    """samples: list of (key, {suffix: bytes}); truncate_to cuts the file to that many bytes."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    if truncate_to is not None:
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:truncate_to])


class LinearTwoClass(nn.Module):
    """Logit difference w . x + b: the best deletion order is known in closed form."""

    def __init__(self, size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, size, size, generator=g), requires_grad=False)
        self.b = nn.Parameter(torch.tensor(0.5), requires_grad=False)

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1) + self.b
        return torch.softmax(torch.stack([torch.zeros_like(z), z], dim=1), dim=1)


class TinyExplainer(nn.Module):
    def __init__(self, num_classes=2, dim=8):
        super().__init__()
        self.embed = nn.Embedding(num_classes, dim)
        self.conv1 = nn.Conv2d(3, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, 1, 3, padding=1)

    def forward(self, x, targets):
        h = torch.relu(self.conv1(x) + self.embed(targets)[:, :, None, None])
        return self.conv2(h)


def attributor(fast_path="eager", forward_batch=64, **config_fields):
    """The attribution job's per-batch work alone (no Ray): an Attributor for an AttributeConfig of these fields."""
    from pipeline.attribute_config import AttributeConfig
    from pipeline.attributor import Attributor

    config = AttributeConfig(shards="unused", output="unused", **config_fields)
    return Attributor(config, {"device": "cpu", "threads": 1, "forward_batch": forward_batch, "fast_path": fast_path})
