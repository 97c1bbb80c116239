#!/bin/bash
# Compression (sender/train.py) at toy size, on a CPU: can K latents carry what the full message carries?
#
# A randomly initialised 4-layer, 128-wide Llama with SmolLM2's tokenizer is both the sender (its hidden
# states of the plan are the full latents) and the actor's base model. For each task of
# demo/make_demo_task.py (rooms: 8 answers; count: 28), the actor is trained on pure latents until it reads
# them, then benchmarks/compression_eval.py trains one sender per K and seed against it
# (`--sender_knowledge plan`: the K latents compress the plan) and evaluates the actor on their messages.
#
#   bash benchmarks/compression_tiny_cpu.sh            # both tasks, K = 16/8/4, seeds 0/1 (~40 min on 2 cores)
#   TASKS=rooms KS=8 SEEDS=0 bash benchmarks/compression_tiny_cpu.sh
#
# Writes $W/<task>/compression.json (tables printed at the end). What it measures: whether the stage's
# losses and rollout make K latents carry the answer, over tasks and seeds; not quality at model size.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
W=${W:-checkpoints/compression_tiny}
TASKS=${TASKS:-rooms count}; KS=${KS:-16,8,4}; SEEDS=${SEEDS:-0,1}; JOBS=${JOBS:-2}
ACTOR_STEPS=${ACTOR_STEPS:-800}; SENDER_STEPS=${SENDER_STEPS:-300}; LR=${LR:-1e-3}; BATCH=${BATCH:-16}

[ -f "$W/tiny/config.json" ] || $PY -c "import sys, models; models.save_random_llama(sys.argv[1], 128, 4)" "$W/tiny"

for task in $TASKS; do
  data=$W/$task/data actor=$W/$task/actor
  if [ ! -f "$data/eval.jsonl" ]; then
    $PY demo/make_demo_task.py --task "$task" --out_dir "$data" --n_train 800 --n_eval 64 --max_distractors 0
    for split in train eval; do
      $PY -m sender.collect --model_name_or_path "$W/tiny" --mode teacher_forced \
        --input_file "$data/${split}_raw.jsonl" --output_file "$data/$split.jsonl"
    done
  fi
  if [ ! -f "$actor/latent_comm_head.pt" ]; then  # pure latents: a from-scratch actor must read them
    $PY train_actor.py recipes/demo.yaml --model_name_or_path "$W/tiny" --train_file "$data/train.jsonl" \
      --eval_file "$data/eval.jsonl" --output_dir "$actor" --overwrite_output_dir true --max_steps "$ACTOR_STEPS" \
      --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --head_learning_rate "$LR" \
      --head_warm_start_steps 300 --pure_latent_prob 1.0 --eval_steps "$ACTOR_STEPS" --save_steps "$ACTOR_STEPS" \
      --infoNCE_probe_interval "$ACTOR_STEPS" --logging_steps 100 --disable_tqdm true
  fi
  $PY benchmarks/compression_eval.py --actor_dir "$actor" --sender_model "$W/tiny" \
    --train_file "$data/train.jsonl" --eval_file "$data/eval.jsonl" --out_dir "$W/$task" --ks "$KS" \
    --seeds "$SEEDS" --jobs "$JOBS" --eval_batch_size 32 --latency_batches 1,16 --reps 5 --warmup 2 \
    --train_flags "--max_steps $SENDER_STEPS --per_device_train_batch_size $BATCH --learning_rate $LR \
      --sender_knowledge plan --logging_steps 50 --disable_tqdm true"
done
