#!/usr/bin/env bash
# The GPU checks in one prepared run, each step's figures written before the next step starts:
#   0. benchmarks/gpu_ceiling.py: every kernel of a VGG-16 training step timed alone (the ceiling of any MFU) and
#      a whole step eager and compiled, with a profile of its kernels, into docs/benchmarks/ceiling-<date>T<time>-<gpu>.json;
#   1. `verydeep bench --device cuda --json` at full size (VGG-16, 224, batch 64, on its generated JPEGs:
#      Imagenette's 3,000 training images are fewer than its rounds need): the roofline, torchvision's
#      VGG in fp32 and at its best (autocast, channels_last, fused update, eager and compiled, the faster kept),
#      our step, inference and end to end; its JSON into docs/benchmarks/bench-<date>T<time>-<gpu>.json and $OUT;
#   1b. benchmarks/profile_step.py --device cuda --compile: our training step and torchvision's at its best (both
#      compiled), GPU kernel time by kind, side by side, into docs/benchmarks/profile-<date>T<time>-<gpu>.json;
#   2. end-to-end `verydeep train` of D at 224 on Imagenette's JPEGs, each of VARIANTS (default "gpu+compile
#      cpu+compile gpu cpu": --decode gpu and --decode cpu, compiled and eager), STEPS
#      steps each (Imagenette's one epoch at batch 128), the first 8 left out: images a second and MFU
#      (benchmarks/train_mfu.py: the steady state of the run's step records over the GPU's dense bf16 peak),
#      one JSON line each into docs/benchmarks/train-<date>T<time>-<gpu>.jsonl and $OUT;
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
# 300, 300; 0 leaves the step out), PROFILE_TIMEOUT (default 180; 0 leaves it out), CEILING_TIMEOUT (default 240; 0 leaves it out), CEILING_ARGS (default
# "--batch 128 256 --compile").
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
stamp=$(date -u +%FT%H%M)  # two runs a day keep their own records
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
stem="docs/benchmarks/bench-$stamp-${gpu:-gpu}"

if [ "${data%.tgz}" != "$data" ]; then
  mkdir -p /tmp/gpu-checks-data && tar xzf "$data" -C /tmp/gpu-checks-data
  data=$(dirname "$(find /tmp/gpu-checks-data -maxdepth 3 -type d -name train | head -1)")
fi

# 0. what the kernels allow
ceiling="docs/benchmarks/ceiling-$stamp-${gpu:-gpu}.json"
if [ "${CEILING_TIMEOUT:-240}" != 0 ]; then
  timeout "${CEILING_TIMEOUT:-240}" $python benchmarks/gpu_ceiling.py ${CEILING_ARGS:---batch 128 256 --compile} \
    --json "$ceiling" > "$out/ceiling.txt" 2>&1
  echo "ceiling exit $?" >> "$out/ceiling.txt"
  [ -s "$ceiling" ] && cp "$ceiling" "$out/"
fi

# 1. the bench, full size, both torchvision contenders
if [ "${BENCH_TIMEOUT:-420}" != 0 ]; then
  timeout "${BENCH_TIMEOUT:-420}" $python -m verydeep.cli bench --device cuda --json ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1
  echo "bench exit $?" >> "$out/bench.txt"
  if grep '^{' "$out/bench.txt" | tail -1 > "$stem.json" && [ -s "$stem.json" ]; then
    cp "$stem.json" "$out/"
  else
    rm -f "$stem.json"
  fi
fi

# 1b. where our step and the peer's go, kernel kind by kind
profile="docs/benchmarks/profile-$stamp-${gpu:-gpu}.json"
if [ "${PROFILE_TIMEOUT:-180}" != 0 ]; then
  timeout "${PROFILE_TIMEOUT:-180}" $python benchmarks/profile_step.py --device cuda --width 1 --size 224 --batch 64 \
    --compile --json > "$out/profile.txt" 2>&1
  echo "profile exit $?" >> "$out/profile.txt"
  grep '^{' "$out/profile.txt" | tail -1 > "$profile" && [ -s "$profile" ] && cp "$profile" "$out/" || rm -f "$profile"
fi

# 2. end to end on JPEGs, decoded on the GPU and on the CPU
train_out="docs/benchmarks/train-$stamp-${gpu:-gpu}.jsonl"
for variant in ${VARIANTS:-gpu+compile cpu+compile gpu cpu}; do
  decode=${variant%%+*}
  run=/tmp/gpu-checks-e2e-$variant
  extra=""; [ "$variant" != "$decode" ] && extra="--${variant#*+}"
  [ "${TRAIN_TIMEOUT:-300}" = 0 ] && break
  timeout "${TRAIN_TIMEOUT:-300}" $python -m verydeep.cli train --data "$data" --out "$run" --overwrite --config D --crop 224 \
    --scale 256 --batch-size 128 --epochs 1 --workers "$workers" --device cuda --decode "$decode" $extra \
    --no-progress --stop-after-steps "$steps" ${TRAIN_ARGS:-} > "$out/train-$variant.txt" 2>&1
  echo "train $variant exit $?" >> "$out/train-$variant.txt"
  $python benchmarks/train_mfu.py "$run" --skip 8 --json ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"} \
    >> "$train_out" 2>> "$out/train-$variant.txt"
  cp "$train_out" "$out/"
done

# 3. the CUDA tests: every test marked gpu (nvJPEG decoding, decoding ahead, evaluation and training on the GPU)
[ "${TEST_TIMEOUT:-300}" = 0 ] && exit 0
timeout "${TEST_TIMEOUT:-300}" $python -m pytest -q -p no:cacheprovider -m gpu tests > "$out/cuda_tests.txt" 2>&1
echo "cuda tests exit $?" >> "$out/cuda_tests.txt"
