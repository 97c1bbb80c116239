"""Who chooses the next command in a text game: the expert (the game's own plan), a blind methodical explorer
(the no-message baseline; envs/household.py's search for its games) and a trained actor reading the sender's
message."""
from __future__ import annotations

import re
from typing import Protocol, Sequence

from envs.game import Episode, TurnFormat, normalise_command

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
            if ep.infos.get("extra.task"):  # envs/household.py games: the same kind of search, by sub-goal
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
        from evaluation.generation import generate_replies

        replies: list[str] = []
        for s in range(0, len(episodes), self.batch_size):
            chunk = episodes[s:s + self.batch_size]
            replies += generate_replies(self.actor, [ep.messages for ep in chunk], [ep.latents for ep in chunk],
                                        max_new_tokens=self.max_new_tokens,
                                        plan_texts=[ep.plan_text for ep in chunk])
        return replies
