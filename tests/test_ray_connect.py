"""Which Ray a job joins: a `ray start` cluster that died must not hang the next job."""

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.ray_connect import answers
from tests.conftest import free_port
from tests.ray_nodes import ray_env

ROOT = Path(__file__).resolve().parents[1]


def test_answers_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert answers(f"127.0.0.1:{server.getsockname()[1]}")
    assert not answers(f"127.0.0.1:{free_port()}")
    assert not answers("not an address")


@pytest.fixture
def ray_tmpdir():
    """A Ray default temp dir of the test's own (short: Ray's socket paths have a length limit)."""
    folder = tempfile.mkdtemp(prefix="l2rrc_", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_stale_cluster_address_is_reported_and_a_local_ray_started(ray_tmpdir):
    """Ray 2.60's own `ray.init()` retries a dead recorded address for minutes; ours starts locally."""
    (ray_tmpdir / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)
    code = ("import ray; from pipeline.ray_connect import init_ray; "
            "joined = init_ray(num_cpus=3, include_dashboard=False, logging_level='ERROR'); "
            "print('joined', joined, 'cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**ray_env(), "RAY_TMPDIR": str(ray_tmpdir)},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joined False cpus 3.0" in done.stdout
    assert f"{ray_tmpdir}/ray/ray_current_cluster names a Ray cluster at {dead} that does not answer" in done.stderr
