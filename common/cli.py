"""The command line shared by the training scripts (train_actor.py, sender/train.py): config files, one-line
errors for a user's mistakes, failure notes, saving on a broken run, and ending a (torchrun) process cleanly."""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from typing import Callable

import torch
import transformers
from transformers import HfArgumentParser

from common.constants import INTERRUPTED_DIR
from common.safe_io import DataError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def read_config_file(path: str) -> dict:
    """A YAML or JSON config file as a mapping of argument names to values; a `ValueError` line otherwise."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({first})") from None
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ValueError(f"{path}: expected a mapping of argument names to values, e.g. `learning_rate: 1.0e-4`")
    return config


def config_as_flags(config: dict, parser: HfArgumentParser, path: str) -> list[str]:
    """A config file's entries as command-line flags, so that the parser checks them exactly as typed flags (types,
    choices) and later flags override them. An unknown key is a `ValueError` naming the file and the key."""
    known = {option[2:] for option in parser._option_string_actions if option.startswith("--")}
    unknown = [key for key in config if key not in known]
    if unknown:
        raise ValueError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(not an argument of {os.path.basename(sys.argv[0]) or 'this script'}; see --help)")
    flags = []
    for key, value in config.items():
        if value is None:  # `key: null` or `key:` leaves the default
            continue
        if isinstance(value, bool):
            values = [str(value).lower()]
        elif isinstance(value, (list, tuple)):
            values = [str(v) for v in value]
        elif isinstance(value, dict):
            values = [json.dumps(value)]
        else:
            values = [str(value)]
        flags += [f"--{key}", *values]
    return flags


# A data source typed as a flag -> the config file's keys it replaces.
DATA_SOURCE_FLAGS = {"dataset_name": ("train_file", "eval_file"),
                     "train_file": ("dataset_name", "dataset_split", "eval_split"), "eval_file": ("eval_split",)}


def parse_config_and_flags(dataclass_types: tuple, argv: list[str] | None = None):
    """`[config.yaml | config.json] [--flag value ...]`: the file's values first, command-line flags overriding
    them (HfArgumentParser does the parsing); unknown keys and flags are a one-line `ValueError`."""
    parser = HfArgumentParser(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
        config = read_config_file(path)
        # The data source is one choice: a source typed on the command line replaces the file's.
        typed = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for flag, replaces in DATA_SOURCE_FLAGS.items():
            if flag in typed:
                config = {k: v for k, v in config.items() if k not in replaces}
        argv = config_as_flags(config, parser, path) + argv
    return parser.parse_args_into_dataclasses(args=argv)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exits with `status`, never a traceback."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def save_interrupted(trainer, e: DataError, output_dir: str, what: str) -> UserError:
    """A `DataError` mid-run (a latent file that broke): save what was trained into `<output_dir>/interrupted` and
    return the error to raise, one line naming that folder (`what`: "the model", "the sender")."""
    trainer.save_model(os.path.join(output_dir, INTERRUPTED_DIR))
    message = str(e)
    if "Original Traceback" in message:  # raised in a data loader worker: the message carries its traceback
        message = message.rsplit("DataError: ", 1)[-1].rstrip()
    return UserError(f"{message} ({what} so far is in {output_dir}/{INTERRUPTED_DIR})", status=1)


def write_failure(e: BaseException) -> str | None:
    """What went wrong, when `e` is a failed write: an OSError, or the same from a Rust library (tokenizers,
    safetensors) that reports it as '... (os error N)'; None for anything else (a bug: its traceback helps)."""
    if isinstance(e, OSError):
        return f"{e.strerror or type(e).__name__}{f' ({e.filename})' if e.filename else ''}"
    text = str(e).strip()
    if "(os error " in text:
        return text.splitlines()[0][:200]
    return None


def last_checkpoint_note(output_dir: str) -> str:
    """Where training can go on from: the newest complete checkpoint, said in words."""
    from training.trainer import (
        resolve_resume,  # the Trainer's modules load only when a run failed
    )

    try:
        last = resolve_resume("latest", output_dir)
    except (FileNotFoundError, OSError):
        return "no complete checkpoint was saved"
    return f"the last complete checkpoint is {last} (continue with --resume_from_checkpoint latest)"


def run_cli(parse: Callable[[list[str] | None], tuple], run: Callable[..., int], argv: list[str] | None) -> int:
    """A training script's command line (the actor's and the sender's): parse (config file and flags), set up
    logging, run; a user's mistake is one line and an exit status, Ctrl-C says where training can go on from."""
    try:
        parsed = parse(argv)
    except ValueError as e:  # an unknown flag or config key, or an argument dataclass's checks
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    args = parsed[-1]  # the TrainingArguments
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    try:
        return run(*parsed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"error: interrupted (Ctrl-C); {last_checkpoint_note(args.output_dir)}", file=sys.stderr)
        return 130


def exit_process(status: int) -> None:
    """End a (torchrun) process: leave the process group, run the exit handlers (logging, trackers), then exit
    without the interpreter's teardown. Gloo's transport threads, still alive during that teardown even after
    `destroy_process_group`, abort a finished run now and then ("terminate called without an active
    exception", SIGABRT), and torchrun then reports the whole run failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        atexit._run_exitfuncs()  # what a normal exit would run first (logging.shutdown among them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
