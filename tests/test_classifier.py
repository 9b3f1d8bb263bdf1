import argparse
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from l2r.zoo.resnet20 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, resnet20
from l2r.classifier import (CheckpointMismatchError, TargetModel, build_target, load_checkpoint, sha256_file,
                            weights_sha256)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESNET20_CHECKPOINT = SHARED / "models" / "resnet20-12fca82f.th"
RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"
CIFAR10_TEST_SHARD = SHARED / "data" / "cifar10" / "test-0000.tar"
USER_SPEC = "l2r.zoo.resnet20:resnet20"


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    # The import-path spec resolves against the working directory, as for a user's own model.
    monkeypatch.chdir(REPO)


def build_user_target(checkpoint=None, **kwargs):
    return build_target(
        USER_SPEC,
        checkpoint=checkpoint,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        input_size=(32, 32),
        class_names=CIFAR10_CLASSES,
        **kwargs,
    )


def random_weights(seed=0, num_classes=10):
    torch.manual_seed(seed)
    net = resnet20(num_classes=num_classes)
    # Non-trivial BatchNorm statistics, so a missed buffer would show.
    for name, buf in net.named_buffers():
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return net.state_dict()


def save_torch(obj, path):
    torch.save(obj, path)
    return path


LAYOUTS = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": sd, "optimizer": {}},
    "module_prefix": lambda sd: {"best_prec1": 90.0, "state_dict": {"module." + k: v for k, v in sd.items()}},
    "no_batches_tracked": lambda sd: {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layouts_load(tmp_path, layout):
    weights = random_weights()
    path = save_torch(LAYOUTS[layout](weights), tmp_path / "ckpt.pth")
    target = build_user_target(path)
    loaded = target.net.state_dict()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    # The same weights, whatever the file's layout, give the same weights hash.
    assert target.weights_sha256 == weights_sha256(build_user_target(save_torch(weights, tmp_path / "bare.pth")).net)


def test_safetensors_checkpoint(tmp_path):
    weights = random_weights(seed=1)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    target = build_user_target(path)
    assert torch.equal(target.net.linear.weight, weights["linear.weight"])


def test_mismatch_error_names_file_and_keys(tmp_path):
    weights = random_weights(num_classes=5)
    weights["extra.weight"] = torch.zeros(3)
    del weights["conv1.weight"]
    path = save_torch(weights, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        build_user_target(path)
    message = str(info.value)
    assert str(path) in message
    assert "conv1.weight" in message  # missing
    assert "extra.weight" in message  # unexpected
    assert "linear.weight" in message and "(5, 64)" in message  # shape


def test_mismatch_is_a_value_error_and_leaves_net_untouched(tmp_path):
    net = resnet20()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weights = random_weights(num_classes=5)
    path = save_torch(weights, tmp_path / "wrong.pth")
    with pytest.raises(ValueError):
        load_checkpoint(net, path)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def test_pickle_with_more_than_tensors_fails_clearly(tmp_path):
    path = save_torch({"state_dict": random_weights(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "full.pth")
    with pytest.raises(CheckpointMismatchError, match="weights_only"):
        build_user_target(path)


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nowhere" / "model.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_user_target(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(resnet20(), path)


def test_user_model_requires_input_size():
    with pytest.raises(ValueError, match="input_size"):
        build_target(USER_SPEC)


def test_bad_specs_fail_clearly():
    with pytest.raises(ModuleNotFoundError, match="no_such_package"):
        build_target("no_such_package.models:net", input_size=(32, 32))
    with pytest.raises(AttributeError, match="resnet99"):
        build_target("l2r.zoo.resnet20:resnet99", input_size=(32, 32))
    with pytest.raises(ValueError, match="package.module:callable"):
        build_target("resnet20", input_size=(32, 32))


def test_user_model_kwargs_and_defaults():
    target = build_target(USER_SPEC, model_kwargs={"num_classes": 4}, input_size=32)
    assert target.num_classes == 4
    assert target.input_size == (32, 32)
    assert torch.allclose(target.mean, torch.tensor([0.485, 0.456, 0.406]))
    assert target.class_names is None and len(target.weights_sha256) == 64


def test_timm_spec_with_kwargs():
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 7}
    target = build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, random_init=True)
    assert target.num_classes == 7
    assert target.input_size == (32, 32)
    # Preprocessing comes from timm's pretrained config (this model: 0.5/0.5) ...
    assert torch.allclose(target.mean, torch.tensor([0.5, 0.5, 0.5]))
    assert target.class_names is None
    assert target(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    # ... unless given explicitly.
    target = build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, random_init=True,
                          mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    assert torch.allclose(target.mean, torch.tensor([0.1, 0.2, 0.3]))


def test_timm_spec_with_checkpoint(tmp_path):
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 1, "num_classes": 3}
    source = build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, random_init=True)
    path = save_torch({"state_dict_ema": source.net.state_dict()}, tmp_path / "vit.pth")
    target = build_target("timm:vit_tiny_patch16_224", model_kwargs=kwargs, checkpoint=path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(target(x), source(x))


def test_frozen_eval_and_probabilities():
    target = build_user_target()
    assert isinstance(target, TargetModel)
    target.train()
    assert not target.training and not any(m.training for m in target.modules())
    assert not any(p.requires_grad for p in target.parameters())
    x = torch.rand(5, 3, 32, 32)
    probs = target(x)
    assert probs.shape == (5, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(probs, target.logits(x).softmax(-1))
    assert target.class_names == CIFAR10_CLASSES


def test_gradient_checkpointing_same_values_and_input_grads():
    target = build_user_target()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    plain = target.logits(x)
    (grad_plain,) = torch.autograd.grad(plain[:, 0].sum(), x)
    target.gradient_checkpointing = True
    checkpointed = target.logits(x)
    (grad_checkpointed,) = torch.autograd.grad(checkpointed[:, 0].sum(), x)
    assert torch.allclose(plain, checkpointed)
    assert torch.allclose(grad_plain, grad_checkpointed)
    assert not any(p.grad is not None for p in target.parameters())


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"l2r" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"l2r" * 1000).hexdigest()


def read_cifar_shard(path, limit):
    images, labels = {}, {}
    with tarfile.open(path) as shard:
        for member in shard:
            key, ext = member.name.rsplit(".", 1)
            data = shard.extractfile(member).read()
            if ext == "jpg":
                images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            elif ext == "cls":
                labels[key] = int(data)
            if len(labels) >= limit and len(images) >= limit and key in images and key in labels:
                break
    keys = sorted(images.keys() & labels.keys())[:limit]
    x = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor([labels[k] for k in keys])


@pytest.mark.slow  # about 80 GFLOP: 2000 forwards of the ResNet-20
@pytest.mark.skipif(
    not (RESNET20_CHECKPOINT.is_file() and CIFAR10_TEST_SHARD.is_file()),
    reason=f"shared ResNet-20 checkpoint or CIFAR-10 test shard not found under {SHARED}",
)
def test_shared_resnet20_accuracy():
    target = build_user_target(RESNET20_CHECKPOINT)
    assert sha256_file(RESNET20_CHECKPOINT) == RESNET20_SHA256
    images, labels = read_cifar_shard(CIFAR10_TEST_SHARD, limit=2000)
    assert len(labels) == 2000
    with torch.no_grad():
        accuracy = (target(images).argmax(-1) == labels).float().mean().item()
    print(f"ResNet-20 top-1 on {len(labels)} CIFAR-10 test JPEGs: {accuracy:.4f}")
    assert accuracy >= 0.75
