"""The report's statistics and tables: per-method means with paired bootstrap intervals, per class,
mean curves, and the summary table (one header and one set of cells for Markdown and HTML alike).
Definitions are in `l2r.reporting.report`'s docstring."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

from l2r.methods import control_names

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
        entry = {"n": valid.num_rows, "errors": rows.num_rows - valid.num_rows, "control": method in control_names()}
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
        entry["sanity_spearman"] = _sanity_means(valid)
        out[method] = entry
    return out


def _sanity_means(valid: pa.Table) -> list[float | None] | None:
    """Mean Spearman correlation per sanity-check stage over the images (constant maps left out)."""
    if "sanity_spearman" not in valid.column_names:
        return None
    lists = [v for v in valid.column("sanity_spearman").to_pylist() if v]
    if not lists:
        return None
    values = np.array(lists, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stage with only constant maps: all NaN
        means = np.nanmean(values, axis=0)
    return [None if np.isnan(m) else round(float(m), 4) for m in means]


SANITY_NOTE = (
    "Sanity check (model randomisation, Adebayo et al. 2018): Spearman rank correlation between each map and "
    "the same method's map on the target with its layers re-initialised from the top, stage by stage (the last "
    "stage is a fully random model). A method that explains the model falls towards 0; one that stays near 1 "
    "explains the image, not the model (the controls stay at 1 by construction). For l2r, an amortised "
    "explainer: with the target's own layers as backbone it reads the randomised features and its map changes; "
    "with an independent backbone it never sees the target, so it stays at 1 by construction, and what "
    "protects you is the target-mismatch guard (an explainer runs only with the exact target it was trained for).")


def sanity_rows(methods: dict) -> tuple[list[str], list[list[str]]] | None:
    """Header and cells of the sanity-check table, or None when the check was not run."""
    stages = max((len(m.get("sanity_spearman") or []) for m in methods.values()), default=0)
    if not stages:
        return None
    header = ["method"] + [f"stage {s + 1}" + (" (all layers)" if s == stages - 1 else "") for s in range(stages)]
    cells = [[name] + [fmt(v, 3) for v in (m.get("sanity_spearman") or [None] * stages)]
             for name, m in methods.items()]
    return header, cells


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
        row = [f"{method} (control)" if m.get("control") else method, str(m["n"]), str(m["errors"]), fmt_ci(m["deletion_auc"]), fmt_ci(m["insertion_auc"]),
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


def markdown_table(methods: dict, level: float = 0.95, findings: list[str] | None = None) -> str:
    """The summary table; `findings` (control_findings) follow it, one paragraph each."""
    header, cells = table_rows(methods, level)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += [f"\n**{finding}**" for finding in findings or []]
    sanity = sanity_rows(methods)
    if sanity:
        header, cells = sanity
        lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        lines += ["", SANITY_NOTE]
    return "\n".join(lines)


# metric -> (its name in a sentence, whether lower is better)
_METRICS = {"deletion_auc": ("deletion AUC", True), "insertion_auc": ("insertion AUC", False)}


def control_findings(methods: dict, protocol: dict | None = None, input_size=None) -> list[str]:
    """One sentence per control and metric where the control beats a real method (by the mean).

    A control knows nothing of the image or the model, so a method it beats is not shown to be
    faithful, or the metric is being gamed; the sentence names the likely cause and the fix.
    """
    reference = (protocol or {}).get("reference")
    side = f"{input_size[0]} px" if input_size else "this resolution"
    if reference == "impute":
        causes = {
            "deletion_auc": "with the impute reference the removed set's shape carries no colour edge, so these "
                            "maps rank pixels no better than a map that knows nothing about the image, on this model",
            # Measured (benchmarks/RESULTS.md, "Under impute, a weak ViT"): random leads insertion only up to ~40 %.
            "insertion_auc": "with the impute reference a few scattered inserted pixels let the imputation rebuild a "
                             "smooth copy of the whole image, which this model already recognises, so a scattered "
                             "order scores well on insertion whatever it ranks; judge these maps by deletion and "
                             "ins - del, where a scattered order gains nothing",
        }
    else:
        causes = dict.fromkeys(_METRICS, (
            f"likely cause: the {reference or 'given'} reference is out of distribution for the model at "
            f"{side}, so removing scattered pixels is itself an attack that drives the probability down "
            f"regardless of the map; the impute reference (--reference impute, ROAD's noisy linear "
            f"imputation) avoids it"))
    findings = []
    controls = [name for name, m in methods.items() if m.get("control")]
    for control in controls:
        for metric, (label, lower_is_better) in _METRICS.items():
            c = methods[control][metric]["mean"]
            if c is None:
                continue
            beaten = []
            for name, m in methods.items():
                value = m[metric]["mean"]
                if m.get("control") or value is None:
                    continue
                if (c < value) if lower_is_better else (c > value):
                    beaten.append(f"{name} ({value:.3f})")
            if beaten:
                better = "lower" if lower_is_better else "higher"
                findings.append(f"The control {control} beats {', '.join(beaten)} on {label} ({c:.3f}, "
                                f"{better} is better): {causes[metric]}.")
    return findings
