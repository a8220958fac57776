#!/usr/bin/env bash
# The GPU check as one prepared run, for a machine that holds nothing but this repository (under 8 minutes
# on an H200: each phase has a time limit). In a fresh temporary folder ($TMPDIR, else /tmp), removed at the end:
#   1. an intel-scenes-like set of JPEGs (bench/make_scenes.py: six classes, 150x150, 14,034 + 1,501 images)
#      and the decode cache (IMGCLS_CACHE);
#   2. resnet50@150 training img/s, imgcls's engine and the same step on ready tensors (bench/
#      train_throughput.py: bf16, channels_last, batch 256, full batches, after a cuDNN-autotuning warm-up;
#      target >= 10,000 img/s), then a few steps with each augmentation preset under
#      torch.cuda.set_sync_debug_mode("warn"): every wait of the host for the GPU is reported with its line;
#   3. the seed study's baseline arm (studies/seed.yaml: ResNet-50 from scratch, 150 px, 24 epochs, Adam,
#      flip + rotate, batch 64) through the CLI on that data, cache warm: wall time (target < 60 s), test
#      accuracy (of synthetic scenes: a check that it learns, not a figure for intel-scenes).
# Into $OUT (default runs/gpu-check) go only the logs and one summary, gpu_check.json; reruns start afresh.
#
#   bench/gpu_check.sh [--device cuda|cuda:N|cpu] [--quick]
#
# --quick: a few images and steps, ResNet-18, one epoch: the plumbing (CI runs `--device cpu --quick`).
# Uses the Python that has torch (PY=..., default python3) and this checkout's src/ without installing.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "unknown argument $1 (use --device cuda|cpu, --quick)" >&2; exit 2 ;;
    esac
done
PY=${PY:-python3}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/gpu_check.json "$OUT"/*.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgcls-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMGCLS_CACHE="$WORK/cache"
t0=$(date +%s.%N)

if [ "$QUICK" = 1 ]; then
    SCALE=0.01 MODEL=resnet18 BATCH=16 ARM_BATCH=16 EPOCHS=1 LIMIT=600
    BENCH=(--quick --steps 2 --warmup 1 --sync-steps 2)
else
    SCALE=1 MODEL=resnet50 BATCH=256 ARM_BATCH=64 EPOCHS=24 LIMIT=0
    BENCH=(--steps 30 --warmup 10 --sync-steps 6)
fi
# each phase has a time limit, so the whole check ends inside its 8 minutes even when a phase hangs
limit() { timeout "$([ "$LIMIT" = 0 ] && echo "$1" || echo "$LIMIT")" "${@:2}"; }

"$PY" - "$DEVICE" > "$WORK/device.json" 2> "$OUT/device.log" <<'EOF'
import json, sys, torch
dev = torch.device(sys.argv[1])
info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda}
if dev.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: nothing to check (bench/gpu_check.sh --device cpu --quick checks the plumbing)")
    info.update(name=torch.cuda.get_device_name(dev), capability=list(torch.cuda.get_device_capability(dev)))
print(json.dumps(info))
EOF
rc=$?
cat "$OUT/device.log" >&2
[ $rc = 0 ] || exit 2
cat "$WORK/device.json"

echo "== data: bench/make_scenes.py --scale $SCALE"
limit 90 "$PY" bench/make_scenes.py "$WORK/scenes" --scale "$SCALE" > "$WORK/scenes.json" 2> "$OUT/make-data.log"
data_rc=$?
cat "$WORK/scenes.json" "$OUT/make-data.log"

echo "== throughput: $MODEL@150, batch $BATCH, on $DEVICE"
limit 150 "$PY" bench/train_throughput.py --device "$DEVICE" --data "$WORK/scenes" --models "$MODEL" --batch-size "$BATCH" \
    --skip-baseline --precision bf16 "${BENCH[@]}" --json "$WORK/throughput.json" 2>&1 | tee "$OUT/throughput.log"
bench_rc=${PIPESTATUS[0]}

echo "== the seed arm: $MODEL, 150 px, $EPOCHS epoch(s), Adam, flip-rotate, batch $ARM_BATCH, through the CLI"
cache_before=$(find "$IMGCLS_CACHE" -type f 2>/dev/null | wc -l)
start=$(date +%s.%N)
limit 210 "$PY" -m imgcls train "$WORK/scenes" --model "$MODEL" --epochs "$EPOCHS" --img-size 150 --optimizer adam \
    --augment flip-rotate --batch-size "$ARM_BATCH" --seed 0 --device "$DEVICE" --out "$WORK/seed-arm" 2>&1 | tee "$OUT/seed-arm.log"
arm_rc=${PIPESTATUS[0]}
end=$(date +%s.%N)
cache_after=$(find "$IMGCLS_CACHE" -type f 2>/dev/null | wc -l)

"$PY" - "$WORK" "$OUT/gpu_check.json" "$QUICK" "$t0" "$start" "$end" "$data_rc" "$bench_rc" "$arm_rc" "$cache_before" "$cache_after" <<'EOF'
import csv, json, statistics, sys, time
from pathlib import Path

work, dest, quick = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
t0, start, end = map(float, sys.argv[4:7])
data_rc, bench_rc, arm_rc, cache_before, cache_after = map(int, sys.argv[7:12])

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

summary = {"bench": "gpu_check", "quick": quick, **(read_json(work / "device.json") or {})}
summary["data"] = read_json(work / "scenes.json") or {"error": f"make_scenes exit {data_rc}"}
bench = read_json(work / "throughput.json")
if bench and bench.get("results"):
    r = bench["results"][0]
    summary["throughput"] = {
        "model": r["model"], "batch_size": bench["batch_size"], "precision": bench["precision"], "augment": bench["augment"],
        "img_per_s": {k: round(v, 1) for k, v in r["img_per_s"].items()}, "imgcls_over_ready": round(r["imgcls_over_ready"], 3),
        "chunks": {k: [round(x, 1) for x in v] for k, v in r["chunks"].items()}, "steps_per_chunk": bench["steps"],
        "train_images": bench["train_images"], "target_img_per_s": 10000, "target_met": r["img_per_s"]["imgcls"] >= 10000,
    }
    syncs = r.get("sync_check") or {}
    summary["sync_check"] = syncs
    summary["sync_waits"] = sum(n for p in syncs.get("presets", {}).values() for n in p["syncs"].values())
    summary["presets_failed"] = [k for k, p in syncs.get("presets", {}).items() if not p["ok"]]
else:
    summary["throughput"] = {"error": f"train_throughput exit {bench_rc}" + (" (time limit)" if bench_rc == 124 else "")}
arm = {"wall_s": round(end - start, 1), "exit": arm_rc, "target_wall_s": 60, "cache": "warm (built by the throughput phase)" if cache_before and cache_after == cache_before
       else f"decoded again ({cache_before} -> {cache_after} files in the cache)"}
metrics = read_json(work / "seed-arm" / "eval" / "metrics.json")
if metrics:
    arm["test_acc"] = metrics.get("accuracy")
try:
    with open(work / "seed-arm" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    arm["epochs"] = len(rows)
    arm["train_img_per_s_median"] = round(statistics.median(float(r["img_per_s"]) for r in rows), 1)
    arm["epoch_s_median"] = round(statistics.median(float(r["epoch_s"]) for r in rows), 2)
    arm["best_val_acc"] = max(float(r["val_acc"]) for r in rows)
except (OSError, ValueError, KeyError, statistics.StatisticsError):
    pass
arm["target_met"] = arm_rc == 0 and arm["wall_s"] < 60
summary["seed_arm"] = arm
summary["total_s"] = round(time.time() - t0, 1)
summary["ok"] = data_rc == 0 and bench_rc == 0 and arm_rc == 0 and not summary.get("presets_failed")
dest.write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
print(f"gpu_check: {'ok' if summary['ok'] else 'FAILED'}; {summary.get('sync_waits', '?')} waits for the device in the sync check; "
      f"summary in {dest}")
sys.exit(0 if summary["ok"] else 1)
EOF
