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

from l2r.methods import explainer_names, get_method
from l2r.results import SCHEMA, Output, write_parts


class Attributor:
    """Loads the target (and explainer) once; turns a batch of decoded rows into output rows.

    `config` is the job's `AttributeConfig` (validated on the driver); `plan` what the driver
    decided from it and the cluster (device, threads, forward_batch, fast_path: `_cluster_plan`);
    `record` the target the driver built (its weights' sha256 is checked here), default the config's.
    """

    def __init__(self, config, plan: dict, record=None):
        import torch

        if plan.get("threads"):
            torch.set_num_threads(int(plan["threads"]))
        self.config = config
        self.device = torch.device(plan["device"])
        self.methods = tuple(config.methods)
        self.protocol = config.protocol
        self.forward_batch = int(plan["forward_batch"])
        record = record or config.target_spec()
        expected = record.weights_sha256
        self.target = record.build(self.device, config.storage_options)
        if expected and record.weights_sha256 != expected:
            # E.g. a checkpoint path that holds another file on this node than on the driver's.
            raise RuntimeError(f"target {record.spec}: the weights loaded on this node (sha256 "
                               f"{record.weights_sha256[:16]}...) are not the driver's ({expected[:16]}...)")
        if plan["fast_path"] == "channels_last":
            # NHWC weights: the convolutions run channels-last, inputs converted on the fly.
            self.target.to(memory_format=torch.channels_last)
        self.explainer = self._explainer(self.target) if set(self.methods) & set(explainer_names()) else None
        self.sanity_models = self._sanity_models() if config.sanity_stages else []
        self.calls = 0

    def _explainer(self, target):
        """The explainer on `target` (the driver checked it was trained for the run's target)."""
        from l2r.artifact import local_artifact
        from l2r.explainer import load_explainer

        explainer, _ = load_explainer(local_artifact(self.config.explainer, self.config.storage_options), target=target)
        return explainer.to(self.device).eval()

    def _sanity_models(self) -> list[tuple]:
        """(target, explainer) per cascade stage: the target randomised from the top (l2r.sanity)."""
        from l2r.sanity import cascade, randomised_copy

        models = []
        for layers in cascade(self.target.net, self.config.sanity_stages):
            target = randomised_copy(self.target, layers, self.config.sanity_seed)
            models.append((target, self._explainer(target) if self.explainer is not None else None))
        return models

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _options(self, method, explainer) -> dict:
        """The method's options: the configured ones; for a method of a trained explainer, the explainer,
        the refinement and the protocol it verifies against."""
        options = dict(self.config.method_options.get(method, {}))
        if get_method(method).needs_explainer:
            options.update(explainer=explainer, refine_steps=self.config.refine_steps, protocol=self.protocol)
        return options

    def _map(self, method, images, targets, target=None, explainer=None):
        """(maps (B,H,W), cost per image) for one method; of another target (and its explainer) if given."""
        import torch

        from l2r.methods import attribute

        options = self._options(method, explainer or self.explainer)
        # Most methods make their maps in float32 whatever the precision: Captum and pytorch-grad-cam
        # hand activations and gradients to numpy, which has no bfloat16.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=get_method(method).bf16 and self.precision_bf16):
            return attribute(method, target or self.target, images, targets, **options)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision_bf16)

    @property
    def precision_bf16(self) -> bool:
        return self.config.precision == "bf16"

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
        if self.config.with_mask:
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
        result = deletion_insertion(self.target, images, maps, targets, self.protocol, max_batch=self.forward_batch,
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

    def __init__(self, config, plan: dict, record, names: dict):
        import torch

        if plan["device"] == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("a GPU actor was placed on a node without CUDA")
        self.attributor = Attributor(config, plan, record)
        self.output = Output(config.output, config.storage_options)
        self.names = names
        # Ray Data restarts (or replaces) an actor that died, killed for memory say, and retries its
        # batches: the driver counts starts beyond the pool's size as restarts.
        self.output.record_actor_start()

    def __call__(self, batch: dict) -> pa.Table:
        return write_parts(self.output, self.names, self.attributor(batch))
