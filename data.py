"""Everything from data files to batches: reading, formatting, labels, latents, collation.

A record (see README) is `{"id", "conversations": [{"from", "value"}] | "messages": [{"role", "content"}],
"plan" | "plan_path", "hidden_state" | "hidden_state_path"}`, from a JSON/JSONL file or a `datasets`
dataset (`DatasetSource`). This module is the one reader and role map of records for training, the
sender, validation, evaluation and inference. Each conversation is rendered with the tokenizer's
chat template; the first human message ends with the `<FIRST_HUMAN_END>` marker, which
the model later replaces by `<bop> latents/plan <eop>`. Labels supervise assistant turns
only (their content and end-of-turn token).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common.constants import IGNORE_INDEX, MARKER_TOKEN, SPECIAL_TOKENS
from common.safe_io import MAX_LINE_BYTES, DataError, check_regular_file, load_torch_file, read_npy_header

logger = logging.getLogger(__name__)

# The two formats of a record's turns; the rest of a record is the same in both.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
TURN_FORMATS = {  # field -> (role key, text key, role map to chat roles)
    "conversations": ("from", "value", SHAREGPT_ROLES),  # ShareGPT
    "messages": ("role", "content", MESSAGE_ROLES),  # the chat-template format (TRL, the Trainer's docs)
}
LATENT_SUFFIXES = (".npy", ".pt", ".pth")


@dataclass(frozen=True)
class DatasetSource:
    """Records of one split of a dataset (--dataset_name): a local dataset folder or data file, or a hub dataset id
    (its snapshot in the local Hugging Face cache, downloaded first when the hub is reachable), read with `datasets`'
    json loader (`load_dataset("json", data_files=...)`). Relative latent and plan paths are relative to the folder
    (or the file's folder)."""

    name: str
    split: str = "train"

    def __str__(self) -> str:
        return f"{self.name}:{self.split}"


Source = Union[str, DatasetSource]  # a data file's path, or a dataset

DATA_FILE_SUFFIXES = (".jsonl", ".json")  # what a dataset folder's records are read from (latents are .npy)
# Where sender/collect.py puts an output file's latents by default: a folder whose name starts with "__", which
# `datasets`' split rules never read (`train_latents/` beside train.jsonl was taken for the train split).
LATENTS_DIR = "__latents__"


def resolve_dataset(name: str) -> str:
    """A local folder or data file for --dataset_name: itself when it exists; a hub id's snapshot in the local
    Hugging Face cache, else downloaded (`huggingface_hub.snapshot_download`) when the hub is reachable."""
    if os.path.exists(name):
        return name
    from huggingface_hub import snapshot_download

    from common.models import _hub_reachable, looks_like_repo_id

    if not looks_like_repo_id(name):
        raise DataError(where=name, kind="unreadable_file",
                        detail="not found: expected a local dataset folder or data file, or a hub id (owner/name)")
    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError is an OSError)
        pass
    if not _hub_reachable():
        raise DataError(where=name, kind="unreadable_file", detail="not a local folder or file, not in the Hugging "
                        "Face cache, and the hub cannot be reached (offline?)")
    try:
        return snapshot_download(name, repo_type="dataset")
    except Exception as e:  # no such repository, no access, a network failure
        raise DataError(where=name, kind="unreadable_file",
                        detail=f"cannot be downloaded from the hub ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def dataset_data_files(path: str) -> dict[str, list[str]]:
    """{split: data files} of a local dataset folder or data file, split as `datasets` splits a folder (its file-
    and folder-name rules: train.jsonl, test.jsonl, data/train-00000.jsonl, ...), keeping only data files
    (.json, .jsonl). A folder written before latents went into `__latents__/` (`train_latents/` beside
    train.jsonl: the folder rule takes it for the train split) is read by its own files' names instead."""
    from datasets.data_files import DEFAULT_PATTERNS_SPLIT_IN_FILENAME, DataFilesDict, get_data_patterns

    if os.path.isfile(path):
        return {"train": [path]}
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    except Exception:  # datasets' EmptyDatasetError and the like: no file its rules recognise
        found = {}
    by_split = {str(split): sorted(f for f in files if f.lower().endswith(DATA_FILE_SUFFIXES))
                for split, files in found.items()}
    by_split = {split: files for split, files in by_split.items() if files}
    if by_split:
        return by_split
    top = sorted(n for n in os.listdir(path) if n.lower().endswith(DATA_FILE_SUFFIXES) and not n.startswith((".", "__"))
                 and os.path.isfile(os.path.join(path, n)))
    for split, patterns in DEFAULT_PATTERNS_SPLIT_IN_FILENAME.items():  # e.g. "**/train[-._ 0-9]*"
        names = [n for n in top if any(fnmatch.fnmatchcase(n, p.split("/")[-1]) for p in patterns)]
        if names:
            by_split[str(split)] = [os.path.join(path, n) for n in names]
    if not by_split and top:  # no split in any name: all of them are the train split (as datasets reads them)
        by_split["train"] = [os.path.join(path, n) for n in top]
    return by_split


def source_dir(source: Source) -> str:
    """The folder that relative paths in a source's records are relative to."""
    if isinstance(source, DatasetSource):
        try:
            name = os.path.abspath(resolve_dataset(source.name))
        except DataError:  # reported when its records are read
            return os.getcwd()
        return name if os.path.isdir(name) else os.path.dirname(name)
    return os.path.dirname(os.path.abspath(source))


# ---------------------------------------------------------------------------------------------
# Turns: one role map for both formats
# ---------------------------------------------------------------------------------------------
def turns_field(record: dict) -> str:
    """The field that holds a record's turns: `messages` when it is given (not null) and `conversations` is
    not, else `conversations`."""
    if record.get("messages") is not None and record.get("conversations") is None:
        return "messages"
    return "conversations"


def chat_messages(turns: Sequence[Any], where: str = "", field: str = "conversations") -> list[dict]:
    """Turns `[{from, value}]` (ShareGPT) or `[{role, content}]` as chat messages `[{role, content}]`.

    A turn with `role` is read as a chat message, any other as ShareGPT. A bad turn is a `DataError` naming
    `where`, the field (`conversations[2].from`) and what was expected (validation reports every one first)."""
    if not isinstance(turns, (list, tuple)):
        raise DataError(where=where, field=field, kind="conversations_not_list",
                        detail="expected a list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(where=where, field=f"{field}[{i}]", kind="turn_not_object", detail="expected an object")
        role_key, text_key, roles = TURN_FORMATS["messages" if "role" in turn else "conversations"]
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(where=where, field=f"{field}[{i}].{role_key}", kind="unknown_role",
                            detail=f"found {role!r}; expected one of {', '.join(sorted(roles))}")
        if not isinstance(text, str):
            raise DataError(where=where, field=f"{field}[{i}].{text_key}", kind="value_not_string",
                            detail="expected a string")
        out.append({"role": roles[role], "content": text})
    return out


def record_messages(record: dict, where: str = "") -> list[dict]:
    """A record's turns as chat messages, from `conversations` or `messages` (see `chat_messages`)."""
    field = turns_field(record)
    if record.get(field) is None:
        raise DataError(where=where, field="conversations", kind="missing_conversations",
                        detail="missing; expected conversations [{from, value}] or messages [{role, content}]")
    return chat_messages(record[field], where, field)


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def read_records(path: Source) -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` from a JSON list, a `{"data": [...]}` object, JSONL, or a `DatasetSource`.

    `where` is `file:line` for JSONL, `file[index]` for JSON and `name:split[index]` for a dataset;
    malformed input (syntax, invalid UTF-8, nesting too deep, numbers too long, a line longer than
    `MAX_LINE_BYTES`) raises `DataError` naming the line. Only regular files are opened (a FIFO would
    block forever). JSONL lines end at `\\n` only: U+2028 and other Unicode line breaks inside a string are text.
    """
    if isinstance(path, DatasetSource):
        yield from _dataset_records(path)
        return
    check_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    first = head[:1]
    if first == b"[" or (first == b"{" and not _is_jsonl(path)):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise _file_error(path, line, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise _file_error(path, e.lineno, f"malformed JSON: {e.msg}", e.colno, MALFORMED) from None
        except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting too deep
            raise _file_error(path, None, f"malformed JSON: {_json_limit(e)}", kind=MALFORMED) from None
        if isinstance(obj, dict):
            if not isinstance(obj.get("data"), list):
                raise _file_error(path, None, "a JSON object must hold the records as a list under \"data\"")
            obj = obj["data"]
        if not isinstance(obj, list):
            raise _file_error(path, None, f"expected a JSON list of records, got {type(obj).__name__}")
        for i, rec in enumerate(obj):
            yield f"{path}[{i}]", rec
        return
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise _file_error(path, lineno, f"line longer than {MAX_LINE_BYTES} bytes; refused (store "
                                  "large latents in .npy files via hidden_state_path, or raise "
                                  "INTERLAT_MAX_LINE_BYTES)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _file_error(path, lineno, f"not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _file_error(path, lineno, f"malformed JSON line: {e.msg}", e.colno, MALFORMED) from None
            except (ValueError, RecursionError) as e:
                raise _file_error(path, lineno, f"malformed JSON line: {_json_limit(e)}", kind=MALFORMED) from None
            yield f"{path}:{lineno}", record


MALFORMED = "malformed_json"  # a data file's JSON syntax (validation's kind); its other problems: unreadable_file


def _file_error(path: str, line: int | None, detail: str, column: int | None = None,
                kind: str = "unreadable_file") -> DataError:
    """A data file's own problem: `path:line[:column]: detail`, and the same in parts (`where` the file and
    line; `kind` as validation names it)."""
    place = path if line is None else f"{path}:{line}"
    return DataError(f"{place}{'' if column is None else f':{column}'}: {detail}", where=place, kind=kind,
                     detail=detail if column is None else f"column {column}: {detail}")


def _dataset_records(source: DatasetSource) -> Iterator[tuple[str, Any]]:
    """`(where, record)` of each row of a dataset's split, read with `datasets`' json loader; columns a row leaves
    null are left out, as if absent (Arrow gives every row every column of the dataset)."""
    import datasets

    found = dataset_data_files(resolve_dataset(source.name))
    files = found.get(source.split)
    if not files:
        raise DataError(where=str(source), kind="unreadable_file",
                        detail=f"no split {source.split!r} (found: {', '.join(found) or 'no .json/.jsonl file'}; "
                               "splits come from file names: train.jsonl, test.jsonl, ...)")
    objects = []  # {"data": [...]} files: the loader reads their records with field="data"
    for path in files:
        check_regular_file(path)
        objects.append(not _is_jsonl(path) and _first_byte(path) == b"{")
    if any(objects) and not all(objects):
        raise DataError(where=str(source), kind="unreadable_file", detail="mixes {\"data\": [...]} files with JSON "
                        "lines or lists in one split; use one form")
    try:
        rows = datasets.load_dataset("json", data_files={source.split: files}, split=source.split,
                                     field="data" if objects[0] else None)
    except Exception as e:  # unreadable or malformed files, mixed columns
        raise DataError(where=str(source), kind="unreadable_file",
                        detail=f"cannot be loaded with datasets.load_dataset ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
    for i, row in enumerate(rows):
        yield f"{source}[{i}]", _without_nulls(row)


def _first_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096).lstrip()[:1]


def _without_nulls(value: Any) -> Any:
    """Dict keys whose value is null dropped, recursively (a record's absent fields, a turn's absent keys)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list) and value and isinstance(value[0], (dict, list)):  # turns; not a list of numbers
        return [_without_nulls(v) for v in value]
    return value


def _json_limit(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0][:120] or type(e).__name__


def _is_jsonl(path: str) -> bool:
    """A file starting with `{` is JSONL when its first line is a complete record (not a `{"data": ...}`)."""
    with open(path, "rb") as f:
        first_line = f.readline(MAX_LINE_BYTES + 1).decode("utf-8", errors="replace")
    try:
        first = json.loads(first_line)
    except (ValueError, RecursionError):
        return False
    return not (isinstance(first, dict) and isinstance(first.get("data"), list) and "conversations" not in first)


def resolve_path(path: str, base_dir: str) -> str:
    """Relative paths in a data file are relative to the data file's folder; absolute ones stay."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def load_latents(source: Any, where: str = "", max_rows: int | None = None) -> np.ndarray:
    """A latent matrix [K, d] float32 from an inline list or a `.npy`/`.pt`/`.pth` path.

    `.npy` is read without pickles (its header's shape checked against the file's size first) and
    `.pt` with `weights_only=True` and must hold a plain tensor: a file from elsewhere can never run
    code here. Only real numbers are accepted (not booleans, complex, strings), all finite. With
    `max_rows`, only the first rows are read (and checked).
    """
    field = "hidden_state_path" if isinstance(source, str) else "hidden_state"
    name = f"{_prefix(where)}{field}"  # how messages name the latents: the record's field ...

    def error(kind: str, detail: str, named: str | None = None) -> DataError:
        return DataError(f"{named or name}: {detail}", where=where or None, field=field, kind=kind, detail=detail)

    def check_dtype(dtype, named: str | None = None) -> None:  # real numbers: not booleans, not complex
        if not _real_dtype(dtype):
            raise error("latent_not_numeric", f"values of dtype {dtype}; expected real numbers (float or int)", named)

    if isinstance(source, str):
        named = f"{name} {source!r}"  # ... and the file it names
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in LATENT_SUFFIXES:
            raise error("latent_unsupported_type", f"unsupported file type {suffix or '(none)'!r}; expected one of "
                        f"{', '.join(LATENT_SUFFIXES)}", named)
        try:
            if suffix == ".npy":
                _, dtype = read_npy_header(source, name)
                check_dtype(dtype, named)
                try:
                    array = np.load(source, mmap_mode="r", allow_pickle=False)
                except Exception as e:  # checked above; anything left is a file changed under us
                    raise error("latent_unreadable", f"cannot be read as a .npy array ({type(e).__name__})",
                                named) from None
            else:
                obj = load_torch_file(source, name, mmap=True)
                if not isinstance(obj, torch.Tensor):
                    raise error("latent_unreadable", f"expected a plain tensor, found {type(obj).__name__}", named)
                check_dtype(obj.dtype, named)
                array = obj
        except DataError as e:  # the file's own problem (safe_io): this record's, under the latent field
            if e.field:
                raise
            raise DataError(str(e), where=where or None, field=field, kind="latent_unreadable",
                            detail=e.detail) from None
    else:
        try:
            array = np.asarray(source)
        except (ValueError, TypeError, RecursionError):
            raise error("latent_not_numeric", "expected a 2-D array of numbers [K, d]") from None
        check_dtype(array.dtype)
    if array.ndim != 2:
        raise error("latent_not_2d", f"expected a 2-D array [K, d], got shape {tuple(array.shape)}")
    if max_rows is not None:
        array = array[:max_rows]
    if isinstance(array, torch.Tensor):
        array = array.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(array, dtype=np.float32, order="C")  # a copy: never a view of a mapped file
    bad = ~np.isfinite(array)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        n_nan = int(np.isnan(array).sum())
        found = ", ".join(f"{n} {what}" for n, what in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "infinite")) if n)
        raise error("latent_not_finite", f"non-finite values: {found} (values beyond float32's range count as "
                    f"infinite), first at row {r}, column {c}; expected finite numbers")
    return array


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _real_dtype(dtype) -> bool:
    """Real numbers only: a boolean or complex array is almost surely not hidden states."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point or (not dtype.is_complex and dtype != torch.bool)
    return np.dtype(dtype).kind in "iuf"


# ---------------------------------------------------------------------------------------------
# Records -> normalised samples
# ---------------------------------------------------------------------------------------------
def normalise_record(rec: dict, where: str, base_dir: str) -> dict:
    """The fields training needs, with the turns of either format as chat messages and paths made absolute."""
    messages = record_messages(rec, where)
    plan = rec.get("plan")
    if plan is None and rec.get("plan_path") is not None:
        plan = read_plan_file(resolve_path(rec["plan_path"], base_dir), f"{where}: plan_path")
    latent_path = rec.get("hidden_state_path")
    return {
        "id": str(rec.get("id", where)),
        "where": where,
        "messages": messages,
        "plan": plan or "",
        "hidden_state_path": resolve_path(latent_path, base_dir) if latent_path else None,
        "hidden_state": rec.get("hidden_state"),
    }


def read_plan_file(path: str, what: str = "") -> str:
    """A plan file's text (stripped); a folder, FIFO, missing or non-UTF-8 file is a `DataError`."""
    size = check_regular_file(path, what)
    if size > MAX_LINE_BYTES:
        detail = f"{size} bytes; a plan is text of at most {MAX_LINE_BYTES} bytes"
        raise DataError(f"{what}: {path}: {detail}", where=path, detail=detail)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        detail = f"line {line}: not UTF-8 text ({e.reason})"
        raise DataError(f"{what}: {path}:{line}: not UTF-8 text ({e.reason})", where=path, detail=detail) from None


# Control tokens in data. Decision (the same in training, evaluation, inference and the sender):
# text that spells a control token is refused, never escaped or tokenized as text. The latent
# head's own tokens (<FIRST_HUMAN_END>, <bop>, <eop>) would move or duplicate the latent block, and
# the tokenizer's special tokens (chat control strings such as <|im_end|>, <|im_start|>) inside a
# message would forge turn boundaries, and the model would be trained on (or answer) a conversation
# other than the file's. Escaping would silently change the text the user wrote.
def control_tokens(tokenizer) -> tuple[str, ...]:
    """Strings that the tokenizer turns into control tokens: the latent head's and its special tokens."""
    special = set(SPECIAL_TOKENS) | set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    return tuple(sorted(t for t in special if t))


def check_plain_text(text: str, tokenizer, field: str) -> None:
    """Raise `DataError` if `text` holds a control token of `tokenizer` (see `control_tokens`; with no
    tokenizer, the latent head's)."""
    _refuse_control_tokens(text, control_tokens(tokenizer), field)


def check_messages_text(messages: list[dict], tokenizer) -> None:
    tokens = control_tokens(tokenizer)  # once per conversation, not per message
    for i, m in enumerate(messages):
        _refuse_control_tokens(m["content"], tokens, f"message {i} ({m['role']})")


def _refuse_control_tokens(text: str, tokens: tuple[str, ...], field: str) -> None:
    found = [t for t in tokens if t in text]
    if found:
        raise DataError(f"{field}: contains the control token(s) {', '.join(found)} as text; control tokens in "
                        "data are refused (they would change the conversation's structure): remove them")


def encode_plan(tokenizer, plan: str) -> np.ndarray:
    """A plan's token ids (no special tokens added); a plan spelling a control token is refused."""
    if not plan:
        return np.zeros(0, dtype=np.int64)
    check_plain_text(plan, tokenizer, "plan")
    return np.asarray(tokenizer(plan, add_special_tokens=False)["input_ids"], dtype=np.int64)


def encode_conversation(tokenizer, messages: list[dict]) -> dict:
    """Token ids with the marker after the first user message, and labels for assistant turns only.

    Assistant spans are located in the rendered text by rendering each conversation prefix
    with the same chat template; tokens starting inside a span are supervised.
    """
    check_messages_text(messages, tokenizer)
    messages = with_marker(messages)

    def render(msgs, gen_prompt=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], gen_prompt=True), render(messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError("the chat template does not render conversations incrementally; "
                            "assistant turns cannot be located")
        end = len(through.rstrip())  # the content and its end-of-turn token, not the trailing newline
        spans.append((len(before), end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    supervised = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        supervised |= (starts >= s) & (starts < e)
    labels = np.where(supervised, ids, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "marker_index": find_marker(ids, tokenizer)}


def with_marker(messages: list[dict]) -> list[dict]:
    """A copy of chat messages with the marker appended to the first user message (where latents go)."""
    messages = [dict(m) for m in messages]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise DataError("the conversation has no user message to carry the latent message")
    if any(m["role"] == "assistant" for m in messages[:first_user]):
        raise DataError("the conversation starts with an assistant turn; expected a user turn before the first "
                        "assistant turn (the latent message goes after the first user message)")
    messages[first_user]["content"] += MARKER_TOKEN
    return messages


def find_marker(ids: np.ndarray, tokenizer) -> int:
    """The marker's position in token ids; it must be there exactly once."""
    positions = np.flatnonzero(ids == tokenizer.convert_tokens_to_ids(MARKER_TOKEN))
    if len(positions) != 1:
        raise DataError(f"the marker {MARKER_TOKEN} must appear exactly once (found {len(positions)}); "
                        "does a message contain it as text?")
    return int(positions[0])


def token_budget(model_max_length: int, prepended_length: int, plan_tokens: int) -> int:
    """The conversation's tokens that fit: the marker becomes <bop> block <eop>, and the longest block of any
    branch is the latents (<= prepended_length rows) or the whole plan. Truncation only ever cuts the end."""
    return max(0, model_max_length - 1 - max(prepended_length, plan_tokens))


def tokenize_sample(sample: dict, tokenizer, model_max_length: int, prepended_length: int) -> dict:
    """Tokenize one normalised sample; truncate the conversation's end so that every branch fits."""
    enc = encode_conversation(tokenizer, sample["messages"])
    plan_ids = encode_plan(tokenizer, sample["plan"])
    budget = token_budget(model_max_length, prepended_length, len(plan_ids))
    ids, labels = enc["input_ids"], enc["labels"]
    truncated = max(0, len(ids) - budget)
    if truncated:
        ids, labels = ids[:budget], labels[:budget]
    return {"input_ids": ids, "labels": labels, "marker_index": enc["marker_index"], "plan_ids": plan_ids,
            "truncated_tokens": truncated, "supervised_tokens": int((labels[1:] != IGNORE_INDEX).sum())}


# ---------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------
def load_samples(path: Source) -> list[dict]:
    """Read and normalise every record of a file or dataset (validation reports problems before this)."""
    base_dir = source_dir(path)
    samples = []
    for where, rec in read_records(path):
        try:
            samples.append(normalise_record(rec, where, base_dir))
        except DataError as e:
            if e.field is None:  # not the record's own field (e.g. its plan file): the error names its file
                raise
            raise DataError(where=where, sample_id=rec.get("id") if isinstance(rec, dict) else None, field=e.field,
                            kind=e.kind, detail=f"{e.detail}; run with --validate_only") from None
        except (KeyError, TypeError, AttributeError, OSError) as e:
            raise DataError(f"{where}: id {rec.get('id') if isinstance(rec, dict) else None!r}: "
                            f"malformed record ({type(e).__name__}: {e}); run with --validate_only") from None
    return samples


def plan_files_key(path: str) -> str:
    """A digest of the (path, size, mtime) of every `plan_path` file a data file names: plans are read
    into the cached dataset, so an edited plan file must key a new cache entry."""
    import hashlib

    digest = hashlib.sha256()
    base_dir = source_dir(path)
    for _, rec in read_records(path):
        plan_path = rec.get("plan_path") if isinstance(rec, dict) and rec.get("plan") is None else None
        if isinstance(plan_path, str) and plan_path:
            full = resolve_path(plan_path, base_dir)
            try:
                st = os.stat(full)
                digest.update(f"{full}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{full}\0missing\n".encode())
    return digest.hexdigest()


def build_hf_dataset(path: Source):
    """A `datasets.Dataset` of normalised records. From a file: memory-mapped, cached by the file's and its plan
    files' paths, sizes and mtimes; from a `DatasetSource`: in memory (`datasets` caches the source itself)."""
    import datasets

    def row(sample: dict) -> dict:
        return dict(sample, messages=json.dumps(sample["messages"]),
                    hidden_state=None if sample["hidden_state"] is None else json.dumps(sample["hidden_state"]))

    features = datasets.Features({k: datasets.Value("string") for k in
                                  ("id", "where", "messages", "plan", "hidden_state_path", "hidden_state")})
    if isinstance(path, DatasetSource):
        return datasets.Dataset.from_list([row(s) for s in load_samples(path)], features=features)
    stat = os.stat(path)
    plans = plan_files_key(path)

    def generate(path, mtime, size, plans):  # mtime/size/plans only key the cache
        for s in load_samples(path):
            yield row(s)

    return datasets.Dataset.from_generator(generate, features=features,
                                           gen_kwargs={"path": os.path.abspath(path), "mtime": stat.st_mtime_ns,
                                                       "size": stat.st_size, "plans": plans})


class ActorDataset(torch.utils.data.Dataset):
    """Tokenized samples with their latents; tokenization up front (cached) or on access (lazy)."""

    def __init__(self, hf_dataset, tokenizer, model_max_length: int, prepended_length: int, lazy: bool = False):
        self.tokenizer, self.model_max_length, self.prepended_length = tokenizer, model_max_length, prepended_length
        self.lazy = lazy
        self.rows = hf_dataset
        if not lazy:
            self.rows = hf_dataset.map(self._tokenize_row, desc="Tokenizing", load_from_cache_file=True)
            self.rows.set_format("numpy", columns=["input_ids", "labels", "plan_ids"], output_all_columns=True)
            dropped = [i for i, n in enumerate(self.rows["supervised_tokens"]) if n == 0]
            if dropped:
                logger.warning("%d samples have no supervised token left after truncation to model_max_length "
                               "%d and are skipped (first: %s)", len(dropped), model_max_length,
                               self.rows[dropped[0]]["where"])
                skip = set(dropped)
                self.rows = self.rows.select([i for i in range(len(self.rows)) if i not in skip])
            if len(hf_dataset) and not len(self.rows):
                raise DataError(f"{hf_dataset[0]['where'].rsplit(':', 1)[0].split('[')[0]}: no sample has an "
                                f"assistant token left after truncation to model_max_length {model_max_length} "
                                f"(room for the latent block or the plan text, whichever is longer, is kept free in each sample); "
                                "raise --model_max_length")

    def _tokenize_row(self, row: dict) -> dict:
        sample = dict(row, messages=json.loads(row["messages"]))
        try:
            return tokenize_sample(sample, self.tokenizer, self.model_max_length, self.prepended_length)
        except DataError as e:
            raise DataError(f"{row['where']}: id {row['id']!r}: {e}") from None

    @property
    def lengths(self) -> list[int] | None:
        """Token count per sample (for length-grouped batching); None when tokenizing lazily."""
        if self.lazy:
            return None
        return [len(x) for x in self.rows["input_ids"]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[int(i)]
        tokens = self._tokenize_row(row) if self.lazy else row
        latent_source = row["hidden_state_path"] or (json.loads(row["hidden_state"]) if row["hidden_state"] else None)
        latents = None if latent_source is None else load_latents(latent_source, f"{row['where']}: id {row['id']!r}",
                                                                   max_rows=self.prepended_length)
        return {"index": int(i), "input_ids": np.asarray(tokens["input_ids"]), "labels": np.asarray(tokens["labels"]),
                "marker_index": int(tokens["marker_index"]), "plan_ids": np.asarray(tokens["plan_ids"]),
                "latents": latents}


@dataclass
class LatentCollator:
    """Pads a list of samples into a batch (dynamic padding: to the longest sample, never to max length).

    Keys: `input_ids`, `labels`, `attention_mask` [B, T] (text with the marker), `marker_index` [B],
    `plan_ids` [B, P] + `plan_lengths` [B], `latents` [B, K, d] + `latent_lengths` [B], `index` [B].
    """

    pad_id: int
    latent_dim: int

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [torch.as_tensor(s["input_ids"]) for s in samples]
        batch = {
            "input_ids": self._pad(ids, self.pad_id),
            "labels": self._pad([torch.as_tensor(s["labels"]) for s in samples], IGNORE_INDEX),
            "attention_mask": self._pad([torch.ones(len(x), dtype=torch.long) for x in ids], 0),
            "marker_index": torch.tensor([s["marker_index"] for s in samples]),
            "plan_ids": self._pad([torch.as_tensor(s["plan_ids"], dtype=torch.long) for s in samples], self.pad_id),
            "plan_lengths": torch.tensor([len(s["plan_ids"]) for s in samples]),
            "index": torch.tensor([s["index"] for s in samples]),
        }
        latents = [torch.as_tensor(s["latents"]) if s["latents"] is not None
                   else torch.zeros(0, self.latent_dim) for s in samples]
        batch["latent_lengths"] = torch.tensor([len(x) for x in latents])
        batch["latents"] = pad_sequence(latents, batch_first=True) if max(len(x) for x in latents) else \
            torch.zeros(len(samples), 1, self.latent_dim)
        return batch

    @staticmethod
    def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        if not max(map(len, seqs)):
            return torch.full((len(seqs), 0), value, dtype=torch.long)
        return pad_sequence(seqs, batch_first=True, padding_value=value)


def split_train_eval(hf_dataset, eval_ratio: float, seed: int):
    """A seeded random split of one dataset into (train, eval)."""
    if not 0 < eval_ratio < 1:
        raise ValueError(f"--eval_ratio must be between 0 and 1 (exclusive), got {eval_ratio}")
    parts = hf_dataset.train_test_split(test_size=eval_ratio, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


class RankBalancedLengthSampler(torch.utils.data.Sampler[int]):
    """Training order with batches of similar lengths, each step's batches dealt evenly over the ranks.

    As transformers' `LengthGroupedSampler`: shuffle, sort groups of up to 50 global batches (per-device
    batch x ranks) by length, cut them into global batches, shuffle those (the longest first, so an
    out-of-memory shows at once). Then each global batch is dealt out round-robin: rank r's batch is every
    `world_size`-th sample of it, as each rank takes every `world_size`-th per-device batch of the stream
    (accelerate's batch sharding). Handing each rank a contiguous slice instead gives rank 0 the longest
    samples of every step, and the other ranks wait for it.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0,
                 max_group_batches: int = 50):
        self.lengths, self.batch_size, self.world_size = lengths, batch_size, world_size
        self.seed, self.max_group_batches, self.epoch = seed, max_group_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # the same order on every rank
        n, step = len(self.lengths), self.batch_size * self.world_size
        order = torch.randperm(n, generator=g).tolist()
        # Groups of several global batches (fewer for small datasets, to keep some randomness), as HF does.
        group = max(1, min(self.max_group_batches, n // (4 * step))) * step
        batches = []
        for start in range(0, n, group):
            by_length = sorted(order[start:start + group], key=self.lengths.__getitem__, reverse=True)
            batches += [by_length[i:i + step] for i in range(0, len(by_length), step)]
        full = [b for b in batches if len(b) == step]
        partial = [b for b in batches if len(b) < step]  # at most one: it goes last, where it splits unevenly
        full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda i: self.lengths[full[i][0]])
            full[0], full[longest] = full[longest], full[0]
        for batch in full:
            for rank in range(self.world_size):
                yield from batch[rank::self.world_size]
        for batch in partial:
            yield from batch
