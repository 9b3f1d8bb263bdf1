"""The report on one PNG page: the mean deletion and insertion curves and a small gallery.

For people on a remote machine or in a notebook, where opening an HTML page is a detour:
`summary.png` beside `report.html`, drawn with Pillow alone (no plotting library to install).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from l2r.reporting.images import PALETTE
from l2r.reporting.stats import fmt

WIDTH = 1200
CHART = (560, 300)
TILE = 112
GALLERY_ROWS = 4  # two best, two worst
BACKGROUND, INK, GRID, MUTED = (255, 255, 255), (29, 29, 31), (229, 229, 229), (110, 110, 110)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _chart(draw: ImageDraw.ImageDraw, origin: tuple[int, int], curves: dict, which: str, colours: dict,
           title: str, methods: dict) -> None:
    """One panel of mean curves: x = fraction of pixels deleted/inserted, y = target probability."""
    x0, y0 = origin
    width, height = CHART
    left, right, top, bottom = 50, 150, 26, 40
    pw, ph = width - left - right, height - top - bottom
    top_y = max([1e-6] + [max(c[which]) for c in curves.values()])
    top_y = min(1.0, float(np.ceil(top_y * 10) / 10)) if top_y <= 1 else float(top_y)
    small, label = _font(12), _font(14)

    def xy(x, y):
        return x0 + left + x * pw, y0 + top + ph - (y / top_y) * ph

    draw.text((x0 + left + pw / 2, y0 + 4), title, fill=INK, font=label, anchor="mt")
    for i in range(6):
        _, gy = xy(0, top_y * i / 5)
        draw.line([(x0 + left, gy), (x0 + left + pw, gy)], fill=GRID)
        draw.text((x0 + left - 6, gy), f"{top_y * i / 5:.2f}", fill=MUTED, font=small, anchor="rm")
        gx, _ = xy(i / 5, 0)
        draw.text((gx, y0 + top + ph + 6), f"{i / 5:.1f}", fill=MUTED, font=small, anchor="mt")
    draw.rectangle([x0 + left, y0 + top, x0 + left + pw, y0 + top + ph], outline=(136, 136, 136))
    verb = "deleted" if which == "deletion" else "inserted"
    draw.text((x0 + left + pw / 2, y0 + height - 4), f"fraction of pixels {verb}", fill=INK, font=small, anchor="mb")
    for method, curve in curves.items():
        points = [xy(x, y) for x, y in zip(curve["fractions"], curve[which])]
        draw.line(points, fill=colours[method], width=2)
    # Legend with each method's mean AUC, in the space right of the plot.
    for i, method in enumerate(m for m in methods if m in curves):
        ly = y0 + top + 6 + i * 20
        lx = x0 + left + pw + 12
        draw.line([(lx, ly), (lx + 18, ly)], fill=colours[method], width=3)
        auc = (methods[method].get(f"{which}_auc") or {}).get("mean")
        draw.text((lx + 24, ly), f"{method} {fmt(auc, 3)}", fill=INK, font=small, anchor="lm")


def _tile(array: np.ndarray | None) -> Image.Image:
    if array is None:
        return Image.new("RGB", (TILE, TILE), (240, 240, 240))
    picture = Image.fromarray(np.ascontiguousarray(array))
    # Small inputs (32 px) are enlarged without smoothing, so single pixels stay visible.
    resample = Image.NEAREST if max(picture.size) < TILE else Image.BILINEAR
    return picture.resize((TILE, TILE), resample)


def _chosen(entries: list[dict]) -> list[dict]:
    best = [e for e in entries if e["group"] == "best"][: GALLERY_ROWS // 2]
    worst = [e for e in entries if e["group"] == "worst"][-(GALLERY_ROWS // 2):]
    return best + worst


def render_png(report: dict, gallery_data: dict) -> bytes:
    """The summary page as PNG bytes (`report` as built by `l2r.reporting.report.build_report`)."""
    methods = report["methods"]
    names = list(methods)
    colours = {m: _rgb(PALETTE[i % len(PALETTE)]) for i, m in enumerate(names)}
    entries = _chosen(gallery_data.get("entries") or [])
    has_mask = any(e.get("mask") for e in entries)
    columns = ["image"] + (["evidence"] if has_mask else []) + names
    caption = 30
    gallery_height = (50 + caption + len(entries) * (TILE + caption)) if entries else 0
    width = max(WIDTH, 150 + len(columns) * (TILE + 8))
    height = 70 + CHART[1] + 20 + gallery_height
    page = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(page)
    protocol, target = report.get("protocol") or {}, report.get("target") or {}
    draw.text((20, 14), "Attribution comparison", fill=INK, font=_font(20))
    n = max((m.get("n", 0) for m in methods.values()), default=0)
    draw.text((20, 42), f"{n} images · target {target.get('spec', '?')} · reference {protocol.get('reference', '?')}"
              f" · {protocol.get('steps', '?')} curve points · {report.get('results', '')}", fill=MUTED, font=_font(12))
    _chart(draw, (10, 70), report["curves"], "deletion", colours, "Deletion (lower is better)", methods)
    _chart(draw, (10 + CHART[0] + 20, 70), report["curves"], "insertion", colours, "Insertion (higher is better)",
           methods)
    if entries:
        y = 70 + CHART[1] + 20
        draw.text((20, y), f"Gallery: best and worst by {gallery_data.get('by')} deletion AUC "
                           f"(bright = most important)", fill=INK, font=_font(14))
        y += 30
        x_start = 140
        for j, column in enumerate(columns):
            draw.text((x_start + j * (TILE + 8) + TILE / 2, y + caption - 6), column, fill=INK, font=_font(12),
                      anchor="mb")
        y += caption
        for entry in entries:
            group_colour = (26, 127, 55) if entry["group"] == "best" else (180, 35, 24)
            draw.text((20, y + 4), entry["group"], fill=group_colour, font=_font(13))
            draw.text((20, y + 22), str(entry["key"])[:18], fill=MUTED, font=_font(10))
            draw.text((20, y + 38), f"class {entry['target']}, p={fmt(entry['target_prob'], 2)}", fill=MUTED,
                      font=_font(10))
            tiles = [entry.get("picture")]
            if has_mask:
                tiles.append(entry.get("mask_picture"))
            tiles += [(entry["maps"].get(m) or {}).get("overlay") for m in names]
            for j, array in enumerate(tiles):
                x = x_start + j * (TILE + 8)
                page.paste(_tile(array), (x, y))
                if j >= len(tiles) - len(names):
                    cell = entry["maps"].get(names[j - (len(tiles) - len(names))])
                    if cell is not None:
                        draw.text((x + TILE / 2, y + TILE + 3), f"del {fmt(cell['deletion_auc'], 2)} "
                                  f"ins {fmt(cell['insertion_auc'], 2)}", fill=MUTED, font=_font(10), anchor="mt")
            y += TILE + caption
    buffer = io.BytesIO()
    page.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
