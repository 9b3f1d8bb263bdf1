import copy

import pytest
import torch
import torch.nn.functional as F

from l2r.metrics import deletion_insertion
from l2r.objective import (
    ObjectiveConfig,
    default_grid_range,
    objective_backward,
    select_targets,
    soft_masks,
    perturbed_target_probs,
    pick_reference,
    curve_weights,
    tau_at,
)
from l2r.perturbation import make_reference
from tests.helpers import LinearTwoClass, TinyExplainer


def test_targets():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    labels = torch.tensor([1, 2])
    assert select_targets(probs, labels, "prediction").tolist() == [[1], [0]]
    assert select_targets(probs, labels, "ground_truth").tolist() == [[1], [2]]
    # Right -> runner-up; wrong -> the label.
    assert select_targets(probs, labels, "prediction_and_ground_truth").tolist() == [[1, 2], [0, 2]]
    assert select_targets(probs, None, "prediction_and_ground_truth").tolist() == [[1, 2], [0, 2]]


def test_schedules():
    assert tau_at(0.0) == 1.0 and abs(tau_at(1.0) - 0.3) < 1e-9 and abs(tau_at(0.5) - 0.65) < 1e-9
    assert default_grid_range(224) == (7, 28)
    assert default_grid_range(32) == (4, 32)


def test_soft_aucs_approach_the_hard_metric_at_low_tau():
    torch.manual_seed(0)
    model = LinearTwoClass(size=6, seed=1)
    x = torch.rand(2, 3, 6, 6)
    maps = torch.stack([torch.randperm(36) for _ in range(2)]).float().view(2, 1, 6, 6) / 35
    targets = torch.tensor([1, 0])
    k = 13
    hard = deletion_insertion(model, x, maps[:, 0], targets, steps=k)
    errors = []
    for tau, iters in ((1e-2, 300), (3e-4, 3000)):  # low tau needs many Sinkhorn rounds
        cfg = ObjectiveConfig(k_train=k, sinkhorn_iters=iters, smooth_sigma=0.0)
        masks = soft_masks(maps.flatten(1), 6, (6, 6), tau=tau, cfg=cfg, noise=False)
        y = perturbed_target_probs(model, x, make_reference(x, "black")[:, None], masks, targets)
        w = curve_weights(k, x.device)
        errors.append(max((y[:, :k] @ w - hard["deletion_auc"]).abs().max().item(),
                          (y[:, k:] @ w - hard["insertion_auc"]).abs().max().item()))
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 3


def test_gradients_reach_the_explainer_and_chunked_equals_plain():
    torch.manual_seed(0)
    model = LinearTwoClass(size=8)
    x, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 1])
    explainer = TinyExplainer()
    twin = copy.deepcopy(explainer)
    stats = {}
    for net, chunk in ((explainer, None), (twin, 5)):
        cfg = ObjectiveConfig(k_train=6, sinkhorn_iters=10, reference="blur", chunk_size=chunk)
        stats[chunk] = objective_backward(net, model, x, labels, cfg, progress=0.3,
                                          generator=torch.Generator().manual_seed(7))
    for p, q in zip(explainer.parameters(), twin.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in explainer.parameters())
    assert abs(stats[None]["loss"] - stats[5]["loss"]) < 1e-6
    assert 0 <= stats[None]["auc_desc"] <= 1


def test_training_improves_the_exact_metric_on_a_linear_model():
    torch.manual_seed(0)
    model = LinearTwoClass(size=8, seed=2)
    x = torch.rand(16, 3, 8, 8)
    explainer = TinyExplainer()
    opt = torch.optim.Adam(explainer.parameters(), lr=1e-2)
    cfg = ObjectiveConfig(k_train=8, sinkhorn_iters=20, reference="black", targets="prediction",
                          grid_min=8, grid_max=8)

    def score():
        with torch.no_grad():
            t = model(x).argmax(1)
            r = deletion_insertion(model, x, explainer(x, t)[:, 0], t, steps=11)
        return (r["insertion_auc"] - r["deletion_auc"]).mean()

    before = score()
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        opt.zero_grad()
        objective_backward(explainer, model, x, None, cfg, progress=step / 60, generator=g)
        opt.step()
    assert score() > before + 0.05


def test_a_weighted_reference_mix_draws_each_reference_in_proportion_and_rejects_bad_weights():
    cfg = ObjectiveConfig(reference={"impute": 3, "black": 1})
    g = torch.Generator().manual_seed(0)
    drawn = [pick_reference(cfg, g) for _ in range(4000)]
    assert set(drawn) == {"impute", "black"}
    assert abs(drawn.count("impute") / len(drawn) - 0.75) < 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [pick_reference(cfg, g1) for _ in range(50)] == [pick_reference(cfg, g2) for _ in range(50)]
    assert pick_reference(ObjectiveConfig(reference="mean"), g) == "mean"
    for bad in ({"impute": 1, "noise": 1}, {"black": 0}, {"black": -1.0}, {}, {"black": "a"}):
        with pytest.raises(ValueError, match="reference"):
            ObjectiveConfig(reference=bad)
