"""An explainer artifact as a whole: the explainer's files plus the record of the target it explains.

The directory holds `model.safetensors` and `explainer.json` (`l2r.explainer.save_explainer`);
the training job puts the target's `TargetSpec` under the metadata key "target" and the
folders its model module was imported from under "import_paths". This module reads them back,
so that an artifact alone is enough to explain images: `load_artifact(path)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from l2r.classifier import load_state_dict_checked, sha256_file
from l2r.explainer import CONFIG_FILE, WEIGHTS_FILE, load_explainer, save_explainer
from l2r.explainer import DEFAULT_CONFIG as EXPLAINER_DEFAULTS
from l2r.target_spec import TargetSpec, check_same_target


def save_artifact(path, explainer, record: TargetSpec, metadata: dict | None = None) -> Path:
    """Save the explainer with the (built) target record (metadata "import_paths": where a user's model
    module was imported from)."""
    metadata = {**(metadata or {}), "target": record.to_dict()}
    return save_explainer(path, explainer, metadata)


def read_metadata(path) -> dict:
    document = Path(path) / CONFIG_FILE
    if not document.is_file():
        raise FileNotFoundError(f"explainer artifact {path}: no {CONFIG_FILE} (is this an explainer folder?)")
    return json.loads(document.read_text()).get("metadata", {})


def read_target_spec(path) -> TargetSpec:
    """The target an artifact was trained for; puts its recorded import paths on sys.path so that a
    user's model module imports as it did at training time."""
    metadata = read_metadata(path)
    recorded = metadata.get("target")
    if not recorded or not recorded.get("spec"):
        raise ValueError(f"explainer artifact {path} does not record its target model; give the model explicitly")
    # Training records absolute paths; a relative one (a shipped explainer's) is relative to the
    # artifact folder, so the shipped explainers work from any checkout or install and directory.
    checkpoint = recorded.get("checkpoint")
    if checkpoint and "://" not in checkpoint and not Path(checkpoint).is_absolute():
        recorded = {**recorded, "checkpoint": str((Path(path) / checkpoint).resolve())}
    model_file, _, name = recorded["spec"].rpartition(":")
    if model_file.endswith(".py") and not Path(model_file).is_absolute():  # path/to/model.py:callable
        recorded = {**recorded, "spec": f"{(Path(path) / model_file).resolve()}:{name}"}
    for extra in metadata.get("import_paths", []):
        if "://" not in extra and not Path(extra).is_absolute():
            extra = str((Path(path) / extra).resolve())
        if extra not in sys.path:
            sys.path.append(extra)
    crop = metadata.get("crop_pct")  # artifacts written before the record held crop_pct
    if crop is not None and "crop_pct" not in recorded:
        recorded = {**recorded, "crop_pct": crop}
    return TargetSpec.from_dict(recorded)


def load_artifact(path, device="cpu", record: TargetSpec | None = None, allow_target_mismatch: bool = False,
                  storage_options: dict | None = None):
    """(explainer, target, target record, metadata) from an artifact directory.

    The target is rebuilt from the artifact's record, or from `record` when given; a target
    other than the one the explainer was trained for (weights, preprocessing) is an error
    unless `allow_target_mismatch`.
    """
    trained = read_target_spec(path)
    record = record or TargetSpec.from_dict(trained.to_dict())
    target = record.build(device, storage_options)
    if not allow_target_mismatch:
        check_same_target(trained, record, f"in {path}")
    explainer, metadata = load_explainer(path, target)
    return explainer.to(device).eval(), target, record, metadata


def start_from(explainer, path, record: TargetSpec, storage_options: dict | None = None) -> None:
    """Load an artifact's weights into a freshly built `explainer` (training's `train.init_from`).

    Refused, naming the artifact, unless it was trained for the same target (`record`, built: its
    weights' hash is compared) with the same explainer config; a fine-tuned explainer is then the
    same model, further trained.
    """
    from safetensors.torch import load_file

    folder = local_artifact(path, storage_options)
    where = f"{path} (train.init_from)"
    check_same_target(read_target_spec(folder), record, where)
    document = json.loads((Path(folder) / CONFIG_FILE).read_text())
    built = json.loads(json.dumps(explainer.config))  # as JSON holds it: lists, not tuples
    # A key added to the explainer config after the artifact was written has its default there.
    recorded = {**json.loads(json.dumps(EXPLAINER_DEFAULTS)), **document["config"]}
    differing = sorted(k for k in set(built) | set(recorded) if built.get(k) != recorded.get(k))
    if differing:
        raise ValueError(f"explainer {where} was built with another explainer config: "
                         + "; ".join(f"{k}: {recorded.get(k)!r} there, {built.get(k)!r} here" for k in differing))
    weights = Path(folder) / WEIGHTS_FILE
    load_state_dict_checked(explainer, load_file(str(weights), device="cpu"), str(weights))


def describe_start(folder) -> dict:
    """What a fine-tuned artifact records of the local artifact `folder` it started from."""
    return {"steps": read_metadata(folder).get("steps"), "weights_sha256": sha256_file(Path(folder) / WEIGHTS_FILE)}


# Explainers trained by the project's own training job, kept with their config and metrics.jsonl as
# package data (l2r/explainers/<name>, in a checkout and in an installed wheel alike): loadable by
# folder name (e.g. "cifar10-resnet20").
SHIPPED = Path(__file__).resolve().parent / "explainers"


def shipped_explainers() -> list[str]:
    if not SHIPPED.is_dir():
        return []
    return sorted(p.name for p in SHIPPED.iterdir() if (p / CONFIG_FILE).is_file())


def resolve_explainer(path) -> str:
    """A shipped explainer's name -> its folder; a folder or URL is returned as given."""
    path = str(path)
    if "://" in path or Path(path).exists():
        return path
    shipped = ", ".join(shipped_explainers()) or "none"
    if "/" not in path and "\\" not in path:  # a bare name: a shipped explainer, or a folder here
        if path in shipped_explainers():
            return str(SHIPPED / path)
        raise FileNotFoundError(f"explainer {path!r}: not a shipped explainer (shipped: {shipped}) "
                                f"and no folder of that name with {CONFIG_FILE}")
    raise FileNotFoundError(f"explainer {path!r}: no such folder (an artifact folder holds {CONFIG_FILE} "
                            f"and model.safetensors); shipped explainers by name: {shipped}")


def local_artifact(path, storage_options: dict | None = None) -> str:
    """A local folder for an artifact given as a shipped explainer's name, a folder or an fsspec URL
    (s3://...: its two files are fetched once per node into the cache of `l2r.target_spec.fetch`)."""
    from l2r.explainer import WEIGHTS_FILE
    from l2r.target_spec import fetch

    path = str(path)
    if "://" not in path:
        path = resolve_explainer(path)
        return path
    base = path.rstrip("/")
    files = [fetch(f"{base}/{name}", storage_options) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    return str(Path(files[0]).parent) if Path(files[0]).parent == Path(files[1]).parent else _same_folder(files)


def _same_folder(files: list[str]) -> str:
    # fetch() keys its cache by URL, so the two files land in different folders: link them side by side.
    import hashlib
    import os

    from l2r.target_spec import cache_dir

    folder = cache_dir() / "artifacts" / hashlib.sha256("|".join(files).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = folder / Path(f).name
        if not link.exists():
            os.symlink(f, link)
    return str(folder)
