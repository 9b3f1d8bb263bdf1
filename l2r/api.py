"""The library surface for notebooks: a map in one or two calls.

    import l2r
    explainer = l2r.load("runs/demo/explainer")
    images = explainer.preprocess(["photo.jpg"])
    maps = explainer.explain(images)
    scores = l2r.score(explainer.target, images, maps)

- `load(path)`: an explainer artifact (folder, URL, or a shipped explainer's name such as
  "cifar10-resnet20") with the target it was trained for;
- `load_target(spec, ...)`: a target model alone, from the same record the jobs use;
- `preprocess(target, images)`: paths, bytes, PIL images or uint8 arrays -> (B,3,H,W) in [0,1],
  with the target's own resize and crop (the jobs' preprocessing);
- `attribute(method, target, images, targets=None, **options)`: any method by name (`l2r.methods`),
  the trained explainer too: `attribute("l2r", explainer.target, images, explainer=explainer)`;
- `score(target, images, maps, targets=None, protocol=None)`: the exact deletion/insertion curves
  (`l2r.metrics.Protocol`, or its fields: `steps=11, reference="blur"`);
- `report(results)`: the comparison report of an attribution job's output; a notebook shows its
  one-page picture (mean curves and a gallery).
`targets=None` everywhere means the target's top-1 prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from l2r.images import decode_image, resize_and_crop, to_tensor
from l2r.metrics import Protocol, deletion_insertion
from l2r.target_spec import TargetSpec


def load_target(spec: str, checkpoint: str | None = None, device="cpu", **record_fields):
    """The frozen target model (`TargetModel`): fields as `l2r.target_spec.TargetSpec`'s.

    `timm:NAME` means timm's pretrained weights unless `checkpoint` or `random_init=True` is given.
    """
    return TargetSpec(spec=spec, checkpoint=checkpoint, **record_fields).build(device)


def preprocess(target, images) -> torch.Tensor:
    """Images for `target` as a float tensor (B,3,H,W) in [0,1].

    `images`: one or a list of file paths, encoded bytes, PIL images or uint8 HWC arrays; resized
    (shorter side to input size / crop_pct) and centre-cropped to the target's input size.
    """
    if isinstance(images, (str, os.PathLike, bytes, np.ndarray)) or hasattr(images, "convert"):
        images = [images]
    arrays = [resize_and_crop(_as_array(image), target.input_size, target.crop_pct) for image in images]
    device = target.mean.device
    return to_tensor(np.stack(arrays)).to(device)


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return decode_image(Path(image).read_bytes())
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image))
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return array


def _targets(target, images, targets) -> torch.Tensor:
    if targets is None:
        with torch.no_grad():
            return target(images).argmax(1)
    targets = torch.as_tensor(targets, dtype=torch.long, device=images.device).reshape(-1)
    if targets.numel() == 1 and images.shape[0] > 1:
        targets = targets.expand(images.shape[0])
    return targets


def attribute(method: str, target, images: torch.Tensor, targets=None, **options) -> torch.Tensor:
    """Maps (B,H,W) of a method by name (l2r, gradcam, ig, saliency, rise, random, gaussian, ...).

    `l2r` needs `explainer=` (a `TrainedExplainer` from `load`, or its `.explainer`), trained for `target`.
    """
    from l2r.methods import attribute as run

    if isinstance(options.get("explainer"), TrainedExplainer):
        options["explainer"] = options["explainer"].explainer
    maps, _ = run(method, target, images, _targets(target, images, targets), **options)
    return maps


def score(target, images: torch.Tensor, maps: torch.Tensor, targets=None, protocol: Protocol | None = None,
          **protocol_fields) -> dict:
    """The exact deletion/insertion curves and AUCs of `maps` (see `l2r.metrics.deletion_insertion`)."""
    return deletion_insertion(target, images, maps, _targets(target, images, targets), protocol, **protocol_fields)


class TrainedExplainer:
    """An explainer with the target it explains: `explain(images)` gives the maps in one forward."""

    def __init__(self, explainer, target, record: TargetSpec, metadata: dict):
        self.explainer, self.target, self.record, self.metadata = explainer, target, record, metadata

    def preprocess(self, images) -> torch.Tensor:
        return preprocess(self.target, images)

    @torch.no_grad()
    def explain(self, images: torch.Tensor, targets=None) -> torch.Tensor:
        """Maps (B,H,W) for `targets` (default: the predicted classes); larger = more important."""
        return attribute("l2r", self.target, images, targets, explainer=self.explainer)

    __call__ = explain

    def __repr__(self) -> str:
        return f"TrainedExplainer(target={self.record.describe()}, steps={self.metadata.get('steps')})"


def load(path, device="cpu", allow_target_mismatch: bool = False, **target_fields) -> TrainedExplainer:
    """An explainer artifact (folder or fsspec URL) with its target, rebuilt from the artifact's record.

    `target_fields` (spec, checkpoint, ...) name another target; it must be the one the explainer
    was trained for (same weights and preprocessing) unless `allow_target_mismatch`.
    """
    from l2r.artifact import load_artifact, local_artifact, read_target_spec

    folder = local_artifact(path)
    record = None
    if target_fields:
        record = TargetSpec.from_dict({**read_target_spec(folder).to_dict(), "weights_sha256": None,
                                         "num_classes": None, **target_fields})
    explainer, target, record, metadata = load_artifact(folder, device, record, allow_target_mismatch)
    return TrainedExplainer(explainer, target, record, metadata)


class Report:
    """The report of an attribution output: `methods` (per-method statistics), `markdown`, `png` (the
    summary picture's bytes, which a notebook displays), `files` (what was written), `summary` (all of it)."""

    def __init__(self, summary: dict):
        self.summary = summary
        self.methods, self.markdown, self.png, self.files = (summary["methods"], summary["markdown"],
                                                             summary["png"], summary["files"])

    def _repr_png_(self) -> bytes:
        return self.png

    def __repr__(self) -> str:
        return f"Report({len(self.methods)} methods, written to {self.files['summary.png'].rsplit('/', 1)[0]}/: " \
               f"{', '.join(name.rsplit('/', 1)[-1] for name in self.files.values())})"


def report(results: str, output: str | None = None, gallery: int = 8, storage_options: dict | None = None) -> Report:
    """Write and return the report of an attribution job's output folder (local or fsspec URL).

    The same report as `jobs/report.py` (summary.md, summary.json, report.html, summary.png in
    `output`, default `<results>/report`). In a notebook the returned object shows as the picture.
    """
    from l2r.reporting.report import ReportConfig, write_report

    config = ReportConfig(results=results, output=output, gallery=gallery, storage_options=storage_options)
    return Report(write_report(config, log=lambda line: None))
