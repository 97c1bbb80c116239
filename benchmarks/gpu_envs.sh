#!/bin/bash
# Issue 25 in one device call (one H200, <= 540 s wall): the ALFWorld-shaped household games (envs/household.py),
# two actor seeds trained concurrently on the one GPU, each played on the held-out seen and unseen games under
# true latents / shuffled / no message / plan text, plus the expert and the blind explorer (CPU, meanwhile).
#
#   run tool, carry [.whl_tw] (TextWorld's wheels: `bash benchmarks/closed_loop_demo.sh wheels`, ~6 MB):
#   bash benchmarks/gpu_envs.sh 2>&1 | tee $OUT/log.txt
#
# Made for a warm machine where earlier calls installed the wheels in /tmp/site and converted SmolLM2 into
# $INTERLAT_CACHE (/tmp/interlat_cache). On a fresh one, carry .whl (datasets, gguf) and .gg (the GGUF's second
# part) after a call that left the first in /tmp/part_aa (or carry .gg_a: it is copied there), exactly as
# benchmarks/closed_loop_demo.sh's setup_device expects. Games are generated there on all cores (~0.04 s a game
# a core); with $DATA/eval_unseen_raw.jsonl already present (carried) they are kept.
#
# Internal clock ($BUDGET s from the start): training is cut with Ctrl-C (a checkpoint is saved) so that $PLAY_S
# seconds remain for play; each split's play is stopped before the end, so the summary and the tarball of what
# finished are always written under $OUT: summary.json, summary.md, summary.png, envs_results.tgz (play
# reports with every transcript, training logs, loss curves), records_eval.tgz (the held-out records).
# CPU dry run at toy size (tiny random model, a few games, a few steps):
#   DRY=1 bash benchmarks/gpu_envs.sh
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -z "${DRY:-}" ]; then  # where earlier calls installed wheels and converted the model
  export INTERLAT_CACHE=${INTERLAT_CACHE:-/tmp/interlat_cache} PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/envs}; DATA=${DATA:-$W/data}
BUDGET=${BUDGET:-530}; PLAY_S=${PLAY_S:-170}
N_TRAIN=${N_TRAIN:-2000}; N_EVAL=${N_EVAL:-120}; SEED=${SEED:-0}; SEEDS=${SEEDS:-0 1}
STEPS=${STEPS:-500}; BATCH=${BATCH:-32}; WARM=${WARM:-300}; LR=${LR:-1e-4}; MAX_NEW=${MAX_NEW:-16}
PLAY_BATCH=${PLAY_BATCH:-128}; WORKERS=${WORKERS:-$(nproc)}; LATENT_BATCH=${LATENT_BATCH:-64}
PY=${PY:-python3}
if [ -n "${DRY:-}" ]; then  # the CPU dry run: every stage at toy size
  PY=${PY_DRY:-.venv/bin/python}; OUT=${OUT_DRY:-checkpoints/gpu_envs_dry/out}; W=checkpoints/gpu_envs_dry; DATA=$W/data
  N_TRAIN=12; N_EVAL=6; STEPS=3; BATCH=2; WARM=2; MAX_NEW=6; PLAY_S=300; BUDGET=${BUDGET_DRY:-1300}; WORKERS=2
  PLAY_FLAGS=${PLAY_FLAGS:---max_games 2}
  MODEL=$W/tiny; [ -f "$MODEL/config.json" ] || $PY -c "import sys; from common import models; models.save_random_llama(sys.argv[1], 64, 2)" "$MODEL"
fi
MODEL=${MODEL:-HuggingFaceTB/SmolLM2-135M-Instruct}
mkdir -p "$OUT" "$W"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[gpu_envs +$(( $(date +%s) - T0 )) s] $*"; }
source benchmarks/closed_loop_demo.sh  # setup_device, stage (train), quiet, latest_model

# --- setup: wheels and model (no-ops on a warm machine), TextWorld ---
[ -f .gg_a/part_aa ] && [ ! -f /tmp/part_aa ] && cp .gg_a/part_aa /tmp/part_aa
[ -n "${DRY:-}" ] || setup_device
$PY -c "import textworld" || { echo "error: textworld missing (carry .whl_tw)"; exit 2; }

# --- games: train (seen vocabulary), eval_seen, eval_unseen; the expert's episodes are the training records ---
if [ ! -f "$DATA/eval_unseen_raw.jsonl" ]; then
  quiet $PY -m envs.make_household --out_dir "$DATA" --n_train "$N_TRAIN" --n_eval "$N_EVAL" --seed "$SEED" \
    --workers "$WORKERS" || exit 1
fi
log "games ready: $(wc -l < "$DATA/train_raw.jsonl") train, $N_EVAL eval per split"

# --- the sender's latents of every plan (teacher-forced), the eval splits beside the training set ---
latents() { quiet $PY -m sender.collect --model_name_or_path "$MODEL" --mode teacher_forced \
  --batch_size "$LATENT_BATCH" --input_file "$DATA/$1_raw.jsonl" --output_file "$DATA/$1.jsonl"; }
( [ -f "$DATA/train.jsonl" ] || latents train ) > "$W/latents_train.log" 2>&1 &
( for s in eval_seen eval_unseen; do [ -f "$DATA/$s.jsonl" ] || latents $s || exit 1; done ) > "$W/latents_eval.log" 2>&1
wait || true
[ -f "$DATA/train.jsonl" ] && [ -f "$DATA/eval_unseen.jsonl" ] || { tail -20 "$W"/latents_*.log; exit 1; }
ln -sf eval_seen.jsonl "$DATA/eval.jsonl"  # the training run's evaluation set
log "latents done"

# --- the expert (the ceiling, and a check of the games) and the blind explorer, on the CPU meanwhile ---
mkdir -p "$W/baselines"
( for split in eval_seen eval_unseen; do for policy in expert explorer; do
    quiet $PY -m envs.play --records "$DATA/$split.jsonl" --policy $policy --conditions none \
      --output "$W/baselines/${policy}_$split.json"
  done; done ) > "$W/baselines.log" 2>&1 &

# --- two actor seeds on the one GPU, trained together, then each plays both held-out splits ---
for g in $SEEDS; do (
  export OUT=$W/s$g ACTOR=$W/actor_s$g STEPS BATCH LR PURE=${PURE:-0.5} MODEL PY
  export TRAIN_TIME_LIMIT=$(( $(left) - PLAY_S ))
  export TRAIN_FLAGS="--seed $g --head_warm_start_steps $WARM --head_warm_start_lr 1e-3 --logging_steps 10 ${TRAIN_EXTRA:-}"
  mkdir -p "$OUT"; log "seed $g: training for at most $TRAIN_TIME_LIMIT s"
  stage train || exit 1
  model=$(latest_model "$ACTOR"); log "seed $g: trained ($model)"
  for split in eval_unseen eval_seen; do  # both splits at once: a play step is as much CPU (prompts, games) as GPU
    ( timeout -k 5 $(( $(left) - 25 )) $PY -m envs.play --model_dir "$model" --records "$DATA/$split.jsonl" \
        --output "$OUT/play_$split.json" --batch_size "$PLAY_BATCH" --max_new_tokens "$MAX_NEW" ${PLAY_FLAGS:-} 2>&1 \
        | tr '\r' '\n' | grep -v "$QUIET" > "$OUT/play_$split.log"
      log "seed $g: $split played" ) &
  done
  wait; cat "$OUT"/play_*.log
) > "$W/s$g.log" 2>&1 & done
wait
for f in "$W"/s*.log "$W/baselines.log"; do echo "== $f"; grep -v "$QUIET" "$f" | tail -14; done

# --- summary (whatever finished), tarball ---
reports=()
for g in $SEEDS; do for split in eval_seen eval_unseen; do reports+=(--report "seed$g:$split=$W/s$g/play_$split.json"); done; done
for p in expert explorer; do for split in eval_seen eval_unseen; do reports+=(--report "$p:$split=$W/baselines/${p}_$split.json"); done; done
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
tar czf "$OUT/envs_results.tgz" -C "$W" --exclude='*.npy' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  --exclude='optimizer*' --exclude='tokenizer*' --exclude='data' --exclude='tiny' --exclude='rng_state*' \
  --exclude='scheduler*' $(cd "$W" && ls -d s* actor_s* baselines *.log 2>/dev/null) 2>/dev/null
tar czf "$OUT/records_eval.tgz" -C "$DATA" eval_seen_raw.jsonl eval_unseen_raw.jsonl
log "done"
$PY benchmarks/envs_summary.py --data "$DATA" "${reports[@]}" --out "$OUT/summary.json" --table "$OUT/summary.md" \
  --plot "$OUT/summary.png" --title "household games, SmolLM2-135M actor, ${gpu:-CPU}: seen vs unseen"
ls -la "$OUT"
