"""Ray nodes of our own on this machine, for tests of `ray job submit` and of several nodes.

Each node is a `ray start --block` process in a new session with its own temp dir, free ports
and working directory. It is stopped by killing only its own processes (its process group,
then any process whose command line names its temp dir): `ray stop` would end every Ray on
the machine, including the in-process Ray of other tests.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")


def ray_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token authentication as everywhere (the suite's token: tests/conftest.py); the CLI sends the
    # token only with RAY_AUTH_MODE=token.
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class RayNode:
    """One Ray node: a head (``head_address=None``) or a node joining ``head_address``."""

    def __init__(self, cwd, head_address: str | None = None, cpus: int = 2, resources: dict | None = None,
                 dashboard: bool = False, ports: dict | None = None):
        """``ports``: fixed ports by option name (e.g. ``{"dashboard-port": 8265}``); the others are free ones."""
        # Short: Ray's socket paths have a length limit.
        self.temp_dir = tempfile.mkdtemp(prefix="l2rray_", dir="/tmp")
        # Its own model cache too (l2r.target_spec.fetch): a node downloads what it uses.
        self.env = {**ray_env(), "L2R_CACHE": f"{self.temp_dir}/cache"}
        # Every port `ray start` opens, each a free one: a head always starts its API server (a minimal one
        # without the dashboard) on --dashboard-port, whose default 8265 fails when another Ray holds it.
        names = ["node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port"]
        if head_address is None:
            names += ["port", "ray-client-server-port", "dashboard-port"]
        self.ports = {name: free_port() for name in names} | (ports or {})
        command = [RAY, "start", "--block", f"--num-cpus={cpus}", "--disable-usage-stats",
                   f"--temp-dir={self.temp_dir}"] + [f"--{k}={v}" for k, v in self.ports.items()]
        if resources:
            command.append(f"--resources={json.dumps(resources)}")
        if head_address is None:
            command += ["--head", f"--include-dashboard={'true' if dashboard else 'false'}",
                        "--dashboard-host=127.0.0.1"]
            self.address = f"127.0.0.1:{self.ports['port']}"
        else:
            command.append(f"--address={head_address}")
            self.address = head_address
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}" if dashboard else None
        self.log = open(Path(self.temp_dir) / "node.log", "w")
        self.process = subprocess.Popen(command, cwd=str(cwd), env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start exited: {(Path(self.temp_dir) / 'node.log').read_text()[-3000:]}")

    def kill(self, abrupt: bool = False) -> None:
        """Stop the node; ``abrupt``: SIGKILL at once, as a machine that is lost."""
        for sig in (signal.SIGKILL,) if abrupt else (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            for pid in processes_mentioning(self.temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2 if sig == signal.SIGTERM else 0)
        self.process.wait(timeout=30)
        self.log.close()


def alive_nodes(address: str, env: dict, resource: str | None = None) -> int:
    """Alive nodes of the cluster at ``address`` (with ``resource``, if given), asked from a fresh process."""
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive'] and (not sys.argv[2] or sys.argv[2] in n['Resources'])))")
    done = subprocess.run([sys.executable, "-c", code, address, resource or ""], env=env, capture_output=True,
                          text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def wait_for_nodes(address: str, env: dict, count: int, resource: str | None = None, nodes=(),
                   timeout: float = 180) -> None:
    """Until ``count`` alive nodes (with ``resource``) are in the cluster; a loaded 2-core machine can take minutes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for node in nodes:
            node.check_running()
        if alive_nodes(address, env, resource) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"{count} Ray node(s) did not come up in {timeout} s")
