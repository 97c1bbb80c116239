#!/bin/bash
# The benchmark's device call: install carried wheels, build the workload, run the current benchmark.
#   run tool, carry [.whl] (and .whl_pa, a pyarrow>=24 wheel, only where the image has an older one):
#   bash benchmarks/gpu_run.sh 2>&1 | tee $OUT/log
# The current code's defaults at batch 48 (BENCHMARKS.md's summary) and 2, and the reference path (padded rows,
# autograd loss, no compiled layers) at batch 2 on the same machine. The plans of earlier device calls
# (calls 1-22) are in this file's git history; their results stay in benchmarks/results and BENCHMARKS.md.
# Writes $OUT/all_results.json, $OUT/<name>_profile.txt, $OUT/<name>_trace.json.gz.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/bench_out}; RES=/tmp/bench_results; mkdir -p "$OUT" "$RES"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
PA=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
if [ "$PA" -lt 24 ] && ls .whl_pa/*.whl >/dev/null 2>&1; then
  echo "pyarrow major $PA < 24: installing the carried one"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_pa/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
python3 -c "import sys, torch, transformers, datasets, pyarrow, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'accelerate', accelerate.__version__)" || exit 1
python3 benchmarks/workload.py --out /tmp/interlat_bench/qwen05_n128 --shape qwen05 --n 128 2>&1 | grep -v "it/s" || exit 1
echo "workload built at +$(( $(date +%s) - T0 )) s"
BUDGET=${BUDGET:-545}  # seconds for the whole script: a run that might not end in time is skipped
bench() {
  local el=$(( $(date +%s) - T0 ))
  if [ $(( el + ${LIMIT:-120} )) -gt "$BUDGET" ]; then echo "[gpu_run] skipped (+$el s): $*"; return; fi
  timeout "${LIMIT:-120}" python3 benchmarks/bench.py --results_dir "$RES" --profile_dir "$OUT" "$@" 2>&1 | grep -v "it/s\]\|examples/s\]"
  echo "[gpu_run] $* done rc=$? at +$(( $(date +%s) - T0 )) s"
}
LIMIT=100 bench --batch_size 48 --steps 22 --warmup 4 --out_name cur_b48
LIMIT=60 bench --batch_size 2 --steps 25 --out_name cur_b2
LIMIT=90 bench --batch_size 2 --steps 25 --out_name cur_b2_ref --fused_loss false --loss_kernel eager \
  --packed_sequences false --compile_layers false
python3 benchmarks/summarize.py "$RES" --combined "$OUT/all_results.json"
ls -la "$OUT"
