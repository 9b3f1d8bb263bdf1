"""The comparison report of an attribution output: summary tables, bootstrap intervals, an HTML page.

    results folder of the attribution job (pipeline.attribute) (local or fsspec URL)
      -> read_results + manifest.json
      -> summarize(): per method n, errors, mean deletion / insertion AUC, their difference
         (insertion - deletion), percentile bootstrap intervals over images, cost per image,
         and pointing game accuracy / mean mask AUROC where the rows have them
      -> <output>/summary.md     the Markdown table (also printed by jobs/report.py)
         <output>/summary.json   everything above, plus per-class statistics and mean curves
         <output>/report.html    one self-contained page (l2r.reporting.html): inline CSS,
                                 curves as inline SVG, images as PNG data URIs; nothing is fetched
         <output>/summary.png    the same on one picture (l2r.reporting.png): mean curves and a
                                 small gallery, for a remote machine or a notebook
   Statistics and tables: l2r.reporting.stats; colours, overlays, gallery: l2r.reporting.images.

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

import json
import time
from dataclasses import dataclass

import pyarrow as pa

from l2r import storage
from l2r.results import MANIFEST, read_results
from l2r.reporting.html import render_html
from l2r.reporting.images import gallery
from l2r.reporting.png import render_png
from l2r.reporting.stats import control_findings, markdown_table, mean_curves, method_order, per_class, summarize

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
SUMMARY_PNG = "summary.png"


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



# ---------------------------------------------------------------- the job


def read_manifest(results: str, storage_options: dict | None = None) -> dict | None:
    return storage.read_json(storage.join(results, MANIFEST), storage_options)


def _class_names(table: pa.Table, storage_options: dict | None) -> dict | None:
    """classes.json beside the first shard, if there is one."""
    sources = [s for s in table.column("source").to_pylist()[:1] if s]
    if not sources:
        return None
    folder = sources[0].rsplit("/", 1)[0] if "/" in sources[0] else "."
    names = storage.read_json(f"{folder}/classes.json", storage_options)
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None


def build_report(table: pa.Table, manifest: dict | None, results: str = "", resamples: int = 1000, seed: int = 0,
                 level: float = 0.95, class_names: dict | None = None) -> dict:
    """Everything summary.json holds, from a results table and its manifest."""
    methods = method_order(table, manifest)
    manifest = manifest or {}
    stats = summarize(table, resamples, seed, level, methods)
    input_size = (manifest.get("target") or {}).get("input_size")
    return {
        "results": results,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": manifest.get("protocol"),
        "target": manifest.get("target"),
        "explainer": ((manifest.get("explainer") or {}).get("weights_sha256")),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "unit": "image"},
        "rows": table.num_rows,
        "methods": stats,
        "controls": [m for m, entry in stats.items() if entry["control"]],
        "control_findings": control_findings(stats, manifest.get("protocol"), input_size),
        "per_class": per_class(table, methods, class_names),
        "curves": mean_curves(table, methods),
    }


def write_report(config: ReportConfig, log=None) -> dict:
    """Read the results, write summary.md, summary.json, report.html and summary.png under ``config.output``.

    Returns the report (summary.json's content) plus "markdown", "png" (the picture's bytes) and "files".
    """
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
    markdown = markdown_table(report["methods"], config.level, report["control_findings"])
    png = render_png(report, pictures)
    out = config.output.rstrip("/")
    files = {name: f"{out}/{name}" for name in (SUMMARY_MD, SUMMARY_JSON, REPORT_HTML, SUMMARY_PNG)}
    storage.write_bytes(files[SUMMARY_MD], (markdown + "\n").encode(), config.storage_options)
    storage.write_bytes(files[SUMMARY_JSON], (json.dumps(report, indent=1) + "\n").encode(), config.storage_options)
    storage.write_bytes(files[REPORT_HTML], render_html(report, pictures).encode(), config.storage_options)
    storage.write_bytes(files[SUMMARY_PNG], png, config.storage_options)
    log(markdown)
    log(f"wrote {out}/: {SUMMARY_MD}, {SUMMARY_JSON}, {REPORT_HTML}, {SUMMARY_PNG}")
    log(f"look at it: open {files[REPORT_HTML]} (or {files[SUMMARY_PNG]}); on a remote machine: "
        f"python -m http.server 8000 --directory {out}, then http://<host>:8000/{REPORT_HTML}")
    report["markdown"] = markdown
    report["png"] = png
    report["files"] = files
    return report
