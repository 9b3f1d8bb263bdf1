"""Faults a long run meets, each on the real pieces (a local Ray, real files, the loopback S3 server):
an attribution actor killed as the out-of-memory killer does, an object store that fails requests
for a while, a full disk under the output, the driver killed while a shard's parts are merged, and a
training worker killed between checkpoints."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import pipeline.attribute as att
from tests.ray_nodes import processes_mentioning
from tests.test_attribute import assets, config, expected_keys  # noqa: F401  (assets: a fixture)

ALL_SHARDS = [f"train-{i:04d}" for i in range(4)]


def run_in_thread(function, *args, **kwargs):
    """``function`` in a thread; returns (thread, result dict with "value" or "error")."""
    result = {}

    def target():
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001  (reported to the test)
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def keys_once(assets, output, methods):
    rows = att.read_results(str(output)).to_pylist()
    seen = [(r["source"], r["key"], r["method"]) for r in rows]
    assert len(seen) == len(set(seen)), "a key was written twice"
    assert {(s, k) for s, k, _ in seen} == expected_keys(assets, ALL_SHARDS)
    assert len(seen) == len(methods) * len(expected_keys(assets, ALL_SHARDS))


def test_an_attribution_actor_killed_mid_batch_is_restarted_and_its_batches_redone(ray_local, assets, tmp_path):
    output = tmp_path / "out"
    lines = []
    cfg = config(assets, output, methods="l2r,random", batch_size=2)
    thread, result = run_in_thread(att.run_attribution, cfg, log=lines.append)
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        parts = list((output / "parts").rglob("*.parquet")) if (output / "parts").exists() else []
        actors = processes_mentioning("AttributionWorker")
        if parts and actors:
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)  # what the kernel's out-of-memory killer sends
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, f"no actor to kill while the job ran: {result}"
    assert "error" not in result, result.get("error")
    keys_once(assets, output, ["l2r", "random"])
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["actor_restarts_this_run"] >= 1, manifest["counts"]
    assert any("was restarted" in line for line in lines), lines
    assert not (output / "parts").exists() or not list((output / "parts").rglob("*"))  # no part left behind
