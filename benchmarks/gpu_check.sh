#!/usr/bin/env bash
# One command that checks the whole CUDA path and measures it, writing every figure to one folder:
#   bash benchmarks/gpu_check.sh [OUT_DIR]              # on a GPU machine: at most 8 minutes on one H100/H200
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-tiny     # the same steps on the CPU at tiny size (proves the script)
# Steps: synthetic CIFAR in the official layout (the GPU machine needs no internet and no data), the CUDA
# tests (tests/test_cuda.py), kd.py's step against the DataLoader pipeline (fp32 and --amp), every method
# script against kd.py (--amp), K concurrent kd.py runs on one device, kd.py as a 1-rank torchrun job (DDP),
# then OUT_DIR/summary.{json,md}.
# A step that fails is recorded in the summary and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
MODE=${2:-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

if [ "$MODE" = "--cpu-tiny" ]; then
  DEVICE=cpu; export KD_TEST_DEVICE=cpu
  TRAIN=1024; TEST=256; SUBSET=512; STEPS=4; ROUNDS=1; JOBS="1 2"
  TEST_ARGS=(-k "fp32 or checkpoint or copied or (deterministic and kd) or (resumed and kd)")
else
  DEVICE=cuda
  TRAIN=50000; TEST=10000; SUBSET=10000; STEPS=40; ROUNDS=2; JOBS="1 4 8"
  TEST_ARGS=()
fi
DATA="$OUT/data"
step() {  # name, command...: run it, keep its log, record its exit status and time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "{\"step\": \"$name\", \"exit\": $status, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
  tail -n 3 "$OUT/$name.log"
}

rm -f "$OUT/steps.jsonl"
[ -d "$DATA/cifar-100-python" ] || step data python tools/synthetic_cifar.py "$DATA" --train $TRAIN --test $TEST
step cuda_tests python -m pytest -q -rs tests/test_cuda.py "${TEST_ARGS[@]}" --junitxml "$OUT/cuda_tests.xml"
step speed_kd python benchmarks/speed_kd.py --dataset cifar100 --data-dir "$DATA" --device $DEVICE \
  --steps $STEPS --rounds $ROUNDS --workers 0 4 --json "$OUT/speed_kd.json"
step speed_methods python benchmarks/speed_methods.py --dataset cifar100 --data-dir "$DATA" --device $DEVICE --amp \
  --methods kd sskd hssakd pskd lsskd css --train-subset $SUBSET --rounds 1 --json "$OUT/speed_methods.json"
step concurrent_kd python benchmarks/concurrent_kd.py --dataset cifar100 --data-dir "$DATA" --device $DEVICE --amp \
  --train-subset $SUBSET --jobs $JOBS --json "$OUT/concurrent_kd.json"
# DDP's path (nccl on CUDA, gloo with --cpu-tiny) as one torchrun rank: CE teacher on rank 0 alone, then KD
step torchrun_kd python -m torch.distributed.run --standalone --nproc_per_node=1 kd.py --dataset cifar100 \
  --data-dir "$DATA" --device $DEVICE --amp --teacher resnet8 --student resnet8 --train-subset $SUBSET --epochs 1 \
  --ce-teacher-epochs 1 --output-dir "$OUT/torchrun" --checkpoint-dir "$OUT/torchrun/checkpoints"
python benchmarks/gpu_check_summary.py "$OUT"
