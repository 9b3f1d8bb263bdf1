"""Distributed training (l2r/training.py, pipeline/train*.py, jobs/train.py): schedule, config, Ray Train runs, `ray job submit`.

The Ray runs share one tiny setup (16 px synthetic shards and a ResNet-8 target fitted once,
in-process), so each run is a few seconds of compute; most of their time is Ray start-up.
"""

import json
import math
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2r.artifact import load_artifact
from pipeline import config as C
from l2r.shard_reader import expand_urls, iter_shard
from l2r import training
from l2r.objective import ObjectiveConfig
from pipeline import demo_inputs, train_artifact, train_data
from pipeline import train as T
from tests.ray_nodes import RAY, RayNode

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"

TINY = [
    "data.image_size=16",
    "data.synthetic={train: 256, val: 16, size: 16, num_classes: 10, shard_size: 64}",
    "target.input_size=[16,16]",
    "target.fit_steps=15",
    "target.fit_batch_size=32",
    "explainer.dim=16",
    "explainer.head_dim=8",
    "objective.k_train=8",
    "objective.reference=black",
    "objective.grid_min=4",
    "objective.grid_max=8",
    "train.lr=3e-3",
    "train.report_every=4",
    "val.images=8",
    "val.batch_size=8",
]


# ---------------------------------------------------------------- no Ray


def test_lr_schedule_warmup_and_cosine():
    total = 1000
    assert training.lr_factor(0, total) == pytest.approx(1 / 25)
    assert training.lr_factor(60, total) == pytest.approx(1.0)  # warm-up is 6 % of the steps
    assert training.lr_factor(30, total) == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5)
    assert training.lr_factor(total, total) == pytest.approx(1 / 25 / 1e4)
    mid = 60 + (total - 60) / 2
    assert training.lr_factor(mid, total) == pytest.approx((1 + 1 / 25 / 1e4) / 2, rel=1e-3)
    values = [training.lr_factor(s, total) for s in range(60, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_auto_worker_cpus_share_a_node_among_its_workers():
    assert T.worker_cpus({"cpus_per_worker": "auto", "workers": 1}, [2]) == 2  # a lone worker: every core
    assert T.worker_cpus({"cpus_per_worker": "auto", "workers": 2}, [8]) == 4
    assert T.worker_cpus({"cpus_per_worker": "auto", "workers": 2}, [2, 2]) == 2  # one per node
    assert T.worker_cpus({"cpus_per_worker": "auto", "workers": 3}, [1]) == 1
    assert T.worker_cpus({"cpus_per_worker": 1.5, "workers": 1}, [8]) == 1.5
    with pytest.raises(ValueError, match="cpus_per_worker"):
        T.worker_cpus({"cpus_per_worker": "all", "workers": 1}, [2])


def test_config_layers_and_errors(tmp_path):
    cfg = C.load_config(DEMO, ["objective.chunk_size=64", "train.lr=1e-3", "val.every=0"],
                        {"workers": 3, "storage": "rel/runs", "steps": None})
    assert cfg["name"] == "demo"
    assert cfg["objective"]["chunk_size"] == 64
    assert cfg["train"]["lr"] == pytest.approx(1e-3) and cfg["train"]["weight_decay"] == pytest.approx(1e-3)
    assert cfg["run"]["workers"] == 3 and cfg["train"]["steps"] == 50  # None flags do not override
    assert cfg["run"]["storage"] == os.path.abspath("rel/runs")
    assert cfg["val"]["every"] == 0
    with pytest.raises(KeyError, match="train.stpes"):
        C.load_config(DEMO, ["train.stpes=3"])
    assert C.parse_value("3e-4") == pytest.approx(3e-4) and C.parse_value("[1, 2]") == [1, 2]
    assert C.parse_value("null") is None and C.parse_value("s3://b/x") == "s3://b/x"
    again = C.load_config(None, [f"{k}={json.dumps(v)}" for k, v in [("train.steps", 5)]])
    assert again["train"]["steps"] == 5


def test_training_columns_drop_errors_and_ids_are_stable():
    import numpy as np

    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "source": np.array(["s0.tar", "s0.tar", "s1.tar"], dtype=object),
        "image": np.zeros((3, 4, 4, 3), np.uint8),
        "label": np.array([1, -1, 2]),
        "error": np.array([None, "corrupt image: x", None], dtype=object),
    }
    out = train_data.to_training_columns(batch)
    assert out["image"].shape[0] == 2 and out["label"].tolist() == [1, 2]
    assert out["sample_id"].tolist() == train_data.sample_ids(["a", "c"], ["s0.tar", "s1.tar"]).tolist()
    assert len(set(train_data.sample_ids(["a", "a"], ["s0.tar", "s1.tar"]).tolist())) == 2  # keys repeat across shards


@pytest.mark.parametrize("name", ["demo", "cifar10", "cifar10-vit", "imagenet-paper", "imagenet-sample-mobilenet"])
def test_shipped_configs_resolve(name):
    cfg = C.load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
    ObjectiveConfig(**cfg["objective"])
    assert cfg["name"] == name and cfg["target"]["spec"]
    if name == "imagenet-paper":
        assert cfg["data"]["train"].startswith("s3://YOUR-BUCKET/")
        assert cfg["train"]["batch_size"] == 32 and cfg["run"]["gpus"] and cfg["explainer"]["blocks"] == [4, 11, 17, 23]
    if name == "imagenet-sample-mobilenet":  # a model file spec resolves like a path; its layers exist
        file, _, callable_name = cfg["target"]["spec"].rpartition(":")
        assert Path(file).is_absolute() and callable_name == "MobileNetV1"
        assert cfg["data"]["holdout_every"] == 5 and cfg["target"]["background_logit"]
        assert train_data.training_read_size(cfg["data"]) == ((183, 183), 1.0)
    if name == "cifar10-vit":  # the kwargs must be the ones benchmarks/train_vit.py trains with
        from benchmarks.train_vit import KWARGS, MEAN, SPEC, STD

        assert (cfg["target"]["spec"], cfg["target"]["kwargs"]) == (SPEC, KWARGS)
        assert tuple(cfg["target"]["mean"]) == MEAN and tuple(cfg["target"]["std"]) == STD


def test_init_from_loads_only_the_same_explainer_for_the_same_target():
    """train.init_from on the real shipped ViT explainer: its weights load; another explainer config,
    another target's weights, a missing name are refused, naming what differs."""
    from l2r.artifact import load_artifact, resolve_explainer, start_from
    from l2r.explainer import build_explainer
    from l2r.target_spec import TargetMismatchError, TargetSpec

    shipped, target, record, _ = load_artifact(resolve_explainer("cifar10-vit"))
    fresh = build_explainer({k: v for k, v in shipped.config.items() if k != "embed_dim"}, target)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), shipped.state_dict().values()))
    start_from(fresh, "cifar10-vit", record)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in shipped.state_dict().items())

    wider = build_explainer({**shipped.config, "dim": 32, "embed_dim": 32}, target)
    with pytest.raises(ValueError, match=r"cifar10-vit \(train.init_from\).*dim: 64 there, 32 here"):
        start_from(wider, "cifar10-vit", record)
    other = TargetSpec.from_dict({**record.to_dict(), "checkpoint": None, "random_init": True, "weights_sha256": None})
    other_target = other.build()
    with pytest.raises(TargetMismatchError, match="weights sha256"):
        start_from(build_explainer(dict(shipped.config), other_target), "cifar10-vit", other)
    with pytest.raises(FileNotFoundError, match="no-such-explainer"):
        train_artifact.initial_explainer({"train": {"init_from": "no-such-explainer"}}, None)


# ---------------------------------------------------------------- shared tiny data + target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic shards and a fitted target written once; runs point at them (no regeneration)."""
    root = tmp_path_factory.mktemp("train")
    cfg = C.load_config(DEMO, TINY, {"storage": str(root), "name": "prep"})
    cfg["run_dir"] = str(root / "prep")
    train_spec, val_spec = demo_inputs.prepare_synthetic(cfg)
    checkpoint = demo_inputs.fit_target(cfg, expand_urls(train_spec))
    sets = TINY + [f"data.train={train_spec}", f"data.val={val_spec}", f"target.checkpoint={checkpoint}"]
    return {"root": root, "sets": sets, "checkpoint": checkpoint}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_keys(path):
    """[(step, sample id)] in the order written, split into attempts where the step goes back."""
    attempts, last = [[]], -1
    for line in Path(path).read_text().splitlines():
        step, sample = (int(x) for x in line.split("\t"))
        if step < last:
            attempts.append([])
        attempts[-1].append((step, sample))
        last = step
    return attempts


# ---------------------------------------------------------------- Ray Train, in-process Ray


@pytest.fixture(scope="module")
def failing_run(tiny, ray_local):
    """2 CPU workers (gloo); rank 1 raises at step 12; restarted from the step-8 checkpoint; 24 steps."""
    cfg = C.load_config(DEMO, tiny["sets"] + [
        "debug.fail_at_step=12", "debug.fail_rank=1", "debug.record_keys=true", "run.max_failures=1",
        "data.holdout_every=4", "data.augment={crop_scale: [0.5, 1.0], flip: true}",
    ], {"storage": str(tiny["root"]), "name": "two", "workers": 2, "steps": 24, "batch_size": 4,
        "checkpoint_every": 8, "val_every": 12})
    started = time.perf_counter()
    artifact = T.run(cfg, verbose=False)
    return {"cfg": cfg, "artifact": artifact, "run_dir": tiny["root"] / "two", "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_two_workers_disjoint_data_and_loss_decreases(failing_run):
    run_dir = failing_run["run_dir"]
    rank0, rank1 = read_keys(run_dir / "keys" / "rank0.txt"), read_keys(run_dir / "keys" / "rank1.txt")
    for a0, a1 in zip(rank0, rank1):  # each attempt: the two workers never share a sample
        ids0, ids1 = {i for _, i in a0}, {i for _, i in a1}
        assert ids0 and ids1 and not ids0 & ids1
        assert len(ids0) == len(a0) and len(ids1) == len(a1)  # and no repeats within an epoch
    # data.holdout_every=4: no worker ever trains on a held-back sample (1 in 4 of every shard).
    held = set()
    for url in expand_urls(failing_run["cfg"]["data"]["train"]):
        rows = list(iter_shard(url, 16, holdout_every=4, part="holdout"))
        held |= set(train_data.sample_ids([r["key"] for r in rows], [r["source"] for r in rows]).tolist())
    trained = {i for attempt in rank0 + rank1 for _, i in attempt}
    assert len(held) == 64 and trained and not trained & held
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.02, [round(m["loss"], 3) for m in metrics]
    assert metrics[-1]["images_per_s"] > 0 and 0 < metrics[-1]["lr"] < 3e-3
    final = metrics[-1]
    assert 0 <= final["val_deletion_auc"] < final["val_insertion_auc"] <= 1


@pytest.mark.slow
def test_worker_failure_resumes_from_checkpoint_with_continuous_steps(failing_run):
    run_dir = failing_run["run_dir"]
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    # Attempt 1 reports 4, 8 (checkpoint), 12, then rank 1 fails; attempt 2 restarts at 8.
    assert steps == [4, 8, 12, 12, 16, 20, 24], steps
    attempts = read_keys(run_dir / "keys" / "rank0.txt")
    assert len(attempts) == 2
    assert attempts[0][0][0] == 0 and attempts[0][-1][0] >= 11
    assert [s for s, _ in attempts[1]][::4] == list(range(8, 24))  # 4 images a step, continuous
    _, _, _, metadata = load_artifact(failing_run["artifact"])
    assert metadata["steps"] == 24 and metadata["workers"] == 2
    assert metadata["data"]["holdout_every"] == 4 and metadata["data"]["augment"]["crop_scale"] == [0.5, 1.0]
    assert len(metadata["data"]["shards"]) == 4 and len(metadata["data"]["sha256"]) == 64
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_rerun_with_same_name_resumes_where_it_stopped(failing_run, capsys):
    cfg = failing_run["cfg"]
    # The rerun also reads its data materialized (decoded once into the object store): same order, same skip.
    cfg = {**cfg, "train": {**cfg["train"], "steps": 28}, "run": {**cfg["run"], "workers": 1},
           "debug": {**cfg["debug"], "fail_at_step": None}, "data": {**cfg["data"], "materialize": True}}
    T.run(cfg, verbose=True)
    rows = sum(1 for url in expand_urls(cfg["data"]["train"])  # the training part of the holdout rule
               for _ in iter_shard(url, cfg["data"]["image_size"], holdout_every=cfg["data"]["holdout_every"], part="train"))
    assert f"training data materialized: {rows} rows" in capsys.readouterr().out
    run_dir = failing_run["run_dir"]
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps[-1] == 28 and steps[-2] == 24  # no step repeated: continued from the step-24 checkpoint
    keyed_steps = [s for attempt in read_keys(run_dir / "keys" / "rank0.txt") for s, _ in attempt]
    assert keyed_steps[-16:][::4] == [24, 25, 26, 27]
    explainer, target, _, metadata = load_artifact(failing_run["artifact"])
    assert metadata["steps"] == 28


@pytest.mark.slow
def test_fine_tune_starts_from_an_artifact_and_records_it(failing_run, tiny):
    """train.init_from: at lr 0 the fine-tuned artifact's parameters are the start's, exactly (a fresh
    build would be random), and the artifact records what it started from."""
    start = failing_run["artifact"]
    cfg = C.load_config(DEMO, tiny["sets"] + [f"train.init_from={start}", "train.lr=0.0", "objective.tau_start=0.5"],
                        {"storage": str(tiny["root"]), "name": "fine", "steps": 4, "batch_size": 4, "val_every": 0})
    explainer, _, _, metadata = load_artifact(T.run(cfg, verbose=False))
    started, *_ = load_artifact(start)
    tuned = dict(explainer.named_parameters())  # parameters only: BatchNorm statistics move even at lr 0
    assert all(torch.equal(tuned[k], v) for k, v in started.named_parameters())
    assert metadata["steps"] == 4
    assert metadata["init_from"]["explainer"] == start and metadata["init_from"]["steps"] >= 24
    assert len(metadata["init_from"]["weights_sha256"]) == 64
    mismatched = C.load_config(DEMO, tiny["sets"] + [f"train.init_from={start}", "target.mean=[0.1,0.1,0.1]"],
                               {"storage": str(tiny["root"]), "name": "fine-other", "steps": 4})
    with pytest.raises(Exception, match="train.init_from.*mean"):
        T.run(mismatched, verbose=False)


# ---------------------------------------------------------------- `ray job submit` on a head of our own


@pytest.fixture
def ray_head(another_ray):
    """A Ray head of our own (free ports, its own temp dir, a dashboard for `ray job submit`)."""
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the head's processes")
    head = RayNode(ROOT, cpus=4, dashboard=True)
    try:
        deadline = time.time() + 180  # a loaded 2-core machine can take minutes
        while time.time() < deadline:
            head.check_running()
            ready = subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=head.env,
                                   capture_output=True, timeout=60)
            if ready.returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError("Ray head did not come up in 180 s")
        yield {"address": head.dashboard, "env": head.env}
    finally:
        head.kill()


@pytest.mark.slow
def test_ray_job_submit_trains_and_writes_loadable_artifact(tiny, ray_head, tmp_path):
    storage = tmp_path / "runs"
    overrides = [arg for s in tiny["sets"] for arg in ("--set", s)]
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["address"],
               "--working-dir", ".", "--", "python", "jobs/train.py", "--config", "jobs/configs/demo.yaml",
               "--storage", str(storage), "--name", "submitted", "--steps", "4", "--batch-size", "4",
               "--checkpoint-every", "2", "--val-every", "4", *overrides]
    done = subprocess.run(command, cwd=ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    artifact = storage / "submitted" / "explainer"
    assert f"explainer artifact: {artifact}" in output
    # The job log reads like a local run: the driver's progress line, no per-report dumps.
    assert re.search(r"train: step 4/4 \(100%\).*ETA", output), output[-3000:]
    assert "Reporting training result" not in output
    explainer, target, _, metadata = load_artifact(artifact)
    assert metadata["steps"] == 4 and len(metadata["target"]["weights_sha256"]) == 64
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        maps = explainer(images, target(images).argmax(1))
    assert maps.shape == (2, 1, 16, 16) and torch.isfinite(maps).all()
    assert not math.isnan(float(maps.std()))


@pytest.mark.slow
def test_a_saved_config_loads_back_and_runs_again(failing_run):
    """The run's config.yaml holds the user's keys only (what the driver derived is in run.json), so
    `jobs/train.py --config <run>/config.yaml --name again --steps 2` runs it again."""
    import yaml

    from jobs.train import main

    run_dir = failing_run["run_dir"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(saved) <= set(C.DEFAULTS) and saved["name"] == "two"
    derived = json.loads((run_dir / "run.json").read_text())
    assert derived["run_dir"] == str(run_dir) and len(derived["data_identity"]["sha256"]) == 64
    assert derived["val_urls"] and isinstance(derived["resolved"]["run.cpus_per_worker"], (int, float))
    artifact = main(["--config", str(run_dir / "config.yaml"), "--name", "again", "--steps", "2"])
    assert artifact == f"{failing_run['cfg']['run']['storage']}/again/explainer"
    _, _, _, metadata = load_artifact(artifact)
    assert metadata["steps"] == 2 and metadata["run_name"] == "again"
    assert metadata["data"]["sha256"] == derived["data_identity"]["sha256"]  # the same data, read back


def test_an_unknown_config_key_is_one_line_naming_key_and_file(tmp_path, capsys):
    """A config holding a key the config does not have (as configs saved before run.json did: run_dir)."""
    from jobs.train import main

    old = tmp_path / "old.yaml"
    old.write_text("name: demo\nrun_dir: /somewhere/demo\ntrain: {steps: 2}\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(old)])
    message = str(stopped.value.code)
    assert message.startswith(f"error: {old}: unknown config key 'run_dir'") and "\n" not in message
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(DEMO), "--set", "train.stpes=3"])
    assert str(stopped.value.code).startswith("error: --set: unknown config key 'train.stpes'")
