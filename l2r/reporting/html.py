"""The report as one self-contained HTML page: inline CSS, curves as inline SVG, images as base64
PNG data URIs; nothing is fetched."""

from __future__ import annotations

import html

import numpy as np

from l2r.reporting.images import PALETTE
from l2r.reporting.stats import SANITY_NOTE, fmt, sanity_rows, table_rows, weights_line

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #1d1d1f; background: #fff; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 13px; line-height: 1.5; }
.finding { background: #fff4d6; border-left: 4px solid #d9a400; padding: 6px 10px; max-width: 1000px; }
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


def _sanity_section(methods: dict) -> list[str]:
    table = sanity_rows(methods)
    if not table:
        return []
    header, cells = table
    return ["<h2>Sanity check: model randomisation</h2>", _html_table(header, cells, "sanity"),
            f"<p class=note>{_e(SANITY_NOTE)}</p>"]


def render_html(report: dict, gallery_data: dict) -> str:
    methods = report["methods"]
    names = list(methods)
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}
    header, cells = table_rows(methods, report["bootstrap"]["level"])
    protocol = report.get("protocol") or {}
    target = report.get("target") or {}
    meta = [
        f"results: <span class=key>{_e(report['results'])}</span>",
        f"target: {_e(target.get('spec', '?'))} ({_e(weights_line(target))})",
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
        *[f"<p class=finding>{_e(finding)}</p>" for finding in report.get("control_findings") or []],
        *_sanity_section(methods),
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
