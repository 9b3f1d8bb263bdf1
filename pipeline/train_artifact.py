"""The explainer artifact of a training run: what it records, writing it at the end, recognising a run
that already wrote it (a rerun returns it), and the artifact a fine-tuning run starts from."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from l2r import storage as l2r_storage
from l2r.artifact import describe_start, local_artifact, read_target_spec, resolve_explainer, save_artifact
from l2r.explainer import CONFIG_FILE as EXPLAINER_FILE
from l2r.objective import ObjectiveConfig
from l2r.target_spec import TargetSpec, check_same_target
from pipeline.config import storage_options
from pipeline.train_target import target_spec


def artifact_metadata(config: dict, step: int) -> dict:
    """What the artifact records besides the target record (`l2r.artifact.write_artifact` adds that)."""
    return {
        "steps": step,
        "run_name": config["name"],
        "data": config["data_identity"],
        "image_size": config["data"]["image_size"],
        "crop_pct": config["data"]["crop_pct"],
        "objective": ObjectiveConfig(**config["objective"]).to_dict(),
        "train": config["train"],
        "workers": config["run"]["workers"],
        "import_paths": config.get("import_paths", []),
        **({"init_from": config["init_from"]} if config.get("init_from") else {}),
    }


def write_artifact(explainer, record: TargetSpec, config: dict, step: int) -> str:
    """The artifact into <run_dir>/explainer (written locally, then copied when the storage is remote)."""
    destination = f"{config['run_dir']}/explainer"
    metadata = artifact_metadata(config, step)
    if not l2r_storage.is_url(destination):
        save_artifact(destination, explainer, record, metadata)
        return destination
    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(tmp, explainer, record, metadata)
        l2r_storage.put_folder(tmp, destination, storage_options(config))
    return destination


def finished_artifact(config: dict) -> str | None:
    """The run's artifact if it already holds the last step of this same training, else None."""
    artifact = f"{config['run_dir']}/explainer"
    try:
        document = l2r_storage.read_json(f"{artifact}/{EXPLAINER_FILE}", storage_options(config))
    except OSError:
        return None
    if not isinstance(document, dict):
        return None
    metadata, target = document.get("metadata", {}), document.get("metadata", {}).get("target") or {}
    same = (metadata.get("train") == config["train"]  # steps included
            and metadata.get("objective") == ObjectiveConfig(**config["objective"]).to_dict()
            and metadata.get("data") == config["data_identity"]
            # the same target: a changed model or checkpoint under the same run name trains again
            and all(target.get(key) == json.loads(json.dumps(config["target"].get(key)))
                    for key in ("spec", "checkpoint", "kwargs")))
    return artifact if same else None


def initial_explainer(config: dict, options: dict | None) -> tuple[dict, dict]:
    """train.init_from resolved where the workers can read it (a shipped name -> its folder, a relative
    folder -> absolute), checked before Ray starts (it exists; the same target as far as the config
    says; the workers compare the weights), and what the artifact will record of it."""
    given = str(config["train"]["init_from"])
    path = given if "://" in given else str(Path(resolve_explainer(given)).resolve())
    folder = local_artifact(path, options)
    check_same_target(read_target_spec(folder), target_spec(config), f"{given} (train.init_from)")
    return {**config["train"], "init_from": path}, {"explainer": given, **describe_start(folder)}
