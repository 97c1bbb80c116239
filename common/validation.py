"""Check data files before training: every record, every problem, with its place.

    python -m common.validation data/train.jsonl data/eval.jsonl [--tokenizer DIR --model_max_length 3072]

`validate_files(paths, ...)` reads each file (or `data.DatasetSource`) with `data.read_records`, checks every record
and returns a `Report`: a list of `Problem`s (severity, location `file:line` or
`file[index]`, sample id, field, message saying what was found and what was expected),
`report.ok` (no errors) and `report.format()` (one line per problem, then counts per kind).
Latent files are opened the way training opens them (`.npy` without pickles, `.pt`/`.pth`
with `weights_only=True` and only a plain tensor accepted): checking a file from elsewhere
never runs code.

Rule: an **error** is data that would stop training (at load time or mid-run), that
training would read differently from what the file says, or that makes the results
untrustworthy; a **warning** is data that trains, but where a sample is skipped, cut, or
learns less than the file suggests. Training should refuse to start on any error.

| kind | severity | what was found |
|---|---|---|
| unreadable_file | error | missing, a folder, no permission, not UTF-8, JSON neither a list nor `{"data": [...]}` |
| malformed_json | error | JSON/JSONL syntax error (line and column); the rest of that file is not checked |
| empty_file | error | a file with no records |
| record_not_object | error | a record that is not a JSON object |
| missing_conversations | error | neither `conversations` nor `messages` (or null) |
| conversations_and_messages | error | both `conversations` and `messages`: which one is meant is unclear |
| conversations_not_list | error | `conversations` (or `messages`) is not a list |
| empty_conversations | error | `conversations` (or `messages`) is `[]` |
| turn_not_object | error | a turn that is not an object |
| unknown_role | error | `from` missing or not one of human, user, gpt, assistant, model, system; in `messages`, `role` not one of system, user, assistant |
| value_not_string | error | `value` (in `messages`: `content`) missing or not a string |
| reserved_token | error | a message or plan spelling a control token: `<FIRST_HUMAN_END>`, `<bop>`, `<eop>`, or (with a tokenizer or `control_strings`) its special tokens (chat control strings, e.g. ChatML's end of turn); refused, see `data.control_tokens` |
| no_human_turn | error | no human/user turn (the latent message goes after the first one) |
| assistant_first | error | an assistant turn before the first human/user turn (training cannot place the latent message) |
| no_assistant_turn | warning | no assistant turn: nothing to learn, the sample is skipped |
| plan_not_string | error | `plan` is not a string |
| plan_file_missing | error | `plan_path` not found (or not a non-empty string) |
| plan_file_unreadable | error | `plan_path` is a folder or not a regular file, or cannot be read as UTF-8 text |
| plan_path_ignored | warning | both `plan` and `plan_path`: `plan` is used |
| latent_path_not_string | error | `hidden_state_path` is not a non-empty string (e.g. `0`, `false`, `""`) |
| latent_unsupported_type | error | `hidden_state_path` is not `.npy`, `.pt` or `.pth` |
| latent_file_missing | error | `hidden_state_path` not found |
| latent_unreadable | error | corrupt, truncated, not a .npy/torch file, a folder or FIFO; pickled objects or a `.pt` not a plain tensor (refused, never unpickled) |
| latent_not_numeric | error | values that are not real numbers: strings, null, booleans, ragged rows, complex |
| latent_not_2d | error | not a 2-D array `[K, d]`, or `d` = 0 |
| latent_not_finite | error | NaN or ±inf values (also values beyond float32's range) |
| latent_width_mismatch | error | `d` differs from `expected_latent_dim` (a loaded head) or else the majority width |
| latent_empty | warning | K = 0 rows: trained as a sample without latents |
| latent_rows_cut | warning | K > prepended_length: only the first prepended_length rows are used |
| hidden_state_ignored | warning | both `hidden_state_path` and `hidden_state`: the path is used |
| duplicate_id | error | an id seen before, in any of the files (train/eval overlap), with its first location |
| missing_id | warning | no `id`: messages name the sample by its location |
| tokenization_failed | error | (tokenizer given) the chat template rejects the conversation |
| truncated | warning | (tokenizer and model_max_length given) the conversation's end will be cut: how many tokens |
| truncated_to_nothing | warning | (same) no supervised token left after truncation: the sample is skipped |
| no_plan_no_latents | warning | neither plan nor latents: no latent message to learn from |
| plan_without_latents | warning | a plan but no latents: trains on the plan text only |
| latents_without_plan | warning | latents but no plan: no plan-similarity term for this sample |
| check_failed | error | an unexpected failure while checking a record (reported, never a traceback) |

Duplicate ids are errors although training would run: they almost always mean a file
concatenated twice or an eval file that overlaps the training file, and they make every
message that names a sample ambiguous. `SEVERITY` below is the table in code.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.constants import MODEL_MAX_LENGTH, PREPENDED_LENGTH, SPECIAL_TOKENS
from common.safe_io import read_npy_header
from data import (LATENT_SUFFIXES, TURN_FORMATS, DataError, Source, control_tokens, load_latents, read_plan_file,
                  read_records, record_messages, resolve_path, source_dir, token_budget, tokenize_sample, turns_field)

SEVERITY = {
    "unreadable_file": "error", "malformed_json": "error", "empty_file": "error", "record_not_object": "error",
    "missing_conversations": "error", "conversations_not_list": "error", "empty_conversations": "error",
    "conversations_and_messages": "error", "turn_not_object": "error", "unknown_role": "error", "value_not_string": "error", "reserved_token": "error",
    "no_human_turn": "error", "assistant_first": "error", "no_assistant_turn": "warning",
    "plan_not_string": "error", "plan_file_missing": "error", "plan_file_unreadable": "error",
    "plan_path_ignored": "warning",
    "latent_path_not_string": "error", "latent_unsupported_type": "error", "latent_file_missing": "error",
    "latent_unreadable": "error", "latent_not_numeric": "error", "latent_not_2d": "error",
    "latent_not_finite": "error", "latent_width_mismatch": "error", "latent_empty": "warning",
    "latent_rows_cut": "warning", "hidden_state_ignored": "warning",
    "duplicate_id": "error", "missing_id": "warning",
    "tokenization_failed": "error", "truncated": "warning", "truncated_to_nothing": "warning",
    "no_plan_no_latents": "warning", "plan_without_latents": "warning", "latents_without_plan": "warning",
    "check_failed": "error",
}
_CHUNK_BYTES = 16 << 20  # latent values are checked this many bytes at a time


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    kind: str  # a key of SEVERITY
    location: str  # file:line, file[index], or the file
    sample_id: str | None
    field: str | None  # e.g. "conversations[2].from", "hidden_state_path"
    message: str  # what was found and what was expected

    def format(self) -> str:
        parts = [f"{self.severity}: {self.location}"]
        if self.sample_id is not None:
            parts.append(f"id {self.sample_id!r}")
        if self.field:
            parts.append(self.field)
        return ": ".join(parts + [f"{self.message} [{self.kind}]"])


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    records: int = 0
    latent_dim: int | None = None  # the width every sample should have (expected, else the majority)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self, severity: str) -> Counter:
        return Counter(p.kind for p in self.problems if p.severity == severity)

    def format_errors(self, limit: int = 50) -> str:
        """The errors only, one line each (at most `limit`): what a tool that refuses bad input prints."""
        lines = [p.format() for p in self.errors[:limit]]
        more = len(self.errors) - len(lines)
        return "\n".join(lines + ([f"... and {more} more error(s)"] if more > 0 else []))

    def format(self, max_per_kind: int | None = None) -> str:
        """One line per problem (at most `max_per_kind` of each kind), then counts per kind."""
        lines, shown = [], Counter()
        for p in self.problems:
            shown[p.kind] += 1
            if max_per_kind is None or shown[p.kind] <= max_per_kind:
                lines.append(p.format())
        if max_per_kind is not None:
            lines += [f"... and {n - max_per_kind} more {kind}" for kind, n in shown.items() if n > max_per_kind]
        errors, warnings = self.counts("error"), self.counts("warning")
        lines.append(f"checked {self.files} file(s), {self.records} record(s): "
                     f"{sum(errors.values())} error(s), {sum(warnings.values())} warning(s)")
        for name, counts in (("errors", errors), ("warnings", warnings)):
            if counts:
                lines.append(f"  {name}: " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common()))
        return "\n".join(lines)


class _Checker:
    def __init__(self, tokenizer, model_max_length, prepended_length, expected_latent_dim, check_values,
                 control_strings=None):
        self.report = Report()
        self.tokenizer = _prepared_tokenizer(tokenizer) if tokenizer is not None else None
        # control_tokens holds the latent head's tokens, with or without a tokenizer
        self.control_strings = tuple(sorted(set(control_tokens(self.tokenizer)) | set(control_strings or ())))
        self.model_max_length, self.prepended_length = model_max_length, prepended_length
        self.expected_latent_dim, self.check_values = expected_latent_dim, check_values
        self.first_seen: dict[str, str] = {}  # id -> location
        self.widths: list[tuple[int, int, str, str | None, str]] = []  # (d, order, where, id, field)
        self._order: list[int] = []  # sort key per problem: record number

    def add(self, kind: str, where: str, sample_id, field_name: str | None, message: str,
            file_level: bool = False) -> None:
        self.report.problems.append(Problem(SEVERITY[kind], kind, where, sample_id, field_name, message))
        # sort key: the record's number; a file's own problems come after its records
        self._order.append(self.report.records + (0.5 if file_level else 0))

    # -- files -------------------------------------------------------------------------------------
    def check_file(self, path: Source) -> None:
        self.report.files += 1
        base_dir = source_dir(path)
        n = 0
        try:
            for where, rec in read_records(path):
                n += 1
                self.report.records += 1
                try:
                    self.check_record(where, rec, base_dir)
                except Exception as e:  # never a traceback for bad data
                    sid = _sample_id(rec)
                    self.add("check_failed", where, sid, None, f"could not be checked: {type(e).__name__}: {e}")
        except DataError as e:  # the file's own problem: its place and kind come with it
            kind = e.kind if e.kind in ("malformed_json", "unreadable_file") else "unreadable_file"
            rest = "; the rest of this file was not checked" if kind == "malformed_json" else ""
            self.add(kind, e.where or str(path), None, None, e.detail + rest, file_level=True)
            return
        except (OSError, UnicodeDecodeError) as e:
            self.add("unreadable_file", path, None, None, f"cannot be read: {type(e).__name__}: {e}",
                     file_level=True)
            return
        if n == 0:
            self.add("empty_file", path, None, None, "holds no records; expected a JSON list, "
                     "{\"data\": [...]} or one JSON object per line", file_level=True)

    # -- records -----------------------------------------------------------------------------------
    def check_record(self, where: str, rec: Any, base_dir: str) -> None:
        if not isinstance(rec, dict):
            self.add("record_not_object", where, None, None,
                     f"found a {_json_type(rec)}; expected an object with \"conversations\"")
            return
        sid = _sample_id(rec)
        if sid is None:
            self.add("missing_id", where, None, "id", "no id; messages will name this sample by its location")
        elif sid in self.first_seen:
            self.add("duplicate_id", where, sid, "id", f"duplicate id {sid!r}: first seen at {self.first_seen[sid]}")
        else:
            self.first_seen[sid] = where

        conversation_ok = self.check_conversations(where, sid, rec)
        plan, plan_ok = self.check_plan(where, sid, rec, base_dir)
        has_latents = self.check_latents(where, sid, rec, base_dir)
        has_plan = bool(plan) if plan_ok else _declares_plan(rec)
        if not has_plan and not has_latents:
            self.add("no_plan_no_latents", where, sid, "plan, hidden_state",
                     "neither a plan nor latents: no latent message to learn from (trains as a plain chat)")
        elif not has_latents:
            self.add("plan_without_latents", where, sid, "hidden_state",
                     "a plan but no latents: trains on the plan text only")
        elif not has_plan:
            self.add("latents_without_plan", where, sid, "plan",
                     "latents but no plan: no plan-similarity term for this sample")
        if conversation_ok and plan_ok and self.tokenizer is not None:
            self.check_length(where, sid, rec, plan)

    def check_conversations(self, where, sid, rec) -> bool:
        """The turns, in either format (`data.TURN_FORMATS`): every problem of every turn, with its field."""
        if rec.get("conversations") is not None and rec.get("messages") is not None:
            self.add("conversations_and_messages", where, sid, "conversations, messages",
                     "both are given; expected one: conversations [{from, value}] or messages [{role, content}]")
            return False
        key = turns_field(rec)
        role_key, text_key, role_map = TURN_FORMATS[key]
        shape = f"{{\"{role_key}\", \"{text_key}\"}}"
        conv = rec.get(key)
        if conv is None:
            self.add("missing_conversations", where, sid, "conversations",
                     "missing; expected conversations, a list of {\"from\", \"value\"} turns, or messages, a list "
                     "of {\"role\", \"content\"} turns")
            return False
        if not isinstance(conv, list):
            self.add("conversations_not_list", where, sid, key,
                     f"found a {_json_type(conv)}; expected a list of {shape} turns")
            return False
        if not conv:
            self.add("empty_conversations", where, sid, key,
                     "empty; expected at least a human turn and an assistant turn")
            return False
        ok, roles = True, []
        for i, turn in enumerate(conv):
            f = f"{key}[{i}]"
            if not isinstance(turn, dict):
                self.add("turn_not_object", where, sid, f, f"found a {_json_type(turn)}; "
                         f"expected an object {{\"{role_key}\": ..., \"{text_key}\": ...}}")
                ok = False
                continue
            role = turn.get(role_key)
            if not isinstance(role, str) or role not in role_map:
                found = "missing" if role_key not in turn else f"found {role!r}"
                self.add("unknown_role", where, sid, f"{f}.{role_key}",
                         f"{found}; expected one of {', '.join(sorted(role_map))}")
                ok = False
            else:
                roles.append(role_map[role])
            value = turn.get(text_key)
            if not isinstance(value, str):
                found = "missing" if text_key not in turn else f"found a {_json_type(value)}"
                self.add("value_not_string", where, sid, f"{f}.{text_key}", f"{found}; expected a string")
                ok = False
            else:
                if not self.check_control_strings(where, sid, f"{f}.{text_key}", value):
                    ok = False
        if len(roles) == len(conv):  # every role known: else the unknown one may be the missing side
            if "user" not in roles:
                self.add("no_human_turn", where, sid, key,
                         f"no human/user turn (roles: {', '.join(t[role_key] for t in conv)}); expected one: "
                         "the latent message goes after the first")
                ok = False
            elif "assistant" in roles[:roles.index("user")]:
                i = roles.index("assistant")
                self.add("assistant_first", where, sid, f"{key}[{i}].{role_key}",
                         f"an assistant turn ({conv[i][role_key]!r}) before the first human/user turn; expected the "
                         "conversation to start with a human turn (after an optional system turn)")
                ok = False
            elif "assistant" not in roles:
                self.add("no_assistant_turn", where, sid, key,
                         "no assistant (gpt) turn: nothing to learn, the sample is skipped")
        return ok

    def check_control_strings(self, where, sid, field_name: str, text: str) -> bool:
        """False (and an error) if `text` spells a control token; see `data.control_tokens` for why."""
        found = [t for t in self.control_strings if t in text]
        if found:
            self.add("reserved_token", where, sid, field_name,
                     f"contains {', '.join(found)} as text; control tokens in data are refused (they would change "
                     "the conversation's structure or the latent block): remove them")
        return not found

    def check_plan(self, where, sid, rec, base_dir) -> tuple[str, bool]:
        """(the plan text training will use, whether the plan fields are usable)."""
        plan, plan_path = rec.get("plan"), rec.get("plan_path")
        if plan is not None:
            if not isinstance(plan, str):
                self.add("plan_not_string", where, sid, "plan", f"found a {_json_type(plan)}; expected a string")
                return "", False
            if plan_path:
                self.add("plan_path_ignored", where, sid, "plan_path",
                         "both plan and plan_path are given; plan is used, plan_path ignored")
            return plan, self.check_control_strings(where, sid, "plan", plan)  # as training uses it (unstripped)
        if plan_path is None:
            return "", True
        if not isinstance(plan_path, str) or not plan_path:
            self.add("plan_file_missing", where, sid, "plan_path",
                     f"found {_json_value(plan_path)}; expected a path to a text file")
            return "", False
        full = resolve_path(plan_path, base_dir)
        if not os.path.lexists(full):
            self.add("plan_file_missing", where, sid, "plan_path",
                     f"{plan_path!r}: file not found (looked for {full}; relative paths are relative to the "
                     "data file's folder)")
            return "", False
        try:
            plan = read_plan_file(full)
        except DataError as e:
            self.add("plan_file_unreadable", where, sid, "plan_path", f"{plan_path!r}: {e.detail}")
            return "", False
        except OSError as e:
            self.add("plan_file_unreadable", where, sid, "plan_path",
                     f"{plan_path!r}: cannot be read ({e.strerror or type(e).__name__})")
            return "", False
        return plan, self.check_control_strings(where, sid, "plan_path", plan)

    # -- latents -----------------------------------------------------------------------------------
    def check_latents(self, where, sid, rec, base_dir) -> bool:
        """Checks the latents; returns whether the record declares (non-empty) latents."""
        path, inline = rec.get("hidden_state_path"), rec.get("hidden_state")
        if path is not None:
            if inline is not None and path:
                self.add("hidden_state_ignored", where, sid, "hidden_state",
                         "both hidden_state_path and hidden_state are given; the path is used")
            if not isinstance(path, str) or not path:
                self.add("latent_path_not_string", where, sid, "hidden_state_path",
                         f"found {_json_value(path)}; expected a path to a .npy/.pt/.pth file (or leave the field "
                         "out, or null, for a sample without latents)")
                return True
            return self._check_latent_file(where, sid, path, resolve_path(path, base_dir))
        if inline is None:
            return False
        f = "hidden_state"
        if not isinstance(inline, list):
            self.add("latent_not_2d", where, sid, f, f"found a {_json_type(inline)}; expected a 2-D list [K, d]")
            return True
        try:
            array = np.asarray(inline)
        except (ValueError, TypeError, RecursionError, OverflowError):
            self.add("latent_not_numeric", where, sid, f,
                     "rows of different lengths (ragged); expected a 2-D list of numbers [K, d]")
            return True
        if array.dtype.kind not in "iuf":
            self.add("latent_not_numeric", where, sid, f,
                     f"found {_describe_kind(array.dtype)} values; expected numbers [K, d]")
            return True
        return self._check_array(where, sid, f, array)

    def _check_latent_file(self, where, sid, path, full) -> bool:
        f = "hidden_state_path"
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in LATENT_SUFFIXES:
            self.add("latent_unsupported_type", where, sid, f,
                     f"{path!r}: unsupported file type {suffix or '(none)'!r}; expected one of "
                     f"{', '.join(LATENT_SUFFIXES)}")
            return True
        if not os.path.lexists(full):
            self.add("latent_file_missing", where, sid, f,
                     f"{path!r}: file not found (looked for {full}; relative paths are relative to the data "
                     "file's folder)")
            return True
        if suffix == ".npy":
            try:
                read_npy_header(full)  # a folder, FIFO, non-NumPy, pickled or truncated file; never allocates
                array = np.load(full, mmap_mode="r", allow_pickle=False)
            except DataError as e:
                self.add("latent_unreadable", where, sid, f, f"{path!r}: {e.detail}")
                return True
            except Exception as e:  # no permission, changed under us
                self.add("latent_unreadable", where, sid, f,
                         f"{path!r}: cannot be read as a .npy array: {type(e).__name__}: {_first_line(e)}")
                return True
            if not isinstance(array, np.ndarray):  # e.g. an .npz archive named .npy
                self.add("latent_unreadable", where, sid, f,
                         f"{path!r}: holds a {type(array).__name__}, not a single array (an .npz archive?); "
                         "expected one array saved with np.save")
                return True
            if array.dtype.kind not in "iuf":
                self.add("latent_not_numeric", where, sid, f,
                         f"{path!r}: found {_describe_kind(array.dtype)} values (dtype {array.dtype}); "
                         "expected numbers")
                return True
        else:
            try:  # weights_only=True and a plain tensor only: a file from elsewhere never runs code here
                array = load_latents(full, where)
            except DataError as e:  # structured: its kind and the reason alone
                self.add(e.kind if e.kind in SEVERITY else "latent_unreadable", where, sid, f, f"{path!r}: {e.detail}")
                return True
        return self._check_array(where, sid, f, array, name=f"{path!r}: ")

    def _check_array(self, where, sid, f, array: np.ndarray, name: str = "") -> bool:
        if array.ndim != 2 or array.shape[1] == 0:
            self.add("latent_not_2d", where, sid, f,
                     f"{name}shape {tuple(array.shape)}; expected a 2-D array [K, d] with d > 0")
            return True
        k, d = array.shape
        self.widths.append((d, self.report.records, where, sid, f))
        if k == 0:
            self.add("latent_empty", where, sid, f,
                     f"{name}shape {tuple(array.shape)}: no latent rows (K = 0); trained as a sample without latents")
            return False
        if self.prepended_length and k > self.prepended_length:
            self.add("latent_rows_cut", where, sid, f,
                     f"{name}{k} rows; only the first prepended_length = {self.prepended_length} are used")
        if self.check_values and array.dtype.kind == "f":
            self._check_finite(where, sid, f, array, name)
        return True

    def _check_finite(self, where, sid, f, array, name) -> None:
        k, d = array.shape
        rows = max(1, _CHUNK_BYTES // max(1, d * array.dtype.itemsize))
        nan = inf = overflow = 0
        first = None
        for start in range(0, k, rows):
            block = np.asarray(array[start:start + rows])
            with np.errstate(over="ignore", invalid="ignore"):
                bad32 = ~np.isfinite(block.astype(np.float32, copy=False))
            if not bad32.any():
                continue
            n_nan, n_inf = int(np.isnan(block).sum()), int(np.isinf(block).sum())
            nan, inf, overflow = nan + n_nan, inf + n_inf, overflow + int(bad32.sum()) - n_nan - n_inf
            if first is None:
                r, c = np.argwhere(bad32)[0]
                first = (start + int(r), int(c))
        if first is not None:
            found = ", ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite"),
                                                           (overflow, "beyond float32 range")) if n)
            self.add("latent_not_finite", where, sid, f,
                     f"{name}{found} value(s) of {k * d} (first at row {first[0]}, column {first[1]}); "
                     "expected finite numbers")

    def check_widths(self) -> None:
        if not self.widths:
            self.report.latent_dim = self.expected_latent_dim
            return
        counts = Counter(d for d, *_ in self.widths)
        if self.expected_latent_dim is not None:
            target, why = self.expected_latent_dim, "the width the latent head was built for (expected_latent_dim)"
        else:
            target, n = counts.most_common(1)[0]  # ties: the width seen first
            first = next(w for w in self.widths if w[0] == target)[2]
            why = f"the majority width ({n} of {len(self.widths)} samples with latents; first at {first})"
        self.report.latent_dim = target
        for d, order, where, sid, f in self.widths:
            if d != target:
                self.report.problems.append(Problem("error", "latent_width_mismatch", where, sid, f,
                                                    f"latent width d = {d}; expected {target}, {why}"))
                self._order.append(order)

    # -- length ------------------------------------------------------------------------------------
    def check_length(self, where, sid, rec, plan: str) -> None:
        messages = record_messages(rec, where)
        limit = self.model_max_length if self.model_max_length is not None else sys.maxsize // 2
        try:
            out = tokenize_sample({"messages": messages, "plan": plan}, self.tokenizer, limit, self.prepended_length)
        except Exception as e:  # a template that rejects the roles' order, or renders non-incrementally
            self.add("tokenization_failed", where, sid, "conversations",
                     f"the chat template cannot tokenize this conversation: {type(e).__name__}: {_first_line(e)}")
            return
        if self.model_max_length is None or not out["truncated_tokens"]:
            return
        cut = out["truncated_tokens"]
        total = len(out["input_ids"]) + cut
        budget = token_budget(self.model_max_length, self.prepended_length, len(out["plan_ids"]))
        detail = (f"the conversation is {total} tokens, the budget {budget} = model_max_length "
                  f"{self.model_max_length} - 1 - max(prepended_length {self.prepended_length}, plan "
                  f"{len(out['plan_ids'])} tokens)")
        if out["supervised_tokens"] == 0:
            self.add("truncated_to_nothing", where, sid, "conversations",
                     f"{detail}: after cutting the last {cut} tokens no assistant token is left; the sample is "
                     "skipped")
        else:
            self.add("truncated", where, sid, "conversations",
                     f"{detail}: the last {cut} tokens will be truncated")

    def finish(self) -> Report:
        self.check_widths()
        order = sorted(range(len(self.report.problems)), key=lambda i: self._order[i])
        self.report.problems = [self.report.problems[i] for i in order]
        return self.report


def validate_files(paths: list[Source], tokenizer=None, model_max_length: int | None = None,
                   prepended_length: int = PREPENDED_LENGTH, expected_latent_dim: int | None = None,
                   check_values: bool = True, control_strings: tuple[str, ...] | None = None) -> Report:
    """Check every record of every file; return all problems found (never raises for bad data).

    `tokenizer` (left unchanged: the special tokens are added to a copy) enables the
    chat-template and length checks; `model_max_length` the truncation warnings.
    `expected_latent_dim` is the width a loaded latent head was built for; without it every
    sample's width is compared to the majority. `check_values=False` skips reading latent
    values (NaN/inf), keeping only the header/shape checks of `.npy` files. `control_strings` (e.g.
    `data.control_tokens(tokenizer)`) are refused in messages and plans without a full tokenization.
    """
    checker = _Checker(tokenizer, model_max_length, prepended_length, expected_latent_dim, check_values,
                       control_strings)
    for path in paths:
        checker.check_file(path)
    return checker.finish()


def validate_record(where: str, record: Any, base_dir: str, tokenizer=None, expected_latent_dim: int | None = None,
                    prepended_length: int = PREPENDED_LENGTH) -> Report:
    """The checks of `validate_files` for one record (e.g. the one `evaluation/inference.py --record` replies to)."""
    checker = _Checker(tokenizer, None, prepended_length, expected_latent_dim, True)
    checker.report.files = checker.report.records = 1
    try:
        checker.check_record(where, record, base_dir)
    except Exception as e:  # never a traceback for bad data
        checker.add("check_failed", where, _sample_id(record), None, f"could not be checked: {type(e).__name__}: {e}")
    return checker.finish()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _prepared_tokenizer(tokenizer):
    from latent_head import add_special_tokens

    if all(t in tokenizer.get_vocab() for t in SPECIAL_TOKENS) and tokenizer.pad_token is not None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    add_special_tokens(tokenizer)
    return tokenizer


def _sample_id(rec: Any) -> str | None:
    if not isinstance(rec, dict) or rec.get("id") is None or rec.get("id") == "":
        return None
    return str(rec["id"])


def _declares_plan(rec: dict) -> bool:
    plan = rec.get("plan")
    return bool(plan) if plan is not None else bool(rec.get("plan_path"))


def _json_value(x: Any) -> str:
    """How a JSON value reads in a message: `0`, `false`, `an empty string`, `a list`."""
    if x == "" and isinstance(x, str):
        return "an empty string"
    if isinstance(x, bool) or x is None:
        return {True: "true", False: "false", None: "null"}[x]
    if isinstance(x, (int, float)):
        return f"the number {x}"
    return f"a {_json_type(x)}"


def _json_type(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(x), type(x).__name__)


def _describe_kind(dtype: np.dtype) -> str:
    return {"U": "string", "S": "byte-string", "O": "non-numeric (null or mixed)", "b": "boolean",
            "c": "complex", "V": "structured", "M": "datetime", "m": "timedelta"}.get(dtype.kind, str(dtype))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check interlat actor data files (JSON/JSONL) and their latents.")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id: enables chat-template and length checks")
    parser.add_argument("--model_max_length", type=int, default=MODEL_MAX_LENGTH,
                        help="longest sequence, latent block included (default %(default)s, as train_actor.py); "
                             "used with --tokenizer")
    parser.add_argument("--prepended_length", type=int, default=PREPENDED_LENGTH, help="latent rows used per sample")
    parser.add_argument("--latent_dim", type=int, default=None,
                        help="the width every latent must have (default: the majority width)")
    parser.add_argument("--max_per_kind", type=int, default=None, help="print at most N lines of each kind")
    parser.add_argument("--skip_values", action="store_true", help="do not read latent values (NaN/inf check)")
    args = parser.parse_args(argv)

    tokenizer = None
    if args.tokenizer:
        try:
            from transformers import AutoTokenizer

            from common.models import resolve_model

            tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer))
        except Exception as e:
            print(f"error: cannot load the tokenizer {args.tokenizer!r}: {type(e).__name__}: {_first_line(e)}",
                  file=sys.stderr)
            return 2
    report = validate_files(args.files, tokenizer=tokenizer, model_max_length=args.model_max_length,
                            prepended_length=args.prepended_length, expected_latent_dim=args.latent_dim,
                            check_values=not args.skip_values)
    print(report.format(max_per_kind=args.max_per_kind))
    if tokenizer is None:
        print("note: no --tokenizer given: chat-template and length checks skipped")
    return 0 if report.ok else 1


def cli() -> None:
    """The `interlat-validate` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
