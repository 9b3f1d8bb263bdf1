"""Ray Train checkpoints of a training run: what one holds (`state.pt`: explainer, optimiser, scheduler,
data position, config) and reading it back when a worker group resumes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from l2r.training import unwrap
from pipeline.config import dump_config, recorded_config

STATE_FILE = "state.pt"


def save_checkpoint(explainer, optimizer, scheduler, position: dict, config: dict):
    import ray.train

    directory = tempfile.mkdtemp(prefix="l2r_ckpt_")
    torch.save(
        {
            "explainer": unwrap(explainer).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": position,
            "config": recorded_config(config),
        },
        os.path.join(directory, STATE_FILE),
    )
    (Path(directory) / "config.yaml").write_text(dump_config(config))
    return ray.train.Checkpoint.from_directory(directory), directory


def restore_checkpoint(checkpoint) -> dict:
    """The state saved by `save_checkpoint` in a `ray.train.Checkpoint` (tensors only: weights_only)."""
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
