"""The training scripts' arguments: dataclasses that `HfArgumentParser` fills, as in transformers' run_clm.py and
TRL (`DPOConfig(TrainingArguments)`). A shared base per group, the actor's (train_actor.py) and the sender's
(sender/train.py) classes beside each other:

    model            ModelArguments  <- ActorModelArguments, SenderArguments
    latent method    LatentHeadArguments, LossArguments (the loss settings, defined once: losses.LossConfig
                     extends LossArguments)
    data             DataArguments (both)
    training         TrainingOptions <- ActorTrainingOptions, SenderTrainingOptions; each is composed with
                     transformers' TrainingArguments in common/training_args.py

A script's first parsed object is `ActorArguments` (model + latent head + loss) or `SenderArguments`, then
`DataArguments`, then its training arguments. Every check that needs one value alone runs in `__post_init__`
(a `ValueError`: one line on the command line). This module imports nothing heavy, so that `--help` can show
these without importing torch or transformers' Trainer (seconds).
"""
from __future__ import annotations

import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from common.constants import (COMPRESSION_ALIGN_WEIGHT, COMPRESSION_KL_WEIGHT, DISTILL_TEMPERATURE, DISTILL_WINDOW,
                              EMBEDDED_MODEL, LOSS_CHUNK_SIZE, MODEL_MAX_LENGTH, PREPENDED_LENGTH,
                              SENDER_REQUEST, UNCERTAINTY_QUANTILE)

DEFAULT_ACTOR_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # the specification's base model


def check_choices(obj) -> None:
    """Every `Literal[...]` field of the dataclass `obj` holds one of its values (argparse checks typed flags;
    this covers objects built in code and config values alike)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        allowed = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else ()
        if allowed and getattr(obj, f.name) not in allowed:
            raise ValueError(f"--{f.name} {getattr(obj, f.name)!r}: expected one of {', '.join(map(str, allowed))}")


def check_number(name: str, value: float, low: float | None = None, high: float | None = None,
                 high_open: bool = False) -> None:
    """`value` is a finite number in [low, high] (or [low, high) with `high_open`); a one-line `ValueError`."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (low is None or value >= low) and \
        (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = f"in [{low}, {high}{')' if high_open else ']'}" if high is not None else f">= {low}"
        raise ValueError(f"--{name} {value}: expected a finite number {bounds}")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """The causal LM to load and how (both scripts)."""

    model_name_or_path: str | None = field(default=EMBEDDED_MODEL, metadata={
        "help": f"Hub id or local folder of a causal LM; offline, {EMBEDDED_MODEL} is embedded."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flex_attention."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the model's folder."})


@dataclass
class ActorModelArguments(ModelArguments):
    """The actor's base model: its weights' dtype, LoRA, speed options."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": f"Hub id or local folder of the actor's base causal LM (default {DEFAULT_ACTOR_MODEL}; offline, "
                f"{EMBEDDED_MODEL} is embedded). Also the tokenizer of --validate_only's length checks: without "
                "it --validate_only checks the files' structure only."})
    base_dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={
        "help": "dtype of the base model's weights: float32 (mixed precision keeps float32 master weights), "
                "or bfloat16 for a frozen LoRA base."})
    lora_r: int = field(default=0, metadata={
        "help": "LoRA rank (0: full fine-tuning). Head and new tokens stay trainable."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names to adapt, or all-linear."})
    packed_sequences: bool | None = field(default=None, metadata={
        "help": "Run each branch as one row of concatenated samples with variable-length flash attention "
                "(no padding, no attention mask). Default: on with CUDA + bf16/fp16 where torch has varlen_attn."})
    compile_layers: bool | None = field(default=None, metadata={
        "help": "torch.compile each decoder layer (dynamic shapes): fewer, fused kernels; 1.5-1.75x faster steps "
                "on an H100 (BENCHMARKS.md). Default: on with CUDA."})
    cuda_graphs: bool = field(default=False, metadata={
        "help": "Replay CUDA graphs in the compiled decoder layers (torch.compile's reduce-overhead): one launch per "
                "layer and pass instead of dozens, for small batches whose steps wait on the host. Each packed row "
                "is padded to one of a few lengths (a graph replays one shape). Needs --compile_layers and "
                "--packed_sequences (CUDA, bf16/fp16)."})

    def __post_init__(self):
        check_choices(self)
        if self.lora_r < 0:
            raise ValueError(f"--lora_r {self.lora_r}: expected 0 (full fine-tuning) or a rank >= 1")
        check_number("lora_dropout", self.lora_dropout, 0, 1, high_open=True)


# ---------------------------------------------------------------------------------------------
# Latent method: the head and the loss
# ---------------------------------------------------------------------------------------------
def parse_mix_ratios(text: str) -> tuple[float, ...]:
    """`--mix_ratios` as numbers in [0, 1]; a `ValueError` saying what is wrong otherwise."""
    message = f"--mix_ratios {text!r}: expected comma-separated numbers in [0, 1], e.g. 0.2,0.5,0.8"
    try:
        ratios = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(message) from None
    if not ratios or not all(0 <= r <= 1 for r in ratios):
        raise ValueError(message)
    return ratios


@dataclass
class LossArguments:
    """The three-branch loss's settings: the one definition of their names, defaults and checks (losses.LossConfig
    extends it with the numbers the loss functions read)."""

    plan_similarity_weight: float = field(default=1.0, metadata={"help": "Weight of 0.7 KL + 0.3 (1-cos)."})
    random_contrast_weight: float = field(default=2.0, metadata={"help": "Weight of max(0, 0.69 - JS)."})
    mix_ratios: str = field(default="0.2,0.3,0.4,0.5,0.6,0.7,0.8", metadata={
        "help": "Comma-separated latent shares drawn per sample and step (rest of the block is plan text)."})
    pure_latent_prob: float = field(default=0.5, metadata={
        "help": "Share of training samples that get pure latents (ratio 1), the condition used at inference."})
    loss_chunk_size: int | None = field(default=LOSS_CHUNK_SIZE, metadata={
        "help": "Supervised tokens per chunk when projecting to the vocabulary (bounds logits memory; 0: one chunk)."})
    fused_loss: bool = field(default=True, metadata={
        "help": "Compute the loss terms and their gradients in one pass per chunk (bias-free linear LM "
                "heads); False: plain autograd (the reference path)."})
    loss_kernel: Literal["auto", "triton", "compile", "eager"] = field(default="auto", metadata={
        "help": "The fused loss's per-chunk function: triton (one kernel, 3 passes over the logits), compile "
                "(torch.compile of the torch function) or eager. auto: triton on CUDA when installed, else compile "
                "on CUDA, else eager."})
    loss_matmul_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "Operands of the fused loss's vocabulary projections (float32 accumulation and logits either way). "
                "auto: bfloat16 when training in bf16 on CUDA (twice TF32's speed), else float32."})
    negative_form: Literal["published", "latents_only"] = field(default="published", metadata={
        "help": "The contrast's negative branch. published: another sample's latents (cut or tiled to this "
                "sample's K) in this sample's latent rows, then this sample's own plan suffix, so it differs from "
                "the positive only in the latents; latents_only: the other sample's latents alone."})
    contrast_divergence: Literal["js", "published"] = field(default="js", metadata={
        "help": "js: max(0, 0.69 - JS) per position; published: max(0, 0.69 - (0.5 KL(M||P) + 0.5 KL(M||Q))) of "
                "each sample's mean distributions, as the public code computes it (needs --fused_loss false)."})
    loss_weighting: Literal["fixed", "adaptive"] = field(default="fixed", metadata={
        "help": "fixed: --plan_similarity_weight and --random_contrast_weight; adaptive: the public code's "
                "w_plan = 0.01 + 0.04 clip(L_plan/4), w_rand = 0.01 + 0.49 clip(L_rand/0.69) "
                "(needs --fused_loss false)."})

    def __post_init__(self):
        check_choices(self)
        if isinstance(self.mix_ratios, str):
            parse_mix_ratios(self.mix_ratios)
        elif not self.mix_ratios or not all(isinstance(r, (int, float)) and 0 <= r <= 1 for r in self.mix_ratios):
            raise ValueError(f"--mix_ratios {self.mix_ratios!r}: expected numbers in [0, 1]")
        check_number("pure_latent_prob", self.pure_latent_prob, 0, 1)
        check_number("plan_similarity_weight", self.plan_similarity_weight, 0)
        check_number("random_contrast_weight", self.random_contrast_weight, 0)
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ValueError(f"--loss_chunk_size {self.loss_chunk_size}: expected a number of tokens >= 1, or 0")


@dataclass
class LatentHeadArguments:
    """The latent head: how many latent rows it reads, its attention, its warm start."""

    prepended_length: int = field(default=PREPENDED_LENGTH, metadata={
        "help": "Latent rows used per sample (the first ones)."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads of the latent head's MHA."})
    head_dropout: float = field(default=0.1, metadata={"help": "Attention dropout of the latent head."})
    head_warm_start_steps: int = field(default=300, metadata={
        "help": "Before training, fit the latent head for this many steps so that its row k matches the actor's "
                "embedding of plan token k (head only, no LM pass; assumes the sender tokenizes the plan as the "
                "actor does). Cuts the steps until the actor reads the latents from 'never in 120' to 10-80 "
                "(benchmarks/steps_to_read.py). 0: off."})
    head_warm_start_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the warm start."})

    def __post_init__(self):
        if self.prepended_length < 1 or self.num_heads < 1:
            raise ValueError("--prepended_length and --num_heads must be at least 1")
        check_number("head_dropout", self.head_dropout, 0, 1, high_open=True)
        if self.head_warm_start_steps < 0:
            raise ValueError(f"--head_warm_start_steps {self.head_warm_start_steps}: expected >= 0 (0: off)")
        check_number("head_warm_start_lr", self.head_warm_start_lr, 0)


@dataclass
class ActorArguments(ActorModelArguments, LatentHeadArguments, LossArguments):
    """train_actor.py's model and latent-method settings: its first parsed object (`model_args`)."""

    def __post_init__(self):
        ActorModelArguments.__post_init__(self)
        LatentHeadArguments.__post_init__(self)
        LossArguments.__post_init__(self)


# ---------------------------------------------------------------------------------------------
# The sender (sender/train.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class SenderArguments(ModelArguments):
    """sender/train.py's model and compression settings: the student starts from the sender model."""

    actor_dir: str | None = field(default=None, metadata={
        "help": "An output folder of train_actor.py: the actor the sender learns to speak to (frozen)."})
    model_name_or_path: str | None = field(default=EMBEDDED_MODEL, metadata={
        "help": "The sender model the student starts from: the one whose hidden states the actor was trained on."})
    num_latents: int = field(default=8, metadata={"help": "K: latent steps per message."})
    request: str = field(default=SENDER_REQUEST, metadata={
        "help": "Fixed text before the conversation in the student's context."})
    sender_knowledge: Literal["none", "plan"] = field(default="none", metadata={
        "help": "What the student reads besides the conversation: none (as published: the task alone) or plan "
                "(the record's plan as private notes, for tasks whose plan holds knowledge the task lacks)."})
    kl_weight: float = field(default=COMPRESSION_KL_WEIGHT, metadata={"help": "Weight of the distillation KL."})
    alignment_weight: float = field(default=COMPRESSION_ALIGN_WEIGHT, metadata={"help": "Weight of 1 - cos alignment."})
    distill_temperature: float = field(default=DISTILL_TEMPERATURE, metadata={
        "help": "Temperature T of the KL (x T^2)."})
    distill_window: int = field(default=DISTILL_WINDOW, metadata={
        "help": "Supervised tokens per sample (the first ones) that the distillation KL covers."})
    uncertainty_quantile: float = field(default=UNCERTAINTY_QUANTILE, metadata={
        "help": "Token weights relu(H_none - H_data) are clipped at this quantile of the positive ones."})
    loss_chunk_size: int = field(default=LOSS_CHUNK_SIZE, metadata={
        "help": "Supervised tokens per vocabulary projection (CE)."})

    def __post_init__(self):
        check_choices(self)
        for name in ("kl_weight", "alignment_weight"):
            check_number(name, getattr(self, name), 0)
        check_number("uncertainty_quantile", self.uncertainty_quantile, 0, 1)


# ---------------------------------------------------------------------------------------------
# Data (both scripts)
# ---------------------------------------------------------------------------------------------
@dataclass
class DataArguments:
    """The records to train and evaluate on: files, or a dataset read with `datasets`."""

    train_file: str | None = field(default=None, metadata={"help": "JSON, JSONL or {\"data\": [...]} records."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Instead of --train_file: a local dataset folder or data file, or a hub dataset id (read from the "
                "local Hugging Face cache, downloaded when online), loaded with datasets' json loader; records as "
                "in a data file, splits by file name (train.jsonl, test.jsonl, ...)."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to train on."})
    eval_split: str | None = field(default=None, metadata={
        "help": "A split of --dataset_name held out for evaluation (else --eval_file or --eval_ratio)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out records (else see --eval_ratio)."})
    eval_ratio: float = field(default=0.0, metadata={"help": "Share of train_file held out when no eval_file."})
    lazy_preprocess: bool = field(default=False, metadata={"help": "Tokenize on access instead of up front."})
    model_max_length: int = field(default=MODEL_MAX_LENGTH, metadata={
        "help": "Longest sequence, latent block included."})

    def __post_init__(self):
        check_number("eval_ratio", self.eval_ratio, 0, 1, high_open=True)
        if self.model_max_length < 1:
            raise ValueError(f"--model_max_length {self.model_max_length}: expected a number of tokens >= 1")

    def check_source(self) -> None:
        """Exactly one of --train_file and --dataset_name; --eval_split only with --dataset_name."""
        if bool(self.train_file) == bool(self.dataset_name):
            raise ValueError("--train_file or --dataset_name is required (one of them)" if not self.train_file else
                             "--train_file and --dataset_name both given; expected one of them")
        if self.eval_split and not self.dataset_name:
            raise ValueError("--eval_split names a split of --dataset_name; with --train_file use --eval_file")
        if self.eval_split and self.eval_file:
            raise ValueError("--eval_split and --eval_file both given; expected one of them")


# ---------------------------------------------------------------------------------------------
# Training: options added to transformers' TrainingArguments, and defaults changed
# ---------------------------------------------------------------------------------------------
# The Trainer applies Liger's kernels only to a PreTrainedModel (this actor is a wrapper: it would log a warning and
# apply nothing), and Liger's gain is its fused linear cross-entropy, which never runs here: the actor projects to
# the vocabulary and computes every loss itself. Its other kernels fail under Triton's CPU interpreter (RMSNorm,
# liger-kernel 0.8.5), so they cannot be tested here, nor were they measured on a GPU: refused, not ignored.
LIGER_REFUSAL = ("--use_liger_kernel is not supported: the actor computes its losses itself (losses.py, --fused_loss), "
                 "so Liger's fused linear cross-entropy would never run, and its other kernels are unmeasured for this "
                 "trainer; for speed use --compile_layers and --loss_kernel triton (BENCHMARKS.md)")
OUTPUT_DIR_REQUIRED = ("--output_dir is required: the folder the model, its checkpoints and logs are written to "
                       "(e.g. --output_dir checkpoints/actor)")


def schedules_match(args) -> bool:
    """Best-model tracking needs a checkpoint at every evaluation."""
    if args.eval_strategy == "no" or args.save_strategy != args.eval_strategy or args.save_strategy == "best":
        return False
    return args.save_strategy != "steps" or args.save_steps % args.eval_steps == 0


@dataclass
class TrainingOptions:
    """What both training scripts add to transformers' `TrainingArguments`, and the defaults they change (aliases
    of dropped names, auto-detected precision and loader workers, the best model when the schedules allow it).
    Composed with `TrainingArguments` in common/training_args.py; `__post_init__` then runs before its own."""

    output_dir: str | None = field(default=None, metadata={
        "help": "Where the model, its checkpoints and logs are written (required, except with --validate_only)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train into an --output_dir that holds another run (its files are replaced); without it such a "
                "folder is refused."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "Alias of --eval_strategy."})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "Share of steps spent warming up (transformers 5 reads a float --warmup_steps < 1 the same way)."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: auto-detect)."})
    fp16: bool | None = field(default=None, metadata={"help": "fp16 mixed precision (default: auto-detect)."})
    # Collating a batch (reading latent files, padding) on the main process leaves the GPU idle meanwhile:
    # ~5% of a batch-48 step on an H200 (BENCHMARKS.md). Workers collate the next batches during the step.
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "Processes that collate batches (default: 2 when training on a GPU, else 0)."})
    dataloader_persistent_workers: bool | None = field(default=None, metadata={
        "help": "Keep the workers across epochs (default: on when there are workers)."})
    dataloader_pin_memory: bool | None = field(default=None, metadata={
        "help": "Page-locked batches for faster copies to the GPU (default: on when training on a GPU; "
                "without one torch warns at every data loader it builds)."})
    # Every parameter takes part in every step (the head too: samples without latents still pass it one
    # padded row), so DDP need not search the autograd graph for unused ones after each forward.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP's search for parameters without a gradient (off: none exist in this model)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept off: the batch carries latents and plans, not forward's named inputs."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={
        "help": "The batch's label keys (labels)."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={
        "help": "Batches of similar length waste less compute on padding."})
    load_best_model_at_end: bool | None = field(default=None, metadata={
        "help": "Default: on when evaluation and saving run on the same schedule."})
    enable_loss_plot: bool = field(default=True, metadata={"help": "Write loss_curve.png."})
    nonfinite_policy: Literal["skip", "stop"] = field(default="skip", metadata={
        "help": "On a NaN/inf gradient: 'skip' drops that step's update, 'stop' ends training; both report it."})
    validate_only: bool = field(default=False, metadata={
        "help": "Check the data files and exit: their structure and latents, and with --model_name_or_path "
                "its chat template and the lengths."})

    @property
    def trains_on_gpu(self) -> bool:
        """A CUDA device is there and not refused (`--use_cpu`): what the auto-detected defaults follow."""
        import torch

        return torch.cuda.is_available() and not self.use_cpu

    def __post_init__(self):
        import torch

        check_choices(self)
        if self.output_dir is None and not self.validate_only:
            raise ValueError(OUTPUT_DIR_REQUIRED)
        for name in ("learning_rate", "head_learning_rate", "weight_decay", "max_grad_norm"):
            if getattr(self, name, None) is not None:
                check_number(name, getattr(self, name), 0)
        if getattr(self, "use_liger_kernel", False):
            raise ValueError(LIGER_REFUSAL)
        if self.evaluation_strategy is not None:  # dropped by transformers 5; the seed's commands still use it
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:  # also dropped by transformers 5
            check_number("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
            self.warmup_steps = self.warmup_ratio
        on_gpu = self.trains_on_gpu
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = 2 if on_gpu else 0
        if self.dataloader_persistent_workers is None:
            self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = on_gpu
        if self.bf16 is None and self.fp16 is None:
            self.bf16 = on_gpu and torch.cuda.is_bf16_supported()
            self.fp16 = on_gpu and not self.bf16
        self.bf16, self.fp16 = bool(self.bf16), bool(self.fp16)
        explicit_best = self.load_best_model_at_end is not None
        self.load_best_model_at_end = bool(self.load_best_model_at_end)
        super().__post_init__()  # transformers' TrainingArguments (see common/training_args.py)
        if self.n_gpu > 1:  # only in the single-process (DataParallel) mode
            # One process seeing several GPUs would mean nn.DataParallel, whose replicas cannot run the
            # three-branch step; use one GPU here and torchrun / accelerate launch for several.
            import logging

            logging.getLogger("train_actor").warning(
                "%d GPUs visible to one process: training on one. Use `torchrun --nproc_per_node %d %s ...` to use "
                "all of them.", self._n_gpu, self._n_gpu, os.path.basename(sys.argv[0]) or "train_actor.py")
            self._n_gpu = 1
        if not explicit_best and schedules_match(self):
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "loss"
            self.greater_is_better = False if self.greater_is_better is None else self.greater_is_better


@dataclass
class ActorTrainingOptions(TrainingOptions):
    """train_actor.py's training options: the head's learning rate, the probes, the latent conditions."""

    head_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the freshly initialised latent head (default: --learning_rate). Its output "
                "starts small (scale 0.2 x 0.1, as published); a higher rate lets it reach the size of the "
                "actor's token embeddings sooner."})
    enable_infoNCE_probe: bool = field(default=False, metadata={"help": "Log the InfoNCE probe."})
    infoNCE_probe_interval: int = field(default=200, metadata={"help": "Steps between InfoNCE probes."})
    infoNCE_probe_samples: int = field(default=8, metadata={"help": "K samples scored against each other."})
    eval_latent_conditions: int = field(default=64, metadata={
        "help": "After each evaluation, CE under true/shuffled/none/plan-text latents on this many eval "
                "samples (0: off)."})
    stop_when_latents_read: bool = field(default=False, metadata={
        "help": "End training at the first evaluation where held-out true latents beat shuffled ones by >= 1 "
                "bit/token and >= 90%% of replies are the greedy prediction (logged as cond/steps_to_read)."})
    sender_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The model whose hidden states the latents are: named in the model card (README.md, pushed with "
                "--push_to_hub). Changes nothing in training."})

    def __post_init__(self):
        if self.infoNCE_probe_interval < 1 or self.infoNCE_probe_samples < 2:
            raise ValueError("--infoNCE_probe_interval must be >= 1 and --infoNCE_probe_samples >= 2")
        if self.eval_latent_conditions < 0:
            raise ValueError(f"--eval_latent_conditions {self.eval_latent_conditions}: expected >= 0 (0: off)")
        super().__post_init__()


@dataclass
class SenderTrainingOptions(TrainingOptions):
    """sender/train.py's training options: the shared ones (its own settings are `SenderArguments`)."""


# ---------------------------------------------------------------------------------------------
# Names other tools use: TRL's and transformers' example scripts' flags
# ---------------------------------------------------------------------------------------------
# Same meaning here under another name: read as ours (a config key too). Applied only where the script has the
# target and does not have the alias as its own flag.
FLAG_ALIASES = {
    "max_seq_length": "model_max_length",  # TRL's SFTConfig (older)
    "max_length": "model_max_length",  # TRL's SFTConfig
    "dtype": "base_dtype",  # TRL's ModelConfig, transformers' from_pretrained
    "torch_dtype": "base_dtype",  # the same, before transformers 5
    "packing": "packed_sequences",  # TRL's SFTConfig: samples concatenated into rows
    "validation_file": "eval_file",  # transformers' run_clm.py
    "dataset_train_split": "dataset_split",  # TRL's ScriptArguments
    "dataset_test_split": "eval_split",
}
_NO_QUANTIZED = ("quantized bases are not supported; for a LoRA run in less memory use --base_dtype bfloat16 "
                 "--lora_r 16")
_LORA_HERE = ("not supported: LoRA here takes --lora_r, --lora_alpha, --lora_dropout and --lora_target_modules (the "
              "latent head and the new token embeddings always train in full)")
# Another meaning, or no counterpart: refused with one line that names ours.
FLAG_REFUSALS = {
    "use_peft": "LoRA is on whenever --lora_r > 0 here: use --lora_r N (e.g. --lora_r 16, TRL's default rank); "
                "--lora_alpha, --lora_dropout and --lora_target_modules as in TRL",
    "load_in_4bit": _NO_QUANTIZED, "load_in_8bit": _NO_QUANTIZED, "use_bnb_nested_quant": _NO_QUANTIZED,
    "use_rslora": _LORA_HERE, "use_dora": _LORA_HERE, "lora_task_type": _LORA_HERE, "lora_modules_to_save": _LORA_HERE,
    "dataset_text_field": "records are read from their conversations or messages field (ShareGPT turns or chat "
                          "messages; README, 'Data format'); a plain-text column is not supported",
    "validation_split_percentage": "use --eval_ratio 0.05 (a share of --train_file, not a percentage)",
    "dataset_config": "dataset configurations are not supported: --dataset_name takes a local folder or data file, "
                      "or a hub id",
    "dataset_config_name": "dataset configurations are not supported: --dataset_name takes a local folder or data "
                           "file, or a hub id",
    "tokenizer_name": "the actor uses its base model's tokenizer: --model_name_or_path (for --validate_only too)",
}
SENDER_FLAG_REFUSALS = {
    **{k: v for k, v in FLAG_REFUSALS.items() if k not in ("use_peft", "tokenizer_name")},
    "use_peft": "sender/train.py trains the whole student (LoRA is the actor's: train_actor.py --lora_r N)",
    "dtype": "the student trains with float32 weights; mixed precision: --bf16 true",
    "torch_dtype": "the student trains with float32 weights; mixed precision: --bf16 true",
}
