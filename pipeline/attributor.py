"""The attribution job's work on one batch, with no Ray in it: decoded rows in, output rows out.

``Attributor`` loads the target (and explainer) once and turns a batch of decoded rows into one
output row per (image, method): prediction, target class, the method's map, the exact
deletion/insertion curves. ``AttributionWorker`` is what the job's actors run: an Attributor
whose rows are written to the output by the actor itself (``l2r.results.write_parts``), so
that only a one-line summary per part goes back to the driver.

Costs recorded per row: ``forward_passes`` / ``backward_passes`` (target passes per image
to produce the map; the evaluation's 2(K-2)+1 forwards are the same for every method) and
``seconds`` (wall seconds per image to produce the map, amortised over the batch);
``eval_seconds`` is the per-image time of the exact curves.

Evidence masks (``with_mask``): for shards whose samples carry a ``mask.png`` (the synthetic
data of ``l2r.shards``), each row also gets ``pointing_hit`` (the map's top pixel lies
inside the mask) and ``mask_auroc`` (AUROC of the map's scores for telling mask pixels from the
rest, ties averaged), both from ``l2r.metrics`` on the method's raw map. Both are null without
the option, for error rows, and where undefined (an empty mask; for ``mask_auroc`` also a mask
covering the whole image).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from l2r.metrics import Protocol
from pipeline.attribute_config import EXPLAINER_METHOD
from l2r.results import SCHEMA, Output, write_parts


class Attributor:
    """Loads the target (and explainer) once; turns a batch of decoded rows into output rows."""

    def __init__(self, settings: dict):
        import torch

        from l2r.target_record import TargetRecord

        threads = settings.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(settings["device"])
        self.methods = tuple(settings["methods"])
        self.method_options = settings.get("method_options") or {}
        self.refine_steps = int(settings.get("refine_steps") or 0)
        self.protocol = Protocol(**settings["protocol"])
        self.forward_batch = int(settings["forward_batch"])
        self.precision = settings.get("precision") or "fp32"
        self.with_mask = bool(settings.get("with_mask"))
        record = TargetRecord.from_dict(settings["target"])
        expected = record.weights_sha256
        self.target = record.build(self.device, settings.get("storage_options"))
        if expected and record.weights_sha256 != expected:
            # E.g. a checkpoint path that holds another file on this node than on the driver's.
            raise RuntimeError(f"target {record.spec}: the weights loaded on this node (sha256 "
                               f"{record.weights_sha256[:16]}...) are not the driver's ({expected[:16]}...)")
        self.fast_path = settings.get("fast_path") or "eager"
        if self.fast_path == "channels_last":
            # NHWC weights: the convolutions run channels-last, inputs converted on the fly.
            self.target.to(memory_format=torch.channels_last)
        self.explainer = None
        self.explainer_forwards = 0
        if EXPLAINER_METHOD in self.methods:
            from l2r.artifact import local_artifact
            from l2r.explainer import load_explainer

            folder = local_artifact(settings["explainer"], settings.get("storage_options"))
            self.explainer, _ = load_explainer(folder, target=self.target)
            self.explainer.to(self.device).eval()
            # An explainer on the target's own layers runs the target once per map.
            self.explainer_forwards = 1 if self.explainer.config.get("backbone") == "target" else 0
        self.sanity_models = self._sanity_models(settings) if settings.get("sanity_stages") else []
        self.calls = 0

    def _sanity_models(self, settings) -> list[tuple]:
        """(target, explainer) per cascade stage: the target randomised from the top (l2r.sanity)."""
        import warnings

        from l2r.sanity import cascade, randomised_copy

        models = []
        for layers in cascade(self.target.net, int(settings["sanity_stages"])):
            target = randomised_copy(self.target, layers, int(settings.get("sanity_seed") or 0))
            explainer = None
            if self.explainer is not None:
                from l2r.artifact import local_artifact
                from l2r.explainer import load_explainer

                with warnings.catch_warnings():  # it is not the explainer's target, on purpose
                    warnings.simplefilter("ignore")
                    explainer, _ = load_explainer(local_artifact(settings["explainer"], settings.get("storage_options")),
                                                  target=target)
                explainer.to(self.device).eval()
            models.append((target, explainer))
        return models

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _map(self, method, images, targets, target=None, explainer=None):
        """(maps (B,H,W), cost per image) for one method; of another target (and its explainer) if given."""
        import torch

        target = target or self.target
        if method == EXPLAINER_METHOD:
            with torch.no_grad():
                maps = (explainer or self.explainer)(images, targets)[:, 0].float()
            cost = {"forward_passes": self.explainer_forwards, "backward_passes": 0}
            if self.refine_steps:
                from l2r.refine import refine

                # Verified against the same exact protocol the rows are scored with.
                maps, extra = refine(target, images, maps, targets, steps=self.refine_steps,
                                     reference=self.protocol.reference, eval_steps=self.protocol.steps)
                cost = {k: cost[k] + extra[k] for k in cost}
            return maps.detach(), cost
        from l2r.methods import attribute

        # Baselines make their maps in float32 whatever the precision: Captum and pytorch-grad-cam
        # hand activations and gradients to numpy, which has no bfloat16.
        with torch.autocast(self.device.type, enabled=False):
            return attribute(method, target, images, targets, **self.method_options.get(method, {}))

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def __call__(self, batch: dict) -> pa.Table:
        with self._autocast():
            return self._rows(batch)

    def _rows(self, batch: dict) -> pa.Table:
        import torch

        from l2r.images import encode_heatmap, to_tensor
        from l2r.metrics import predict

        self.calls += 1
        keys, sources = batch["key"], batch["source"]
        labels = np.asarray(batch["label"], dtype=np.int64)
        errors = [None if e is None else str(e) for e in batch["error"]]
        n = len(keys)
        if self.protocol.target == "ground_truth":
            classes = self.target.num_classes
            errors = [e if e is not None else
                      "missing label: target rule 'ground_truth' needs a .cls member" if labels[i] < 0 else
                      f"label {labels[i]} out of range: the target has {classes} classes" if labels[i] >= classes else None
                      for i, e in enumerate(errors)]
        valid = np.array([e is None for e in errors], dtype=bool)
        idx = np.flatnonzero(valid)
        per_method = {}  # method -> dict of per-valid-image arrays
        pred = pred_prob = target = target_prob = None
        h, w = batch["image"].shape[1:3]
        masks = None
        if self.with_mask:
            if "mask" not in batch:
                raise ValueError("with_mask is set but the batch has no 'mask' column (read_shards(with_mask=True))")
            masks = torch.from_numpy(np.asarray(batch["mask"], dtype=bool)[idx]).to(self.device)
        if len(idx):
            images = to_tensor(batch["image"][idx]).to(self.device)
            clean = predict(self.target, images, self.forward_batch)
            pred_prob_t, pred_t = clean.max(dim=1)
            if self.protocol.target == "ground_truth":
                targets = torch.as_tensor(labels[idx], device=self.device)
            else:
                targets = pred_t
            target_prob_t = clean.gather(1, targets.view(-1, 1))[:, 0]
            pred, pred_prob = pred_t.cpu().numpy(), pred_prob_t.cpu().numpy()
            target, target_prob = targets.cpu().numpy(), target_prob_t.cpu().numpy()
            for method in self.methods:
                per_method[method] = self._run_method(method, images, targets, clean, len(idx), masks)

        position = {int(i): j for j, i in enumerate(idx)}
        rows = {name: [] for name in SCHEMA.names}
        for i in range(n):
            j = position.get(i)
            for method in self.methods:
                res = per_method.get(method)
                err = errors[i]
                if err is None and res["error"][j] is not None:
                    err = res["error"][j]
                ok = err is None
                rows["key"].append(str(keys[i]))
                rows["source"].append(str(sources[i]))
                rows["label"].append(int(labels[i]) if labels[i] >= 0 else None)
                rows["pred"].append(int(pred[j]) if j is not None else None)
                rows["pred_prob"].append(float(pred_prob[j]) if j is not None else None)
                rows["target"].append(int(target[j]) if j is not None else None)
                rows["target_prob"].append(float(target_prob[j]) if j is not None else None)
                rows["method"].append(method)
                rows["deletion_auc"].append(float(res["deletion_auc"][j]) if ok else None)
                rows["insertion_auc"].append(float(res["insertion_auc"][j]) if ok else None)
                rows["deletion_curve"].append(res["deletion_curve"][j] if ok else None)
                rows["insertion_curve"].append(res["insertion_curve"][j] if ok else None)
                rows["heatmap"].append(encode_heatmap(res["maps"][j]) if ok else None)
                rows["height"].append(int(h))
                rows["width"].append(int(w))
                rows["forward_passes"].append(res["forward_passes"] if j is not None else None)
                rows["backward_passes"].append(res["backward_passes"] if j is not None else None)
                rows["seconds"].append(res["seconds"] if j is not None else None)
                rows["eval_seconds"].append(res["eval_seconds"] if j is not None else None)
                rows["error"].append(err)
                evidence = ok and "pointing_hit" in res
                rows["pointing_hit"].append(res["pointing_hit"][j] if evidence else None)
                rows["mask_auroc"].append(res["mask_auroc"][j] if evidence else None)
                rows["sanity_spearman"].append(res["sanity_spearman"][j] if ok and "sanity_spearman" in res else None)
        return pa.table(rows, schema=SCHEMA)

    def _sanity(self, method, images, targets, maps) -> list[list[float]]:
        """Per image, the Spearman correlation of `maps` with the method's maps on each randomised target."""
        import torch

        from l2r.sanity import spearman

        per_stage = []
        for target, explainer in self.sanity_models:
            randomised, _ = self._map(method, images, targets, target, explainer)
            randomised = randomised.reshape(maps.shape).float()
            per_stage.append(spearman(maps, torch.nan_to_num(randomised)))
        table = torch.stack(per_stage, dim=1).tolist()  # (B, stages); NaN where a map is constant
        return [[float(v) for v in row] for row in table]

    def _run_method(self, method, images, targets, clean, b, masks=None) -> dict:
        import torch

        from l2r.metrics import deletion_insertion

        self._sync()
        start = time.perf_counter()
        try:
            maps, cost = self._map(method, images, targets)
        except Exception as exc:
            if self.calls == 1:
                # A method that fails on the first batch is misconfigured: fail the job loudly.
                raise RuntimeError(f"method {method!r} failed: {type(exc).__name__}: {exc}") from exc
            message = f"method failed: {method}: {type(exc).__name__}: {exc}"
            return {"error": [message] * b, "forward_passes": None, "backward_passes": None,
                    "seconds": None, "eval_seconds": None}
        maps = maps.reshape(b, *images.shape[-2:]).float()
        self._sync()
        seconds = (time.perf_counter() - start) / b
        bad = ~torch.isfinite(maps).all(dim=2).all(dim=1)
        if bad.any():
            maps = torch.where(bad[:, None, None], torch.zeros_like(maps), maps)
        start = time.perf_counter()
        result = deletion_insertion(self.target, images, maps, targets, steps=self.protocol.steps,
                                    reference=self.protocol.reference, max_batch=self.forward_batch,
                                    impute_noise=self.protocol.impute_noise, impute_seed=self.protocol.impute_seed,
                                    clean_probs=clean)
        self._sync()
        eval_seconds = (time.perf_counter() - start) / b
        bad = bad.cpu().numpy()
        evidence = {}
        if masks is not None:
            from l2r.metrics import mask_auroc, pointing_game

            empty = ~masks.flatten(1).any(dim=1)
            hits = pointing_game(maps, masks).cpu().tolist()
            aurocs = mask_auroc(maps, masks).cpu().tolist()
            evidence = {
                "pointing_hit": [None if e else bool(x) for x, e in zip(hits, empty.cpu().tolist())],
                "mask_auroc": [None if a != a else float(a) for a in aurocs],  # NaN: undefined
            }
        if self.sanity_models:
            evidence["sanity_spearman"] = self._sanity(method, images, targets, maps)
        return {
            **evidence,
            "error": [f"method failed: {method}: map is not finite" if x else None for x in bad],
            "maps": maps.cpu().numpy(),
            "deletion_auc": result["deletion_auc"].float().cpu().numpy(),
            "insertion_auc": result["insertion_auc"].float().cpu().numpy(),
            "deletion_curve": list(result["deletion_curve"].float().cpu().numpy()),
            "insertion_curve": list(result["insertion_curve"].float().cpu().numpy()),
            "forward_passes": int(cost["forward_passes"]),
            "backward_passes": int(cost["backward_passes"]),
            "seconds": seconds,
            "eval_seconds": eval_seconds,
        }


class AttributionWorker:
    """The actor class given to ``map_batches``: one ``Attributor`` per actor, which writes its
    rows to the output itself and returns their summaries (``l2r.results.PART_SUMMARY``)."""

    def __init__(self, settings: dict):
        import torch

        settings = dict(settings)
        if settings["device"] == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a GPU actor was placed on a node without CUDA")
        self.attributor = Attributor(settings)
        self.output = Output(settings["output"], settings.get("storage_options"))
        self.names = settings["names"]
        # Ray Data restarts (or replaces) an actor that died, killed for memory say, and retries its
        # batches: the driver counts starts beyond the pool's size as restarts.
        self.output.record_actor_start()

    def __call__(self, batch: dict) -> pa.Table:
        return write_parts(self.output, self.names, self.attributor(batch))
