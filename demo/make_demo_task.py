"""Tiny tasks whose answer is only in the sender's plan.

`--task rooms` (the default): where did the teammate find an object? The human message names the
object but not the room; the plan (the sender's message) says which room it is in, among distractor
sentences about other objects and rooms. An actor can only beat chance (1 / len(ROOMS)) by reading
the plan or its latents.

`--task count`: how many items of a kind did the teammate count? The answer is a number from 2 to 29
(one or two digit tokens: another answer type, 28 values, chance ~4%), among distractor counts of other
items.

    python demo/make_demo_task.py --out_dir data/demo --n_train 192 --n_eval 48 --seed 0 [--task count]

writes `train_raw.jsonl` and `eval_raw.jsonl` (ids `train_0000`, `eval_0000`, ...), each
record with `conversations` (human question, gpt answer), `plan` and `answer`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Sequence

ROOMS = ("kitchen", "bedroom", "bathroom", "garage", "attic", "basement", "office", "library")
OBJECTS = ("key", "wallet", "umbrella", "laptop", "guitar", "backpack", "hammer", "camera", "blanket", "lamp",
           "notebook", "phone", "scarf", "teapot", "ball", "clock", "mirror", "candle", "basket", "helmet")
QUESTION = ("Your teammate searched the house and sent you a message. "
            "Where is the {obj}? Answer with the room name only.")
OPENERS = ("I searched the house.", "I checked every room.", "I looked through the whole house.",
           "I went from room to room.")
FACTS = ("The {obj} is in the {room}.", "I found the {obj} in the {room}.", "The {obj} is lying in the {room}.",
         "You will find the {obj} in the {room}.")
EMPTY_ROOM = ("The {room} was empty.", "Nothing interesting in the {room}.")


def make_record(rng: random.Random, record_id: str, max_distractors: int = 2) -> dict:
    """One question: the target fact plus 0-`max_distractors` facts about other objects and 0-1 empty rooms."""
    obj, *others = rng.sample(OBJECTS, 3)
    room = rng.choice(ROOMS)
    sentences = [rng.choice(FACTS).format(obj=obj, room=room)]
    used = {room}
    for other in others[: rng.randint(0, max_distractors)]:
        where = rng.choice(ROOMS)
        used.add(where)
        sentences.append(rng.choice(FACTS).format(obj=other, room=where))
    if max_distractors and rng.random() < 0.5:  # an "empty" room holds none of the objects named, so the plan never contradicts itself
        sentences.append(rng.choice(EMPTY_ROOM).format(room=rng.choice([r for r in ROOMS if r not in used])))
    rng.shuffle(sentences)
    plan = " ".join([rng.choice(OPENERS)] + sentences)
    return {
        "id": record_id,
        "conversations": [{"from": "human", "value": QUESTION.format(obj=obj)}, {"from": "gpt", "value": room}],
        "plan": plan,
        "answer": room,
    }


ITEMS = ("chairs", "boxes", "bottles", "books", "lamps", "plates", "cups", "towels", "pillows", "candles",
         "buckets", "ropes")
COUNT_QUESTION = ("Your teammate took stock of the storage room and sent you a message. "
                  "How many {items} are there? Answer with the number only.")
COUNT_OPENERS = ("I took stock of the storage room.", "I counted everything in the storage room.",
                 "I went through the storage room.")
COUNT_FACTS = ("There are {n} {items}.", "I counted {n} {items}.", "The room holds {n} {items}.")


def make_count_record(rng: random.Random, record_id: str, max_distractors: int = 2) -> dict:
    """One counting question: the target count plus 0-`max_distractors` counts of other items."""
    items, *others = rng.sample(ITEMS, 3)
    n = rng.randint(2, 29)
    sentences = [rng.choice(COUNT_FACTS).format(n=n, items=items)]
    for other in others[: rng.randint(0, max_distractors)]:
        sentences.append(rng.choice(COUNT_FACTS).format(n=rng.randint(2, 29), items=other))
    rng.shuffle(sentences)
    return {
        "id": record_id,
        "conversations": [{"from": "human", "value": COUNT_QUESTION.format(items=items)},
                          {"from": "gpt", "value": str(n)}],
        "plan": " ".join([rng.choice(COUNT_OPENERS)] + sentences),
        "answer": str(n),
    }


TASKS = {"rooms": make_record, "count": make_count_record}


def make_split(name: str, n: int, rng: random.Random, max_distractors: int = 2, task: str = "rooms") -> list[dict]:
    return [TASKS[task](rng, f"{name}_{i:04d}", max_distractors) for i in range(n)]


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=192)
    p.add_argument("--n_eval", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_distractors", type=int, default=2, choices=(0, 1, 2),
                   help="sentences about other objects (and an empty room) around the one that matters")
    p.add_argument("--task", default="rooms", choices=sorted(TASKS), help="rooms: answer a room; count: a number")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    # Separate streams per split: changing --n_train does not change the eval set.
    for name, n, offset in (("train", args.n_train, 0), ("eval", args.n_eval, 1)):
        records = make_split(name, n, random.Random(f"{args.seed}-{offset}"), args.max_distractors, args.task)
        write_jsonl(os.path.join(args.out_dir, f"{name}_raw.jsonl"), records)
        print(f"wrote {len(records)} records to {os.path.join(args.out_dir, name + '_raw.jsonl')}")


if __name__ == "__main__":
    main()
