#!/usr/bin/env bash
# Issue 6's GPU checks as one prepared run (about 5 minutes on an H200; not yet run on one: no session so
# far had a GPU). Prints, and writes under $OUT:
#   1. resnet50@150 training images/s on the GPU: imgcls's engine and the same step on ready tensors
#      (bench/train_throughput.py --device cuda, bf16, channels_last, batch 256; target >= 10,000 img/s);
#   2. the seed study's baseline arm (studies/seed.yaml: ResNet-50 from scratch, 150 px, 24 epochs, Adam,
#      flip + rotate, batch 64) trained end to end by the real CLI: wall time (target < 60 s) and test accuracy.
#
#   bench/gpu_check.sh [DATA]     DATA: an intel-scenes-like folder (default ../shared/datasets/intel-scenes)
#
# Uses the Python that has torch (PY=..., default python3) and this checkout's src/ without installing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DATA=${1:-../shared/datasets/intel-scenes}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMGCLS_CACHE="$OUT/cache"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU here: nothing to check")'
"$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$OUT/device.txt"
if [ ! -d "$DATA" ]; then echo "no data folder at $DATA" >&2; exit 2; fi

"$PY" bench/train_throughput.py --device cuda --models resnet50 --batch-size 256 --skip-baseline --steps 40 \
    2>&1 | tee "$OUT/throughput.log"

# the arm's wall time includes decoding into the (warm after step 1) cache, import and the final evaluation
start=$(date +%s.%N)
"$PY" -m imgcls train "$DATA" --model resnet50 --epochs 24 --img-size 150 --optimizer adam --augment flip-rotate \
    --out "$OUT/seed-arm" 2>&1 | tee "$OUT/seed-arm.log"
end=$(date +%s.%N)
"$PY" - "$start" "$end" "$OUT/seed-arm" <<'EOF' | tee "$OUT/summary.json"
import json, sys
start, end, run = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
metrics = json.load(open(f"{run}/eval/metrics.json"))
print(json.dumps({"bench": "gpu_check", "seed_arm_wall_s": round(end - start, 1), "seed_arm_test_acc": metrics.get("accuracy")}))
EOF
