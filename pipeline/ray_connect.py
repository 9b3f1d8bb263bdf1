"""Which Ray a job runs on; the one place that calls `ray.init` for the jobs.

An address given (`--address`, or RAY_ADDRESS as `ray job submit` sets it) is joined. With none,
Ray's own rule joins the latest `ray start` cluster of this machine, read from its address file
(`<RAY_TMPDIR or TMPDIR or /tmp>/ray/ray_current_cluster`). That file outlives its cluster, and
`ray.init` on a dead address retries the GCS for many minutes without an error (seen with Ray
2.60: over 5 min), so a recorded cluster that does not answer is reported and a new local
instance is started instead.

A new local instance keeps Ray's token authentication (Ray 2.60 turns it on for `ray.init` and
writes a token to ~/.ray/auth_token when there is none): its dashboard and job API answer only
requests that carry the token, so another program on the machine cannot submit code to it.
"""

import os
import socket
import sys
from pathlib import Path


def address_file() -> Path:
    """Where `ray start` records the latest cluster (Ray's rule for its default temp dir)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray" / "ray_current_cluster"


def recorded_cluster() -> str | None:
    """The address in the address file, or None when there is none."""
    try:
        text = address_file().read_text().strip()
    except OSError:
        return None
    return text or None


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def init_ray(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
             **kwargs) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS, or the recorded live one), else start a local Ray.

    ``num_cpus``/``num_gpus`` size a new local instance only: a joined cluster's resources are
    its own. Returns True when it joined a running cluster.
    """
    import ray  # here: importing the jobs' modules stays cheap

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    elif address is None:
        recorded = recorded_cluster()
        if recorded is not None and answers(recorded):
            address = recorded
        elif recorded is not None:
            print(f"warning: {address_file()} names a Ray cluster at {recorded} that does not answer "
                  f"(a stopped `ray start`); starting a local Ray instead (set RAY_ADDRESS to join a cluster)",
                  file=sys.stderr, flush=True)
    if address is not None:
        ray.init(address=address, **kwargs)
        return True
    resources = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
    _checkout_on_workers_path()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print("warning: RAY_AUTH_MODE=disabled: this local Ray's job API will run code sent by anyone who can "
              "reach its dashboard port; unset RAY_AUTH_MODE to keep Ray's token authentication",
              file=sys.stderr, flush=True)
    ray.init(address="local", **resources, **kwargs)
    return False


def _checkout_on_workers_path() -> None:
    """The jobs' own code (`pipeline`) is not installed: the workers of a local Ray import it from this
    checkout, whatever the current directory (Ray adds only the driver's directory; the workers
    inherit the driver's environment). A joined cluster gets it from `ray job submit --working-dir`."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
