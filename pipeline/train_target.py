"""The training target from a run config: its `TargetSpec` (the record the artifact and the attribution
job use too) and the frozen model built from it."""

from __future__ import annotations

from l2r.target_spec import TargetSpec
from pipeline.config import storage_options


def target_spec(config: dict) -> TargetSpec:
    """The training target as a `TargetSpec` (the same record the artifact and attribution use)."""
    tcfg = config["target"]
    return TargetSpec(
        spec=tcfg["spec"], checkpoint=tcfg["checkpoint"], random_init=bool(tcfg["random_init"]),
        init_seed=int(tcfg["init_seed"]), kwargs=tcfg["kwargs"],
        mean=tcfg["mean"], std=tcfg["std"], input_size=tcfg["input_size"], crop_pct=config["data"]["crop_pct"],
        background_logit=bool(tcfg["background_logit"]), class_names=tcfg["class_names"],
    )


def make_target(config: dict, device="cpu"):
    """(target model, its built record)."""
    record = target_spec(config)
    target = record.build(device, storage_options(config))
    target.gradient_checkpointing = bool(config["target"]["gradient_checkpointing"])
    return target, record
