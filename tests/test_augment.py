import pytest
import torch
import torch.nn.functional as F

from l2r.augment import decode_size, random_resized_crop


def images(b=6, size=24):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g)


def test_decode_size_is_the_square_evaluation_crops_from():
    assert decode_size(160, 0.875) == (183, 183)
    assert decode_size((32, 48), 1.0) == (32, 48)


def test_whole_image_without_flip_is_a_plain_resize():
    # A smooth ramp: a crop that covers the whole image (area 1: one side whole, the other >= sqrt(3/4)
    # of it, whatever the aspect drawn) resizes to nearly the plain resize; a quarter-area crop does not.
    ramp = torch.linspace(0, 1, 40)
    x = (ramp[None, :] + ramp[:, None]).div(2).expand(32, 3, 40, 40).contiguous()
    resized = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    whole = random_resized_crop(x, 16, scale=(1.0, 1.0), flip=False, generator=torch.Generator().manual_seed(1))
    quarter = random_resized_crop(x, 16, scale=(0.25, 0.25), flip=False, generator=torch.Generator().manual_seed(1))
    assert whole.shape == (32, 3, 16, 16)
    assert (whole - resized).abs().amax() < 0.075  # bound: (1 - sqrt(3/4)) of a ramp of slope 1/2
    assert (quarter - resized).abs().amax() > 0.15


def test_flip_mirrors_and_crops_differ_per_image_and_per_call():
    x = images(b=1).expand(64, -1, -1, -1).contiguous()
    full = random_resized_crop(x, 24, scale=(1.0, 1.0), flip=True, generator=torch.Generator().manual_seed(2))
    # With area 1 and aspect 1 only the flip can differ; aspect != 1 crops a full-width or full-height band.
    flipped = sum(bool(torch.allclose(f[..., 12:13], x[0].flip(-1)[..., 12:13], atol=0.3)) for f in full)
    assert 8 < flipped < 56
    a = random_resized_crop(x, 12, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(3))
    b = random_resized_crop(x, 12, scale=(0.2, 0.5), generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a, b)
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6  # bilinear, border padding: no values outside


def test_small_crops_magnify_a_part_of_the_image():
    x = torch.zeros(1, 1, 40, 40)
    x[..., :20, :20] = 1.0  # one bright quadrant
    outs = random_resized_crop(x.expand(200, -1, -1, -1), 20, scale=(0.05, 0.1), flip=False,
                               generator=torch.Generator().manual_seed(5))
    means = outs.mean(dim=(1, 2, 3))
    assert (means > 0.95).any() and (means < 0.05).any()  # crops inside and outside the bright quadrant


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_runs_on_the_images_device(device):
    out = random_resized_crop(images().to(device), 8)
    assert out.device.type == device and out.shape == (6, 3, 8, 8)
