"""The closed loop: generated games are winnable through it, conditions feed what they claim, replies map
onto commands by the documented rule, and the actor sees at play the first turn it was trained on."""
import json
import os

import numpy as np
import pytest

from envs import play as pa
from conftest import LATENT_DIM
from envs import textworld_tasks as tt


@pytest.fixture(scope="module")
def tw_data(tmp_path_factory):
    """1 training game (deleted after its expert episode) and 3 eval games, compiled (~10 s)."""
    out = str(tmp_path_factory.mktemp("tw"))
    files = tt.generate(out, n_train=1, n_eval=3, seed=7)
    with open(files["eval"]) as f:
        records = [json.loads(line) for line in f]
    return out, files, records


def games_with_messages(out, records):
    rng = np.random.default_rng(0)
    return [pa.Game(r["id"], os.path.join(out, r["game_file"]), rng.standard_normal((5, LATENT_DIM)).astype(np.float32),
                    r["plan"], r["max_steps"]) for r in records]


# ---------------------------------------------------------------------------------------------
# Games and expert data
# ---------------------------------------------------------------------------------------------
def test_generated_games_are_won_by_their_policy_commands_through_the_loop(tw_data):
    out, files, records = tw_data
    games = [pa.Game(r["id"], os.path.join(out, r["game_file"]), max_steps=r["max_steps"]) for r in records]
    report = pa.play_conditions(games, pa.ExpertPolicy(pa.TURN_FORMATS["textworld"]), ["none"], progress=False)
    assert report["conditions"]["none"]["success_rate"] == 1.0
    for ep, rec in zip(report["episodes"], records):
        assert ep["won"] and ep["steps"] == rec["expert_steps"] == rec["max_steps"] - tt.TaskOptions.slack
        assert all(t["match"] == "exact" and t["command"] in t["admissible"] for t in ep["turns"])
        # the final command takes the target from its container, in the plan's room
        target = rec["target"]
        assert ep["turns"][-1]["command"] == f"take {target['object']} from {target['container']}"


def test_expert_records_hide_the_target_from_the_actor_and_give_it_to_the_sender(tw_data):
    out, files, records = tw_data
    for rec in records:
        target, conv = rec["target"], rec["conversations"]
        first = conv[0]["value"]
        assert conv[0]["from"] == "human" and f"Task: Find the {target['object']} and take it." in first
        assert "$$" not in first and "\n>" not in first  # title art and prompt line cleaned away
        assert target["container"] not in first or target["room"] != target["start"]  # the target is elsewhere
        assert target["room"] in rec["plan"] and target["container"] in rec["plan"]
        # alternating turns ending with the winning command, one reply per expert step
        assert [t["from"] for t in conv] == ["human", "gpt"] * rec["expert_steps"]
        assert conv[-1]["value"] == f"take {target['object']} from {target['container']}"
        assert os.path.exists(os.path.join(out, rec["game_file"]))
    with open(files["train"]) as f:
        (train,) = [json.loads(line) for line in f]
    assert "game_file" not in train and not os.path.exists(os.path.join(out, "games", "train_0000.z8"))
    assert train["conversations"] != records[0]["conversations"]  # the splits are different games


def test_same_seed_same_game_and_splits_differ():
    a, fa = tt.build_game("0-eval-3", tt.TaskOptions())
    b, fb = tt.build_game("0-eval-3", tt.TaskOptions())
    c, fc = tt.build_game("0-train-3", tt.TaskOptions())
    facts = lambda g: sorted(map(str, g.world.facts))  # noqa: E731
    assert fa == fb and a.serialize() == b.serialize()  # layout, quest and the descriptions' wording
    assert facts(a) != facts(c)


def test_expert_data_is_valid_training_data(tw_data, tokenizer_dir):
    from transformers import AutoTokenizer

    from common.validation import validate_files

    out, files, _ = tw_data
    report = validate_files([files["eval"]], AutoTokenizer.from_pretrained(tokenizer_dir))
    assert report.ok, report.format()


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------
class RecordingPolicy:
    """Plays the expert's command and records what each episode was given."""

    def __init__(self):
        self.seen, self.expert = [], pa.ExpertPolicy(pa.TURN_FORMATS["textworld"])

    def __call__(self, episodes):
        for ep in episodes:
            self.seen.append((ep.condition, ep.game_id, ep.latents, ep.plan_text, ep.messages[0]["content"]))
        return self.expert(episodes)


def test_conditions_feed_what_they_claim_and_transcripts_record_them(tw_data):
    out, _, records = tw_data
    games = games_with_messages(out, records)
    policy = RecordingPolicy()
    report = pa.play_conditions(games, policy, pa.CONDITIONS, progress=False)
    index = {g.game_id: i for i, g in enumerate(games)}
    first_turns = {}
    for condition, gid, latents, plan, first in policy.seen:
        g = games[index[gid]]
        donor = games[(index[gid] + 1) % len(games)]
        expected = {"true": (g.latents, None), "shuffled": (donor.latents, None), "none": (None, None),
                    "plan_text": (None, g.plan)}[condition]
        assert (latents is None) == (expected[0] is None) and plan == expected[1]
        if latents is not None:
            np.testing.assert_array_equal(latents, expected[0])
        first_turns.setdefault(gid, set()).add(first)  # the message is not in the text: same turn for all
    assert all(len(v) == 1 for v in first_turns.values())
    assert [e["condition"] for e in report["episodes"]] == [c for c in pa.CONDITIONS for _ in games]
    assert [e["id"] for e in report["episodes"]] == [g.game_id for _ in pa.CONDITIONS for g in games]
    for c in pa.CONDITIONS:
        eps = [e for e in report["episodes"] if e["condition"] == c]
        assert report["conditions"][c] == pa.summarise(eps)
        assert report["conditions"][c]["success_rate"] == 1.0


def test_a_condition_without_a_message_is_not_played():
    games = [pa.Game("a", "unused.z8", None, "plan a"), pa.Game("b", "unused.z8", None, None)]
    transcripts = pa.play(games, RecordingPolicy(), "true", progress=False)
    assert [t["applies"] for t in transcripts] == [False, False]
    assert pa.summarise(transcripts) == {"episodes": 0, "success_rate": None, "mean_steps": None,
                                         "mean_steps_won": None}


def test_an_actor_that_ignores_the_message_plays_at_the_no_message_rate(tw_data):
    out, _, records = tw_data
    games = games_with_messages(out, records)
    report = pa.play_conditions(games, pa.ExplorerPolicy(pa.TURN_FORMATS["textworld"]), pa.CONDITIONS,
                                progress=False)
    none = [(e["won"], e["steps"], [t["command"] for t in e["turns"]]) for e in report["episodes"]
            if e["condition"] == "none"]
    for c in pa.CONDITIONS:
        eps = [(e["won"], e["steps"], [t["command"] for t in e["turns"]]) for e in report["episodes"]
               if e["condition"] == c]
        assert eps == none
        assert report["conditions"][c] == report["conditions"]["none"]
    for e in report["episodes"]:
        assert e["won"] or e["steps"] == e["max_steps"]  # the budget binds: a lost episode used all of it
        for t in e["turns"]:
            # the searcher opens every closed container before leaving a room, and takes only the target
            assert not (t["command"].startswith("go ") and any(c.startswith("open ") for c in t["admissible"]))
            target = next(r["target"]["object"] for r in records if r["id"] == e["id"])
            assert not t["command"].startswith("take ") or t["command"].split()[1] == target


# ---------------------------------------------------------------------------------------------
# Replies -> commands, and the trained actor in the loop
# ---------------------------------------------------------------------------------------------
ADMISSIBLE = ["examine wooden chest", "go east", "go north", "open wooden chest", "take coin from wooden chest"]


@pytest.mark.parametrize("reply, command, how", [
    ("go east", "go east", "exact"),
    ("Thought: the coin is east.\nAction: Go East.", "go east", "exact"),
    ("  Open the wooden chest\nthen take", "open wooden chest", "overlap"),
    ("take coin", "take coin from wooden chest", "overlap"),
    ("go", "go east", "overlap"),  # a tie between go east and go north: the first listed
    ("dance wildly", "dance wildly", "raw"),
    ("", "", "raw"),
])
def test_match_command(reply, command, how):
    assert pa.match_command(reply, ADMISSIBLE) == (command, how)


def test_clean_observation_drops_title_and_prompt():
    raw = ("\n\n  ________  __\n |        \\|  \\\n  \\$$$$$$$$| $$\n      >$$  $$\n\nFind the coin and take it.\n\n"
           "-= Kitchen =-\nYou are in a kitchen.\n\n\n\nThere is an exit to the east.\n\n>  -= Kitchen =-0/1")
    assert pa.clean_observation(raw) == ("Find the coin and take it.\n\n-= Kitchen =-\nYou are in a kitchen.\n\n"
                                         "There is an exit to the east.")


def test_trained_actor_plays_with_the_first_turn_it_was_trained_on(tw_data, actor):
    out, _, records = tw_data
    games = games_with_messages(out, records[:2])
    for g in games:
        g.max_steps = 2
    report = pa.play_conditions(games, pa.ActorPolicy(actor, max_new_tokens=8, batch_size=2), ["true", "none"],
                                progress=False)
    for ep in report["episodes"]:
        rec = records[[r["id"] for r in records].index(ep["id"])]
        assert ep["first_turn"] == rec["conversations"][0]["value"]
        assert ep["steps"] == 2 and len(ep["turns"]) == 2
        for t in ep["turns"]:
            assert (t["command"] in t["admissible"]) == (t["match"] != "raw")
            assert pa.match_command(t["reply"], t["admissible"]) == (t["command"], t["match"])


def test_cli_expert_report_and_plot(tw_data, tmp_path, capsys):
    out, files, _ = tw_data
    report_path = str(tmp_path / "play" / "report.json")
    assert pa.main(["--records", files["eval"], "--policy", "expert", "--conditions", "none,plan_text",
                    "--output", report_path]) == 0
    with open(report_path) as f:
        report = json.load(f)
    assert list(report["conditions"]) == ["none", "plan_text"] and report["num_games"] == 3
    assert report["conditions"]["plan_text"]["success_rate"] == 1.0
    assert os.path.getsize(str(tmp_path / "play" / "report.png")) > 0
    assert "plan_text" in capsys.readouterr().out


def test_cli_user_errors_are_one_line(tw_data, tmp_path, capsys, monkeypatch):
    out, files, records = tw_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "conversations": []}) + "\n")
    assert pa.main(["--records", str(bad), "--policy", "expert", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1" in err and "game_file" in err
    assert pa.main(["--records", files["eval"], "--conditions", "true,sideways", "--policy", "expert",
                    "--output", str(tmp_path / "r.json")]) == 2
    assert "sideways" in capsys.readouterr().err
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    assert pa.main(["--records", files["eval"], "--env", "alfworld", "--policy", "expert",
                    "--output", str(tmp_path / "r.json")]) == 2
    assert "ALFWORLD_DATA" in capsys.readouterr().err
    try:
        import alfworld  # noqa: F401
    except ImportError:
        assert pa.main(["--records", files["eval"], "--env", "alfworld", "--game_root", out, "--policy", "expert",
                        "--output", str(tmp_path / "r.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "pip install alfworld" in err
