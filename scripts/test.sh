#!/usr/bin/env bash
# Creates a fresh environment, installs the project with its test extras, runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L2R_TEST_VENV:-.venv-test}
python3 -m venv "$VENV"
# Known-good versions: without them pip's resolver can backtrack for many minutes over
# the botocore / aiobotocore / s3fs / moto pins.
"$VENV/bin/pip" install -q --no-compile -c scripts/constraints.txt -e ".[test]"
# Byte-compile on every core instead (pip's own pass is serial: 3.6 min install instead of 2.3). The
# .pyc files must exist: where PYTHONDONTWRITEBYTECODE is set, every process (each Ray worker too)
# would otherwise compile torch, timm and ray from source again, 5-10 s of CPU per process.
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" l2r pipeline jobs benchmarks tests >/dev/null \
    || true  # a few test files inside third-party packages do not compile
# Ray's token authentication stays on: tests/conftest.py gives the suite a token of its own.
export RAY_USAGE_STATS_ENABLED=0
set +e
"$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected"; exit 1; fi
exit "$rc"
