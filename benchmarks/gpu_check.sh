#!/usr/bin/env bash
# GPU check of the attribution job, in one go (about 3-5 minutes on one H100):
#   1. the job with a GPU actor on CIFAR-10 test shards (ResNet-20 target, untrained explainer,
#      methods l2r,gradcam,saliency,random), then a rerun that must skip every shard;
#   2. benchmarks/attribute.py --device cuda (images/s, fraction of the forward bound, speedup).
# Installs nothing beyond `pip install -e .` when the project is not importable.
# Data: $SHARED (default ../shared) data/cifar10 + models/resnet20-12fca82f.th; where they are
# missing, synthetic 32x32 shards and a randomly initialised ResNet-20 stand in (throughput
# does not depend on the weights). Results go to $OUT (default: a temporary folder).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SHARED=${SHARED:-../shared}
OUT=${OUT:-$(mktemp -d)}
IMAGES=${IMAGES:-10000}
mkdir -p "$OUT"

if ! $PY -c "import l2r, pipeline.attribute, ray, timm, captum, pytorch_grad_cam" 2>/dev/null; then
  $PY -m pip install -q -e ".[baselines]"
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

SHARDS="$SHARED/data/cifar10/test-{0000..0001}.tar"
CKPT="$SHARED/models/resnet20-12fca82f.th"
if [ ! -f "$SHARED/data/cifar10/test-0000.tar" ] || [ ! -f "$CKPT" ]; then
  echo "shared CIFAR-10 data not found under $SHARED: using synthetic shards and a random ResNet-20"
  $PY jobs/make_shards.py --synthetic "$IMAGES" --size 32 --output "$OUT/shards" --prefix test --max-count 5000 --no-progress
  SHARDS="$OUT/shards/test-*.tar"
  CKPT="$OUT/resnet20-random.th"
  $PY -c "import torch; from benchmarks.resnet20 import resnet20; torch.manual_seed(0); torch.save(resnet20().state_dict(), '$CKPT')"
fi

# An untrained explainer on the target's layers (throughput does not depend on training).
$PY - "$CKPT" "$OUT/explainer" <<'EOF'
import sys
from benchmarks.resnet20 import CIFAR10_MEAN, CIFAR10_STD, resnet20  # noqa: F401
from l2r.classifier import build_target
from l2r.explainer import build_explainer, save_explainer
target = build_target("benchmarks.resnet20:resnet20", checkpoint=sys.argv[1], mean=CIFAR10_MEAN, std=CIFAR10_STD, input_size=(32, 32))
explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 32, "head_dim": 16}, target=target)
save_explainer(sys.argv[2], explainer, {"note": "untrained, gpu_check"})
EOF

JOB=(jobs/attribute.py --shards "$SHARDS" --output "$OUT/attr" --model benchmarks.resnet20:resnet20
     --checkpoint "$CKPT" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --input-size 32
     --explainer "$OUT/explainer" --methods l2r,gradcam,saliency,random --device cuda --progress-interval 15)
echo "== job (GPU actor)"
time $PY "${JOB[@]}" | tee "$OUT/job.log"
echo "== rerun (must skip every shard)"
$PY "${JOB[@]}" | tail -n 1 | tee "$OUT/rerun.json"
$PY -c "import json,sys; s=json.load(open('$OUT/rerun.json')); assert s['shards_done']==0 and s['shards_skipped']==s['shards'], s; print('rerun skipped all', s['shards'], 'shards')"

echo "== benchmark"
$PY benchmarks/attribute.py --device cuda --shards "$SHARDS" --checkpoint "$CKPT" --images "$IMAGES" \
    --shard-size 2500 --workdir "$OUT/bench" | tee "$OUT/bench.log" | tail -n 12
echo "results in $OUT"
