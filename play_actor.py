"""The closed loop: a trained actor plays text games, with the sender's latent message, and we count wins.

    python play_actor.py --model_dir checkpoints/tw_actor --records data/tw/eval.jsonl \
        --output results/play/report.json [--conditions true,shuffled,none,plan_text] [--env textworld|alfworld]

Each record names a game (`game_file`, relative to the records file, or to `--game_root`) and carries
the sender's message for it: `hidden_state_path` (latents) and `plan` (text), as written by
`collect_hidden_states.py`. Every game is played once per condition, the message injected at the end
of the first human turn exactly as in training:
  true       the game's own latents
  shuffled   another game's latents (game i reads game (i+1) mod N's, as in evaluate_actor.py)
  none       the empty block `<bop><eop>`
  plan_text  the plan's text tokens between `<bop>` and `<eop>`

At each step the actor generates its reply greedily; the reply becomes a command by this rule
(`match_command`): take the text after the last `Action:` if there is one, else the reply, keep its
first line, normalise it (lowercase, punctuation -> space, whitespace collapsed); if it equals an
admissible command, that command; otherwise the admissible command with the highest word-overlap F1
with it (ties: the one listed first); with no word in common the text is sent as typed and the game
answers it like any unknown command (the step is spent). An episode ends when the game is won, lost,
or after `max_steps` commands (the record's `max_steps`, else `--max_steps`).

Games are stepped together: at every step the replies of all unfinished games of a condition are
generated in one batch (`--batch_size` at most). Output: a JSON report (success rate and mean steps
per condition, and every episode's transcript), a bar chart, and the table on stdout.

`--env alfworld` plays ALFWorld games (`game_file` relative to `--game_root`, default `$ALFWORLD_DATA`)
through the same `textworld.gym` interface with ALFWorld's wrappers; it needs `pip install alfworld`
and the user's downloaded ALFWorld data. Its turns use the ETO layout (see `TURN_FORMATS`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from data import DataError, load_latents, read_records, resolve_path

CONDITIONS = ("true", "shuffled", "none", "plan_text")
COLORS = {"true": "C0", "shuffled": "C3", "none": "C7", "plan_text": "C2", "expert": "C1"}


# ---------------------------------------------------------------------------------------------
# Observations, turns, commands
# ---------------------------------------------------------------------------------------------
_BANNER_LINE = re.compile(r"^[\s_|\\$/<>]*$")  # TextWorld's ASCII-art title: only these characters
_WELCOME_LINE = re.compile(r"^-= Welcome to TextWorld.*=-$")  # ALFWorld's title line


def clean_observation(text: str) -> str:
    """A game's output without TextWorld's title art, its trailing `>` prompt line and extra blank lines."""
    text = re.split(r"\n>", "\n" + text)[0] if "\n>" in "\n" + text else text
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() == "" or not (_BANNER_LINE.match(ln) or _WELCOME_LINE.match(ln))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalise_command(text: str) -> str:
    """Lowercase, punctuation -> space, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def match_command(reply: str, admissible: Sequence[str]) -> tuple[str, str]:
    """The command a reply stands for, and how it was found: `exact`, `overlap` or `raw` (see module doc)."""
    text = reply.rsplit("Action:", 1)[-1] if "Action:" in reply else reply
    text = (text.strip().splitlines() or [""])[0]
    wanted = normalise_command(text)
    normalised = [normalise_command(c) for c in admissible]
    if wanted in normalised:
        return admissible[normalised.index(wanted)], "exact"
    words = wanted.split()
    best, best_f1 = None, 0.0
    for command, norm in zip(admissible, normalised):
        cw = norm.split()
        common = sum(min(words.count(w), cw.count(w)) for w in set(words))
        if common:
            f1 = 2 * common / (len(words) + len(cw))
            if f1 > best_f1:
                best, best_f1 = command, f1
    if best is not None:
        return best, "overlap"
    return text.strip(), "raw"


@dataclass(frozen=True)
class TurnFormat:
    """How observations become human turns and commands become replies (training data and play alike)."""
    first: str  # .format(instruction=, objective=, observation=, commands=)
    next: str  # .format(observation=, commands=)
    reply: str  # .format(command=)


TURN_FORMATS = {
    # envs/textworld_tasks.py writes its expert data with this one.
    "textworld": TurnFormat(
        first="You are playing a text game. Reply with exactly one of the admissible commands.\n\n"
              "Task: {objective}\n\n{observation}\n\nAdmissible commands: {commands}",
        next="{observation}\n\nAdmissible commands: {commands}",
        reply="{command}"),
    # ETO/AgentInstruct ALFWorld layout, after convert_alfworld.py merged the instruction into the task turn.
    "alfworld": TurnFormat(first="{instruction}{observation}", next="Observation: {observation}",
                           reply="Action: {command}"),
}


def first_turn(fmt: TurnFormat, objective: str, observation: str, admissible: Sequence[str],
               instruction: str = "") -> str:
    return fmt.first.format(instruction=instruction, objective=objective, observation=observation,
                            commands=", ".join(admissible))


def next_turn(fmt: TurnFormat, observation: str, admissible: Sequence[str]) -> str:
    return fmt.next.format(observation=observation, commands=", ".join(admissible))


# ---------------------------------------------------------------------------------------------
# Environments (textworld.gym, and ALFWorld on top of it)
# ---------------------------------------------------------------------------------------------
def _request_infos(env_kind: str):
    import textworld

    if env_kind == "alfworld":  # what ALFWorld's own agents request from its PDDL games
        return textworld.EnvInfos(admissible_commands=True, won=True, extras=["gamefile"])
    # walkthrough/family/task: envs/household.py games (TextWorld's logic engine has no planner's commands)
    return textworld.EnvInfos(admissible_commands=True, won=True, lost=True, objective=True, policy_commands=True,
                              extras=["walkthrough", "family", "task"])


def make_env(game_file: str, env_kind: str = "textworld", max_steps: int = 50):
    """A `textworld.gym` environment for one game file (reset/step return one observation, one info dict)."""
    try:
        import textworld.gym
    except ImportError:
        raise DataError("textworld is not installed: pip install textworld==1.7.0") from None
    wrappers = []
    if env_kind == "alfworld":
        try:
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        except ImportError:
            raise DataError("--env alfworld needs the alfworld package (pip install alfworld) and its data") from None
        wrappers = [AlfredDemangler(shuffle=False), AlfredInfos]
    elif game_file.endswith(".json"):  # envs/household.py: played by TextWorld's logic engine, narrated by us
        from envs.household import HouseholdText

        wrappers = [HouseholdText]
    if not os.path.exists(game_file):
        raise DataError(f"{game_file}: game file not found")
    # Jericho cannot track score and moves in TextWorld's games; TextWorld tracks them itself.
    warnings.filterwarnings("ignore", message=".*is not fully supported", module="jericho")
    env_id = textworld.gym.register_game(game_file, _request_infos(env_kind), max_episode_steps=max_steps,
                                         asynchronous=False, wrappers=wrappers)
    return textworld.gym.make(env_id)


# ---------------------------------------------------------------------------------------------
# Policies: who chooses the next command
# ---------------------------------------------------------------------------------------------
@dataclass
class Episode:
    """One game under one condition, as it is being played."""
    game_id: str
    condition: str
    latents: np.ndarray | None
    plan_text: str | None
    messages: list[dict] = field(default_factory=list)  # the conversation so far ({role, content})
    infos: dict = field(default_factory=dict)  # the game's latest infos (admissible_commands, policy_commands ...)
    turns: list[dict] = field(default_factory=list)
    won: bool = False
    done: bool = False
    memory: dict = field(default_factory=dict)  # what a policy keeps between the steps of this episode


class Policy(Protocol):
    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        """The next reply of each (unfinished) episode."""


class ExpertPolicy:
    """Follows the game's own plan: `policy_commands` (recomputed by the game at every step; compiled TextWorld
    games), else the game's walkthrough from the start (envs/household.py games)."""

    def __init__(self, fmt: TurnFormat):
        self.fmt = fmt

    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        replies = []
        for ep in episodes:
            plan = ep.infos.get("policy_commands") or (ep.infos.get("extra.walkthrough") or [])[len(ep.turns):]
            replies.append(self.fmt.reply.format(command=plan[0] if plan else "look"))
        return replies


class ExplorerPolicy:
    """Searches without a message: takes the objective's object when it can, else opens a closed container,
    else leaves the room by an exit neither tried from it nor the one it came in by (else the first exit).
    The no-message baseline of a methodical searcher, against which the step budget is set (TextWorld games)."""

    REVERSE = {"go north": "go south", "go south": "go north", "go east": "go west", "go west": "go east"}

    def __init__(self, fmt: TurnFormat):
        self.fmt = fmt

    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        replies = []
        for ep in episodes:
            admissible = list(ep.infos["admissible_commands"])
            if ep.infos.get("extra.task"):  # envs/household.py games: the same kind of search, its sub-goals
                from envs.household import explorer_command

                observations = [ep.messages[0]["content"]] + [t["observation"] for t in ep.turns]
                replies.append(self.fmt.reply.format(command=explorer_command(
                    ep.infos["extra.task"], observations, [t["command"] for t in ep.turns], admissible, ep.memory)))
                continue
            objective = normalise_command(ep.infos.get("objective") or "").split()
            rooms = re.findall(r"-= (.+?) =-", "\n".join([ep.messages[0]["content"]] +
                                                          [t["observation"] for t in ep.turns]))
            room = rooms[-1] if rooms else ""
            tried = ep.memory.setdefault("exits_not_to_take", {}).setdefault(room, set())
            if ep.turns and ep.turns[-1]["command"] in self.REVERSE:  # just came in: not back the same way
                tried.add(self.REVERSE[ep.turns[-1]["command"]])
            take = [c for c in admissible if c.startswith("take ") and c.split()[1] in objective]
            opens = [c for c in admissible if c.startswith("open ")]
            exits = [c for c in admissible if c.startswith("go ")]
            command = (take or opens or [c for c in exits if c not in tried] or exits or admissible)[0]
            if command.startswith("go "):
                tried.add(command)
            replies.append(self.fmt.reply.format(command=command))
        return replies


class ActorPolicy:
    """A trained `LatentActor`: greedy replies, the episode's message in the first human turn."""

    def __init__(self, actor, max_new_tokens: int = 24, batch_size: int = 32):
        self.actor, self.max_new_tokens, self.batch_size = actor, max_new_tokens, batch_size

    def __call__(self, episodes: Sequence[Episode]) -> list[str]:
        from generation import generate_replies

        replies: list[str] = []
        for s in range(0, len(episodes), self.batch_size):
            chunk = episodes[s:s + self.batch_size]
            replies += generate_replies(self.actor, [ep.messages for ep in chunk], [ep.latents for ep in chunk],
                                        max_new_tokens=self.max_new_tokens,
                                        plan_texts=[ep.plan_text for ep in chunk])
        return replies


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclass
class Game:
    """A game to play and the sender's message for it."""
    game_id: str
    game_file: str
    latents: np.ndarray | None = None
    plan: str | None = None
    max_steps: int | None = None
    instruction: str = ""  # alfworld: the generic instruction that precedes the task (convert_alfworld.py)


def condition_messages(games: Sequence[Game], condition: str) -> list[tuple[np.ndarray | None, str | None] | None]:
    """Per game, (latents, plan text) for the condition, or None where it does not apply."""
    if condition == "true":
        return [(g.latents, None) if g.latents is not None and len(g.latents) else None for g in games]
    if condition == "shuffled":
        from evaluation import donor_indices

        donors = donor_indices(len(games))
        return [(games[d].latents, None) if d != i and games[d].latents is not None and len(games[d].latents)
                else None for i, d in enumerate(donors)]
    if condition == "none":
        return [(None, None) for _ in games]
    if condition == "plan_text":
        return [(None, g.plan) if g.plan else None for g in games]
    raise ValueError(f"unknown condition {condition!r} (expected one of {', '.join(CONDITIONS)})")


def play(games: Sequence[Game], policy: Policy, condition: str = "none", env_kind: str = "textworld",
         default_max_steps: int = 20, progress: bool = True) -> list[dict]:
    """Play every game once under `condition`, all games stepped together; one transcript dict per game.

    A transcript: `id`, `condition`, `won`, `steps` (commands sent), `max_steps`, `applies` (False when
    the condition has no message for this game: not played), `first_turn`, `turns` (each step's reply,
    the admissible commands then, the command it was mapped to, how (`exact`/`overlap`/`raw`), and the
    game's answer) and `messages` (the whole conversation, the game's last answer included).
    """
    from tqdm.auto import tqdm

    fmt = TURN_FORMATS[env_kind]
    messages = condition_messages(games, condition)
    episodes, envs, budgets, transcripts = [], [], [], [None] * len(games)
    for i, (game, message) in enumerate(zip(games, messages)):
        budget = game.max_steps or default_max_steps
        if message is None:
            transcripts[i] = {"id": game.game_id, "condition": condition, "applies": False, "won": None,
                              "steps": None, "max_steps": budget, "turns": []}
            continue
        env = make_env(game.game_file, env_kind, budget)
        obs, infos = env.reset()
        ep = Episode(game.game_id, condition, message[0], message[1], infos=infos)
        objective = infos.get("objective") or ""
        ep.messages = [{"role": "user", "content": first_turn(fmt, objective, clean_observation(obs),
                                                              infos["admissible_commands"], game.instruction)}]
        episodes.append((i, ep))
        envs.append(env)
        budgets.append(budget)
    bar = tqdm(total=sum(budgets), desc=f"play [{condition}]", unit="step", disable=not progress)
    steps = [0] * len(episodes)
    while True:
        active = [k for k, (_, ep) in enumerate(episodes) if not ep.done]
        if not active:
            break
        replies = policy([episodes[k][1] for k in active])
        for k, reply in zip(active, replies):
            _, ep = episodes[k]
            admissible = list(ep.infos["admissible_commands"])
            command, how = match_command(reply, admissible)
            obs, _, done, infos = envs[k].step(command)
            steps[k] += 1
            bar.update(1)
            ep.infos = infos
            ep.won = bool(infos.get("won"))
            observation = clean_observation(obs)
            ep.turns.append({"reply": reply, "command": command, "match": how, "admissible": admissible,
                             "observation": observation})
            ep.messages.append({"role": "assistant", "content": fmt.reply.format(command=command)})
            ep.messages.append({"role": "user", "content": next_turn(fmt, observation,
                                                                     infos.get("admissible_commands") or [])})
            if ep.won or infos.get("lost") or done or steps[k] >= budgets[k]:
                ep.done = True
                bar.update(budgets[k] - steps[k])
    bar.close()
    for env in envs:
        env.close()
    for k, (i, ep) in enumerate(episodes):
        transcripts[i] = {"id": ep.game_id, "condition": condition, "applies": True, "won": ep.won,
                          "steps": steps[k], "max_steps": budgets[k], "first_turn": ep.messages[0]["content"],
                          "turns": ep.turns, "messages": ep.messages}
    return transcripts


def summarise(transcripts: Sequence[dict]) -> dict:
    """Success rate and mean steps (all played episodes; and won ones) of one condition's transcripts."""
    played = [t for t in transcripts if t["applies"]]
    won = [t for t in played if t["won"]]
    return {"episodes": len(played), "success_rate": len(won) / len(played) if played else None,
            "mean_steps": float(np.mean([t["steps"] for t in played])) if played else None,
            "mean_steps_won": float(np.mean([t["steps"] for t in won])) if won else None}


def play_conditions(games: Sequence[Game], policy: Policy, conditions: Sequence[str] = CONDITIONS,
                    env_kind: str = "textworld", default_max_steps: int = 20, progress: bool = True) -> dict:
    """Every condition in turn; the report: `conditions` (summary per condition) and `episodes` (transcripts)."""
    report: dict[str, Any] = {"env": env_kind, "num_games": len(games), "conditions": {}, "episodes": []}
    for condition in conditions:
        transcripts = play(games, policy, condition, env_kind, default_max_steps, progress)
        report["conditions"][condition] = summarise(transcripts)
        report["episodes"] += transcripts
    return report


# ---------------------------------------------------------------------------------------------
# Records -> games
# ---------------------------------------------------------------------------------------------
def load_games(records_file: str, game_root: str | None = None, load_message: bool = True) -> list[Game]:
    """Games from a records file: `game_file` (relative to `game_root`, else to the file), latents, plan."""
    base_dir = os.path.dirname(os.path.abspath(records_file))
    games, seen = [], set()
    for where, rec in read_records(records_file):
        if not isinstance(rec, dict) or not isinstance(rec.get("game_file"), str):
            raise DataError(f"{where}: expected a record with a `game_file` (the game to play)")
        gid = str(rec.get("id", where))
        if gid in seen:
            raise DataError(f"{where}: duplicate id {gid!r}")
        seen.add(gid)
        latents = None
        if load_message and (rec.get("hidden_state_path") or rec.get("hidden_state") is not None):
            source = resolve_path(rec["hidden_state_path"], base_dir) if rec.get("hidden_state_path") \
                else rec["hidden_state"]
            latents = load_latents(source, f"{where}: id {gid!r}")
        games.append(Game(gid, resolve_path(rec["game_file"], game_root or base_dir), latents, rec.get("plan"),
                          rec.get("max_steps"), rec.get("instruction", "")))
    if not games:
        raise DataError(f"{records_file}: no records")
    return games


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    lines = [f"{'condition':<10} {'episodes':>8} {'success':>8} {'steps':>6} {'steps(won)':>10}"]
    for c, v in report["conditions"].items():
        def f(x, spec):
            return format(x, spec) if x is not None else "-"
        lines.append(f"{c:<10} {v['episodes']:>8} {f(v['success_rate'], '.3f'):>8} {f(v['mean_steps'], '.2f'):>6} "
                     f"{f(v['mean_steps_won'], '.2f'):>10}")
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """Bars: success rate and mean steps per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = {c: v for c, v in report["conditions"].items() if v["success_rate"] is not None}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "success_rate", "success rate"), (axes[1], "mean_steps", "mean steps")):
        bars = ax.bar(list(conds), [v[key] for v in conds.values()], color=[COLORS.get(c, "C1") for c in conds])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(f"{title} ({report['num_games']} games)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
@dataclass
class PlayArguments:
    records: str = field(metadata={"help": "Records naming games (`game_file`) with the sender's message "
                                           "(`hidden_state_path`, `plan`), e.g. collect_hidden_states.py's output."})
    output: str = field(metadata={"help": "The JSON report to write (summary + every transcript)."})
    model_dir: str | None = field(default=None, metadata={"help": "An output folder of train_actor.py."})
    policy: str = field(default="actor", metadata={"help": "`actor` (the trained model), `expert` (the game's "
                                                           "own plan: the ceiling, and a check of the games) or "
                                                           "`explorer` (a methodical search without the message)."})
    conditions: str = field(default=",".join(CONDITIONS), metadata={"help": "Comma-separated conditions."})
    env: str = field(default="textworld", metadata={"help": "textworld or alfworld."})
    game_root: str | None = field(default=None, metadata={
        "help": "Folder that `game_file` is relative to (default: the records file's folder; alfworld: $ALFWORLD_DATA)."})
    max_steps: int = field(default=20, metadata={"help": "Step budget of records without `max_steps`."})
    max_games: int | None = field(default=None, metadata={"help": "Play the first N games only."})
    batch_size: int = field(default=32, metadata={"help": "Games whose replies are generated together."})
    max_new_tokens: int = field(default=24)
    plot: str | None = field(default=None, metadata={"help": "Chart path (default: the output's name with .png)."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda if available, else cpu."})


def parse_args(argv: Sequence[str] | None = None) -> PlayArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PlayArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)  # before anything imports alfworld: its planner overwrites sys.argv
    try:
        conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown or not conditions:
            raise DataError(f"--conditions: unknown {unknown} (expected some of {', '.join(CONDITIONS)})")
        if args.env not in TURN_FORMATS:
            raise DataError(f"--env: expected textworld or alfworld, got {args.env!r}")
        if args.policy not in ("actor", "expert", "explorer"):
            raise DataError(f"--policy: expected actor, expert or explorer, got {args.policy!r}")
        if args.policy == "actor" and not args.model_dir:
            raise DataError("--model_dir is needed with --policy actor")
        game_root = args.game_root
        if args.env == "alfworld" and game_root is None:
            game_root = os.environ.get("ALFWORLD_DATA")
            if not game_root:
                raise DataError("--env alfworld: set --game_root or $ALFWORLD_DATA to your ALFWorld data folder")
        games = load_games(args.records, game_root)[: args.max_games]
        make_env(games[0].game_file, args.env)  # fail now, in one line, on a missing package or game
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.policy in ("expert", "explorer"):
        policy: Policy = (ExpertPolicy if args.policy == "expert" else ExplorerPolicy)(TURN_FORMATS[args.env])
    else:
        import torch

        from latent_head import LatentActor

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        actor = LatentActor.from_pretrained(args.model_dir, device=device)
        width = {g.latents.shape[1] for g in games if g.latents is not None}
        if width - {actor.head.config.latent_dim}:
            print(f"error: latents of width {sorted(width)} do not fit the actor's head "
                  f"(latent_dim {actor.head.config.latent_dim})", file=sys.stderr)
            return 2
        policy = ActorPolicy(actor, args.max_new_tokens, args.batch_size)
    try:
        report = play_conditions(games, policy, conditions, args.env, args.max_steps)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"model_dir": args.model_dir, "policy": args.policy, "records": args.records, **report}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    plot_path = args.plot or os.path.splitext(args.output)[0] + ".png"
    plot_report(report, plot_path)
    print(format_table(report))
    print(f"wrote {args.output} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
