"""Shared test set-up: one torch thread (Ray actors share the 2 cores), shared data paths, local Ray."""
from pathlib import Path

import pytest
import torch

from tests.conftest_ray import ray_local  # noqa: F401  (a fixture)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def shared_cifar10():
    if not (CIFAR10 / "test-0000.tar").exists() or not RESNET20.exists():
        pytest.skip(f"shared CIFAR-10 shards or ResNet-20 not found under {SHARED} (fresh clone elsewhere)")
    return CIFAR10
