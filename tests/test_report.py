"""The comparison report: numbers equal a direct computation from the Parquet rows; the HTML renders."""

import base64
import io
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from l2r.classifier import build_target
from l2r.explainer import build_explainer, save_explainer
from pipeline import attribute as att
from l2r.reporting import report as rep
from l2r.reporting import stats as report_stats
from pipeline.attributor import Attributor
from l2r.results import SCHEMA, Output, merge_parts, write_parts
from l2r.shard_reader import iter_shard
from l2r.shards import make_shards
from l2r.target_spec import TargetSpec

SIZE = 16
SPEC = "timm:test_resnet"
KWARGS = {"num_classes": 10}
METHODS = ["l2r", "gradcam", "random"]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as the job writes it (per-shard Parquet, markers, manifest), made without Ray.

    Synthetic shards with evidence masks, a seeded tiny target, an untrained explainer.
    """
    root = tmp_path_factory.mktemp("report")
    shards = make_shards(str(root / "shards"), synthetic=12, size=SIZE, max_count=6, progress=False)
    torch.manual_seed(0)
    target = build_target(SPEC, model_kwargs=KWARGS, random_init=True, input_size=(SIZE, SIZE))
    torch.save(target.net.state_dict(), root / "target.pt")
    explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2"], "dim": 8, "head_dim": 8},
                                target=target)
    save_explainer(root / "explainer", explainer, {"note": "untrained, for tests"})
    config = att.AttributeConfig(shards=shards, output=str(root / "out"), target=TargetSpec(
                                 SPEC, checkpoint=str(root / "target.pt"), kwargs=KWARGS, input_size=(SIZE, SIZE)),
                                 explainer=str(root / "explainer"), methods=METHODS, with_mask=True)
    record = config.target_spec()
    record.build()
    attributor = Attributor(config, {"device": "cpu", "threads": 1, "forward_batch": 128, "fast_path": "eager"}, record)
    output = Output(config.output)
    names = att.output_names(shards)
    for url, name in names.items():
        rows = list(iter_shard(url, SIZE, with_mask=True))
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "source", "error")}
        batch["image"] = np.stack([r["image"] for r in rows])
        batch["mask"] = np.stack([r["mask"] for r in rows])
        batch["label"] = np.array([r["label"] for r in rows])
        # The workers' write path: a part per batch, merged into the shard's file, then the marker.
        parts = write_parts(output, names, attributor(batch)).column("part").to_pylist()
        merge_parts(output.url, None, name, parts)
        output.write_json(output.marker_url(name), {"source": url, "stats": {}})
    identity = att._identity(config, record, att.explainer_identity(config.explainer))
    output.write_json(output.manifest_url, {"config": config.to_dict(), "identity": identity,
                                                        "target": identity["target"],
                                                        "protocol": config.protocol.to_dict()})
    return root / "out"


@pytest.fixture(scope="module")
def report(results):
    from jobs.report import main

    return main(["--results", str(results), "--gallery", "4"])


def frame(results) -> pd.DataFrame:
    return att.read_results(str(results)).to_pandas()


def test_summary_equals_direct_computation(results, report):
    df = frame(results)
    assert list(report["methods"]) == METHODS
    for method in METHODS:
        rows = df[df.method == method]
        ok = rows[rows.error.isna()]
        m = report["methods"][method]
        assert m["n"] == len(ok) == 12 and m["errors"] == len(rows) - len(ok) == 0
        assert m["deletion_auc"]["mean"] == pytest.approx(ok.deletion_auc.astype(float).mean(), abs=1e-9)
        assert m["insertion_auc"]["mean"] == pytest.approx(ok.insertion_auc.astype(float).mean(), abs=1e-9)
        diff = ok.insertion_auc.astype(float) - ok.deletion_auc.astype(float)
        assert m["difference"]["mean"] == pytest.approx(diff.mean(), abs=1e-9)
        for name in ("forward_passes", "backward_passes", "seconds", "eval_seconds"):
            assert m["cost"][name] == pytest.approx(ok[name].astype(float).mean())
        hits = ok.pointing_hit.dropna().astype(float)
        assert m["pointing_game"]["n"] == len(hits) and m["pointing_game"]["mean"] == pytest.approx(hits.mean())
        aurocs = ok.mask_auroc.dropna().astype(float)
        assert m["mask_auroc"]["mean"] == pytest.approx(aurocs.mean())
        for name in ("deletion_auc", "insertion_auc", "difference", "pointing_game", "mask_auroc"):
            low, high = m[name]["ci"]
            assert low <= m[name]["mean"] <= high
    assert report["methods"]["gradcam"]["cost"]["forward_passes"] == 1.0
    assert report["methods"]["random"]["cost"]["backward_passes"] == 0.0

    # Per class (the explained class) and the mean curves.
    for (target, method), group in df[df.error.isna()].groupby(["target", "method"]):
        stat = report["per_class"][int(target)]["methods"][method]
        assert stat["n"] == len(group)
        assert stat["deletion_auc"] == pytest.approx(group.deletion_auc.astype(float).mean())
        assert stat["insertion_auc"] == pytest.approx(group.insertion_auc.astype(float).mean())
    curve = np.stack(df[df.method == "l2r"].deletion_curve.to_list()).mean(0)
    np.testing.assert_allclose(report["curves"]["l2r"]["deletion"], curve, atol=1e-6)

    # summary.json holds the same numbers; summary.md is the printed table.
    saved = json.loads(Path(report["files"]["summary.json"]).read_text())
    assert saved["methods"] == json.loads(json.dumps(report["methods"]))
    assert Path(report["files"]["summary.md"]).read_text().strip() == report["markdown"]
    table_lines = [line for line in report["markdown"].splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(METHODS)  # header, rule, one row per method (findings follow)


def synthetic_table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    columns = {name: [None] * n for name in SCHEMA.names}
    columns.update(key=[f"k{i:05d}" for i in range(n)], source=["s.tar"] * n, method=["m"] * n,
                   target=[0] * n, deletion_auc=rng.beta(2, 5, n).tolist(), insertion_auc=rng.beta(5, 2, n).tolist(),
                   forward_passes=[1] * n, backward_passes=[0] * n, seconds=[0.01] * n, eval_seconds=[0.02] * n)
    return pa.table(columns, schema=SCHEMA)


def test_bootstrap_intervals_contain_the_mean_and_shrink_with_more_rows():
    widths = []
    for n in (40, 640):
        stats = report_stats.summarize(synthetic_table(n), resamples=500, seed=1)["m"]
        width = 0.0
        for name in ("deletion_auc", "insertion_auc", "difference"):
            low, high = stats[name]["ci"]
            assert low < stats[name]["mean"] < high
            width += high - low
        widths.append(width)
        assert stats["pointing_game"] is None and stats["mask_auroc"] is None  # no masks: absent
    assert widths[1] < widths[0] / 2.5  # 16x the rows: about a quarter of the width
    first, again = (report_stats.summarize(synthetic_table(40), resamples=500, seed=1)["m"] for _ in range(2))
    assert first["deletion_auc"]["ci"] == again["deletion_auc"]["ci"]  # seeded


def test_html_is_self_contained_with_table_values_and_gallery(results, report):
    page = Path(report["files"]["report.html"]).read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # every image is a data URI
    for method, m in report["methods"].items():
        for name in ("deletion_auc", "insertion_auc", "difference"):
            assert report_stats.fmt(m[name]["mean"]) in page and report_stats.fmt(m[name]["ci"][0]) in page
        assert report_stats.fmt(m["mask_auroc"]["mean"], 3) in page
    entries = report["gallery"]["entries"]
    assert len(entries) == 4 and report["gallery"]["by"] == "l2r"
    # One image, one evidence mask and one overlay per method for every gallery entry.
    assert page.count("<img ") == len(entries) * (2 + len(METHODS))
    l2r = sorted(frame(results).query("method == 'l2r'").deletion_auc)
    assert [e["deletion_auc"]["l2r"] for e in entries] == pytest.approx(l2r[:2] + l2r[-2:])
    # The gallery image is the shard's image, preprocessed as the job did.
    first = entries[0]
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="%s">' % first["key"], page).group(1)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
    expected = next(r["image"] for r in iter_shard(first["source"], SIZE) if r["key"] == first["key"])
    np.testing.assert_array_equal(shown, expected)


def wait_for_browser_install(timeout: float = 600) -> str:
    """`.ci/run` installs Chromium beside the tests; its status file says "done <rc>" when it ends.
    Returns what it last said ("" outside CI)."""
    status = os.environ.get("L2R_BROWSER_INSTALL")
    deadline = time.time() + timeout
    said = ""
    while status and not CHROMIUM.exists() and time.time() < deadline:
        said = Path(status).read_text().strip()
        if said.startswith("done"):
            break
        time.sleep(2)
    return said


def test_html_renders_in_a_headless_browser(report, tmp_path):
    install = wait_for_browser_install()
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium): cannot render the page"
                    + (f"; the CI's install said {install!r}" if install else ""))
    shot = tmp_path / "report.png"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
               Path(report["files"]["report.html"]).resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    assert shot.exists()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200) and pixels.std() > 10  # not blank
    assert (pixels < 128).mean() > 0.01  # text, lines and images drawn


def test_report_config_validation(tmp_path):
    with pytest.raises(ValueError):
        rep.ReportConfig(results=str(tmp_path), resamples=0)
    assert rep.ReportConfig(results="s3://b/run/").output == "s3://b/run/report"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished shards"):
        rep.write_report(rep.ReportConfig(results=str(tmp_path / "empty")), log=lambda line: None)


def test_summary_png_shows_every_method_curve_and_the_gallery(results, report):
    from l2r.reporting.images import PALETTE
    from l2r.reporting.png import CHART, TILE

    data = Path(report["files"]["summary.png"]).read_bytes()
    assert data == report["png"]
    page = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    charts = page[70:70 + CHART[1]]
    for i, method in enumerate(METHODS):  # each method's curve and legend swatch, in its colour
        colour = tuple(int(PALETTE[i][k:k + 2], 16) for k in (1, 3, 5))
        assert (charts == colour).all(-1).sum() > 100, method
    # The gallery: one row per chosen image (2 best, 2 worst); each tile shows a picture, not a blank.
    below = page[70 + CHART[1] + 20:]
    assert below.shape[0] >= 4 * TILE
    tiles = below[60:60 + TILE, 140:140 + (2 + len(METHODS)) * (TILE + 8)]
    assert tiles.std() > 10


def test_notebook_report_returns_the_picture(results, tmp_path):
    import l2r

    shown = l2r.report(str(results), output=str(tmp_path / "nb"), gallery=2)
    assert shown._repr_png_() == (tmp_path / "nb" / "summary.png").read_bytes()
    assert set(shown.methods) == set(METHODS) and "deletion AUC" in shown.markdown
    assert "summary.png" in repr(shown)


def test_controls_are_flagged_in_parquet_manifest_and_report(results, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from l2r.results import CONTROLS_KEY

    # The job's Parquet says which methods are controls.
    files = sorted((results / "parquet").glob("*.parquet"))
    assert files and all(json.loads(pq.read_schema(f).metadata[CONTROLS_KEY]) == ["random", "gaussian"]
                         for f in files)
    # A copy of the results where the control `random` removes evidence fastest of all (as
    # scattered black pixels do at 32 px) and inserts worst.
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    for f in sorted((copy / "parquet").glob("*.parquet")):
        df = pq.read_table(f).to_pandas()
        df.loc[df.method == "random", "deletion_auc"] = 0.001
        df.loc[df.method == "random", "insertion_auc"] = 0.0
        pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), f)
    built = rep.write_report(rep.ReportConfig(results=str(copy), gallery=0), log=lambda line: None)
    assert built["controls"] == ["random"]
    findings = built["control_findings"]
    assert len(findings) == 1  # deletion only: on insertion random is the worst
    others = {m: built["methods"][m]["deletion_auc"]["mean"] for m in ("l2r", "gradcam")}
    sentence = findings[0]
    assert sentence.startswith("The control random beats") and "deletion AUC (0.001" in sentence
    for method, value in others.items():
        assert f"{method} ({value:.3f})" in sentence
    assert "black reference" in sentence and f"{SIZE} px" in sentence and "--reference impute" in sentence
    markdown = Path(built["files"]["summary.md"]).read_text()
    assert "| random (control) |" in markdown and sentence in markdown
    page = Path(built["files"]["report.html"]).read_text()
    assert "random (control)" in page and "<p class=finding>The control random beats" in page


def test_no_finding_when_every_method_beats_the_controls():
    methods = {name: {"control": name == "random", "deletion_auc": {"mean": d}, "insertion_auc": {"mean": i}}
               for name, d, i in (("l2r", 0.1, 0.9), ("gradcam", 0.2, 0.8), ("random", 0.3, 0.5))}
    assert report_stats.control_findings(methods, {"reference": "black"}, (32, 32)) == []
    methods["random"]["insertion_auc"]["mean"] = 0.85
    (finding,) = report_stats.control_findings(methods, {"reference": "impute"}, (32, 32))
    assert "beats gradcam (0.800) on insertion AUC (0.850, higher is better)" in finding
    assert "l2r" not in finding and "rebuild a smooth copy" in finding  # insertion's own cause under impute
    methods["random"]["deletion_auc"]["mean"] = 0.15
    deletion, insertion = report_stats.control_findings(methods, {"reference": "impute"}, (32, 32))
    assert "on deletion AUC (0.150" in deletion and "removed set's shape carries no colour edge" in deletion
    assert insertion == finding
