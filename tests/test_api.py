"""The notebook API (`import l2r`) and the target record behind it."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import l2r
from l2r.artifact import save_artifact
from l2r.classifier import WeightsUnavailableError, build_target
from l2r.explainer import build_explainer
from l2r.target_spec import TargetMismatchError, TargetSpec, fetch

ROOT = Path(__file__).resolve().parents[1]
SPEC = "l2r.zoo.resnet20:ResNetCifar"
KWARGS = {"blocks_per_stage": 1, "num_classes": 10}


def make_artifact(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A user's small model saved to a file, and an (untrained) explainer artifact for it."""
    net = build_target(SPEC, model_kwargs=KWARGS, input_size=32, init_seed=seed).net
    weights = folder / f"target-{seed}.pt"
    torch.save(net.state_dict(), weights)
    record = TargetSpec(SPEC, checkpoint=str(weights), kwargs=KWARGS, input_size=(32, 32))
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2"], "dim": 8, "head_dim": 8},
                                target=record.build())
    save_artifact(folder / "runs" / "demo" / "explainer", explainer, record, {"steps": 0})
    return folder / "runs" / "demo" / "explainer", weights


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## In a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_verbatim(tmp_path, monkeypatch, capsys):
    make_artifact(tmp_path)
    rng = np.random.default_rng(0)
    # A stand-in for the demo's photo (tests/test_demo.py runs the snippet on the demo's own output).
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "runs" / "demo" / "photo.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)
    assert namespace["images"].shape == (1, 3, 32, 32)
    assert namespace["maps"].shape == namespace["gradcam"].shape == (1, 32, 32)
    scores = namespace["scores"]
    assert 0 <= float(scores["deletion_auc"][0]) <= 1 and len(scores["deletion_curve"][0]) == 21
    assert "tensor" in capsys.readouterr().out


def test_explain_matches_the_explainer_and_targets_default_to_prediction(tmp_path):
    path, _ = make_artifact(tmp_path)
    explainer = l2r.load(path)
    images = torch.rand(3, 3, 32, 32)
    predicted = explainer.target(images).argmax(1)
    with torch.no_grad():
        direct = explainer.explainer(images, predicted)[:, 0]
    assert torch.equal(explainer.explain(images), direct)
    other = (predicted + 1) % 10
    assert not torch.equal(explainer.explain(images, other), direct)
    # A single class for the whole batch, as a plain int.
    assert explainer.explain(images, 3).shape == (3, 32, 32)
    # l2r is a method like the others: by name, with its explainer.
    assert torch.equal(l2r.attribute("l2r", explainer.target, images, explainer=explainer), direct)
    assert torch.equal(l2r.attribute("l2r", explainer.target, images, other, explainer=explainer.explainer),
                       explainer.explain(images, other))
    with pytest.raises(ValueError, match="needs a trained explainer"):
        l2r.attribute("l2r", explainer.target, images)


def test_preprocess_accepts_paths_bytes_pil_and_arrays_alike(tmp_path):
    target = l2r.load_target(SPEC, kwargs=KWARGS, input_size=32, crop_pct=0.875)
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    batches = [l2r.preprocess(target, x) for x in
               (tmp_path / "a.png", str(tmp_path / "a.png"), data, Image.open(tmp_path / "a.png"), array)]
    for batch in batches:
        assert batch.shape == (1, 3, 32, 32) and torch.equal(batch, batches[0])
    grey = Image.fromarray(array[:, :, 0])  # grayscale becomes RGB
    assert l2r.preprocess(target, [grey, grey]).shape == (2, 3, 32, 32)


def test_load_refuses_another_target_unless_allowed(tmp_path):
    path, _ = make_artifact(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_weights = make_artifact(tmp_path / "other", seed=1)
    with pytest.raises(TargetMismatchError, match="weights sha256.*--allow-target-mismatch"):
        l2r.load(path, checkpoint=str(other_weights))
    with pytest.raises(TargetMismatchError, match="input_size"):
        l2r.load(path, input_size=(40, 40))
    loaded = l2r.load(path, checkpoint=str(other_weights), allow_target_mismatch=True)
    assert loaded.record.checkpoint == str(other_weights)


def test_timm_name_means_pretrained_and_unreachable_weights_are_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"timm:resnet18.*--checkpoint.*HF_HOME.*--random-init"):
        build_target("timm:resnet18")
    with pytest.raises(WeightsUnavailableError):
        l2r.load_target("timm:resnet18")
    # Random weights only when asked for, and then recorded as such.
    record = TargetSpec("timm:test_resnet", random_init=True, kwargs={"num_classes": 5})
    with pytest.warns(UserWarning, match="random initialisation"):
        record.build()
    assert record.weight_source == "random" and record.num_classes == 5
    assert TargetSpec("timm:test_resnet").weight_source == "timm-pretrained"
    with pytest.raises(ValueError, match="exclude each other"):
        TargetSpec("timm:test_resnet", checkpoint="w.pt", random_init=True)


def test_weights_hash_identifies_weights_not_files(tmp_path):
    a, _ = make_artifact(tmp_path)
    rec = l2r.load(a).record
    net = build_target(SPEC, model_kwargs=KWARGS, input_size=32).net
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "wrapped.pth")
    again = TargetSpec(SPEC, checkpoint=str(tmp_path / "wrapped.pth"), kwargs=KWARGS, input_size=(32, 32))
    again.build()
    assert again.weights_sha256 == rec.weights_sha256 and not again.differences(rec)


def test_record_round_trips_and_reads_older_artifacts():
    record = TargetSpec("timm:x", kwargs={"a": 1}, mean=[0.5] * 3, std=[0.2] * 3, input_size=[8, 9],
                          background_logit=True, crop_pct=0.9)
    assert TargetSpec.from_dict(record.to_dict()) == record
    old = TargetSpec.from_dict({"spec": "timm:x", "pretrained": False, "checkpoint": None, "checksum": "ab"})
    assert old.random_init and old.weight_source == "random"


def test_fetch_reads_urls_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("L2R_CACHE", str(tmp_path / "cache"))
    (tmp_path / "w.bin").write_bytes(b"weights")
    assert fetch(tmp_path / "w.bin") == str(tmp_path / "w.bin")
    url = f"file://{tmp_path / 'w.bin'}"
    assert Path(fetch(url)).read_bytes() == b"weights"
    memory = "memory://bucket/w.bin"
    import fsspec

    with fsspec.open(memory, "wb") as f:
        f.write(b"remote")
    local = fetch(memory)
    assert Path(local).read_bytes() == b"remote" and str(tmp_path / "cache") in local
    fsspec.filesystem("memory").rm(memory)
    assert fetch(memory) == local  # the cached copy: no second download
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        fetch("memory://bucket/nothing.bin")


def test_shipped_explainers_load_by_name(tmp_path, monkeypatch):
    from l2r import artifact

    shipped = artifact.shipped_explainers()
    assert "imagenet-sample-mobilenet" in shipped
    assert artifact.resolve_explainer("imagenet-sample-mobilenet") == str(artifact.SHIPPED / "imagenet-sample-mobilenet")
    with pytest.raises(FileNotFoundError, match="not a shipped explainer.*imagenet-sample-mobilenet"):
        artifact.resolve_explainer("cifar10-resnet2O")
    # A folder of that name in the working directory wins over the shipped one.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet-sample-mobilenet").mkdir()
    assert artifact.resolve_explainer("imagenet-sample-mobilenet") == "imagenet-sample-mobilenet"


def test_a_shipped_folder_records_paths_relative_to_itself(tmp_path, monkeypatch):
    """scripts/ship_explainer.py rewrites the target's weights and import paths relative to the new
    folder (or copies the weights in); the folder then loads from anywhere, with the same weights."""
    import json
    import shutil

    from scripts import ship_explainer

    path, weights = make_artifact(tmp_path)
    run_dir = path.parent
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    (run_dir / "config.yaml").write_text("name: demo\n")
    monkeypatch.setattr(ship_explainer, "ROOT", tmp_path / "repo")
    monkeypatch.setattr(ship_explainer, "SHIPPED", tmp_path / "repo" / "l2r" / "explainers")
    for copy in (False, True):
        name = f"demo-{copy}"
        folder = ship_explainer.ship(run_dir, name, with_target_weights=copy)
        recorded = json.loads((folder / "explainer.json").read_text())["metadata"]["target"]["checkpoint"]
        assert not Path(recorded).is_absolute() and (folder / recorded).resolve().is_file()
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["config.yaml", "explainer.json", "metrics.jsonl", "model.safetensors"] + (["target.pt"] if copy else []))
        monkeypatch.chdir(tmp_path / "repo")  # another working directory: the paths still resolve
        loaded = l2r.load(folder)
        assert loaded.record.checkpoint == str((folder / recorded).resolve())
    # The weights' hash still guards the relative path: another file there is refused.
    other = build_target(SPEC, model_kwargs=KWARGS, input_size=32, init_seed=1).net
    torch.save(other.state_dict(), folder / "target.pt")
    with pytest.raises(TargetMismatchError, match="weights sha256"):
        l2r.load(folder)
    # A run trained on another machine records that machine's path: the weights are named here.
    shutil.move(weights, tmp_path / "elsewhere.pt")
    folder = ship_explainer.ship(run_dir, "demo-elsewhere", target_weights=tmp_path / "elsewhere.pt")
    assert l2r.load(folder).record.checkpoint == str((folder / "target.pt").resolve())
    # A fine-tuned run (train.init_from) shipped over the folder it started from keeps that start's record.
    document = json.loads((path / "explainer.json").read_text())
    document["metadata"]["init_from"] = {"explainer": str(folder), "steps": 0, "weights_sha256": "0" * 64}
    (path / "explainer.json").write_text(json.dumps(document))
    (run_dir / "metrics.jsonl").write_text('{"step": 4}\n')
    folder = ship_explainer.ship(run_dir, "demo-elsewhere", target_weights=tmp_path / "elsewhere.pt")
    assert (folder / "init_from-metrics.jsonl").read_text() == '{"step": 0}\n'
    assert (folder / "metrics.jsonl").read_text() == '{"step": 4}\n'
    assert (folder / "init_from-config.yaml").read_text() == "name: demo\n"
    # A run started from another run's artifact (not shipped), itself a fine-tune of the shipped folder:
    # the chain's every record is kept, each earlier one an `init_from-` further.
    second = tmp_path / "second" / "explainer"
    shutil.copytree(path, second)
    document["metadata"]["init_from"] = {"explainer": str(path), "steps": 4, "weights_sha256": "0" * 64}
    (second / "explainer.json").write_text(json.dumps(document))
    (second.parent / "metrics.jsonl").write_text('{"step": 8}\n')
    (second.parent / "config.yaml").write_text("name: second\n")
    document["metadata"]["init_from"] = {"explainer": str(folder), "steps": 4, "weights_sha256": "0" * 64}
    (path / "explainer.json").write_text(json.dumps(document))
    chained = ship_explainer.ship(second.parent, "demo-chained", target_weights=tmp_path / "elsewhere.pt")
    records = {p.name: p.read_text() for p in chained.glob("*init_from-*")}
    assert records == {"init_from-config.yaml": "name: demo\n", "init_from-metrics.jsonl": '{"step": 4}\n',
                       "init_from-init_from-config.yaml": "name: demo\n",
                       "init_from-init_from-metrics.jsonl": '{"step": 4}\n',
                       "init_from-init_from-init_from-config.yaml": "name: demo\n",
                       "init_from-init_from-init_from-metrics.jsonl": '{"step": 0}\n'}
    torch.save(other.state_dict(), tmp_path / "other.pt")
    folder = ship_explainer.ship(run_dir, "demo-other", target_weights=tmp_path / "other.pt")
    with pytest.raises(TargetMismatchError, match="weights sha256"):
        l2r.load(folder)
    shutil.rmtree(folder)


def test_shipped_vit_explainer_loads_by_name_with_its_own_target():
    """`cifar10-vit` ships the small ViT it explains (benchmarks/train_vit.py): the name alone is enough."""
    explainer = l2r.load("cifar10-vit")
    assert explainer.record.spec == "timm:vit_tiny_patch16_224" and explainer.record.num_classes == 10
    assert Path(explainer.record.checkpoint).parent == ROOT / "l2r" / "explainers" / "cifar10-vit"
    assert explainer.record.weights_sha256 == explainer.metadata["target"]["weights_sha256"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = explainer.explain(images)
    assert maps.shape == (2, 32, 32) and maps.flatten(1).std(1).min() > 0
