"""The target model: the frozen classifier whose decisions we explain.

`TargetModel` wraps a raw network (normalised input -> logits) so that the rest of the
project only ever sees images in [0,1]: normalisation happens inside, which makes every
perturbation a blend in raw pixel space. Models come from a spec string:

- `timm:NAME` (also timm's own sources: `timm:hf-hub:ORG/NAME`, `timm:local-dir:/path`)
- `package.module:callable` - a user's own model, plus a checkpoint file; the module is found
  on `sys.path` (PYTHONPATH, the current directory), or given as a file: `path/to/model.py:callable`.

`timm:NAME` means timm's pretrained weights unless a checkpoint file is given or `random_init`
asks for an untrained model; weights that cannot be obtained are an error, never a silently
random model. `l2r.target_spec.TargetSpec` is the record that says which of these to build.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as run_checkpointed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Containers that training scripts commonly wrap a state dict in, most preferred first.
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(ValueError):
    """A weight file does not fit the network it is loaded into."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network, nothing in the hub cache)."""


class TargetModel(nn.Module):
    """A frozen classifier on images in [0,1]; `forward` returns softmax probabilities."""

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: Sequence[int],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        spec: str = "",
        background_logit: bool = False,
        crop_pct: float = 1.0,
    ):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.crop_pct = float(crop_pct)  # images are resized to input_size / crop_pct, then centre-cropped
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.spec = spec
        # Logit 0 of some ImageNet models (TensorFlow's) is "background": dropped, so that class k
        # of the data is output k.
        self.background_logit = bool(background_logit)
        self.weights_sha256 = weights_sha256(net)  # identifies the weights, wherever they came from
        # Off by default: it trades a second forward for memory, worth it only when training
        # an explainer through the target.
        self.gradient_checkpointing = False
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for a model with {self.num_classes} classes"
            )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TargetModel":
        # The target is never trained: keep BatchNorm/Dropout in inference behaviour even when
        # a surrounding module is switched to training.
        return super().train(False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_classes)` for images `(B,3,H,W)` in [0,1]."""
        x = self.normalise(x)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            out = run_checkpointed(self.net, x, use_reentrant=False)
        else:
            out = self.net(x)
        return out[:, 1:] if self.background_logit else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Softmax in float32: under bf16 autocast small probabilities would lose their ranking.
        return F.softmax(self.logits(x).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, input_size={self.input_size}, num_classes={self.num_classes}"


def classifier_weight_rows(target: TargetModel) -> torch.Tensor:
    """The target's final classifier weights, one row per class it outputs: (num_classes, features).

    The classifier is timm's `get_classifier()` where the model has one, else the last
    `nn.Linear` or 1x1 `nn.Conv2d` registered in the model with one output per logit. A
    background logit's row is dropped, as its logit is.
    """
    net = target.net
    logits = target.num_classes + int(target.background_logit)
    candidates = [net.get_classifier()] if hasattr(net, "get_classifier") else []
    candidates += reversed(list(net.modules()))
    for module in candidates:
        if isinstance(module, nn.Linear) and module.out_features == logits:
            rows = module.weight
        elif (isinstance(module, nn.Conv2d) and module.out_channels == logits
              and module.kernel_size == (1, 1) and module.groups == 1):
            rows = module.weight.flatten(1)
        else:
            continue
        return rows.detach()[int(target.background_logit):]
    raise ValueError(f"target {target.spec or type(net).__name__}: no final nn.Linear or 1x1 nn.Conv2d with "
                     f"{logits} outputs to read class weight rows from; use the explainer's "
                     f"condition 'embedding' for this model")


def weights_sha256(module: nn.Module) -> str:
    """Hex sha256 over a module's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file into a flat state dict, unwrapping the common layouts.

    Accepts safetensors files and torch pickles (loaded with `weights_only=True`): a bare state
    dict, or one under `state_dict` / `model` / `state_dict_ema`, with or without `module.`
    prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # Usually a pickle that holds more than tensors (argparse args, whole modules).
            raise CheckpointMismatchError(
                f"{path}: cannot be read with weights_only=True; save just the state dict "
                f"(torch.save(model.state_dict(), ...)). {e}"
            ) from e
    for key in STATE_DICT_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, found {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{path}: no tensors found (top-level keys: {sorted(state)[:10]})")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # safetensors starts with an 8-byte little-endian header length, then a JSON object.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, raising `CheckpointMismatchError` (naming `source`) unless it fits.

    Fits means: same keys and same shapes, except that BatchNorm's `num_batches_tracked`
    may be absent (older PyTorch did not save it).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not fit the {type(module).__name__} model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title} keys: {shown}")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict(dict(state), strict=False)


def load_checkpoint(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint file into `net`, strictly (see `read_state_dict` for the layouts)."""
    load_state_dict_checked(net, read_state_dict(path), str(path))


# Models that moved into the package (l2r.zoo): artifacts and configs written before name the old module.
MOVED_MODULES = {"benchmarks.resnet20": "l2r.zoo.resnet20"}


def import_callable(spec: str):
    """Resolve `package.module:callable` (the current directory is importable, as for `python -m`)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"model spec {spec!r}: expected 'timm:NAME' or 'package.module:callable'")
    module_name = MOVED_MODULES.get(module_name, module_name)
    if module_name.endswith(".py"):
        return _callable_from_file(spec, Path(module_name), attr)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only rephrase when the spec's own module is missing, not an import inside it.
        if e.name and module_name.startswith(e.name):
            raise ModuleNotFoundError(
                f"model spec {spec!r}: cannot import module {module_name!r} (searched sys.path, including {cwd})",
                name=e.name,
            ) from e
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def check_weights_choice(spec: str, checkpoint, random_init: bool) -> None:
    """Random weights and a weight file exclude each other (the one place this is decided)."""
    if random_init and checkpoint:
        raise ValueError(f"target {spec}: random_init and a checkpoint ({checkpoint}) exclude each other")


def build_target(
    spec: str,
    checkpoint: str | os.PathLike | None = None,
    model_kwargs: Mapping | None = None,
    random_init: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | int | None = None,
    class_names: Sequence[str] | None = None,
    background_logit: bool = False,
    init_seed: int = 0,
    crop_pct: float = 1.0,
) -> TargetModel:
    """Build the frozen target model from a spec (see the module docstring).

    timm models are pretrained unless a `checkpoint` file (which replaces the download) or
    `random_init` is given, and take their preprocessing from timm's pretrained config unless
    `mean`, `std`, `input_size` are given; a user's model needs `input_size` (mean/std default
    to ImageNet's). `checkpoint` is a local file here (`l2r.target_spec.fetch` brings URLs).
    
    The network is constructed under its own RNG seeded with `init_seed`, so that weights that do
    not come from a file (random_init, a user's constructor) are the same in every process.
    """
    kwargs = dict(model_kwargs or {})
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
    check_weights_choice(spec, checkpoint, random_init)

    if spec.startswith("timm:"):
        import timm

        name = spec[len("timm:"):]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = _create_timm_target(name, pretrained=not random_init and checkpoint is None, kwargs=kwargs)
        if checkpoint is not None:
            load_checkpoint(net, checkpoint)
        data_cfg = timm.data.resolve_data_config({}, model=net)
        mean = tuple(mean) if mean is not None else tuple(data_cfg["mean"])
        std = tuple(std) if std is not None else tuple(data_cfg["std"])
        if input_size is None:
            # A resized model (img_size kwarg) keeps its original pretrained config; trust the kwarg.
            input_size = kwargs.get("img_size", data_cfg["input_size"][-2:])
        num_classes = getattr(net, "num_classes", None)
        if class_names is None:
            class_names = _timm_class_names(net, num_classes)
    else:
        constructor = import_callable(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = constructor(**kwargs)
        if not isinstance(net, nn.Module):
            raise TypeError(f"model spec {spec!r} returned {type(net).__name__}, not an nn.Module")
        if checkpoint is not None:
            load_checkpoint(net, checkpoint)
        if input_size is None:
            raise ValueError(f"model spec {spec!r}: input_size (H, W) is required for a user's model")
        mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        std = tuple(std) if std is not None else IMAGENET_STD
        num_classes = getattr(net, "num_classes", None)

    input_size = _as_hw(input_size)
    if not isinstance(num_classes, int) or num_classes <= 0:
        num_classes = _count_outputs(net, mean, std, input_size)
    if background_logit:
        num_classes -= 1
    return TargetModel(
        net,
        mean=mean,
        std=std,
        input_size=input_size,
        num_classes=num_classes,
        class_names=class_names,
        spec=spec,
        background_logit=background_logit,
        crop_pct=crop_pct,
    )


def _create_timm_target(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub errors come in many types (connection, HTTP, missing file, no cache)
        raise WeightsUnavailableError(
            f"model timm:{name}: its pretrained weights could not be loaded ({type(e).__name__}: {e}). "
            "Ways out: give the weights as a file (--checkpoint FILE, local or a URL such as s3://...; "
            "target.checkpoint in a training config); or populate the hub cache on a machine with network "
            "access and point HF_HOME / TORCH_HOME at it; or, to explain an untrained model on purpose, "
            "--random-init (target.random_init: true)."
        ) from e


def _callable_from_file(spec: str, path: Path, attr: str):
    """`path/to/model.py:callable`: import the file as a module named after it (its folder goes on sys.path)."""
    if not path.is_file():
        raise FileNotFoundError(f"model spec {spec!r}: file not found: {path}")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # so the module's own imports of its neighbours work, as in pickling
    module = importlib.import_module(path.stem)
    if not hasattr(module, attr):
        raise AttributeError(f"model spec {spec!r}: {path} has no attribute {attr!r}")
    return getattr(module, attr)


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return (size[0], size[0])
    return size[-2:]


@torch.no_grad()
def _count_outputs(net: nn.Module, mean, std, input_size) -> int:
    # The model does not say how many classes it has: ask it, with one blank image.
    was_training = net.training
    net.eval()
    out = net(torch.zeros(1, len(mean), *input_size))
    net.train(was_training)
    return int(out.shape[-1])


def _timm_class_names(net: nn.Module, num_classes: int | None) -> list[str] | None:
    # ImageNet-style label names when timm knows them for this model; None otherwise.
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(net)
        if subset is None:
            return None
        names = ImageNetInfo(subset).label_descriptions()
    except Exception:  # label metadata is a convenience, never a reason to fail
        return None
    return list(names) if num_classes is not None and len(names) == num_classes else None
