"""Deployment files: `cluster.yaml` (Ray cluster launcher, AWS) and the KubeRay RayJobs in deploy/kuberay.

Offline: nothing here reaches AWS, Kubernetes or the network (sockets are refused while each test
runs), and nothing starts Ray. The job entry points are imported only to parse their command lines.
"""

import argparse
import copy
import importlib.util
import re
import shlex
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOBS = {
    "train": ROOT / "deploy" / "kuberay" / "rayjob-train.yaml",
    "attribute": ROOT / "deploy" / "kuberay" / "rayjob-attribute.yaml",
}
# "l2r[extra,...] @ git+https://github.com/OWNER/l2r@REF": the project at a fixed ref.
PROJECT_PIN = re.compile(r"l2r\[([A-Za-z0-9_,-]+)\] @ git\+https://github\.com/([^/\s\"']+)/l2r@([^\s\"']+)")
CUDA_IMAGE = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-cu12\d")
CPU_IMAGE = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py311")
REAL_PARSE_ARGS = argparse.ArgumentParser.parse_args


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail any test here that opens a network connection (the launcher checks must not call AWS)."""

    def refuse(*args, **kwargs):
        raise AssertionError("tests/test_deploy.py must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def pinned_ray_version() -> str:
    """Ray's version in scripts/constraints.txt, the known-good set the project is tested with."""
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        match = re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", line.split("#")[0].strip())
        if match:
            return match.group(2)
    raise AssertionError("scripts/constraints.txt does not pin ray")


def project_extras() -> set:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def launcher_validate(cfg: dict) -> dict:
    """What `ray up` checks before it talks to the cloud, run offline; returns the prepared config.

    `prepare_config` merges the provider's defaults (for `type: aws` a YAML file inside the wheel,
    ray/autoscaler/aws/defaults.yaml: no boto3 call), merges setup commands, checks the docker
    section and fills per-type worker bounds. `validate_config` then checks the result against
    ray/autoscaler/ray-schema.json (jsonschema) and its cross-field rules (head type, min/max).
    The AWS-specific `bootstrap_config` step, which calls EC2/IAM, is deliberately not run.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))  # prepare_config edits node types in place
    validate_config(prepared)
    return prepared


# ------------------------------------------------------------------ cluster.yaml


@pytest.fixture(scope="module")
def cluster():
    return load_yaml(CLUSTER)


def test_cluster_yaml_passes_ray_launcher_validation(cluster):
    prepared = launcher_validate(cluster)
    assert prepared["cluster_name"] == "l2r"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"] == "us-west-2"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"].get("CPU", 1) != 0  # the head takes CPU work
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert len(workers) == 1
    assert workers[0]["min_workers"] == 0 and 1 <= workers[0]["max_workers"] <= prepared["max_workers"]
    for node_type in types.values():  # S3 through an instance profile on every node
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.update(max_workers="eight"), jsonschema.ValidationError),
    (lambda c: c.pop("provider"), (KeyError, jsonschema.ValidationError)),
    (lambda c: c.update(setup_comands=c.pop("setup_commands")), jsonschema.ValidationError),  # a typo
    (lambda c: c.update(head_node_type="no-such-type"), ValueError),
    (lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}),
     jsonschema.ValidationError),
], ids=["max_workers-string", "no-provider", "misspelt-key", "unknown-head-type", "resource-string"])
def test_launcher_validation_rejects_broken_copies(cluster, break_it, error):
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(error):
        launcher_validate(broken)


def test_cluster_image_is_the_pinned_ray_and_not_ray_ml(cluster):
    docker = cluster["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cluster["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images and docker["container_name"]
    for image in images:
        match = CUDA_IMAGE.fullmatch(image)
        assert match, f"{image}: expected rayproject/ray:<version>-py311-cu12x"
        assert match.group(1) == pinned_ray_version(), f"{image}: Ray differs from scripts/constraints.txt"
        assert "ray-ml" not in image


def test_setup_commands_install_the_project_at_a_pinned_ref(cluster):
    prepared = launcher_validate(cluster)
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(prepared[key])
        pin = PROJECT_PIN.search(commands)
        assert pin, f"{key}: no pinned `l2r[...] @ git+https://github.com/OWNER/l2r@REF`"
        assert set(pin.group(1).split(",")) <= project_extras()
        assert pin.group(3) not in ("main", "master", "HEAD")
        assert f'"ray[default,train,data]=={pinned_ray_version()}"' in commands  # pip keeps the image's Ray
        assert "nightly" not in commands and "ray-wheels" not in commands  # the launcher's defaults
    assert "boto3" in " ".join(cluster["head_setup_commands"])  # the head's autoscaler uses it


def test_only_ssh_is_exposed(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert rules
    for rule in rules:
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not rule.get("Ipv6Ranges")
    docker = cluster["docker"]
    options = [o for k in ("run_options", "head_run_options", "worker_run_options") for o in docker.get(k, [])]
    assert not [o for o in options if re.match(r"(-p|-P|--publish(-all)?)(\s|=|$)", o)]
    assert not [o for k in ("run_options", "head_run_options") for o in docker.get(k, []) if "--gpus" in o]
    assert "--gpus all" in docker["worker_run_options"]


def test_every_cluster_node_runs_with_ray_token_auth(cluster):
    """Ray's default start commands, each with RAY_AUTH_MODE=token, and the locally generated token
    mounted where Ray reads it (`ray get-auth-token --generate` writes ~/.ray/auth_token)."""
    prepared = launcher_validate(cluster)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts, key
        assert all(re.search(r"(^|[;&\s])RAY_AUTH_MODE=token ray start ", c) for c in starts), starts
    assert "--head" in " ".join(prepared["head_start_ray_commands"])
    assert "$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER.read_text()


@pytest.mark.parametrize("path", [CLUSTER, *RAYJOBS.values()], ids=lambda p: p.name)
def test_no_credentials_in_deploy_files(path):
    text = path.read_text()
    assert not re.search(r"\b[0-9a-f]{64}\b", text)  # no Ray token (what `ray get-auth-token` prints)
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert word not in text.lower()
    assert "AKIA" not in text and not re.search(r"\bASIA[0-9A-Z]{16}\b", text)


# ------------------------------------------------------------------ KubeRay RayJobs


@pytest.fixture(scope="module")
def jobs():
    """The entry points jobs/train.py and jobs/attribute.py as modules (importing them starts nothing)."""
    modules = {}
    for name in RAYJOBS:
        spec = importlib.util.spec_from_file_location(f"_deploy_test_job_{name}", ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def pods(spec: dict):
    cluster_spec = spec["rayClusterSpec"]
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def check_entrypoint(job: str, entrypoint: str, module, monkeypatch) -> dict:
    """Parse the entrypoint with the job's own argparse parser; every `--flag` must be one of its options
    exactly (argparse would also take a prefix such as --gpu). Returns the parsed arguments: for training
    the resolved run config (pipeline.config.load_config, which rejects unknown --set keys)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", f"jobs/{job}.py"], argv[:2]
    assert (ROOT / argv[1]).is_file()
    parsers = []

    def recording_parse_args(self, args=None, namespace=None):
        parsers.append(self)
        return REAL_PARSE_ARGS(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording_parse_args)
    monkeypatch.chdir(ROOT)  # the job runs at the root of working_dir
    if job == "train":
        configs = []
        monkeypatch.setattr(module, "run", lambda config, **kwargs: configs.append(config))  # not Ray
        module.main(argv[2:])  # parses, loads --config, applies --set and the flags
        parsed = configs[0]
    else:
        parsed = vars(module.build_parser().parse_args(argv[2:]))
    options = {s for action in parsers[0]._actions for s in action.option_strings}
    for token in argv[2:]:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in options, f"{token}: not an option of jobs/{job}.py"
    return parsed


@pytest.mark.parametrize("job", list(RAYJOBS))
def test_rayjob_manifest(job):
    doc = load_yaml(RAYJOBS[job])
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert str(spec["rayClusterSpec"]["rayVersion"]) == pinned_ray_version()
    # KubeRay's token authentication (RayClusterSpec.authOptions, KubeRay >= 1.5.1): the operator makes
    # the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray container.
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    gpu_groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with nvidia.com/gpu in its container limits"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for name, pod in pods(spec):
        assert pod.get("serviceAccountName"), f"{name}: S3 access goes through an IRSA service account"
        for container in pod["containers"]:
            image = container["image"]
            match = (CUDA_IMAGE if "nvidia.com/gpu" in container["resources"].get("limits", {})
                     else CPU_IMAGE).fullmatch(image)
            assert match and match.group(1) == pinned_ray_version(), image
            assert "ray-ml" not in image
            assert not container.get("env") or not any("KEY" in e["name"] for e in container["env"])
            assert not any(e["name"].startswith("RAY_AUTH") for e in container.get("env", []))  # the operator's
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    pins = [PROJECT_PIN.fullmatch(p) for p in runtime_env["pip"]]
    assert any(pins), runtime_env["pip"]
    pin = next(p for p in pins if p)
    assert set(pin.group(1).split(",")) <= project_extras()
    cluster_pin = PROJECT_PIN.search(" ".join(load_yaml(CLUSTER)["setup_commands"]))
    assert (pin.group(2), pin.group(3)) == (cluster_pin.group(2), cluster_pin.group(3))  # one ref everywhere
    assert runtime_env["working_dir"].endswith(f"/{pin.group(3)}.zip")  # code at the same ref


@pytest.mark.parametrize("job", list(RAYJOBS))
def test_rayjob_entrypoint_flags_are_the_jobs_own(job, jobs, monkeypatch):
    entrypoint = load_yaml(RAYJOBS[job])["spec"]["entrypoint"]
    parsed = check_entrypoint(job, entrypoint, jobs[job], monkeypatch)
    if job == "train":
        config_arg = shlex.split(entrypoint)[shlex.split(entrypoint).index("--config") + 1]
        assert (ROOT / config_arg).is_file() and (ROOT / config_arg).parent == ROOT / "jobs" / "configs"
        assert parsed["run"]["gpus"] is True and parsed["run"]["workers"] >= 1
        assert parsed["run"]["storage"].startswith("s3://")  # multi-node runs need shared storage
        for key in ("train", "val"):  # the cluster has no ../shared: data comes from S3
            assert parsed["data"][key].startswith("s3://")
    else:
        methods = parsed["methods"].split(",")
        assert set(methods) <= set(jobs["attribute"].all_methods())
        assert parsed["device"] == "cuda"
        assert all(s.startswith("s3://") for s in parsed["shards"]) and parsed["output"].startswith("s3://")


def test_attribution_reads_the_explainer_training_writes(jobs, monkeypatch):
    train = check_entrypoint("train", load_yaml(RAYJOBS["train"])["spec"]["entrypoint"], jobs["train"],
                             monkeypatch)
    attribute = check_entrypoint("attribute", load_yaml(RAYJOBS["attribute"])["spec"]["entrypoint"],
                                 jobs["attribute"], monkeypatch)
    assert attribute["explainer"] == f"{train['run']['storage']}/{train['name']}/explainer"


@pytest.mark.parametrize("job, edit, error", [
    ("train", lambda e: e.replace("--workers", "--wokers"), SystemExit),  # unknown to argparse
    ("train", lambda e: e.replace("--gpus", "--gpu"), AssertionError),  # a prefix argparse would take
    ("train", lambda e: e.replace("data.val=", "data.vla="), SystemExit),  # unknown config key: a one-line exit
    ("train", lambda e: e.replace("jobs/train.py", "jobs/trian.py"), AssertionError),
    ("attribute", lambda e: e.replace("--device cuda", "--device gpu"), SystemExit),  # not a choice
    ("attribute", lambda e: e.replace("--explainer", "--explain"), AssertionError),
], ids=["unknown-flag", "abbreviated-flag", "unknown-set-key", "wrong-script", "bad-choice", "prefix-flag"])
def test_entrypoint_check_rejects_broken_copies(job, edit, error, jobs, monkeypatch, capsys):
    entrypoint = edit(load_yaml(RAYJOBS[job])["spec"]["entrypoint"])
    with pytest.raises(error):
        check_entrypoint(job, entrypoint, jobs[job], monkeypatch)
