"""The command line shared by the training scripts (train_actor.py, sender/train.py): config files, the names other
tools use, `--help`, one-line errors for a user's mistakes, failure notes, saving on a broken run, and ending a
(torchrun) process cleanly.

Imports nothing heavy at the top: `--help` must answer in about a second, so torch and transformers' Trainer stack
load only once a command line is really parsed.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import dataclasses
import difflib
import json
import os
import shutil
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable

from common.constants import INTERRUPTED_DIR
from common.safe_io import DataError, check_regular_file

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
MAX_CONFIG_BYTES = 1 << 20  # a config file names settings: a megabyte is far beyond any real one
MAX_CONFIG_VALUES = 10_000  # values in one key's (nested) value: a YAML alias bomb expands past it, no config does
MAX_MESSAGE_CHARS = 600  # an error line's length (a value quoted into it is cut)
NOT_CONFIG_KEYS = {"help": "run the script with --help", "help_all": "run the script with --help-all",
                   "config": "config files do not include one another"}


@dataclass(frozen=True)
class CommandLine:
    """A training script's command line: what `--help` shows, what parsing fills, the other tools' names it knows."""

    prog: str
    description: str
    # --help's sections: (title, the dataclasses whose own fields it lists), in order
    groups: tuple[tuple[str, tuple[type, ...]], ...]
    # the parsed dataclasses without transformers' TrainingArguments: what --help renders
    light_types: tuple[type, ...]
    # the parsed dataclasses (imports transformers' Trainer stack: seconds)
    argument_types: Callable[[], tuple[type, ...]]
    aliases: dict[str, str]  # another tool's flag -> ours, same meaning
    refusals: dict[str, str]  # another tool's flag -> the one line that names ours
    examples: str = ""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exits with `status`, never a traceback."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The first line of `text`, cut to `limit` characters (a value quoted into a message can be huge)."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[:limit] + f"... ({len(first) - limit} more characters)"


# ---------------------------------------------------------------------------------------------
# Config files
# ---------------------------------------------------------------------------------------------
def read_config_file(path: str) -> dict:
    """A YAML or JSON config file as a mapping of argument names to values; a one-line `ValueError` otherwise.
    Only a regular file of at most `MAX_CONFIG_BYTES` is read (a FIFO would block, /dev/zero never ends)."""
    import yaml

    check_regular_file(path)  # a DataError (a ValueError) naming the file
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file names settings and values")
    kind = "JSON" if path.lower().endswith(".json") else "YAML"
    try:
        text = raw.decode("utf-8")
        config = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a config file (expected `name: value` lines)") from None
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {kind} ({one_line(e, 160) or type(e).__name__})") from None
    if config is None:
        return {}
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ValueError(f"{path}: expected a mapping of argument names to values, e.g. `learning_rate: 1.0e-4`")
    return config


def _count_values(value: Any, budget: int) -> int:
    """How many values `value` holds, counting nested ones, stopping past `budget` (shared YAML aliases are
    counted each time they occur, as a flag would spell them out)."""
    seen, stack = 0, [value]
    while stack and seen <= budget:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return seen


def _bool_for_choices(key: str, value: bool, action: argparse.Action, path: str) -> str:
    """A YAML boolean given to a flag that takes words: YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans, so
    `save_strategy: no` arrives as False. Map it back to the choice it spelled; else ask for quotes."""
    words = ("no", "false", "off") if value is False else ("yes", "true", "on")
    for word in words:
        if action.choices and word in [str(c) for c in action.choices]:
            return word
    raise ValueError(f"{path}: {key}: YAML reads yes/no/on/off/true/false as a boolean, and --{key} takes a word: "
                     f"quote the value, e.g. {key}: \"{words[0]}\"")


def config_as_flags(config: dict, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A config file's entries as command-line flags, so that the parser checks them exactly as typed flags (types,
    choices) and later flags override them. Keys must be the parser's own (after `rename_names`)."""
    from transformers.hf_argparser import string_to_bool

    flags = []
    for key, value in config.items():
        if value is None:  # `key: null` or `key:` leaves the default
            continue
        action = parser._option_string_actions[f"--{key}"]
        if _count_values(value, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
            raise ValueError(f"{path}: {key}: more than {MAX_CONFIG_VALUES} values (nested or through YAML aliases); "
                             "expected a value, a list or a small mapping")
        if isinstance(value, bool):
            values = [str(value).lower() if action.type is string_to_bool else
                      _bool_for_choices(key, value, action, path)]
        elif isinstance(value, (list, tuple)):
            if not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise ValueError(f"{path}: {key}: expected a value or a list of values, found a nested list or mapping")
            values = [str(v) for v in value]
        elif isinstance(value, dict):
            values = [json.dumps(value)]
        else:
            values = [str(value)]
        flags += [f"--{key}", *values]
    return flags


# ---------------------------------------------------------------------------------------------
# Names: other tools' flags, near misses
# ---------------------------------------------------------------------------------------------
def known_names(parser: argparse.ArgumentParser) -> set[str]:
    """The parser's long option names without their dashes (`learning_rate`, `learning-rate`, `no_fused_loss`)."""
    return {option[2:] for option in parser._option_string_actions if option.startswith("--")}


def did_you_mean(name: str, known: set[str], cli: CommandLine, prefix: str = "--") -> str:
    """' (did you mean --x?)' for the closest known name (or another tool's name we read as ours), else ''
    (`prefix` "" for a config key)."""
    candidates = {n: n for n in known if "-" not in n}
    candidates.update({alias: target for alias, target in cli.aliases.items() if target in known})
    match = difflib.get_close_matches(name.lower().replace("-", "_"), list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {prefix}{candidates[match[0]]}?)" if match else ""


def rename_name(name: str, known: set[str], cli: CommandLine, where: str) -> str:
    """Our name for a flag or config key `name`: itself when known, ours for another tool's alias; a one-line
    `ValueError` for another tool's name we refuse (naming ours)."""
    if name in known:
        return name
    plain = name.replace("-", "_")
    if plain in cli.aliases and cli.aliases[plain] in known:
        return cli.aliases[plain]
    if plain in cli.refusals:
        raise ValueError(f"{where}{plain}: {cli.refusals[plain]}")
    return name


def rename_flags(argv: list[str], known: set[str], cli: CommandLine) -> list[str]:
    """`argv` with other tools' flags renamed to ours (`--max_seq_length 512` -> `--model_max_length 512`)."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = f"--{rename_name(name, known, cli, '--')}{eq}{value}"
        out.append(token)
    return out


def unknown_flags_message(remaining: list[str], known: set[str], cli: CommandLine) -> str:
    """One line for the arguments the parser left: each unknown flag with a near miss, if any."""
    flags = [t for t in remaining if t.startswith("-")]
    if not flags:
        return f"unexpected argument {remaining[0]!r} (flags are --name value; a config file comes first)"
    parts = []
    for flag in flags:
        name = flag.lstrip("-").split("=", 1)[0]
        parts.append(f"{flag.split('=', 1)[0]}{did_you_mean(name, known, cli)}")
    return f"unknown argument{'s' if len(parts) > 1 else ''} {', '.join(parts)} (see --help)"


def take_config_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the config file, the other arguments): a first positional YAML/JSON file, or `--config FILE` (TRL's)."""
    argv, path = list(argv), None
    if argv and not argv[0].startswith("-"):
        if not argv[0].lower().endswith(CONFIG_SUFFIXES):
            raise ValueError(f"{argv[0]}: a config file must end in .yaml, .yml or .json (flags are --name value)")
        path = argv.pop(0)
    for i, token in enumerate(argv):
        if token == "--config" or token.startswith("--config="):
            given = token.partition("=")[2] if "=" in token else (argv[i + 1] if i + 1 < len(argv) else "")
            if not given or given.startswith("--"):
                raise ValueError("--config needs a file: --config recipe.yaml")
            if path is not None:
                raise ValueError(f"two config files ({path} and {given}); give one")
            del argv[i: i + (1 if "=" in token else 2)]
            return given, argv
    return path, argv


# A data source typed as a flag -> the config file's keys it replaces.
DATA_SOURCE_FLAGS = {"dataset_name": ("train_file", "eval_file"),
                     "train_file": ("dataset_name", "dataset_split", "eval_split"), "eval_file": ("eval_split",)}


def build_parser(cli: CommandLine):
    """transformers' HfArgumentParser of the script's dataclasses, whose errors are one-line `ValueError`s
    instead of the usage (hundreds of options) and an exit."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            raise ValueError(message)

    return Parser(cli.argument_types(), prog=cli.prog, add_help=False)


def parse_config_and_flags(cli: CommandLine, argv: list[str] | None = None):
    """`[config.yaml | --config config.yaml] [--flag value ...]`: the file's values first, flags overriding them
    (HfArgumentParser parses both). Other tools' names are read as ours or refused naming ours; an unknown flag
    or key is a one-line `ValueError` with the nearest name. `--help`/`--help-all` print and exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        print(render_help(cli, full="--help-all" in argv))
        raise SystemExit(0)
    path, argv = take_config_path(argv)
    parser = build_parser(cli)
    known = known_names(parser)
    argv = rename_flags(argv, known, cli)
    flags = []
    if path is not None:
        config = read_config_file(path)
        renamed = {}
        for key, value in config.items():
            if key in NOT_CONFIG_KEYS:
                raise ValueError(f"{path}: `{key}` is not a setting ({NOT_CONFIG_KEYS[key]})")
            ours = rename_name(key, known, cli, f"{path}: ")
            if ours not in known:
                hint = did_you_mean(key, known, cli, prefix="")
                raise ValueError(f"{path}: unknown key {one_line(key, 80)}{hint} (not an argument of {cli.prog}; "
                                 "see --help)")
            if ours in renamed:
                raise ValueError(f"{path}: {key} and {ours} both given (the same setting)")
            renamed[ours] = value
        # The data source is one choice: a source typed on the command line replaces the file's.
        typed = {a.split("=", 1)[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for flag, replaces in DATA_SOURCE_FLAGS.items():
            if flag in typed:
                renamed = {k: v for k, v in renamed.items() if k not in replaces}
        flags = config_as_flags(renamed, parser, path)
    _, remaining = parser.parse_known_args(flags + argv)
    if remaining:
        raise ValueError(unknown_flags_message(remaining, known, cli))
    return parser.parse_args_into_dataclasses(args=flags + argv, look_for_args_file=False)


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------
# transformers' TrainingArguments that most runs set: --help shows these (--help-all every one of them)
COMMON_TRAINING_ARGUMENTS = (
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit", "seed",
    "gradient_checkpointing", "resume_from_checkpoint", "report_to", "run_name", "push_to_hub", "hub_model_id",
    "use_cpu", "torch_compile", "fsdp", "disable_tqdm")


def _constant(node: ast.AST) -> Any:
    """The value of a constant expression in transformers' source (strings joined with +), else a ValueError."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _constant(node.left) + _constant(node.right)
    return ast.literal_eval(node)


def training_arguments_from_source(names: tuple[str, ...]) -> dict[str, tuple[str, str, str]]:
    """{name: (type, default, help)} of transformers' TrainingArguments fields, read from its source file without
    importing it (that takes seconds: torch, accelerate). A name it cannot read is left out."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    source = os.path.join(os.path.dirname(spec.origin), "training_args.py") if spec and spec.origin else ""
    try:
        with open(source, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return {}
    out = {}
    for cls in tree.body:
        if not (isinstance(cls, ast.ClassDef) and cls.name == "TrainingArguments"):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and node.target.id in names and isinstance(node.value, ast.Call)):
                continue
            keywords = {k.arg: k.value for k in node.value.keywords}
            try:
                default = repr(_constant(keywords["default"])) if "default" in keywords else "..."
                metadata = keywords.get("metadata")
                helps = [_constant(v) for k, v in zip(metadata.keys, metadata.values)
                         if isinstance(k, ast.Constant) and k.value == "help"] if isinstance(metadata, ast.Dict) else []
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            out[node.target.id] = (ast.unparse(node.annotation), default, helps[0] if helps else "")
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (paragraphs, examples); each option once (`--name TYPE`, not its dashed twin),
    its default after its help."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=min(shutil.get_terminal_size().columns, 110))

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        name = action.option_strings[0]
        if action.metavar:
            kind = action.metavar
        elif action.choices:
            kind = "{" + ",".join(str(c) for c in action.choices) + "}"
        else:
            kind = {"string_to_bool": "BOOL", "int": "INT", "float": "FLOAT"}.get(
                getattr(action.type, "__name__", ""), "TEXT")
        return {"?": f"{name} [{kind}]", "+": f"{name} {kind} [...]"}.get(action.nargs, f"{name} {kind}")

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def render_help(cli: CommandLine, full: bool = False) -> str:
    """The script's help: a description, then its options grouped (model, latent method, data, training), then
    transformers' TrainingArguments: the common ones (fast: nothing heavy is imported), or all (`full`)."""
    from transformers.hf_argparser import HfArgumentParser

    types = cli.argument_types() if full else cli.light_types
    parser = argparse.ArgumentParser(
        prog=cli.prog, description=cli.description, formatter_class=_HelpFormatter, add_help=False,
        usage=f"{cli.prog} [CONFIG.yaml | --config CONFIG.yaml] [--name value ...]",
        epilog=cli.examples)
    fields_by_name = {}
    for dtype in types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                f.type = hints[f.name]
                fields_by_name.setdefault(f.name, f)
    aliases = ", ".join(f"--{a} (--{t})" for a, t in cli.aliases.items() if t in fields_by_name)
    general = parser.add_argument_group("help and config files", textwrap.fill(
        f"Other tools' names are read as ours: {aliases}. Others (--use_peft, --dataset_text_field, ...) are "
        "answered with the name to use.", width=100, initial_indent="  ", subsequent_indent="  "))
    general.add_argument("-h", "--help", action="store_true", default=argparse.SUPPRESS,
                         help="This help (fast: the common options).")
    general.add_argument("--help-all", action="store_true", default=argparse.SUPPRESS,
                         help="Every option, transformers' TrainingArguments too.")
    general.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                         help="A YAML/JSON file of `name: value` settings (TRL's --config; or give it first, without "
                         "--config). Flags typed after it override it.")
    shown = set()
    for title, classes in cli.groups:  # each option where its class declares it, in the order declared
        group = parser.add_argument_group(title)
        for name in (n for c in classes for n in vars(c).get("__annotations__", {})):
            if name not in shown and name in fields_by_name:
                HfArgumentParser._parse_dataclass_field(group, fields_by_name[name])
                shown.add(name)
    rest = [f for name, f in fields_by_name.items() if name not in shown]
    if full:
        group = parser.add_argument_group("training: transformers' TrainingArguments")
        for f in rest:
            HfArgumentParser._parse_dataclass_field(group, f)
    else:
        group = parser.add_argument_group(
            "training: transformers' TrainingArguments, the common ones (all of them: --help-all)")
        found = training_arguments_from_source(COMMON_TRAINING_ARGUMENTS)
        for name in (n for n in COMMON_TRAINING_ARGUMENTS if n in found):
            kind, default, text = found[name]
            flag = kind.replace(" ", "") in ("bool", "bool|None", "Optional[bool]")
            group.add_argument(f"--{name}", nargs="?" if flag else None, default=default, help=text,
                               metavar="BOOL" if flag else "INT" if kind == "int" else "FLOAT" if kind == "float"
                               else "TEXT")
    return parser.format_help()


# ---------------------------------------------------------------------------------------------
# Running a training script
# ---------------------------------------------------------------------------------------------
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


def run_training(trainer, resume: str | None, output_dir: str, what: str) -> None:
    """`trainer.train()`, every way it can end a user should hear about as one line (a `UserError`): a latent
    file that broke mid-run (what was trained is saved), a failed write, Ctrl-C (where training can go on from)."""
    from callbacks import InterruptCallback

    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except DataError as e:  # a latent file that broke mid-run: keep what was trained
        raise save_interrupted(trainer, e, output_dir, what) from None
    except Exception as e:  # a checkpoint or log that could not be written (full disk, permissions)
        if not (failure := write_failure(e)):
            raise
        raise UserError(f"training stopped at step {trainer.state.global_step}: writing failed: {failure}; "
                        f"{last_checkpoint_note(output_dir)}", status=1) from None
    finally:
        interrupt.restore()
    if interrupt.interrupted:
        raise UserError(f"interrupted (Ctrl-C) after step {trainer.state.global_step}: "
                        f"{last_checkpoint_note(output_dir)}", status=130)


def saved_model_step(trainer) -> int:
    """The step whose weights the run saves last: the best checkpoint's when `--load_best_model_at_end` loaded it,
    else the last step's."""
    state = trainer.state
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        if getattr(state, "best_global_step", None):
            return state.best_global_step
        return int(state.best_model_checkpoint.rstrip("/").rsplit("-", 1)[-1])
    return state.global_step


def finish_run(trainer, output_dir: str) -> int:
    """After the final save: refuse a run stopped by a non-finite gradient, else evaluate the saved model unless the
    run already did (the Trainer evaluates at the end of a step or epoch schedule; the best checkpoint was evaluated
    when it was chosen): evaluating it again would log the same evaluation twice."""
    if trainer.nonfinite_guard.stopped:
        raise UserError(f"training stopped at step {trainer.state.global_step} on a non-finite gradient (see the "
                        f"log); the weights saved in {output_dir} never received it", status=1)
    step = saved_model_step(trainer)
    evaluated = any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)
    if trainer.eval_dataset is not None and not evaluated:
        trainer.evaluate()
    return 0


def run_cli(parse: Callable[[list[str] | None], tuple], run: Callable[..., int], argv: list[str] | None) -> int:
    """A training script's command line (the actor's and the sender's): parse (config file and flags), set up
    logging, run; a user's mistake is one line and an exit status, Ctrl-C says where training can go on from."""
    import logging

    try:
        parsed = parse(argv)
    except SystemExit as e:  # --help
        return e.code or 0
    except ValueError as e:  # an unknown flag or config key, or an argument dataclass's checks
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    args = parsed[-1]  # the TrainingArguments
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    try:
        return run(*parsed)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print(f"error: interrupted (Ctrl-C); {last_checkpoint_note(args.output_dir)}", file=sys.stderr)
        return 130


def exit_process(status: int) -> None:
    """End a (torchrun) process: leave the process group, run the exit handlers (logging, trackers), then exit
    without the interpreter's teardown. Gloo's transport threads, still alive during that teardown even after
    `destroy_process_group`, abort a finished run now and then ("terminate called without an active
    exception", SIGABRT), and torchrun then reports the whole run failed."""
    torch = sys.modules.get("torch")  # never imported for this: a process that did not load it has no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        atexit._run_exitfuncs()  # what a normal exit would run first (logging.shutdown among them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
