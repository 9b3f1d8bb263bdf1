"""The model randomisation sanity check, on the real ResNet-20 and real CIFAR-10 images."""
import numpy as np
import pytest
import torch

from l2r.classifier import build_target
from l2r.explainer import build_explainer, save_explainer
from l2r.images import to_tensor
from l2r.methods import attribute
from l2r.sanity import cascade, parameter_layers, randomised_copy, spearman
from tests.helpers import attributor
from l2r.shard_reader import iter_shard
from l2r.reporting.stats import markdown_table, summarize
from tests.conftest import RESNET20

TARGET = {"spec": "l2r.zoo.resnet20:resnet20", "checkpoint": str(RESNET20),
          "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (32, 32)}


def test_spearman_of_maps():
    maps = torch.rand(3, 6, 5)
    assert torch.allclose(spearman(maps, maps), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(spearman(maps, -maps), -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(spearman(maps, maps.exp() * 3), torch.ones(3, dtype=torch.float64))  # ranks only
    constant = spearman(maps, torch.zeros_like(maps))
    assert torch.isnan(constant).all()
    # Ties share their average rank: [1, 1, 2] against [1, 2, 3] is sqrt(3)/2.
    tied = spearman(torch.tensor([[[1.0, 1.0, 2.0]]]), torch.tensor([[[1.0, 2.0, 3.0]]]))
    assert tied.item() == pytest.approx(np.sqrt(3) / 2)


def test_cascade_reinitialises_from_the_top(shared_cifar10):
    target = build_target(**TARGET)
    layers = parameter_layers(target.net)
    assert layers[0] == "conv1" and layers[-1] == "linear"
    stages = cascade(target.net, 3)
    assert [len(s) for s in stages] == [len(layers) // 3 + (len(layers) % 3 > 0), -(-2 * len(layers) // 3), len(layers)]
    assert stages[0][0] == "linear" and all(stages[i] == stages[i + 1][:len(stages[i])] for i in range(2))
    before = {k: v.clone() for k, v in target.net.state_dict().items()}
    copy = randomised_copy(target, stages[0], seed=1)
    after = copy.net.state_dict()
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(stages[0]) and "linear" in changed
    assert all(torch.equal(v, target.net.state_dict()[k]) for k, v in before.items())  # the original untouched
    assert copy.weights_sha256 != target.weights_sha256
    again = randomised_copy(target, stages[0], seed=1)
    assert all(torch.equal(a, b) for a, b in zip(after.values(), again.net.state_dict().values()))  # seeded


def cifar_batch(folder, count):
    rows = []
    for row in iter_shard(str(folder / "test-0000.tar"), 32):
        rows.append(row)
        if len(rows) == count:
            break
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "source", "error")}
    batch["image"] = np.stack([r["image"] for r in rows])
    batch["label"] = np.array([r["label"] for r in rows])
    return batch


def test_unchanged_model_gives_one_and_randomised_model_drops(shared_cifar10):
    target = build_target(**TARGET)
    images = to_tensor(cifar_batch(shared_cifar10, 12)["image"])
    classes = target(images).argmax(dim=1)
    maps, _ = attribute("gradcam", target, images, classes)
    same, _ = attribute("gradcam", randomised_copy(target, []), images, classes)
    assert torch.allclose(spearman(maps, same), torch.ones(12, dtype=torch.float64))
    last = cascade(target.net, 3)[-1]
    random_maps, _ = attribute("gradcam", randomised_copy(target, last), images, classes)
    assert float(torch.nan_to_num(spearman(maps, random_maps)).mean()) < 0.5


def test_the_job_stores_the_correlation_per_stage_and_the_report_shows_it(shared_cifar10, tmp_path):
    target = build_target(**TARGET)
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 16,
                                 "head_dim": 8}, target=target)
    save_explainer(tmp_path / "explainer", explainer, {"note": "untrained, for tests"})
    settings = dict(methods=["l2r", "saliency", "random"], protocol={"steps": 6}, explainer=str(tmp_path / "explainer"),
                    sanity_stages=2, target=TARGET)
    table = attributor(**settings)(cifar_batch(shared_cifar10, 8))
    rows = table.to_pylist()
    by_method = {m: [r["sanity_spearman"] for r in rows if r["method"] == m] for m in settings["methods"]}
    assert all(len(v) == 2 for values in by_method.values() for v in values)
    assert all(v == pytest.approx([1.0, 1.0]) for v in by_method["random"])  # a control ignores the model
    assert np.mean([v[-1] for v in by_method["saliency"]]) < 0.8
    # The explainer on the target's own layers reads the randomised features: its map changes.
    assert np.mean([v[-1] for v in by_method["l2r"]]) < 0.99
    stats = summarize(table, resamples=10)
    assert stats["random"]["sanity_spearman"] == pytest.approx([1.0, 1.0])
    markdown = markdown_table(stats)
    assert "| method | stage 1 | stage 2 (all layers) |" in markdown and "amortised explainer" in markdown
    # Without the option the column is null and the report has no sanity table.
    plain = attributor(**{**settings, "sanity_stages": 0, "methods": ["random"]})(cifar_batch(shared_cifar10, 2))
    assert plain.column("sanity_spearman").to_pylist() == [None, None]
    assert "stage 1" not in markdown_table(summarize(plain, resamples=10))
