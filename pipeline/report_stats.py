"""The report's statistics and tables: per-method means with paired bootstrap intervals, per class,
mean curves, and the summary table (one header and one set of cells for Markdown and HTML alike).
Definitions are in `pipeline.report`'s docstring."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

METRICS = ("deletion_auc", "insertion_auc", "difference")


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


def sorted_rows(table: pa.Table, method: str) -> pa.Table:
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table.column("method"), method))
    return rows.sort_by([("source", "ascending"), ("key", "ascending")])


def valid_rows(rows: pa.Table) -> pa.Table:
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
        rows = sorted_rows(table, method)
        valid = valid_rows(rows)
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
        valid = valid_rows(sorted_rows(table, method))
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
        valid = valid_rows(sorted_rows(table, method))
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


def weights_line(target: dict) -> str:
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
