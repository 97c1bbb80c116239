"""Everything from data files to batches: reading, formatting, labels, latents, collation.

A record (see README) is `{"id", "conversations": [{"from", "value"}], "plan" | "plan_path",
"hidden_state" | "hidden_state_path"}`. Each conversation is rendered with the tokenizer's
chat template; the first human message ends with the `<FIRST_HUMAN_END>` marker, which
the model later replaces by `<bop> latents/plan <eop>`. Labels supervise assistant turns
only (their content and end-of-turn token).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from latent_head import IGNORE_INDEX, MARKER_TOKEN

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system"}
LATENT_SUFFIXES = (".npy", ".pt", ".pth")


class DataError(ValueError):
    """A problem with the user's data, with its location (file, line or index, sample id, field)."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` from a JSON list, a `{"data": [...]}` object, or JSONL.

    `where` is `file:line` for JSONL and `file[index]` for JSON; malformed input raises
    `DataError` naming the line (and column).
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    first = head[:1]
    if first == b"[" or (first == b"{" and not _is_jsonl(path)):
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        if isinstance(obj, dict):
            if not isinstance(obj.get("data"), list):
                raise DataError(f"{path}: a JSON object must hold the records as a list under \"data\"")
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(obj).__name__}")
        for i, rec in enumerate(obj):
            yield f"{path}[{i}]", rec
        return
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}:{e.colno}: malformed JSON line: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from None


def _is_jsonl(path: str) -> bool:
    """A file starting with `{` is JSONL when its first line is a complete record (not a `{"data": ...}`)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first_line = f.readline()
    try:
        first = json.loads(first_line)
    except json.JSONDecodeError:
        return False
    return not (isinstance(first, dict) and isinstance(first.get("data"), list) and "conversations" not in first)


def resolve_path(path: str, base_dir: str) -> str:
    """Relative paths in a data file are relative to the data file's folder; absolute ones stay."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def load_latents(source: Any, where: str = "") -> np.ndarray:
    """A latent matrix [K, d] float32 from an inline list or a `.npy`/`.pt`/`.pth` path.

    `.npy` is read without pickles and `.pt` with `weights_only=True` and must hold a plain
    tensor: a file from elsewhere can never run code here.
    """
    if isinstance(source, str):
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in LATENT_SUFFIXES:
            raise DataError(f"{where}: hidden_state_path {source!r}: unsupported file type {suffix!r} "
                            f"(expected one of {', '.join(LATENT_SUFFIXES)})")
        if not os.path.exists(source):
            raise DataError(f"{where}: hidden_state_path {source!r}: file not found")
        try:
            if suffix == ".npy":
                array = np.load(source, allow_pickle=False)
            else:
                obj = torch.load(source, map_location="cpu", weights_only=True)
                if not isinstance(obj, torch.Tensor):
                    raise DataError(f"{where}: hidden_state_path {source!r}: expected a plain tensor, "
                                    f"found {type(obj).__name__}")
                array = obj.float().numpy()
            array = np.asarray(array, dtype=np.float32)
        except DataError:
            raise
        except Exception as e:  # unreadable, truncated, not numeric, or a pickle that weights_only refused
            raise DataError(f"{where}: hidden_state_path {source!r}: cannot be read safely as a numeric array "
                            f"({type(e).__name__}); pickled objects are refused, never unpickled") from None
    else:
        try:
            array = np.asarray(source, dtype=np.float32)
        except (ValueError, TypeError):
            raise DataError(f"{where}: hidden_state: expected a 2-D array of numbers [K, d]") from None
    if array.ndim != 2:
        raise DataError(f"{where}: hidden_state: expected a 2-D array [K, d], got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Records -> normalised samples
# ---------------------------------------------------------------------------------------------
def normalise_record(rec: dict, where: str, base_dir: str) -> dict:
    """The fields training needs, with roles mapped to chat roles and paths made absolute."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    plan = rec.get("plan")
    if plan is None and rec.get("plan_path"):
        with open(resolve_path(rec["plan_path"], base_dir), encoding="utf-8") as f:
            plan = f.read().strip()
    latent_path = rec.get("hidden_state_path")
    return {
        "id": str(rec.get("id", where)),
        "where": where,
        "messages": messages,
        "plan": plan or "",
        "hidden_state_path": resolve_path(latent_path, base_dir) if latent_path else None,
        "hidden_state": rec.get("hidden_state"),
    }


def encode_conversation(tokenizer, messages: list[dict]) -> dict:
    """Token ids with the marker after the first user message, and labels for assistant turns only.

    Assistant spans are located in the rendered text by rendering each conversation prefix
    with the same chat template; tokens starting inside a span are supervised.
    """
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
    messages[first_user]["content"] += MARKER_TOKEN
    return messages


def find_marker(ids: np.ndarray, tokenizer) -> int:
    """The marker's position in token ids; it must be there exactly once."""
    positions = np.flatnonzero(ids == tokenizer.convert_tokens_to_ids(MARKER_TOKEN))
    if len(positions) != 1:
        raise DataError(f"the marker {MARKER_TOKEN} must appear exactly once (found {len(positions)}); "
                        "does a message contain it as text?")
    return int(positions[0])


def tokenize_sample(sample: dict, tokenizer, model_max_length: int, prepended_length: int) -> dict:
    """Tokenize one normalised sample; truncate the conversation's end so that every branch fits."""
    enc = encode_conversation(tokenizer, sample["messages"])
    plan_ids = np.asarray(tokenizer(sample["plan"], add_special_tokens=False)["input_ids"] if sample["plan"] else [],
                          dtype=np.int64)
    # The marker becomes <bop> block <eop>; the longest block of any branch is the latents
    # (<= prepended_length rows) or the whole plan. Truncation only ever cuts the end.
    budget = model_max_length - 1 - max(prepended_length, len(plan_ids))
    ids, labels = enc["input_ids"], enc["labels"]
    truncated = max(0, len(ids) - budget)
    if truncated:
        ids, labels = ids[:budget], labels[:budget]
    return {"input_ids": ids, "labels": labels, "marker_index": enc["marker_index"], "plan_ids": plan_ids,
            "truncated_tokens": truncated, "supervised_tokens": int((labels[1:] != IGNORE_INDEX).sum())}


# ---------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------
def load_samples(path: str) -> list[dict]:
    """Read and normalise every record of a file (validation reports problems before this)."""
    base_dir = os.path.dirname(os.path.abspath(path))
    samples = []
    for where, rec in read_records(path):
        try:
            samples.append(normalise_record(rec, where, base_dir))
        except (KeyError, TypeError, AttributeError, OSError) as e:
            raise DataError(f"{where}: id {rec.get('id') if isinstance(rec, dict) else None!r}: "
                            f"malformed record ({type(e).__name__}: {e}); run with --validate_only") from None
    return samples


def build_hf_dataset(path: str):
    """A memory-mapped `datasets.Dataset` of normalised records, cached by file path and mtime."""
    import datasets

    stat = os.stat(path)

    def generate(path, mtime, size):  # mtime/size only key the cache
        for s in load_samples(path):
            s = dict(s)
            s["messages"] = json.dumps(s["messages"])
            s["hidden_state"] = None if s["hidden_state"] is None else json.dumps(s["hidden_state"])
            yield s

    features = datasets.Features({k: datasets.Value("string") for k in
                                  ("id", "where", "messages", "plan", "hidden_state_path", "hidden_state")})
    return datasets.Dataset.from_generator(generate, features=features,
                                           gen_kwargs={"path": os.path.abspath(path), "mtime": stat.st_mtime_ns,
                                                       "size": stat.st_size})


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
        latents = None if latent_source is None else load_latents(latent_source, f"{row['where']}: id {row['id']!r}")
        return {"index": int(i), "input_ids": np.asarray(tokens["input_ids"]), "labels": np.asarray(tokens["labels"]),
                "marker_index": int(tokens["marker_index"]), "plan_ids": np.asarray(tokens["plan_ids"]),
                "latents": None if latents is None else latents[: self.prepended_length]}


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
