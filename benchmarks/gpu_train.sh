#!/usr/bin/env bash
# Train one shipped explainer's config on one GPU and bring the result back from a lent machine.
# The config is used unmodified but for what the arguments override (data paths, --steps).
# Everything the run writes (config, checkpoints, metrics.jsonl, the artifact) goes to $OUT/runs, so
# that a run cut short still brings back its last checkpoint (a rerun with the same storage resumes).
# A device call returns files at most two folders down: the artifact, config.yaml, metrics.jsonl and
# the newest checkpoint's state.pt are copied flat into $OUT. Then, here, with F the fetched folder:
#   mkdir -p runs/NAME/explainer && cp F/config.yaml F/metrics.jsonl runs/NAME/ &&
#   for f in explainer.json model.safetensors; do cp F/explainer-$f runs/NAME/explainer/$f; done
#   python scripts/ship_explainer.py runs/NAME SHIPPED_NAME --target-weights WEIGHTS_HERE
# (the artifact records the lent machine's paths; l2r.load checks the weights against its hash).
# Keep LIMIT (the training's own time limit) 15 s or more under the device call's limit, so the copies
# below run.
#   CONFIG=cifar10-vit bash benchmarks/gpu_train.sh --steps 2500 \
#     --set data.train=.gpudata/train-0000.tar --set data.val=.gpudata/test-0000.tar \
#     --set target.checkpoint=l2r/explainers/cifar10-vit/target.safetensors
#   CONFIG=cifar10-vit GPUS= bash benchmarks/gpu_train.sh --steps 2 ...   # on the CPU: a check of the script
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0  # Ray token auth stays on (local Ray writes ~/.ray/auth_token)
PY=${PYTHON:-python3}
CONFIG=${CONFIG:?CONFIG=<a name of jobs/configs/, without .yaml>}
OUT=${OUT:-$(mktemp -d)}
LIMIT=${LIMIT:-240}
GPUS=${GPUS---gpus}   # GPUS= runs it on the CPU
mkdir -p "$OUT"
if ! $PY -c "import ray" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
NAME=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "jobs/configs/$CONFIG.yaml") || exit 1
timeout "$LIMIT" $PY jobs/train.py --config "jobs/configs/$CONFIG.yaml" $GPUS --storage "$OUT/runs" "$@" \
  > "$OUT/train.log" 2>&1
echo "train rc=$?"
RUN="$OUT/runs/$NAME"
for f in "$RUN"/explainer/*; do [ -f "$f" ] && cp "$f" "$OUT/explainer-$(basename "$f")"; done
for f in config.yaml metrics.jsonl; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/$f"; done
LAST=$(ls -d "$RUN"/checkpoint_*/ 2>/dev/null | tail -n 1)
[ -n "$LAST" ] && cp "${LAST}state.pt" "$OUT/last-checkpoint-state.pt"
grep -v "placement_group_cleaner" "$OUT/train.log" | tail -n 8
tail -n 1 "$RUN/metrics.jsonl" 2>/dev/null
