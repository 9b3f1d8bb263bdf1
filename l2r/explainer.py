"""The explainer network: backbone features + a class-conditioned decoder -> a 1xHxW score map.

`E(x, c)` (METHOD.md section 4). Only the ranking of the scores matters, so the output is a
raw, unnormalised map. Three kinds of backbone share one small interface
(`forward(images in [0,1]) -> (features, covered_size)`, attribute `channels`):

- a timm ViT, read through `forward_intermediates` (the paper: frozen DINOv3 ViT-L/16,
  blocks 4, 11, 17, 23);
- a timm CNN, read through `features_only`;
- `target`: the frozen target model's own layers, through forward hooks, so that a user's
  model needs no second backbone (convolutional stages, or a ViT's blocks, whose tokens are
  put back on their patch grid).

The decoder is a small DPT: per level a 1x1 projection, resampling to a pyramid (ViTs have a
single scale), class conditioning, top-down fusion, upsampling to the input resolution,
refinement convs and a final small-init 3x3 conv.

An explainer is stored as a directory: `model.safetensors` (its own weights; never the
target's) and `explainer.json` (the build config plus the caller's metadata).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from l2r.classifier import TargetModel, classifier_weight_rows, load_state_dict_checked, sha256_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "explainer.json"
FORMAT_VERSION = 1

DEFAULT_CONFIG = {
    "backbone": "target",  # "target" or "timm:NAME"
    "layers": None,  # target: module names inside target.net, e.g. ["layer1", "layer2", "layer3"]
    "blocks": None,  # timm ViT: block indices for forward_intermediates
    "out_indices": None,  # timm CNN: features_only stages (None: timm's default)
    "model_kwargs": {},  # extra timm.create_model kwargs (img_size, dynamic_img_size, ...)
    "pretrained": False,  # timm backbone weights from timm (hub or cache)
    "backbone_checkpoint": None,  # or from a local file
    "frozen": True,
    "num_classes": None,  # default: the target's
    "dim": 64,  # decoder width
    "embed_dim": None,  # class embedding width (default: dim)
    # How the decoder learns which class to explain: "embedding", a vector learnt per class id
    # (random for a class training never targeted), or "classifier", the target's own classifier
    # weight row for the class, projected: defined for every class the target has.
    "condition": "embedding",
    "head_dim": 32,  # width of the full-resolution refinement convs
}


CONDITIONS = ("embedding", "classifier")

# --------------------------------------------------------------------------- backbones


class TargetLayersBackbone(nn.Module):
    """Features from named layers of the frozen target model, captured by forward hooks.

    The target is not a submodule: move it to the explainer's device yourself.
    """

    single_scale = False

    def __init__(self, target: TargetModel, layers: list[str]):
        super().__init__()
        if not layers:
            raise ValueError("backbone 'target' needs 'layers', e.g. ['layer1', 'layer2', 'layer3']")
        # Kept in a list so nn.Module does not register it: the target's weights are not the
        # explainer's to train or save, and it stays frozen whatever the explainer does.
        self._target = [target]
        self.layers = list(layers)
        for name in self.layers:
            try:
                target.net.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in target.net.named_children()]
                raise ValueError(f"target model has no layer {name!r}; top-level layers: {names}") from None
        with torch.no_grad():
            probe = torch.zeros(1, 3, *target.input_size, device=target.mean.device)
            outputs = self._capture(probe)
        # A ViT's blocks share one token grid: the decoder then builds a DPT pyramid from them.
        self.single_scale = all(f.ndim == 3 for f in outputs)
        self.channels = [f.shape[1] for f in self._as_grids(outputs)]

    @property
    def target(self) -> TargetModel:
        return self._target[0]

    def _capture(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The named layers' raw outputs, in the order of `layers`."""
        captured = {}

        def hook_for(name):
            def hook(module, inputs, output):
                captured[name] = output[0] if isinstance(output, (tuple, list)) else output

            return hook

        net = self.target.net
        # Hooks live only for this call: the target is also run (many times) by the objective.
        handles = [net.get_submodule(n).register_forward_hook(hook_for(n)) for n in self.layers]
        try:
            net(self.target.normalise(images))
        finally:
            for handle in handles:
                handle.remove()
        return [captured[n] for n in self.layers]

    def _as_grids(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        features = []
        for name, f in zip(self.layers, outputs):
            if f.ndim == 3:  # a transformer block's tokens (B, prefix + h*w, C) -> (B, C, h, w)
                f = self._token_grid(f, name)
            elif f.ndim != 4:
                raise ValueError(
                    f"target layer {name!r} outputs shape {tuple(f.shape)}, not (B,C,h,w) or (B,tokens,C); "
                    "pick convolutional or transformer layers, or use a timm backbone"
                )
            features.append(f)
        return features

    def _token_grid(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        patch_embed = getattr(self.target.net, "patch_embed", None)
        grid = getattr(patch_embed, "grid_size", None)
        if grid is None:  # no timm patch embedding: assume a square grid after the prefix tokens
            side = math.isqrt(tokens.shape[1])
            grid = (side, side)
        h, w = grid
        prefix = tokens.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"target layer {name!r}: {tokens.shape[1]} tokens do not hold a {h}x{w} patch grid")
        return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def forward(self, images):
        return self._as_grids(self._capture(images)), tuple(images.shape[-2:])


class TimmViTBackbone(nn.Module):
    """Token grids of chosen blocks of a timm ViT (`forward_intermediates`), as NCHW maps."""

    single_scale = True

    def __init__(self, model: nn.Module, blocks: list[int]):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates; use out_indices (features_only)")
        self.blocks = list(blocks)
        # Drop blocks after the last one we read and the classifier head: less compute, smaller files.
        model.prune_intermediate_layers(self.blocks, prune_norm=True, prune_head=True)
        self.model = model
        self.channels = [model.embed_dim] * len(self.blocks)
        self.patch_size = tuple(model.patch_embed.patch_size)
        strict = getattr(model.patch_embed, "strict_img_size", False)
        dynamic = getattr(model, "dynamic_img_size", False)
        # A ViT with a fixed input size gets the image resized to it; others get it padded.
        self.fixed_size = tuple(model.patch_embed.img_size) if strict and not dynamic else None
        _register_normalisation(self, model)

    def forward(self, images):
        x = (images - self.mean) / self.std
        height, width = x.shape[-2:]
        if self.fixed_size is not None:
            if (height, width) != self.fixed_size:
                x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False)
            covered = (height, width)
        else:
            x, covered = _pad_to_multiple(x, self.patch_size)
        features = self.model.forward_intermediates(
            x, indices=self.blocks, intermediates_only=True, output_fmt="NCHW"
        )
        return list(features), covered


class TimmCNNBackbone(nn.Module):
    """Stages of a timm CNN created with `features_only=True`."""

    single_scale = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.channels = list(model.feature_info.channels())
        # Pad to the coarsest stride so every feature map tiles the padded image exactly.
        self.stride = max(model.feature_info.reduction())
        _register_normalisation(self, model)

    def forward(self, images):
        x = (images - self.mean) / self.std
        x, covered = _pad_to_multiple(x, (self.stride, self.stride))
        return list(self.model(x)), covered


def _register_normalisation(backbone: nn.Module, model: nn.Module) -> None:
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    # Not persistent: they follow from the model name, so they need not be in the weight file.
    backbone.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
    backbone.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)


def _pad_to_multiple(x: torch.Tensor, multiple: tuple[int, int]):
    height, width = x.shape[-2:]
    padded_h = math.ceil(height / multiple[0]) * multiple[0]
    padded_w = math.ceil(width / multiple[1]) * multiple[1]
    if (padded_h, padded_w) != (height, width):
        # Zero on the normalised input is the dataset's mean colour: neutral for the backbone.
        x = F.pad(x, (0, padded_w - width, 0, padded_h - height))
    return x, (padded_h, padded_w)


def _create_timm(name: str, pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module:
    import timm

    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"backbone checkpoint file not found: {checkpoint}")
        # timm's own loader: it knows each model's key conversions and head filtering.
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)}, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


# --------------------------------------------------------------------------- decoder


def conv_bn_gelu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


def resampler(dim: int, scale: float) -> nn.Module:
    """DPT's reassembly: learned up- or downsampling of one level by `scale`."""
    if scale > 1:
        return nn.ConvTranspose2d(dim, dim, kernel_size=int(scale), stride=int(scale))
    if scale < 1:
        return nn.Conv2d(dim, dim, 3, stride=int(round(1 / scale)), padding=1)
    return nn.Identity()


def pyramid_scales(num_levels: int) -> list[float]:
    """Resampling factors turning a single-scale ViT into a pyramid (DPT: 4, 2, 1, 1/2)."""
    if num_levels == 1:
        return [1.0]
    return [2.0 ** (num_levels - 2 - i) for i in range(num_levels)]


class ClassConditioning(nn.Module):
    """Concatenate the class embedding to every position, then Linear (1x1 conv) + GELU back to `dim`."""

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim + embed_dim, dim, 1)
        self.act = nn.GELU()

    def forward(self, x, class_embedding):
        e = class_embedding[:, :, None, None].to(x.dtype).expand(-1, -1, *x.shape[-2:])
        return self.act(self.proj(torch.cat([x, e], dim=1)))


class ClassifierRowEmbedding(nn.Module):
    """A class's embedding from the target's classifier weight row: unit-normalised, then Linear.

    The rows are the target's, not the explainer's: kept as a non-persistent buffer, so the
    explainer's file holds only the projection and loading rebuilds the rows from the target.
    """

    def __init__(self, rows: torch.Tensor, embed_dim: int):
        super().__init__()
        self.register_buffer("rows", F.normalize(rows.detach().float(), dim=1), persistent=False)
        self.project = nn.Linear(rows.shape[1], embed_dim)

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        return self.project(self.rows[targets])


class Decoder(nn.Module):
    def __init__(self, in_channels, scales, num_classes, dim, embed_dim, head_dim, classifier_rows=None):
        super().__init__()
        if classifier_rows is None:
            self.class_embed = nn.Embedding(num_classes, embed_dim)
        else:
            self.class_embed = ClassifierRowEmbedding(classifier_rows, embed_dim)
        self.project = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.resample = nn.ModuleList(resampler(dim, s) for s in scales)
        self.condition = nn.ModuleList(ClassConditioning(dim, embed_dim) for _ in in_channels)
        self.fuse = nn.ModuleList(conv_bn_gelu(dim, dim) for _ in in_channels[1:])
        # Narrow before going to full resolution: that is where activations get expensive.
        self.head = conv_bn_gelu(dim, head_dim)
        self.refine = nn.Sequential(conv_bn_gelu(head_dim, head_dim), conv_bn_gelu(head_dim, head_dim))
        self.out = nn.Conv2d(head_dim, 1, 3, padding=1)
        # Small init: the map starts near-flat and the objective grows its scale as needed.
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.zeros_(self.out.bias)

    def forward(self, features, targets, covered_size, out_size):
        class_embedding = self.class_embed(targets)
        levels = [
            condition(resample(project(f)), class_embedding)
            for f, project, resample, condition in zip(features, self.project, self.resample, self.condition)
        ]
        # Top-down: start at the last (coarsest) level, merge each finer one in turn.
        y = levels[-1]
        for i in reversed(range(len(levels) - 1)):
            finer = levels[i]
            y = F.interpolate(y, size=finer.shape[-2:], mode="bilinear", align_corners=False) + finer
            y = self.fuse[i](y)
        y = self.head(y)
        y = F.interpolate(y, size=covered_size, mode="bilinear", align_corners=False)
        y = y[..., : out_size[0], : out_size[1]]  # drop what padding added
        return self.out(self.refine(y))


# --------------------------------------------------------------------------- explainer


class Explainer(nn.Module):
    """`forward(images (B,3,H,W) in [0,1], targets (B,) int64) -> (B,1,H,W)` raw scores."""

    def __init__(self, backbone: nn.Module, decoder: Decoder, frozen: bool, config: dict):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.frozen = frozen
        self.config = config
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "Explainer":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics
        return self

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features, covered = self.backbone(images)
        else:
            features, covered = self.backbone(images)
        return self.decoder(features, targets, covered, tuple(images.shape[-2:]))


def build_explainer(config: dict, target: TargetModel | None = None) -> Explainer:
    """Build an explainer from a config dict (keys and defaults: `DEFAULT_CONFIG`).

    Examples: `{"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 32}`;
    `{"backbone": "timm:resnet18", "out_indices": [1, 2, 3]}`;
    the paper's: `{"backbone": "timm:vit_large_patch16_dinov3.lvd1689m", "blocks": [4, 11, 17, 23],
    "pretrained": True, "frozen": True, "dim": 256}`.
    """
    return _build(config, target, load_backbone_weights=True)


def _build(config: dict, target: TargetModel | None, load_backbone_weights: bool) -> Explainer:
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown explainer config keys: {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **config}
    if cfg["num_classes"] is None:
        if target is None:
            raise ValueError("explainer config needs num_classes (or pass the target model)")
        cfg["num_classes"] = target.num_classes
    if cfg["embed_dim"] is None:
        cfg["embed_dim"] = cfg["dim"]
    if cfg["condition"] not in CONDITIONS:
        raise ValueError(f"explainer condition {cfg['condition']!r}: expected one of {list(CONDITIONS)}")
    classifier_rows = None
    if cfg["condition"] == "classifier":
        if target is None:
            raise ValueError("explainer condition 'classifier' needs the target model (target=...)")
        classifier_rows = classifier_weight_rows(target)
        if classifier_rows.shape[0] != cfg["num_classes"]:
            raise ValueError(f"explainer condition 'classifier': the target's classifier has "
                             f"{classifier_rows.shape[0]} class rows, the explainer {cfg['num_classes']} classes")

    backbone_spec = cfg["backbone"]
    if backbone_spec == "target":
        if target is None:
            raise ValueError("backbone 'target' needs the target model (target=...)")
        if not cfg["frozen"]:
            raise ValueError("backbone 'target' is always frozen: the model being explained must not change")
        backbone = TargetLayersBackbone(target, cfg["layers"])
    elif backbone_spec.startswith("timm:"):
        name = backbone_spec[len("timm:"):]
        pretrained = cfg["pretrained"] and load_backbone_weights
        checkpoint = cfg["backbone_checkpoint"] if load_backbone_weights else None
        kwargs = dict(cfg["model_kwargs"] or {})
        if cfg["blocks"] is not None:
            backbone = TimmViTBackbone(_create_timm(name, pretrained, checkpoint, **kwargs), cfg["blocks"])
        else:
            if cfg["out_indices"] is not None:
                kwargs["out_indices"] = tuple(cfg["out_indices"])
            model = _create_timm(name, pretrained, checkpoint, features_only=True, **kwargs)
            backbone = TimmCNNBackbone(model)
    else:
        raise ValueError(f"explainer backbone {backbone_spec!r}: expected 'target' or 'timm:NAME'")

    num_levels = len(backbone.channels)
    scales = pyramid_scales(num_levels) if backbone.single_scale else [1.0] * num_levels
    decoder = Decoder(
        backbone.channels,
        scales,
        num_classes=cfg["num_classes"],
        dim=cfg["dim"],
        embed_dim=cfg["embed_dim"],
        head_dim=cfg["head_dim"],
        classifier_rows=classifier_rows,
    )
    return Explainer(backbone, decoder, frozen=cfg["frozen"], config=cfg)


def save_explainer(path: str | os.PathLike, explainer: Explainer, metadata: dict | None = None) -> Path:
    """Write `model.safetensors` + `explainer.json` into the directory `path`.

    The weights are the explainer's own (decoder, and a timm backbone's), never the target's.
    `metadata` must be JSON-serialisable (e.g. training data, steps, objective settings).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # clone(): safetensors refuses tensors that share memory.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in explainer.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    # The target an explainer was trained for is recorded once, by l2r.artifact (metadata "target"), and
    # checked there; documents written before that also have a top-level "target", which is not read.
    document = {"format_version": FORMAT_VERSION, "config": explainer.config, "metadata": metadata or {},
                # Checked on load: weights changed after this was written are refused.
                "file_sha256": {WEIGHTS_FILE: sha256_file(path / WEIGHTS_FILE)}}
    (path / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return path


def load_explainer(path: str | os.PathLike, target: TargetModel | None = None) -> tuple[Explainer, dict]:
    """Rebuild an explainer saved by `save_explainer`; returns `(explainer, metadata)`.

    Weights load strictly: a file that does not fit raises `CheckpointMismatchError` naming it.
    `target` is needed when the explainer reads the target's layers.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"explainer file not found: {f}")
    document = json.loads(config_file.read_text())
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_file}: unsupported format_version {document.get('format_version')!r}")
    recorded_sha = document.get("file_sha256", {}).get(WEIGHTS_FILE)  # absent in artifacts written before
    if recorded_sha is not None and sha256_file(weights_file) != recorded_sha:
        raise ValueError(f"{weights_file}: its sha256 differs from the one {config_file} records: the weights "
                         "were changed after the artifact was written; refusing to load them")
    # Backbone weights come from our own file: no hub download or backbone checkpoint needed.
    explainer = _build(document["config"], target, load_backbone_weights=False)
    load_state_dict_checked(explainer, load_file(str(weights_file), device="cpu"), str(weights_file))
    return explainer, document.get("metadata", {})
