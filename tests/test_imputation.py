"""ROAD's noisy linear imputation: the batched CG solve against pytorch-grad-cam's direct solve."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from l2r import imputation
from l2r.imputation import ERROR_TARGET, MEAN_COLOUR, impute, impute_chains, noise_field
from l2r.metrics import deletion_insertion
from l2r.objective import ObjectiveConfig, objective_backward
from l2r.perturbation import IMPUTE_SOFT_THRESHOLD, make_reference, soft_references
from tests.helpers import TinyExplainer

road = pytest.importorskip("pytorch_grad_cam.metrics.road")


def reference_imputation(images, removed):
    """pytorch-grad-cam's imputer, one image at a time (its mask: 1 = kept)."""
    imputer = road.NoisyLinearImputer(noise=0.0)
    return torch.stack([imputer(image, (~mask[0]).float()) for image, mask in zip(images, removed)])


@pytest.mark.parametrize("size,count", [(32, 6), (160, 2)])
def test_equals_the_reference_solver_on_random_masks(size, count):
    generator = torch.Generator().manual_seed(size)
    images = torch.rand(count, 3, size, size, generator=generator)
    fractions = torch.linspace(0.1, 0.9, count).view(count, 1, 1, 1)
    removed = torch.rand(count, 1, size, size, generator=generator) < fractions
    ours = impute(images, removed, noise=0.0)
    assert (ours - reference_imputation(images, removed)).abs().max() < ERROR_TARGET


def test_equals_the_reference_solver_on_large_holes():
    # Deletion curves remove blobs, not scattered pixels: the hardest case for an iterative solver.
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    smooth = F.interpolate(torch.rand(4, 1, 4, 4, generator=generator), size=(32, 32), mode="bilinear")
    removed = smooth >= smooth.flatten(1).quantile(0.2, dim=1).view(4, 1, 1, 1)  # 80 % in a few blobs
    assert (impute(images, removed, noise=0.0) - reference_imputation(images, removed)).abs().max() < ERROR_TARGET


def test_a_cpu_solve_in_batches_equals_each_image_solved_alone(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(7, 3, 16, 16, generator=generator)
    removed = torch.rand(7, 1, 16, 16, generator=generator) < torch.linspace(0.1, 0.95, 7).view(7, 1, 1, 1)
    monkeypatch.setattr(imputation, "CPU_BATCH_VALUES", 3 * images[0].numel())  # batches of 3, 3 and 1
    batched = impute(images, removed, noise=0.0)
    alone = torch.cat([impute(image[None], mask[None], noise=0.0) for image, mask in zip(images, removed)])
    assert (batched - alone).abs().max() < ERROR_TARGET  # the solver tolerance, not bitwise: each batch stops on its own
    assert (batched - reference_imputation(images, removed)).abs().max() < ERROR_TARGET


def test_chains_of_nested_masks_equal_each_mask_imputed_alone():
    # A curve's masks solved as a warm-started chain (cropped to the holes) give what `impute`
    # gives each mask, noise field included; a chain that is not nested is refused.
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 40, 36, generator=generator)
    smooth = F.interpolate(torch.rand(3, 1, 5, 5, generator=generator), size=(40, 36), mode="bilinear")[:, 0]
    ranks = smooth.flatten(1).argsort(dim=1).argsort(dim=1).view(3, 40, 36)
    counts = torch.tensor([0, 40, 300, 900, 1439, 1440])  # nothing, a small hole, ..., everything
    chains = ranks[:, None] < counts[None, :, None, None]
    chained = impute_chains(images, chains, noise=0.01, seed=2)
    assert chained.shape == (3, 6, 3, 40, 36)
    alone = impute(images.repeat_interleave(6, dim=0), chains.flatten(0, 1), noise=0.01, seed=2)
    assert (chained.flatten(0, 1) - alone).abs().max() < ERROR_TARGET
    kept = ~chains[:, :, None].expand_as(chained)
    assert torch.equal(chained[kept], images[:, None].expand_as(chained)[kept])
    inner = chains[:, 1:5]  # the exact solve needs a pixel kept and one removed
    exact = torch.stack([reference_imputation(images, inner[:, s, None]) for s in range(4)], dim=1)
    noise = noise_field((3, 40, 36), 0.01, 2)
    assert ((chained[:, 1:5] - noise) - exact).where(inner[:, :, None], torch.zeros(())).abs().max() < ERROR_TARGET
    with pytest.raises(ValueError, match="nested"):
        impute_chains(images, chains.flip(1))


def test_chains_solved_as_one_batch_as_on_a_device_agree(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 24, 24, generator=generator)
    ranks = torch.rand(2, 576, generator=generator).argsort(dim=1).argsort(dim=1).view(2, 24, 24)
    chains = ranks[:, None] < torch.tensor([50, 200, 400, 550])[None, :, None, None]
    in_sequence = impute_chains(images, chains, noise=0.0)
    monkeypatch.setattr(imputation, "solves_in_sequence", lambda device: False)
    batched = impute_chains(images, chains, noise=0.0)
    assert (in_sequence - batched).abs().max() < ERROR_TARGET


def test_kept_pixels_untouched_and_noise_seeded():
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 24, 20, generator=generator)
    removed = torch.rand(3, 1, 24, 20, generator=generator) < 0.4
    first = impute(images, removed, noise=0.01, seed=5)
    assert torch.equal(first[~removed.expand_as(images)], images[~removed.expand_as(images)])
    assert torch.equal(first, impute(images, removed, noise=0.01, seed=5))  # a rerun reproduces it
    other_seed = impute(images, removed, noise=0.01, seed=6)
    assert not torch.equal(first, other_seed)
    # The noise is exactly the seeded field on the removed pixels.
    clean = impute(images, removed, noise=0.0)
    field = noise_field((3, 24, 20), 0.01, 5).expand_as(images)
    where = removed.expand_as(images)
    assert torch.allclose((first - clean)[where], field[where], atol=1e-6)
    # One image's imputation does not depend on its batch.
    assert torch.allclose(impute(images[1:2], removed[1:2], noise=0.01, seed=5), first[1:2], atol=1e-5)


def test_everything_removed_is_the_mean_colour_plus_noise():
    images = torch.rand(2, 3, 16, 16)
    full = make_reference(images, "impute", impute_noise=0.0)
    assert torch.allclose(full, torch.tensor(MEAN_COLOUR).view(1, 3, 1, 1).expand_as(images), atol=1e-6)
    noisy = make_reference(images, "impute", impute_seed=3)
    assert torch.equal(noisy[0], noisy[1])  # the same for every image: one forward serves all
    assert 0.005 < float((noisy - full).std()) < 0.02


def test_soft_references_impute_the_mostly_deleted_pixels():
    images = torch.rand(2, 3, 16, 16)
    masks = torch.rand(2, 5, 16, 16)
    refs = soft_references(images, masks, "impute", torch.Generator().manual_seed(0))
    assert refs.shape == (2, 5, 3, 16, 16)
    kept = (masks < IMPUTE_SOFT_THRESHOLD)[:, :, None].expand_as(refs)
    assert torch.equal(refs[kept], images[:, None].expand_as(refs)[kept])
    assert not torch.equal(refs[~kept], images[:, None].expand_as(refs)[~kept])
    assert soft_references(images, masks, "black").shape == (2, 1, 3, 16, 16)


class Brightness(torch.nn.Module):
    """Class 1's logit is the mean brightness of the image's left half."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-left, left], dim=1).mul(8).softmax(dim=1)


def test_exact_metric_with_impute_is_reproducible_and_batch_independent():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 16, 16, generator=generator)
    maps = torch.rand(5, 16, 16, generator=generator)
    targets = torch.ones(5, dtype=torch.long)
    first = deletion_insertion(Brightness(), images, maps, targets, steps=9, reference="impute", max_batch=7)
    again = deletion_insertion(Brightness(), images, maps, targets, steps=9, reference="impute", max_batch=64)
    for key in ("deletion_auc", "insertion_auc"):
        assert torch.allclose(first[key], again[key], atol=1e-6)
    other = deletion_insertion(Brightness(), images, maps, targets, steps=9, reference="impute", impute_seed=1)
    assert not torch.equal(first["deletion_curve"], other["deletion_curve"])
    # The end points: the clean image, and the all-removed mean colour (plus noise).
    full = make_reference(images, "impute")
    assert torch.allclose(first["deletion_curve"][:, -1], Brightness()(full)[:, 1])


def test_training_objective_with_impute_reaches_the_explainer():
    torch.manual_seed(0)
    explainer = TinyExplainer()
    images = torch.rand(2, 3, 16, 16)
    cfg = ObjectiveConfig(reference="impute", k_train=4, sinkhorn_iters=5, targets="prediction")
    stats = objective_backward(explainer, Brightness(), images, None, cfg, progress=0.5,
                               generator=torch.Generator().manual_seed(0))
    grads = [p.grad for p in explainer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and 0 <= stats["auc_desc"] <= 1


def exact_chains(images, removed, *args):
    """`solve_chains` done exactly: a float64 sparse direct solve of every mask."""
    from benchmarks.imputation import exact_imputation

    return torch.stack([torch.stack([exact_imputation(image, mask).float() for mask in chain])
                        for image, chain in zip(images, removed)])


@pytest.mark.parametrize("model,count", [("resnet20", 2), pytest.param("mobilenet", 1, marks=pytest.mark.slow)])
def test_every_auc_is_within_a_thousandth_of_the_exact_solve_on_real_maps(model, count, monkeypatch):
    # The solve stops at a tenth of ROAD's noise: curves on the real models and real maps
    # (l2r, Grad-CAM, random) must not move by more than 1e-3 of AUC against an exact solve.
    pytest.importorskip("scipy")
    from benchmarks.attribute import MODELS, build
    from benchmarks.imputation import real_maps

    paths = [Path(MODELS[model]["checkpoint"]), Path(MODELS[model]["shards"].replace("{0000..0001}", "0000"))]
    if not all(path.exists() for path in paths):
        pytest.skip(f"shared data or model for {model} not found")
    target, _ = build(model)
    images, maps = real_maps(model, count)
    for method, method_maps in maps.items():
        ours = deletion_insertion(target.eval(), images, method_maps, steps=21, reference="impute")
        with monkeypatch.context() as patch:
            patch.setattr(imputation, "solve_chains", exact_chains)
            exact = deletion_insertion(target, images, method_maps, steps=21, reference="impute")
        for key in ("deletion_auc", "insertion_auc"):
            assert (ours[key] - exact[key]).abs().max() < 1e-3, (method, key, ours[key], exact[key])
        assert not torch.equal(ours["deletion_curve"], exact["deletion_curve"])  # the exact solve did run
