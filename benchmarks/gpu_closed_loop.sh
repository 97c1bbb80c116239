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
pack() { tar czf "$OUT/$1.tgz" -C "$W" --exclude='*.npy' --exclude='*.safetensors' --exclude='*.pt' \
  --exclude='*.bin' --exclude='*.z8' --exclude='*.ulx' --exclude='*.gguf' --exclude='tokenizer*' \
  --exclude='optimizer*' --exclude='games' --exclude='latents' --exclude='*.ni' --exclude='*.json.gz' . 2>/dev/null
  ls -la "$OUT"; }
PY=python3; source benchmarks/closed_loop_demo.sh  # its stages (latents, train, baselines, play), quiet, latest_model

demo_actor() {  # time limit: the demo task at GPU size (as gpu_demo.sh), its latents, and its actor in $W/demo
  python3 demo/make_demo_task.py --out_dir $W/demo/data --n_train $DEMO_TRAIN --n_eval $DEMO_EVAL --max_distractors 2
  ( DATA=$W/demo/data ACTOR=$W/demo/actor STEPS=$DEMO_STEPS TRAIN_TIME_LIMIT=$1
    TRAIN_FLAGS="--prepended_length 64 --model_max_length 512 --head_warm_start_steps $WARM --head_warm_start_lr 1e-3"
    stage latents && stage train )
}

compression_eval() {  # actor dir, data dir, out dir, max length, then more compression_eval.py flags
  local actor=$1 data=$2 out=$3 maxlen=$4; shift 4
  timeout -k 10 $(( $(left) - 30 )) python3 benchmarks/compression_eval.py --actor_dir "$actor" --sender_model $MODEL \
    --train_file "$data/train.jsonl" --eval_file "$data/eval.jsonl" --out_dir "$out" --eval_batch_size 32 \
    --model_max_length "$maxlen" --latency_batches 1,32 --reps 10 --train_flags "--max_steps $SENDER_STEPS \
    --per_device_train_batch_size $BATCH --learning_rate 1e-4 --sender_knowledge plan --disable_tqdm true \
    --logging_steps 10" "$@"
}

case $1 in
  part1)
    cp .gg_a/part_aa /tmp/part_aa || exit 1
    setup_device  # TextWorld from .whl_tw
    log "games: $N_TRAIN train + $N_EVAL eval on $(nproc) cores"
    DATA=$W/data stage games || exit 1
    log "games done"; cp $W/data/eval_raw.jsonl "$OUT"/ ;;

  loop)
    setup_device
    log "latents (teacher-forced on each game's plan)"
    DATA=$W/data stage latents > $W/latents.log 2>&1 || exit 1; log "latents done"
    OUT=$W DATA=$W/data stage baselines > $W/baselines.log 2>&1 &  # no GPU: expert (the ceiling) and blind explorer
    for g in 0 1; do (  # the actor of seed g on GPU g, trained and played on the held-out games
      export CUDA_VISIBLE_DEVICES=$g OUT=$W/s$g DATA=$W/data ACTOR=$W/actor_s$g STEPS=$LOOP_STEPS
      export TRAIN_TIME_LIMIT=$(( $(left) - 110 )) TRAIN_FLAGS="--seed $g --head_warm_start_steps $WARM"
      mkdir -p $OUT; stage train && stage play
    ) > $W/s$g.log 2>&1 & done
    wait; log "trained and played"
    for f in $W/baselines.log $W/s0.log $W/s1.log; do echo "== $f"; tail -25 "$f"; done
    pack loop ;;

  compress)
    log "GPU 0: the demo task; GPU 1: the text games"
    (  # GPU 0: the demo task's actor, then its senders
      export CUDA_VISIBLE_DEVICES=0
      demo_actor 200; log "demo actor done"
      compression_eval "$(latest_model $W/demo/actor)" $W/demo/data $W/compress_demo 512 --ks $KS --seeds 0,1 \
        --jobs $JOBS --time_budget_s $(( $(left) - 200 ))
    ) > $W/compress_demo.log 2>&1 &
    (  # GPU 1: the text games, against the seed-0 actor of the loop call
      export CUDA_VISIBLE_DEVICES=1; actor=$(latest_model $W/actor_s0)
      compression_eval "$actor" $W/data $W/compress_games 2048 --ks $KS --seeds 0,1 --jobs $JOBS \
        --time_budget_s $(( $(left) - 260 ))
      log "games senders done"
      for k in 8 4 16 32; do  # success rate with each K-latent message (seed 0's sender)
        [ -f $W/compress_games/K${k}_seed0/eval_compressed.jsonl ] && [ "$(left)" -gt 40 ] || continue
        python3 -m envs.play --model_dir "$actor" --records $W/compress_games/K${k}_seed0/eval_compressed.jsonl \
          --game_root $W/data --conditions true,shuffled --batch_size 128 --output $W/play_K${k}.json
      done
    ) > $W/compress_games.log 2>&1 &
    wait; log "compress done"
    for f in $W/compress_demo.log $W/compress_games.log; do echo "== $f"; grep -v "$QUIET" "$f" | tail -40; done
    pack compress ;;

  compress_demo)  # one call after part1: the demo task's actor, then its senders split over both GPUs
    setup_device
    demo_actor 150 > $W/demo_actor.log 2>&1 || exit 1
    log "demo actor done"; grep "cond/\|train_runtime" $W/demo_actor.log | tail -3 | tee $OUT/demo_actor.txt
    C=$W/compress_demo
    ce() { compression_eval "$(latest_model $W/demo/actor)" $W/demo/data $C 512 "$@"; }
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
