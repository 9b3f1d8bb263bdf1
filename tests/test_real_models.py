"""Real models end to end: the model a user names is the model that is explained.

The shared MobileNetV1 (a user's model file with a background logit) on shared ImageNet photos,
and a timm model whose weights are given as a file, locally and on S3.
"""
import io
from pathlib import Path
import json
import tarfile

import numpy as np
import pytest
import torch

import l2r
from l2r.classifier import build_target
from l2r.images import decode_heatmap
from l2r.target_spec import TargetMismatchError, TargetSpec
from pipeline import attribute as att
from pipeline import config as C
from pipeline.train_target import make_target
from l2r.shards import make_shards
from tests.conftest import SHARED
from tests.conftest_ray import ray_local  # noqa: F401

MODELS, IMAGENET = SHARED / "models", SHARED / "data" / "imagenet-sample" / "val-0000.tar"
MOBILENET = dict(spec=f"{MODELS / 'mobilenet_v1.py'}:MobileNetV1", checkpoint=str(MODELS / "mobilenet_v1_0.5_160.pth"),
                 background_logit=True, input_size=(160, 160), crop_pct=0.875, mean=(0.50196,) * 3, std=(0.50196,) * 3)
# The first class, an apostrophe in the key, and a grayscale JPEG.
KEYS = ("n01440764_tench", "n02966687_carpenter's_kit", "n02815834_beaker")


@pytest.fixture(scope="module")
def imagenet_few(tmp_path_factory):
    if not IMAGENET.is_file() or not (MODELS / "mobilenet_v1_0.5_160.pth").is_file():
        pytest.skip(f"shared ImageNet sample or MobileNetV1 not found under {SHARED}")
    path = tmp_path_factory.mktemp("imagenet") / "few.tar"
    samples = {}
    with tarfile.open(IMAGENET) as src, tarfile.open(path, "w") as out:
        for member in src:
            key = member.name.rsplit(".", 1)[0]
            if key in KEYS:
                data = src.extractfile(member).read()
                samples.setdefault(key, {})[member.name.rsplit(".", 1)[1]] = data
                out.addfile(member, io.BytesIO(data))
    assert set(samples) == set(KEYS)
    return path, samples


@pytest.mark.slow
def test_mobilenet_attribution_rescores_exactly_and_matches_the_notebook_api(ray_local, imagenet_few, tmp_path):
    shard, samples = imagenet_few
    config = att.AttributeConfig(shards=str(shard), output=str(tmp_path / "out"), methods=("gradcam", "random"),
                                 protocol={"target": "ground_truth"}, actors=1, batch_size=4, target=MOBILENET)
    summary = att.run_attribution(config, log=lambda line: None)
    assert summary["images"] == 3 and summary["errors"] == 0
    rows = att.read_results(str(tmp_path / "out")).to_pylist()
    assert {r["key"] for r in rows} == set(KEYS) and all(r["error"] is None for r in rows)
    labels = {key: int(samples[key]["cls"]) for key in KEYS}
    assert all(r["target"] == labels[r["key"]] for r in rows)
    # Logit 0 (background) is dropped: the tench, class 0, is predicted as class 0.
    assert next(r for r in rows if r["key"] == KEYS[0])["pred"] == 0

    # The notebook API builds the same model and preprocessing: same probabilities, same AUCs.
    target = l2r.load_target(**MOBILENET)
    images = l2r.preprocess(target, [samples[r["key"]]["jpg"] for r in rows])
    probs = target(images)
    np.testing.assert_allclose([float(probs[i, r["target"]]) for i, r in enumerate(rows)],
                               [r["target_prob"] for r in rows], rtol=1e-4, atol=1e-6)
    maps = torch.from_numpy(np.stack([decode_heatmap(r["heatmap"]) for r in rows]))
    again = l2r.score(target, images, maps, targets=[r["target"] for r in rows])
    np.testing.assert_allclose(again["deletion_auc"].numpy(), [r["deletion_auc"] for r in rows], atol=1e-5)
    np.testing.assert_allclose(again["insertion_auc"].numpy(), [r["insertion_auc"] for r in rows], atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["target"]["background_logit"] and manifest["target"]["num_classes"] == 1000
    assert manifest["target"]["weights_sha256"] == target.weights_sha256


def test_gradcam_default_layer_is_the_last_spatial_conv_not_the_pooled_head(imagenet_few):
    """MobileNetV1's last conv is its 1x1 classifier on the pooled map: Grad-CAM there is constant."""
    from l2r.methods import attribute

    _, samples = imagenet_few
    target = l2r.load_target(**MOBILENET)
    images = l2r.preprocess(target, [samples[key]["jpg"] for key in KEYS])
    targets = target(images).argmax(1)
    default, _ = attribute("gradcam", target, images, targets)
    named, _ = attribute("gradcam", target, images, targets, target_layer="features.26.conv")
    assert torch.allclose(default, named, atol=1e-6)
    for cam in default:
        assert cam.std() > 0.05, "a constant map: Grad-CAM ran on a layer without spatial extent"
    assert not torch.allclose(default[0], default[1], atol=1e-3)


# ---------------------------------------------------------------- a timm model from a weight file


SIZE, SPEC, KWARGS = 16, "timm:test_resnet", {"num_classes": 10}


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A timm model as a user would have it: trained somewhere, saved to a file."""
    root = tmp_path_factory.mktemp("timm")
    source = build_target(SPEC, model_kwargs=KWARGS, random_init=True, input_size=SIZE, init_seed=3)
    torch.save({"model": source.net.state_dict()}, root / "weights.pth")
    shards = make_shards(str(root / "shards"), synthetic=6, size=SIZE, max_count=6, progress=False)
    return {"root": root, "source": source, "file": str(root / "weights.pth"), "shards": shards}


def source_probs(timm_weights, rows):
    from l2r.shard_reader import iter_shard
    from l2r.images import to_tensor

    images = {r["key"]: r["image"] for url in timm_weights["shards"] for r in iter_shard(url, SIZE)}
    x = to_tensor(np.stack([images[r["key"]] for r in rows]))
    with torch.no_grad():
        return timm_weights["source"](x)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_timm_checkpoint_file_explains_the_source_model(ray_local, s3_server, timm_weights, tmp_path, where,
                                                         monkeypatch):
    checkpoint, options = timm_weights["file"], None
    if where == "s3":
        fs, options = s3_server
        fs.mkdir("weights")
        fs.put(checkpoint, "weights/model.pth")
        checkpoint = "s3://weights/model.pth"
        monkeypatch.setenv("L2R_CACHE", str(tmp_path / "cache"))
    config = att.AttributeConfig(shards=timm_weights["shards"], output=str(tmp_path / "out"), target=TargetSpec(
                                 SPEC, checkpoint=checkpoint, kwargs=KWARGS, input_size=(SIZE, SIZE)),
                                 methods=("random",), actors=1, batch_size=6, storage_options=options)
    att.run_attribution(config, log=lambda line: None)
    rows = att.read_results(str(tmp_path / "out")).to_pylist()
    probs = source_probs(timm_weights, rows)
    assert [r["pred"] for r in rows] == probs.argmax(1).tolist()
    np.testing.assert_allclose([r["pred_prob"] for r in rows], probs.max(1).values.numpy(), rtol=1e-5, atol=1e-7)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["target"]["weight_source"] == "checkpoint"
    assert manifest["target"]["weights_sha256"] == timm_weights["source"].weights_sha256

    # The training job builds its target from the same record: the same weights.
    cfg = C.load_config(None, [f"target.spec={SPEC}", f"target.checkpoint={checkpoint}", "target.input_size=16",
                               "target.kwargs={num_classes: 10}"])
    if where == "s3":  # training reads URLs with the environment's credentials, as on a cluster
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
        monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
        monkeypatch.setenv("L2R_CACHE", str(tmp_path / "train-cache"))
    target, record = make_target(cfg)
    assert record.weights_sha256 == timm_weights["source"].weights_sha256
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(target(x), timm_weights["source"](x))


@pytest.mark.slow
def test_job_refuses_an_explainer_trained_for_another_target(ray_local, timm_weights, tmp_path):
    from l2r.artifact import save_artifact
    from l2r.explainer import build_explainer
    from l2r.target_spec import TargetSpec

    record = TargetSpec(SPEC, checkpoint=timm_weights["file"], kwargs=KWARGS, input_size=(SIZE, SIZE))
    explainer = build_explainer({"backbone": "target", "layers": ["layer1"], "dim": 8, "head_dim": 8},
                                target=record.build())
    save_artifact(tmp_path / "explainer", explainer, record)
    other = build_target(SPEC, model_kwargs=KWARGS, random_init=True, input_size=SIZE, init_seed=4)
    torch.save(other.net.state_dict(), tmp_path / "other.pth")
    settings = dict(shards=timm_weights["shards"], target=TargetSpec(SPEC, checkpoint=str(tmp_path / "other.pth"),
                    kwargs=KWARGS, input_size=(SIZE, SIZE)), explainer=str(tmp_path / "explainer"),
                    methods=("l2r",), actors=1, batch_size=6)
    with pytest.raises(TargetMismatchError, match=r"trained for target timm:test_resnet.*other\.pth"):
        att.run_attribution(att.AttributeConfig(output=str(tmp_path / "refused"), **settings), log=lambda line: None)
    assert not (tmp_path / "refused" / "manifest.json").exists()  # refused before any output
    lines = []
    att.run_attribution(att.AttributeConfig(output=str(tmp_path / "out"), allow_target_mismatch=True, **settings),
                        log=lines.append)
    assert any("allow_target_mismatch" in line and "weights sha256" in line for line in lines)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identity"]["allow_target_mismatch"] is True


SHIPPED_MOBILENET = Path(__file__).resolve().parents[1] / "l2r" / "explainers" / "imagenet-sample-mobilenet"


def test_shipped_mobilenet_explainer_ranks_held_back_photos_better_than_chance():
    """The explainer kept in the repository, with the shared model named by the user's own paths, on
    photos its training held back (data.holdout_every 5): insertion - deletion well above a random map's."""
    if not IMAGENET.is_file() or not (MODELS / "mobilenet_v1_0.5_160.pth").is_file():
        pytest.skip(f"shared ImageNet sample or MobileNetV1 not found under {SHARED}")
    from l2r.shard_reader import iter_shard

    explainer = l2r.load(SHIPPED_MOBILENET, **MOBILENET)
    assert explainer.metadata["data"]["holdout_every"] == 5
    rows = [r for _, r in zip(range(8), iter_shard(str(IMAGENET), 160, 0.875, holdout_every=5, part="holdout"))]
    assert [r["key"] for r in rows][:2] == ["n01494475_hammerhead", "n01518878_ostrich"]  # positions 4, 9
    images = torch.stack([torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255 for r in rows])
    maps = explainer.explain(images)
    assert maps.shape == (8, 160, 160) and maps.flatten(1).std(1).min() > 0
    ours = l2r.score(explainer.target, images, maps)
    chance = l2r.score(explainer.target, images, torch.rand(8, 160, 160, generator=torch.Generator().manual_seed(0)))
    gap = (ours["insertion_auc"] - ours["deletion_auc"]).mean() - (chance["insertion_auc"] - chance["deletion_auc"]).mean()
    assert gap > 0.1, (ours, chance)


def test_shipped_cifar10_explainer_by_name_beats_the_controls_under_impute(shared_cifar10):
    """`cifar10-resnet20`, loaded by name with the shared ResNet-20, on test images outside its
    validation set (test-0001): under the impute reference its maps beat both controls on
    insertion - deletion, on every image's mean."""
    from l2r.shard_reader import iter_shard
    from tests.conftest import RESNET20

    explainer = l2r.load("cifar10-resnet20", checkpoint=str(RESNET20))
    assert explainer.record.weights_sha256 == explainer.metadata["target"]["weights_sha256"]
    rows = [r for _, r in zip(range(32), iter_shard(str(shared_cifar10 / "test-0001.tar"), 32))]
    images = torch.stack([torch.from_numpy(r["image"]).permute(2, 0, 1).float() / 255 for r in rows])
    maps = {"l2r": explainer.explain(images)}
    for control in ("random", "gaussian"):
        maps[control] = l2r.attribute(control, explainer.target, images)
    gaps = {}
    for name, m in maps.items():
        scores = l2r.score(explainer.target, images, m, reference="impute")
        gaps[name] = float((scores["insertion_auc"] - scores["deletion_auc"]).mean())
    assert gaps["l2r"] > gaps["random"] + 0.1 and gaps["l2r"] > gaps["gaussian"], gaps
