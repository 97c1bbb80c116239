"""Train an actor LLM to read a sender's latent message (its last-layer hidden states) with the Hugging Face Trainer.

The actor is a causal LM with a latent head: each record's latents enter its first user turn, and three branches
(true latents, plan text, another sample's latents) shape the loss. A YAML/JSON config file (first, or with
--config) gives settings; flags typed after it override them. The data format, the outputs and the recipes:
README.md.

    python train_actor.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_file data/train.jsonl \\
        --eval_file data/eval.jsonl --output_dir checkpoints/actor --evaluation_strategy steps ...
    python train_actor.py recipes/demo.yaml --output_dir checkpoints/mine     # a config file, flags override it
    python train_actor.py --train_file data/train.jsonl --validate_only true  # check the data, no model needed
    torchrun --nproc_per_node 2 train_actor.py ...
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from common.args import (ActorArguments, ActorModelArguments, ActorTrainingOptions, DataArguments, FLAG_ALIASES,
                         FLAG_REFUSALS, LatentHeadArguments, LossArguments, ModelArguments, TrainingOptions)
from common.cli import CommandLine, exit_process, parse_config_and_flags, run_cli

if TYPE_CHECKING:  # names only: torch and transformers' Trainer load after parsing (--help answers without them)
    from transformers import TrainerCallback


def _argument_types() -> tuple[type, ...]:
    from common.training_args import ActorTrainingArguments  # transformers' Trainer stack: seconds

    return ActorArguments, DataArguments, ActorTrainingArguments


COMMAND_LINE = CommandLine(
    prog="train_actor.py", description=__doc__.split("\n\n    ")[0],
    groups=(("model", (ModelArguments, ActorModelArguments)),
            ("latent method: the head", (LatentHeadArguments,)),
            ("latent method: the loss", (LossArguments,)),
            ("data", (DataArguments,)),
            ("training: this toolkit's options and changed defaults", (TrainingOptions, ActorTrainingOptions))),
    light_types=(ActorArguments, DataArguments, ActorTrainingOptions), argument_types=_argument_types,
    aliases=FLAG_ALIASES, refusals=FLAG_REFUSALS,
    examples="examples:\n" + __doc__.split("README.md.\n\n")[1].rstrip())


def parse_args(argv: list[str] | None = None):
    """(model_args, data_args, training_args) from a config file and flags (`argv`, default sys.argv)."""
    return parse_config_and_flags(COMMAND_LINE, argv)


def train(model_args: ActorArguments, data_args: DataArguments, args, callbacks: list[TrainerCallback] = (),
          save_final_model: bool = True, command: str | None = None) -> int:
    """Check, build, train, save. `callbacks`: more `TrainerCallback`s (e.g. benchmarks/bench.py's step timer);
    `save_final_model` False: leave out the final model (a benchmark measures steps, not saving); `command`: the
    command line, for the model card."""
    from common.cli import finish_run, run_training  # torch, transformers' Trainer: imported once parsed
    from latent_head import set_training_backends
    from training.setup import build_actor, build_trainer, check_inputs, logger, save_actor, warm_start

    report, resume = check_inputs(model_args, data_args, args)  # every refusal before a model is loaded
    if args.validate_only:
        return 0
    for setting in set_training_backends():
        logger.info("Training backend: %s", setting)
    actor = build_actor(model_args, report.latent_dim, args.seed)
    trainer = build_trainer(actor, model_args, data_args, args, callbacks)
    trainer.card_info["command"] = command
    if model_args.head_warm_start_steps > 0 and resume is None:
        warm_start(trainer, model_args, args)
    run_training(trainer, resume, args.output_dir, "the model")
    if save_final_model:
        save_actor(trainer, args.output_dir)
    status = finish_run(trainer, args.output_dir)
    if save_final_model:
        trainer.create_model_card()  # README.md, with the last evaluation (in the log now)
    return status


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] = (), save_final_model: bool = True) -> int:
    """The command line: `argv` (default sys.argv); `callbacks`/`save_final_model` as in `train`."""
    from common.model_card import command_line

    return run_cli(parse_args, lambda *parsed: train(*parsed, callbacks, save_final_model, command_line(argv)), argv)


def cli() -> None:
    """The `interlat-train` console command (ends the (torchrun) process cleanly)."""
    exit_process(main())


if __name__ == "__main__":
    cli()
