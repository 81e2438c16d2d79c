#!/usr/bin/env bash
# One command for a lent GPU machine: build pdml._C for this GPU, run the cuda-marked
# tests and the benchmarks, and write everything into one results folder:
#   RESULTS/info.txt         python -m pdml.info (what was built, which backend "auto" picks)
#   RESULTS/cuda-tests.log   pytest -m cuda tests/
#   RESULTS/benchmark.json   pytest-benchmark's raw records
#   RESULTS/bench.log        the benchmark run, with pdml's summary table at its end
#   RESULTS/summary.{md,json}, RESULTS/speedups.png
# Usage: bash benchmarks/run_gpu.sh [RESULTS]   (default: $OUT if set, else
#        benchmarks/results/<date>-<gpu>); commit the folder under benchmarks/results/.
# Python packages the machine lacks (pydicom, ...) may be carried as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/pdml-site .whl/*.whl && export PYTHONPATH=/tmp/pdml-site${PYTHONPATH:+:$PYTHONPATH}
fi
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo gpu)
RESULTS=${1:-${OUT:-benchmarks/results/$(date -u +%Y%m%d)-$GPU}}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
status=0
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1 || { echo "build failed"; tail -30 "$RESULTS/build.log"; exit 1; }
$PY -m pdml.info > "$RESULTS/info.txt" 2>&1 || status=1
cat "$RESULTS/info.txt"
$PY -m pytest -m cuda tests/ -q -p no:cacheprovider 2>&1 | tee "$RESULTS/cuda-tests.log" | tail -25 || status=1
PDML_BENCH_OUT="$RESULTS" $PY -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-json="$RESULTS/benchmark.json" 2>&1 \
  | tee "$RESULTS/bench.log" | sed -n '/pdml benchmark summary/,$p' || status=1
exit $status
