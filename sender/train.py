"""Compression: train the sender to speak in K latents to a trained, frozen actor.

    python -m sender.train --actor_dir checkpoints/actor --model_name_or_path SENDER \
        --train_file data/train.jsonl --output_dir checkpoints/sender --num_latents 8 ...
    python -m sender.train config.yaml [--flag value ...]   # a YAML/JSON config file, flags override it
    torchrun --nproc_per_node 2 sender/train.py ...

The data files are train_actor.py's (conversations + data latents of the written plans). The
student starts from the sender model (the one whose hidden states the actor was trained on);
student, bridge and start vector are trained, the actor is not. The output folder is the sender
(student weights + tokenizer + `latent_sender.pt`), `loss_log.csv`, `loss_curve.png` and checkpoints;
`sender/collect.py --mode compressed --sender_dir` writes its messages. See README.md.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoTokenizer

from callbacks import LossLogCallback, NonFiniteGuardCallback
from common.cli import UserError, exit_process, parse_config_and_flags, run_cli, save_interrupted
from common.models import EMBEDDED_MODEL, ModelNotFoundError, load_model_and_tokenizer
from common.validation import validate_files
from data import ActorDataset, DataError
from latent_head import HEAD_FILE, LatentActor, load_head_file, set_training_backends
from losses import (COMPRESSION_ALIGN_WEIGHT, COMPRESSION_KL_WEIGHT, DISTILL_TEMPERATURE, DISTILL_WINDOW,
                    LOSS_CHUNK_SIZE, UNCERTAINTY_QUANTILE)
from sender.model import (KNOWLEDGE, REQUEST, SENDER_FILE, CompressionLossConfig, CompressionModel, LatentSender,
                          SenderCollator, SenderConfig, SenderDataset)
from sender.trainer import SenderTrainer
from train_actor import (LIGER_REFUSAL, ActorTrainingArguments, DataArguments, build_datasets, check_data_source,
                         data_sources, finish_run)
from training.trainer import resolve_resume

logger = logging.getLogger("train_sender")
UNUSED = {"help": "(train_actor.py only; unused here)"}


@dataclass
class SenderArguments:
    actor_dir: str | None = field(default=None, metadata={
        "help": "An output folder of train_actor.py: the actor the sender learns to speak to (frozen)."})
    model_name_or_path: str = field(default=EMBEDDED_MODEL, metadata={
        "help": "The sender model the student starts from: the one whose hidden states the actor was trained on."})
    num_latents: int = field(default=8, metadata={"help": "K: latent steps per message."})
    request: str = field(default=REQUEST, metadata={"help": "Fixed text before the conversation in the student's context."})
    sender_knowledge: str = field(default="none", metadata={
        "help": "What the student reads besides the conversation: none (as published: the task alone) or plan "
                "(the record's plan as private notes, for tasks whose plan holds knowledge the task lacks)."})
    kl_weight: float = field(default=COMPRESSION_KL_WEIGHT, metadata={"help": "Weight of the distillation KL."})
    alignment_weight: float = field(default=COMPRESSION_ALIGN_WEIGHT, metadata={"help": "Weight of 1 - cos alignment."})
    distill_temperature: float = field(default=DISTILL_TEMPERATURE, metadata={"help": "Temperature T of the KL (x T^2)."})
    distill_window: int = field(default=DISTILL_WINDOW, metadata={
        "help": "Supervised tokens per sample (the first ones) that the distillation KL covers."})
    uncertainty_quantile: float = field(default=UNCERTAINTY_QUANTILE, metadata={
        "help": "Token weights relu(H_none - H_data) are clipped at this quantile of the positive ones."})
    loss_chunk_size: int = field(default=LOSS_CHUNK_SIZE, metadata={"help": "Supervised tokens per vocabulary projection (CE)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "The student's, e.g. sdpa or eager."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the model's folder."})


@dataclass
class SenderTrainingArguments(ActorTrainingArguments):
    """train_actor.py's training arguments (aliases, auto-detected precision and loader workers, best model);
    its actor-only options stay accepted but do nothing here."""

    head_learning_rate: float | None = field(default=None, metadata=UNUSED)
    enable_infoNCE_probe: bool = field(default=False, metadata=UNUSED)
    infoNCE_probe_interval: int = field(default=200, metadata=UNUSED)
    infoNCE_probe_samples: int = field(default=8, metadata=UNUSED)
    eval_latent_conditions: int = field(default=0, metadata=UNUSED)
    sender_model_name_or_path: str | None = field(default=None, metadata=UNUSED)


def parse_args(argv: list[str] | None = None):
    """Flags, or a YAML/JSON config file first and flags overriding it (as train_actor.py)."""
    return parse_config_and_flags((SenderArguments, DataArguments, SenderTrainingArguments), argv)


def check_inputs(sender_args: SenderArguments, data_args: DataArguments, args: SenderTrainingArguments):
    """Everything that can be refused before a model is loaded; returns (head config, resume)."""
    check_data_source(data_args)
    if not sender_args.actor_dir:
        raise UserError("--actor_dir is required: an output folder of train_actor.py (the frozen actor)")
    if not os.path.exists(os.path.join(sender_args.actor_dir, HEAD_FILE)):
        raise UserError(f"--actor_dir {sender_args.actor_dir}: no {HEAD_FILE} here; is this an output folder of "
                        "train_actor.py?")
    if args.use_liger_kernel:
        raise UserError(LIGER_REFUSAL)
    if args.fsdp:
        raise UserError("--fsdp is not supported by sender/train.py: use DDP (torchrun without --fsdp)")
    if args.push_to_hub:  # the trainer's hub hooks and model card are the actor's
        raise UserError("--push_to_hub is not supported by sender/train.py: upload the output folder with "
                        "huggingface-cli upload")
    if args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing is not supported by sender/train.py: the student's rollout "
                        "needs its KV cache")
    if sender_args.sender_knowledge not in KNOWLEDGE:
        raise UserError(f"--sender_knowledge {sender_args.sender_knowledge}: expected one of {', '.join(KNOWLEDGE)}")
    head = load_head_file(os.path.join(sender_args.actor_dir, HEAD_FILE))["config"]
    k = sender_args.num_latents
    if not 1 <= k <= head["prepended_length"]:
        raise UserError(f"--num_latents {k}: must be between 1 and the actor's prepended_length "
                        f"({head['prepended_length']}, the most latent rows its head reads)")
    try:
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, weights_file=SENDER_FILE)
        # The data are tokenized with the actor's tokenizer (it holds the special tokens already).
        check_tokenizer = AutoTokenizer.from_pretrained(sender_args.actor_dir) if args.validate_only else None
    except (FileNotFoundError, ModelNotFoundError) as e:
        raise UserError(str(e)) from None
    report = validate_files([f for f in data_sources(data_args) if f], tokenizer=check_tokenizer,
                            model_max_length=data_args.model_max_length, prepended_length=head["prepended_length"],
                            expected_latent_dim=head["latent_dim"])
    if args.should_log or args.validate_only:
        print(report.format(max_per_kind=None if args.validate_only else 20),
              file=sys.stdout if report.ok else sys.stderr)
    if not report.ok:
        raise UserError("the data files have errors (listed above); nothing was trained", status=1)
    return head, resume


def build_model(sender_args: SenderArguments, head: dict, seed: int) -> CompressionModel:
    """The frozen actor from --actor_dir and a fresh sender (student = the sender model, new bridge)."""
    actor = LatentActor.from_pretrained(sender_args.actor_dir, dtype=torch.float32)
    transformers.set_seed(seed)  # the bridge's and start vector's initialisation
    try:
        student, tokenizer = load_model_and_tokenizer(sender_args.model_name_or_path, dtype=torch.float32,
                                                      trust_remote_code=sender_args.trust_remote_code,
                                                      attn_implementation=sender_args.attn_implementation)
    except ModelNotFoundError as e:
        raise UserError(str(e)) from None
    width = student.get_input_embeddings().weight.shape[1]
    if width != head["latent_dim"]:
        raise UserError(f"--model_name_or_path {sender_args.model_name_or_path}: hidden size {width}, but the actor "
                        f"in {sender_args.actor_dir} reads latents of width {head['latent_dim']}; the student must "
                        "be the sender whose hidden states the actor was trained on")
    config = SenderConfig(num_latents=sender_args.num_latents, request=sender_args.request,
                          knowledge=sender_args.sender_knowledge,
                          actor_dir=os.path.abspath(sender_args.actor_dir))
    return CompressionModel(LatentSender(student, tokenizer, config), actor)


def build_trainer(model: CompressionModel, sender_args: SenderArguments, data_args: DataArguments,
                  args: SenderTrainingArguments) -> SenderTrainer:
    actor, sender = model.actor, model.sender
    train_rows, eval_rows = build_datasets(data_args, args.data_seed or args.seed)
    datasets = {name: SenderDataset(ActorDataset(rows, actor.tokenizer, data_args.model_max_length,
                                                 sender.config.num_latents, lazy=data_args.lazy_preprocess),
                                    sender.tokenizer, sender.config.request, sender.config.knowledge)
                for name, rows in (("train", train_rows), ("eval", eval_rows)) if rows is not None}
    config = CompressionLossConfig(kl_weight=sender_args.kl_weight, alignment_weight=sender_args.alignment_weight,
                                   temperature=sender_args.distill_temperature, window=sender_args.distill_window,
                                   quantile=sender_args.uncertainty_quantile,
                                   loss_chunk_size=sender_args.loss_chunk_size or None)
    trainer = SenderTrainer(model=model, args=args, train_dataset=datasets["train"], eval_dataset=datasets.get("eval"),
                            data_collator=SenderCollator(actor.pad_id, actor.head.config.latent_dim,
                                                         context_pad_id=sender.tokenizer.pad_token_id),
                            processing_class=sender.tokenizer, compression_config=config,
                            callbacks=[LossLogCallback(args.output_dir, plot=args.enable_loss_plot)])
    trainer.nonfinite_guard = NonFiniteGuardCallback(trainer, args.nonfinite_policy)
    trainer.add_callback(trainer.nonfinite_guard)
    return trainer


def train(sender_args: SenderArguments, data_args: DataArguments, args: SenderTrainingArguments) -> int:
    head, resume = check_inputs(sender_args, data_args, args)
    if args.validate_only:
        return 0
    if sender_args.num_latents == 1:  # the bridge feeds step 2 onwards: with one step it gets no gradient
        args.ddp_find_unused_parameters = True
    for setting in set_training_backends():
        logger.info("Training backend: %s", setting)
    model = build_model(sender_args, head, args.seed)
    trainer = build_trainer(model, sender_args, data_args, args)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except DataError as e:  # a latent file that broke mid-run: keep what was trained
        raise save_interrupted(trainer, e, args.output_dir, "the sender") from None
    trainer.save_model(args.output_dir)
    trainer.save_state()
    return finish_run(trainer, args.output_dir)


def main(argv: list[str] | None = None) -> int:
    """The command line: `argv` (default sys.argv), as train_actor.py's."""
    return run_cli(parse_args, train, argv)


def cli() -> None:
    """The `interlat-train-sender` console command (ends the (torchrun) process cleanly)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
