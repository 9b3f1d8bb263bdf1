"""The batch attribution job: schema, one row per (key, method), exact AUCs, errors, resume, S3."""

import json
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from l2r.classifier import build_target
from l2r.artifact import save_artifact
from l2r.explainer import build_explainer
from l2r.target_spec import TargetSpec
from l2r.images import decode_heatmap, to_tensor
from l2r.metrics import Protocol, deletion_insertion
from pipeline import attribute as att
from l2r.results import SCHEMA
from l2r.shard_reader import iter_shard
from l2r.shards import make_shards
from tests.helpers import attributor, png_bytes, write_tar
from tests.conftest_ray import ray_local  # noqa: F401  (session-scoped Ray fixture)

SIZE = 16
SPEC = "timm:test_resnet"
KWARGS = {"num_classes": 10}
METHODS = "l2r,gradcam,random"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Three synthetic shards, one with bad samples, a seeded target checkpoint, an untrained explainer."""
    root = tmp_path_factory.mktemp("attribute")
    make_shards(str(root / "shards"), synthetic=18, size=SIZE, max_count=6, progress=False)
    bad = [
        ("good", {"png": png_bytes(1, (20, 20)), "cls": b"3"}),
        ("corrupt", {"png": b"\x89PNG garbage", "cls": b"1"}),
        ("nolabel", {"png": png_bytes(2, (20, 20))}),
    ]
    write_tar(root / "shards" / "train-0003.tar", bad)
    torch.manual_seed(0)
    target = build_target(SPEC, model_kwargs=KWARGS, random_init=True, input_size=(SIZE, SIZE))
    torch.save(target.net.state_dict(), root / "target.pt")
    record = TargetSpec(SPEC, checkpoint=str(root / "target.pt"), kwargs=KWARGS, input_size=(SIZE, SIZE))
    target = record.build()
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2"], "dim": 8, "head_dim": 8},
                                target=target)
    save_artifact(root / "explainer", explainer, record, {"note": "untrained, for tests"})
    return {"root": root, "target": target, "checkpoint": str(root / "target.pt"), "explainer": str(root / "explainer")}


def job_args(assets, output, shards=None, methods=METHODS, extra=()):
    return [
        "--shards", shards or str(assets["root"] / "shards" / "train-{0000..0003}.tar"),
        "--output", str(output), "--model", SPEC, "--checkpoint", assets["checkpoint"],
        "--model-kwargs", json.dumps(KWARGS), "--input-size", str(SIZE),
        "--explainer", assets["explainer"], "--methods", methods,
        "--actors", "2", "--actor-cpus", "1", "--batch-size", "4", *extra,
    ]


def config(assets, output, **overrides):
    settings = dict(shards=str(assets["root"] / "shards" / "train-{0000..0003}.tar"), output=str(output),
                    target=TargetSpec(SPEC, checkpoint=assets["checkpoint"], kwargs=KWARGS, input_size=(SIZE, SIZE)),
                    explainer=assets["explainer"], methods=METHODS, actors=1, actor_cpus=1.0, batch_size=5)
    settings.update(overrides)
    return att.AttributeConfig(**settings)


def expected_keys(assets, shard_names):
    keys = set()
    for name in shard_names:
        url = str(assets["root"] / "shards" / f"{name}.tar")
        keys |= {(url, r["key"]) for r in iter_shard(url, SIZE)}
    return keys


@pytest.fixture(scope="module")
def full_run(ray_local, assets):
    """The job, run once through its command line."""
    from jobs.attribute import main

    output = assets["root"] / "out-full"
    summary = main(job_args(assets, output))
    return output, summary


def test_schema_rows_and_manifest(assets, full_run):
    output, summary = full_run
    table = att.read_results(str(output))
    assert table.schema == SCHEMA
    files = sorted(p.name for p in (output / "parquet").iterdir())
    assert files == [f"train-{i:04d}.parquet" for i in range(4)]  # one file per shard, nothing temporary
    assert pq.read_table(output / "parquet").num_rows == table.num_rows  # the folder reads as one dataset
    rows = table.to_pylist()
    keys = expected_keys(assets, [f"train-{i:04d}" for i in range(4)])
    methods = METHODS.split(",")
    assert len(rows) == len(keys) * len(methods)
    assert {(r["source"], r["key"], r["method"]) for r in rows} == {(s, k, m) for s, k in keys for m in methods}

    good = [r for r in rows if r["error"] is None]
    assert len(good) == (len(keys) - 1) * len(methods)  # one corrupt sample
    for r in good:
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
        assert len(r["deletion_curve"]) == len(r["insertion_curve"]) == 21
        assert r["height"] == r["width"] == SIZE and r["seconds"] >= 0
        assert r["pred"] == r["target"] and r["pred_prob"] == pytest.approx(r["target_prob"])
        assert decode_heatmap(r["heatmap"]).shape == (SIZE, SIZE)
    cost = {r["method"]: (r["forward_passes"], r["backward_passes"]) for r in good}
    assert cost == {"l2r": (1, 0), "gradcam": (1, 1), "random": (0, 0)}
    assert {r["label"] for r in rows if r["key"] == "nolabel"} == {None}

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["protocol"] == {"steps": 21, "reference": "black", "target": "prediction", "precision": "fp32",
                                    "fast_path": "channels_last"}
    assert manifest["controls"] == [m for m in METHODS.split(",") if m in ("random", "gaussian")]  # the measured default on CPU
    assert manifest["target"]["weights_sha256"] == assets["target"].weights_sha256
    assert manifest["target"]["weight_source"] == "checkpoint"
    assert len(manifest["explainer"]["weights_sha256"]) == 64 and manifest["explainer"]["document"]["metadata"]
    assert manifest["counts"] == {"images_in": len(keys), "rows_out": len(rows), "images_errored": 1,
                                  "rows_errored": len(methods), "actor_restarts_this_run": 0}
    assert set(manifest["versions"]) >= {"torch", "ray", "pyarrow"}
    assert summary["images"] == len(keys) and summary["errors"] == 1
    assert set(summary["methods"]) == set(methods)


def test_aucs_match_recomputation_from_stored_map(assets, full_run):
    output, _ = full_run
    rows = [r for r in att.read_results(str(output)).to_pylist() if r["error"] is None]
    images = {}
    for url in {r["source"] for r in rows}:
        images.update({(url, x["key"]): x["image"] for x in iter_shard(url, SIZE)})
    rows = rows[::5]  # a sample keeps the test fast
    batch = to_tensor(np.stack([images[(r["source"], r["key"])] for r in rows]))
    maps = torch.from_numpy(np.stack([decode_heatmap(r["heatmap"]) for r in rows]))
    targets = torch.tensor([r["target"] for r in rows])
    again = deletion_insertion(assets["target"], batch, maps, targets, steps=21, reference="black")
    np.testing.assert_allclose(again["deletion_auc"].numpy(), [r["deletion_auc"] for r in rows], atol=1e-5)
    np.testing.assert_allclose(again["insertion_auc"].numpy(), [r["insertion_auc"] for r in rows], atol=1e-5)
    np.testing.assert_allclose(again["deletion_curve"].numpy(), [r["deletion_curve"] for r in rows], atol=1e-5)


def test_the_api_gives_the_jobs_l2r_maps(assets, full_run):
    """l2r.attribute("l2r", ...) on the same images: the job's stored rankings and AUCs (the job ran the
    target channels-last, so a near-tie may swap)."""
    import l2r
    from l2r.images import decode_heatmap_ranks, heatmap_ranks

    output, _ = full_run
    rows = [r for r in att.read_results(str(output)).to_pylist() if r["error"] is None and r["method"] == "l2r"]
    rows = rows[:8]
    images = {}
    for url in {r["source"] for r in rows}:
        images.update({(url, x["key"]): x["image"] for x in iter_shard(url, SIZE)})
    batch = to_tensor(np.stack([images[(r["source"], r["key"])] for r in rows]))
    targets = torch.tensor([r["target"] for r in rows])
    explainer = l2r.load(assets["explainer"])
    maps = l2r.attribute("l2r", explainer.target, batch, targets, explainer=explainer)
    same = [np.mean(heatmap_ranks(m.numpy()) == decode_heatmap_ranks(r["heatmap"])) for m, r in zip(maps, rows)]
    assert min(same) > 0.9
    scores = l2r.score(explainer.target, batch, maps, targets)
    np.testing.assert_allclose(scores["deletion_auc"].numpy(), [r["deletion_auc"] for r in rows], atol=2e-3)


def test_the_command_lines_defaults_are_the_configurations(monkeypatch, tmp_path):
    """jobs/attribute.py repeats no default: a bare command line gives the configuration's defaults."""
    import jobs.attribute as job
    from l2r.metrics import TARGET_RULES
    from l2r.perturbation import REFERENCES

    made = []
    monkeypatch.setattr(job, "run_attribution", lambda config: made.append(config) or {})
    job.main(["--shards", "s.tar", "--output", str(tmp_path), "--model", SPEC, "--methods", "random"])
    assert made == [att.AttributeConfig(shards="s.tar", output=str(tmp_path), target={"spec": SPEC}, methods="random")]
    with pytest.raises(SystemExit):  # a target flag without --model would be ignored: refused
        job.main(["--shards", "s.tar", "--output", str(tmp_path), "--checkpoint", "w.pt", "--methods", "random"])
    choices = {a.dest: a.choices for a in job.build_parser()._actions if a.choices}
    assert choices["reference"] == REFERENCES and choices["target"] == TARGET_RULES


def test_a_saved_config_reloads(assets, tmp_path):
    saved = config(assets, tmp_path, protocol=Protocol(steps=9, reference="impute", impute_seed=3),
                   method_options={"random": {"seed": 2}})
    again = att.AttributeConfig(**json.loads(json.dumps(saved.to_dict())))
    assert again == saved and again.protocol == Protocol(steps=9, reference="impute", impute_seed=3)
    with pytest.raises(TypeError, match="nope"):
        att.AttributeConfig(**{**saved.to_dict(), "nope": 1})


def test_bad_samples_become_error_rows(full_run):
    output, _ = full_run
    rows = att.read_results(str(output)).to_pylist()
    corrupt = [r for r in rows if r["key"] == "corrupt"]
    assert len(corrupt) == 3 and all(r["error"].startswith("corrupt image") for r in corrupt)
    assert all(r["deletion_auc"] is None and r["heatmap"] is None and r["pred"] is None for r in corrupt)
    assert all(r["error"] is None for r in rows if r["key"] in ("good", "nolabel"))


def test_evidence_masks_give_pointing_and_auroc(ray_local, assets, full_run, tmp_path):
    """--masks: pointing_hit and mask_auroc per row, equal to l2r.metrics on the stored map and the mask."""
    from l2r.metrics import mask_auroc, pointing_game

    shards = [str(assets["root"] / "shards" / f"train-{i:04d}.tar") for i in (0, 3)]  # 0003 has no masks
    summary = att.run_attribution(config(assets, tmp_path / "out", shards=shards, methods="l2r,gaussian",
                                         with_mask=True), log=lambda line: None)
    rows = att.read_results(str(tmp_path / "out")).to_pylist()
    assert summary["methods"]["l2r"]["pointing_game"] is not None
    masks = {r["key"]: r["mask"] for r in iter_shard(shards[0], SIZE, with_mask=True)}
    good = [r for r in rows if r["error"] is None]
    assert {r["key"] for r in good} == set(masks) and len(good) == 2 * len(masks)
    assert all("missing mask" in r["error"] for r in rows if r["source"] == shards[1])
    for r in good:
        heatmap = torch.from_numpy(decode_heatmap(r["heatmap"]))[None]
        mask = torch.from_numpy(masks[r["key"]])[None]
        # The stored heatmap keeps the map's order, so its top pixel is the map's.
        assert r["pointing_hit"] == bool(pointing_game(heatmap, mask)[0])
        assert 0.0 <= r["mask_auroc"] <= 1.0
        if r["method"] == "l2r":  # a float map without ties: the stored order gives the same AUROC
            assert r["mask_auroc"] == pytest.approx(mask_auroc(heatmap, mask).item(), abs=1e-5)
    # Without the option both columns are null.
    plain = att.read_results(str(full_run[0])).to_pylist()
    assert all(r["pointing_hit"] is None and r["mask_auroc"] is None for r in plain)


def test_holdout_every_attributes_only_what_training_held_back(ray_local, assets, tmp_path):
    shard = str(assets["root"] / "shards" / "train-0000.tar")
    summary = att.run_attribution(config(assets, tmp_path / "out", shards=shard, methods="random", holdout_every=3),
                                  log=lambda line: None)
    keys = [r["key"] for r in iter_shard(shard, SIZE)]
    rows = att.read_results(str(tmp_path / "out")).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(keys[2::3]) and summary["images"] == len(keys) // 3
    manifest = json.loads((tmp_path / "out" / att.MANIFEST).read_text())
    assert manifest["identity"]["holdout_every"] == 3  # recorded; a rerun without it is another run
    with pytest.raises(ValueError, match="different configuration"):
        att.run_attribution(config(assets, tmp_path / "out", shards=shard, methods="random"), log=lambda line: None)


def test_crash_and_rerun_gives_each_key_once(ray_local, assets, tmp_path):
    output = tmp_path / "out"
    cfg = config(assets, output, methods="l2r,random")
    with pytest.raises(RuntimeError, match="test hook"):
        att.run_attribution(cfg, log=lambda line: None, _fail_after_shards=2)
    done = sorted(p.name for p in (output / "done").iterdir())
    assert done == ["train-0000.json", "train-0001.json"]
    first = (output / "parquet" / "train-0000.parquet").stat().st_mtime_ns
    # A shard written but not marked (a crash between the two) is redone, not duplicated.
    (output / "done" / "train-0001.json").unlink()

    summary = att.run_attribution(cfg, log=lambda line: None)
    assert summary["shards_skipped"] == 1 and summary["shards_done"] == 3
    assert (output / "parquet" / "train-0000.parquet").stat().st_mtime_ns == first  # skipped, not rewritten
    rows = att.read_results(str(output)).to_pylist()
    seen = [(r["source"], r["key"], r["method"]) for r in rows]
    keys = expected_keys(assets, [f"train-{i:04d}" for i in range(4)])
    assert len(seen) == len(set(seen)) == 2 * len(keys)
    assert summary["images"] == len(keys)
    assert not [p for p in (output / "parquet").iterdir() if p.name.startswith(".")]

    # Same output, different protocol: refused instead of mixing results.
    with pytest.raises(ValueError, match="different configuration"):
        att.run_attribution(config(assets, output, methods="l2r,random", protocol={"steps": 11}), log=lambda line: None)
    # ... unless told to start over: then only the new results remain.
    shard = str(assets["root"] / "shards" / "train-0003.tar")
    att.run_attribution(config(assets, output, shards=shard, methods="random", protocol={"steps": 11}, overwrite=True),
                        log=lambda line: None)
    rows = att.read_results(str(output)).to_pylist()
    assert sorted(p.name for p in (output / "parquet").iterdir()) == ["train-0003.parquet"]
    assert len(rows) == 3 and all(len(r["deletion_curve"]) == 11 for r in rows if r["error"] is None)


def test_attributor_with_refinement_without_ray(assets):
    """The per-batch work alone: refinement of the l2r map is counted in its cost."""
    rows = list(iter_shard(str(assets["root"] / "shards" / "train-0003.tar"), SIZE))
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "source", "error")}
    batch["image"] = np.stack([r["image"] for r in rows])
    batch["label"] = np.array([r["label"] for r in rows])
    table = attributor(methods=["l2r", "saliency"], refine_steps=2, protocol=Protocol(steps=6, reference="blur"),
                       explainer=assets["explainer"],
                       target=TargetSpec(SPEC, checkpoint=assets["checkpoint"], kwargs=KWARGS, input_size=SIZE))(batch)
    assert table.schema == SCHEMA and table.num_rows == 2 * len(rows)
    good = [r for r in table.to_pylist() if r["error"] is None]
    # Explainer pass + 2 steps x 2 directions x k 16, + the exact check of both maps (K=6).
    refine_passes = 2 * 2 * 16 + 1 + 2 * (2 * (6 - 2) + 1)
    assert {r["method"]: r["forward_passes"] for r in good} == {"l2r": 1 + refine_passes, "saliency": 1}
    assert all(len(r["insertion_curve"]) == 6 and 0 <= r["insertion_auc"] <= 1 for r in good)


def test_config_validation(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        config(assets, tmp_path, methods="l2r,nope")
    with pytest.raises(ValueError, match="explainer"):
        config(assets, tmp_path, methods="l2r", explainer=None)
    with pytest.raises(ValueError, match="reference"):
        config(assets, tmp_path, protocol={"reference": "white"})
    with pytest.raises(ValueError, match="refine_steps"):
        config(assets, tmp_path, method_options={"l2r": {"refine_steps": 3}})


def test_a_plan_without_room_for_a_read_task_is_named(ray_local, assets, tmp_path):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    default = att._cluster_plan(config(assets, tmp_path, actors=None, actor_cpus=None))
    assert att.plan_shortfall(default, 0.25) is None  # the job's own plan always leaves room to read
    message = att.plan_shortfall({"actors": 2, "num_cpus": cpus / 2}, 0.25)  # every CPU held by actors
    assert message and "read task" in message and f"cluster has {cpus}" in message


def test_target_comes_from_the_artifact(assets, tmp_path):
    # An explainer saved without a target record: the job must say so, not guess.
    document = json.loads((assets["root"] / "explainer" / "explainer.json").read_text())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "explainer.json").write_text(json.dumps({**document, "metadata": {}}))
    with pytest.raises(ValueError, match="does not record its target"):
        config(assets, tmp_path, target=None, explainer=str(bare))
    # The job's own artifact records the target it was saved with.
    cfg = config(assets, tmp_path, target=None)
    assert (cfg.target.spec, cfg.target.checkpoint, cfg.target.kwargs, cfg.target.input_size) == (
        SPEC, assets["checkpoint"], KWARGS, (SIZE, SIZE))
    recorded = tmp_path / "artifact"
    recorded.mkdir()
    document["metadata"] = {"crop_pct": 0.875, "import_paths": [str(tmp_path / "models")], "target": {
        "spec": SPEC, "checkpoint": assets["checkpoint"], "kwargs": KWARGS, "mean": [0.5] * 3, "std": [0.25] * 3,
        "input_size": [SIZE, SIZE]}}
    (recorded / "explainer.json").write_text(json.dumps(document))
    cfg = config(assets, tmp_path, target=None, explainer=str(recorded))
    assert (cfg.target.spec, cfg.target.checkpoint, cfg.target.kwargs) == (SPEC, assets["checkpoint"], KWARGS)
    assert cfg.target.mean == (0.5, 0.5, 0.5) and cfg.target.input_size == (SIZE, SIZE) and cfg.target.crop_pct == 0.875
    assert str(tmp_path / "models") in sys.path
    sys.path.remove(str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError, match="explainer.json"):
        config(assets, tmp_path, target=None, explainer=str(tmp_path / "nowhere"))


def test_output_names_disambiguate_clashes():
    names = att.output_names(["/a/x-0.tar", "/b/x-0.tar", "s3://b/y.tar"])
    assert names["s3://b/y.tar"] == "y" and len(set(names.values())) == 3
    assert all(n.startswith("x-0-") for u, n in names.items() if "x-0" in u)


# ---------------------------------------------------------------- S3 round trip (moto on loopback)


@pytest.fixture(scope="module")
def s3_endpoint(s3_server):
    fs, options = s3_server
    if not fs.exists("attr"):
        fs.mkdir("attr")
    return fs, options


def test_s3_round_trip(ray_local, assets, s3_endpoint):
    from jobs.attribute import main

    fs, options = s3_endpoint
    for i in (0, 3):
        fs.put(str(assets["root"] / "shards" / f"train-{i:04d}.tar"), f"attr/shards/train-{i:04d}.tar")
    fs.invalidate_cache()
    args = job_args(assets, "s3://attr/out", shards="s3://attr/shards/*.tar", methods="l2r,random",
                    extra=("--storage-options", json.dumps(options), "--target", "ground_truth"))
    summary = main(args)
    assert summary["shards_done"] == 2
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("attr/out/parquet")) == ["train-0000.parquet", "train-0003.parquet"]
    assert fs.exists("attr/out/manifest.json") and len(fs.ls("attr/out/done")) == 2
    table = att.read_results("s3://attr/out", filesystem=fs)
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"s3://attr/shards/train-0000.tar", "s3://attr/shards/train-0003.tar"}
    assert len(rows) == 2 * (6 + 3)
    good = [r for r in rows if r["error"] is None]
    assert all(r["target"] == r["label"] for r in good)  # --target ground_truth
    nolabel = [r for r in rows if r["key"] == "nolabel"]
    assert nolabel and all(r["error"].startswith("missing label") for r in nolabel)
    again = main(args)  # a rerun finds everything done
    assert again["shards_skipped"] == 2 and again["shards_done"] == 0 and again["images"] == 9


@pytest.mark.slow
def test_one_large_shard_streams_back_in_batches(ray_local, assets, tmp_path):
    """A shard is not one block: its batches reach the driver (progress, the writer) as they finish."""
    shard = make_shards(str(tmp_path / "one"), synthetic=12, size=SIZE, max_count=12, progress=False)
    assert len(shard) == 1
    lines = []
    summary = att.run_attribution(config(assets, tmp_path / "out", shards=shard[0], methods="random", batch_size=4,
                                         actors=2, actor_cpus=0.5, progress_interval=0.0), log=lines.append)
    assert summary["images"] == 12 and summary["errors"] == 0
    progress = [line for line in lines if line.startswith("attribute: images ")]
    counts = [int(line.split()[2].split("/")[0].rstrip(",")) for line in progress]
    assert len({c for c in counts if c < 12}) >= 2, progress  # parts of the shard, before it was done
    # The total is known before decoding (the shard's tar headers), so the first batch already has an ETA.
    assert re.match(r"attribute: images \d+/12 .*ETA \d+s$", progress[0]), progress


def test_the_fast_path_keeps_the_eager_fp32_aucs(shared_cifar10):
    """The actors' fast path on the real ResNet-20 and real CIFAR-10 images: every AUC within
    0.005 of the eager fp32 one (the maps of both methods and their curves are recomputed)."""
    from tests.conftest import RESNET20

    rows = []
    for row in iter_shard(str(shared_cifar10 / "test-0000.tar"), 32):
        rows.append(row)
        if len(rows) == 24:
            break
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "source", "error")}
    batch["image"] = np.stack([r["image"] for r in rows])
    batch["label"] = np.array([r["label"] for r in rows])
    settings = dict(methods=["gradcam", "saliency"], forward_batch=128, target=TargetSpec(
        "l2r.zoo.resnet20:resnet20", checkpoint=str(RESNET20), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        input_size=(32, 32)))
    eager = attributor(fast_path="eager", **settings)(batch).to_pylist()
    fast = attributor(fast_path="channels_last", **settings)(batch).to_pylist()
    assert len(eager) == len(fast) == 48 and all(r["error"] is None for r in eager + fast)
    for e, f in zip(eager, fast):
        assert (e["key"], e["method"], e["pred"]) == (f["key"], f["method"], f["pred"])
        assert abs(e["deletion_auc"] - f["deletion_auc"]) <= 0.005, (e["key"], e["method"])
        assert abs(e["insertion_auc"] - f["insertion_auc"]) <= 0.005, (e["key"], e["method"])
    differs = [abs(a - b) for e, f in zip(eager, fast) for a, b in zip(e["deletion_curve"], f["deletion_curve"])]
    assert max(differs) < 0.01  # the same curves, not merely the same areas
