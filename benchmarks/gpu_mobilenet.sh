#!/usr/bin/env bash
# Train the imagenet-sample-mobilenet explainer on one GPU (issue #14's realistic resolution), unmodified
# but for paths: the 500 photos (pre-resized to a 208 px shorter side so that they travel to a lent
# machine; the job decodes them at 183 px either way), the shared MobileNetV1 file and weights.
# Everything the run writes (config, checkpoints, metrics.jsonl, the artifact) goes to $OUT/runs, so
# that a run cut short still brings back its last checkpoint (a rerun with the same storage resumes).
# Keep LIMIT (the training's own time limit) 15 s or more under the device call's limit, so the copies
# below run.
#   DATA=.gpumb bash benchmarks/gpu_mobilenet.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
PY=${PYTHON:-python3}
DATA=${DATA:-.gpumb}
OUT=${OUT:-$(mktemp -d)}
LIMIT=${LIMIT:-240}
GPUS=${GPUS---gpus}   # GPUS= runs it on the CPU (a check of the script itself)
mkdir -p "$OUT"
if ! $PY -c "import ray" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout "$LIMIT" $PY jobs/train.py --config jobs/configs/imagenet-sample-mobilenet.yaml $GPUS \
  --set data.train="$DATA/val-0000-s208.tar" \
  --set target.spec="$DATA/mobilenet_v1.py:MobileNetV1" --set target.checkpoint="$DATA/mobilenet_v1_0.5_160.pth" \
  --storage "$OUT/runs" "$@" > "$OUT/train.log" 2>&1
echo "train rc=$?"
# A device run brings back files at most a few folders deep: the artifact and the newest checkpoint flat.
RUN="$OUT/runs/imagenet-sample-mobilenet"
for f in "$RUN"/explainer/*; do [ -f "$f" ] && cp "$f" "$OUT/explainer-$(basename "$f")"; done
LAST=$(ls -d "$RUN"/checkpoint_* 2>/dev/null | tail -n 1)
[ -n "$LAST" ] && cp "$LAST/state.pt" "$OUT/last-checkpoint-state.pt"
grep -v "placement_group_cleaner" "$OUT/train.log" | tail -n 8
tail -n 1 "$OUT/runs/imagenet-sample-mobilenet/metrics.jsonl" 2>/dev/null
