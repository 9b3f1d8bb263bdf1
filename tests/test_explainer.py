import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from l2r.zoo.resnet20 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from l2r.classifier import CheckpointMismatchError, build_target
from l2r.explainer import Explainer, build_explainer, load_explainer, save_explainer

REPO = Path(__file__).resolve().parents[1]
TARGET_LAYERS = {"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 16, "head_dim": 8}
TIMM_CNN = {"backbone": "timm:test_resnet", "out_indices": [1, 2, 3], "num_classes": 10, "dim": 16, "head_dim": 8}
# A tiny ViT at 32 px, patch 4: fixed input size (images get resized) ...
TIMM_VIT = {
    "backbone": "timm:vit_tiny_patch16_224",
    "blocks": [0, 1],
    "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 2},
    "num_classes": 10,
    "dim": 16,
    "head_dim": 8,
}
# ... and dynamic input size (images get padded to a multiple of the patch).
TIMM_VIT_DYNAMIC = {
    **TIMM_VIT,
    "blocks": [0, 1, 2, 3],
    "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 4, "dynamic_img_size": True},
}
# Conditioned on the target's classifier rows instead of a learnt embedding per class id.
TARGET_LAYERS_ROWS = {**TARGET_LAYERS, "condition": "classifier"}
CONFIGS = {"target": TARGET_LAYERS, "cnn": TIMM_CNN, "vit": TIMM_VIT, "vit_dynamic": TIMM_VIT_DYNAMIC,
           "target_rows": TARGET_LAYERS_ROWS}


@pytest.fixture(scope="module")
def target():
    # Random weights suffice here; the shared checkpoint is tested in test_classifier.
    torch.manual_seed(0)
    return build_target(
        "l2r.zoo.resnet20:resnet20",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        input_size=(32, 32),
        class_names=CIFAR10_CLASSES,
    )


def make(name, target, **overrides):
    torch.manual_seed(0)
    return build_explainer({**CONFIGS[name], **overrides}, target=target)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(32, 32), (30, 30), (24, 40)])
def test_output_shape(target, name, size):
    explainer = make(name, target)
    images = torch.rand(2, 3, *size)
    maps = explainer(images, torch.tensor([0, 9]))
    assert maps.shape == (2, 1, *size)
    assert torch.isfinite(maps).all()


def test_vit_pyramid_and_input_handling(target):
    fixed, dynamic = make("vit", target), make("vit_dynamic", target)
    assert fixed.backbone.fixed_size == (32, 32)
    assert dynamic.backbone.fixed_size is None
    features, covered = dynamic.backbone(torch.rand(1, 3, 30, 30))
    assert covered == (32, 32)  # padded to the patch grid, cropped after decoding
    assert [f.shape[-1] for f in features] == [8, 8, 8, 8]
    # DPT reassembly: 4x, 2x, 1x, 1/2x.
    assert [type(m).__name__ for m in dynamic.decoder.resample] == [
        "ConvTranspose2d",
        "ConvTranspose2d",
        "Identity",
        "Conv2d",
    ]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_reach_decoder_not_frozen_backbone(target, name):
    explainer = make(name, target).train()
    maps = explainer(torch.rand(3, 3, 32, 32), torch.tensor([1, 2, 3]))
    (maps * torch.randn_like(maps)).sum().backward()
    for param_name, param in explainer.decoder.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert explainer.decoder.out.weight.grad.abs().sum() > 0
    condition = explainer.decoder.class_embed
    condition_weight = condition.project.weight if name == "target_rows" else condition.weight
    assert condition_weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in explainer.backbone.parameters())
    assert all(p.grad is None for p in target.parameters())
    # A frozen backbone stays in eval mode (BatchNorm statistics untouched) while training.
    assert not explainer.backbone.training and explainer.decoder.training


def test_trainable_backbone_gets_gradients(target):
    explainer = make("cnn", target, frozen=False).train()
    assert explainer.backbone.training
    maps = explainer(torch.rand(2, 3, 32, 32), torch.tensor([1, 2]))
    maps.square().mean().backward()
    grads = [p.grad for p in explainer.backbone.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_target_backbone_cannot_be_trainable(target):
    with pytest.raises(ValueError, match="frozen"):
        make("target", target, frozen=False)


@pytest.mark.parametrize("name", ["target", "vit", "target_rows"])
def test_class_conditioning_changes_map(target, name):
    explainer = make(name, target).eval()
    images = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    maps = explainer(images, torch.tensor([0, 1]))
    difference = (maps[0] - maps[1]).abs().max()
    assert difference > 1e-2 * maps.abs().max()


def test_target_hooks_are_removed(target):
    explainer = make("target", target)
    explainer(torch.rand(1, 3, 32, 32), torch.tensor([0]))
    assert all(not m._forward_hooks for m in target.modules())


def test_config_errors(target):
    with pytest.raises(ValueError, match="layer9"):
        make("target", target, layers=["layer1", "layer9"])
    with pytest.raises(ValueError, match="unknown"):
        make("target", target, depth=3)
    with pytest.raises(ValueError, match="target model"):
        build_explainer(TARGET_LAYERS)
    with pytest.raises(ValueError, match="num_classes"):
        build_explainer({**TIMM_CNN, "num_classes": None})


@pytest.mark.parametrize("name", ["target", "cnn", "vit", "target_rows"])
def test_save_load_round_trip(tmp_path, target, name):
    explainer = make(name, target)
    # A few training steps so BatchNorm statistics and weights differ from a fresh build.
    optimizer = torch.optim.SGD([p for p in explainer.parameters() if p.requires_grad], lr=0.1)
    explainer.train()
    for _ in range(2):
        maps = explainer(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        (maps * torch.randn_like(maps)).mean().backward()
        optimizer.step()
    metadata = {"target": {"spec": target.spec, "weights_sha256": target.weights_sha256}, "steps": 2}
    save_explainer(tmp_path / "explainer", explainer, metadata)

    loaded, loaded_metadata = load_explainer(tmp_path / "explainer", target=target)
    assert isinstance(loaded, Explainer)
    assert loaded_metadata == metadata
    images, targets = torch.rand(3, 3, 30, 30), torch.tensor([4, 5, 6])
    explainer.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(explainer(images, targets), loaded(images, targets))

    weights = load_file(str(tmp_path / "explainer" / "model.safetensors"))
    if name.startswith("target"):
        # The target's weights (its classifier rows included) are not the explainer's to store.
        assert all(k.startswith("decoder.") for k in weights)
    else:
        assert any(k.startswith("backbone.") for k in weights)


def test_load_needs_target_for_target_backbone(tmp_path, target):
    save_explainer(tmp_path / "e", make("target", target), {})
    with pytest.raises(ValueError, match="target"):
        load_explainer(tmp_path / "e")


def test_weights_that_do_not_fit_raise(tmp_path, target):
    save_explainer(tmp_path / "e", make("target", target), {})
    config_file = tmp_path / "e" / "explainer.json"
    document = json.loads(config_file.read_text())
    document["config"]["dim"] = 24
    config_file.write_text(json.dumps(document))
    with pytest.raises(CheckpointMismatchError) as info:
        load_explainer(tmp_path / "e", target=target)
    assert "model.safetensors" in str(info.value)
    assert "decoder.project.0.weight" in str(info.value)


def test_missing_explainer_files(tmp_path, target):
    with pytest.raises(FileNotFoundError, match="explainer.json"):
        load_explainer(tmp_path / "nothing", target=target)


def test_backbone_checkpoint_from_local_file(tmp_path, target):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    explainer = make("cnn", target, backbone_checkpoint=str(path))
    loaded = explainer.backbone.model.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make("cnn", target, backbone_checkpoint=str(tmp_path / "nowhere.pth"))


def test_small_configuration_trains_on_cpu(target):
    # Fit a fixed class-dependent pattern: the loss must fall within a few steps.
    explainer = make("target", target).train()
    optimizer = torch.optim.AdamW([p for p in explainer.parameters() if p.requires_grad], lr=1e-2)
    size = 16
    images = torch.rand(8, 3, size, size)
    targets = torch.arange(8) % 2
    grid = torch.linspace(-1, 1, size)
    patterns = torch.stack([grid[:, None].expand(size, size), grid[None, :].expand(size, size)])
    wanted = patterns[targets][:, None]
    losses = []
    for _ in range(20):
        loss = (explainer(images, targets) - wanted).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_target_backbone_reads_a_vit_targets_blocks():
    torch.manual_seed(0)
    vit = build_target("timm:vit_tiny_patch16_224", input_size=(32, 32), random_init=True,
                       model_kwargs={"img_size": 32, "patch_size": 4, "depth": 3, "num_classes": 10})
    explainer = build_explainer({"backbone": "target", "layers": ["blocks.0", "blocks.2"], "dim": 16,
                                 "head_dim": 8}, target=vit).train()
    # Tokens (B, 1 + 8*8, C) go back on the 8x8 patch grid, and the decoder builds a pyramid from it.
    assert explainer.backbone.single_scale and explainer.backbone.channels == [192, 192]
    assert [type(r).__name__ for r in explainer.decoder.resample] == ["Identity", "Conv2d"]
    images = torch.rand(2, 3, 32, 32)
    maps = explainer(images, torch.tensor([3, 4]))
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all()
    (maps * torch.randn_like(maps)).sum().backward()
    assert explainer.decoder.project[0].weight.grad.abs().sum() > 0
    # The patch tokens land where their patches are: a change in one corner patch moves only that cell.
    features = explainer.backbone(images)[0][0]
    vit.net.blocks[0].attn.proj.weight.data.zero_()  # no mixing between tokens in block 0...
    vit.net.blocks[0].attn.proj.bias.data.zero_()
    changed = images.clone()
    changed[:, :, :4, :4] = 0.0
    before, after = explainer.backbone(images)[0][0], explainer.backbone(changed)[0][0]
    moved = (before - after).abs().amax(dim=(0, 1))
    assert moved[0, 0] > 0 and (moved.flatten()[1:] == 0).all()
    assert features.shape == (2, 192, 8, 8)


def test_classifier_rows_condition_every_class_from_the_target(target):
    """A class's condition is its classifier row, projected: a class training never saw still
    gets a condition the target defines, and two classes the target treats alike are alike."""
    explainer = make("target_rows", target).eval()
    rows = target.net.linear.weight
    assert torch.equal(explainer.decoder.class_embed.rows, torch.nn.functional.normalize(rows, dim=1))
    images = torch.rand(1, 3, 32, 32).expand(3, -1, -1, -1)
    with torch.no_grad():
        before = explainer(images, torch.tensor([0, 1, 2]))
        original = rows.clone()
        try:
            rows[2] = 3.0 * rows[1]  # class 2 now points where class 1 does (its norm does not matter)
            after = make("target_rows", target).eval()(images, torch.tensor([0, 1, 2]))
        finally:
            rows.copy_(original)
    assert torch.allclose(after[1], after[2])
    assert not torch.allclose(before[1], before[2])
    assert torch.equal(after[0], before[0])


def test_classifier_rows_of_a_model_with_a_background_logit():
    from l2r.classifier import TargetModel, classifier_weight_rows

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Conv2d(8, 6, 1), torch.nn.Flatten())
    target = TargetModel(net, [0.5] * 3, [0.5] * 3, (16, 16), num_classes=5, background_logit=True)
    rows = classifier_weight_rows(target)
    assert torch.equal(rows, net[2].weight.flatten(1)[1:])
    explainer = build_explainer({"backbone": "target", "layers": ["0"], "dim": 8, "head_dim": 4,
                                 "condition": "classifier"}, target=target)
    assert explainer(torch.rand(2, 3, 16, 16), torch.tensor([0, 4])).shape == (2, 1, 16, 16)


def test_classifier_rows_condition_errors(target):
    from l2r.classifier import TargetModel

    with pytest.raises(ValueError, match="condition 'attention'"):
        make("target", target, condition="attention")
    with pytest.raises(ValueError, match="needs the target"):
        build_explainer({**TIMM_CNN, "condition": "classifier"})
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    no_classifier = TargetModel(net, [0.5] * 3, [0.5] * 3, (8, 8), num_classes=4)
    with pytest.raises(ValueError, match="condition 'embedding'"):
        build_explainer({"backbone": "target", "layers": ["0"], "dim": 8, "head_dim": 4,
                         "condition": "classifier"}, target=no_classifier)
