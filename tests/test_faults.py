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


def kill_new(name: str, before: set) -> int | None:
    """SIGKILL, as the kernel's out-of-memory killer sends it, a process whose command line has ``name``
    (Ray names a worker's process after its actor) and that was not there ``before``; its pid, or None."""
    pids = [pid for pid in processes_mentioning(name) if pid not in before]
    if pids:
        os.kill(pids[0], signal.SIGKILL)
    return pids[0] if pids else None


def keys_once(assets, output, methods):
    rows = att.read_results(str(output)).to_pylist()
    seen = [(r["source"], r["key"], r["method"]) for r in rows]
    assert len(seen) == len(set(seen)), "a key was written twice"
    assert {(s, k) for s, k, _ in seen} == expected_keys(assets, ALL_SHARDS)
    assert len(seen) == len(methods) * len(expected_keys(assets, ALL_SHARDS))


@pytest.mark.slow
def test_an_attribution_actor_killed_mid_batch_is_restarted_and_its_batches_redone(ray_local, assets, tmp_path):
    output = tmp_path / "out"
    lines = []
    cfg = config(assets, output, methods="l2r,random", batch_size=2)
    thread, result = run_in_thread(att.run_attribution, cfg, log=lines.append)
    killed = None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        # This run's actor (it records its pid when it starts), once its first batches are written.
        started = sorted((output / "actors").glob("*.json")) if (output / "actors").exists() else []
        if started and (output / "parts").exists() and list((output / "parts").rglob("*.parquet")):
            killed = json.loads(started[0].read_text())["pid"]
            os.kill(killed, signal.SIGKILL)  # what the kernel's out-of-memory killer sends
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, f"no actor to kill while the job ran: {result}"
    assert "error" not in result, result.get("error")
    keys_once(assets, output, ["l2r", "random"])
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["actor_restarts_this_run"] >= 1, manifest["counts"]
    assert any("were restarted" in line for line in lines), lines
    assert not (output / "parts").exists() or not list((output / "parts").rglob("*"))  # no part left behind


# ---------------------------------------------------------------- an object store failing for a while


class FlakyFilesystem:
    """An fsspec filesystem whose calls fail for a while: of its first calls, a seeded share raise
    ConnectionError (``where="call"``) or, for writes, fail when the upload completes (``where="close"``),
    until ``failures`` have failed; then it is the real filesystem behind it."""

    CALLS = ("open", "exists", "ls", "rm", "info", "cat_file")

    def __init__(self, inner, failures: int, share: float = 0.5, where: str = "call", seed: int = 0):
        import random

        self.inner, self.left, self.share, self.where = inner, failures, share, where
        self.random = random.Random(seed)
        self.failed = self.calls = 0

    def _fail_now(self) -> bool:
        if self.left > 0 and self.random.random() < self.share:
            self.left -= 1
            self.failed += 1
            return True
        return False

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name not in self.CALLS:
            return attribute

        def call(*args, **kwargs):
            self.calls += 1
            writing = name == "open" and "w" in (args[1] if len(args) > 1 else kwargs.get("mode", "rb"))
            if self.where == "close" and writing:
                f = attribute(*args, **kwargs)
                if self._fail_now():
                    def interrupted():  # the upload never completes; once (__del__ closes again)
                        f.discard()
                        f.close = lambda: None
                        raise ConnectionError("injected: upload interrupted")

                    f.close = interrupted
                return f
            if self.where == "call" and self._fail_now():
                raise ConnectionError(f"injected: {name} failed")
            return attribute(*args, **kwargs)

        return call


def test_an_object_store_failing_calls_for_a_while_is_retried_then_named(s3_server, monkeypatch):
    from l2r import storage

    fs, _ = s3_server
    monkeypatch.setattr(storage, "RETRY_FIRST_WAIT_S", 0.01)
    fs.mkdir("flaky")
    flaky = FlakyFilesystem(fs, failures=8, share=0.5)
    url = "s3://flaky/run/parts/a.parquet"
    storage.write_bytes(url, b"x" * 5000, filesystem=flaky)
    storage.write_json("s3://flaky/run/done/a.json", {"rows": 3}, filesystem=flaky)
    assert storage.read_bytes(url, filesystem=flaky) == b"x" * 5000
    assert storage.read_json("s3://flaky/run/done/a.json", filesystem=flaky) == {"rows": 3}
    assert storage.exists(url, filesystem=flaky)
    assert storage.listing("s3://flaky/run/parts", filesystem=flaky) == [url]
    storage.remove("s3://flaky/run/parts", recursive=True, filesystem=flaky)
    assert not fs.exists("flaky/run/parts/a.parquet")
    assert flaky.failed >= 4, flaky.failed  # failures happened and were absorbed

    # Uploads that break at the end: retried, and the object is whole.
    closing = FlakyFilesystem(fs, failures=2, share=1.0, where="close")
    storage.write_bytes("s3://flaky/run/parquet/b.parquet", b"y" * 7000, filesystem=closing)
    assert closing.failed == 2 and fs.cat("flaky/run/parquet/b.parquet") == b"y" * 7000

    # A store that stays down: a bounded number of tries, then an error naming the URL; the committed
    # file keeps its earlier content (never half a file).
    down = FlakyFilesystem(fs, failures=10**6, share=1.0, where="close")
    with pytest.raises(storage.StorageUnavailable, match=r"writing s3://flaky/run/parquet/b\.parquet: failed 5 times"):
        storage.write_bytes("s3://flaky/run/parquet/b.parquet", b"z" * 9000, filesystem=down)
    assert down.failed == storage.RETRY_ATTEMPTS
    fs.invalidate_cache()
    assert fs.cat("flaky/run/parquet/b.parquet") == b"y" * 7000
    # Not transient: not retried.
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://flaky/run/absent.json", filesystem=FlakyFilesystem(fs, failures=0))


def test_the_s3_server_stopped_and_restarted_mid_write(monkeypatch):
    """The real loopback S3 server goes away and comes back on its port: the write waits it out."""
    from moto.server import ThreadedMotoServer

    s3fs = pytest.importorskip("s3fs")
    from l2r import storage
    from tests.conftest import free_port

    monkeypatch.setattr(storage, "RETRY_FIRST_WAIT_S", 0.25)  # 0.25 + 0.5 + 1 + 2 s of waits at most
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries of a call, as botocore's below
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # botocore tries once per call: the retries under test are the storage helper's own.
    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 2},
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    try:
        s3fs.S3FileSystem(**options).mkdir("restart")
        storage.write_bytes("s3://restart/manifest.json", b"first", options)
        server.stop()
        restarted = threading.Timer(1.0, server.start)
        restarted.start()
        storage.write_bytes("s3://restart/manifest.json", b"second", options)  # while the server is down
        restarted.join()
        assert storage.read_bytes("s3://restart/manifest.json", options) == b"second"

        server.stop()  # now for good
        with pytest.raises(storage.StorageUnavailable, match=r"writing s3://restart/manifest\.json: failed 5 times"):
            storage.write_bytes("s3://restart/manifest.json", b"third, never committed", options)
        server.start()
        assert storage.read_bytes("s3://restart/manifest.json", options) == b"second"
    finally:
        server.stop()


# ---------------------------------------------------------------- a full disk under a local --output


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs of the test's own (needs the right to mount, as root in CI and here)."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem is full."""
    import errno

    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


@pytest.mark.slow
def test_a_full_disk_under_the_output_is_named_keeps_finished_shards_and_a_rerun_completes(ray_local, assets,
                                                                                             small_disk):
    output = small_disk / "out"
    cfg = config(assets, output, methods="l2r,random", batch_size=2)
    filled = []

    def log(line):  # the driver logs each committed shard: the disk fills up after the first one
        if "] train-0000:" in line and not filled:
            filled.append(fill(small_disk))

    with pytest.raises(OSError, match=r"No space left on device") as raised:
        att.run_attribution(cfg, log=log)
    assert filled, "the disk was never filled: the test did not test a full disk"
    assert str(output) in str(raised.value)
    assert (output / "done" / "train-0000.json").exists() and (output / "parquet" / "train-0000.parquet").exists()

    filled[0].unlink()  # space again
    summary = att.run_attribution(cfg, log=lambda line: None)
    assert summary["shards_skipped"] >= 1 and summary["shards_skipped"] + summary["shards_done"] == 4
    keys_once(assets, output, ["l2r", "random"])
    assert not list(output.rglob(".*.tmp-*"))  # no temporary file left behind


# ---------------------------------------------------------------- the driver killed while a shard is merged


@pytest.mark.slow
def test_the_driver_killed_while_a_shard_is_merged_then_a_rerun_gives_each_key_once(ray_local, assets, tmp_path):
    import shutil
    import subprocess
    import sys
    import tempfile

    from jobs.attribute import main
    from tests.ray_nodes import ray_env
    from tests.test_attribute import job_args

    output = tmp_path / "out"
    ray_tmpdir = tempfile.mkdtemp(prefix="l2rkd_", dir="/tmp")  # the driver's own Ray, found and ended below
    log = open(tmp_path / "driver.log", "w+")
    # One actor: the driver's own Ray has the machine's 2 CPUs, and its read tasks need one.
    args = job_args(assets, output, methods="l2r,random", extra=("--actors", "1"))
    driver = subprocess.Popen([sys.executable, "jobs/attribute.py", *args], cwd=Path(__file__).resolve().parents[1],
                              env={**ray_env(), "RAY_TMPDIR": ray_tmpdir}, stdout=log, stderr=subprocess.STDOUT)
    merging = None
    try:
        deadline = time.time() + 240
        while merging is None and driver.poll() is None and time.time() < deadline:
            merging = next(iter(processes_mentioning("ray::merge_parts")), None)
            time.sleep(0.002)
        if merging is not None:
            driver.kill()  # SIGKILL, while a merge task runs
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in processes_mentioning(ray_tmpdir):  # what of the driver's Ray outlived it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        text = log.read()
        log.close()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert merging is not None, f"the job ended before a merge was seen:\n{text[-3000:]}"
    assert driver.returncode == -signal.SIGKILL
    finished = {p.stem for p in (output / "done").glob("*.json")} if (output / "done").exists() else set()
    assert len(finished) < 4, "every shard was marked: the kill came too late to test anything"

    summary = main(args)
    assert summary["shards_skipped"] == len(finished) and summary["shards_done"] == 4 - len(finished)
    keys_once(assets, output, ["l2r", "random"])
    assert not (output / "parts").exists() or not list((output / "parts").rglob("*"))  # no part left behind
    assert not list(output.rglob(".*.tmp-*"))  # nor a half-written file


# ---------------------------------------------------------------- a training worker killed between checkpoints


@pytest.mark.slow
def test_a_training_worker_killed_between_checkpoints_resumes_from_the_last_one(ray_local, tmp_path):
    from pipeline import config as C
    from pipeline import train as T
    from tests.test_train import DEMO, TINY

    sets = TINY + ["run.max_failures=1", "train.report_every=2"]
    HEALTH_CHECK_S = 2.0  # Ray Train V2's DEFAULT_HEALTH_CHECK_INTERVAL_S
    cfg = C.load_config(DEMO, sets, {"storage": str(tmp_path), "name": "killed", "workers": 1, "steps": 24,
                                     "batch_size": 4, "checkpoint_every": 8, "val_every": 0})
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    before = set(processes_mentioning("RayTrainWorker"))  # other tests' workers: not this run's
    thread, result = run_in_thread(T.run, cfg, verbose=False)

    def steps():
        try:
            return [json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    killed, last_checkpoint, checkpoint_seen = None, None, None
    deadline = time.time() + 400
    while killed is None and thread.is_alive() and time.time() < deadline:
        reported = steps()
        if reported and reported[-1] % 8 == 0 and reported[-1] != last_checkpoint:
            last_checkpoint, checkpoint_seen = reported[-1], time.time()
        # Between two checkpoints, once Ray Train has taken the last one in: its controller collects a
        # worker's reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s); a checkpoint reported less
        # than that before the worker dies is not registered, and the run resumes from the one before.
        if (last_checkpoint and reported[-1] % 8 and reported[-1] < 20
                and time.time() - checkpoint_seen > 2 * HEALTH_CHECK_S):
            killed = kill_new("RayTrainWorker", before)
        time.sleep(0.1)
    thread.join(timeout=400)
    assert killed is not None, f"no worker killed between checkpoints (reported {steps()}): {result}"
    assert "error" not in result, result.get("error")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    assert metrics[-1]["step"] == 24
    resumed = {m["resumed_from"] for m in metrics} - {0}
    assert resumed == {last_checkpoint}, [(m["step"], m["resumed_from"]) for m in metrics]
    # The restarted worker went on from the checkpoint's step, not from the start.
    first_resumed = next(i for i, m in enumerate(metrics) if m["resumed_from"])
    assert metrics[first_resumed]["step"] == last_checkpoint + 2
    from l2r.artifact import load_artifact

    _, _, _, metadata = load_artifact(result["value"])
    assert metadata["steps"] == 24
