"""ALFWorld-shaped household games: every family is won by its expert through the play loop, the win conditions
are the objective's (any receptacle of the kind; the transform needed), the unseen split shares no name with
training, plans are facts more often than commands, and transcripts record each step."""
import json
import os
import re

import numpy as np
import pytest

from envs import play as pa
from envs import household as hh
from envs import make_household

FMT = pa.TURN_FORMATS["textworld"]


@pytest.fixture(scope="module")
def hh_data(tmp_path_factory):
    """One game per family in each split (18 games, about a second)."""
    out = str(tmp_path_factory.mktemp("hh"))
    files = make_household.generate(out, n_train=6, n_eval=6, seed=5, keep_train_games=True)
    records = {}
    for split, path in files.items():
        with open(path) as f:
            records[split] = [json.loads(line) for line in f]
    return out, files, records


def games_of(out, records, max_steps=None):
    return [pa.Game(r["id"], os.path.join(out, r["game_file"]), plan=r["plan"], max_steps=max_steps or r["max_steps"])
            for r in records]


def play_commands(path, commands):
    """Send `commands` to a game; (won after each, observations)."""
    env = pa.make_env(path, "textworld", 100)
    obs, infos = env.reset()
    wins, observations = [], [obs]
    for c in commands:
        obs, _, _, infos = env.step(c)
        wins.append(bool(infos["won"]))
        observations.append(obs)
    env.close()
    return wins, observations, infos


def test_every_family_is_won_by_its_expert_through_the_loop_in_every_split(hh_data):
    out, _, records = hh_data
    for split, recs in records.items():
        assert [r["family"] for r in recs] == list(hh.FAMILIES)
        report = pa.play_conditions(games_of(out, recs), pa.ExpertPolicy(FMT), ["none"], progress=False)
        assert report["conditions"]["none"]["success_rate"] == 1.0, split
        for ep, rec in zip(report["episodes"], recs):
            assert ep["won"] and ep["steps"] == rec["expert_steps"] == rec["max_steps"] - hh.HouseholdOptions.slack
            assert all(t["match"] == "exact" and t["command"] in t["admissible"] for t in ep["turns"])
            # the expert's episode is the training record's conversation, turn for turn
            replies = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
            assert replies == [t["command"] for t in ep["turns"]]


def test_sub_goals_and_horizon(hh_data):
    _, _, records = hh_data
    recs = records["train"]
    for rec in recs:
        replies = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        first_room = rec["target"]["start"]
        assert replies[0].startswith("go ") and replies[0] != "go to"  # the object is never in the start room
        assert f"take {rec['target']['objects'][0]} from " in " | ".join(replies)
        verb = hh.TRANSFORMS.get(rec["family"], (None,))[0]
        if verb:  # the transform comes after the take and before the put
            order = [c.split()[0] for c in replies if c.split()[0] in ("take", verb, "put")]
            assert order == ["take", verb, "put"]
        if rec["family"] == "pick_two_and_place":
            assert sum(c.startswith("put ") for c in replies) == 2 and len(rec["target"]["objects"]) == 2
        if rec["family"] == "look_at_under_lamp":
            assert replies[-1].startswith("use ")
        assert first_room in rec["conversations"][0]["value"]
    assert np.mean([r["expert_steps"] for r in recs]) >= 9  # 10.9 on 120 games (README); tiny sample here


def _receptacles_in_view(observations):
    """The receptacles listed by the last room description."""
    room = [o for o in observations if "Looking quickly around you, you see " in o][-1]
    listing = room.split("you see ", 1)[1].split(". There ")[0]
    return [" ".join(item.split()[-2:]) for item in listing.replace(", and ", ", ").split(", ")]


def _put_there(path, walkthrough, receptacle):
    """The walkthrough up to its last put, then the object goes to `receptacle` (in the same room) instead."""
    obj = " ".join(walkthrough[-1].split()[1:3])
    env = pa.make_env(path, "textworld", 100)
    env.reset()
    for c in walkthrough[:-1] + [f"go to {receptacle}"]:
        _, _, _, infos = env.step(c)
    if f"open {receptacle}" in infos["admissible_commands"]:
        _, _, _, infos = env.step(f"open {receptacle}")
    (put,) = [c for c in infos["admissible_commands"] if c.startswith(f"put {obj} ")]
    _, _, _, infos = env.step(put)
    env.close()
    return bool(infos["won"])


def test_any_receptacle_of_the_kind_wins_and_the_transform_is_needed(tmp_path):
    found = False
    for i in range(200):  # a heat game whose destination room has another receptacle of the kind, and another kind
        game, info = hh.build_game(f"test-{i}", "heat_then_place", hh.VOCABULARIES["seen"], hh.HouseholdOptions())
        path = str(tmp_path / f"g{i}.json")
        game.save(path)
        walkthrough = info["walkthrough"]
        wins, observations, _ = play_commands(path, walkthrough)
        dest = " ".join(walkthrough[-1].split()[-2:])
        kind = dest.rsplit(" ", 1)[0]
        in_view = [r for r in _receptacles_in_view(observations) if r != dest]
        same = [r for r in in_view if r.rsplit(" ", 1)[0] == kind]
        other = [r for r in in_view if r.rsplit(" ", 1)[0] != kind and r.rsplit(" ", 1)[0] in
                 hh.VOCABULARIES["seen"].closed + hh.VOCABULARIES["seen"].surfaces]
        if same and other:
            found = True
            break
    assert found
    assert wins[-1] and not any(wins[:-1])  # won by the last put, not before
    assert not any(play_commands(path, [c for c in walkthrough if not c.startswith("heat ")])[0])  # not heated
    assert _put_there(path, walkthrough, same[0]) is True  # another receptacle of the kind
    assert _put_there(path, walkthrough, other[0]) is False  # a receptacle of another kind


def test_the_unseen_split_shares_no_name_or_layout_with_training(hh_data):
    out, _, records = hh_data
    seen, unseen = hh.VOCABULARIES["seen"], hh.VOCABULARIES["unseen"]
    assert not seen.names() & unseen.names()
    train_text = json.dumps(records["train"]).lower()
    for rec in records["eval_unseen"]:
        for name in rec["rooms"] + rec["receptacle_kinds"] + [o.rsplit(" ", 1)[0] for o in rec["objects"]]:
            assert name in unseen.names() and f" {name} " not in train_text.replace('"', " ")
    train_layouts = {r["layout"] for r in records["train"]}
    assert not train_layouts & {r["layout"] for r in records["eval_unseen"]}
    # the game files themselves: no entity of an unseen game is named like anything in a training game
    def entity_names(rec):
        with open(os.path.join(out, rec["game_file"])) as f:
            names = [v["name"] for _, v in json.load(f)["infos"] if v["name"] not in ("middle", "P", "I")]
        return {n.rsplit(" ", 1)[0] if n.split()[-1].isdigit() else n for n in names}
    train_names = set().union(*(entity_names(r) for r in records["train"]))
    unseen_names = set().union(*(entity_names(r) for r in records["eval_unseen"]))
    assert train_names and unseen_names and not train_names & unseen_names
    # seen eval games are other games than the training ones, from the same vocabulary
    assert {r["layout"] for r in records["eval_seen"]}.isdisjoint(train_layouts)
    assert set().union(*(entity_names(r) for r in records["eval_seen"])) <= seen.names()
    assert unseen_names <= unseen.names()


def test_plans_are_mostly_facts_and_subgoals_not_the_command_list():
    infos = [hh.build_game(f"9-train-{i}", hh.FAMILIES[i % 6], hh.VOCABULARIES["seen"], hh.HouseholdOptions())[1]
             for i in range(60)]
    facts = [i for i in infos if i["plan_style"] == "facts"]
    assert len(facts) >= len(infos) / 2
    for info in infos:
        walkthrough = info["walkthrough"]
        if info["plan_style"] == "commands":
            assert info["plan"] == "Plan: " + ", ".join(walkthrough) + "."
        else:
            # the facts the actor needs (objects, receptacles, rooms) are there; the literal commands are not
            assert all(o in info["plan"] for o in info["target"]["objects"])
            assert all(s in info["plan"] for s in info["target"]["sources"])
            assert "go to " not in info["plan"]
            assert not any(c in info["plan"] for c in walkthrough if not c.startswith("go "))


def test_same_seed_same_game():
    a, ia = hh.build_game("0-eval_unseen-4", "heat_then_place", hh.VOCABULARIES["unseen"], hh.HouseholdOptions())
    b, ib = hh.build_game("0-eval_unseen-4", "heat_then_place", hh.VOCABULARIES["unseen"], hh.HouseholdOptions())
    _, ic = hh.build_game("0-eval_unseen-5", "heat_then_place", hh.VOCABULARIES["unseen"], hh.HouseholdOptions())
    assert a.serialize() == b.serialize() and ia == ib
    assert ia["layout"] != ic["layout"] or ia["walkthrough"] != ic["walkthrough"]


def test_transcripts_record_each_steps_observation_and_command(hh_data):
    out, _, records = hh_data
    recs = records["eval_unseen"]
    report = pa.play_conditions(games_of(out, recs), pa.ExpertPolicy(FMT), ["none"], progress=False)
    for ep, rec in zip(report["episodes"], recs):
        walkthrough = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
        _, observations, _ = play_commands(os.path.join(out, rec["game_file"]), walkthrough)
        assert [t["command"] for t in ep["turns"]] == walkthrough
        assert [t["observation"] for t in ep["turns"]] == [pa.clean_observation(o) for o in observations[1:]]
        for t in ep["turns"]:
            if t["command"].startswith("go to "):
                assert t["observation"].startswith(f"You arrive at {t['command'][6:]}.")
            if t["command"].startswith("go ") and not t["command"].startswith("go to"):
                assert t["observation"].startswith("You are in the middle of the ")
        # the first turn shows the task and the start room's numbered receptacles, and the admissible commands
        first = ep["first_turn"]
        assert f"Task: {rec['objective']}" in first and "Looking quickly around you, you see a" in first
        assert "Admissible commands: " in first and re.search(r"you see an? \w+ \d+, ", first)


def test_the_blind_explorer_searches_the_whole_house_but_rarely_within_the_budget(hh_data):
    out, _, records = hh_data
    recs = records["eval_seen"] + records["eval_unseen"]
    policy = pa.ExplorerPolicy(FMT)
    unlimited = pa.play_conditions(games_of(out, recs, max_steps=300), policy, ["none"], progress=False)
    assert unlimited["conditions"]["none"]["success_rate"] == 1.0  # a complete search
    for ep, rec in zip(unlimited["episodes"], recs):
        wanted = rec["target"]["objects"][0].rsplit(" ", 1)[0]
        for t in ep["turns"]:
            assert t["command"] in t["admissible"]
            assert not t["command"].startswith("take ") or t["command"].split()[1] == wanted
    budget = pa.play_conditions(games_of(out, recs), policy, ["none"], progress=False)
    assert budget["conditions"]["none"]["success_rate"] <= 0.25


def test_cli_writes_the_splits_and_refuses_bad_flags_in_one_line(tmp_path, capsys):
    args = ["--out_dir", str(tmp_path), "--n_train", "2", "--n_eval", "1", "--splits", "train,eval_unseen"]
    assert make_household.main(args) == 0
    assert sorted(os.listdir(tmp_path)) == ["eval_unseen_raw.jsonl", "games", "train_raw.jsonl"]
    assert os.listdir(tmp_path / "games") == ["eval_unseen_0000.json"]  # training games are not kept
    capsys.readouterr()
    assert make_household.main(["--out_dir", str(tmp_path), "--splits", "train,eval_mars"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval_mars" in err


@pytest.mark.slow
def test_household_records_are_valid_training_data(hh_data, tokenizer_dir):
    from transformers import AutoTokenizer

    from common.validation import validate_files

    _, files, _ = hh_data
    report = validate_files([files["train"], files["eval_unseen"]], AutoTokenizer.from_pretrained(tokenizer_dir))
    assert report.ok, report.format()


def test_summary_scores_each_family_split_and_condition(hh_data, tmp_path):
    """benchmarks/envs_summary.py: success per player, split, condition and family, from play reports; a
    missing report (a run cut short) is skipped."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("envs_summary", os.path.join(
        os.path.dirname(__file__), "..", "benchmarks", "envs_summary.py"))
    summary_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary_mod)
    out, _, records = hh_data
    recs = records["eval_unseen"]
    won = {r["id"]: r["family"] in ("pick_and_place", "heat_then_place") for r in recs}
    episodes = [{"id": r["id"], "condition": c, "applies": True, "won": won[r["id"]] if c == "true" else False,
                 "steps": 7 if won[r["id"]] else r["max_steps"]} for c in ("true", "none") for r in recs]
    path = tmp_path / "play.json"
    path.write_text(json.dumps({"episodes": episodes}))
    s = summary_mod.summarise(out, {("seed0", "eval_unseen"): str(path), ("seed1", "eval_seen"): str(tmp_path / "x")})
    assert list(s) == ["seed0"] and list(s["seed0"]) == ["eval_unseen"]
    true, none = s["seed0"]["eval_unseen"]["true"], s["seed0"]["eval_unseen"]["none"]
    assert true["success"] == pytest.approx(2 / 6) and true["mean_steps_won"] == 7 and none["success"] == 0
    assert {f: v["success"] for f, v in true["families"].items()} == {
        f: float(f in ("pick_and_place", "heat_then_place")) for f in hh.FAMILIES}
    table = summary_mod.table(s)
    assert "| seed0 | unseen | 33% | - | 0% | - | 7.0 |" in table
