"""ALFWorld SFT conversations (ETO / AgentInstruct) -> training records: the latent message follows the task."""
import json
import os

import pytest

from data import encode_conversation, normalise_record
from envs import convert_alfworld as ca

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "alfworld_sft_sample.json")


@pytest.fixture(scope="module")
def sample():
    with open(SAMPLE) as f:
        return json.load(f)


def converted(tmp_path, **kw):
    out = str(tmp_path / "out.jsonl")
    n = ca.convert_file(SAMPLE, out, **kw)
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert n == len(records)
    return records


def test_task_turn_merges_instruction_and_task_and_drops_the_ok(tmp_path, sample):
    eto, agentinstruct, task_first = converted(tmp_path)
    src = sample[0]["conversations"]
    # ETO: instruction + task as one human turn, the "OK" gone, the rest unchanged
    assert eto["conversations"][0] == {"from": "human", "value": src[0]["value"] + "\n\n" + src[2]["value"]}
    assert eto["conversations"][1:] == src[3:]
    assert eto["instruction"] == src[0]["value"] + "\n\nHere is your task. "  # all but the game's observation
    assert eto["game_file"] == sample[0]["game_file"] and eto["id"] == "eto_pick_clean_0"
    # AgentInstruct: the worked example in the instruction says "Your task is to:" too; the task turn is still
    # the one answered by the first real action, and the per-turn `loss` keys are gone
    first = agentinstruct["conversations"][0]["value"]
    assert first.endswith("Your task is to: put a pillow in drawer.") and "examine the book" in first
    assert all(set(t) == {"from", "value"} for t in agentinstruct["conversations"])
    assert agentinstruct["conversations"][1]["value"] == "Thought: Pillows are on beds.\nAction: go to bed 1"
    # the task already in the first turn: nothing merged
    assert task_first["conversations"] == sample[2]["conversations"] and task_first["instruction"] == ""


def test_plan_from_expert_actions(tmp_path):
    eto, agentinstruct, _ = converted(tmp_path)
    assert eto["plan"] == ("Plan: go to countertop 1, then take mug 1 from countertop 1, then go to sinkbasin 1, "
                           "then clean mug 1 with sinkbasin 1, then go to coffeemachine 1, then put mug 1 in/on "
                           "coffeemachine 1.")
    assert agentinstruct["plan"].startswith("Plan: go to bed 1, then take pillow 1 from bed 1")
    assert all("plan" not in r for r in converted(tmp_path, plan="none"))


def test_first_turn_flag_keeps_the_conversation(tmp_path, sample):
    records = converted(tmp_path, latent_turn="first")
    for rec, src in zip(records, sample):
        assert rec["conversations"] == [{"from": t["from"], "value": t["value"]} for t in src["conversations"]]
        assert "instruction" not in rec


def test_the_marker_follows_the_task_in_the_tokens(tmp_path, tokenizer_dir):
    """Where the latents go: after the task with --latent_turn task, before it with first."""
    from transformers import AutoTokenizer

    from latent_head import add_special_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_special_tokens(tok)
    for latent_turn, task_before_marker in (("task", True), ("first", False)):
        rec = converted(tmp_path, latent_turn=latent_turn)[0]
        enc = encode_conversation(tok, normalise_record(rec, "x", str(tmp_path))["messages"])
        before = tok.decode(enc["input_ids"][: enc["marker_index"]])
        assert ("Your task is to: put a clean mug in coffeemachine." in before) == task_before_marker


def test_converted_records_are_valid_training_data(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from common.validation import validate_files

    converted(tmp_path)
    report = validate_files([str(tmp_path / "out.jsonl")], AutoTokenizer.from_pretrained(tokenizer_dir))
    assert report.ok, report.format()


def test_a_malformed_record_names_file_id_and_field_and_writes_nothing(tmp_path, capsys, sample):
    bad = [sample[0], {"id": "broken", "conversations": [{"from": "human", "value": 3}]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    out = tmp_path / "out.jsonl"
    assert ca.main(["--input", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.json[1]" in err and "'broken'" in err and "conversations[0]" in err
    assert not out.exists()


def test_play_rebuilds_the_trained_first_turn_from_instruction_and_observation(tmp_path):
    """`envs/play.py --env alfworld` writes `instruction` + the game's first observation: the trained turn."""
    from envs import play as pa

    for rec in converted(tmp_path):
        first = rec["conversations"][0]["value"]
        observation = first[len(rec["instruction"]):]
        assert first.startswith(rec["instruction"]) and observation.startswith(ca.OBSERVATION_START)
        assert pa.first_turn(pa.TURN_FORMATS["alfworld"], "", observation, [], rec["instruction"]) == first
