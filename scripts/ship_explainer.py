"""Keep a training run's explainer in the package (l2r/explainers/<name>), loadable by name.

    python scripts/ship_explainer.py ~/l2r_runs/cifar10 cifar10-resnet20
    python scripts/ship_explainer.py ~/l2r_runs/cifar10-vit cifar10-vit --with-target-weights
    python scripts/ship_explainer.py runs/cifar10-vit cifar10-vit --target-weights l2r/explainers/cifar10-vit/target.safetensors

Copies the artifact (model.safetensors, explainer.json) with the run's config.yaml and
metrics.jsonl (a fine-tuned run, `train.init_from`, also keeps its start's two, prefixed
`init_from-`). The recorded target checkpoint, model file and import paths become relative to the
new folder (l2r.artifact resolves relative paths there; the checkout itself is dropped from the
import paths, the project's own models being in `l2r.zoo`), so the explainer works from any
checkout or install that has the shared folder beside it (or is given the target's files); `--with-target-weights` copies the target's weights into
the folder instead (for small targets trained by the project, such as the CIFAR-10 ViT). The
weights' sha256 stays recorded, so a different file at that path is refused, never explained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from l2r.artifact import SHIPPED  # noqa: E402


def ship(run_dir: Path, name: str, with_target_weights: bool = False, target_weights: Path | None = None) -> Path:
    """l2r/explainers/<name> from a finished run; ``target_weights``: the file to copy in as the target's
    weights, for a run trained on another machine (its recorded path is that machine's)."""
    artifact = run_dir / "explainer"
    for needed in (artifact / "explainer.json", artifact / "model.safetensors", run_dir / "metrics.jsonl"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: not a finished training run")
    folder = SHIPPED / name
    document = json.loads((artifact / "explainer.json").read_text())
    metadata = document["metadata"]
    history = started_history(metadata.get("init_from"))  # read first: it may be this very folder
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = metadata["target"].get("checkpoint")
    if checkpoint and "://" not in checkpoint:
        if with_target_weights or target_weights:
            copied = folder / f"target{Path(checkpoint).suffix}"
            source = Path(target_weights or checkpoint)
            if not (copied.exists() and copied.samefile(source)):  # re-shipping over the folder it came from
                shutil.copyfile(source, copied)
            metadata["target"]["checkpoint"] = copied.name
        else:
            metadata["target"]["checkpoint"] = os.path.relpath(checkpoint, folder)
    model_file, _, attr = metadata["target"]["spec"].rpartition(":")
    if model_file.endswith(".py") and "://" not in model_file:  # a user's model file, as the checkpoint
        metadata["target"]["spec"] = f"{os.path.relpath(model_file, folder)}:{attr}"
    # The project's own models import from the package (l2r.zoo): the checkout is no import path.
    metadata["import_paths"] = [os.path.relpath(p, folder) if "://" not in p else p
                                for p in metadata.get("import_paths", []) if Path(p).resolve() != ROOT]
    (folder / "explainer.json").write_text(json.dumps(document, indent=2) + "\n")
    shutil.copyfile(artifact / "model.safetensors", folder / "model.safetensors")
    for extra in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(run_dir / extra, folder / extra)
    for file_name, text in history.items():
        (folder / file_name).write_text(text)
    return folder


def started_history(init_from: dict | None) -> dict:
    """A fine-tuned run (train.init_from): the config and metrics of the explainer it started from, kept
    beside its own as init_from-config.yaml / init_from-metrics.jsonl, and that start's own history one
    `init_from-` further (init_from-init_from-config.yaml, ...), so the whole chain of training stays on record."""
    if not init_from:
        return {}
    from l2r.artifact import resolve_explainer

    start = resolve_explainer(init_from["explainer"])
    if "://" in start:
        return {}
    start = Path(start)
    # A shipped folder holds its records; a run's artifact (<run>/explainer) has them in the run folder.
    records = start if (start / "config.yaml").is_file() else start.parent
    history = {f"init_from-{extra}": (records / extra).read_text()
               for extra in ("config.yaml", "metrics.jsonl") if (records / extra).is_file()}
    earlier = {f"init_from-{p.name}": p.read_text() for p in sorted(records.glob("init_from-*"))}
    if not earlier and (start / "explainer.json").is_file():  # a run's start: follow its own init_from
        metadata = json.loads((start / "explainer.json").read_text())["metadata"]
        earlier = {f"init_from-{name}": text for name, text in started_history(metadata.get("init_from")).items()}
    return {**history, **earlier}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the training run's folder (<storage>/<name>)")
    p.add_argument("name", help="the shipped name (l2r/explainers/<name>)")
    p.add_argument("--with-target-weights", action="store_true", help="copy the target's weights into the folder")
    p.add_argument("--target-weights", type=Path, help="copy this file in as the target's weights (a run trained "
                   "elsewhere, e.g. by benchmarks/gpu_train.sh: l2r.load checks it against the recorded hash)")
    args = p.parse_args(argv)
    print(ship(args.run_dir.expanduser(), args.name, args.with_target_weights, args.target_weights))


if __name__ == "__main__":
    main()
