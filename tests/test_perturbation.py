import torch

from l2r.perturbation import (
    fractions,
    grid_to_pixels,
    hard_deletion_masks,
    make_reference,
    smooth_masks,
    soft_deletion_masks,
)


def test_references():
    x = torch.rand(2, 3, 32, 32)
    assert make_reference(x, "black").abs().sum() == 0
    mean = make_reference(x, "mean")
    assert torch.allclose(mean[:, 0], torch.full((2, 32, 32), 0.485))
    blur = make_reference(x, "blur")
    assert blur.shape == x.shape
    assert blur.std() < x.std() / 2  # strong blur at sigma ~5 px
    assert torch.allclose(blur.mean(), x.mean(), atol=0.02)


def test_soft_masks_from_a_hard_permutation_are_hard_masks():
    # A permutation matrix for order [2, 0, 3, 1]: rank j -> cell order[j].
    order = torch.tensor([2, 0, 3, 1])
    perm = torch.zeros(1, 4, 4)
    perm[0, torch.arange(4), order] = 1
    masks = soft_deletion_masks(perm, torch.tensor([0.0, 0.25, 0.5, 0.625, 1.0]))
    expected = torch.tensor(
        [[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [1, 0, 1, 0.5], [1, 1, 1, 1]], dtype=torch.float32
    )
    assert torch.allclose(masks[0], expected)


def test_hard_masks_delete_top_pixels_and_reverse_deletes_bottom():
    maps = torch.arange(16.0).view(1, 4, 4)  # pixel 15 is the most important
    m = hard_deletion_masks(maps, fractions(5))
    assert m.shape == (1, 5, 4, 4)
    assert m[0, 1].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert m[0, 0].sum() == 0 and m[0, -1].sum() == 16
    rev = hard_deletion_masks(maps, fractions(5), reverse=True)
    assert rev[0, 1].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_upsample_and_smooth():
    cells = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    up = grid_to_pixels(cells, 2, (8, 8))
    assert up[0, 0, :4, :4].eq(1).all() and up[0, 0, :4, 4:].eq(0).all()
    sm = smooth_masks(up, 1.0)
    assert 0 < sm[0, 0, 3, 4] < 1 and sm.min() >= 0 and sm.max() <= 1
