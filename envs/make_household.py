"""Write the household games and their expert records (the world and its families: envs/household.py).

    python -m envs.make_household --out_dir data/hh --n_train 2000 --n_eval 120 --seed 0 [--workers 8]

Each game is built from its seed, saved as TextWorld's game JSON, and played once by the expert through the
play loop (envs/play.py), whose episode becomes the record's `conversations`; see envs/household.py for the
families, the splits and the record's fields. Kept apart from the world so that the play loop, which narrates
and explores household games, never imports the code that generates them (no import cycle).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from envs.household import (FAMILIES, SPLIT_VOCABULARY, SPLITS, VOCABULARIES, HouseholdOptions, build_game)

def make_record(split: str, index: int, seed: int, out_dir: str, opts: HouseholdOptions,
                keep_game: bool = True) -> dict:
    """Build one game, play it with the expert, and return its record (see module doc)."""
    from envs.game import TURN_FORMATS, Game
    from envs.play import play
    from envs.policies import ExpertPolicy

    game_id = f"{split}_{index:04d}"
    family = FAMILIES[index % len(FAMILIES)]
    game, info = build_game(f"{seed}-{split}-{index}", family, VOCABULARIES[SPLIT_VOCABULARY[split]], opts)
    path = os.path.join(out_dir, "games", game_id + ".json")
    game.save(path)
    (episode,) = play([Game(game_id, path, max_steps=len(info["walkthrough"]) + 1)],
                      ExpertPolicy(TURN_FORMATS["textworld"]), "none", progress=False)
    if not episode["won"] or episode["steps"] != len(info["walkthrough"]):
        raise RuntimeError(f"{game_id}: the expert did not win its own game in its walkthrough's steps")
    role = {"user": "human", "assistant": "gpt"}
    conversations = [{"from": role[m["role"]], "value": m["content"]} for m in episode["messages"][:-1]]
    record = {"id": game_id, "game_file": os.path.relpath(path, out_dir), "conversations": conversations,
              "plan": info["plan"], "plan_style": info["plan_style"], "family": family, "split": split,
              "objective": info["objective"], "max_steps": episode["steps"] + opts.slack,
              "expert_steps": episode["steps"], "layout": info["layout"], "rooms": info["rooms"],
              "receptacle_kinds": info["receptacle_kinds"], "objects": info["objects"], "target": info["target"]}
    if not keep_game:
        os.remove(path)
        del record["game_file"]
    return record


def _make_record_star(args):
    return make_record(*args)


def generate(out_dir: str, n_train: int, n_eval: int, seed: int = 0, opts: HouseholdOptions | None = None,
             workers: int = 1, keep_train_games: bool = False, splits: Sequence[str] = SPLITS) -> dict[str, str]:
    """Write the splits' games and `{split}_raw.jsonl`; returns the record files by split."""
    from tqdm.auto import tqdm

    opts = opts or HouseholdOptions()
    os.makedirs(os.path.join(out_dir, "games"), exist_ok=True)
    files = {}
    pool = None
    if workers > 1:
        from multiprocessing import get_context

        pool = get_context("spawn").Pool(workers)
    try:
        for split in splits:
            n = n_train if split == "train" else n_eval
            jobs = [(split, i, seed, out_dir, opts, split != "train" or keep_train_games) for i in range(n)]
            it = pool.imap(_make_record_star, jobs, chunksize=8) if pool else map(_make_record_star, jobs)
            records = list(tqdm(it, total=n, desc=f"games [{split}]"))
            files[split] = os.path.join(out_dir, f"{split}_raw.jsonl")
            with open(files[split], "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    finally:
        if pool:
            pool.close()
            pool.join()
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_eval", type=int, default=120, help="games per eval split (seen, unseen)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default=",".join(SPLITS))
    p.add_argument("--rooms", type=int, default=HouseholdOptions.rooms)
    p.add_argument("--distractors", type=int, default=HouseholdOptions.distractors)
    p.add_argument("--slack", type=int, default=HouseholdOptions.slack, help="step budget = expert steps + slack")
    p.add_argument("--plan_facts_share", type=float, default=HouseholdOptions.plan_facts_share)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--keep_train_games", action="store_true")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    problems = [f"--splits: unknown {s!r} (expected some of {', '.join(SPLITS)})" for s in splits if s not in SPLITS]
    if not 2 <= args.rooms <= min(len(v.rooms) for v in VOCABULARIES.values()):
        problems.append("--rooms: expected 2..8")
    if not 0 <= args.distractors <= min(len(v.objects) for v in VOCABULARIES.values()) - 1:
        problems.append("--distractors: expected 0..15")
    if not 0 <= args.plan_facts_share <= 1:
        problems.append("--plan_facts_share: expected a share in [0, 1]")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    try:
        import textworld  # noqa: F401
    except ImportError:
        print("error: textworld is not installed: pip install textworld==1.7.0", file=sys.stderr)
        return 2
    opts = HouseholdOptions(rooms=args.rooms, distractors=args.distractors, slack=args.slack,
                            plan_facts_share=args.plan_facts_share)
    t0 = time.time()
    files = generate(args.out_dir, args.n_train, args.n_eval, args.seed, opts, args.workers, args.keep_train_games,
                     splits)
    print(f"wrote {', '.join(files.values())} in {time.time() - t0:.0f} s")
    return 0


def cli() -> None:
    """The `interlat-make-household` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
