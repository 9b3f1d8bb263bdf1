#!/usr/bin/env bash
# The main job end to end on a built-in default (CPU, minutes): synthetic shapes with known
# evidence masks -> a small CNN target fitted in-process -> an explainer trained with Ray Train
# -> batch attribution with Ray Data (l2r and baselines, exact deletion/insertion AUCs, Parquet)
# -> a comparison report (Markdown, JSON, HTML, PNG). A second run reuses what is done.
# Arguments go to jobs/demo.py (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L2R_VENV:-.venv}
RUNS=${L2R_RUNS:-$PWD/runs}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -qq -c scripts/constraints.txt -e ".[baselines]"  # -qq: errors only
export RAY_USAGE_STATS_ENABLED=0
# The demo's Ray is a local instance with Ray's token authentication (on by default; Ray writes
# the token to ~/.ray/auth_token): nothing to set up, and no other program can submit jobs to it.

"$VENV/bin/python" jobs/demo.py --storage "$RUNS" "$@"
