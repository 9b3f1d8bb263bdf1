"""The one spec of a target model: what to build, from which weights, with which preprocessing.

Training writes it into the explainer artifact (`explainer.json`, metadata "target"); the
attribution job, the report and the notebook API read it back; `TargetSpec.build` is the one
builder everywhere. After a build the record also holds what was resolved on the way (timm's
preprocessing, the number of classes) and `weights_sha256`, a hash over the loaded weights
themselves, so weights that came from a hub download are identified too.

Weight sources (`weight_source`):
- `checkpoint`: a weight file, local path or fsspec URL (s3://, gs://, https://), fetched once
  per node into a local cache;
- `timm-pretrained`: `timm:NAME` without a checkpoint means timm's pretrained weights, as
  `timm.create_model(NAME, pretrained=True)`;
- `random`: asked for explicitly with `random_init` (never silently);
- `constructor`: a user's `package.module:callable` without a checkpoint keeps whatever weights
  the callable gives its model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class TargetMismatchError(ValueError):
    """An explainer is used with a target other than the one it was trained for."""


@dataclass
class TargetSpec:
    spec: str  # timm:NAME or package.module:callable (or path/to/file.py:callable)
    checkpoint: str | None = None  # weight file: local path or fsspec URL
    random_init: bool = False  # build with random weights, on purpose
    init_seed: int = 0  # seeds the construction: weights not read from a file are the same everywhere
    kwargs: dict = field(default_factory=dict)  # model constructor kwargs
    mean: tuple[float, ...] | None = None  # None: timm's pretrained config, else ImageNet's
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None  # (H, W); None: timm's pretrained config
    crop_pct: float = 1.0  # resize the shorter side to size / crop_pct, then centre-crop
    background_logit: bool = False  # the model's logit 0 is a background class: dropped
    class_names: list[str] | None = None
    num_classes: int | None = None  # filled by build
    weights_sha256: str | None = None  # filled by build: hash over the loaded weights

    def __post_init__(self):
        if not self.spec:
            raise ValueError("a target model needs a spec (timm:NAME or package.module:callable)")
        from l2r.classifier import check_weights_choice

        check_weights_choice(self.spec, self.checkpoint, self.random_init)
        self.kwargs = dict(self.kwargs or {})
        self.mean = tuple(float(v) for v in self.mean) if self.mean is not None else None
        self.std = tuple(float(v) for v in self.std) if self.std is not None else None
        if self.input_size is not None:
            size = [int(v) for v in (self.input_size if not isinstance(self.input_size, int) else [self.input_size])]
            self.input_size = (size[0], size[0]) if len(size) == 1 else (size[-2], size[-1])
        self.crop_pct = float(self.crop_pct)
        self.class_names = list(self.class_names) if self.class_names is not None else None

    @property
    def weight_source(self) -> str:
        if self.checkpoint:
            return "checkpoint"
        if self.random_init:
            return "random"
        return "timm-pretrained" if self.spec.startswith("timm:") else "constructor"

    def build(self, device="cpu", storage_options: dict | None = None):
        """The frozen `TargetModel`; fills the resolved fields and `weights_sha256` of this record."""
        from l2r.classifier import build_target

        if self.random_init:
            warnings.warn(f"target {self.spec}: random initialisation asked for: the model explained has "
                          "untrained weights", stacklevel=2)
        target = build_target(
            self.spec,
            checkpoint=fetch(self.checkpoint, storage_options) if self.checkpoint else None,
            model_kwargs=self.kwargs,
            random_init=self.random_init,
            mean=self.mean,
            std=self.std,
            input_size=self.input_size,
            class_names=self.class_names,
            background_logit=self.background_logit,
            init_seed=self.init_seed,
            crop_pct=self.crop_pct,
        )
        self.mean = tuple(float(v) for v in target.mean.tolist())
        self.std = tuple(float(v) for v in target.std.tolist())
        self.input_size = tuple(target.input_size)
        self.num_classes = target.num_classes
        self.class_names = target.class_names
        self.weights_sha256 = target.weights_sha256
        return target.to(device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_source"] = self.weight_source
        for key in ("mean", "std", "input_size"):
            d[key] = list(d[key]) if d[key] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TargetSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # Artifacts written before this record: timm targets had a `pretrained` flag (False meant random).
        if "pretrained" in d and "random_init" not in d and str(d.get("spec", "")).startswith("timm:"):
            values["random_init"] = not d["pretrained"] and not d.get("checkpoint")
        return cls(**values)

    def differences(self, other: "TargetSpec") -> list[str]:
        """What makes `other` a different target from this one (empty: the same)."""
        found = []
        if self.weights_sha256 and other.weights_sha256 and self.weights_sha256 != other.weights_sha256:
            found.append(f"weights sha256 {self.weights_sha256[:16]}... vs {other.weights_sha256[:16]}...")
        for name in ("mean", "std"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and not np.allclose(a, b, atol=1e-6):
                found.append(f"{name} {list(a)} vs {list(b)}")
        for name in ("input_size", "crop_pct", "background_logit", "num_classes"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                found.append(f"{name} {a} vs {b}")
        return found

    def describe(self) -> str:
        source = {"checkpoint": f"checkpoint {self.checkpoint}", "random": "random weights",
                  "timm-pretrained": "timm pretrained weights", "constructor": "the constructor's weights"}
        sha = f", weights sha256 {self.weights_sha256[:16]}..." if self.weights_sha256 else ""
        return f"{self.spec} ({source[self.weight_source]}{sha})"


def check_same_target(trained: TargetSpec, built: TargetSpec, where: str) -> None:
    """Raise `TargetMismatchError` when `built` is not the target the explainer in `where` was trained for."""
    found = trained.differences(built)
    if found:
        raise TargetMismatchError(
            f"the explainer {where} was trained for target {trained.describe()}, but the target given is "
            f"{built.describe()}: " + "; ".join(found) + ". An explainer is only valid for its own target; "
            "to run anyway, pass --allow-target-mismatch (allow_target_mismatch=True), which is recorded "
            "in the manifest."
        )


def cache_dir() -> Path:
    """Where fetched files are kept on this node: $L2R_CACHE, else ~/.cache/l2r (else a temp dir)."""
    if os.environ.get("L2R_CACHE"):
        return Path(os.environ["L2R_CACHE"])
    home = Path.home()
    return home / ".cache" / "l2r" if os.access(home, os.W_OK) else Path(tempfile.gettempdir()) / "l2r_cache"


def fetch(url: str | os.PathLike, storage_options: dict | None = None) -> str:
    """A local path for a file given as a path or an fsspec URL; URLs are downloaded once per node."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        if not Path(path).is_file():
            raise FileNotFoundError(f"file not found: {path}")
        return path
    from l2r import storage

    local = cache_dir() / "files" / hashlib.sha256(url.encode()).hexdigest()[:16] / (Path(url).name or "file")
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f"{local.name}.{os.getpid()}.part")
        try:
            with storage.open_file(url, "rb", storage_options) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"file not found: {url}") from e
        except Exception as e:
            raise OSError(f"cannot fetch {url}: {type(e).__name__}: {e}") from e
        os.replace(part, local)
    return str(local)
