#!/usr/bin/env bash
# GPU check, in one go (about 4-6 minutes on one H100/H200):
#   1. the attribution job with a GPU actor (ResNet-20 target, untrained explainer, methods
#      l2r,gradcam,saliency,random) in fp32, a rerun that must skip every shard, then the same
#      job in bf16: AUCs compared per image against fp32;
#   2. benchmarks/attribute.py --device cuda, fp32 and bf16, on IMAGES x REPEAT images (images/s,
#      fraction of the fp32 eager forward bound, speedup over a per-image loop);
#   3. benchmarks/imputation.py on the GPU: the attribution job with the impute reference against
#      black (impute_vs_black_32), the batched imputation against pytorch-grad-cam's
#      (impute_vs_gradcam_road_32) and against an exact solve (CIFAR-10 only: $DATA);
#   4. the training job, config `cifar10` unmodified but for data paths, on one GPU for
#      $TRAIN_STEPS steps (s/step, images/s, exact held-out AUCs).
# Each stage has its own time limit; a failed stage is reported and the next one still runs.
#
# Python packages: where `ray` is not importable, wheels in .whl/ (see benchmarks/RESULTS.md,
# "GPU runs") are installed into /tmp/site first; else `pip install -e .[baselines]`.
# Data: $DATA (default ../shared/data/cifar10) with test-0000.tar and train-0000.tar, and
# $CKPT (default ../shared/models/resnet20-12fca82f.th). Results and logs go to $OUT.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0  # Ray token auth stays on (local Ray writes ~/.ray/auth_token)
PY=${PYTHON:-python3}
DATA=${DATA:-../shared/data/cifar10}
CKPT=${CKPT:-../shared/models/resnet20-12fca82f.th}
OUT=${OUT:-$(mktemp -d)}      # logs (8 files at most: what a device run brings back)
WORK=${WORK:-$(mktemp -d)}    # artifacts, Parquet, checkpoints
IMAGES=${IMAGES:-2500}
TRAIN_STEPS=${TRAIN_STEPS:-300}
REPEAT=${REPEAT:-16}          # the benchmark's images = IMAGES x REPEAT (a GPU needs many for a steady state)
mkdir -p "$OUT" "$WORK"
DATA=$(cd "$DATA" && pwd); CKPT=$(realpath "$CKPT")

if ! $PY -c "import ray" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    $PY -m pip install -q -e ".[baselines]" || exit 1
  fi
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
$PY -c "import torch, ray, timm; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'ray', ray.__version__, 'timm', timm.__version__)" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm --format=csv,noheader || true

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, report the outcome
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 6 "$OUT/$name.log"
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  return $rc
}

# An untrained explainer on the target's layers (throughput does not depend on training).
$PY - "$CKPT" "$WORK/explainer" <<'EOF' || exit 1
import sys
from l2r.zoo.resnet20 import CIFAR10_MEAN, CIFAR10_STD
from l2r.classifier import build_target
from l2r.explainer import build_explainer, save_explainer
target = build_target("l2r.zoo.resnet20:resnet20", checkpoint=sys.argv[1], mean=CIFAR10_MEAN, std=CIFAR10_STD, input_size=(32, 32))
explainer = build_explainer({"backbone": "target", "layers": ["layer1", "layer2", "layer3"], "dim": 32, "head_dim": 16}, target=target)
save_explainer(sys.argv[2], explainer, {"note": "untrained, gpu_check"})
EOF

JOB=(jobs/attribute.py --shards "$DATA/test-0000.tar" --model l2r.zoo.resnet20:resnet20
     --checkpoint "$CKPT" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --input-size 32
     --explainer "$WORK/explainer" --methods l2r,gradcam,saliency,random --device cuda --progress-interval 15)
stage job_fp32 80 $PY "${JOB[@]}" --output "$WORK/attr_fp32"
stage job_rerun 40 $PY "${JOB[@]}" --output "$WORK/attr_fp32"
$PY -c "import json; s=json.loads(open('$OUT/job_rerun.log').read().strip().splitlines()[-1]); assert s['shards_done']==0 and s['shards_skipped']==s['shards'], s; print('rerun skipped all', s['shards'], 'shards')"
stage job_bf16 80 $PY "${JOB[@]}" --output "$WORK/attr_bf16" --precision bf16
$PY - "$WORK" <<'EOF' | tee "$OUT/bf16_vs_fp32.json"
import json, sys
import pandas as pd
out = sys.argv[1]
a, b = (pd.read_parquet(f"{out}/attr_{p}/parquet") for p in ("fp32", "bf16"))
m = a.merge(b, on=["key", "method"], suffixes=("_fp32", "_bf16"))
res = {"rows": len(m)}
for method, g in m.groupby("method"):
    d = (g.deletion_auc_bf16 - g.deletion_auc_fp32).abs()
    i = (g.insertion_auc_bf16 - g.insertion_auc_fp32).abs()
    res[method] = {"deletion_max_abs_diff": round(float(d.max()), 5), "insertion_max_abs_diff": round(float(i.max()), 5),
                   "deletion_mean_abs_diff": round(float(d.mean()), 6), "insertion_mean_abs_diff": round(float(i.mean()), 6),
                   "mean_auc_fp32": [round(float(g.deletion_auc_fp32.mean()), 4), round(float(g.insertion_auc_fp32.mean()), 4)],
                   "mean_auc_bf16": [round(float(g.deletion_auc_bf16.mean()), 4), round(float(g.insertion_auc_bf16.mean()), 4)]}
print(json.dumps(res))
EOF

for p in fp32 bf16; do
  stage bench_$p 90 $PY benchmarks/attribute.py --models resnet20 --device cuda --shards "$DATA/test-0000.tar" --checkpoint "$CKPT" \
      --images "$IMAGES" --repeat "$REPEAT" --shard-size 2500 --precision $p --naive-images 50 --workdir "$WORK/bench_$p"
done

stage impute 120 $PY benchmarks/imputation.py --device cuda --map-images 32=16 --accuracy-sizes 32 \
    --job-images 32=512 --cifar-shard "$DATA/test-0000.tar" --cifar-checkpoint "$CKPT"

stage train 180 $PY jobs/train.py --config jobs/configs/cifar10.yaml --gpus --steps "$TRAIN_STEPS" \
    --set data.train="$DATA/train-0000.tar" --set data.val="$DATA/test-0000.tar" --set target.checkpoint="$CKPT" \
    --storage "$WORK/runs" --name gpu_check
cp "$WORK/runs/gpu_check/metrics.jsonl" "$OUT/" 2>/dev/null && tail -n 2 "$OUT/metrics.jsonl"
echo "logs in $OUT, results in $WORK"
