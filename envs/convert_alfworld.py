"""Convert ALFWorld SFT data (ETO / AgentInstruct conversations) to this project's training records.

    python -m envs.convert_alfworld --input alfworld_sft.json --output data/alfworld/train_raw.jsonl \
        [--latent_turn task|first] [--plan expert_actions|none]

In those files the first human turn is usually a generic instruction (and in AgentInstruct a worked
example), answered by "OK"; the task ("You are in the middle of a room ... Your task is to: ...") comes
in a later human turn. The latent message goes at the end of the first human turn, so:

  --latent_turn task   (default) the human turns up to the task turn are merged into one, joined by a
                       blank line, and the acknowledgements between them dropped, as the published
                       recipe does: the message follows the task. The task turn is the human turn
                       before the first assistant turn that is not an acknowledgement ("OK", "Okay",
                       "Sure", "Understood"); an example inside the instruction is never mistaken for it.
  --latent_turn first  the conversation is kept as it is: the message follows the generic instruction.

`--plan expert_actions` writes `plan` = the expert's actions in order ("go to countertop 1, take mug 1
from countertop 1, ..."), for `sender/collect.py --mode teacher_forced`; `--plan none` writes
no plan (use `--mode generate`: the sender writes one). Other fields are kept (`game_file`, which
`envs/play.py --env alfworld` plays); per-turn `loss` keys are dropped (every assistant turn is
supervised); `instruction` is what the merged first turn holds before the game's first observation
("You are in the middle of a room ..."): `envs/play.py --env alfworld` writes it before the observation.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

from data import DataError, read_records

ACKNOWLEDGEMENTS = {"ok", "okay", "sure", "understood", "got it"}
MERGE_SEPARATOR = "\n\n"
OBSERVATION_START = "You are in the middle of a room"  # how every ALFWorld game's first observation begins


def _is_acknowledgement(text: str) -> bool:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) in ACKNOWLEDGEMENTS


def task_turn_index(conversations: Sequence[dict]) -> int:
    """Index of the human turn that states the task (see module doc)."""
    last_human = None
    for i, turn in enumerate(conversations):
        if turn["from"] in ("human", "user"):
            last_human = i
        elif turn["from"] in ("gpt", "assistant", "model") and not _is_acknowledgement(turn["value"]):
            break
    if last_human is None:
        raise DataError("no human turn before the first reply")
    return last_human


def expert_actions(conversations: Sequence[dict]) -> list[str]:
    """The expert's actions: each non-acknowledgement reply's `Action:` line (or its last line)."""
    actions = []
    for turn in conversations:
        if turn["from"] in ("gpt", "assistant", "model") and not _is_acknowledgement(turn["value"]):
            text = turn["value"]
            action = text.rsplit("Action:", 1)[1] if "Action:" in text else text.strip().splitlines()[-1]
            actions.append(action.strip().splitlines()[0].strip() if action.strip() else "")
    return [a for a in actions if a]


def convert_record(record: dict, latent_turn: str = "task", plan: str = "expert_actions") -> dict:
    """One converted record (raises `DataError` naming the field on malformed input)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("conversations: expected a non-empty list of turns")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"conversations[{k}]: expected {{\"from\": str, \"value\": str}}")
    turns = [{"from": t["from"], "value": t["value"]} for t in turns]  # drops per-turn `loss` keys
    out = {k: v for k, v in record.items() if k != "conversations"}
    if latent_turn == "task":
        t = task_turn_index(turns)
        humans = [turn["value"] for turn in turns[: t + 1] if turn["from"] in ("human", "user")]
        merged = MERGE_SEPARATOR.join(humans)
        turns = [{"from": "human", "value": merged}] + turns[t + 1:]
        # What envs/play.py puts before the game's first observation: all but the observation itself
        # (ETO's task turn starts "Here is your task. " and then the game's text).
        start = humans[-1].find(OBSERVATION_START)
        out["instruction"] = merged[: len(merged) - len(humans[-1]) + max(start, 0)]
    elif latent_turn != "first":
        raise ValueError(f"latent_turn must be 'task' or 'first', got {latent_turn!r}")
    out["conversations"] = turns
    if plan == "expert_actions":
        actions = expert_actions(turns)
        if actions:
            out["plan"] = "Plan: " + ", then ".join(actions) + "."
    elif plan != "none":
        raise ValueError(f"plan must be 'expert_actions' or 'none', got {plan!r}")
    return out


def convert_file(input_file: str, output_file: str, latent_turn: str = "task", plan: str = "expert_actions") -> int:
    """Convert every record; nothing is written unless all convert. Returns the number written."""
    records = []
    for i, (where, rec) in enumerate(read_records(input_file)):
        rid = rec.get("id") if isinstance(rec, dict) else None
        try:
            if not isinstance(rec, dict):
                raise DataError("expected a JSON object")
            converted = convert_record(rec, latent_turn, plan)
        except DataError as e:
            raise DataError(f"{where}: id {rid!r}: {e}") from None
        converted.setdefault("id", f"alfworld_{i}")
        records.append(converted)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="ETO/AgentInstruct ALFWorld file (JSON list or JSONL)")
    p.add_argument("--output", required=True, help="JSONL in the training format")
    p.add_argument("--latent_turn", choices=("task", "first"), default="task",
                   help="the human turn the latent message follows: the task turn (merged) or the first")
    p.add_argument("--plan", choices=("expert_actions", "none"), default="expert_actions")
    args = p.parse_args(argv)
    try:
        n = convert_file(args.input, args.output, args.latent_turn, args.plan)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} records to {args.output}")
    return 0


def cli() -> None:
    """The `interlat-convert-alfworld` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
