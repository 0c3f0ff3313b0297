#!/usr/bin/env bash
# The GPU checks in one prepared run, each step's figures written before the next step starts:
#   1. `verydeep bench --device cuda --json` at full size (VGG-16, 224, batch 64, on its generated JPEGs:
#      Imagenette's 3,000 training images are fewer than its rounds need): the roofline, torchvision's
#      VGG in fp32 and at its best (autocast, channels_last, fused update, eager and compiled, the faster kept),
#      our step, inference and end to end; its JSON into docs/benchmarks/bench-<date>-<gpu>.json and $OUT;
#   2. end-to-end `verydeep train` of D at 224 on Imagenette's JPEGs, --decode gpu then --decode cpu, STEPS
#      steps each (Imagenette's one epoch at batch 128), the first 8 left out: images a second and MFU
#      (benchmarks/train_mfu.py: the steady state of the run's step records over the GPU's dense bf16 peak),
#      one JSON line each into docs/benchmarks/train-<date>-<gpu>.jsonl and $OUT;
#   3. the CUDA tests (nvJPEG decoding, evaluation and training on the GPU).
# Usage on a CUDA machine, from the repository's root, with the project's dependencies importable (simplejpeg
# is the one a stock PyTorch image lacks: carry its wheel):
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [IMAGENETTE]
# IMAGENETTE: Imagenette's root (train/ and val/ of class folders) or a .tgz of it, default
# ../shared/data/imagenette; to carry it to a machine without it: tar czf .devdata/imagenette.tgz -C
# ../shared/data imagenette (48 MB). Environment: OUT (default /tmp/gpu-checks), PYTHON (python3), BENCH_ARGS
# (added to the bench's command line), TRAIN_ARGS (added to both trainings', e.g. --compile), STEPS (training
# steps a run, default 23: Imagenette's one epoch at batch 128, no validation or checkpoint after it), WORKERS
# (loader processes, default the cores less two), PEAK_TFLOPS (the GPU's dense bf16 peak where train_mfu.py
# does not know the GPU), BENCH_TIMEOUT, TRAIN_TIMEOUT, TEST_TIMEOUT (each step's limit in seconds, defaults 420,
# 300, 300: lower them to fit a device lease).
# Each step has its own time limit, so one slow step cannot take the others' results with it.
set -u
data=${1:-../shared/data/imagenette}
out=${OUT:-/tmp/gpu-checks}
python=${PYTHON:-python3}
steps=${STEPS:-23}
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
mkdir -p "$out" docs/benchmarks
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $python -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__)"
} > "$out/machine.txt" 2>&1
day=$(date -u +%F)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
stem="docs/benchmarks/bench-$day-${gpu:-gpu}"

if [ "${data%.tgz}" != "$data" ]; then
  mkdir -p /tmp/gpu-checks-data && tar xzf "$data" -C /tmp/gpu-checks-data
  data=$(dirname "$(find /tmp/gpu-checks-data -maxdepth 3 -type d -name train | head -1)")
fi

# 1. the bench, full size, both torchvision contenders
timeout "${BENCH_TIMEOUT:-420}" $python -m verydeep.cli bench --device cuda --json ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1
echo "bench exit $?" >> "$out/bench.txt"
if grep '^{' "$out/bench.txt" | tail -1 > "$stem.json" && [ -s "$stem.json" ]; then
  cp "$stem.json" "$out/"
else
  rm -f "$stem.json"
fi

# 2. end to end on JPEGs, decoded on the GPU and on the CPU
train_out="docs/benchmarks/train-$day-${gpu:-gpu}.jsonl"
for decode in gpu cpu; do
  run=/tmp/gpu-checks-e2e-$decode
  timeout "${TRAIN_TIMEOUT:-300}" $python -m verydeep.cli train --data "$data" --out "$run" --overwrite --config D --crop 224 \
    --scale 256 --batch-size 128 --epochs 1 --workers "$workers" --device cuda --decode "$decode" \
    --no-progress --stop-after-steps "$steps" ${TRAIN_ARGS:-} > "$out/train-$decode.txt" 2>&1
  echo "train --decode $decode exit $?" >> "$out/train-$decode.txt"
  $python benchmarks/train_mfu.py "$run" --skip 8 --json ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"} \
    >> "$train_out" 2>> "$out/train-$decode.txt"
done
[ -s "$train_out" ] && cp "$train_out" "$out/"

# 3. the CUDA tests
timeout "${TEST_TIMEOUT:-300}" $python -m pytest -q -p no:cacheprovider tests/unit/data/test_data_gpu.py > "$out/cuda_tests.txt" 2>&1
echo "test_data_gpu exit $?" >> "$out/cuda_tests.txt"
timeout "${TEST_TIMEOUT:-300}" $python -m pytest -q -p no:cacheprovider tests/integration/eval/test_evaluate.py tests/integration/train/test_train.py -k cuda \
  >> "$out/cuda_tests.txt" 2>&1
echo "cuda tests exit $?" >> "$out/cuda_tests.txt"
