"""Run configuration: defaults < YAML file < `--set key.sub=value` < explicit flags.

A config is a plain nested dict (what the YAML holds). `load_config` merges the layers,
checks every key against `DEFAULTS` (a typo is an error that lists the known keys) and
resolves local paths: relative paths are taken from the current directory and made
absolute (Ray workers run in another directory), `~` is expanded, URLs (`s3://...`)
are left alone. The resolved config is printed at the start of a run and saved as
`config.yaml` in the run directory: the user's keys only, so it loads back with `--config`;
what the driver derives (run_dir, data URLs, ...) goes to `run.json` beside it (`derived_state`).

Sections whose keys are checked elsewhere are open: `explainer` (by
`l2r.explainer.build_explainer`), `objective` (by `l2r.objective.ObjectiveConfig`),
`target.kwargs`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

DEFAULTS: dict = {
    "name": None,  # run name: <storage>/<name>; a rerun with the same name resumes
    "seed": 0,
    "data": {
        "train": None,  # shard spec(s) (file, folder, glob, {a..b} braces, s3://...); None: synthetic
        "val": None,  # held-out shards for exact AUCs (the first val.images rows); None: the held-back
        # part of data.train (holdout_every), or synthetic
        "synthetic": {"train": 2048, "val": 64, "size": 32, "num_classes": 10, "shard_size": 512},
        "image_size": 32,  # model input (H = W, or [H, W]); images are resized and centre-cropped
        "crop_pct": 1.0,
        "read_cpus": 0.5,  # CPUs per Ray Data read task (a fraction leaves room for the trainers)
        "shuffle_buffer": 0,  # rows; 0: stream order
        # Decode the whole training set into Ray's object store once, before training: for data that
        # fits in memory, later epochs skip decoding and no reader competes with the trainers for CPUs.
        "materialize": False,
        # 1 in N samples of each training shard (archive positions N-1, 2N-1, ...) held back: training
        # skips them; with data.val null, validation reads only them. 0: no split.
        "holdout_every": 0,
        # Random resized crops (area fraction range) and flips per step, from images decoded at
        # image_size / crop_pct (l2r.augment). null: the evaluation preprocessing, no flips.
        "augment": {"crop_scale": None, "flip": False},
    },
    "target": {
        "spec": None,  # timm:NAME or package.module:callable
        "checkpoint": None,  # weight file (local path or URL)
        "kwargs": {},
        "random_init": False,  # explicit untrained weights (timm:NAME otherwise means pretrained)
        "init_seed": 0,  # seeds the model's construction (weights not read from a file)
        "background_logit": False,  # logit 0 is a background class (TensorFlow ImageNet models): dropped
        "mean": None,
        "std": None,
        "input_size": None,
        "class_names": None,
        "gradient_checkpointing": False,
        "fit_steps": 0,  # demo: fit the target on the training shards first when it has no checkpoint
        "fit_batch_size": 64,
        "fit_lr": 0.003,
    },
    "explainer": {},  # l2r.explainer.DEFAULT_CONFIG keys
    "objective": {},  # l2r.objective.ObjectiveConfig fields, e.g. chunk_size
    "train": {
        "steps": 100,  # optimiser steps (all workers step together)
        "batch_size": 16,  # images per worker per step
        "lr": 0.0003,
        "weight_decay": 0.001,
        "grad_clip": 1.0,
        "warmup": 0.06,  # fraction of steps, linear from lr/warmup_div
        "warmup_div": 25.0,
        "final_div": 1.0e4,  # cosine down to lr / warmup_div / final_div
        "bf16": True,  # autocast the target passes on CUDA
        "report_every": 10,
        "checkpoint_every": 50,
        "keep_checkpoints": 2,
        # Start from this explainer's weights (a shipped name, a folder or a URL): fine-tuning. Same
        # target and explainer config required; optimiser, schedule and tau start afresh.
        "init_from": None,
    },
    "val": {
        "every": 50,  # steps; 0: only at the end
        "images": 64,
        "steps": 21,
        "reference": "black",
        "batch_size": 32,
    },
    "run": {
        "storage": "~/l2r_runs",  # local folder or s3://bucket/prefix (shared storage when multi-node)
        # fsspec options (credentials, endpoint_url, ...) for every URL of the run; not written to its files
        "storage_options": None,
        "worker_resources": None,  # custom Ray resources per worker, to place workers on chosen nodes: {"gpu_node": 1}
        "workers": 1,
        "gpus": False,
        "cpus_per_worker": 1,
        "max_failures": 2,
    },
    "debug": {
        "fail_at_step": None,  # testing: raise in a worker at this step (only in an attempt that did not resume)
        "fail_rank": 0,
        "record_keys": False,  # write the sample keys each rank trained on to <run>/keys/
    },
}

OPEN_SECTIONS = ("explainer", "objective", "target.kwargs", "data.synthetic")

# Flag name -> config key (the explicit flags of jobs/train.py).
FLAG_KEYS = {
    "name": "name",
    "workers": "run.workers",
    "gpus": "run.gpus",
    "storage": "run.storage",
    "storage_options": "run.storage_options",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "checkpoint_every": "train.checkpoint_every",
    "val_every": "val.every",
}

PATH_KEYS = ("data.train", "data.val", "target.checkpoint", "run.storage", "explainer.backbone_checkpoint")


def parse_value(text: str):
    """A `--set` value as YAML (ints, floats incl. 3e-4, bools, null, [lists], {dicts}), else the string."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)  # PyYAML reads "3e-4" as a string
        except ValueError:
            pass
    return value


def set_key(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def get_key(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


class ConfigError(KeyError):
    """A key the config does not have; its message is one line naming the key and where it was given."""

    def __str__(self) -> str:
        return str(self.args[0])


def merge(base: dict, override: dict, prefix: str = "", source: str = "") -> dict:
    """Deep merge; keys unknown to `base` raise `ConfigError` naming `source`, except inside open sections."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        where = f"{prefix}{key}"
        if prefix.rstrip(".") in OPEN_SECTIONS:
            out[key] = copy.deepcopy(value)
        elif key not in out:
            known = ", ".join(sorted(out))
            raise ConfigError(f"{source}: unknown config key {where!r}; known here: {known}" if source else
                              f"unknown config key {where!r}; known here: {known}")
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, f"{where}.", source)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_path(value):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_resolve_path(v) for v in value]
    text = os.path.expandvars(os.path.expanduser(str(value)))
    if "://" in text:
        return text
    return os.path.abspath(text)


def load_config(path: str | os.PathLike | None = None, sets: list[str] = (), flags: dict | None = None) -> dict:
    """Defaults, then the YAML at `path`, then `key.sub=value` strings, then flags (FLAG_KEYS names; None skipped)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        with open(path) as f:
            config = merge(config, yaml.safe_load(f) or {}, source=str(path))
        if config["name"] is None:
            config["name"] = Path(path).stem
    overrides: dict = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key.sub=value, got {item!r}")
        set_key(overrides, key.strip(), parse_value(text))
    for flag, value in (flags or {}).items():
        if value is not None:
            set_key(overrides, FLAG_KEYS[flag], value)
    config = merge(config, overrides, source="--set")
    if config["run"]["storage_options"] == REDACTED:  # a saved config: the credentials are given anew
        config["run"]["storage_options"] = None
    for key in PATH_KEYS:
        value = get_key(config, key)
        if value is not None:
            set_key(config, key, _resolve_path(value))
    spec = config["target"]["spec"]
    if isinstance(spec, str) and ".py:" in spec:  # a model file (path/to/model.py:callable) is a path too
        file, _, name = spec.rpartition(":")
        config["target"]["spec"] = f"{_resolve_path(file)}:{name}"
    if not config["name"]:
        config["name"] = "l2r"
    return config


def storage_options(config: dict) -> dict | None:
    """fsspec options for every URL of the run (run.storage_options)."""
    return config["run"].get("storage_options")


REDACTED = "<given; not recorded>"


def recorded_config(config: dict) -> dict:
    """The config as written to the run's files and shown: storage options (credentials) left out."""
    run = config.get("run") or {}
    if not run.get("storage_options"):
        return config
    return {**config, "run": {**run, "storage_options": REDACTED}}


def user_config(config: dict) -> dict:
    """The keys a user sets (those of `DEFAULTS`): what `config.yaml` holds, so that it loads back."""
    return {key: value for key, value in config.items() if key in DEFAULTS}


def dump_config(config: dict) -> str:
    """The user's config as YAML (derived run state left out: `derived_state`), credentials redacted."""
    return yaml.safe_dump(recorded_config(user_config(config)), sort_keys=False, default_flow_style=None)


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" not in OPEN_SECTIONS:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def derived_state(given: dict, config: dict) -> dict:
    """What a driver derived from the user's config `given`, as `run.json` records it: its own keys
    (run_dir, data URLs and identity, ...) and, under "resolved", the user keys whose value it settled
    (e.g. run.cpus_per_worker "auto" -> a number, target.checkpoint of a fitted target)."""
    before, after = _flatten(recorded_config(user_config(given))), _flatten(recorded_config(user_config(config)))
    resolved = {key: value for key, value in after.items() if before.get(key) != value}
    return {**{key: value for key, value in config.items() if key not in DEFAULTS}, "resolved": resolved}
