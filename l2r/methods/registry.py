"""The method registry: one `Method` record per attribution method, in one place.

A new method is one new module in `l2r/methods/` that defines its function and calls
`register(Method(...))`, plus its import in `l2r/methods/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Method:
    """An attribution method.

    compute(model, images, targets, **settings) -> maps (B, H', W'), any size (resized to the input).
    cost(settings) -> (forward passes, backward passes) of the target per image, exact.
    """

    name: str
    compute: Callable
    defaults: dict = field(default_factory=dict)
    cost: Callable[[dict], tuple[int, int]] = lambda settings: (0, 0)
    needs_grad: bool = False  # backpropagates through the target (not under inference mode)
    package: str | None = None  # the optional package it imports ("captum", "pytorch_grad_cam")
    extra_options: tuple[str, ...] = ()  # options accepted besides those with a default
    control: bool = False  # knows nothing of the image or model: every method should beat it
    needs_explainer: bool = False  # its maps come from a trained explainer (option `explainer`)
    bf16: bool = False  # may run under a bf16 autocast (the others hand tensors to numpy: float32 only)
    summary: str = ""


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attribution method {name!r}; choose one of {method_names()}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def control_names() -> tuple[str, ...]:
    return tuple(name for name, method in _REGISTRY.items() if method.control)


def explainer_names() -> tuple[str, ...]:
    """The methods whose maps come from a trained explainer."""
    return tuple(name for name, method in _REGISTRY.items() if method.needs_explainer)
