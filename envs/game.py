"""Text-game plumbing shared by the play loop, the policies and the game generators: observations, turn
formats, command matching, and the `textworld.gym` environment (TextWorld games, ALFWorld's on top of it)."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from common.safe_io import DataError

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
    # ETO/AgentInstruct ALFWorld layout, after envs/convert_alfworld.py merged the instruction into the task turn.
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


@dataclass
class Game:
    """A game to play and the sender's message for it."""
    game_id: str
    game_file: str
    latents: np.ndarray | None = None
    plan: str | None = None
    max_steps: int | None = None
    instruction: str = ""  # alfworld: the generic instruction that precedes the task (envs/convert_alfworld.py)
