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
def ray_tmpdir(another_ray):
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


# The jobs' own local Ray (no address, no `ray start` cluster), run as a job runs it; it prints its
# dashboard address and stays up until the test closes its stdin.
JOBS_LOCAL_RAY = """
import sys, ray
from pipeline.ray_connect import init_ray
init_ray(num_cpus=1, logging_level="ERROR", log_to_driver=False)
print("dashboard", ray._private.worker.get_dashboard_url(), flush=True)
sys.stdin.read()
ray.shutdown()
"""
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
RAY = str(Path(sys.executable).parent / "ray")


def test_the_jobs_local_ray_refuses_an_unauthenticated_job_submission(ray_tmpdir, tmp_path):
    """As a user runs a job (RAY_AUTH_MODE unset, no token yet): Ray generates a token and its job API
    refuses a submission without it, so another program on the machine cannot run code there."""
    home, other_home = tmp_path / "home", tmp_path / "other"
    home.mkdir(), other_home.mkdir()
    user = {k: v for k, v in ray_env().items() if k not in AUTH_VARIABLES}
    user.update(HOME=str(home), RAY_TMPDIR=str(ray_tmpdir))
    log = open(tmp_path / "job.log", "w+")
    job = subprocess.Popen([sys.executable, "-c", JOBS_LOCAL_RAY], cwd=ROOT, env=user, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = job.stdout.readline()
        log.seek(0)
        assert line.startswith("dashboard "), log.read()[-3000:]
        address = "http://" + line.split()[1].removeprefix("http://")
        assert (home / ".ray" / "auth_token").stat().st_size > 0  # generated as Ray does, nothing set up

        witness = tmp_path / "ran"
        other = {**user, "HOME": str(other_home)}  # another program of the machine: no token
        submit = subprocess.run([RAY, "job", "submit", "--address", address, "--", "touch", str(witness)],
                                env=other, capture_output=True, text=True, timeout=180)
        assert submit.returncode != 0
        assert "Authentication required" in submit.stdout + submit.stderr, (submit.stdout + submit.stderr)[-3000:]
        guessed = {**other, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
        wrong = subprocess.run([RAY, "job", "list", "--address", address], env=guessed, capture_output=True,
                               text=True, timeout=180)
        assert wrong.returncode != 0 and "invalid or incorrect" in wrong.stdout + wrong.stderr
        # The user's own CLI with the generated token is let in.
        mine = subprocess.run([RAY, "job", "list", "--address", address], env={**user, "RAY_AUTH_MODE": "token"},
                              capture_output=True, text=True, timeout=180)
        assert mine.returncode == 0, (mine.stdout + mine.stderr)[-3000:]
        assert not witness.exists()
    finally:
        job.stdin.close()
        try:
            job.wait(timeout=60)
        except subprocess.TimeoutExpired:
            job.kill()
        log.close()


def test_a_local_ray_without_token_authentication_is_warned_about(monkeypatch, capsys):
    started = []
    fake_ray = type(sys)("ray")
    fake_ray.init = lambda **kwargs: started.append(kwargs)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from pipeline.ray_connect import init_ray

    assert init_ray("local", num_cpus=1) is False
    assert started == [{"address": "local", "num_cpus": 1}]
    assert "RAY_AUTH_MODE=disabled" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    init_ray("local", num_cpus=1)
    assert "RAY_AUTH_MODE" not in capsys.readouterr().err
