"""A shared local Ray instance for tests (import ``ray_local`` into a conftest or test module), and
another Ray on the machine that every Ray test runs beside."""

import shutil
import socket
import tempfile
import time

import pytest

# `ray start --head`'s own defaults (GCS, dashboard and job API, client server): where a user's Ray
# on the machine would be.
RAY_DEFAULT_PORTS = {"port": 6379, "dashboard-port": 8265, "ray-client-server-port": 10001}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="session")
def another_ray():
    """A `ray start --head` of the suite's own that runs beside every Ray test, on Ray's default ports
    where they are free (as a user's Ray would be), with its own temp dir: the tests must ask for free
    ports and must not join it (the suite's RAY_TMPDIR is its own, see tests/conftest.py, so its address
    file is not the one jobs read). Stopped by its own processes only, never `ray stop`."""
    pytest.importorskip("ray")
    from pathlib import Path

    from pipeline.ray_connect import answers
    from tests.ray_nodes import RayNode

    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to find the other Ray's processes")
    cwd = tempfile.mkdtemp(prefix="l2rother_")
    node = RayNode(cwd, cpus=1, dashboard=True,
                   ports={k: v for k, v in RAY_DEFAULT_PORTS.items() if port_is_free(v)})
    try:
        deadline = time.time() + 120
        while not answers(node.address) or not answers(node.dashboard.removeprefix("http://")):
            node.check_running()
            if time.time() > deadline:
                raise RuntimeError("the other Ray head did not come up in 120 s")
            time.sleep(0.5)
        yield node
    finally:
        node.kill()
        shutil.rmtree(cwd, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(another_ray):
    """One small local Ray of the tests' own for the whole session; reuses one this process started
    (safe to import twice). Never a `ray start` cluster of the machine: tests stay hermetic."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
