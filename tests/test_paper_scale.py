"""The paper-scale path at 224 px: `jobs/configs/imagenet-paper.yaml` as it is, with tiny widths.

A timm ViT target and a timm ViT explainer backbone, both explicitly random-initialised and tiny
so that a CPU runs them, on real ImageNet photos at 224 px: the training job (2 steps; resuming is
tested at small scale in test_train.py and test_two_nodes.py), then the attribution job with the
artifact alone. Everything else is the paper config: gradient checkpointing of the target, the
chunked two-stage backward, the `all` reference mix, both target rules, bf16 (which is off on a CPU).
"""
import itertools
import json
import tarfile

import pytest

from l2r.artifact import load_artifact, read_target_spec
from pipeline import attribute as att
from pipeline import config as C
from pipeline import train as T
from tests.conftest import ROOT, SHARED
from tests.conftest_ray import ray_local  # noqa: F401

PAPER = ROOT / "jobs" / "configs" / "imagenet-paper.yaml"
IMAGENET = SHARED / "data" / "imagenet-sample" / "val-0000.tar"
VIT = "{depth: 2, embed_dim: 32, num_heads: 2}"
TINY_WIDTHS = [
    "target.spec=timm:vit_tiny_patch16_224", "target.random_init=true", f"target.kwargs={VIT}",
    "explainer.backbone=timm:vit_tiny_patch16_224", "explainer.pretrained=false", "explainer.blocks=[0, 1]",
    "explainer.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2, dynamic_img_size: true}",
    "explainer.dim=16", "explainer.head_dim=8",
    # A CPU and a small test budget: fewer perturbations and a coarse grid; the chunking stays on.
    "objective.k_train=4", "objective.grid_min=4", "objective.grid_max=8", "objective.chunk_size=8",
    "data.read_cpus=0.5", "data.shuffle_buffer=16", "run.gpus=false", "run.cpus_per_worker=1",
    "train.report_every=1", "val.images=2", "val.batch_size=2",
]


@pytest.mark.slow
def test_paper_config_trains_and_attributes_at_224_px(ray_local, tmp_path):
    if not IMAGENET.is_file():
        pytest.skip(f"shared ImageNet sample not found under {SHARED}")
    sets = TINY_WIDTHS + [f"data.train={IMAGENET}", f"data.val={IMAGENET}"]

    cfg = C.load_config(PAPER, sets, {"storage": str(tmp_path), "name": "paper", "workers": 1, "steps": 2,
                                      "batch_size": 2, "checkpoint_every": 2, "val_every": 2})
    assert cfg["target"]["gradient_checkpointing"] and cfg["train"]["bf16"] and cfg["objective"]["reference"] == "all"
    artifact = T.run(cfg, verbose=False)
    metrics = [json.loads(line) for line in (tmp_path / "paper" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] == m["loss"] for m in metrics) and "val_deletion_auc" in metrics[-1]
    print(f"224 px, batch 2, tiny ViTs: {[round(m['step_time_s'], 2) for m in metrics]} s/step")

    record = read_target_spec(artifact)
    assert record.weight_source == "random" and record.input_size == (224, 224) and record.crop_pct == 0.875
    explainer, target, _, metadata = load_artifact(artifact)
    assert metadata["steps"] == 2 and target.gradient_checkpointing is False

    few = tmp_path / "few.tar"
    with tarfile.open(IMAGENET) as src, tarfile.open(few, "w") as out:
        for member in itertools.islice(src, 16):  # 8 photos: .cls + .jpg each
            out.addfile(member, src.extractfile(member))
    lines = []
    summary = att.run_attribution(att.AttributeConfig(shards=str(few), output=str(tmp_path / "attr"),
                                                      explainer=artifact, methods=("l2r", "random"), protocol={"steps": 6},
                                                      actors=1, batch_size=8), log=lines.append)
    assert summary["images"] == 8 and summary["errors"] == 0
    assert any("random weights" in line for line in lines)  # an untrained target is said out loud
    rows = att.read_results(str(tmp_path / "attr")).to_pylist()
    assert {r["height"] for r in rows} == {224} and all(r["error"] is None for r in rows)
