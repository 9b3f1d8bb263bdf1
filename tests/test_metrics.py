import pytest
import torch

from l2r.metrics import Protocol, auc, deletion_insertion, mask_auroc, pointing_game
from l2r.perturbation import fractions, hard_deletion_masks, make_reference
from l2r.ranking import hard_order
from tests.helpers import LinearTwoClass


def naive_curves(model, images, maps, targets, steps, reference):
    """One perturbation at a time, straight from the definition."""
    fr = fractions(steps)
    refs = make_reference(images, reference)
    out = []
    for reverse in (False, True):
        masks = hard_deletion_masks(maps, fr, reverse=reverse).float()
        ys = []
        for i in range(len(images)):
            y = [model(torch.lerp(images[i : i + 1], refs[i : i + 1], masks[i, k][None, None]))[0, targets[i]]
                 for k in range(steps)]
            ys.append(torch.stack(y))
        out.append(torch.stack(ys))
    return out[0], out[1].flip(-1)


@pytest.mark.parametrize("reference", ["black", "mean", "blur"])
def test_batched_curves_equal_the_definition(reference):
    torch.manual_seed(0)
    model = LinearTwoClass(size=8)
    x, maps = torch.rand(3, 3, 8, 8), torch.randn(3, 8, 8)
    targets = torch.tensor([0, 1, 1])
    res = deletion_insertion(model, x, maps, targets, steps=11, reference=reference, max_batch=7)
    dele, ins = naive_curves(model, x, maps, targets, 11, reference)
    assert torch.allclose(res["deletion_curve"], dele, atol=1e-6)
    assert torch.allclose(res["insertion_curve"], ins, atol=1e-6)
    assert torch.allclose(res["deletion_auc"], auc(dele, fractions(11)), atol=1e-6)
    # Insertion starts from the reference and ends at the clean image.
    assert torch.allclose(res["insertion_curve"][:, -1], res["deletion_curve"][:, 0])


def test_closed_form_order_minimises_deletion_auc_on_a_linear_model():
    torch.manual_seed(1)
    model = LinearTwoClass(size=8, seed=3)
    x = torch.rand(1, 3, 8, 8)
    r = make_reference(x, "black")
    contribution = (model.w * (x - r)).sum(1)  # (1, 8, 8): largest first is optimal for class 1
    target = torch.tensor([1])
    best = deletion_insertion(model, x, contribution, target, steps=65)["deletion_auc"]
    reversed_ = deletion_insertion(model, x, -contribution, target, steps=65)["deletion_auc"]
    random = deletion_insertion(model, x.expand(20, -1, -1, -1), torch.randn(20, 8, 8),
                                target.expand(20), steps=65)["deletion_auc"]
    assert (best < random).all()
    assert best < reversed_ - 0.1
    # And the same order is the best insertion order.
    ins_best = deletion_insertion(model, x, contribution, target, steps=65)["insertion_auc"]
    ins_random = deletion_insertion(model, x.expand(20, -1, -1, -1), torch.randn(20, 8, 8),
                                    target.expand(20), steps=65)["insertion_auc"]
    assert (ins_best > ins_random).all()


def test_protocol_validation_and_shape_errors():
    with pytest.raises(ValueError, match="reference"):
        Protocol(reference="white")
    with pytest.raises(ValueError, match="maps"):
        deletion_insertion(LinearTwoClass(8), torch.rand(2, 3, 8, 8), torch.rand(2, 7, 7))
    assert Protocol().to_dict() == {"steps": 21, "reference": "black", "target": "prediction"}
    assert Protocol(reference="impute").to_dict() == {"steps": 21, "reference": "impute", "target": "prediction",
                                                      "impute_noise": 0.01, "impute_seed": 0}
    with pytest.raises(ValueError, match="impute_noise"):
        Protocol(reference="impute", impute_noise=-1.0)


def test_a_protocol_scores_as_its_fields_do():
    model, x, maps = LinearTwoClass(8), torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8)
    given = deletion_insertion(model, x, maps, protocol=Protocol(steps=7, reference="blur"))
    by_fields = deletion_insertion(model, x, maps, steps=7, reference="blur")
    assert given["deletion_curve"].shape == (3, 7)
    assert torch.equal(given["deletion_curve"], by_fields["deletion_curve"])
    with pytest.raises(TypeError, match="not both"):
        deletion_insertion(model, x, maps, protocol=Protocol(), steps=7)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion(model, x, maps, steps=1)


# ---------------------------------------------------------------- evidence masks


def brute_force_auroc(scores, mask):
    """P(mask pixel scores above a non-mask pixel) + half the ties, over every pair."""
    pos, neg = scores[mask], scores[~mask]
    wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return wins.mean().item()


def test_mask_auroc_equals_the_pairwise_definition_with_ties():
    torch.manual_seed(0)
    maps = torch.randn(4, 1, 6, 7).round()  # many ties
    masks = torch.rand(4, 6, 7) > 0.6
    got = mask_auroc(maps, masks)
    assert got.dtype == torch.float64 and got.shape == (4,)
    for i in range(4):
        assert got[i].item() == pytest.approx(brute_force_auroc(maps[i, 0], masks[i]), abs=1e-12)


def test_mask_auroc_extremes_and_undefined_masks():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    ramp = torch.arange(16.0).flip(0).view(1, 4, 4)  # the top rows score highest
    assert mask_auroc(ramp, mask).item() == 1.0
    assert mask_auroc(-ramp, mask).item() == 0.0
    assert mask_auroc(torch.zeros(1, 4, 4), mask).item() == 0.5  # a constant map is chance
    empty, full = torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    assert torch.isnan(mask_auroc(ramp, empty)).all() and torch.isnan(mask_auroc(ramp, full)).all()
    with pytest.raises(ValueError, match="masks"):
        mask_auroc(ramp, torch.ones(1, 3, 3, dtype=torch.bool))


def test_pointing_game_top_pixel_and_ties():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 5.0  # inside
    maps[1, 3, 3] = 5.0  # outside
    # maps[2] is constant: the tie goes to the lower flat index (0, 0), as in hard_order.
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, 1, 2] = True
    masks[2, 0, 0] = True
    hits = pointing_game(maps[:, None], masks)
    assert hits.dtype == torch.bool and hits.tolist() == [True, False, True]
    assert hard_order(maps)[:, 0].tolist() == [6, 15, 0]
    assert not pointing_game(maps, torch.zeros(3, 4, 4, dtype=torch.bool)).any()  # empty mask
