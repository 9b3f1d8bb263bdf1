"""The attribution job's configuration: what a run is asked to do, recorded in its manifest."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from l2r import storage
from l2r.methods import explainer_names, method_names
from l2r.metrics import Protocol
from l2r.target_spec import TargetSpec
# bf16 autocasts the passes (softmax stays float32, l2r.classifier); the curves themselves are
# accumulated in float32 either way.
PRECISIONS = ("fp32", "bf16")
# How the actors run the target: "eager" (the reference) or "channels_last" (NHWC weights and
# activations). Both stay fp32 unless precision says otherwise, so the AUCs stay those of eager
# fp32 (tests/test_attribute.py measures how close). torch.compile is not offered: with the
# curves' varying batch sizes its first batch of MobileNetV1 had not compiled after 6 minutes on
# the 2-core CPU (benchmarks/RESULTS.md, "Attribution throughput on a CPU").
FAST_PATHS = ("eager", "channels_last")
# "auto": the fastest measured on each device (benchmarks/attribute.py --fast-path; benchmarks/RESULTS.md,
# "Attribution throughput on a CPU" and "GPU runs").
FAST_PATH_DEFAULT = {"cpu": "channels_last", "cuda": "channels_last"}
DEVICES = ("auto", "cpu", "cuda")  # auto: GPU actors when the cluster has GPUs


def resolve_fast_path(fast_path: str, device: str) -> str:
    return FAST_PATH_DEFAULT[device] if fast_path == "auto" else fast_path


def all_methods() -> tuple[str, ...]:
    return method_names()


def defaults(cls) -> dict:
    """The default of each field of a dataclass that has one (what a command line offers)."""
    found = {}
    for item in dataclasses.fields(cls):
        if item.default is not dataclasses.MISSING:
            found[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            found[item.name] = item.default_factory()
    return found


def _as(cls, value, name: str):
    """A nested section: the dataclass itself, or a dict of its fields (YAML, JSON, a manifest)."""
    if isinstance(value, dict):
        return cls(**value)
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__module__}.{cls.__name__} or a dict of its fields, got {value!r}")
    return value


@dataclass
class AttributeConfig:
    """Everything a run needs; recorded in the manifest."""

    shards: str | list[str]
    output: str
    # The model explained (spec, weights, kwargs, preprocessing; a dict of its fields also does).
    # None: the one the explainer was trained for, from its artifact.
    target: TargetSpec | None = None
    explainer: str | None = None  # artifact directory or URL (needed for method l2r)
    allow_target_mismatch: bool = False  # use the explainer with a target it was not trained for
    methods: tuple[str, ...] = ("l2r",)  # names in l2r.methods
    method_options: dict = field(default_factory=dict)  # {"rise": {"n_masks": 500}, ...}
    refine_steps: int = 0  # test-time refinement of the l2r map (l2r.refine)
    # What a score means: steps, reference, target rule, the impute reference's noise (a dict also does).
    protocol: Protocol = field(default_factory=Protocol)
    sanity_stages: int = 0  # > 0: the model randomisation sanity check with this many cascade stages (l2r.sanity)
    sanity_seed: int = 0
    with_mask: bool = False  # read mask.png of each sample; add pointing_hit and mask_auroc
    holdout_every: int = 0  # > 0: only the samples a training run with data.holdout_every N held back
    device: str = "auto"  # DEVICES
    actors: int | None = None  # default: one per GPU; on CPU one per CPU left after reads
    actor_cpus: float | None = None  # default: 1 per GPU actor; on CPU what reads leave, shared
    actor_gpus: float = 1.0
    actor_resources: dict = field(default_factory=dict)  # custom Ray resources per actor, e.g. {"gpu_node": 1}
    threads: int | None = None  # torch threads per actor (default from actor_cpus)
    batch_size: int | None = None  # images per actor call (default CPU 64, 16 above 64x64 px; GPU 256)
    forward_batch: int | None = None  # perturbed images per target forward (CPU 64, 16 above 64x64 px; GPU 1024)
    precision: str = "fp32"  # fp32 | bf16 (autocast of every target/explainer pass; recorded in the protocol)
    fast_path: str = "auto"  # auto | eager | channels_last (FAST_PATHS; recorded in the protocol)
    read_cpus: float = 0.25
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs
    overwrite: bool = False
    progress_interval: float = 30.0
    ray_progress_bars: bool = False
    address: str | None = None  # ray.init address (None: RAY_ADDRESS or a local instance)

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        known = all_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {known}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeated: {self.methods}")
        self.protocol = _as(Protocol, self.protocol, "protocol")
        self._resolve_models()
        if self.sanity_stages < 0:
            raise ValueError("sanity_stages must be >= 0 (0: no sanity check)")
        if self.refine_steps < 0:
            raise ValueError("refine_steps must be >= 0")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fast_path not in ("auto", *FAST_PATHS):
            raise ValueError(f"fast_path must be auto or one of {FAST_PATHS}, got {self.fast_path!r}")
        extra = set(self.method_options) - set(self.methods)
        if extra:
            raise ValueError(f"method_options for methods not run: {sorted(extra)}")
        for method in set(self.method_options) & set(explainer_names()):
            taken = set(self.method_options[method]) & {"explainer", "refine_steps", "protocol"}
            if taken:
                raise ValueError(f"method_options[{method!r}] sets {sorted(taken)}: the job's own settings "
                                 "(explainer=, refine_steps=, protocol=) give them")

    def _resolve_models(self) -> None:
        """The explainer as an absolute folder or URL, the target as a TargetSpec (the explainer's own when
        not given) with an absolute checkpoint: actors may run in another directory."""
        learned = [m for m in self.methods if m in explainer_names()]
        if learned and not self.explainer:
            raise ValueError(f"method {learned[0]!r} needs an explainer artifact directory (explainer=...)")
        if self.explainer:
            from l2r.artifact import resolve_explainer

            self.explainer = storage.absolute(resolve_explainer(self.explainer))  # a shipped name -> its folder
        if self.target is None:
            if not self.explainer:
                raise ValueError("give the target model (target=... / --model) or an explainer artifact that records it")
            from l2r.artifact import local_artifact, read_target_spec

            recorded = read_target_spec(local_artifact(self.explainer, self.storage_options))
            # What was asked for, not what the build resolved (the driver's build fills those again).
            self.target = dataclasses.replace(recorded, class_names=None, num_classes=None, weights_sha256=None)
        self.target = _as(TargetSpec, self.target, "target")
        if self.target.checkpoint and not storage.is_url(self.target.checkpoint):
            self.target = dataclasses.replace(self.target, checkpoint=os.path.abspath(self.target.checkpoint))

    def target_spec(self) -> TargetSpec:
        """A copy of the target for a build (a build fills the copy's resolved fields, not the config's)."""
        return dataclasses.replace(self.target)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

