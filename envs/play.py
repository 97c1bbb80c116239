"""The closed loop: a trained actor plays text games, with the sender's latent message, and we count wins.

    python -m envs.play --model_dir checkpoints/tw_actor --records data/tw/eval.jsonl \
        --output results/play/report.json [--conditions true,shuffled,none,plan_text] [--env textworld|alfworld]

Each record names a game (`game_file`, relative to the records file, or to `--game_root`) and carries
the sender's message for it: `hidden_state_path` (latents) and `plan` (text), as written by
`sender/collect.py`. Every game is played once per condition, the message injected at the end
of the first human turn exactly as in training:
  true       the game's own latents
  shuffled   another game's latents (game i reads game (i+1) mod N's, as in evaluation/evaluate.py)
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

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from data import DataError, load_latents, read_records, resolve_path
from envs.game import TURN_FORMATS, Episode, Game, clean_observation, first_turn, make_env, match_command, next_turn
from envs.policies import ActorPolicy, ExpertPolicy, ExplorerPolicy, Policy

CONDITIONS = ("true", "shuffled", "none", "plan_text")
COLORS = {"true": "C0", "shuffled": "C3", "none": "C7", "plan_text": "C2", "expert": "C1"}


def condition_messages(games: Sequence[Game], condition: str) -> list[tuple[np.ndarray | None, str | None] | None]:
    """Per game, (latents, plan text) for the condition, or None where it does not apply."""
    if condition == "true":
        return [(g.latents, None) if g.latents is not None and len(g.latents) else None for g in games]
    if condition == "shuffled":
        from evaluation.conditions import donor_indices

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
                                           "(`hidden_state_path`, `plan`), e.g. sender/collect.py's output."})
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


def cli() -> None:
    """The `interlat-play` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
