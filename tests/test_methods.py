import sys

import pytest
import torch
import torch.nn as nn

pytest.importorskip("timm")

from l2r.methods import (Method, attribute, control_names, explainer_names, gaussian_map, method_cost, method_names, register,
                         requires_grad, rise_masks)
from l2r.classifier import TargetModel, build_target
from l2r.metrics import deletion_insertion

SIZE = 32
# Small settings so the whole file stays fast on a CPU.
FAST = {"ig": {"n_steps": 8}, "rise": {"n_masks": 64}}
CNN_METHODS = ["gradcam", "ig", "saliency", "rise", "random", "gaussian"]
VIT_METHODS = ["vit_cam", "ig", "saliency", "rise", "rollout", "random", "gaussian"]


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_target("timm:test_resnet", model_kwargs={"num_classes": 10}, random_init=True, input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "img_size": SIZE, "patch_size": 4, "depth": 2}
    return build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, random_init=True, input_size=(SIZE, SIZE))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


TARGETS = torch.tensor([3, 7])


def linear_target(size=16, seed=0, scale=0.1):
    """Two classes, logit difference w . x + b; identity normalisation keeps it linear in x."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[1] = scale * torch.randn(3 * size * size, generator=generator)
        net[1].bias.copy_(torch.tensor([0.0, 0.5]))
    return TargetModel(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(size, size), num_classes=2)


def check_maps(maps, images):
    assert maps.shape == (images.shape[0], *images.shape[-2:])
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("method", CNN_METHODS)
def test_cnn_maps_have_input_size_and_exact_cost(method, cnn, images):
    maps, cost = attribute(method, cnn, images, TARGETS, **FAST.get(method, {}))
    check_maps(maps, images)
    assert cost == method_cost(method, **FAST.get(method, {}))
    assert set(cost) == {"forward_passes", "backward_passes"}
    assert (cost["backward_passes"] > 0) == requires_grad(method)


@pytest.mark.parametrize("method", VIT_METHODS)
def test_vit_maps_have_input_size(method, vit, images):
    maps, cost = attribute(method, vit, images, TARGETS, **FAST.get(method, {}))
    check_maps(maps, images)
    if method not in ("random", "gaussian"):
        assert maps.std() > 0, "map should not be constant"


def test_costs_follow_settings():
    assert method_cost("ig", n_steps=50) == {"forward_passes": 50, "backward_passes": 50}
    assert method_cost("rise", n_masks=300) == {"forward_passes": 300, "backward_passes": 0}
    assert method_cost("gradcam") == {"forward_passes": 1, "backward_passes": 1}
    assert method_cost("rollout") == {"forward_passes": 1, "backward_passes": 0}
    assert method_cost("random") == {"forward_passes": 0, "backward_passes": 0}


def test_gradcam_is_spatial_and_survives_no_grad_and_frozen_params(cnn):
    # At 64 px the last stage is 2x2 (at 32 px it is 1x1 and the map is constant), so it must vary.
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        maps, _ = attribute("gradcam", cnn, images, TARGETS)
    check_maps(maps, images)
    assert maps.std() > 0
    assert not any(p.requires_grad for p in cnn.parameters())
    assert all(p.grad is None for p in cnn.parameters())


def test_gradcam_respects_gradient_checkpointing_flag(cnn):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain, _ = attribute("gradcam", cnn, images, TARGETS[:1])
    cnn.gradient_checkpointing = True
    try:
        checkpointed, _ = attribute("gradcam", cnn, images, TARGETS[:1])
        assert cnn.gradient_checkpointing
    finally:
        cnn.gradient_checkpointing = False
    torch.testing.assert_close(plain, checkpointed)


@pytest.mark.parametrize("method", ["vit_cam", "rollout"])
def test_vit_only_methods_reject_cnn(method, cnn, images):
    with pytest.raises(ValueError, match=rf"{method}.*test_resnet"):
        attribute(method, cnn, images, TARGETS)


def test_gradcam_rejects_vit(vit, images):
    with pytest.raises(ValueError, match=r"gradcam.*vit_tiny"):
        attribute("gradcam", vit, images, TARGETS)


def test_unknown_method_and_option(cnn, images):
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute("lime", cnn, images, TARGETS)
    with pytest.raises(TypeError, match="n_step"):
        attribute("ig", cnn, images, TARGETS, n_step=4)


def manual_rollout(vit, images):
    """Rollout from attention recomputed by hand from each block's input."""
    net = vit.net
    block_inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0]))
             for block in net.blocks]
    try:
        with torch.no_grad():
            vit.logits(images)
            rollout = None
            for block, x in zip(net.blocks, block_inputs):
                attn = block.attn
                b, n, _ = x.shape
                qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
                q, k, _ = qkv.permute(2, 0, 3, 1, 4)
                weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)
                weights = 0.5 * (weights + torch.eye(n))
                rollout = weights if rollout is None else weights @ rollout
    finally:
        for hook in hooks:
            hook.remove()
    relevance = rollout[:, 0, net.num_prefix_tokens:]
    side = int(relevance.shape[-1] ** 0.5)
    return relevance.reshape(-1, side, side)


def test_rollout_matches_hand_computation_and_restores_fused_attention(vit, images):
    fused_before = [block.attn.fused_attn for block in vit.net.blocks]
    maps, _ = attribute("rollout", vit, images, TARGETS)
    assert [block.attn.fused_attn for block in vit.net.blocks] == fused_before
    expected = nn.functional.interpolate(manual_rollout(vit, images)[:, None], size=(SIZE, SIZE),
                                         mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)


def test_gaussian_control_is_shared_and_centred(images):
    maps, cost = attribute("gaussian", None, images, TARGETS)
    assert cost == {"forward_passes": 0, "backward_passes": 0}
    torch.testing.assert_close(maps[0], maps[1])
    centre = SIZE // 2
    assert maps[0].max() == maps[0, centre - 1:centre + 1, centre - 1:centre + 1].min()
    # sigma is a quarter of the side (41 / 4 px here).
    bump = gaussian_map((41, 41))
    assert bump[20, 20] == 1.0
    expected = torch.exp(torch.tensor(-(10 ** 2) / (2 * (41 / 4) ** 2))).item()
    assert bump[20, 30].item() == pytest.approx(expected, rel=1e-5)
    assert bump[10, 20].item() == pytest.approx(expected, rel=1e-5)


def test_random_control_is_seedable(images):
    first, _ = attribute("random", None, images, TARGETS, seed=5)
    again, _ = attribute("random", None, images, TARGETS, seed=5)
    other, _ = attribute("random", None, images, TARGETS, seed=6)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_random_control_scores_like_random_orders():
    model = linear_target()
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(16, 3, 16, 16, generator=generator)
    targets = torch.ones(16, dtype=torch.long)

    def mean_deletion_auc(maps):
        return deletion_insertion(model, images, maps, targets, steps=21)["deletion_auc"].mean().item()

    control = mean_deletion_auc(attribute("random", model, images, targets, seed=0)[0])
    orders = [mean_deletion_auc(torch.rand(16, 16, 16, generator=generator)) for _ in range(4)]
    random_level = sum(orders) / len(orders)
    # The closed-form best order (largest w_i x_i first) is far below the random level.
    weight = model.net[1].weight[1].reshape(3, 16, 16)
    best = mean_deletion_auc((weight * images).sum(1))
    assert abs(control - random_level) < 0.02
    assert random_level - best > 0.1


def test_saliency_and_ig_recover_linear_weights():
    model = linear_target(size=8)
    weight = model.net[1].weight[1].reshape(3, 8, 8)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    targets = torch.tensor([1, 1])

    saliency, _ = attribute("saliency", model, images, targets)
    torch.testing.assert_close(saliency, weight.abs().amax(0).expand(2, 8, 8))
    signed_gradient, _ = attribute("saliency", model, images, targets, absolute=False)
    torch.testing.assert_close(signed_gradient, weight.sum(0).expand(2, 8, 8))

    # On a linear logit, IG with a black baseline is exactly x * w (completeness holds exactly).
    ig, _ = attribute("ig", model, images, targets, n_steps=4, absolute=False)
    torch.testing.assert_close(ig, (images * weight).sum(1), rtol=1e-4, atol=1e-6)
    logit_gain = model.logits(images)[:, 1] - model.logits(torch.zeros_like(images))[:, 1]
    torch.testing.assert_close(ig.sum((1, 2)), logit_gain, rtol=1e-4, atol=1e-5)
    ig_abs, _ = attribute("ig", model, images, targets, n_steps=4)
    torch.testing.assert_close(ig_abs, (images * weight).abs().sum(1), rtol=1e-4, atol=1e-6)


class PatchDetector(nn.Module):
    """Class 1 grows with the brightness of one known patch; nothing else matters."""

    def forward(self, x):
        evidence = 20 * (x[:, :, 4:8, 10:14].mean((1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(evidence), evidence], dim=1)


def test_rise_finds_the_evidence_and_is_seeded():
    model = TargetModel(PatchDetector(), mean=(0.0,) * 3, std=(1.0,) * 3, input_size=(16, 16), num_classes=2)
    images = torch.ones(1, 3, 16, 16)
    targets = torch.tensor([1])
    maps, cost = attribute("rise", model, images, targets, n_masks=200, grid_size=4, batch_size=64)
    assert cost == {"forward_passes": 200, "backward_passes": 0}
    inside = maps[0, 4:8, 10:14].mean()
    outside = maps[0, 12:, :6].mean()
    assert inside > outside + 0.05
    again, _ = attribute("rise", model, images, targets, n_masks=200, grid_size=4, batch_size=50)
    torch.testing.assert_close(maps, again)


def test_rise_masks_follow_the_paper():
    masks = rise_masks(500, 4, 0.3, (18, 18), torch.Generator().manual_seed(0))
    assert masks.shape == (500, 1, 18, 18)
    assert masks.min() >= 0 and masks.max() <= 1
    assert masks.mean().item() == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("method,package", [("ig", "captum"), ("saliency", "captum"),
                                            ("gradcam", "pytorch_grad_cam"),
                                            ("vit_cam", "pytorch_grad_cam")])
def test_missing_optional_package_says_how_to_install(method, package, monkeypatch, cnn, images):
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=r'pip install "l2r\[baselines\]"'):
        attribute(method, cnn, images, TARGETS)


def test_every_method_is_listed():
    assert set(method_names()) == {"l2r"} | set(CNN_METHODS) | set(VIT_METHODS)
    assert control_names() == ("random", "gaussian")
    assert explainer_names() == ("l2r",)


def test_a_new_method_is_one_registration(cnn, images):
    from l2r.methods import registry

    def brightness(model, images, targets, power):
        return images.mean(dim=1) ** power

    register(Method("brightness", brightness, defaults={"power": 2}, cost=lambda settings: (0, 0)))
    try:
        maps, cost = attribute("brightness", cnn, images, TARGETS, power=1)
        assert torch.allclose(maps, images.mean(dim=1)) and cost == {"forward_passes": 0, "backward_passes": 0}
        assert "brightness" in method_names() and not requires_grad("brightness")
        with pytest.raises(ValueError, match="twice"):
            register(Method("brightness", brightness))
        with pytest.raises(TypeError, match="unknown options"):
            attribute("brightness", cnn, images, TARGETS, gamma=1)
    finally:
        registry._REGISTRY.pop("brightness", None)
    with pytest.raises(ValueError, match="unknown attribution method 'brightness'"):
        attribute("brightness", cnn, images, TARGETS)


@pytest.mark.parametrize("method", ["vit_cam", "rollout"])
def test_vit_with_register_tokens_and_average_pooling(method, images):
    kwargs = {"num_classes": 10, "img_size": SIZE, "patch_size": 8, "depth": 1,
              "class_token": False, "reg_tokens": 2, "global_pool": "avg"}
    model = build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, random_init=True, input_size=(SIZE, SIZE))
    assert model.net.num_prefix_tokens == 2
    maps, _ = attribute(method, model, images, TARGETS)
    check_maps(maps, images)
    assert maps.std() > 0
