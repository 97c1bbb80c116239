"""From parsed arguments to a ready `LatentActorTrainer` (train_actor.py's steps): the checks before any model is
loaded, the settings decided for this machine, the datasets, the actor, the trainer with its callbacks, the head's
warm start, and the final save. sender/train.py shares the data part (`data_sources`, `build_datasets`)."""
from __future__ import annotations

import logging
import os
import sys

import torch
import transformers
from transformers import TrainerCallback
from transformers.training_args import ParallelMode

from callbacks import (InfoNCEProbeCallback, LatentConditionsCallback, LossLogCallback, NonFiniteGuardCallback,
                       StepsToReadCallback, use_metric_group_tensorboard)
from common.args import DEFAULT_ACTOR_MODEL, ActorArguments, DataArguments
from common.cli import UserError, last_checkpoint_note, write_failure
from common.model_card import run_card_info
from common.models import ModelNotFoundError, load_model_and_tokenizer, resolve_model
from common.runs import check_output_dir, check_resume_matches, run_fingerprint
from common.safe_io import check_model_folder
from common.training_args import ActorTrainingArguments
from common.validation import Report, validate_files
from data import (ActorDataset, DataError, DatasetSource, LatentCollator, Source, build_hf_dataset, control_tokens,
                  split_train_eval)
from latent_head import HEAD_FILE, LatentActor, load_head_file, packed_sequences_available
from losses import LossConfig
from training.trainer import HubError, LatentActorTrainer, hub_push_problem, resolve_resume

logger = logging.getLogger("train_actor")


# ---------------------------------------------------------------------------------------------
# Data (both training scripts)
# ---------------------------------------------------------------------------------------------
def data_sources(data_args: DataArguments) -> tuple[Source, Source | None]:
    """(training records, held-out records or None): files, or splits of --dataset_name."""
    if data_args.dataset_name:
        train = DatasetSource(data_args.dataset_name, data_args.dataset_split)
        held_out = DatasetSource(data_args.dataset_name, data_args.eval_split) if data_args.eval_split else None
        return train, held_out or data_args.eval_file or None
    return data_args.train_file, data_args.eval_file or None


def build_datasets(data_args: DataArguments, seed: int):
    """(train, eval or None) `datasets.Dataset`s of normalised records; --eval_ratio splits the training records."""
    train_source, eval_source = data_sources(data_args)
    train = build_hf_dataset(train_source)
    evaluation = build_hf_dataset(eval_source) if eval_source else None
    if evaluation is None and data_args.eval_ratio > 0:
        train, evaluation = split_train_eval(train, data_args.eval_ratio, seed)
    return train, evaluation


def print_report(report: Report, args, structure_only: bool = False) -> None:
    """The validation report: in full with --validate_only, else its first lines per kind (one rank prints)."""
    if args.should_log or args.validate_only:  # every rank validates (and stops together); one prints
        stream = sys.stdout if report.ok else sys.stderr
        print(report.format(max_per_kind=None if args.validate_only else 20), file=stream)
        if structure_only:
            print("note: no --model_name_or_path given: the files' structure and latents were checked; the chat "
                  "template and the lengths need the model's tokenizer (--model_name_or_path NAME)", file=stream)
    if not report.ok:
        raise UserError("the data files have errors (listed above); nothing was trained", status=1)


# ---------------------------------------------------------------------------------------------
# Checks: everything refused before a model is loaded
# ---------------------------------------------------------------------------------------------
def check_arguments(model_args: ActorArguments, data_args: DataArguments, args: ActorTrainingArguments) -> None:
    """Argument errors found from the flags alone that span groups (each group checks itself when parsed)."""
    try:
        data_args.check_source()
        LossConfig.from_arguments(model_args).check_loss_path()
    except ValueError as e:
        raise UserError(str(e)) from None
    if data_args.model_max_length <= model_args.prepended_length + 1:
        raise UserError(f"--model_max_length {data_args.model_max_length} leaves no room for a conversation: the "
                        f"latent block takes prepended_length {model_args.prepended_length} + 2 of it; raise it")
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


def check_model_width(model_args: ActorArguments) -> None:
    """`--num_heads` divides the model's width, read from its config file (no weights loaded)."""
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model(model_args.model_name_or_path),
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


def check_inputs(model_args: ActorArguments, data_args: DataArguments, args: ActorTrainingArguments):
    """Validate the arguments, the output folder, the checkpoint to resume and every record before any model is
    loaded; returns (the validation report, the checkpoint to resume or None). --validate_only without
    --model_name_or_path checks the files' structure only (no model, no tokenizer)."""
    check_arguments(model_args, data_args, args)
    structure_only = args.validate_only and model_args.model_name_or_path is None
    if not structure_only:
        model_args.model_name_or_path = model_args.model_name_or_path or DEFAULT_ACTOR_MODEL
        try:
            resolve_auto_settings(model_args, args)
        except ValueError as e:
            raise UserError(str(e)) from None
        check_model_width(model_args)
    try:
        if not args.validate_only:  # never mix two runs in one folder (common/runs.py)
            check_output_dir(args.output_dir, resuming=bool(args.resume_from_checkpoint) and
                             args.resume_from_checkpoint.lower() not in ("false", "none"),
                             overwrite=args.overwrite_output_dir)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
        tokenizer = None if structure_only else transformers.AutoTokenizer.from_pretrained(
            resolve_model(model_args.model_name_or_path), trust_remote_code=model_args.trust_remote_code)
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
    print_report(report, args, structure_only)
    if args.push_to_hub and not args.validate_only and (problem := hub_push_problem()):  # before the model loads
        raise UserError(problem)
    return report, resume


# ---------------------------------------------------------------------------------------------
# Settings decided for this machine
# ---------------------------------------------------------------------------------------------
def resolve_auto_settings(model_args: ActorArguments, args: ActorTrainingArguments) -> dict:
    """Decide every setting left "auto" for this machine, once, before anything is built, and log them in one
    line. The Trainer's own (precision, data loader workers, best model) are decided when the arguments are
    parsed (`common.args.TrainingOptions.__post_init__`: transformers checks them there); they are logged here too."""
    # Speed options are on where they pay: on CUDA (packed rows: flash varlen attention on bf16/fp16 rows).
    if model_args.packed_sequences is None:
        model_args.packed_sequences = packed_sequences_available() and (args.bf16 or args.fp16)
    if model_args.compile_layers is None:  # not under FSDP: its hooks around each layer are not compiled with it
        model_args.compile_layers = torch.cuda.is_available() and not args.fsdp
    if model_args.cuda_graphs and not (model_args.compile_layers and model_args.packed_sequences):
        raise ValueError("--cuda_graphs replays the compiled layers on packed rows: it needs --compile_layers and "
                         "--packed_sequences (CUDA, bf16/fp16)")
    if args.fsdp and (args.bf16 or args.fp16) and args.fsdp_plugin_args.get("fsdp_version") == 2 \
            and "mixed_precision_policy" not in args.fsdp_plugin_args:
        args.fsdp_plugin_args["mixed_precision_policy"] = fsdp2_mixed_precision_policy(
            torch.bfloat16 if args.bf16 else torch.float16)
    loss = LossConfig.from_arguments(model_args).resolved("cuda" if args.trains_on_gpu else "cpu", args.bf16)
    model_args.loss_kernel, model_args.loss_matmul_dtype = loss.loss_kernel, loss.loss_matmul_dtype
    settings = {"bf16": args.bf16, "fp16": args.fp16, "packed_sequences": model_args.packed_sequences,
                "compile_layers": model_args.compile_layers, "cuda_graphs": model_args.cuda_graphs,
                "loss_kernel": model_args.loss_kernel,
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


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def build_actor(model_args: ActorArguments, latent_dim: int | None, seed: int) -> LatentActor:
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
        actor.compile_layers(cuda_graphs=model_args.cuda_graphs)
    if model_args.lora_r:
        targets = model_args.lora_target_modules
        actor.add_lora(model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                       targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    return actor


def build_trainer(actor: LatentActor, model_args: ActorArguments, data_args: DataArguments,
                  args: ActorTrainingArguments, callbacks: list[TrainerCallback] = ()) -> LatentActorTrainer:
    """Datasets, collator, loss configuration and callbacks around a `LatentActorTrainer`; `callbacks`: more
    `TrainerCallback`s (e.g. benchmarks/bench.py's step timer)."""
    try:
        train_rows, eval_rows = build_datasets(data_args, args.data_seed or args.seed)
        datasets = {name: ActorDataset(rows, actor.tokenizer, data_args.model_max_length,
                                       model_args.prepended_length, lazy=data_args.lazy_preprocess)
                    for name, rows in (("train", train_rows), ("eval", eval_rows)) if rows is not None}
    except DataError as e:  # found while tokenizing: e.g. no sample fits --model_max_length
        raise UserError(str(e), status=1) from None
    try:
        trainer = LatentActorTrainer(
            model=actor, args=args, train_dataset=datasets["train"], eval_dataset=datasets.get("eval"),
            data_collator=LatentCollator(actor.pad_id, actor.head.config.latent_dim),
            processing_class=actor.tokenizer, loss_config=LossConfig.from_arguments(model_args),
            callbacks=[LossLogCallback(args.output_dir, plot=args.enable_loss_plot)])
    except HubError as e:  # --push_to_hub: the Trainer creates the repository when it is built
        raise UserError(str(e)) from None
    trainer.card_info = run_card_info(model_args, data_args, args)  # the model card's (README.md) facts
    trainer.run_fingerprint = run_fingerprint(model_args, data_args, args)  # into every checkpoint (common/runs.py)
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
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


class RecordAtTrainBegin(TrainerCallback):
    """Puts one entry in the log history (hence loss_log.csv) when training begins."""

    def __init__(self, entry: dict):
        self.entry = entry

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history.append(self.entry)


def warm_start(trainer: LatentActorTrainer, model_args: ActorArguments, args: ActorTrainingArguments) -> None:
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
                              model_args.head_warm_start_steps, model_args.head_warm_start_lr, device,
                              progress=not args.disable_tqdm and args.local_process_index == 0)  # as the Trainer's bars
    trainer.add_callback(RecordAtTrainBegin({"step": 0, **metrics}))  # train() starts a fresh log history


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def save_actor(trainer: LatentActorTrainer, output_dir: str) -> None:
    """The final folder: a plain HF model (LoRA merged) + the head + the tokenizer, staged so that a failed save
    leaves the folder's earlier model untouched (a one-line `UserError` then)."""
    actor: LatentActor = trainer.model
    actor.merge_lora()  # the final folder is a plain HF model + head, whatever the training mode
    try:
        trainer.save_model(output_dir)  # staged: on failure the folder's earlier model is untouched
        trainer.save_state()
        if trainer.is_world_process_zero():
            actor.tokenizer.save_pretrained(os.path.join(output_dir, "tokenizer"))
    except Exception as e:
        if not (failure := write_failure(e)):
            raise
        raise UserError(f"saving the final model into {output_dir} failed: {failure}; the model "
                        f"the folder held before is unchanged; {last_checkpoint_note(output_dir)}", status=1) from None
