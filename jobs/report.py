"""Compare the methods of an attribution output: summary.md, summary.json and a self-contained report.html.

    python jobs/report.py --results runs/attr [--output runs/attr/report] [--gallery 8]
    python jobs/report.py --results s3://bucket/attr/run1 --storage-options '{"anon": false}'

Prints the Markdown summary table (per method: n, errors, mean deletion / insertion AUC and
their difference with bootstrap intervals, cost per image, pointing game and mask AUROC where
the run used --masks).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from l2r.reporting.report import ReportConfig, write_report  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="output folder of jobs/attribute.py (local or fsspec URL)")
    p.add_argument("--output", help="report folder (default: RESULTS/report)")
    p.add_argument("--gallery", type=int, default=8, help="images in the gallery, half best, half worst (0: none)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over images")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--level", type=float, default=0.95, help="interval level")
    p.add_argument("--storage-options", help="JSON options for the fsspec filesystem of URL results and shards")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = ReportConfig(
        results=args.results,
        output=args.output,
        gallery=args.gallery,
        resamples=args.resamples,
        seed=args.seed,
        level=args.level,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
    )
    return write_report(config)


if __name__ == "__main__":
    main()
