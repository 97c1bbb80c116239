"""The sender: write each task's plan latents (last-layer hidden states) for actor training.

For every record the sender model reads a chat prompt (a fixed instruction plus the first
human message) and an assistant turn holding the plan. The latents are the last layer's
hidden states at exactly the plan's content tokens: one row per plan token, an array [K, d]
saved as `<latent_dir>/<safe id>.npy` (default `__latents__/<output stem>/`). The output JSONL is the input
record plus `plan` and `hidden_state_path` (relative to the output file's folder), the format `train_actor.py`
reads; the output folder loads with `train_actor.py --dataset_name FOLDER` too.

Modes:
  teacher_forced  every record carries `plan`; one forward pass per batch.
  generate        the sender writes the plan itself (sampled), then the generated text is
                  re-tokenised and run teacher-forced, so a record's latents are always
                  reproducible from its saved `plan` alone.
  compressed      a sender trained by sender/train.py (`--sender_dir`) writes its K-latent
                  message [K, d] directly (no plan text); records keep their `plan`, if any.

Runs resume: ids already in the output file are skipped and new lines are appended.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from common import models
from common.constants import LATENT_OWNER_FILE
from common.safe_io import check_output_file, remove_quietly, write_text_atomic
from data import (LATENTS_DIR, DataError, DatasetSource, Source, check_plain_text, read_records, record_messages,
                  turns_field)
from evaluation.generation import decode_replies, stop_token_ids, until_stop

logger = logging.getLogger(__name__)

PLAN_INSTRUCTION = "Write a short plan for this task."


class CollectError(RuntimeError):
    """A user-facing error: printed without a traceback, exit code 2."""


# -- prompts and token layout ---------------------------------------------------------------
def plan_prompt_messages(task: str, instruction: str = PLAN_INSTRUCTION) -> list[dict[str, str]]:
    """The sender's user turn: the fixed instruction, then the task."""
    return [{"role": "user", "content": f"{instruction}\n\n{task}"}]


def first_human_message(record: dict) -> str:
    """The text of the record's first user turn (`human`/`user`, or `role: user`), read as training reads it."""
    return chat_messages(record)[-1]["content"]


def chat_messages(record: dict) -> list[dict[str, str]]:
    """The record's turns up to its first user turn as chat messages (the compressed sender's context), from
    either record format (`data.record_messages`)."""
    messages = record_messages(record)
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise DataError(field=turns_field(record), kind="no_human_turn", detail="no human/user turn")
    return messages[:first + 1]


def prompt_text(tokenizer, task: str, instruction: str = PLAN_INSTRUCTION) -> str:
    """The rendered chat prompt, ending with the assistant header (the generation prompt)."""
    return tokenizer.apply_chat_template(plan_prompt_messages(task, instruction), add_generation_prompt=True,
                                         tokenize=False)


def prompt_token_ids(tokenizer, task: str, instruction: str = PLAN_INSTRUCTION) -> list[int]:
    """Token ids of the chat prompt up to (and including) the assistant header."""
    # The template already holds BOS-like markup where the model wants it.
    return tokenizer(prompt_text(tokenizer, task, instruction), add_special_tokens=False)["input_ids"]


_template_checked: set[int] = set()


def _check_template_once(tokenizer, task: str, plan: str, instruction: str) -> None:
    """Warn (once per tokenizer) if the template does not render the plan right after the generation prompt.

    The latent layout assumes `render(user, assistant=plan)` starts with
    `render(user, add_generation_prompt=True) + plan`; templates that rewrite assistant
    content (e.g. strip reasoning blocks) would silently break that.
    """
    if id(tokenizer) in _template_checked:
        return
    _template_checked.add(id(tokenizer))
    messages = plan_prompt_messages(task, instruction) + [{"role": "assistant", "content": plan}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt_text(tokenizer, task, instruction) + plan):
        logger.warning("The chat template does not render the assistant plan right after the generation "
                       "prompt; latents are taken at the tokens that follow the generation prompt.")


def plan_token_ids(tokenizer, plan: str) -> list[int]:
    """The plan's content tokens, as a model generating after the prompt would have emitted them."""
    return tokenizer(plan, add_special_tokens=False)["input_ids"]


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into `input_ids` and `attention_mask` [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # a loop over the batch, not over tokens
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


# -- hidden states ----------------------------------------------------------------------------
@torch.inference_mode()
def states_for_token_ids(model, prompts: Sequence[Sequence[int]], plans: Sequence[Sequence[int]],
                         device: str | torch.device) -> list[np.ndarray]:
    """Last-layer hidden states at the plan tokens of each `prompt + plan` sequence: float32 [K_i, d] each.

    Right padding keeps every row's positions 0..L-1 as in an unbatched run, and causal
    attention means the padding after a row never reaches it.
    """
    sequences = [list(p) + list(q) for p, q in zip(prompts, plans)]
    ids, mask = _pad(sequences, 0, left=False)  # pad id is irrelevant: masked and after every real token
    ids, mask = ids.to(device), mask.to(device)
    # The decoder alone returns the same hidden_states[-1] without the [B, T, vocab] logits.
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
    out = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1]
    start = torch.tensor([len(p) for p in prompts], device=device)[:, None]
    lengths = torch.tensor([len(q) for q in plans], device=device)
    pos = torch.arange(ids.shape[1], device=device)[None, :]
    is_plan = (pos >= start) & (pos < start + lengths[:, None])
    rows = hidden[is_plan].float().cpu()  # row-major: sample 0's plan tokens, then sample 1's, ...
    return [r.numpy() for r in torch.split(rows, lengths.tolist())]


def teacher_forced_states(model, tokenizer, tasks: Sequence[str], plans: Sequence[str],
                          device: str | torch.device, instruction: str = PLAN_INSTRUCTION) -> list[np.ndarray]:
    """Latents of each (task, plan) pair: float32 arrays [K_i, d], K_i = len(plan_token_ids(plan))."""
    if tasks:
        _check_template_once(tokenizer, tasks[0], plans[0], instruction)
    prompts = [prompt_token_ids(tokenizer, t, instruction) for t in tasks]
    return states_for_token_ids(model, prompts, [plan_token_ids(tokenizer, p) for p in plans], device)


@torch.inference_mode()
def generate_plans(model, tokenizer, tasks: Sequence[str], device: str | torch.device, max_new_tokens: int = 128,
                   temperature: float = 0.7, top_p: float = 0.9, min_new_tokens: int = 0,
                   instruction: str = PLAN_INSTRUCTION) -> list[str]:
    """Let the sender write a plan for each task (sampled; greedy when temperature <= 0). Returns the texts.

    The text is cut at the first end-of-turn token and stripped of special tokens and
    surrounding whitespace. Seed with `transformers.set_seed` beforehand for reproducibility.
    """
    prompts = [prompt_token_ids(tokenizer, t, instruction) for t in tasks]
    pad_id = _pad_id(tokenizer)
    ids, mask = _pad(prompts, pad_id, left=True)  # left padding: every row continues at the same column
    stops = stop_token_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, pad_token_id=pad_id, eos_token_id=stops or None,
                         **sampling)
    return decode_replies(tokenizer, until_stop(out[:, ids.shape[1]:], stops))


# -- files -------------------------------------------------------------------------------------
def load_records(path: Source) -> list[dict]:
    """Records from a JSON list, a {"data": [...]} object, JSONL or a `data.DatasetSource`, read and checked as
    training reads and checks them (`data.read_records`, `validation.validate_files`): errors stop here, before
    any model work."""
    from common.validation import validate_files

    flag = "--dataset_name" if isinstance(path, DatasetSource) else "--input_file"
    try:
        records = [rec for _, rec in read_records(path)]
    except DataError as e:
        raise CollectError(f"{flag} {e}") from None
    report = validate_files([path], check_values=False)
    if not report.ok:
        print(report.format_errors(), file=sys.stderr)
        raise CollectError(f"{path}: the input has errors (listed above); nothing was written")
    return records


def read_done_ids(output_file: str) -> set[str]:
    """Ids already written to `output_file`; a trailing partial line (killed run) is cut off the file.

    A last line without its newline that is a complete record (a file written by another tool) is kept,
    and the newline added, so that appended lines start on a line of their own."""
    if not os.path.exists(output_file):
        return set()
    with open(output_file, "rb") as f:
        data = f.read()
    # Lines are appended whole, so a kill can only leave a partial *last* line: one without its newline.
    end = data.rfind(b"\n") + 1
    if end < len(data) and _is_record_line(data[end:]):
        with open(output_file, "ab") as f:
            f.write(b"\n")
        data += b"\n"
        end = len(data)
    done: set[str] = set()
    for n, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if line.strip():
            try:
                done.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                raise CollectError(f"{output_file}: line {n} is not a record with an `id`; fix or remove the file") \
                    from None
    if end < len(data):
        logger.warning("%s: dropping a partial last line (%d bytes) from an interrupted run",
                       output_file, len(data) - end)
        with open(output_file, "r+b") as f:
            f.truncate(end)  # so appended lines start on a line of their own
    return done


def _is_record_line(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and "id" in record


def safe_name(record_id: Any) -> str:
    """A file name for an id; ids that need changing (or are too long for a file name) get a hash suffix so
    names never collide."""
    text = str(record_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"
    if safe != text or len(safe) > 100:
        safe = f"{safe[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return safe


def save_npy(path: str, array: np.ndarray) -> None:
    """np.save via a temporary file and os.replace: a killed run never leaves half an array, a failed
    write (full disk) no temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def default_latent_dir(output_file: str) -> str:
    """`__latents__/<stem>/` beside the output file: `datasets`' split rules skip folders named `__*`, so the
    output folder loads with `--dataset_name` (a `<stem>_latents/` folder was read as the train split). An output
    file begun before keeps its `<stem>_latents/` folder when resumed."""
    folder, name = os.path.split(os.path.abspath(output_file))
    stem = os.path.splitext(name)[0]
    legacy = os.path.join(folder, stem + "_latents")
    return legacy if os.path.isdir(legacy) else os.path.join(folder, LATENTS_DIR, stem)


def claim_latent_dir(latent_dir: str, output_file: str) -> None:
    """Make `latent_dir` this output file's; refuse one that holds another output file's latents
    (both would write `<id>.npy` there, and one file would end up pointing at the other's latents)."""
    os.makedirs(latent_dir, exist_ok=True)
    owner_path = os.path.join(latent_dir, LATENT_OWNER_FILE)
    # relative to the folder: a data set moved with its latents keeps its claim
    me = os.path.relpath(os.path.realpath(output_file), os.path.realpath(latent_dir))
    if os.path.exists(owner_path):
        try:
            with open(owner_path, encoding="utf-8") as f:
                owner = json.load(f)["output_file"]
        except (OSError, ValueError, KeyError, TypeError):
            owner = None
            logger.warning("%s is unreadable: claiming %s for %s", owner_path, latent_dir, output_file)
        if owner == me:
            return
        if owner is not None:
            owner = os.path.normpath(os.path.join(os.path.realpath(latent_dir), owner))
            raise CollectError(f"--latent_dir {latent_dir} holds the latents of {owner}; two output files sharing "
                               f"one latent folder would overwrite each other's <id>.npy: use another --latent_dir "
                               f"for {output_file}")
    write_text_atomic(owner_path, json.dumps({"output_file": me}))


# -- CLI -----------------------------------------------------------------------------------------
@dataclass
class Job:
    index: int  # position in the input file, for error messages
    record: dict
    task: str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", default=models.EMBEDDED_MODEL, help="the sender model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_file", help="JSON list, JSONL, or {\"data\": [...]}")
    source.add_argument("--dataset_name", help="instead of --input_file: a hub dataset id or a local dataset folder or "
                                               "file, read with datasets.load_dataset")
    p.add_argument("--dataset_split", default="train", help="the split of --dataset_name")
    p.add_argument("--output_file", required=True, help="JSONL in the training format (appended to on resume)")
    p.add_argument("--latent_dir", default=None, help=f"default: {LATENTS_DIR}/<output_file stem>/ next to "
                   "output_file (a name `datasets` never takes for a split, so the folder loads with --dataset_name)")
    p.add_argument("--mode", choices=("generate", "teacher_forced", "compressed"), default="teacher_forced")
    p.add_argument("--sender_dir", default=None, help="compressed mode: an output folder of sender/train.py")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="dtype of the saved .npy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--min_new_tokens", type=int, default=0, help="generate mode: forbid stopping earlier")
    p.add_argument("--temperature", type=float, default=0.7, help="generate mode; <= 0 means greedy")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if (args.mode == "compressed") != (args.sender_dir is not None):
        p.error("--sender_dir goes with --mode compressed (and only with it)")
    return args


def build_jobs(records: list[dict], input_file: str, mode: str) -> list[Job]:
    """Validate records up front, so a bad record fails before any model work."""
    jobs, seen = [], set()
    for i, record in enumerate(records):
        where = f"{input_file}: record {i}"
        if not isinstance(record, dict) or "id" not in record:
            raise CollectError(f"{where} has no `id`")
        rid = str(record["id"])
        where += f" (id {rid!r})"
        if rid in seen:
            raise CollectError(f"{where}: duplicate id")
        seen.add(rid)
        if mode == "teacher_forced" and not isinstance(record.get("plan"), str):
            raise CollectError(f"{where} has no `plan`; teacher_forced mode needs one (or use --mode generate)")
        try:
            task = first_human_message(record)
        except DataError as e:
            raise CollectError(f"{where}: {e.field}: {e.detail}") from None
        jobs.append(Job(i, record, task))
    return jobs


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import set_seed

    try:
        check_output_file(args.output_file, "--output_file")
    except DataError as e:
        raise CollectError(str(e)) from None
    source = args.input_file or DatasetSource(args.dataset_name, args.dataset_split)
    args.input_file = str(source)  # names the input in messages
    records = load_records(source)
    jobs = build_jobs(records, args.input_file, args.mode)
    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    latent_dir = args.latent_dir or default_latent_dir(args.output_file)
    claim_latent_dir(latent_dir, args.output_file)
    done = read_done_ids(args.output_file)
    todo = [j for j in jobs if str(j.record["id"]) not in done]
    logger.info("%d records in %s: %d already in %s (skipped), %d to do", len(jobs), args.input_file,
                len(jobs) - len(todo), args.output_file, len(todo))
    if not todo:
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        if args.mode == "compressed":
            from sender.model import LatentSender, plan_notes

            sender = LatentSender.from_pretrained(args.sender_dir, dtype=model_dtype, device=device,
                                                  trust_remote_code=args.trust_remote_code)
        else:
            model, tokenizer = models.load_model_and_tokenizer(args.model_name_or_path, dtype=model_dtype,
                                                               trust_remote_code=args.trust_remote_code)
            model.to(device).eval()
    except (models.ModelNotFoundError, FileNotFoundError) as e:
        raise CollectError(str(e)) from None
    if args.mode == "compressed":
        tokenizer = sender.tokenizer
        for job in todo:  # a sender with knowledge='plan' reads each record's plan: all must have one
            try:
                plan_notes(sender.config.knowledge, job.record.get("plan"))
            except ValueError:
                raise CollectError(f"{args.input_file}: record {job.index} (id {job.record['id']!r}) has no "
                                   f"`plan`; the sender in {args.sender_dir} reads it (knowledge='plan')") from None
    for job in todo:  # the sender's control tokens in a task or plan: refused before any work, as in training
        try:
            check_plain_text(job.task, tokenizer, f"{args.input_file}: record {job.index} (id {job.record['id']!r}): "
                                                  "first human message")
            if args.mode == "teacher_forced":
                check_plain_text(job.record["plan"], tokenizer,
                                 f"{args.input_file}: record {job.index} (id {job.record['id']!r}): plan")
        except DataError as e:
            raise CollectError(str(e)) from None
    set_seed(args.seed)
    save_dtype = np.dtype(args.dtype)
    empty = 0

    with open(args.output_file, "a", encoding="utf-8") as out, \
            tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="latents", unit="rec") as bar:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b:b + args.batch_size]
            tasks = [j.task for j in batch]
            if args.mode == "generate":
                plans = generate_plans(model, tokenizer, tasks, device, args.max_new_tokens, args.temperature,
                                       args.top_p, args.min_new_tokens)
            else:
                plans = [j.record.get("plan") for j in batch]  # compressed mode: kept as it is, maybe absent
            if args.mode == "compressed":  # the K-latent message itself, without any plan text
                states = sender.messages([chat_messages(j.record) for j in batch], batch_size=len(batch),
                                         plans=plans)
            else:
                states = teacher_forced_states(model, tokenizer, tasks, plans, device)
            lines = []
            for job, plan, array in zip(batch, plans, states):
                if save_dtype == np.float16 and np.abs(array).max(initial=0) > np.finfo(np.float16).max:
                    logger.warning("id %s: latents overflow float16; use --dtype float32", job.record["id"])
                empty += array.shape[0] == 0
                path = os.path.join(latent_dir, safe_name(job.record["id"]) + ".npy")
                save_npy(path, array.astype(save_dtype))
                record = {k: v for k, v in job.record.items() if k != "hidden_state"}  # the path replaces inline data
                if args.mode == "generate" and isinstance(record.get("plan"), str) and record["plan"] != plan:
                    record["reference_plan"] = record["plan"]
                if plan is not None:
                    record["plan"] = plan
                record["hidden_state_path"] = os.path.relpath(path, out_dir)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            # Arrays first, then lines: a record is only "done" once its array is in place.
            out.writelines(lines)
            out.flush()
            bar.update(len(batch))
    if empty:
        logger.warning("%d records have an empty plan (0 latent rows)", empty)
    logger.info("wrote %d records to %s, latents in %s", len(todo), args.output_file, latent_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for user errors, reported without a traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except CollectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder that cannot be written
        print(f"error: writing failed: {e.strerror or str(e) or type(e).__name__}{f' ({e.filename})' if e.filename else ''}; "
              f"the records already in {args.output_file} are kept: run again to resume", file=sys.stderr)
        return 1


def cli() -> None:
    """The `interlat-collect` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
