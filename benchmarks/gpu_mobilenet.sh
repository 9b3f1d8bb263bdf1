#!/usr/bin/env bash
# Train the imagenet-sample-mobilenet explainer on one GPU (issue #14's realistic resolution), unmodified
# but for paths: the 500 photos (pre-resized to a 208 px shorter side so that they travel to a lent
# machine; the job decodes them at 183 px either way), the shared MobileNetV1 file and weights.
# benchmarks/gpu_train.sh runs it and says what comes back.
#   DATA=.gpumb bash benchmarks/gpu_mobilenet.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.gpumb}
CONFIG=imagenet-sample-mobilenet exec bash benchmarks/gpu_train.sh --set data.train="$DATA/val-0000-s208.tar" \
  --set target.spec="$DATA/mobilenet_v1.py:MobileNetV1" --set target.checkpoint="$DATA/mobilenet_v1_0.5_160.pth" "$@"
