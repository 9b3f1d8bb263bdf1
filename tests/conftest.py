"""Shared test set-up: one torch thread (Ray actors share the 2 cores), shared data paths, local Ray.

Every Ray the suite starts runs with Ray's token authentication, with a token of the suite's own
(a file in a temp dir, set here before anything imports ray): the tests never write the user's
~/.ray/auth_token and never turn authentication off.
"""
import atexit
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest_ray import another_ray, ray_local  # noqa: F401  (fixtures)

torch.set_num_threads(1)


def use_suite_token() -> None:
    """RAY_AUTH_MODE=token for this process and its children, with a token generated for this run."""
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        folder = tempfile.mkdtemp(prefix="l2rtoken_")
        atexit.register(shutil.rmtree, folder, True)
        token = Path(folder) / "auth_token"
        token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ["RAY_AUTH_MODE"] = "token"


use_suite_token()
# Ray's address file of the suite's own (pipeline/ray_connect.py reads <RAY_TMPDIR>/ray/ray_current_cluster):
# a job under test never joins a `ray start` cluster that happens to run on the machine. Short: Ray's
# socket paths under it have a length limit.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="l2rt_", dir="/tmp")
atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], True)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"


@pytest.fixture(scope="session")
def shared_cifar10():
    if not (CIFAR10 / "test-0000.tar").exists() or not RESNET20.exists():
        pytest.skip(f"shared CIFAR-10 shards or ResNet-20 not found under {SHARED} (fresh clone elsewhere)")
    return CIFAR10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on loopback: (s3fs filesystem, its storage options)."""
    server_module = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{server._port}"}}
    yield s3fs.S3FileSystem(**options), options
    server.stop()
