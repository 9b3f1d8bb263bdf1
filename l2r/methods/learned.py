"""`l2r`: the trained explainer's map, one forward of the explainer (METHOD.md), optionally refined
at test time (`l2r.refine`).

Options: `explainer` (an `l2r.explainer.Explainer` trained for this target, e.g.
`l2r.load(...).explainer`), `refine_steps` (0: off) and `protocol` (`l2r.metrics.Protocol`: the
reference and steps the refinement optimises and verifies against; the scoring protocol).
"""
from __future__ import annotations

import torch

from l2r.methods.registry import Method, register
from l2r.metrics import Protocol

NAME = "l2r"


def _check(explainer):
    if explainer is None:
        raise ValueError(f"method {NAME!r} needs a trained explainer: "
                         f"attribute({NAME!r}, target, images, explainer=l2r.load(...))")
    return explainer


def _learned(model, images, targets, explainer, refine_steps, protocol):
    with torch.no_grad():
        maps = _check(explainer)(images, targets)[:, 0].float()
    if refine_steps:
        from l2r.refine import refine

        maps, _ = refine(model, images, maps, targets, steps=int(refine_steps), protocol=protocol)
    return maps.detach()


def _cost(settings) -> tuple[int, int]:
    # An explainer on the target's own layers runs the target once per map.
    forwards = 1 if _check(settings["explainer"]).config.get("backbone") == "target" else 0
    backwards = 0
    if settings["refine_steps"]:
        from l2r.refine import refine_cost

        extra = refine_cost(int(settings["refine_steps"]), protocol=settings["protocol"])
        forwards, backwards = forwards + extra["forward_passes"], extra["backward_passes"]
    return forwards, backwards


register(Method(NAME, _learned, defaults={"explainer": None, "refine_steps": 0, "protocol": Protocol()},
                cost=_cost, needs_explainer=True, bf16=True, summary="the trained explainer (one forward)"))
