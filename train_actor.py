"""Train an actor that reads a sender's latent message: arguments, building, running, saving.

    python train_actor.py --train_file data/train.jsonl --output_dir checkpoints/actor ...
    python train_actor.py recipes/qwen2.5-0.5b.yaml --output_dir checkpoints/mine   # a config file, flags override it
    torchrun --nproc_per_node 2 train_actor.py ...

See README.md for the data format, the flags and the outputs.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments
from transformers.training_args import ParallelMode

from callbacks import (InfoNCEProbeCallback, InterruptCallback, LatentConditionsCallback, LossLogCallback,
                       NonFiniteGuardCallback, StepsToReadCallback, use_metric_group_tensorboard)
from common.cli import (UserError, exit_process, last_checkpoint_note, parse_config_and_flags, run_cli,
                        save_interrupted, write_failure)
from common.constants import MODEL_MAX_LENGTH, PREPENDED_LENGTH
from common.models import EMBEDDED_MODEL, ModelNotFoundError, load_model_and_tokenizer
from common.runs import check_output_dir, check_resume_matches, run_fingerprint
from common.safe_io import check_model_folder
from common.validation import validate_files
from data import (ActorDataset, DataError, DatasetSource, LatentCollator, Source, build_hf_dataset, control_tokens,
                  split_train_eval)
from latent_head import (HEAD_FILE, LatentActor, load_head_file, packed_sequences_available, set_training_backends)
from losses import LossConfig
from training.trainer import LatentActorTrainer, resolve_resume

logger = logging.getLogger("train_actor")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-0.5B-Instruct", metadata={
        "help": f"Hub id or local folder of a causal LM; offline, {EMBEDDED_MODEL} is embedded."})
    prepended_length: int = field(default=PREPENDED_LENGTH, metadata={
        "help": "Latent rows used per sample (the first ones)."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads of the latent head's MHA."})
    plan_similarity_weight: float = field(default=LossConfig.plan_similarity_weight, metadata={
        "help": "Weight of 0.7 KL + 0.3 (1-cos)."})
    random_contrast_weight: float = field(default=LossConfig.random_contrast_weight, metadata={
        "help": "Weight of max(0, 0.69 - JS)."})
    mix_ratios: str = field(default=",".join(map(str, LossConfig.mix_ratios)), metadata={
        "help": "Comma-separated latent shares drawn per sample and step (rest of the block is plan text)."})
    pure_latent_prob: float = field(default=LossConfig.pure_latent_prob, metadata={
        "help": "Share of training samples that get pure latents (ratio 1), the condition used at inference."})
    negative_form: Literal["published", "latents_only"] = field(default="published", metadata={
        "help": "The contrast's negative branch. published: another sample's latents (cut or tiled to this "
                "sample's K) in this sample's latent rows, then this sample's own plan suffix, so it differs from "
                "the positive only in the latents; latents_only: the other sample's latents alone."})
    contrast_divergence: Literal["js", "published"] = field(default="js", metadata={
        "help": "js: max(0, 0.69 - JS) per position; published: max(0, 0.69 - (0.5 KL(M||P) + 0.5 KL(M||Q))) of "
                "each sample's mean distributions, as the public code computes it (needs --fused_loss false)."})
    loss_weighting: Literal["fixed", "adaptive"] = field(default="fixed", metadata={
        "help": "fixed: --plan_similarity_weight and --random_contrast_weight; adaptive: the public code's "
                "w_plan = 0.01 + 0.04 clip(L_plan/4), w_rand = 0.01 + 0.49 clip(L_rand/0.69) (needs --fused_loss false)."})
    head_warm_start_steps: int = field(default=300, metadata={
        "help": "Before training, fit the latent head for this many steps so that its row k matches the actor's "
                "embedding of plan token k (head only, no LM pass; assumes the sender tokenizes the plan as the "
                "actor does). Cuts the steps until the actor reads the latents from 'never in 120' to 10-80 "
                "(benchmarks/steps_to_read.py). 0: off."})
    head_warm_start_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the warm start."})
    head_dropout: float = field(default=0.1, metadata={"help": "Attention dropout of the latent head."})
    loss_chunk_size: int = field(default=LossConfig.loss_chunk_size, metadata={
        "help": "Supervised tokens per chunk when projecting to the vocabulary (bounds logits memory)."})
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
    packed_sequences: bool | None = field(default=None, metadata={
        "help": "Run each branch as one row of concatenated samples with variable-length flash attention "
                "(no padding, no attention mask). Default: on with CUDA + bf16/fp16 where torch has varlen_attn."})
    compile_layers: bool | None = field(default=None, metadata={
        "help": "torch.compile each decoder layer (dynamic shapes): fewer, fused kernels; 1.5-1.75x faster steps "
                "on an H100 (BENCHMARKS.md). Default: on with CUDA."})
    base_dtype: str = field(default="float32", metadata={
        "help": "dtype of the base model's weights: float32 (mixed precision keeps float32 master weights), "
                "or bfloat16 for a frozen LoRA base."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning). Head and new tokens stay trainable."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names to adapt, or all-linear."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flex_attention."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the model's folder."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "JSON, JSONL or {\"data\": [...]} records."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Instead of --train_file: a hub dataset id, or a local dataset folder or file, read with "
                "datasets.load_dataset (records as in a data file)."})
    dataset_split: str = field(default="train", metadata={"help": "The split of --dataset_name to train on."})
    eval_split: str | None = field(default=None, metadata={
        "help": "A split of --dataset_name held out for evaluation (else --eval_file or --eval_ratio)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out records (else see --eval_ratio)."})
    eval_ratio: float = field(default=0.0, metadata={"help": "Share of train_file held out when no eval_file."})
    lazy_preprocess: bool = field(default=False, metadata={"help": "Tokenize on access instead of up front."})
    model_max_length: int = field(default=MODEL_MAX_LENGTH, metadata={
        "help": "Longest sequence, latent block included."})


@dataclass
class ActorTrainingArguments(TrainingArguments):
    # Every parameter takes part in every step (the head too: samples without latents still pass it one
    # padded row), so DDP need not search the autograd graph for unused ones after each forward.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP's search for parameters without a gradient (off: none exist in this model)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    head_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the freshly initialised latent head (default: --learning_rate). Its output "
                "starts small (scale 0.2 x 0.1, as published); a higher rate lets it reach the size of the "
                "actor's token embeddings sooner."})
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
    remove_unused_columns: bool = False  # the batch carries latents and plans, not forward's named inputs
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])
    train_sampling_strategy: str = field(default="group_by_length", metadata={
        "help": "Batches of similar length waste less compute on padding."})
    load_best_model_at_end: bool | None = field(default=None, metadata={
        "help": "Default: on when evaluation and saving run on the same schedule."})
    enable_loss_plot: bool = field(default=True, metadata={"help": "Write loss_curve.png."})
    enable_infoNCE_probe: bool = field(default=False, metadata={"help": "Log the InfoNCE probe."})
    infoNCE_probe_interval: int = field(default=200, metadata={"help": "Steps between InfoNCE probes."})
    infoNCE_probe_samples: int = field(default=8, metadata={"help": "K samples scored against each other."})
    eval_latent_conditions: int = field(default=64, metadata={
        "help": "After each evaluation, CE under true/shuffled/none/plan-text latents on this many eval "
                "samples (0: off)."})
    stop_when_latents_read: bool = field(default=False, metadata={
        "help": "End training at the first evaluation where held-out true latents beat shuffled ones by >= 1 "
                "bit/token and >= 90%% of replies are the greedy prediction (logged as cond/steps_to_read)."})
    nonfinite_policy: str = field(default="skip", metadata={
        "help": "On a NaN/inf gradient: 'skip' drops that step's update, 'stop' ends training; both report it."})
    validate_only: bool = field(default=False, metadata={"help": "Check the data files and exit."})
    sender_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The model whose hidden states the latents are: named in the model card (README.md, pushed with "
                "--push_to_hub). Changes nothing in training."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train into an --output_dir that holds another run (its files are replaced); without it such a "
                "folder is refused."})

    @property
    def trains_on_gpu(self) -> bool:
        """A CUDA device is there and not refused (`--use_cpu`): what the auto-detected defaults follow."""
        return torch.cuda.is_available() and not self.use_cpu

    def __post_init__(self):
        if self.evaluation_strategy is not None:  # dropped by transformers 5; the seed's commands still use it
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:  # also dropped by transformers 5
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
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
        super().__post_init__()
        if self.n_gpu > 1:  # only in the single-process (DataParallel) mode
            # One process seeing several GPUs would mean nn.DataParallel, whose replicas cannot run the
            # three-branch step; use one GPU here and torchrun / accelerate launch for several.
            logger.warning("%d GPUs visible to one process: training on one. Use `torchrun --nproc_per_node "
                           "%d train_actor.py ...` to use all of them.", self._n_gpu, self._n_gpu)
            self._n_gpu = 1
        if not explicit_best and _schedules_match(self):
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "loss"
            self.greater_is_better = False if self.greater_is_better is None else self.greater_is_better


def _schedules_match(args: TrainingArguments) -> bool:
    """Best-model tracking needs a checkpoint at every evaluation."""
    if args.eval_strategy == "no" or args.save_strategy != args.eval_strategy or args.save_strategy == "best":
        return False
    return args.save_strategy != "steps" or args.save_steps % args.eval_steps == 0


def parse_args(argv: list[str] | None = None):
    return parse_config_and_flags((ModelArguments, DataArguments, ActorTrainingArguments), argv)


def data_sources(data_args: DataArguments) -> tuple[Source, Source | None]:
    """(training records, held-out records or None): files, or splits of --dataset_name."""
    if data_args.dataset_name:
        train = DatasetSource(data_args.dataset_name, data_args.dataset_split)
        held_out = DatasetSource(data_args.dataset_name, data_args.eval_split) if data_args.eval_split else None
        return train, held_out or data_args.eval_file or None
    return data_args.train_file, data_args.eval_file or None


def build_datasets(data_args: DataArguments, seed: int):
    train_source, eval_source = data_sources(data_args)
    train = build_hf_dataset(train_source)
    evaluation = build_hf_dataset(eval_source) if eval_source else None
    if evaluation is None and data_args.eval_ratio > 0:
        train, evaluation = split_train_eval(train, data_args.eval_ratio, seed)
    return train, evaluation


def _tokenizer_for_checks(model_args: ModelArguments):
    """The tokenizer alone (no weights): lets --validate_only check chat templates and lengths."""
    from transformers import AutoTokenizer

    from common.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_args.model_name_or_path),
                                         trust_remote_code=model_args.trust_remote_code)


def parse_mix_ratios(text: str) -> tuple[float, ...]:
    """`--mix_ratios` as numbers in [0, 1]; a `ValueError` saying what is wrong otherwise."""
    try:
        ratios = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--mix_ratios {text!r}: expected comma-separated numbers in [0, 1], e.g. 0.2,0.5,0.8") \
            from None
    if not ratios or not all(0 <= r <= 1 for r in ratios):
        raise ValueError(f"--mix_ratios {text!r}: expected comma-separated numbers in [0, 1], e.g. 0.2,0.5,0.8")
    return ratios


def check_data_source(data_args: DataArguments) -> None:
    """Exactly one of --train_file and --dataset_name; --eval_split only with --dataset_name."""
    if bool(data_args.train_file) == bool(data_args.dataset_name):
        raise UserError("--train_file or --dataset_name is required (one of them)" if not data_args.train_file else
                        "--train_file and --dataset_name both given; expected one of them")
    if data_args.eval_split and not data_args.dataset_name:
        raise UserError("--eval_split names a split of --dataset_name; with --train_file use --eval_file")
    if data_args.eval_split and data_args.eval_file:
        raise UserError("--eval_split and --eval_file both given; expected one of them")


# The Trainer applies Liger's kernels only to a PreTrainedModel (this actor is a wrapper: it would log a warning and
# apply nothing), and Liger's gain is its fused linear cross-entropy, which never runs here: the actor projects to
# the vocabulary and computes every loss itself. Its other kernels fail under Triton's CPU interpreter (RMSNorm,
# liger-kernel 0.8.5), so they cannot be tested here, nor were they measured on a GPU: refused, not ignored.
LIGER_REFUSAL = ("--use_liger_kernel is not supported: the actor computes its losses itself (losses.py, --fused_loss), "
                 "so Liger's fused linear cross-entropy would never run, and its other kernels are unmeasured for this "
                 "trainer; for speed use --compile_layers and --loss_kernel triton (BENCHMARKS.md)")


def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: ActorTrainingArguments) -> None:
    """Argument errors found from the flags alone, before any file is read."""
    check_data_source(data_args)
    if args.use_liger_kernel:
        raise UserError(LIGER_REFUSAL)
    try:
        parse_mix_ratios(model_args.mix_ratios)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.nonfinite_policy not in ("skip", "stop"):
        raise UserError(f"--nonfinite_policy {args.nonfinite_policy!r}: expected skip or stop")
    for name, value, ok, expected in (
            ("pure_latent_prob", model_args.pure_latent_prob, 0 <= model_args.pure_latent_prob <= 1, "[0, 1]"),
            ("head_dropout", model_args.head_dropout, 0 <= model_args.head_dropout < 1, "[0, 1)"),
            ("eval_ratio", data_args.eval_ratio, 0 <= data_args.eval_ratio < 1, "[0, 1)")):
        if not ok:
            raise UserError(f"--{name} {value}: expected a number in {expected}")
    for name in ("plan_similarity_weight", "random_contrast_weight"):
        value = getattr(model_args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"--{name} {value}: expected a finite number >= 0")
    if model_args.prepended_length < 1 or model_args.num_heads < 1:
        raise UserError("--prepended_length and --num_heads must be at least 1")
    if data_args.model_max_length <= model_args.prepended_length + 1:
        raise UserError(f"--model_max_length {data_args.model_max_length} leaves no room for a conversation: the "
                        f"latent block takes prepended_length {model_args.prepended_length} + 2 of it; raise it")
    if not isinstance(getattr(torch, model_args.base_dtype, None), torch.dtype):
        raise UserError(f"--base_dtype {model_args.base_dtype!r}: expected a torch dtype such as float32 or bfloat16")


def check_model_width(model_args: ModelArguments) -> None:
    """`--num_heads` divides the model's width, read from its config file (no weights loaded)."""
    try:
        from transformers import AutoConfig

        from common.models import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(model_args.model_name_or_path),
                                            trust_remote_code=model_args.trust_remote_code)
    except ModelNotFoundError as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError) as e:
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: cannot read its config "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") \
            from None
    width = getattr(config.get_text_config(), "hidden_size", None)
    if width and width % model_args.num_heads:
        raise UserError(f"--num_heads {model_args.num_heads} must divide the model's hidden size {width}")


def check_data(model_args: ModelArguments, data_args: DataArguments, args: ActorTrainingArguments):
    """Validate arguments and every record before any model is loaded; returns (report, checkpoint to
    resume or None)."""
    check_arguments(model_args, data_args, args)
    try:
        resolve_auto_settings(model_args, args)
        loss_config(model_args).check_loss_path()
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.fsdp:
        if model_args.lora_r:
            raise UserError("--fsdp with --lora_r is not supported: LoRA's adapters are small enough for DDP "
                            "(torchrun without --fsdp); FSDP shards full fine-tuning")
        if args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise UserError("--fsdp shards the model over several processes: launch with torchrun "
                            "--nproc_per_node N (or accelerate launch); one process trains without it")
        if "SHARDED_STATE_DICT" in str(args.fsdp_config.get("state_dict_type", "")):
            raise UserError("--fsdp_config state_dict_type SHARDED_STATE_DICT is not supported: the output folder "
                            "must reload on one process; use FULL_STATE_DICT (the default)")
    check_model_width(model_args)
    try:
        if not args.validate_only:  # never mix two runs in one folder (common/runs.py)
            check_output_dir(args.output_dir, resuming=bool(args.resume_from_checkpoint) and
                             args.resume_from_checkpoint.lower() not in ("false", "none"),
                             overwrite=args.overwrite_output_dir)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        tokenizer = _tokenizer_for_checks(model_args)
        resumed_width = None
        if resume:
            check_model_folder(resume, "--resume_from_checkpoint")  # every artifact reads safely, up front
            check_resume_matches(resume, run_fingerprint(model_args, data_args, args))
            # A resumed head was built for one latent width: data of another width is an error up front.
            resumed_width = load_head_file(os.path.join(resume, HEAD_FILE))["config"]["latent_dim"]
    except (FileNotFoundError, ModelNotFoundError, ValueError, OSError) as e:  # DataError is a ValueError
        raise UserError(str(e)) from None
    # Full tokenization checks with --validate_only; training refuses control tokens in the data up front and
    # tokenizes (cached) while building its datasets.
    report = validate_files([f for f in data_sources(data_args) if f],
                            tokenizer=tokenizer if args.validate_only else None,
                            control_strings=control_tokens(tokenizer),
                            model_max_length=data_args.model_max_length,
                            prepended_length=model_args.prepended_length, expected_latent_dim=resumed_width)
    if args.should_log or args.validate_only:  # every rank validates (and stops together); one prints
        print(report.format(max_per_kind=None if args.validate_only else 20),
              file=sys.stdout if report.ok else sys.stderr)
    if not report.ok:
        raise UserError("the data files have errors (listed above); nothing was trained", status=1)
    return report, resume


def resolve_auto_settings(model_args: ModelArguments, args: ActorTrainingArguments) -> dict:
    """Decide every setting left "auto" for this machine, once, before anything is built, and log them in one
    line. The Trainer's own (precision, data loader workers, best model) are decided when the arguments are
    parsed (`ActorTrainingArguments.__post_init__`: transformers checks them there); they are logged here too."""
    # Speed options are on where they pay: on CUDA (packed rows: flash varlen attention on bf16/fp16 rows).
    if model_args.packed_sequences is None:
        model_args.packed_sequences = packed_sequences_available() and (args.bf16 or args.fp16)
    if model_args.compile_layers is None:  # not under FSDP: its hooks around each layer are not compiled with it
        model_args.compile_layers = torch.cuda.is_available() and not args.fsdp
    if args.fsdp and (args.bf16 or args.fp16) and args.fsdp_plugin_args.get("fsdp_version") == 2 \
            and "mixed_precision_policy" not in args.fsdp_plugin_args:
        args.fsdp_plugin_args["mixed_precision_policy"] = fsdp2_mixed_precision_policy(
            torch.bfloat16 if args.bf16 else torch.float16)
    loss = loss_config(model_args).resolved("cuda" if args.trains_on_gpu else "cpu", args.bf16)
    model_args.loss_kernel, model_args.loss_matmul_dtype = loss.loss_kernel, loss.loss_matmul_dtype
    settings = {"bf16": args.bf16, "fp16": args.fp16, "packed_sequences": model_args.packed_sequences,
                "compile_layers": model_args.compile_layers, "loss_kernel": model_args.loss_kernel,
                "loss_matmul_dtype": model_args.loss_matmul_dtype,
                "dataloader_num_workers": args.dataloader_num_workers,
                "dataloader_pin_memory": args.dataloader_pin_memory,
                "load_best_model_at_end": args.load_best_model_at_end}
    if "mixed_precision_policy" in (args.fsdp_plugin_args or {}):
        settings["fsdp_mixed_precision"] = args.fsdp_plugin_args["mixed_precision_policy"]
    if args.should_log:
        logger.info("Settings: %s", ", ".join(f"{k}={v}" for k, v in settings.items()))
    return settings


def fsdp2_mixed_precision_policy(dtype: torch.dtype):
    """FSDP2's policy under --bf16/--fp16: parameters gathered and gradients reduced in `dtype`, as accelerate
    sets it, but outputs left as computed. Accelerate's own policy also casts each sharded module's output to
    `dtype`, which would round the float32 `LossSums` the model returns (the loss and every logged metric)
    to three significant digits."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=None)


def loss_config(model_args: ModelArguments) -> LossConfig:
    return LossConfig(
        plan_similarity_weight=model_args.plan_similarity_weight,
        random_contrast_weight=model_args.random_contrast_weight,
        mix_ratios=parse_mix_ratios(model_args.mix_ratios),
        pure_latent_prob=model_args.pure_latent_prob, loss_chunk_size=model_args.loss_chunk_size or None,
        fused_loss=model_args.fused_loss, loss_kernel=model_args.loss_kernel,
        loss_matmul_dtype=model_args.loss_matmul_dtype, negative_form=model_args.negative_form,
        contrast_divergence=model_args.contrast_divergence, loss_weighting=model_args.loss_weighting)


class RecordAtTrainBegin(TrainerCallback):
    """Puts one entry in the log history (hence loss_log.csv) when training begins."""

    def __init__(self, entry: dict):
        self.entry = entry

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history.append(self.entry)


def warm_start(trainer: LatentActorTrainer, model_args: ModelArguments, args: ActorTrainingArguments) -> None:
    """`--head_warm_start_steps`: fit the head to the actor's plan-token embeddings (see training/warm_start.py) on
    shuffled training batches; every rank does the same (seeded), so the ranks start equal."""
    from torch.utils.data import DataLoader

    from training.warm_start import warm_start_head

    actor: LatentActor = trainer.model
    device = args.device
    actor.to(device)
    loader = DataLoader(trainer.train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                        collate_fn=trainer.data_collator,
                        generator=torch.Generator().manual_seed(args.seed))
    metrics = warm_start_head(actor.head, actor.base_model.get_input_embeddings(), loader,
                              model_args.head_warm_start_steps, model_args.head_warm_start_lr, device)
    trainer.add_callback(RecordAtTrainBegin({"step": 0, **metrics}))  # train() starts a fresh log history


def build_actor(model_args: ModelArguments, latent_dim: int | None, seed: int) -> LatentActor:
    """Base model + special tokens + a fresh latent head (+ LoRA adapters when asked)."""
    transformers.set_seed(seed)  # the head's and the new token embeddings' initialisation
    try:
        base, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path,
                                                   dtype=getattr(torch, model_args.base_dtype),
                                                   trust_remote_code=model_args.trust_remote_code,
                                                   attn_implementation=model_args.attn_implementation)
    except ModelNotFoundError as e:
        raise UserError(str(e)) from None
    actor = LatentActor.from_base(base, tokenizer, latent_dim=latent_dim, num_heads=model_args.num_heads,
                                  prepended_length=model_args.prepended_length, dropout=model_args.head_dropout)
    actor.use_packed_sequences(bool(model_args.packed_sequences))
    if model_args.compile_layers:
        actor.compile_layers()
    if model_args.lora_r:
        targets = model_args.lora_target_modules
        actor.add_lora(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                       targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    return actor


def build_trainer(actor: LatentActor, model_args: ModelArguments, data_args: DataArguments,
                  args: ActorTrainingArguments) -> LatentActorTrainer:
    """Datasets, collator, loss configuration and callbacks around a `LatentActorTrainer`."""
    train_rows, eval_rows = build_datasets(data_args, args.data_seed or args.seed)
    datasets = {name: ActorDataset(rows, actor.tokenizer, data_args.model_max_length, model_args.prepended_length,
                                   lazy=data_args.lazy_preprocess)
                for name, rows in (("train", train_rows), ("eval", eval_rows)) if rows is not None}
    trainer = LatentActorTrainer(
        model=actor, args=args, train_dataset=datasets["train"], eval_dataset=datasets.get("eval"),
        data_collator=LatentCollator(actor.pad_id, actor.head.config.latent_dim),
        processing_class=actor.tokenizer, loss_config=loss_config(model_args),
        callbacks=[LossLogCallback(args.output_dir, plot=args.enable_loss_plot)])
    trainer.card_info = {"base_model": model_args.model_name_or_path, "sender_model": args.sender_model_name_or_path}
    use_metric_group_tensorboard(trainer)
    if args.enable_infoNCE_probe:
        probe_set = datasets.get("eval") or datasets["train"]
        k = min(args.infoNCE_probe_samples, len(probe_set))
        trainer.add_callback(InfoNCEProbeCallback(trainer, [probe_set[i] for i in range(k)],
                                                  args.infoNCE_probe_interval))
    trainer.nonfinite_guard = NonFiniteGuardCallback(trainer, args.nonfinite_policy)
    trainer.add_callback(trainer.nonfinite_guard)
    if args.eval_latent_conditions and "eval" in datasets:
        trainer.add_callback(LatentConditionsCallback(trainer, args.eval_latent_conditions))
        trainer.steps_to_read = StepsToReadCallback(stop=args.stop_when_latents_read)
        trainer.add_callback(trainer.steps_to_read)
    return trainer


def train(model_args: ModelArguments, data_args: DataArguments, args: ActorTrainingArguments,
          callbacks: list[TrainerCallback] = (), save_final_model: bool = True) -> int:
    """Check, build, train, save. `callbacks`: more `TrainerCallback`s (e.g. benchmarks/bench.py's step timer);
    `save_final_model` False: leave out the final model (a benchmark measures steps, not saving)."""
    report, resume = check_data(model_args, data_args, args)
    if args.validate_only:
        return 0
    for setting in set_training_backends():
        logger.info("Training backend: %s", setting)
    actor = build_actor(model_args, report.latent_dim, args.seed)
    try:
        trainer = build_trainer(actor, model_args, data_args, args)
    except DataError as e:  # found while tokenizing: e.g. no sample fits --model_max_length
        raise UserError(str(e), status=1) from None
    trainer.run_fingerprint = run_fingerprint(model_args, data_args, args)  # into every checkpoint (common/runs.py)
    for callback in callbacks:
        trainer.add_callback(callback)
    if model_args.head_warm_start_steps > 0 and resume is None:
        warm_start(trainer, model_args, args)
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except DataError as e:  # a latent file that broke mid-run: keep what was trained
        raise save_interrupted(trainer, e, args.output_dir, "the model") from None
    except Exception as e:  # a checkpoint or log that could not be written (full disk, permissions)
        if not (failure := write_failure(e)):
            raise
        raise UserError(f"training stopped at step {trainer.state.global_step}: writing failed: {failure}; "
                        f"{last_checkpoint_note(args.output_dir)}", status=1) from None
    finally:
        interrupt.restore()
    if interrupt.interrupted:
        raise UserError(f"interrupted (Ctrl-C) after step {trainer.state.global_step}: "
                        f"{last_checkpoint_note(args.output_dir)}", status=130)
    if save_final_model:
        actor.merge_lora()  # the final folder is a plain HF model + head, whatever the training mode
        try:
            trainer.save_model(args.output_dir)  # staged: on failure the folder's earlier model is untouched
            trainer.save_state()
            if trainer.is_world_process_zero():
                actor.tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))
        except Exception as e:
            if not (failure := write_failure(e)):
                raise
            raise UserError(f"saving the final model into {args.output_dir} failed: {failure}; the model "
                            f"the folder held before is unchanged; {last_checkpoint_note(args.output_dir)}",
                            status=1) from None
    return finish_run(trainer, args.output_dir)


def finish_run(trainer, output_dir: str) -> int:
    """After the final save: refuse a run stopped by a non-finite gradient, else evaluate the final model."""
    if trainer.nonfinite_guard.stopped:
        raise UserError(f"training stopped at step {trainer.state.global_step} on a non-finite gradient (see the "
                        f"log); the weights saved in {output_dir} never received it", status=1)
    if trainer.eval_dataset is not None:
        trainer.evaluate()
    return 0


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] = (), save_final_model: bool = True) -> int:
    """The command line: `argv` (default sys.argv); `callbacks`/`save_final_model` as in `train`."""
    return run_cli(parse_args, lambda *parsed: train(*parsed, callbacks, save_final_model), argv)


def cli() -> None:
    """The `interlat-train` console command (ends the (torchrun) process cleanly)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
