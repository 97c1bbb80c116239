"""Text games where only the sender knows where things are, and the expert data to train an actor on them.

    python -m envs.textworld_tasks --out_dir data/tw --n_train 400 --n_eval 100 --seed 0 [--workers 4]

Each game (TextWorld's `GameMaker`, compiled with `compile_game`, which keeps our objective) has
`--rooms` rooms on a grid, joined as a random tree, `--containers` closed containers in each, the target
object inside one container of a room other than the start, and `--distractors` other objects in other
containers. The objective is vague: "Find the coin and take it." Where the coin is (room, container,
route) is known only from the game's facts, which the sender reads as its plan; with 4 rooms x 2
containers an actor without the message must search, which rarely fits the step budget
(`--max_steps`, by default the expert's steps + `--slack` 2). Measured on 40 games (seed 1): the
expert wins all in 3.55 steps on average; `envs/play.py --policy explorer`, a methodical search
without the message, wins 10% within the budget (30% with slack 3, 62% with slack 6).

Splits are seeded separately (`{seed}-{split}-{index}`): changing `--n_train` never changes the
eval games. Writes `games/eval_NNNN.z8` (+ `.json`, TextWorld's game description; training games
only with `--keep_train_games`) and
`{split}_raw.jsonl`: one record per game in the training format, `conversations` = the expert's
episode (it follows the game's `policy_commands`) in `play_actor.TURN_FORMATS["textworld"]`, `plan` =
the privileged facts rendered as text (for `sender/collect.py --mode teacher_forced`), plus
`game_file`, `max_steps`, `objective`, `target` (room, container, object).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

ROOMS = ("kitchen", "bedroom", "bathroom", "garage", "attic", "cellar", "study", "pantry", "hallway", "library",
         "workshop", "laundry room", "nursery", "greenhouse", "gallery", "office")
CONTAINERS = ("wooden chest", "metal locker", "cardboard box", "wicker basket", "steel safe", "oak cabinet",
              "plastic crate", "leather trunk", "red toolbox", "tin can", "glass jar", "canvas sack", "iron coffer",
              "pine cupboard", "paper bag", "silver case", "woven hamper", "marble urn")
OBJECTS = ("coin", "ring", "gem", "watch", "medal", "letter", "compass", "badge", "marble", "feather", "stamp",
           "whistle", "button", "shell", "pearl", "ticket")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
OBJECTIVE = "Find the {obj} and take it."


@dataclass
class TaskOptions:
    rooms: int = 4
    containers: int = 2  # per room, all closed
    distractors: int = 2  # other objects in other containers
    slack: int = 2  # step budget = expert steps + slack (unless max_steps)
    max_steps: int = 0  # a fixed step budget for every game (0: expert steps + slack)


def build_game(seed: str, opts: TaskOptions):
    """A TextWorld `Game` and its privileged facts, drawn from `random.Random(seed)`."""
    import textworld
    from textworld import GameMaker
    from textworld.generator.game import Event, Quest

    if opts.rooms < 2 or opts.containers < 1 or opts.rooms > len(ROOMS) or \
            opts.rooms * opts.containers > len(CONTAINERS) or opts.distractors >= len(OBJECTS):
        raise ValueError(f"--rooms 2..{len(ROOMS)}, --containers >= 1 with rooms x containers <= {len(CONTAINERS)}, "
                         f"--distractors < {len(OBJECTS)}")
    rng = random.Random(seed)
    options = textworld.GameOptions()
    options.seeds = random.Random(f"{seed}-text").randrange(2 ** 31)  # the wording TextWorld's grammar draws
    M = GameMaker(options)
    names = rng.sample(ROOMS, opts.rooms)
    rooms = [M.new_room(names[0])]
    cells = {(0, 0): 0}
    while len(rooms) < opts.rooms:  # grow a tree on the grid: geometry stays consistent
        frm = rng.choice(list(cells))
        direction = rng.choice(list(DIRECTIONS))
        cell = (frm[0] + DIRECTIONS[direction][0], frm[1] + DIRECTIONS[direction][1])
        if cell in cells:
            continue
        cells[cell] = len(rooms)
        room = M.new_room(names[len(rooms)])
        M.connect(getattr(rooms[cells[frm]], direction), getattr(room, OPPOSITE[direction]))
        rooms.append(room)
    start = rng.randrange(opts.rooms)
    M.set_player(rooms[start])
    container_names = iter(rng.sample(CONTAINERS, opts.rooms * opts.containers))
    containers = []  # (container entity, room index)
    for r, room in enumerate(rooms):
        for _ in range(opts.containers):
            c = M.new(type="c", name=next(container_names))
            c.add_property("closed")
            room.add(c)
            containers.append((c, r))
    target_obj, *others = rng.sample(OBJECTS, 1 + opts.distractors)
    target_c, target_room = rng.choice([(c, r) for c, r in containers if r != start])
    obj = M.new(type="o", name=target_obj)
    target_c.add(obj)
    for name, (c, _) in zip(others, rng.sample([x for x in containers if x[0] is not target_c], opts.distractors)):
        c.add(M.new(type="o", name=name))
    goal = M.new_fact("in", obj, M.inventory)
    M.quests = [Quest(win_events=[Event(actions=shortest_actions(M, goal), conditions={goal})])]
    game = M.build()
    game.objective = OBJECTIVE.format(obj=target_obj)
    facts = {"object": target_obj, "container": target_c.name, "room": names[target_room], "start": names[start]}
    return game, facts


def shortest_actions(maker, goal) -> list:
    """The shortest action sequence that makes `goal` true (breadth-first over go/open/take): the quest's
    actions, from which the game recomputes `policy_commands` at every step."""
    kb = maker._kb  # GameMaker keeps its knowledge base private; its rules are what the game will allow
    rules = [r for name, r in kb.rules.items() if name.split("/")[0] in ("go", "open", "take")]
    start = maker.state.copy()
    seen = {frozenset(start.facts)}
    queue = deque([(start, [])])
    while queue:
        state, path = queue.popleft()
        if state.is_fact(goal):
            return path
        for action in state.all_applicable_actions(rules, kb.types.constants_mapping):
            nxt = state.copy()
            nxt.apply(action)
            key = frozenset(nxt.facts)
            if key not in seen:
                seen.add(key)
                queue.append((nxt, path + [action]))
    raise RuntimeError("the goal cannot be reached")  # cannot happen: the target's room is connected


def render_plan(facts: dict, commands: Sequence[str]) -> str:
    """The sender's plan: where the object is, and the way there from the start."""
    moves = [c for c in commands if c.startswith("go ")]
    route = ", then ".join(moves)
    return (f"The {facts['object']} is inside the {facts['container']} in the {facts['room']}. "
            f"From the {facts['start']}: {route}. There, open the {facts['container']} and take the "
            f"{facts['object']} from the {facts['container']}.")


def make_task(split: str, index: int, seed: int, out_dir: str, opts: TaskOptions, keep_game: bool = True) -> dict:
    """Build, compile and play one game with the expert; its record (see module doc).

    With `keep_game=False` the compiled game is deleted after the expert's episode (training needs
    only the record) and the record has no `game_file`.
    """
    import textworld
    from textworld.generator import compile_game

    from envs.game import TURN_FORMATS, Game
    from envs.play import play
    from envs.policies import ExpertPolicy

    game_id = f"{split}_{index:04d}"
    game, facts = build_game(f"{seed}-{split}-{index}", opts)
    options = textworld.GameOptions()
    options.path = os.path.join(out_dir, "games", game_id + ".z8")
    options.force_recompile = True
    path = compile_game(game, options)
    ni = os.path.splitext(path)[0] + ".ni"  # Inform 7 source: not needed to play
    if os.path.exists(ni):
        os.remove(ni)
    budget = opts.max_steps or 50
    fmt = TURN_FORMATS["textworld"]
    (episode,) = play([Game(game_id, path, max_steps=budget)], ExpertPolicy(fmt), "none", progress=False)
    if not episode["won"]:
        raise RuntimeError(f"{game_id}: the expert did not win its own game")
    commands = [t["command"] for t in episode["turns"]]
    # The conversation as the expert saw it, up to its winning command (the game's answer to it is no turn).
    role = {"user": "human", "assistant": "gpt"}
    conversations = [{"from": role[m["role"]], "value": m["content"]} for m in episode["messages"][:-1]]
    record = {"id": game_id, "game_file": os.path.relpath(path, out_dir), "conversations": conversations,
              "plan": render_plan(facts, commands), "objective": game.objective,
              "max_steps": opts.max_steps or len(commands) + opts.slack, "expert_steps": len(commands),
              "target": facts}
    if not keep_game:
        for suffix in (".z8", ".json"):
            os.remove(os.path.splitext(path)[0] + suffix)
        del record["game_file"]
    return record


def _make_task_star(args):
    return make_task(*args)


def generate(out_dir: str, n_train: int, n_eval: int, seed: int = 0, opts: TaskOptions | None = None,
             workers: int = 1, keep_train_games: bool = False) -> dict[str, str]:
    """Write both splits (games and `{split}_raw.jsonl`); returns the record files by split.

    Eval games are kept (they are played); train games only with `keep_train_games`.
    """
    from tqdm.auto import tqdm

    opts = opts or TaskOptions()
    os.makedirs(os.path.join(out_dir, "games"), exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        jobs = [(split, i, seed, out_dir, opts, split == "eval" or keep_train_games) for i in range(n)]
        if workers > 1:
            from multiprocessing import get_context

            with get_context("spawn").Pool(workers) as pool:
                records = list(tqdm(pool.imap(_make_task_star, jobs), total=n, desc=f"games [{split}]"))
        else:
            records = [make_task(*job) for job in tqdm(jobs, desc=f"games [{split}]")]
        files[split] = os.path.join(out_dir, f"{split}_raw.jsonl")
        with open(files[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=400)
    p.add_argument("--n_eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rooms", type=int, default=TaskOptions.rooms)
    p.add_argument("--containers", type=int, default=TaskOptions.containers, help="closed containers per room")
    p.add_argument("--distractors", type=int, default=TaskOptions.distractors, help="other objects in containers")
    p.add_argument("--slack", type=int, default=TaskOptions.slack, help="step budget = expert steps + slack")
    p.add_argument("--max_steps", type=int, default=0, help="a fixed step budget instead (0: expert + slack)")
    p.add_argument("--workers", type=int, default=1, help="games compiled in parallel")
    p.add_argument("--keep_train_games", action="store_true",
                   help="keep the compiled training games (400 KB each; training needs only the records)")
    args = p.parse_args(argv)
    try:
        import textworld  # noqa: F401
    except ImportError:
        print("error: textworld is not installed: pip install textworld==1.7.0", file=sys.stderr)
        return 2
    opts = TaskOptions(args.rooms, args.containers, args.distractors, args.slack, args.max_steps)
    try:
        build_game("check", opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    files = generate(args.out_dir, args.n_train, args.n_eval, args.seed, opts, args.workers, args.keep_train_games)
    print(f"wrote {', '.join(files.values())} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
