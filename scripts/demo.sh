#!/usr/bin/env bash
# The main job end to end on a built-in default (CPU, minutes): synthetic shapes with known
# evidence masks -> a small CNN target fitted in-process -> an explainer trained with Ray Train
# -> batch attribution with Ray Data (l2r and baselines, exact deletion/insertion AUCs, Parquet)
# -> a comparison report (Markdown, JSON, HTML).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L2R_VENV:-.venv}
RUNS=${L2R_RUNS:-$PWD/runs}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c scripts/constraints.txt -e ".[baselines]"
export RAY_USAGE_STATS_ENABLED=0

"$VENV/bin/python" jobs/train.py --config jobs/configs/demo.yaml --storage "$RUNS"
"$VENV/bin/python" jobs/attribute.py --shards "$RUNS/demo/data/val-*.tar" --output "$RUNS/demo/attribution" \
    --explainer "$RUNS/demo/explainer" --methods l2r,gradcam,saliency,random,gaussian --masks
"$VENV/bin/python" jobs/report.py --results "$RUNS/demo/attribution" --output "$RUNS/demo/report"
echo "open $RUNS/demo/report/report.html"
