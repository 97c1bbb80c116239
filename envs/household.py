"""ALFWorld-shaped household games on TextWorld: six task families, seen and unseen splits, long horizons.

    python -m envs.make_household --out_dir data/hh --n_train 2000 --n_eval 100 --seed 0 [--workers 8]

The six families follow ALFWorld's: `pick_and_place` ("put a mug in cabinet."), `pick_two_and_place`
("put two mug in cabinet."), `look_at_under_lamp` ("look at the mug under the desklamp."), and
`clean_then_place`, `heat_then_place`, `cool_then_place` ("put a hot mug in cabinet."). A game is a house of
`--rooms` rooms joined as a random tree on a grid (`go north` ...); each room holds numbered receptacles
(closed ones such as "cabinet 2" must be opened), and the devices are receptacles too (a sink to clean, a
heater to heat, a cooler to cool, a lamp on a surface to switch on). The agent stands in the middle of a
room or at one receptacle (`go to cabinet 2`), and carries one object at a time. Sub-goals: find the object
(another room than the start), take it, transform it with a device, carry it, place it (twice for "two").
The objective names the kind of object and of destination only; where things are, which receptacle and
room, and the route are facts only the sender has: its `plan` (at least half of them facts and sub-goals
in prose, the rest the expert's command list; `plan_style` says which).

The games are TextWorld games: a knowledge base in TextWorld's logic language (`LOGIC`), worlds built from
facts, quests whose win conditions are facts (any receptacle of the destination kind wins), saved as
TextWorld's game JSON and played by TextWorld's own logic engine (`textworld.start` on a `.json` game:
state, admissible commands, win); `HouseholdText`, a TextWorld wrapper, writes the observations in
ALFWorld's style ("You arrive at cabinet 2. The cabinet 2 is closed."). No Inform 7 compile: a game is
~10 KB and is built in milliseconds.

Splits: `train` and `eval_seen` draw from the seen vocabulary (rooms, receptacle kinds, devices, objects),
`eval_unseen` from a disjoint one (`VOCABULARIES`): no room, receptacle kind or object name of an unseen game
occurs in any training game. Seeds are `{seed}-{split}-{index}`; family = index mod 6, so every split is
balanced. `envs/make_household.py` writes `games/{split}_NNNN.json` (eval splits; train with
`--keep_train_games`) and `{split}_raw.jsonl`: the records in the training format, `conversations` = the
expert's episode in `envs.game.TURN_FORMATS["textworld"]`, plus `plan`, `plan_style`, `family`, `split`, `objective`,
`max_steps` (expert steps + `--slack`), `expert_steps`, `layout` and `target`.
"""
from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Sequence

FAMILIES = ("pick_and_place", "pick_two_and_place", "look_at_under_lamp", "clean_then_place",
            "heat_then_place", "cool_then_place")
TRANSFORMS = {"clean_then_place": ("clean", "sink"), "heat_then_place": ("heat", "heater"),
              "cool_then_place": ("cool", "cooler")}
ADJECTIVE = {"clean": "clean", "heat": "hot", "cool": "cool"}
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
SPLITS = ("train", "eval_seen", "eval_unseen")
GAME_MARK = "interlat-household"  # game.metadata["engine"]: the games HouseholdText can narrate


@dataclass(frozen=True)
class Vocabulary:
    """The names one split draws from: rooms, closed and open storage kinds, the four devices, objects."""
    rooms: tuple[str, ...]
    closed: tuple[str, ...]
    surfaces: tuple[str, ...]
    sink: str
    heater: str
    cooler: str
    lamp: str
    objects: tuple[str, ...]

    def names(self) -> set[str]:
        return set(self.rooms) | set(self.closed) | set(self.surfaces) | {self.sink, self.heater, self.cooler,
                                                                          self.lamp} | set(self.objects)


# Disjoint by construction (tests check it): the unseen split shares no room, receptacle kind or object.
VOCABULARIES = {
    "seen": Vocabulary(
        rooms=("kitchen", "bedroom", "bathroom", "living room", "hallway", "study", "pantry", "garage",
               "laundry room", "dining room"),
        closed=("cabinet", "drawer", "safe", "wardrobe", "chest"),
        surfaces=("countertop", "shelf", "table", "desk", "dresser", "sidetable"),
        sink="sinkbasin", heater="microwave", cooler="fridge", lamp="desklamp",
        objects=("mug", "apple", "bowl", "plate", "cup", "fork", "spoon", "knife", "tomato", "potato", "bread",
                 "egg", "lettuce", "book", "pen", "pencil", "keychain", "watch", "cellphone", "remotecontrol",
                 "candle", "soapbar", "towel", "cloth", "sponge", "vase", "pillow", "creditcard", "alarmclock",
                 "newspaper")),
    "unseen": Vocabulary(
        rooms=("attic", "cellar", "nursery", "workshop", "office", "sunroom", "porch", "gallery"),
        closed=("cupboard", "crate", "trunk", "locker"),
        surfaces=("bench", "bookcase", "ottoman", "coffeetable", "counter"),
        sink="washbasin", heater="oven", cooler="icebox", lamp="floorlamp",
        objects=("kettle", "saucepan", "ladle", "lemon", "pear", "carrot", "onion", "teapot", "saucer", "laptop",
                 "magazine", "wallet", "scarf", "bottle", "jar", "statue")),
}
SPLIT_VOCABULARY = {"train": "seen", "eval_seen": "seen", "eval_unseen": "unseen"}

# The knowledge base, in TextWorld's logic language. The player is in a room (`at`) and near one thing there
# (`near`): the room's middle (`mid`, where it arrives) or a receptacle (`rc`: closed containers `c`, surfaces
# `s`; devices are subtypes). It holds at most one object (`handsfree`). TextWorld binds distinct placeholders
# to distinct entities, so `go to` never names the receptacle one is at.
LOGIC = r'''
type P {
    rules {
        look :: at(P, r) -> at(P, r);
        inventory :: at(P, r) -> at(P, r);
    }
    inform7 { commands { look :: "look" :: "looking"; inventory :: "inventory" :: "taking inventory"; } }
}
type I {
    predicates { in(o, I); handsfree(I); }
}
type r {
    predicates {
        at(P, r); at(t, r); north_of(r, r); west_of(r, r);
        south_of(r, r') = north_of(r', r);
        east_of(r, r') = west_of(r', r);
    }
    rules {
        go/north :: at(P, r) & $north_of(r', r) & near(P, y: t) & $at(m: mid, r') -> at(P, r') & near(P, m: mid);
        go/south :: at(P, r) & $south_of(r', r) & near(P, y: t) & $at(m: mid, r') -> at(P, r') & near(P, m: mid);
        go/east :: at(P, r) & $east_of(r', r) & near(P, y: t) & $at(m: mid, r') -> at(P, r') & near(P, m: mid);
        go/west :: at(P, r) & $west_of(r', r) & near(P, y: t) & $at(m: mid, r') -> at(P, r') & near(P, m: mid);
    }
    inform7 {
        type { kind :: "room"; }
        commands {
            go/north :: "go north" :: "going north";
            go/south :: "go south" :: "going south";
            go/east :: "go east" :: "going east";
            go/west :: "go west" :: "going west";
        }
    }
}
type t {
    predicates { near(P, t); }
    rules { goto :: $at(P, r) & $at(x: rc, r) & near(P, y: t) -> near(P, x: rc); }
    inform7 { type { kind :: "thing"; } commands { goto :: "go to {x}" :: "going to the {x}"; } }
}
type mid : t { inform7 { type { kind :: "middle"; } } }
type rc : t { inform7 { type { kind :: "receptacle"; } } }
type c : rc {
    predicates { open(c); closed(c); in(o, c); }
    rules {
        open/c :: $near(P, c) & closed(c) -> open(c);
        close/c :: $near(P, c) & open(c) -> closed(c);
        take/c :: $near(P, c) & $open(c) & in(o, c) & handsfree(I) -> in(o, I);
        put/c :: $near(P, c) & $open(c) & in(o, I) -> in(o, c) & handsfree(I);
    }
    inform7 {
        type { kind :: "container"; }
        commands {
            open/c :: "open {c}" :: "opening the {c}";
            close/c :: "close {c}" :: "closing the {c}";
            take/c :: "take {o} from {c}" :: "taking the {o} from the {c}";
            put/c :: "put {o} in {c}" :: "putting the {o} in the {c}";
        }
    }
}
type s : rc {
    predicates { on(o, s); }
    rules {
        take/s :: $near(P, s) & on(o, s) & handsfree(I) -> in(o, I);
        put/s :: $near(P, s) & in(o, I) -> on(o, s) & handsfree(I);
    }
    inform7 {
        type { kind :: "supporter"; }
        commands {
            take/s :: "take {o} from {s}" :: "taking the {o} from the {s}";
            put/s :: "put {o} on {s}" :: "putting the {o} on the {s}";
        }
    }
}
type sink : s {
    rules { clean :: $near(P, k: sink) & $in(o, I) -> clean(o); }
    inform7 { type { kind :: "sink"; } commands { clean :: "clean {o} with {k}" :: "cleaning the {o} with the {k}"; } }
}
type heater : c {
    rules { heat :: $near(P, h: heater) & $in(o, I) -> hot(o); }
    inform7 { type { kind :: "heater"; } commands { heat :: "heat {o} with {h}" :: "heating the {o} with the {h}"; } }
}
type cooler : c {
    rules { cool :: $near(P, f: cooler) & $in(o, I) -> cold(o); }
    inform7 { type { kind :: "cooler"; } commands { cool :: "cool {o} with {f}" :: "cooling the {o} with the {f}"; } }
}
type o : t {
    predicates { clean(o); hot(o); cold(o); }
    inform7 { type { kind :: "object-like"; } }
}
type lamp : t {
    predicates { stands(lamp, s); lit(lamp); }
    rules { use :: $near(P, s) & $stands(l: lamp, s) -> lit(l: lamp); }
    inform7 { type { kind :: "lamp"; } commands { use :: "use {l}" :: "using the {l}"; } }
}
'''
_KB = None


def knowledge_base():
    """TextWorld's `KnowledgeBase` of `LOGIC` (parsed once)."""
    global _KB
    if _KB is None:
        from textworld.generator.data import KnowledgeBase
        from textworld.logic import GameLogic

        _KB = KnowledgeBase(GameLogic.parse(LOGIC), "")
    return _KB


@dataclass
class HouseholdOptions:
    rooms: int = 5
    min_receptacles: int = 3  # storage receptacles per room (devices come on top)
    max_receptacles: int = 4
    distractors: int = 5  # other objects, in storage receptacles anywhere
    slack: int = 4  # step budget = expert steps + slack
    plan_facts_share: float = 0.75  # share of plans written as facts and sub-goals (the rest: the command list)


# ---------------------------------------------------------------------------------------------
# The world: layout, receptacles, objects (plain data first; TextWorld facts from it)
# ---------------------------------------------------------------------------------------------
@dataclass
class Receptacle:
    name: str  # "cabinet 2"
    kind: str  # "cabinet"
    type: str  # TextWorld type: c, s, sink, heater, cooler
    room: int
    closed: bool


@dataclass
class House:
    rooms: list[str]
    cells: dict[tuple[int, int], int]
    exits: dict[int, dict[str, int]]  # room -> direction -> room
    receptacles: list[Receptacle]
    objects: dict[str, int]  # object name -> receptacle index
    lamp: str
    lamp_on: int  # receptacle index of the lamp's surface
    start: int

    def route(self, a: int, b: int) -> list[str]:
        """The directions from room a to room b (the tree's only path)."""
        prev = {a: None}
        queue = deque([a])
        while queue:
            r = queue.popleft()
            for d, n in self.exits[r].items():
                if n not in prev:
                    prev[n] = (r, d)
                    queue.append(n)
        path = []
        while b != a:
            b, d = prev[b]
            path.append(d)
        return path[::-1]

    def layout(self) -> str:
        """A signature of the layout: the rooms and how they connect."""
        edges = sorted(f"{self.rooms[a]} {d} {self.rooms[b]}" for a in self.exits for d, b in self.exits[a].items())
        return "; ".join(edges)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def build_house(rng: random.Random, vocab: Vocabulary, opts: HouseholdOptions) -> House:
    """Rooms on a grid joined as a random tree, numbered receptacles in each, devices in random rooms."""
    n = opts.rooms
    names = rng.sample(vocab.rooms, n)
    cells, exits = {(0, 0): 0}, {i: {} for i in range(n)}
    while len(cells) < n:
        frm = rng.choice(list(cells))
        d = rng.choice(list(DIRECTIONS))
        cell = (frm[0] + DIRECTIONS[d][0], frm[1] + DIRECTIONS[d][1])
        if cell in cells:
            continue
        cells[cell] = len(cells)
        exits[cells[frm]][d] = cells[cell]
        exits[cells[cell]][OPPOSITE[d]] = cells[frm]
    slots = []  # (kind, type, room)
    for room in range(n):
        for _ in range(rng.randint(opts.min_receptacles, opts.max_receptacles)):
            closed = rng.random() < 0.5
            slots.append((rng.choice(vocab.closed if closed else vocab.surfaces), "c" if closed else "s", room))
    for kind, typ in ((vocab.sink, "sink"), (vocab.heater, "heater"), (vocab.cooler, "cooler")):
        slots.append((kind, typ, rng.randrange(n)))
    slots.sort(key=lambda s: s[2])  # numbered room by room, as one walks the house
    counts: dict[str, int] = {}
    receptacles = []
    for kind, typ, room in slots:
        counts[kind] = counts.get(kind, 0) + 1
        closed = typ in ("c", "heater", "cooler")
        receptacles.append(Receptacle(f"{kind} {counts[kind]}", kind, typ, room, closed))
    surfaces = [i for i, r in enumerate(receptacles) if r.type == "s"]
    return House(names, cells, exits, receptacles, {}, f"{vocab.lamp} 1", rng.choice(surfaces), rng.randrange(n))


def to_facts(house: House):
    """TextWorld propositions of the house's initial state; and the variables by name."""
    from textworld.logic import Proposition as F
    from textworld.logic import Variable as V

    player, inventory = V("P", "P"), V("I", "I")
    rooms = [V(f"r_{i}", "r") for i in range(len(house.rooms))]
    mids = [V(f"mid_{i}", "mid") for i in range(len(house.rooms))]
    var = {}
    facts = [F("at", [player, rooms[house.start]]), F("near", [player, mids[house.start]]),
             F("handsfree", [inventory])]
    for i, m in enumerate(mids):
        facts.append(F("at", [m, rooms[i]]))
    for a, ex in house.exits.items():
        for d, b in ex.items():
            if d == "north":
                facts.append(F("north_of", [rooms[b], rooms[a]]))
            elif d == "west":
                facts.append(F("west_of", [rooms[b], rooms[a]]))
    for i, rc in enumerate(house.receptacles):
        v = var[rc.name] = V(f"{rc.type}_{i}", rc.type)
        facts.append(F("at", [v, rooms[rc.room]]))
        if rc.type in ("c", "heater", "cooler"):
            facts.append(F("closed" if rc.closed else "open", [v]))
    for j, (obj, where) in enumerate(house.objects.items()):
        v = var[obj] = V(f"o_{j}", "o")
        rc = house.receptacles[where]
        facts.append(F("in" if rc.type in ("c", "heater", "cooler") else "on", [v, var[rc.name]]))
    lamp = var[house.lamp] = V("lamp_0", "lamp")
    facts.append(F("stands", [lamp, var[house.receptacles[house.lamp_on].name]]))
    names = {v.name: name for name, v in var.items()}
    names.update({r.name: house.rooms[i] for i, r in enumerate(rooms)})
    names.update({m.name: "middle" for m in mids})
    return facts, var, names


# ---------------------------------------------------------------------------------------------
# Tasks: objective, win conditions, the expert's walkthrough and the sender's plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One sub-goal of the expert's plan, with the commands that achieve it."""
    kind: str  # find, transform, place, light
    commands: list[str]
    thing: str  # the object (find/transform/place) or the lamp (light)
    where: str  # the receptacle or device
    room: str
    route: list[str]  # directions from the room before
    from_room: str
    closed: bool = False
    preposition: str = "in"


class _Walker:
    """Builds the expert's commands while tracking where it stands and what is open."""

    def __init__(self, house: House):
        self.house, self.room, self.near = house, house.start, None
        self.opened: set[int] = set()
        self.steps: list[Step] = []

    def go_to(self, index: int) -> tuple[list[str], list[str], str]:
        rc = self.house.receptacles[index]
        route = self.house.route(self.room, rc.room)
        frm = self.house.rooms[self.room]
        commands = [f"go {d}" for d in route]
        if route or self.near != index:
            commands.append(f"go to {rc.name}")
        self.room, self.near = rc.room, index
        return commands, route, frm

    def open(self, index: int) -> list[str]:
        rc = self.house.receptacles[index]
        if rc.closed and index not in self.opened:
            self.opened.add(index)
            return [f"open {rc.name}"]
        return []

    def add(self, kind: str, index: int, thing: str, last: list[str]) -> None:
        commands, route, frm = self.go_to(index)
        rc = self.house.receptacles[index]
        closed = rc.closed and index not in self.opened
        commands += (self.open(index) if kind in ("find", "place") else []) + last
        self.steps.append(Step(kind, commands, thing, rc.name, self.house.rooms[rc.room], route, frm, closed,
                               _preposition(rc)))

    def nearest(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda i: (len(self.house.route(self.room, self.house.receptacles[i].room)), i))


def _preposition(rc: Receptacle) -> str:
    return "in" if rc.type in ("c", "heater", "cooler") else "on"


def make_task(family: str, rng: random.Random, vocab: Vocabulary, opts: HouseholdOptions):
    """A house, the objective, the win conditions (sets of (predicate, object, receptacle)) and the expert's steps."""
    house = build_house(rng, vocab, opts)
    storage = [i for i, r in enumerate(house.receptacles) if r.type in ("c", "s")]
    away = [i for i in storage if house.receptacles[i].room != house.start]
    target, *others = rng.sample(vocab.objects, 1 + opts.distractors)
    n_targets = 2 if family == "pick_two_and_place" else 1
    sources = [rng.choice(away)] + ([rng.choice(storage)] if n_targets == 2 else [])
    targets = [f"{target} {k + 1}" for k in range(n_targets)]
    for obj, src in zip(targets, sources):
        house.objects[obj] = src
    for k in others:
        house.objects[f"{k} 1"] = rng.choice(storage)
    src_kinds = {house.receptacles[s].kind for s in sources}
    dest_kinds = sorted({house.receptacles[i].kind for i in storage} - src_kinds)
    dest_kind = rng.choice(dest_kinds) if dest_kinds else None
    walker = _Walker(house)
    conditions: list[set[tuple]] = []
    if family == "look_at_under_lamp":
        obj = targets[0]
        walker.add("find", sources[0], obj, [f"take {obj} from {house.receptacles[sources[0]].name}"])
        walker.add("light", house.lamp_on, house.lamp, [f"use {house.lamp}"])
        objective = f"look at the {target} under the {vocab.lamp}."
        conditions = [{("in", obj, "I"), ("lit", house.lamp, None)}]
    else:
        if dest_kind is None:
            return None
        dests = [i for i in storage if house.receptacles[i].kind == dest_kind]
        adjective = ""
        dest = None
        for obj, src in sorted(zip(targets, sources), key=lambda x: len(house.route(house.start,
                                                                                      house.receptacles[x[1]].room))):
            walker.add("find", src, obj, [f"take {obj} from {house.receptacles[src].name}"])
            if family in TRANSFORMS:
                verb, typ = TRANSFORMS[family]
                device = next(i for i, r in enumerate(house.receptacles) if r.type == typ)
                walker.add("transform", device, obj, [f"{verb} {obj} with {house.receptacles[device].name}"])
                adjective = ADJECTIVE[verb] + " "
            dest = dest if dest is not None else walker.nearest(dests)
            rc = house.receptacles[dest]
            walker.add("place", dest, obj, [f"put {obj} {_preposition(rc)} {rc.name}"])
        count = "two" if n_targets == 2 else _article(adjective or target)
        objective = f"put {count} {adjective}{target} {'in' if dest_kind in vocab.closed else 'on'} {dest_kind}."
        state = {"clean_then_place": "clean", "heat_then_place": "hot", "cool_then_place": "cold"}.get(family)
        for d in dests:
            rc = house.receptacles[d]
            pred = "in" if rc.type == "c" else "on"
            cond = {(pred, obj, rc.name) for obj in targets} | ({(state, targets[0], None)} if state else set())
            conditions.append(cond)
    return house, objective, conditions, walker.steps, targets


def _route_text(route: Sequence[str]) -> str:
    return ", then ".join(route)


def render_plan(steps: Sequence[Step], style: str, rng: random.Random) -> str:
    """The sender's plan: `facts` (where things are, what to do there, the way; in prose) or `commands`."""
    if style == "commands":
        return "Plan: " + ", ".join(c for s in steps for c in s.commands) + "."
    sentences = []
    ordinal = ["First", "Then", "Next", "After that", "Finally"]
    for k, s in enumerate(steps):
        way = (f" (from the {s.from_room}: go {_route_text(s.route)})" if s.route
               else (" (the same room)" if k else " (where you start)"))
        there = f"the {s.where} in the {s.room}{way}"
        if s.kind == "find":
            closed = ", which is closed" if s.closed else ""
            text = rng.choice([f"the {s.thing} is {s.preposition} {there}{closed}; take it",
                               f"find the {s.thing}: it is {s.preposition} {there}{closed}, take it from there"])
        elif s.kind == "transform":
            verb = s.commands[-1].split()[0]
            device_kind = s.where.rsplit(" ", 1)[0]
            text = rng.choice([f"{verb} it with {there}",
                               f"the {device_kind} to {verb} it is {there}; {verb} it there"])
        elif s.kind == "place":
            closed = ", open it first" if s.closed else ""
            text = rng.choice([f"put it {s.preposition} {there}{closed}",
                               f"bring it to {there}{closed} and put it there"])
        else:
            text = f"switch on the {s.thing}, which stands on {there}, while holding it"
        prefix = ordinal[min(k, len(ordinal) - 2)] if k < len(steps) - 1 or k == 0 else ordinal[-1]
        sentences.append(f"{prefix}, {text}.")
    return " ".join(sentences)


def build_game(seed: str, family: str, vocab: Vocabulary, opts: HouseholdOptions):
    """A TextWorld `Game` of one family, drawn from `random.Random(seed)`, and what the record needs."""
    from textworld.generator import World
    from textworld.generator.game import Event, Game, Quest
    from textworld.logic import Proposition, Variable

    rng = random.Random(seed)
    task = None
    while task is None:  # a house whose storage kinds are all sources (rare) is drawn again
        task = make_task(family, rng, vocab, opts)
    house, objective, conditions, steps, targets = task
    facts, var, names = to_facts(house)
    world = World.from_facts(facts, kb=knowledge_base())

    def prop(pred, a, b):  # ("in", "mug 1", "cabinet 2"), ("in", "mug 1", "I") or ("hot", "mug 1", None)
        args = [var[a]] + ([] if b is None else [Variable("I", "I") if b == "I" else var[b]])
        return Proposition(pred, args)

    events = [Event(conditions={prop(*c) for c in cond}) for cond in conditions]
    game = Game(world, quests=[Quest(win_events=events)])
    for key, info in game.infos.items():
        info.name = names.get(key, key)
    walkthrough = [c for s in steps for c in s.commands]
    game.objective = objective
    game.metadata.update({"engine": GAME_MARK, "family": family, "walkthrough": walkthrough,
                          "task": {"family": family, "objective": objective,
                                   "object_kind": targets[0].rsplit(" ", 1)[0],
                                   "destination_kind": objective.rstrip(".").rsplit(" ", 1)[-1]
                                   if family != "look_at_under_lamp" else None}})
    style = "facts" if rng.random() < opts.plan_facts_share else "commands"
    plan = render_plan(steps, style, rng)
    info = {"family": family, "objective": objective, "plan": plan, "plan_style": style, "layout": house.layout(),
            "rooms": house.rooms, "receptacle_kinds": sorted({r.kind for r in house.receptacles}),
            "objects": sorted(house.objects) + [house.lamp], "walkthrough": walkthrough,
            "target": {"objects": targets, "sources": [house.receptacles[house.objects[t]].name for t in targets],
                       "start": house.rooms[house.start]}}
    return game, info


# ---------------------------------------------------------------------------------------------
# Observations in ALFWorld's style (a TextWorld wrapper over the logic engine)
# ---------------------------------------------------------------------------------------------
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _listing(names: Sequence[str]) -> str:
    items = [f"{_article(n)} {n}" for n in names]
    if not items:
        return "nothing"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


class _View:
    """The state's facts, by name."""

    def __init__(self, facts, names: dict[str, str]):
        self.room = self.near = None
        self.at: dict[str, str] = {}
        self.contents: dict[str, list[str]] = {}
        self.closed, self.carried, self.exits = set(), [], {}
        self.lamps: dict[str, str] = {}
        for f in facts:
            a = [names.get(v.name, v.name) for v in f.arguments]
            if f.name == "at" and f.arguments[0].type == "P":
                self.room = a[1]
            elif f.name == "at" and f.arguments[0].type != "mid":
                self.at[a[0]] = a[1]
            elif f.name == "near":
                self.near = a[1] if f.arguments[1].type != "mid" else None
            elif f.name in ("in", "on") and f.arguments[1].type == "I":
                self.carried.append(a[0])
            elif f.name in ("in", "on"):
                self.contents.setdefault(a[1], []).append(a[0])
            elif f.name == "closed":
                self.closed.add(a[0])
            elif f.name == "stands":
                self.lamps[a[1]] = a[0]
            elif f.name in ("north_of", "west_of"):
                d = "north" if f.name == "north_of" else "west"
                self.exits.setdefault(a[1], {})[d] = a[0]
                self.exits.setdefault(a[0], {})[OPPOSITE[d]] = a[1]

    def describe_room(self) -> str:
        here = sorted((r for r, room in self.at.items() if room == self.room), key=_natural_key)
        exits = [d for d in DIRECTIONS if d in self.exits.get(self.room, {})]
        way = (f"There is an exit to the {exits[0]}." if len(exits) == 1
               else "There are exits to the " + ", the ".join(exits[:-1]) + f" and the {exits[-1]}.")
        return f"You are in the middle of the {self.room}. Looking quickly around you, you see {_listing(here)}. {way}"

    def describe_receptacle(self, name: str) -> str:
        if name in self.closed:
            return f"The {name} is closed."
        things = sorted(self.contents.get(name, []), key=_natural_key)
        if name in self.lamps:
            things = [self.lamps[name]] + things
        inside = name.split()[0] in _CLOSED_KINDS
        return (f"The {name} is open. In it, you see {_listing(things)}." if inside
                else f"On the {name}, you see {_listing(things)}.")


_CLOSED_KINDS = {k for v in VOCABULARIES.values() for k in v.closed + (v.heater, v.cooler)}


def narrate(action, facts, names: dict[str, str]) -> str:
    """The game's answer to `action` (None: not an admissible command), in the state after it."""
    view = _View(facts, names)
    if action is None:
        return "Nothing happens."
    mapping = knowledge_base().rules[action.name].match(action)
    arg = {ph.name: names.get(v.name, v.name) for ph, v in mapping.items()}
    rule = action.name
    if rule.startswith("go/"):
        return view.describe_room()
    if rule == "goto":
        return f"You arrive at {arg['x']}. {view.describe_receptacle(arg['x'])}"
    if rule == "open/c":
        return f"You open the {arg['c']}. {view.describe_receptacle(arg['c'])}"
    if rule == "close/c":
        return f"You close the {arg['c']}."
    if rule.startswith("take/"):
        return f"You pick up the {arg['o']} from the {arg.get('c') or arg.get('s')}."
    if rule == "put/c":
        return f"You put the {arg['o']} in the {arg['c']}."
    if rule == "put/s":
        return f"You put the {arg['o']} on the {arg['s']}."
    if rule in ("clean", "heat", "cool"):
        device = arg.get("k") or arg.get("h") or arg.get("f")
        return f"You {rule} the {arg['o']} using the {device}."
    if rule == "use":
        return f"You turn on the {arg['l']}."
    if rule == "inventory":
        return f"You are carrying: {_listing(view.carried)}." if view.carried else "You are not carrying anything."
    at = f" You are at the {view.near}." if view.near else ""
    return view.describe_room() + at  # look


try:
    import textworld.core as _twcore

    _WrapperBase = _twcore.Wrapper
except ImportError:  # textworld is optional for reading this module; playing needs it
    _WrapperBase = object


class HouseholdText(_WrapperBase):
    """Writes the observations of a household game (TextWorld's logic engine plays it without text)."""

    _gamefile = "game"

    def load(self, path: str) -> None:
        self._gamefile = path
        return super().load(path)

    def _names(self, state) -> dict[str, str]:
        game = state["game"]
        if game.metadata.get("engine") != GAME_MARK:
            from data import DataError

            raise DataError(f"{self._gamefile}: a TextWorld .json game that envs/household.py did not write "
                            "(play compiled TextWorld games by their .z8 file)")
        return {k: info.name for k, info in game.infos.items()}

    def _narrate(self, state, text: str) -> None:
        state.feedback = state.raw = text
        game = state["game"]
        for key in ("family", "task", "walkthrough"):
            state[f"extra.{key}"] = game.metadata.get(key)

    def reset(self):
        state = super().reset()
        self._narrate(state, _View(state["_facts"], self._names(state)).describe_room())
        return state

    def step(self, command: str):
        state, score, done = super().step(command)
        self._narrate(state, narrate(state["_last_action"], state["_facts"], self._names(state)))
        return state, score, done


# ---------------------------------------------------------------------------------------------
# The blind explorer: what a methodical agent without the message does
# ---------------------------------------------------------------------------------------------
_ROOM_LINE = re.compile(r"You are in the middle of the (.+?)\. Looking")
_REVERSE = {"go north": "go south", "go south": "go north", "go east": "go west", "go west": "go east"}


def _kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def _receptacle(command: str) -> str:
    """The receptacle a put/take command names: its last two words ("cabinet 2")."""
    return " ".join(command.split()[-2:])


def explorer_command(task: dict, observations: Sequence[str], commands: Sequence[str], admissible: Sequence[str],
                     memory: dict) -> str:
    """The next command of a searcher that knows only the objective (`task`: family, object and destination
    kinds) and what it sees. Each sub-goal (find a wanted object; find the device that transforms it, or the
    lamp; find a receptacle of the destination kind) is a fresh search: it does what the sub-goal needs as
    soon as the command is admissible, else (when looking for the object) opens what it stands at, visits the
    room's receptacles in order, then walks the house depth-first (an exit not yet tried from this room, else
    back the way it first came in)."""
    rooms = [m.group(1) for o in observations for m in [_ROOM_LINE.search(o)] if m]
    room = rooms[-1] if rooms else ""
    last = commands[-1] if commands else ""  # the explorer sends only admissible commands: they all work
    placed, done = memory.setdefault("placed", set()), memory.setdefault("done", set())
    verb = TRANSFORMS.get(task.get("family"), (None,))[0]
    if last.startswith("take "):
        memory["held"] = last[5:].split(" from ")[0]
    elif last.startswith("put "):
        placed.add(memory.pop("held"))
        memory["dest"] = _receptacle(last)
    elif verb and last.startswith(f"{verb} "):
        done.add(memory["held"])
    held = memory.get("held")
    phase = (held, held in done, len(placed))
    if memory.get("phase") != phase:  # a new sub-goal: search the house again
        memory.update(phase=phase, visited=set(), tried={}, back={})
    visited, tried, back = memory["visited"], memory["tried"].setdefault(room, set()), memory["back"]
    if last in _REVERSE and room not in back:
        back[room] = _REVERSE[last]
    if last in _REVERSE or last == "":
        tried.add(back.get(room, ""))
    if last.startswith("go to "):
        visited.add(last[6:])
    want, dest = task.get("object_kind"), task.get("destination_kind")

    def first(pred):
        return next((c for c in admissible if pred(c)), None)

    def at_dest(name):
        return _kind(name) == dest and memory.get("dest", name) == name

    if held and verb and held not in done:
        command = first(lambda c: c.startswith(f"{verb} {held} with "))
    elif held and task.get("family") == "look_at_under_lamp":
        command = first(lambda c: c.startswith("use "))
    elif held:
        command = (first(lambda c: c.startswith(f"put {held} ") and at_dest(_receptacle(c)))
                   or first(lambda c: c.startswith("open ") and at_dest(c[5:]))
                   or first(lambda c: c.startswith("go to ") and at_dest(c[6:])))
    else:
        command = (first(lambda c: c.startswith("take ") and _kind(c[5:].split(" from ")[0]) == want
                         and c[5:].split(" from ")[0] not in placed)
                   or first(lambda c: c.startswith("open ")))
    command = command or first(lambda c: c.startswith("go to ") and c[6:] not in visited)
    exits = [c for c in admissible if c in _REVERSE]
    command = (command or next((c for c in exits if c not in tried), None) or back.get(room)
               or (exits or list(admissible))[0])
    if command in _REVERSE:
        tried.add(command)
    return command
