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

from common.args import (DataArguments, FLAG_ALIASES, ModelArguments, SENDER_FLAG_REFUSALS, SenderArguments,
                         SenderTrainingOptions, TrainingOptions)
from common.cli import CommandLine, UserError, exit_process, parse_config_and_flags, run_cli

logger = logging.getLogger("train_sender")


def _argument_types() -> tuple[type, ...]:
    from common.training_args import SenderTrainingArguments  # transformers' Trainer stack: seconds

    return SenderArguments, DataArguments, SenderTrainingArguments


COMMAND_LINE = CommandLine(
    prog="sender/train.py", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
    groups=(("model and compression", (ModelArguments, SenderArguments)), ("data", (DataArguments,)),
            ("training: this toolkit's options and changed defaults", (TrainingOptions, SenderTrainingOptions))),
    light_types=(SenderArguments, DataArguments, SenderTrainingOptions), argument_types=_argument_types,
    aliases={k: v for k, v in FLAG_ALIASES.items() if v != "base_dtype"}, refusals=SENDER_FLAG_REFUSALS,
    examples="examples:\n" + __doc__.split("\n\n")[1].rstrip())


def parse_args(argv: list[str] | None = None):
    """Flags, or a YAML/JSON config file first and flags overriding it (as train_actor.py)."""
    return parse_config_and_flags(COMMAND_LINE, argv)


def check_inputs(sender_args: SenderArguments, data_args: DataArguments, args):
    """Everything that can be refused before a model is loaded; returns (head config, resume)."""
    from transformers import AutoTokenizer

    from common.models import ModelNotFoundError
    from common.validation import validate_files
    from latent_head import HEAD_FILE, load_head_file
    from sender.model import SENDER_FILE
    from training.setup import data_sources
    from training.trainer import resolve_resume

    try:
        data_args.check_source()
    except ValueError as e:
        raise UserError(str(e)) from None
    if not sender_args.actor_dir:
        raise UserError("--actor_dir is required: an output folder of train_actor.py (the frozen actor)")
    if not os.path.exists(os.path.join(sender_args.actor_dir, HEAD_FILE)):
        raise UserError(f"--actor_dir {sender_args.actor_dir}: no {HEAD_FILE} here; is this an output folder of "
                        "train_actor.py?")
    if args.fsdp:
        raise UserError("--fsdp is not supported by sender/train.py: use DDP (torchrun without --fsdp)")
    if args.push_to_hub:  # the trainer's hub hooks and model card are the actor's
        raise UserError("--push_to_hub is not supported by sender/train.py: upload the output folder with "
                        "huggingface-cli upload")
    if args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing is not supported by sender/train.py: the student's rollout "
                        "needs its KV cache")
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


def build_model(sender_args: SenderArguments, head: dict, seed: int):
    """The frozen actor from --actor_dir and a fresh sender (student = the sender model, new bridge): a
    `sender.model.CompressionModel`."""
    import torch
    import transformers

    from common.models import ModelNotFoundError, load_model_and_tokenizer
    from latent_head import LatentActor
    from sender.model import CompressionModel, LatentSender, SenderConfig

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


def build_trainer(model, sender_args: SenderArguments, data_args: DataArguments, args):
    """The `sender.trainer.SenderTrainer` of `model` (a `CompressionModel`) on the data."""
    from callbacks import LossLogCallback, NonFiniteGuardCallback
    from data import ActorDataset
    from sender.model import CompressionLossConfig, SenderCollator, SenderDataset
    from sender.trainer import SenderTrainer
    from training.setup import build_datasets

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


def train(sender_args: SenderArguments, data_args: DataArguments, args) -> int:
    """Check, build, train, save (`args`: `common.training_args.SenderTrainingArguments`)."""
    from common.cli import finish_run, save_interrupted
    from data import DataError
    from latent_head import set_training_backends

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
