import numpy as np
import pytest

from l2r import synthetic


def test_sample_shapes_and_mask():
    image, mask, label = synthetic.make_sample(np.random.default_rng(0), (24, 40), num_classes=10, label=3)
    assert image.dtype == np.uint8 and image.shape == (24, 40, 3)
    assert mask.dtype == bool and mask.shape == (24, 40) and mask.any()
    assert label == 3


def test_mask_pixels_carry_the_class_colour_and_nothing_else_does():
    for image, mask, label in synthetic.generate(30, 32, seed=1, num_classes=10):
        colour = np.array(list(synthetic.CLASS_COLOURS.values())[label % 5])
        distance = np.abs(image.astype(int) - colour).max(axis=2)
        assert (distance[mask] <= 12).all()
        # Background and distractors stay muted: far from every class colour.
        saturation = image.max(axis=2).astype(int) - image.min(axis=2)
        assert saturation[~mask].max() < 125 <= saturation[mask].min()


def test_generate_is_deterministic_and_balanced():
    a = list(synthetic.generate(12, 16, seed=5, num_classes=4))
    b = list(synthetic.generate(12, 16, seed=5, num_classes=4))
    c = list(synthetic.generate(12, 16, seed=6, num_classes=4))
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() and x[2] == y[2] for x, y in zip(a, b))
    assert any((x[0] != y[0]).any() for x, y in zip(a, c))
    assert [s[2] for s in a] == [i % 4 for i in range(12)]


def test_class_names_are_distinct():
    names = synthetic.class_names(synthetic.MAX_CLASSES)
    assert len(set(names)) == synthetic.MAX_CLASSES == 30
    assert names[:2] == ["red_circle", "green_square"]
    with pytest.raises(ValueError):
        synthetic.class_names(31)


def test_any_size_works():
    for size in (8, 17, (20, 64)):
        image, mask, _ = synthetic.make_sample(np.random.default_rng(1), size)
        assert image.shape[:2] == mask.shape and mask.sum() >= 5
