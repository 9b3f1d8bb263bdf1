#!/usr/bin/env bash
# The main job end to end on a built-in default (CPU, minutes): synthetic shapes with known
# evidence masks -> a small CNN target fitted in-process -> an explainer trained with Ray Train
# -> batch attribution with Ray Data (l2r and baselines, exact deletion/insertion AUCs, Parquet)
# -> a comparison report (Markdown, JSON, HTML, PNG). A second run reuses what is done.
# Arguments go to jobs/demo.py (e.g. --set train.steps=100).
# It says what it does before each phase, and while pip runs, a line every 15 s: a first run takes
# 5-7 minutes on 2 quiet cores, about half of it installing (benchmarks/RESULTS.md, "The demo").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L2R_VENV:-.venv}
RUNS=${L2R_RUNS:-$PWD/runs}
START=$SECONDS
say() { printf '[demo %dm%02ds] %s\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

if [ -x "$VENV/bin/python" ]; then
    say "1/4 virtual environment: $VENV (exists)"
else
    say "1/4 virtual environment: creating $VENV (python3 -m venv, seconds)"
    python3 -m venv "$VENV"
fi

# What is installed is what pyproject.toml and the constraints say: a later run with both unchanged
# skips pip (the project is installed editable, so code changes need no reinstall).
STAMP="$VENV/.l2r-demo-installed"
WANTED=$(cat pyproject.toml scripts/constraints.txt | cksum)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ]; then
    say "2/4 install: l2r and its dependencies are in $VENV already (pyproject.toml unchanged)"
    say "3/4 byte-compile: done when it was installed"
else
    say "2/4 install: l2r with its baselines into $VENV: torch, torchvision, timm, Ray (Train, Data),"
    say "    pyarrow, Captum, pytorch-grad-cam and their dependencies, at the versions of scripts/constraints.txt."
    say "    A first install fetches several GB and fills about 6.6 GB (PyPI's x86-64 torch brings CUDA"
    say "    libraries that a CPU never loads): about 2-3 min on a fast link; seconds when already there."
    LOG="$VENV/pip-install.log"
    "$VENV/bin/pip" install --no-compile --progress-bar off -c scripts/constraints.txt -e ".[baselines]" >"$LOG" 2>&1 &
    PIP=$!
    while kill -0 "$PIP" 2>/dev/null; do
        for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do kill -0 "$PIP" 2>/dev/null && sleep 1; done
        kill -0 "$PIP" 2>/dev/null || break
        doing=$(grep -E '^ *(Collecting|Processing|Downloading|Installing collected|Building|Obtaining)' "$LOG" | tail -n 1 \
            | sed -E 's#^ *##; s#(Processing|Obtaining) [^ ]*/#\1 #' | cut -c1-70 || true)
        fetched=$(grep -oE '^ *Downloading .*\(([0-9.]+) ([kMG]B)\)' "$LOG" | grep -oE '[0-9.]+ [kMG]B\)$' \
            | awk '{m = $2 == "GB)" ? 1024 : ($2 == "kB)" ? 1 / 1024 : 1); t += $1 * m} END {printf "%.0f MB", t}' || true)
        say "    pip: $(grep -cE '^(Collecting|Processing) ' "$LOG" || true) packages resolved, $fetched downloaded, $(du -sh "$VENV" 2>/dev/null | cut -f1) in $VENV; ${doing:-starting}"
    done
    if ! wait "$PIP"; then
        tail -n 30 "$LOG"
        say "pip install failed; its whole output is in $LOG"
        exit 1
    fi
    say "    installed ($(grep -cE '^(Collecting|Processing) ' "$LOG" || true) packages; pip's output in $LOG)"
    # pip's own compile pass is serial; this uses every core. Without .pyc files (PYTHONDONTWRITEBYTECODE),
    # every Ray worker would compile torch, timm and ray again at its start.
    say "3/4 byte-compile: $VENV and the project on every core (python -m compileall, about 1 min)"
    "$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" l2r pipeline jobs benchmarks >/dev/null 2>&1 || true
    echo "$WANTED" >"$STAMP"
fi
export RAY_USAGE_STATS_ENABLED=0
# The demo's Ray is a local instance with Ray's token authentication (on by default; Ray writes
# the token to ~/.ray/auth_token): nothing to set up, and no other program can submit jobs to it.

say "4/4 run: jobs/demo.py under $RUNS/demo: fit a small target, train the explainer (50 steps),"
say "    attribute 64 held-out images, write the report: about 2.5 min on 2 cores, seconds when done before"
"$VENV/bin/python" jobs/demo.py --storage "$RUNS" "$@"
say "finished"
