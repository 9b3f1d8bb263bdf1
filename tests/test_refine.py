"""Test-time refinement improves the exact AUCs of a map on held-out CIFAR-10 images."""
import itertools

import numpy as np
import pytest
import torch

from l2r.classifier import build_target
from l2r.images import to_tensor
from l2r.metrics import deletion_insertion
from l2r.refine import rank_uniform, refine
from l2r.shard_reader import iter_shard
from tests.conftest import RESNET20
from tests.helpers import LinearTwoClass
from tests.test_learning import centred_gaussian


def test_rank_uniform_keeps_the_order():
    maps = torch.randn(2, 5, 7)
    ru = rank_uniform(maps)
    assert torch.equal(torch.argsort(ru.flatten(1), dim=1, descending=True),
                       torch.argsort(maps.flatten(1), dim=1, descending=True))
    assert ru.min() >= 0 and ru.max() < 1


def test_refinement_reports_its_cost_and_moves_towards_the_linear_optimum():
    torch.manual_seed(0)
    model = LinearTwoClass(size=8, seed=4)
    x = torch.rand(4, 3, 8, 8)
    targets = model(x).argmax(1)
    start = torch.rand(4, 8, 8)
    refined, cost = refine(model, x, start, targets, steps=15, k=8, grid=8, verify=False)
    assert cost == {"forward_passes": 15 * 2 * 8, "backward_passes": 15 * 2 * 8}
    before = deletion_insertion(model, x, start, targets, steps=17)
    after = deletion_insertion(model, x, refined, targets, steps=17)
    assert (after["insertion_auc"] - after["deletion_auc"]).mean() > (
        before["insertion_auc"] - before["deletion_auc"]).mean() + 0.05


@pytest.mark.slow
def test_refinement_improves_both_exact_aucs_on_held_out_images(shared_cifar10):
    target = build_target("l2r.zoo.resnet20:resnet20", checkpoint=str(RESNET20), input_size=(32, 32))
    rows = list(itertools.islice(iter_shard(str(shared_cifar10 / "test-0001.tar"), (32, 32)), 16))
    x = to_tensor(np.stack([r["image"] for r in rows]))
    pred = target(x).argmax(1)
    start = centred_gaussian(len(x))
    refined, cost = refine(target, x, start, pred, steps=10)
    assert cost["forward_passes"] == 10 * 2 * 16 + 1 + 2 * (2 * 19 + 1)
    before = deletion_insertion(target, x, start, pred, reference="black")
    after = deletion_insertion(target, x, refined, pred, reference="black")
    gain = (after["insertion_auc"] - after["deletion_auc"]) - (before["insertion_auc"] - before["deletion_auc"])
    assert (gain >= -1e-6).all()  # verified per image: never worse
    assert gain.mean() > 0.02 and (gain > 0).sum() >= 4
