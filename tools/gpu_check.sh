#!/usr/bin/env bash
# The GPU check, as one command on a machine with one CUDA GPU (`make gpu-check`):
#   1. the test suite's CUDA-marked tests (pytest -m cuda);
#   2. a short DeepKD-DKD detector training on the embedded shapes data on CUDA, fp32 and with
#      SOLVER.AMP (fp16, one gradient scaler over the three components) and bf16;
#   3. the paper-pair benchmark (bench/bench_det_pairs.py) with the sequential, streaming and
#      batched gradient strategies;
#   4. the optimizer step vs torch.optim.SGD(fused=True) on ResNet-50 parameters;
#   5. with two GPUs: NCCL, the two distributed modes equal, a two-GPU detector training.
# Every step prints JSON lines (stdout); a failing step stops the check with its exit status.
# Under 8 minutes on one modern GPU. Without a CUDA GPU it prints one "skipped" line and exits 0
# (GPU_CHECK_STRICT=1 makes that an error).
#
#   tools/gpu_check.sh [--quick]        # --quick: one pair, fewer steps (about 2 minutes)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT="$(mktemp -d -t deepkd_gpu_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT

line() {  # line CASE STATUS SECONDS [DETAIL]
  printf '{"case": "%s", "status": "%s", "seconds": %s, "detail": "%s"}\n' "$1" "$2" "$3" "${4:-}"
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  line gpu_check skipped 0 "no CUDA GPU visible to torch ($PY); nothing was run"
  [ "${GPU_CHECK_STRICT:-0}" = "1" ] && exit 1
  exit 0
fi
GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
line gpu_check started 0 "$GPU; torch $("$PY" -c 'import torch; print(torch.__version__)')"

run() {  # run CASE LIMIT_SECONDS COMMAND...: stdout passes through, the status line follows
  local name="$1" limit="$2"
  shift 2
  local start rc=0
  start=$(date +%s)
  if [ "${QUIET_STDOUT:-0}" = 1 ]; then timeout "$limit" "$@" 1>&2 || rc=$?; else timeout "$limit" "$@" || rc=$?; fi
  local spent=$(( $(date +%s) - start ))
  if [ "$rc" -ne 0 ]; then
    line "$name" "failed (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))" "$spent"
    exit "$rc"
  fi
  line "$name" passed "$spent"
}

# 1. CUDA-marked tests (their log on stderr, so that stdout stays JSON lines)
QUIET_STDOUT=1 run pytest_cuda 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

# 2. short DeepKD-DKD training on the embedded shapes data: fp32, fp16 (scaler), bf16
ITERS=$([ "$QUICK" = 1 ] && echo 10 || echo 30)
for amp in off fp16 bf16; do
  opts=(MODEL.DEVICE cuda OUTPUT_DIR "$OUT/train_$amp" DATASETS.SHAPES.ROOT "$OUT/shapes"
        TEACHER.MODEL.WEIGHTS "" TEACHER.ALLOW_RANDOM_INIT True SOLVER.MAX_ITER "$ITERS"
        "SOLVER.STEPS" "($((ITERS - 5)),)" SOLVER.CHECKPOINT_PERIOD "$ITERS" TEST.EVAL_PERIOD 0 DATASETS.TEST "()")
  [ "$amp" != off ] && opts+=(SOLVER.AMP.ENABLED True SOLVER.AMP.DTYPE "$amp" TEACHER.AMP_DTYPE "$amp")
  QUIET_STDOUT=1 run "train_deepkd_dkd_cuda_amp_$amp" 150 "$PY" train_net.py \
    --config-file configs/DEEPKD/demo/student-deepkd-dkd.yaml "${opts[@]}"
  "$PY" - "$OUT/train_$amp/metrics.json" "$amp" <<'EOF'
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
last = rows[-1]
keys = ("loss_tckd", "loss_nckd", "loss_cls", "total_loss")
bad = [k for k in keys if not math.isfinite(last.get(k, float("nan")))]
print(json.dumps({"case": f"train_deepkd_dkd_cuda_amp_{sys.argv[2]}_losses", "iteration": last["iteration"],
                  **{k: last.get(k) for k in keys}, "status": "failed" if bad else "passed"}))
sys.exit(1 if bad else 0)
EOF
done

# 3. paper pairs, three gradient strategies
if [ "$QUICK" = 1 ]; then
  pairs=(--pairs R18-R101 --repeats 3)
else
  pairs=(--pairs R18-R101,R50-R101,MV2-R50 --repeats 5)
fi
run bench_det_pairs 300 "$PY" bench/bench_det_pairs.py --device cuda --strategies sequential,streaming,batched \
  --warmup 2 "${pairs[@]}"

# 4. optimizer step vs torch SGD (fused) on ResNet-50 parameters
run bench_optimizer_cuda 90 "$PY" bench/bench_core.py --only optim --device cuda --nets resnet50

# 5. two GPUs (runs when torch sees at least two): NCCL, DeepKD's two distributed modes equal
#    (tools/dist_check.py: each rank's student and teacher on cuda:LOCAL_RANK, equal weights on
#    every rank, update == components in float64), then a two-GPU detector training whose ranks
#    end with identical parameters (the engine's digest check).
NGPU="$("$PY" -c "import torch; print(torch.cuda.device_count())")"
if [ "$NGPU" -ge 2 ]; then
  run dist_check_nccl_2gpu 180 "$PY" -m torch.distributed.run --nproc_per_node 2 tools/dist_check.py --device cuda
  QUIET_STDOUT=1 run train_deepkd_dkd_2gpu_nccl 240 "$PY" -m torch.distributed.run --nproc_per_node 2 train_net.py \
    --config-file configs/DEEPKD/demo/student-deepkd-dkd.yaml MODEL.DEVICE cuda OUTPUT_DIR "$OUT/train_2gpu" \
    DATASETS.SHAPES.ROOT "$OUT/shapes" TEACHER.MODEL.WEIGHTS "" TEACHER.ALLOW_RANDOM_INIT True SOLVER.MAX_ITER 20 \
    "SOLVER.STEPS" "(15,)" SOLVER.CHECKPOINT_PERIOD 20 TEST.EVAL_PERIOD 0 "DATASETS.TEST" "()"
  grep -q "parameters identical on all 2 processes" "$OUT/train_2gpu/log.txt" \
    && line train_deepkd_dkd_2gpu_digest passed 0 \
    || { line train_deepkd_dkd_2gpu_digest failed 0 "no 'parameters identical' line in log.txt"; exit 1; }
else
  line dist_check_nccl_2gpu skipped 0 "$NGPU GPU(s): the two-GPU NCCL check needs two"
fi
