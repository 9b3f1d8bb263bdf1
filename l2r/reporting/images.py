"""The report's pictures: the colour map, overlays of stored heatmaps on their images, and the
gallery (best and worst images re-read from their shards, every method's map)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa

from l2r import storage
from l2r.methods import explainer_names
from l2r.reporting.stats import sorted_rows, valid_rows

# One colour per method, in the report's method order (curves, legends).
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")

_COLOUR_ANCHORS = np.array([(0, 0, 4), (60, 15, 110), (150, 40, 100), (220, 80, 50), (250, 170, 20),
                            (252, 255, 164)], dtype=np.float64)


def colourize(values: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (H, W, 3) through the colour map (numpy only)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_COLOUR_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_COLOUR_ANCHORS) - 2)
    t = (v - low)[..., None]
    rgb = _COLOUR_ANCHORS[low] * (1 - t) + _COLOUR_ANCHORS[low + 1] * t
    return rgb.round().astype(np.uint8)


def overlay(image: np.ndarray | None, heatmap: np.ndarray) -> np.ndarray:
    """Blend the coloured heatmap over the image: opaque where important, faint elsewhere."""
    colour = colourize(heatmap).astype(np.float64)
    if image is None:
        return colour.astype(np.uint8)
    alpha = (0.2 + 0.7 * np.clip(heatmap, 0, 1))[..., None]
    return (image.astype(np.float64) * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def png_data_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def load_images(wanted: list[tuple[str, str]], image_size, crop_pct: float, with_mask: bool,
                storage_options: dict | None = None) -> dict:
    """``{(source, key): {"image", "mask"} or {"error"}}``: re-read and preprocessed like the job."""
    from l2r.shard_reader import iter_shard

    found: dict = {}
    by_source: dict[str, set] = {}
    for source, key in wanted:
        by_source.setdefault(source, set()).add(key)
    for source, keys in by_source.items():
        try:
            for row in iter_shard(source, image_size, crop_pct, with_mask=with_mask,
                                  filesystem=storage.filesystem_for(source, storage_options)):
                if row["key"] in keys and row["error"] is None:
                    found[(source, row["key"])] = {"image": row["image"], "mask": row.get("mask")}
                if len(found) == len(wanted):
                    break
        except Exception as exc:  # a moved or unreadable shard: the gallery shows the maps alone
            for key in keys:
                found.setdefault((source, key), {"error": f"{type(exc).__name__}: {exc}"})
        for key in keys:
            found.setdefault((source, key), {"error": "not found in its shard"})
    return found


def gallery(table: pa.Table, methods: list[str], count: int, manifest: dict | None,
            storage_options: dict | None = None) -> dict:
    """The best and worst images by deletion AUC of the ranking method, with every method's map
    (as PNG data URIs for the page, and as arrays, "picture" and "overlay", for the summary PNG)."""
    from l2r.images import decode_heatmap

    if count <= 0 or not methods:
        return {"by": None, "entries": []}
    # Ranked by the trained explainer's maps when the run has them.
    by = next((m for m in methods if m in explainer_names()), methods[0])
    ranked = valid_rows(sorted_rows(table, by)).to_pylist()
    ranked.sort(key=lambda r: r["deletion_auc"])
    best = ranked[: (count + 1) // 2]
    worst = [r for r in ranked[::-1][: count // 2] if r not in best][::-1]
    chosen = [("best", r) for r in best] + [("worst", r) for r in worst]
    identity = (manifest or {}).get("identity") or {}
    if chosen:
        size = (identity.get("target") or {}).get("input_size") or [chosen[0][1]["height"], chosen[0][1]["width"]]
        crop_pct = identity.get("crop_pct", 1.0)
        images = load_images([(r["source"], r["key"]) for _, r in chosen], tuple(size), crop_pct,
                             bool(identity.get("with_mask")), storage_options)
    rows_by_image: dict = {}
    for method in methods:
        for r in valid_rows(sorted_rows(table, method)).to_pylist():
            rows_by_image.setdefault((r["source"], r["key"]), {})[method] = r
    entries = []
    for group, r in chosen:
        image = images[(r["source"], r["key"])]
        picture = image.get("image")
        entry = {"group": group, "source": r["source"], "key": r["key"], "label": r["label"],
                 "target": r["target"], "target_prob": r["target_prob"], "image_error": image.get("error"),
                 "picture": picture,
                 "image": png_data_uri(picture) if picture is not None else None,
                 "mask_picture": _mask_picture(picture, image["mask"]) if image.get("mask") is not None else None,
                 "maps": {}}
        entry["mask"] = png_data_uri(entry["mask_picture"]) if entry["mask_picture"] is not None else None
        for method in methods:
            row = rows_by_image.get((r["source"], r["key"]), {}).get(method)
            if row is None:
                continue
            heatmap = decode_heatmap(row["heatmap"])
            blended = overlay(picture, heatmap)
            entry["maps"][method] = {"uri": png_data_uri(blended), "overlay": blended,
                                     "deletion_auc": row["deletion_auc"], "insertion_auc": row["insertion_auc"],
                                     "pointing_hit": row.get("pointing_hit")}
        entries.append(entry)
    return {"by": by, "entries": entries}


def _mask_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed outside the evidence mask."""
    out = image.astype(np.float64)
    out[~mask] *= 0.25
    return out.round().astype(np.uint8)
