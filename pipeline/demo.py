"""The demo end to end in one process and one Ray session: train, attribute, report.

Synthetic shapes with known evidence masks (so the maps can be checked against the truth),
a small CNN target fitted in-process, an explainer trained with Ray Train, batch attribution
with Ray Data (l2r and baselines, exact deletion/insertion AUCs, pointing game, mask AUROC),
and the report (Markdown, JSON, HTML, PNG). Everything lands under `<storage>/<name>/`; a
second run reuses what is done (data, target, trained explainer, finished shards). It also leaves
one held-out image as a plain file, `photo.png`, for the README's notebook snippet.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

from l2r import storage
from pipeline import train
from pipeline.attribute import AttributeConfig, run_attribution
from l2r.reporting.report import ReportConfig, write_report

CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
METHODS = ("l2r", "gradcam", "saliency", "random", "gaussian")
PHOTO = "photo.png"  # what the README's notebook snippet explains after the demo


def leave_photo(run_dir: str) -> str:
    """The first image of the demo's held-out shard, copied as it is to `<run_dir>/photo.png`."""
    from l2r.shard_reader import expand_urls

    url = f"{run_dir}/{PHOTO}"
    shard = expand_urls(f"{run_dir}/data/val-*.tar")[0]
    with storage.open_file(shard) as fileobj, tarfile.open(fileobj=fileobj, mode="r:") as archive:
        for member in archive:
            if member.isreg() and member.name.endswith(".png") and not member.name.endswith(".mask.png"):
                storage.write_bytes(url, archive.extractfile(member).read())
                return url
    raise ValueError(f"no image in {shard}")


def run_demo(config: dict, methods=METHODS, ray_logs: bool = False, log=None) -> dict:
    """Run the demo as configured (`pipeline.config.load_config(CONFIG, ...)`); returns where things are."""
    log = log or (lambda line: print(line, flush=True))
    started = time.perf_counter()
    run_dir = f"{config['run']['storage'].rstrip('/')}/{config['name']}"
    log(f"demo: synthetic shapes -> target -> explainer ({config['train']['steps']} steps) -> attribution -> "
        f"report, under {run_dir}/ (resolved config: {run_dir}/config.yaml)")
    artifact = train.run(config, ray_logs=ray_logs, show_config=False)
    photo = leave_photo(run_dir)
    trained = time.perf_counter()
    attribution = f"{run_dir}/attribution"
    summary = run_attribution(AttributeConfig(shards=f"{run_dir}/data/val-*.tar", output=attribution,
                                              explainer=artifact, methods=tuple(methods), with_mask=True), log=log)
    attributed = time.perf_counter()
    report = write_report(ReportConfig(results=attribution, output=f"{run_dir}/report"), log=lambda line: None)
    done = time.perf_counter()
    files = report["files"]
    log("")
    log(f"demo done in {done - started:.0f} s (training {trained - started:.0f} s, attribution "
        f"{attributed - trained:.0f} s, report {done - attributed:.0f} s)")
    log(report["markdown"])
    log(f"written under {run_dir}/: data/ (synthetic shards), target.pt, config.yaml, metrics.jsonl, explainer/, "
        f"attribution/ (Parquet, manifest.json), report/, {PHOTO} (a held-out image)")
    log(f"look at it:  open {files['report.html']}   (or the picture: {files['summary.png']})")
    log(f"on a remote machine:  python -m http.server 8000 --directory {run_dir}/report   "
        f"then http://<host>:8000/report.html")
    log(f"in a notebook:  the README's \"In a notebook\" snippet explains {photo} with {artifact}")
    return {"run_dir": run_dir, "artifact": artifact, "photo": photo, "attribution": summary, "report": report,
            "seconds": {"train": trained - started, "attribute": attributed - trained, "report": done - attributed}}
