"""Which run an output folder belongs to: never mix two runs' checkpoints, logs or models.

Each checkpoint (and the final output folder) holds `run_fingerprint.json`: the data files (path and
SHA-256 of their content), the base model and the arguments that define what is trained. A new run
refuses an `--output_dir` that already holds a run's files unless `--overwrite_output_dir` (the
Trainer convention) or `--resume_from_checkpoint`; resuming refuses a checkpoint whose fingerprint
differs in a field that must match, naming the field.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

from common.constants import HEAD_FILE, INTERRUPTED_DIR, LOSS_LOG_FILE

logger = logging.getLogger(__name__)

RUN_FILE = "run_fingerprint.json"
# Files and folders that say "a run wrote here".
RUN_ARTIFACTS = ("trainer_state.json", HEAD_FILE, LOSS_LOG_FILE, "training_args.bin", RUN_FILE,
                 "model.safetensors", "adapter_model.safetensors", INTERRUPTED_DIR)
# Arguments a resumed run must share with its checkpoint: they define the model, the data and its order.
# (Learning rates, loss weights, logging and saving may change on resumption, as with the Trainer.)
MUST_MATCH = ("model_name_or_path", "train_file", "dataset_name", "dataset_split", "eval_split", "eval_file",
              "eval_ratio", "prepended_length", "num_heads", "model_max_length", "lora_r", "lora_target_modules",
              "base_dtype", "seed", "data_seed", "per_device_train_batch_size")


def file_digest(path: str | None) -> dict | None:
    """`{"path", "sha256"}` of a data file (None for no file): the same content under the same name."""
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def run_fingerprint(model_args: Any, data_args: Any, args: Any) -> dict:
    """What identifies a run; written into every checkpoint and the output folder."""
    values = {**vars(model_args), **vars(data_args), "seed": args.seed, "data_seed": args.data_seed,
              "per_device_train_batch_size": args.per_device_train_batch_size,
              "learning_rate": args.learning_rate, "head_learning_rate": args.head_learning_rate}
    out = {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool, type(None)))}
    if not out.get("dataset_name"):  # the splits mean nothing without a dataset (nor in older checkpoints)
        for split in ("dataset_split", "eval_split"):
            out.pop(split, None)
    out["train_file"] = file_digest(data_args.train_file)
    out["eval_file"] = file_digest(data_args.eval_file)
    return out


def run_files_in(output_dir: str) -> list[str]:
    """The run artifacts (files and checkpoint folders) an output folder holds."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in RUN_ARTIFACTS or re.fullmatch(r"checkpoint-\d+", name))


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Raise `ValueError` if a new run would overwrite or mix with the run already in `output_dir`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir}: exists and is not a folder")
    found = run_files_in(output_dir)
    if not found or resuming:
        return
    if overwrite:
        logger.warning("--overwrite_output_dir: %s holds another run (%s); its files will be replaced",
                       output_dir, ", ".join(found[:6]))
        return
    raise ValueError(f"--output_dir {output_dir} already holds a run ({', '.join(found[:6])}"
                     f"{', ...' if len(found) > 6 else ''}): use --resume_from_checkpoint latest to continue it, "
                     "--overwrite_output_dir to replace it, or another --output_dir")


def check_resume_matches(checkpoint: str, fingerprint: dict) -> None:
    """Raise `ValueError` if `checkpoint` was written by a run that differs in a `MUST_MATCH` field."""
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.exists(path):
        logger.warning("%s has no %s (written by an older version): cannot check that it belongs to this run",
                       checkpoint, RUN_FILE)
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: {RUN_FILE} is unreadable ({e}); "
                         "cannot tell which run it belongs to") from None
    differ = []
    for key in MUST_MATCH:
        old, new = saved.get(key), fingerprint.get(key)
        if isinstance(old, dict) or isinstance(new, dict):  # data files: the content decides
            old, new = (x and x.get("sha256") for x in (old, new))
            if old != new:
                differ.append(f"{key} (content changed or another file: "
                              f"{(saved.get(key) or {}).get('path')} -> {(fingerprint.get(key) or {}).get('path')})")
        elif old != new:
            differ.append(f"{key} ({old!r} -> {new!r})")
    if differ:
        raise ValueError(f"--resume_from_checkpoint: {checkpoint} belongs to another run: {'; '.join(differ)}. "
                         "Resume with the same data and arguments, or start a new run in another --output_dir")
