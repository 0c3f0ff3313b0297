#!/usr/bin/env bash
# The GPU checks in one prepared run (verydeep bench, eager then compiled, CUDA tests, model benchmark,
# CIFAR-10 reproduction).
# The bench runs first and its JSON is written into the repository (docs/benchmarks/) and to $OUT
# before anything longer runs; BENCH_ARGS adds to its command line (say --data DIR).
# Usage on a CUDA machine, from the repo root, with the project importable (PYTHONPATH=src):
#   OUT=/tmp/out REPRO_ARGS="--width 0.5 --budget 40 --seeds 3" bash benchmarks/gpu_checks.sh .devdata/cifar10.tgz
# Each step has its own time limit, so one slow step cannot take the others' results with it.
set -u
data_tgz=${1:?give a .tgz of a dataset root holding cifar10/train and cifar10/test}
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out" /tmp/data
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  $python -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__)"
} > "$out/machine.txt" 2>&1

day=$(date -u +%F)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
timeout 300 $python -m verydeep.cli bench --device cuda --json ${BENCH_ARGS:-} > "$out/bench.txt" 2>&1
echo "bench exit $?" >> "$out/bench.txt"
mkdir -p docs/benchmarks
if grep '^{' "$out/bench.txt" | tail -1 > "docs/benchmarks/bench-$day-${gpu:-gpu}.json" \
    && [ -s "docs/benchmarks/bench-$day-${gpu:-gpu}.json" ]; then
  cp "docs/benchmarks/bench-$day-${gpu:-gpu}.json" "$out/"
else
  rm -f "docs/benchmarks/bench-$day-${gpu:-gpu}.json"
fi

timeout 300 $python -m verydeep.cli bench --device cuda --compile --json ${BENCH_ARGS:-} > "$out/bench-compile.txt" 2>&1
echo "bench --compile exit $?" >> "$out/bench-compile.txt"
if grep '^{' "$out/bench-compile.txt" | tail -1 > "docs/benchmarks/bench-$day-${gpu:-gpu}-compile.json" \
    && [ -s "docs/benchmarks/bench-$day-${gpu:-gpu}-compile.json" ]; then
  cp "docs/benchmarks/bench-$day-${gpu:-gpu}-compile.json" "$out/"
else
  rm -f "docs/benchmarks/bench-$day-${gpu:-gpu}-compile.json"
fi

tar xzf "$data_tgz" -C /tmp/data

timeout 120 $python -m pytest -q -p no:cacheprovider tests/test_data_gpu.py \
  "tests/test_evaluate.py::test_cuda_posteriors_match_cpu" \
  "tests/test_train.py::test_cuda_bf16_channels_last_with_workers" > "$out/cuda_tests.txt" 2>&1
echo "cuda tests exit $?" >> "$out/cuda_tests.txt"

timeout 60 $python benchmarks/model_speed.py --config D --batch 64 --size 224 --json > "$out/model_speed.txt" 2>&1
echo "model_speed exit $?" >> "$out/model_speed.txt"

start=$(date +%s)
timeout "${REPRO_SECONDS:-400}" $python -m verydeep.cli reproduce --data /tmp/data/cifar10 --preset cifar10 \
  --out /tmp/repro --no-progress --workers 12 ${REPRO_ARGS:-} > "$out/reproduce.txt" 2>&1
echo "reproduce exit $? after $(( $(date +%s) - start )) s" >> "$out/reproduce.txt"
tar czf "$out/repro.tgz" --exclude=checkpoints --exclude='*.safetensors' -C /tmp repro
