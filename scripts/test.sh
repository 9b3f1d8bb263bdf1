#!/usr/bin/env bash
# Creates a fresh environment, installs the project with its test extras, runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${L2R_TEST_VENV:-.venv-test}
python3 -m venv "$VENV"
# Known-good versions: without them pip's resolver can backtrack for many minutes over
# the botocore / aiobotocore / s3fs / moto pins.
"$VENV/bin/pip" install -q --no-compile -c scripts/constraints.txt -e ".[test]"  # no .pyc pass over torch (1.8 min install instead of 3.6)
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
set +e
"$VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected"; exit 1; fi
exit "$rc"
