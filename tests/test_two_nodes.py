"""Both jobs across two Ray nodes on this machine, all storage on S3 (moto on loopback), and a node lost.

Each node has its own temp dir, its own working directory and one unit of a custom resource
``l2r_slot``; training workers and attribution actors each ask for one unit, so with two nodes
they run one per node. Data, the target checkpoint, checkpoints, the artifact, metrics and the
attribution output are all s3:// URLs: a node that read a path local to the driver (or to the
other node) would fail, as it would on a real cluster. Then the second node is killed mid-run
and a replacement node joins: training resumes from its last checkpoint, attribution
completes, every input key exactly once.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2r.zoo.resnet20 import ResNetCifar
from l2r.shards import make_shards
from tests.ray_nodes import RayNode, ray_env, wait_for_nodes

ROOT = Path(__file__).resolve().parents[1]
SLOT = "l2r_slot"
TRAIN_SETS = [
    "data.image_size=16", "target.input_size=[16,16]", "target.fit_steps=0", "explainer.dim=16",
    "explainer.head_dim=8", "objective.k_train=8", "objective.grid_min=2", "objective.grid_max=4",
    "objective.reference=black",  # this test is about nodes and storage, not the reference mix
    "val.images=8", "val.batch_size=8", "data.read_cpus=0.25", "data.shuffle_buffer=0",
    "train.report_every=10", "run.cpus_per_worker=0.75", f"run.worker_resources={{{SLOT}: 1}}",
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(s3_server):
    """Shards and the target's weights on S3 (written from this process, as a user would upload them)."""
    fs, options = s3_server
    fs.mkdir("twonode")
    make_shards("s3://twonode/data", synthetic=96, size=16, num_classes=10, max_count=16, prefix="train",
                filesystem=fs, progress=False)
    make_shards("s3://twonode/data", synthetic=8, size=16, num_classes=10, max_count=8, prefix="val", seed=1,
                filesystem=fs, progress=False)
    torch.manual_seed(0)
    with fs.open("twonode/target.pt", "wb") as f:
        torch.save(ResNetCifar(blocks_per_stage=1, num_classes=10).state_dict(), f)
    fs.invalidate_cache()
    return fs, options


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, another_ray):
    """A head and a second node, each with 2 CPUs, one `l2r_slot` and its own working directory."""
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the nodes' processes")
    nodes = [RayNode(tmp_path_factory.mktemp("head"), cpus=2, resources={SLOT: 1})]
    try:
        nodes.append(RayNode(tmp_path_factory.mktemp("second"), nodes[0].address, cpus=2, resources={SLOT: 1}))
        wait_for_nodes(nodes[0].address, nodes[0].env, 2, SLOT, nodes)
        yield {"address": nodes[0].address, "nodes": nodes, "dirs": tmp_path_factory}
    finally:
        for node in reversed(nodes):
            node.kill()


def driver(args: list[str], cluster) -> subprocess.Popen:
    """A job's driver, as `ray job submit` would run it on the head: a process joining the cluster."""
    env = {**ray_env(), "RAY_ADDRESS": cluster["address"]}
    log = open(cluster["dirs"].mktemp("driver") / "driver.log", "w+")
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def output_of(process) -> str:
    process.log.seek(0)
    return process.log.read()


def replace_second_node(cluster) -> None:
    """Kill the node that is not the head and start a new one in its place."""
    lost = cluster["nodes"].pop()
    lost.kill(abrupt=True)
    cluster["nodes"].append(RayNode(cluster["dirs"].mktemp("replacement"), cluster["address"], cpus=2,
                                    resources={SLOT: 1}))


def wait_until(condition, process, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{output_of(process)[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout} s:\n{output_of(process)[-4000:]}")


def s3_lines(fs, path: str) -> list[dict]:
    fs.invalidate_cache()
    try:
        return [json.loads(line) for line in fs.cat(path).decode().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def test_two_nodes_train_and_attribute_on_s3_and_survive_a_lost_node(bucket, cluster):
    fs, options = bucket
    secret = json.dumps(options)

    # ---- training: 2 workers, one per node; the second node is lost after the first checkpoint
    train = driver(["jobs/train.py", "--config", "jobs/configs/demo.yaml", "--storage", "s3://twonode/runs",
                    "--name", "two", "--storage-options", secret, "--workers", "2", "--steps", "60",
                    "--batch-size", "4", "--checkpoint-every", "20", "--val-every", "60",
                    "--set", "data.train=s3://twonode/data/train-*.tar", "--set", "data.val=s3://twonode/data/val-*.tar",
                    "--set", "target.checkpoint=s3://twonode/target.pt",
                    *[arg for s in TRAIN_SETS for arg in ("--set", s)]], cluster)
    try:
        # A report at step 30 comes after the step-20 checkpoint was committed.
        wait_until(lambda: any(m["step"] >= 30 for m in s3_lines(fs, "twonode/runs/two/metrics.jsonl")), train, 400,
                   "report at step 30")
        replace_second_node(cluster)
        assert train.wait(timeout=500) == 0, output_of(train)[-5000:]
    finally:
        if train.poll() is None:
            train.kill()
    log = output_of(train)
    assert "explainer artifact: s3://twonode/runs/two/explainer" in log, log[-3000:]
    metrics = s3_lines(fs, "twonode/runs/two/metrics.jsonl")
    assert metrics[-1]["step"] == 60
    resumed = {m["resumed_from"] for m in metrics} - {0}
    # The worker group restarted from a checkpoint (not from scratch) before the end.
    assert resumed and all(r % 20 == 0 and r < 60 for r in resumed), [(m["step"], m["resumed_from"]) for m in metrics]
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the log kept up to the checkpoint, no repeats
    artifact = json.loads(fs.cat("twonode/runs/two/explainer/explainer.json"))
    assert artifact["metadata"]["steps"] == 60 and artifact["metadata"]["workers"] == 2
    config_text = fs.cat("twonode/runs/two/config.yaml").decode()
    assert "testing" not in config_text and "127.0.0.1" not in config_text  # credentials and endpoint not recorded

    # ---- attribution: actors on both nodes, the output on S3; the second node is lost after a shard
    out = "s3://twonode/attr"
    attribute = driver(["jobs/attribute.py", "--shards", "s3://twonode/data/train-*.tar", "--output", out,
                        "--explainer", "s3://twonode/runs/two/explainer", "--methods", "l2r,saliency,random",
                        "--steps", "33", "--storage-options", secret, "--actors", "2", "--actor-cpus", "0.75",
                        "--actor-resources", json.dumps({SLOT: 1}), "--batch-size", "2", "--read-cpus", "0.25",
                        "--progress-interval", "0"], cluster)
    try:
        # The actors' first part file, not the driver's first done marker: the driver can see every
        # shard's summaries in one burst, and its markers then leave no time to lose a node mid-run.
        wait_until(lambda: fs.invalidate_cache() or bool(fs.exists("twonode/attr/parts")
                                                         and fs.find("twonode/attr/parts")),
                   attribute, 400, "part file written by an actor")
        fs.invalidate_cache()
        lost_mid_run = not fs.exists("twonode/attr/done") or len(fs.ls("twonode/attr/done")) < 6
        replace_second_node(cluster)
        assert attribute.wait(timeout=500) == 0, output_of(attribute)[-5000:]
    finally:
        if attribute.poll() is None:
            attribute.kill()
    assert lost_mid_run, "attribution finished before the node was lost: the test did not test recovery"
    from pipeline.attribute import read_results

    table = read_results(out, storage_options=options)
    rows = table.to_pylist()
    per_method = {}
    for r in rows:
        per_method.setdefault(r["method"], []).append((r["source"], r["key"]))
    assert set(per_method) == {"l2r", "saliency", "random"}
    for method, keys in per_method.items():
        assert len(keys) == 96 and len(set(keys)) == 96, method  # every input key exactly once
    assert all(r["source"].startswith("s3://twonode/data/") for r in rows)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    fs.invalidate_cache()
    assert not fs.exists("twonode/attr/parts") or not fs.find("twonode/attr/parts")  # no part left behind
    manifest = json.loads(fs.cat("twonode/attr/manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"]["images_in"] == 96
    assert manifest["target"]["checkpoint"] == "s3://twonode/target.pt"
