#!/bin/bash
# The benchmark's device call: install carried wheels, build the workload, run the configs.
#   run tool, carry [.whl] (and .whl_pa, a pyarrow>=24 wheel, only where the image has an older one):  bash benchmarks/gpu_run.sh [baseline|fixes] 2>&1 | tee $OUT/log
# baseline: the real code at batch 2/4/8/16 (16 with gradient checkpointing if it runs out of memory);
# fixes, fixes2: the same machine's baseline next to bench-only patches of proposed changes (--experiment).
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
  timeout "${LIMIT:-120}" python3 bench.py --results_dir "$RES" --profile_dir "$OUT" "$@" 2>&1 | grep -v "it/s\]\|examples/s\]"
  echo "[gpu_run] $* done rc=$? at +$(( $(date +%s) - T0 )) s"
}
tr() {  # torchrun over both GPUs (NCCL's NVLink multicast off), with the time left checked like `bench`
  local el=$(( $(date +%s) - T0 )) lim=$1; shift
  if [ $(( el + lim )) -gt "$BUDGET" ]; then echo "[gpu_run] skipped (+$el s): torchrun $*"; return; fi
  NCCL_NVLS_ENABLE=0 timeout "$lim" torchrun --nproc_per_node 2 "$@" 2>&1 | grep -v "it/s\]\|examples/s\]"
  echo "[gpu_run] torchrun $* done rc=$? at +$(( $(date +%s) - T0 )) s"
}
PLAN=${1:-baseline}
if [ "$PLAN" = baseline ]; then
bench --batch_size 2 --model_max_length 3072 --steps 25 --profile_steps 3 --measure_matmul --out_name b2_L3072
bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name b2_L8192
bench --batch_size 4 --model_max_length 3072 --steps 25 --out_name b4_L3072
bench --batch_size 8 --model_max_length 3072 --steps 25 --out_name b8_L3072
LIMIT=150 bench --batch_size 16 --model_max_length 3072 --steps 25 --out_name b16_L3072
if grep -q '"error"' "$RES/b16_L3072.json" 2>/dev/null; then
  LIMIT=150 bench --batch_size 16 --model_max_length 3072 --steps 25 --out_name b16_L3072_gc --gradient_checkpointing True
fi
elif [ "$PLAN" = current ]; then
  # the committed code after the measured fixes: cuDNN attention off, TF32 float32 loss logits,
  # plan+negative in one no-grad forward, device-side random draws, loss chunks of 1024
  bench --batch_size 2 --model_max_length 3072 --steps 25 --measure_matmul --out_name cur_b2_L3072
  bench --batch_size 8 --model_max_length 3072 --steps 25 --out_name cur_b8_L3072
  # a 7B-shaped actor (Qwen2.5-7B config, random weights), LoRA r16 + gradient checkpointing, bf16 frozen base
  LIMIT=200 bench --shape qwen7b --batch_size 2 --model_max_length 3072 --steps 12 --warmup 4 --out_name q7b_lora_b2_gc \
    --lora_r 16 --lora_alpha 32 --gradient_checkpointing True --base_dtype bfloat16
  rm -rf /tmp/interlat_bench/qwen7b_n128
  bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name cur_b2_L8192
  LIMIT=100 bench --batch_size 16 --model_max_length 3072 --steps 20 --out_name cur_b16_L3072
elif [ "$PLAN" = fast ]; then
  # the fused loss (closed-form gradients per chunk), compiled, and packed rows with varlen flash attention,
  # each against the path before them on the same machine; REF = the code of call 4/5 (padded, autograd loss)
  REF="--fused_loss false --loss_kernel eager --packed_sequences false"
  bench --batch_size 2 --steps 25 --measure_matmul --out_name fa_b2_ref $REF
  bench --batch_size 2 --steps 25 --out_name fa_b2_fused --loss_kernel eager --packed_sequences false
  bench --batch_size 2 --steps 25 --out_name fa_b2_fused_compiled --packed_sequences false
  bench --batch_size 2 --steps 25 --profile_steps 3 --out_name fa_b2_default
  bench --batch_size 8 --steps 25 --out_name fa_b8_ref $REF
  bench --batch_size 8 --steps 25 --profile_steps 3 --out_name fa_b8_default
  bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name fa_b2_L8192_default
  LIMIT=100 bench --batch_size 16 --steps 20 --out_name fa_b16_default
  LIMIT=100 bench --batch_size 16 --steps 20 --out_name fa_b16_default_gc --gradient_checkpointing True
elif [ "$PLAN" = fast2 ]; then
  # packed rows fixed (flash varlen under autocast), and compiled decoder layers (--compile_layers)
  REF="--fused_loss false --loss_kernel eager --packed_sequences false"
  bench --batch_size 2 --steps 25 --out_name fb_b2_ref $REF
  bench --batch_size 2 --steps 25 --out_name fb_b2_default
  LIMIT=150 bench --batch_size 2 --steps 25 --profile_steps 3 --out_name fb_b2_cl --compile_layers True
  LIMIT=150 bench --batch_size 8 --steps 25 --profile_steps 3 --out_name fb_b8_cl --compile_layers True
  bench --batch_size 8 --steps 25 --out_name fb_b8_default
  LIMIT=150 bench --batch_size 16 --steps 20 --out_name fb_b16_cl --compile_layers True
  LIMIT=100 bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name fb_b2_L8192_cl --compile_layers True
  LIMIT=100 bench --batch_size 4 --steps 25 --out_name fb_b4_cl --compile_layers True
elif [ "$PLAN" = fast3 ]; then
  # one host sync per branch forward (index arithmetic instead of boolean indexing); compiled layers by default
  REF="--fused_loss false --loss_kernel eager --packed_sequences false --compile_layers false"
  bench --batch_size 2 --steps 25 --out_name fc_b2_ref $REF
  bench --batch_size 2 --steps 25 --out_name fc_b2_L3072
  bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name fc_b2_L8192
  bench --batch_size 8 --steps 25 --profile_steps 3 --out_name fc_b8
  bench --batch_size 16 --steps 20 --out_name fc_b16
  LIMIT=110 bench --batch_size 24 --steps 20 --out_name fc_b24
  LIMIT=200 bench --shape qwen7b --batch_size 2 --model_max_length 3072 --steps 12 --warmup 4 --out_name fc_q7b_lora_b2_gc \
    --lora_r 16 --lora_alpha 32 --gradient_checkpointing True --base_dtype bfloat16
elif [ "$PLAN" = fast4 ]; then
  # the largest batches that fit (the 47 samples/s target), next to b2 and the reference on the same machine
  bench --batch_size 32 --steps 20 --out_name fd_b32
  bench --batch_size 2 --steps 25 --out_name fd_b2_L3072
  bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name fd_b2_L8192
  bench --batch_size 2 --steps 25 --out_name fd_b2_ref --fused_loss false --loss_kernel eager --packed_sequences false --compile_layers false
  LIMIT=110 bench --batch_size 40 --steps 20 --out_name fd_b40
  LIMIT=90 bench --batch_size 8 --steps 25 --out_name fd_b8
elif [ "$PLAN" = ddp ]; then
  # two GPUs of one host with the current defaults (packed rows, compiled layers and loss) vs one of them
  CUDA_VISIBLE_DEVICES=0 LIMIT=120 bench --batch_size 8 --steps 20 --out_name dd1_b8
  tr 200 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name dd2_b8
  CUDA_VISIBLE_DEVICES=0 LIMIT=100 bench --batch_size 2 --steps 25 --out_name dd1_b2
  tr 120 bench.py --results_dir "$RES" --batch_size 2 --steps 25 --out_name dd2_b2
elif [ "$PLAN" = scale ]; then
  # two GPUs: DDP after the static-shape negatives gather and find_unused_parameters off, against one GPU of the
  # same machine, with random and length-grouped batches; FSDP2 throughput, then its save/reload check
  echo '{"version": 2}' > /tmp/fsdp2.json
  FSDP=(--fsdp "full_shard auto_wrap" --fsdp_config /tmp/fsdp2.json)
  CUDA_VISIBLE_DEVICES=0 LIMIT=100 bench --batch_size 8 --steps 20 --out_name sc1_b8
  tr 110 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name sc2_b8
  tr 120 benchmarks/fsdp_check.py train --model_name_or_path /tmp/interlat_bench/qwen05_n128/model \
    --train_file /tmp/interlat_bench/qwen05_n128/train.jsonl --output_dir /tmp/fsdp_out --report_to none \
    --bf16 true --per_device_train_batch_size 4 --max_steps 6 --logging_steps 1 --save_strategy no \
    --disable_tqdm true "${FSDP[@]}"
  el=$(( $(date +%s) - T0 ))
  if [ -f /tmp/fsdp_out/fsdp_check.pt ]; then
    ls -la /tmp/fsdp_out; timeout 100 python3 benchmarks/fsdp_check.py reload /tmp/fsdp_out
    echo "[gpu_run] fsdp reload rc=$? at +$(( $(date +%s) - T0 )) s"; rm -rf /tmp/fsdp_out
  fi
  tr 120 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name sc2_b8_fsdp "${FSDP[@]}"
  CUDA_VISIBLE_DEVICES=0 LIMIT=90 bench --batch_size 8 --steps 20 --out_name sc1_b8_grouped --train_sampling_strategy group_by_length
  tr 100 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name sc2_b8_grouped --train_sampling_strategy group_by_length
elif [ "$PLAN" = big ]; then
  # the 47 samples/s target at the largest batches an H200's memory holds, next to b2 and the reference
  LIMIT=110 bench --batch_size 48 --steps 16 --out_name bg_b48
  LIMIT=90 bench --batch_size 32 --steps 20 --out_name bg_b32
  LIMIT=130 bench --batch_size 64 --steps 14 --out_name bg_b64
  LIMIT=60 bench --batch_size 2 --steps 25 --out_name bg_b2
  LIMIT=60 bench --batch_size 2 --steps 25 --out_name bg_b2_ref --fused_loss false --loss_kernel eager --packed_sequences false --compile_layers false
  LIMIT=90 bench --batch_size 24 --steps 20 --out_name bg_b24
elif [ "$PLAN" = scale2 ]; then
  # run after `scale` on the same machine (its sc2_b8 is the two-GPU figure): one GPU over the same sample
  # window as two GPUs x 20 steps (40 steps, 10 left out), and at batch 16, two GPUs' global batch; then the
  # largest batches one H200 holds (the 47 samples/s target)
  CUDA_VISIBLE_DEVICES=0 LIMIT=80 bench --batch_size 8 --steps 40 --warmup 10 --out_name sc1_b8_40
  CUDA_VISIBLE_DEVICES=0 LIMIT=80 bench --batch_size 16 --steps 20 --out_name sc1_b16
  CUDA_VISIBLE_DEVICES=0 LIMIT=110 bench --batch_size 48 --steps 16 --out_name bg_b48
  CUDA_VISIBLE_DEVICES=0 LIMIT=130 bench --batch_size 64 --steps 14 --out_name bg_b64
  CUDA_VISIBLE_DEVICES=0 LIMIT=90 bench --batch_size 32 --steps 20 --out_name bg_b32
  CUDA_VISIBLE_DEVICES=0 LIMIT=50 bench --batch_size 2 --steps 25 --out_name bg_b2
elif [ "$PLAN" = scale3 ]; then
  # two GPUs vs one on the same machine, tokens now summed over ranks; one GPU over the same sample
  # window as two GPUs (twice the steps), at batch 8 and 16 per GPU
  tr 110 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name s3_2gpu_b8
  CUDA_VISIBLE_DEVICES=0 LIMIT=80 bench --batch_size 8 --steps 40 --warmup 10 --out_name s3_1gpu_b8
  tr 120 bench.py --results_dir "$RES" --batch_size 16 --steps 20 --out_name s3_2gpu_b16
  CUDA_VISIBLE_DEVICES=0 LIMIT=100 bench --batch_size 16 --steps 40 --warmup 10 --out_name s3_1gpu_b16
elif [ "$PLAN" = scale4 ]; then
  # as scale3, with length-grouped batches dealt round-robin over the ranks (RankBalancedLengthSampler);
  # then batch 48 on one GPU with the new sampler
  tr 110 bench.py --results_dir "$RES" --batch_size 8 --steps 20 --out_name s4_2gpu_b8
  CUDA_VISIBLE_DEVICES=0 LIMIT=80 bench --batch_size 8 --steps 40 --warmup 10 --out_name s4_1gpu_b8
  tr 120 bench.py --results_dir "$RES" --batch_size 16 --steps 20 --out_name s4_2gpu_b16
  CUDA_VISIBLE_DEVICES=0 LIMIT=100 bench --batch_size 16 --steps 40 --warmup 10 --out_name s4_1gpu_b16
  CUDA_VISIBLE_DEVICES=0 LIMIT=100 bench --batch_size 48 --steps 16 --out_name s4_1gpu_b48
elif [ "$PLAN" = profile48 ]; then
  # where the time of a batch-48 step goes on one H200 (the next target after 43 samples/s)
  LIMIT=200 bench --batch_size 48 --steps 12 --warmup 4 --profile_steps 2 --out_name pf_b48
elif [ "$PLAN" = bf16loss ]; then
  # the fused loss's projections with bf16 operands (the new default under bf16) against float32 (TF32)
  # operands, at batch 48 on one H200 (the loss took 269 ms of a 1.02 s step there, 141 ms in TF32 GEMMs)
  LIMIT=110 bench --batch_size 48 --steps 13 --warmup 4 --out_name lb_b48_bf16
  LIMIT=110 bench --batch_size 48 --steps 13 --warmup 4 --out_name lb_b48_fp32 --loss_matmul_dtype float32
  LIMIT=50 bench --batch_size 2 --steps 20 --out_name lb_b2
elif [ "$PLAN" = kernel ]; then
  # the fused loss chunk as one Triton kernel (3 passes over the float32 logits) against the compiled torch
  # function (~10 passes: 123 ms of a 1.02 s batch-48 step in call 15), first on one chunk, then at batch 48
  timeout 150 python3 benchmarks/loss_kernel_check.py --out "$OUT/loss_kernel_check.json"
  LIMIT=110 bench --batch_size 48 --steps 13 --warmup 4 --out_name lk_b48_triton --loss_kernel triton
  LIMIT=110 bench --batch_size 48 --steps 13 --warmup 4 --out_name lk_b48_compile --loss_kernel compile
  LIMIT=60 bench --batch_size 2 --steps 20 --out_name lk_b2
  LIMIT=120 bench --batch_size 48 --steps 10 --warmup 4 --profile_steps 2 --out_name lk_b48_profile
elif [ "$PLAN" = kernel2 ]; then
  # after call 17 (47.39 samples/s at b48 with the kernel): the kernel's block/warps/stages; data loading
  # (~45 ms of a 0.96 s step on the main process) moved to two persistent workers; batch 32; the compiled
  # chunk function as this machine's baseline; model_max_length 3072 vs 8192 with the current code
  timeout 150 python3 benchmarks/loss_kernel_check.py --out "$OUT/loss_kernel_check.json"
  W="--dataloader_num_workers 2 --dataloader_persistent_workers true"
  LIMIT=100 bench --batch_size 48 --steps 13 --warmup 4 --out_name k2_b48
  LIMIT=100 bench --batch_size 48 --steps 13 --warmup 4 --out_name k2_b48_w2 $W
  LIMIT=100 bench --batch_size 48 --steps 13 --warmup 4 --out_name k2_b48_w2_compile $W --loss_kernel compile
  LIMIT=100 bench --batch_size 48 --steps 22 --warmup 4 --out_name k2_b48_w2_long $W
  LIMIT=80 bench --batch_size 32 --steps 20 --warmup 4 --out_name k2_b32_w2 $W
  LIMIT=60 bench --batch_size 8 --model_max_length 3072 --steps 20 --out_name k2_b8_L3072 $W
  LIMIT=60 bench --batch_size 8 --model_max_length 8192 --steps 20 --out_name k2_b8_L8192 $W
  LIMIT=50 bench --batch_size 2 --steps 20 --out_name k2_b2 $W
elif [ "$PLAN" = final ]; then
  # the committed defaults (Triton loss kernel, two persistent loader workers on a GPU), nothing added:
  # the figures BENCHMARKS.md reports, and model_max_length 3072 vs 8192 at batch 2
  LIMIT=100 bench --batch_size 48 --steps 22 --warmup 4 --out_name fin_b48
  LIMIT=80 bench --batch_size 32 --steps 20 --warmup 4 --out_name fin_b32
  LIMIT=100 bench --batch_size 64 --steps 12 --warmup 4 --out_name fin_b64
  LIMIT=60 bench --batch_size 2 --model_max_length 3072 --steps 25 --out_name fin_b2_L3072
  LIMIT=60 bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name fin_b2_L8192
elif [ "$PLAN" = maxlen ]; then
  # model_max_length 3072 vs 8192 at batch 2, alternated twice on one machine: call 19's single pair
  # differed by 17% on identical data (batch 2 is bound by the host's launch rate, which varies run to run)
  for i in 1 2; do
    LIMIT=60 bench --batch_size 2 --model_max_length 8192 --steps 25 --out_name ml_b2_L8192_$i
    LIMIT=60 bench --batch_size 2 --model_max_length 3072 --steps 25 --out_name ml_b2_L3072_$i
  done
  LIMIT=60 bench --batch_size 8 --model_max_length 8192 --steps 20 --out_name ml_b8_L8192
  LIMIT=60 bench --batch_size 8 --model_max_length 3072 --steps 20 --out_name ml_b8_L3072
elif [ "$PLAN" = h100 ]; then
  # the committed defaults on an 80 GB H100: batch 32 (66 GiB on an H200) is the largest that fits
  LIMIT=90 bench --batch_size 32 --steps 20 --warmup 4 --out_name h1_b32
  LIMIT=70 bench --batch_size 16 --steps 20 --warmup 4 --out_name h1_b16
  LIMIT=60 bench --batch_size 2 --steps 25 --out_name h1_b2
  LIMIT=90 bench --batch_size 32 --steps 20 --warmup 4 --out_name h1_b32_compile --loss_kernel compile
elif [ "$PLAN" = kernel3 ]; then
  # the kernel after its accuracy fix (KL from logit gaps; pass 2 now also reads the plan logits: 9 reads of
  # a chunk's logits instead of 8): one chunk, then the defaults at batch 48 and 32, and the compiled baseline
  timeout 150 python3 benchmarks/loss_kernel_check.py --out "$OUT/loss_kernel_check.json"
  LIMIT=100 bench --batch_size 48 --steps 22 --warmup 4 --out_name k3_b48
  LIMIT=80 bench --batch_size 32 --steps 20 --warmup 4 --out_name k3_b32
  LIMIT=100 bench --batch_size 48 --steps 22 --warmup 4 --out_name k3_b48_compile --loss_kernel compile
  LIMIT=50 bench --batch_size 2 --steps 25 --out_name k3_b2
elif [ "$PLAN" = fixes ]; then
  python3 benchmarks/check_bf16_loss.py
  bench --batch_size 2 --steps 25 --measure_matmul --out_name fx_b2_base
  bench --batch_size 2 --steps 25 --experiment no_cudnn_sdpa --out_name fx_b2_nocudnn
  bench --batch_size 2 --steps 25 --profile_steps 3 --experiment no_cudnn_sdpa,tf32 --out_name fx_b2_nocudnn_tf32
  bench --batch_size 8 --steps 25 --out_name fx_b8_base
  bench --batch_size 8 --steps 25 --experiment no_cudnn_sdpa,tf32 --out_name fx_b8_nocudnn_tf32
  bench --batch_size 2 --steps 25 --experiment pad128 --out_name fx_b2_pad128
  bench --batch_size 2 --steps 25 --experiment no_cudnn_sdpa,bf16_lm_head --out_name fx_b2_nocudnn_bf16
  LIMIT=60 bench --batch_size 2 --steps 25 --out_name fx_b2_base_again
elif [ "$PLAN" = fixes2 ]; then
  python3 benchmarks/check_bf16_loss.py
  bench --batch_size 2 --steps 25 --out_name f2_b2_base
  bench --batch_size 2 --steps 25 --experiment no_cudnn_sdpa,tf32 --out_name f2_b2_nocudnn_tf32
  bench --batch_size 2 --steps 25 --experiment no_cudnn_sdpa,bf16_lm_head --out_name f2_b2_nocudnn_bf16
  bench --batch_size 2 --steps 25 --profile_steps 3 --experiment no_cudnn_sdpa,one_autocast --out_name f2_b2_nocudnn_oneac
  bench --batch_size 8 --steps 25 --experiment no_cudnn_sdpa,one_autocast --out_name f2_b8_nocudnn_oneac
  bench --batch_size 8 --steps 25 --experiment no_cudnn_sdpa,tf32 --out_name f2_b8_nocudnn_tf32
fi
python3 benchmarks/summarize.py "$RES" --combined "$OUT/all_results.json"
ls -la "$OUT"
