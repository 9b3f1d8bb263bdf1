#!/usr/bin/env bash
# Train the imagenet-mobilenet explainer on one lent GPU, with its conditioning ablation, and bring
# both artifacts back: the config as shipped (explainer.condition: classifier, the target's class
# weight rows) and the same run with a learnt embedding per class id (condition: embedding), each for
# $STEPS steps, one after the other; benchmarks/gpu_train.sh runs each and copies its files flat.
#
# Here, first (the photos re-encoded as the 183 px squares the job decodes; about 45 MiB at quality 80):
#   echo /.gpudata/ >> .git/info/exclude
#   python benchmarks/travel_shards.py --output .gpudata ../shared/data/imagenet-sample/val-0000.tar \
#     '../shared/data/duts/train-{0000..0001}.tar' '../shared/data/duts/train-{0003..0004}.tar' \
#     '../shared/data/duts/train-{0006..0011}.tar'
#   python benchmarks/travel_shards.py --output .gpudata --max-count 200 ../shared/data/duts/train-0005.tar
#   cp ../shared/models/mobilenet_v1.py ../shared/models/mobilenet_v1_0.5_160.pth .gpudata/
# The device image has no Ray: a first call carries .whl (the RESULTS section "GPU runs" says how
# it was made) and installs it into .site (ignored, kept between calls while the machine is warm):
#   SITE=.site INSTALL_ONLY=1 bash benchmarks/gpu_mobilenet.sh          (carry .whl)
#   SITE=.site bash benchmarks/gpu_mobilenet.sh                         (carry .gpudata)
# Then, here, per run NAME in $OUT: scripts/ship_explainer.py as benchmarks/gpu_train.sh says.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.gpudata}
STEPS=${STEPS:-1500}
OUT=${OUT:-$(mktemp -d)}
export SITE=${SITE:-/tmp/site}
if [ -n "${INSTALL_ONLY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  exit $?
fi
[ -d "$SITE/ray" ] && export PYTHONPATH="$SITE:$PWD"
paths=(--set "data.train=[$DATA/imagenet-sample/val-0000.tar, '$DATA/duts/train-{0000..0001}.tar',
  '$DATA/duts/train-{0003..0004}.tar', '$DATA/duts/train-{0006..0011}.tar']"
  --set "data.val=$DATA/duts/train-0005.tar"
  --set "target.spec=$DATA/mobilenet_v1.py:MobileNetV1" --set "target.checkpoint=$DATA/mobilenet_v1_0.5_160.pth")
for condition in classifier embedding; do
  echo "== explainer.condition=$condition, $STEPS steps"
  OUT="$OUT/$condition" CONFIG=imagenet-mobilenet LIMIT=${LIMIT:-270} bash benchmarks/gpu_train.sh \
    --steps "$STEPS" --name "imagenet-mobilenet-$condition" --set "explainer.condition=$condition" "${paths[@]}" "$@"
done
