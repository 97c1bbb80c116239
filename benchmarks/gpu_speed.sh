#!/bin/bash
# Issue 24's device call (one H200, about five minutes): the code before (.base, a copy of main before the
# change) and after, at batch 2, 32 and 8, the CUDA-graph variant, and the reference path's first 10 losses
# to check every fast path against. The table comes last.
#   here, once:  mkdir .base && git archive <base commit> -- '*.py' benchmarks/qwen2.5-tokenizer.json.gz | tar -x -C .base
#   run tool:    carry [".whl", ".base"]; command:
#                BUDGET=285 bash benchmarks/gpu_speed.sh 2>&1 | tee $OUT/log
# Each process (base, then new) runs its plan in turn (benchmarks/speed_runs.py) and skips a run its estimate
# says would end past the process's deadline; the new code's deadline leaves ~12 s for the table.
# Writes $OUT/results/<run>.json (bench.py's), $OUT/results/driver_<plan>.json, $OUT/speed_summary.json.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/speed_out}; RES=$OUT/results; mkdir -p "$RES"
T0=$(date +%s)
BUDGET=${BUDGET:-285}  # seconds for the whole script
PYTHON=${PYTHON:-python3}
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
$PYTHON -c "import sys, torch, transformers, datasets; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)" || exit 1
# The CPU dry run (tiny shape, short conversations, two runs a plan, ~15 min on 2 busy cores):
#   PYTHON=.venv/bin/python SHAPE_ARGS="--shape tiny --n 16" WORKLOAD=/tmp/interlat_bench/tiny_n16 \
#   BENCH_ARGS="--shape tiny --n_samples 16 --min_words 60 --max_words 200" BASE_PLAN=cpu_base NEW_PLAN=cpu \
#   BUDGET=1800 BASE_S=700 SKIP_WHEELS=1 OUT=/tmp/speed_cpu bash benchmarks/gpu_speed.sh
SHAPE_ARGS=${SHAPE_ARGS:---shape qwen05 --n 128}
$PYTHON benchmarks/workload.py --out ${WORKLOAD:-/tmp/interlat_bench/qwen05_n128} $SHAPE_ARGS 2>&1 | grep -v "it/s" \
  || exit 1
echo "[gpu_speed] workload ready at +$(( $(date +%s) - T0 )) s"
run_plan() {  # root plan deadline(epoch s) [more speed_runs.py flags]
  local root=$1 plan=$2 deadline=$3; shift 3
  local limit=$(( deadline - $(date +%s) + 15 ))  # a hung run is killed 15 s past the deadline
  if [ "$limit" -le 20 ]; then echo "[gpu_speed] no time left for plan $plan"; return; fi
  timeout -k 5 "$limit" $PYTHON benchmarks/speed_runs.py --root "$root" --plan "$plan" --results_dir "$RES" \
    --deadline "$deadline" --bench_args="${BENCH_ARGS:-}" "$@" 2>&1 | grep --line-buffered -v "it/s\]\|examples/s\]"
  echo "[gpu_speed] plan $plan ($root) ended rc=$? at +$(( $(date +%s) - T0 )) s"
}
END=$(( T0 + BUDGET ))
if [ -d .base ]; then
  # The code before gets BASE_S seconds (its three runs: ~90 s on an H200), at most until 150 s before the end.
  BASE_END=$(( $(date +%s) + ${BASE_S:-100} ))
  run_plan .base ${BASE_PLAN:-base} $(( END - 150 < BASE_END ? END - 150 : BASE_END ))
else
  echo "[gpu_speed] no .base folder: the code before is not measured"
fi
run_plan . ${NEW_PLAN:-new} $(( END - 12 ))
$PYTHON benchmarks/speed_report.py "$RES" --out "$OUT/speed_summary.json"
echo "[gpu_speed] done at +$(( $(date +%s) - T0 )) s"
