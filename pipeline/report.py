"""The comparison report of an attribution output: summary tables, bootstrap intervals, an HTML page.

    results folder of pipeline.attribute (local or fsspec URL)
      -> read_results + manifest.json
      -> summarize(): per method n, errors, mean deletion / insertion AUC, their difference
         (insertion - deletion), percentile bootstrap intervals over images, cost per image,
         and pointing game accuracy / mean mask AUROC where the rows have them
      -> <output>/summary.md     the Markdown table (also printed by jobs/report.py)
         <output>/summary.json   everything above, plus per-class statistics and mean curves
         <output>/report.html    one self-contained page: inline CSS, curves as inline SVG,
                                 images as base64 PNG data URIs; nothing is fetched

Definitions:
- A method's rows with an error are counted in ``errors`` and left out of every mean.
- ``difference`` is the mean over images of ``insertion_auc - deletion_auc`` (higher is better).
- Intervals: percentile bootstrap of the mean over images (``resamples`` draws with
  replacement, seeded). Every method uses the same seed and its rows are sorted by
  (source, key), so methods with the same images are resampled identically (paired).
- Cost per image: mean ``forward_passes`` / ``backward_passes`` of the target to produce
  the map and mean wall ``seconds`` for it (``eval_seconds``, the curves, in the JSON).
- ``pointing_game``: the fraction of non-null ``pointing_hit``; ``mask_auroc``: the mean of
  the non-null ``mask_auroc`` (both written by the job's ``with_mask`` option).
- Per class: grouped by the explained class (``target``); names from ``classes.json`` beside
  the shards when there is one.
- Gallery: images re-read from their shards by ``source`` + ``key`` and preprocessed as the job
  did (input size and crop from the manifest), each method's stored heatmap overlaid; the
  best and worst images by deletion AUC of the ``l2r`` method (else of the first method).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.attribute import EXPLAINER_METHOD, MANIFEST, _filesystem, read_results

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
METRICS = ("deletion_auc", "insertion_auc", "difference")
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


@dataclass
class ReportConfig:
    results: str  # output folder of the attribution job (local or fsspec URL)
    output: str | None = None  # default: <results>/report
    gallery: int = 8  # images in the gallery (half best, half worst)
    resamples: int = 1000
    seed: int = 0
    level: float = 0.95
    storage_options: dict | None = None  # fsspec options for URL results, shards and output

    def __post_init__(self):
        if self.gallery < 0 or self.resamples < 1 or not 0 < self.level < 1:
            raise ValueError("gallery must be >= 0, resamples >= 1 and level in (0, 1)")
        if self.output is None:
            self.output = f"{self.results.rstrip('/')}/report"


# ---------------------------------------------------------------- statistics


def bootstrap_means(columns: dict[str, np.ndarray], resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap interval of the mean of each column; the same draws for every column.

    Columns are float arrays of one length n (one value per image; NaN = missing, ignored).
    Returns ``{name: [low, high]}`` (None for a column without values).
    """
    n = len(next(iter(columns.values()))) if columns else 0
    if n == 0:
        return {name: None for name in columns}
    rng = np.random.default_rng(seed)
    means = {name: [] for name in columns}
    chunk = max(1, 4_000_000 // n)  # bounded memory whatever the number of images
    done = 0
    while done < resamples:
        draws = rng.integers(0, n, size=(min(chunk, resamples - done), n))
        for name, values in columns.items():
            with warnings.catch_warnings():  # a resample of only missing values: NaN, dropped below
                warnings.simplefilter("ignore", RuntimeWarning)
                means[name].append(np.nanmean(values[draws], axis=1))
        done += len(draws)
    tail = (1 - level) / 2
    out = {}
    for name, parts in means.items():
        values = np.concatenate(parts)
        values = values[~np.isnan(values)]
        out[name] = [float(v) for v in np.quantile(values, [tail, 1 - tail])] if len(values) else None
    return out


def _column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls (bool -> 0/1)."""
    values = table.column(name).to_pylist()
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def method_order(table: pa.Table, manifest: dict | None = None) -> list[str]:
    present = list(dict.fromkeys(table.column("method").to_pylist()))
    configured = ((manifest or {}).get("config") or {}).get("methods") or []
    return [m for m in configured if m in present] + [m for m in present if m not in configured]


def _sorted_rows(table: pa.Table, method: str) -> pa.Table:
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table.column("method"), method))
    return rows.sort_by([("source", "ascending"), ("key", "ascending")])


def _valid(rows: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return rows.filter(pc.is_null(rows.column("error")))


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def summarize(table: pa.Table, resamples: int = 1000, seed: int = 0, level: float = 0.95,
              methods: list[str] | None = None) -> dict:
    """Per-method statistics of a results table (the job's SCHEMA): ``{method: {...}}``."""
    out = {}
    for method in methods or method_order(table):
        rows = _sorted_rows(table, method)
        valid = _valid(rows)
        deletion, insertion = _column(valid, "deletion_auc"), _column(valid, "insertion_auc")
        columns = {"deletion_auc": deletion, "insertion_auc": insertion, "difference": insertion - deletion}
        intervals = bootstrap_means(columns, resamples, seed, level)
        entry = {"n": valid.num_rows, "errors": rows.num_rows - valid.num_rows}
        for name, values in columns.items():
            entry[name] = {"mean": _mean(values), "ci": intervals[name]}
        entry["cost"] = {name: _mean(_column(valid, name))
                         for name in ("forward_passes", "backward_passes", "seconds", "eval_seconds")}
        for name, column in (("pointing_game", "pointing_hit"), ("mask_auroc", "mask_auroc")):
            values = _column(valid, column)
            values = values[~np.isnan(values)]
            if len(values):
                ci = bootstrap_means({name: values}, resamples, seed, level)[name]
                entry[name] = {"n": int(len(values)), "mean": float(values.mean()), "ci": ci}
            else:
                entry[name] = None
        out[method] = entry
    return out


def per_class(table: pa.Table, methods: list[str], class_names: dict | None = None) -> dict:
    """``{class: {"name", "methods": {method: {n, deletion_auc, insertion_auc}}}}`` by explained class."""
    classes: dict = {}
    for method in methods:
        valid = _valid(_sorted_rows(table, method))
        targets = np.array(valid.column("target").to_pylist(), dtype=np.int64)
        deletion, insertion = _column(valid, "deletion_auc"), _column(valid, "insertion_auc")
        for c in np.unique(targets):
            pick = targets == c
            entry = classes.setdefault(int(c), {"name": (class_names or {}).get(str(int(c)), str(int(c))),
                                                 "methods": {}})
            entry["methods"][method] = {"n": int(pick.sum()), "deletion_auc": float(deletion[pick].mean()),
                                        "insertion_auc": float(insertion[pick].mean())}
    return dict(sorted(classes.items()))


def mean_curves(table: pa.Table, methods: list[str]) -> dict:
    """``{method: {"fractions", "deletion", "insertion"}}``: the mean curves over valid rows."""
    out = {}
    for method in methods:
        valid = _valid(_sorted_rows(table, method))
        if not valid.num_rows:
            continue
        deletion = np.array(valid.column("deletion_curve").to_pylist(), dtype=np.float64)
        insertion = np.array(valid.column("insertion_curve").to_pylist(), dtype=np.float64)
        out[method] = {"fractions": np.linspace(0, 1, deletion.shape[1]).tolist(),
                       "deletion": deletion.mean(0).tolist(), "insertion": insertion.mean(0).tolist()}
    return out


# ---------------------------------------------------------------- formatting


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "-"
    return f"{value:.{digits}f}"


def fmt_ci(stat: dict | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    ci = stat.get("ci")
    interval = f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else ""
    return f"{fmt(stat['mean'], digits)}{interval}"


def _has_evidence(methods: dict) -> bool:
    return any(m.get("pointing_game") or m.get("mask_auroc") for m in methods.values())


def table_rows(methods: dict, level: float = 0.95) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table (shared by Markdown and HTML, so they agree)."""
    pct = f"{level * 100:g}% CI"
    header = ["method", "n", "errors", f"deletion AUC ↓ [{pct}]", f"insertion AUC ↑ [{pct}]",
              f"ins − del ↑ [{pct}]", "fwd/img", "bwd/img", "s/img"]
    evidence = _has_evidence(methods)
    if evidence:
        header += ["pointing ↑", "mask AUROC ↑"]
    cells = []
    for method, m in methods.items():
        cost = m["cost"]
        row = [method, str(m["n"]), str(m["errors"]), fmt_ci(m["deletion_auc"]), fmt_ci(m["insertion_auc"]),
               fmt_ci(m["difference"]), fmt(cost["forward_passes"], 1), fmt(cost["backward_passes"], 1),
               _fmt_seconds(cost["seconds"])]
        if evidence:
            row += [fmt_ci(m["pointing_game"], 3), fmt_ci(m["mask_auroc"], 3)]
        cells.append(row)
    return header, cells


def _fmt_seconds(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _weights_line(target: dict) -> str:
    """Where the explained model's weights came from, from the target record in the manifest."""
    source = target.get("weight_source", "?")
    where = {"checkpoint": f"checkpoint {target.get('checkpoint')}", "timm-pretrained": "timm pretrained weights",
             "random": "RANDOM weights (random_init): an untrained model", "constructor": "the constructor's weights"}
    sha = target.get("weights_sha256")
    return where.get(source, source) + (f", weights sha256 {sha[:12]}" if sha else "")


def markdown_table(methods: dict, level: float = 0.95) -> str:
    header, cells = table_rows(methods, level)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- images


# Anchor colours of a perceptually ordered map (dark purple -> orange -> light yellow).
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


def _shard_filesystem(url: str, storage_options: dict | None):
    if "://" not in url:
        return None
    import fsspec

    return fsspec.filesystem(url.split("://", 1)[0], **(storage_options or {}))


def load_images(wanted: list[tuple[str, str]], image_size, crop_pct: float, with_mask: bool,
                storage_options: dict | None = None) -> dict:
    """``{(source, key): {"image", "mask"} or {"error"}}``: re-read and preprocessed like the job."""
    from pipeline.data import iter_shard

    found: dict = {}
    by_source: dict[str, set] = {}
    for source, key in wanted:
        by_source.setdefault(source, set()).add(key)
    for source, keys in by_source.items():
        try:
            for row in iter_shard(source, image_size, crop_pct, with_mask=with_mask,
                                  filesystem=_shard_filesystem(source, storage_options)):
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
    """The best and worst images by deletion AUC of the ranking method, with every method's map."""
    from l2r.images import decode_heatmap

    if count <= 0 or not methods:
        return {"by": None, "entries": []}
    by = EXPLAINER_METHOD if EXPLAINER_METHOD in methods else methods[0]
    ranked = _valid(_sorted_rows(table, by)).to_pylist()
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
        for r in _valid(_sorted_rows(table, method)).to_pylist():
            rows_by_image.setdefault((r["source"], r["key"]), {})[method] = r
    entries = []
    for group, r in chosen:
        image = images[(r["source"], r["key"])]
        picture = image.get("image")
        entry = {"group": group, "source": r["source"], "key": r["key"], "label": r["label"],
                 "target": r["target"], "target_prob": r["target_prob"], "image_error": image.get("error"),
                 "image": png_data_uri(picture) if picture is not None else None,
                 "mask": png_data_uri(_mask_picture(picture, image["mask"])) if image.get("mask") is not None else None,
                 "maps": {}}
        for method in methods:
            row = rows_by_image.get((r["source"], r["key"]), {}).get(method)
            if row is None:
                continue
            heatmap = decode_heatmap(row["heatmap"])
            entry["maps"][method] = {"uri": png_data_uri(overlay(picture, heatmap)),
                                     "deletion_auc": row["deletion_auc"], "insertion_auc": row["insertion_auc"],
                                     "pointing_hit": row.get("pointing_hit")}
        entries.append(entry)
    return {"by": by, "entries": entries}


def _mask_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image dimmed outside the evidence mask."""
    out = image.astype(np.float64)
    out[~mask] *= 0.25
    return out.round().astype(np.uint8)


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #1d1d1f; background: #fff; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 13px; line-height: 1.5; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; max-width: 120px; vertical-align: bottom; }
td:first-child, th:first-child { text-align: left; font-weight: 600; }
.note { color: #555; font-size: 12px; max-width: 1000px; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; }
.gallery td { text-align: center; vertical-align: top; font-weight: normal; font-size: 11px; }
.gallery img { width: 112px; height: auto; image-rendering: pixelated; display: block; margin: 0 auto 2px; }
.best { color: #1a7f37; font-weight: 600; } .worst { color: #b42318; font-weight: 600; }
.key { font-family: ui-monospace, Menlo, monospace; font-size: 11px; }
small.ci { color: #666; font-size: 11px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: middle; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _html_table(header: list[str], rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _summary_cell(text: str) -> str:
    """A 'mean [low, high]' cell as the mean over a smaller interval line (keeps the table narrow)."""
    mean, bracket, interval = text.partition(" [")
    if not bracket:
        return _e(text)
    return f"{_e(mean)}<br><small class=ci>[{_e(interval)}</small>"


def svg_curves(curves: dict, which: str, colours: dict, title: str, width: int = 460, height: int = 300) -> str:
    """Mean curves of every method as inline SVG polylines (x: fraction, y: target probability)."""
    left, right, top, bottom = 48, 12, 28, 40
    pw, ph = width - left - right, height - top - bottom
    top_y = max([1e-6] + [max(c[which]) for c in curves.values()])
    top_y = min(1.0, float(np.ceil(top_y * 10) / 10)) if top_y <= 1 else float(top_y)

    def xy(x, y):
        return left + x * pw, top + ph - (y / top_y) * ph

    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{width / 2}" y="17" text-anchor="middle" font-size="14" font-weight="600">{_e(title)}</text>']
    for i in range(6):
        gy = top_y * i / 5
        _, y = xy(0, gy)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{gy:.2f}</text>')
        gx, _ = xy(i / 5, 0)
        parts.append(f'<text x="{gx:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{i / 5:.1f}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    xlabel = "fraction of pixels deleted" if which == "deletion" else "fraction of pixels inserted"
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">{xlabel}</text>')
    parts.append(f'<text x="12" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 12 {top + ph / 2})">target probability</text>')
    for method, curve in curves.items():
        points = " ".join("%.1f,%.1f" % xy(x, y) for x, y in zip(curve["fractions"], curve[which]))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colours[method]}" stroke-width="2">'
                     f'<title>{_e(method)}</title></polyline>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict, gallery_data: dict) -> str:
    methods = report["methods"]
    names = list(methods)
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}
    header, cells = table_rows(methods, report["bootstrap"]["level"])
    protocol = report.get("protocol") or {}
    target = report.get("target") or {}
    meta = [
        f"results: <span class=key>{_e(report['results'])}</span>",
        f"target: {_e(target.get('spec', '?'))} ({_e(_weights_line(target))})",
        f"protocol: {_e(protocol.get('steps', '?'))} steps, reference {_e(protocol.get('reference', '?'))}, "
        f"target class {_e(protocol.get('target', '?'))}",
        f"bootstrap: {report['bootstrap']['resamples']} resamples over images, seed {report['bootstrap']['seed']}",
        f"created {_e(report['created'])}",
    ]
    if report.get("explainer"):
        meta.insert(2, f"explainer weights sha256 {_e(str(report['explainer'])[:12])}")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>l2r attribution report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Attribution comparison</h1>",
        "<div class=meta>" + "<br>".join(meta) + "</div>",
        "<h2>Summary</h2>",
        _html_table(header, [[_summary_cell(c) for c in row] for row in cells], "summary"),
        "<p class=note>Deletion AUC: area under the target probability as the most important pixels are "
        "removed first (lower is better). Insertion AUC: the same as they are inserted into the reference "
        "(higher is better). ins − del: the mean per-image difference. Intervals: percentile bootstrap of "
        "the mean over images. fwd/bwd/img: target forward/backward passes per image to produce the map; "
        "s/img: wall seconds per image for the map. Pointing: fraction of maps whose top pixel lies in the "
        "evidence mask; mask AUROC: how well the map's scores separate mask pixels from the rest.</p>",
        "<h2>Mean curves</h2><div class=charts>",
        svg_curves(report["curves"], "deletion", colours, "Deletion (lower is better)"),
        svg_curves(report["curves"], "insertion", colours, "Insertion (higher is better)"),
        "</div><div class=note>"
        + " &nbsp; ".join(f'<span class=swatch style="background:{colours[m]}"></span>{_e(m)}'
                          for m in names if m in report["curves"])
        + "</div>",
    ]
    # Per class: one row per explained class, deletion / insertion per method.
    class_header = ["class", "n"] + [f"{m} del / ins" for m in names]
    class_rows = []
    for entry in report["per_class"].values():
        n = max((s["n"] for s in entry["methods"].values()), default=0)
        row = [_e(entry["name"]), str(n)]
        for m in names:
            s = entry["methods"].get(m)
            row.append(f"{fmt(s['deletion_auc'], 3)} / {fmt(s['insertion_auc'], 3)}" if s else "-")
        class_rows.append(row)
    parts += ["<h2>Per class (explained class)</h2>", _html_table(class_header, class_rows, "classes")]
    entries = gallery_data["entries"]
    if entries:
        has_mask = any(e["mask"] for e in entries)
        parts.append(f"<h2>Gallery: best and worst {len(entries)} images by {_e(gallery_data['by'])} deletion AUC</h2>")
        head = ["image"] + (["evidence mask"] if has_mask else []) + names
        rows = []
        for e in entries:
            label = "" if e["label"] is None else f" label {_e(e['label'])}"
            caption = (f"<span class={e['group']}>{e['group']}</span><br><span class=key>{_e(e['key'])}</span>"
                       f"<br>target {_e(e['target'])} (p={fmt(e['target_prob'], 2)}){label}")
            if e["image"]:
                first = f'<img src="{e["image"]}" alt="{_e(e["key"])}">{caption}'
            else:
                first = f"<div>image unavailable: {_e(e['image_error'])}</div>{caption}"
            row = [first]
            if has_mask:
                row.append(f'<img src="{e["mask"]}" alt="mask">' if e["mask"] else "-")
            for m in names:
                cell = e["maps"].get(m)
                if cell is None:
                    row.append("-")
                    continue
                hit = cell.get("pointing_hit")
                hit = "" if hit is None else ("<br>pointing hit" if hit else "<br>pointing miss")
                row.append(f'<img src="{cell["uri"]}" alt="{_e(m)}">del {fmt(cell["deletion_auc"], 3)} · '
                           f'ins {fmt(cell["insertion_auc"], 3)}{hit}')
            rows.append(row)
        parts.append(_html_table(head, rows, "gallery"))
        parts.append("<p class=note>Overlays show each method's stored ranking: bright and opaque = most "
                     "important, dark and faint = least. A map with ties (e.g. a constant map) is stored with "
                     "ties broken by pixel index, so it shows as a top-to-bottom ramp.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- the job


def read_manifest(results: str, storage_options: dict | None = None) -> dict | None:
    fs, root, _ = _filesystem(results, None, storage_options)
    try:
        with fs.open(f"{root}/{MANIFEST}", "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _class_names(table: pa.Table, storage_options: dict | None) -> dict | None:
    """classes.json beside the first shard, if there is one."""
    sources = [s for s in table.column("source").to_pylist()[:1] if s]
    if not sources:
        return None
    folder = sources[0].rsplit("/", 1)[0] if "/" in sources[0] else "."
    try:
        fs, path, _ = _filesystem(f"{folder}/classes.json", None, storage_options)
        with fs.open(path, "rb") as f:
            return {str(k): str(v) for k, v in json.loads(f.read()).items()}
    except Exception:
        return None


def build_report(table: pa.Table, manifest: dict | None, results: str = "", resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, class_names: dict | None = None) -> dict:
    """Everything summary.json holds, from a results table and its manifest."""
    methods = method_order(table, manifest)
    manifest = manifest or {}
    return {
        "results": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": manifest.get("protocol"),
        "target": manifest.get("target"),
        "explainer": ((manifest.get("explainer") or {}).get("weights_sha256")),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "unit": "image"},
        "rows": table.num_rows,
        "methods": summarize(table, resamples, seed, level, methods),
        "per_class": per_class(table, methods, class_names),
        "curves": mean_curves(table, methods),
    }


def _write_text(url: str, text: str, storage_options: dict | None) -> None:
    fs, path, local = _filesystem(url, None, storage_options)
    if local:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def write_report(config: ReportConfig, log=None) -> dict:
    """Read the results, write summary.md, summary.json and report.html under ``config.output``."""
    log = log or (lambda line: print(line, flush=True))
    table = read_results(config.results, storage_options=config.storage_options)
    if table.num_rows == 0:
        raise ValueError(f"{config.results} holds no finished shards (no rows to report)")
    manifest = read_manifest(config.results, config.storage_options)
    report = build_report(table, manifest, config.results, config.resamples, config.seed, config.level,
                          _class_names(table, config.storage_options))
    pictures = gallery(table, list(report["methods"]), config.gallery, manifest, config.storage_options)
    report["gallery"] = {"by": pictures["by"],
                         "entries": [{k: e[k] for k in ("group", "source", "key", "label", "target")}
                                     | {"deletion_auc": {m: c["deletion_auc"] for m, c in e["maps"].items()}}
                                     for e in pictures["entries"]]}
    markdown = markdown_table(report["methods"], config.level)
    out = config.output.rstrip("/")
    _write_text(f"{out}/{SUMMARY_MD}", markdown + "\n", config.storage_options)
    _write_text(f"{out}/{SUMMARY_JSON}", json.dumps(report, indent=1) + "\n", config.storage_options)
    _write_text(f"{out}/{REPORT_HTML}", render_html(report, pictures), config.storage_options)
    log(markdown)
    log(f"wrote {out}/{SUMMARY_MD}, {SUMMARY_JSON}, {REPORT_HTML}")
    report["markdown"] = markdown
    report["files"] = {name: f"{out}/{name}" for name in (SUMMARY_MD, SUMMARY_JSON, REPORT_HTML)}
    return report
