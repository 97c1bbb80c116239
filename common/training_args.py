"""The training scripts' `TrainingArguments`: transformers' own, extended with common/args.py's options (TRL's
`DPOConfig(TrainingArguments)` pattern). Apart from common/args.py because importing transformers' Trainer stack
takes seconds: the scripts import this module after `--help` has had its chance."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from common.args import ActorTrainingOptions, SenderTrainingOptions


@dataclass
class ActorTrainingArguments(ActorTrainingOptions, TrainingArguments):
    """train_actor.py's training arguments: TrainingArguments + `ActorTrainingOptions`."""


@dataclass
class SenderTrainingArguments(SenderTrainingOptions, TrainingArguments):
    """sender/train.py's training arguments: TrainingArguments + `SenderTrainingOptions` (no actor-only options)."""
