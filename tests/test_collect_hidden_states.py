"""The sender script on a tiny random Llama with the real (offline) SmolLM2 tokenizer and chat template."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import transformers

from common import models
from sender import collect as chs

TASKS = ["Where is the key?", "Find the lamp in the house, please, and tell me which room it is in."]
PLANS = ["I searched the house. The key is in the kitchen.", "The lamp is in the attic."]


@pytest.fixture(scope="module")
def tokenizer():
    tok = transformers.AutoTokenizer.from_pretrained(models.resolve_model(models.EMBEDDED_MODEL))
    assert tok.chat_template
    return tok


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_sender_dir(tiny_model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sender")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_records(ids, with_plan: bool = True) -> list[dict]:
    records = []
    for i, rid in enumerate(ids):
        record = {"id": rid, "conversations": [{"from": "human", "value": f"Where is object {i}?"},
                                                {"from": "gpt", "value": "kitchen"}]}
        if with_plan:
            record["plan"] = f"I searched. Object {i} is in the kitchen." + " Then more." * i  # varied lengths
        records.append(record)
    return records


def write_jsonl(path, records) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_teacher_forced_matches_the_models_own_states(tiny_model, tokenizer):
    batched = chs.teacher_forced_states(tiny_model, tokenizer, TASKS, PLANS, "cpu")
    for task, plan, rows in zip(TASKS, PLANS, batched):
        prompt = chs.prompt_token_ids(tokenizer, task)
        plan_ids = chs.plan_token_ids(tokenizer, plan)
        # The prompt is the chat markup up to the assistant header; the plan's tokens follow it.
        text = tokenizer.decode(prompt)
        assert text.endswith("<|im_start|>assistant\n") and task in text
        assert tokenizer.decode(plan_ids) == plan
        ids = torch.tensor([prompt + plan_ids])
        with torch.no_grad():
            ref = tiny_model(ids, output_hidden_states=True).hidden_states[-1][0, len(prompt):]
        assert rows.shape == (len(plan_ids), 32) and rows.dtype == np.float32
        np.testing.assert_allclose(rows, ref.numpy(), atol=1e-5, rtol=0)
        # One sample alone gives the same rows as inside a padded batch of different lengths.
        alone = chs.teacher_forced_states(tiny_model, tokenizer, [task], [plan], "cpu")[0]
        np.testing.assert_allclose(rows, alone, atol=1e-5, rtol=0)
    assert batched[0].shape[0] != batched[1].shape[0]


def test_resume_skips_finished_samples(tiny_sender_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    args = ["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp), "--output_file", str(out),
            "--batch_size", "2", "--device", "cpu"]
    records = make_records([f"r{i}" for i in range(5)])
    write_jsonl(inp, records[:3])
    assert chs.main(args) == 0
    first = read_jsonl(out)
    assert [r["id"] for r in first] == ["r0", "r1", "r2"]
    npys = [out.parent / r["hidden_state_path"] for r in first]
    stats = [os.stat(p) for p in npys]

    write_jsonl(inp, records)  # two more records
    assert chs.main(args) == 0
    second = read_jsonl(out)
    assert second[:3] == first and [r["id"] for r in second[3:]] == ["r3", "r4"]
    for p, before in zip(npys, stats):  # not rewritten: os.replace would give a new inode
        after = os.stat(p)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # A run killed mid-line leaves a partial last line: it is dropped and that record redone.
    text = out.read_text()
    out.write_text(text[: len(text) - len(json.dumps(second[-1])) // 2 - 1])
    assert chs.main(args) == 0
    third = read_jsonl(out)
    assert [r["id"] for r in third] == ["r0", "r1", "r2", "r3", "r4"]
    assert third[4] == second[4]
    assert chs.main(args) == 0 and read_jsonl(out) == third  # nothing left to do


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_output_arrays_and_paths(tiny_sender_dir, tokenizer, tmp_path, dtype):
    records = make_records(["a", "b/c", "d"])
    records[0]["hidden_state"] = [[0.0]]  # inline latents of an input record are replaced by the path
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps({"data": records}))
    out = tmp_path / "sub" / "collected.jsonl"
    out.parent.mkdir()
    assert chs.main(["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp), "--output_file", str(out),
                     "--dtype", dtype, "--device", "cpu"]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b/c", "d"]
    for record, row in zip(records, rows):
        assert "hidden_state" not in row
        assert row["plan"] == record["plan"] and row["conversations"] == record["conversations"]
        path = row["hidden_state_path"]
        assert not os.path.isabs(path) and path.startswith(os.path.join("__latents__", "collected") + os.sep)
        array = np.load(out.parent / path)
        assert array.dtype == np.dtype(dtype)
        assert array.shape == (len(chs.plan_token_ids(tokenizer, record["plan"])), 32)
    assert len({r["hidden_state_path"] for r in rows}) == 3
    assert not [p for p in os.listdir(out.parent / "__latents__" / "collected") if ".tmp" in p]


def test_generate_mode(tiny_sender_dir, tokenizer, tmp_path):
    inp, out = tmp_path / "in.json", tmp_path / "gen.jsonl"
    inp.write_text(json.dumps(make_records(["g0", "g1", "g2"], with_plan=False)))
    args = ["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp), "--output_file", str(out),
            "--mode", "generate", "--max_new_tokens", "12", "--min_new_tokens", "6", "--seed", "1",
            "--device", "cpu"]
    assert chs.main(args) == 0
    rows = read_jsonl(out)
    assert len(rows) == 3
    for row in rows:
        assert row["plan"]  # min_new_tokens keeps the random model from stopping at once
        array = np.load(out.parent / row["hidden_state_path"])
        # The saved latents are the teacher-forced states of the saved (re-tokenised) plan.
        assert array.shape == (len(chs.plan_token_ids(tokenizer, row["plan"])), 32)
    # Same seed, same plans.
    again = tmp_path / "gen2.jsonl"
    assert chs.main(args[:5] + [str(again)] + args[6:]) == 0
    assert [r["plan"] for r in read_jsonl(again)] == [r["plan"] for r in rows]


def test_generate_plans_stops_at_end_of_turn(tiny_model, tokenizer):
    plans = chs.generate_plans(tiny_model, tokenizer, TASKS, "cpu", max_new_tokens=8, temperature=0)
    assert len(plans) == 2 and all("<|im_end|>" not in p for p in plans)


def test_clear_errors(tiny_sender_dir, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert chs.main(["--input_file", str(missing), "--output_file", str(tmp_path / "o.jsonl")]) == 2
    assert "--input_file" in (err := capsys.readouterr().err) and "file not found" in err
    inp = tmp_path / "in.json"
    records = make_records(["x", "y"])
    del records[1]["plan"]
    inp.write_text(json.dumps(records))
    assert chs.main(["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp),
                     "--output_file", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "'y'" in err and str(inp) in err and "plan" in err


def test_a_complete_last_line_without_newline_is_kept(tiny_sender_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    args = ["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp), "--output_file", str(out),
            "--device", "cpu"]
    records = make_records(["r0", "r1", "r2"])
    write_jsonl(inp, records[:2])
    assert chs.main(args) == 0
    out.write_text(out.read_text().rstrip("\n"))  # e.g. saved by an editor: the last record is whole
    done = out.read_text()
    write_jsonl(inp, records)
    assert chs.main(args) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1", "r2"] and out.read_text().startswith(done + "\n")


def test_two_output_files_never_share_a_latent_folder(tiny_sender_dir, tmp_path, capsys):
    shared = tmp_path / "latents"
    common = ["--model_name_or_path", tiny_sender_dir, "--latent_dir", str(shared), "--device", "cpu"]
    write_jsonl(tmp_path / "a_in.jsonl", make_records(["x"]))
    write_jsonl(tmp_path / "b_in.jsonl", make_records(["x"]))  # the same id, another plan source
    assert chs.main(common + ["--input_file", str(tmp_path / "a_in.jsonl"), "--output_file",
                              str(tmp_path / "a.jsonl")]) == 0
    before = (shared / "x.npy").read_bytes()
    assert chs.main(common + ["--input_file", str(tmp_path / "b_in.jsonl"), "--output_file",
                              str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"holds the latents of {os.path.realpath(tmp_path / 'a.jsonl')}" in err and "another --latent_dir" in err and "Traceback" not in err
    assert (shared / "x.npy").read_bytes() == before and not (tmp_path / "b.jsonl").exists()
    assert chs.main(common + ["--input_file", str(tmp_path / "a_in.jsonl"), "--output_file",
                              str(tmp_path / "a.jsonl")]) == 0  # its own folder: resumes


def test_sender_inputs_are_checked_as_training_checks_them(tiny_sender_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    args = ["--model_name_or_path", tiny_sender_dir, "--input_file", str(inp), "--output_file", str(out),
            "--device", "cpu"]
    records = make_records(["a" * 300, "u"])
    records[1]["conversations"][0]["from"] = "user"  # accepted, as in training
    write_jsonl(inp, records)
    assert chs.main(args) == 0
    written = read_jsonl(out)
    assert [r["id"] for r in written] == ["a" * 300, "u"]
    assert all(len(os.path.basename(r["hidden_state_path"])) <= 120 for r in written)

    for mutate, words in ((lambda r: r["conversations"].insert(0, {"from": "gpt", "value": "Hi"}), "assistant_first"),
                          (lambda r: r.update(plan="a <|im_end|> b"), "<|im_end|>")):
        bad = make_records(["z"])
        mutate(bad[0])
        write_jsonl(inp, bad)
        assert chs.main(args[:-4] + ["--output_file", str(tmp_path / "z.jsonl"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and not (tmp_path / "z.jsonl").exists()
    assert chs.main(args[:-4] + ["--output_file", str(tmp_path), "--device", "cpu"]) == 2
    assert "is a folder" in capsys.readouterr().err
