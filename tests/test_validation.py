"""common/validation.py: every kind of bad input is reported with its place; nothing runs code; CLI exit codes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import LATENT_DIM, ROOT, make_records, write_jsonl
from common.validation import SEVERITY, main, validate_files
from data import DataError, load_latents, tokenize_sample


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def good_records(tmp_path, n=4, **kw):
    """Records that validate clean: plan + latent file (relative path), ids s000..."""
    return make_records(n, str(tmp_path / "latents"), **kw)


def validate(tmp_path, records, name="data.jsonl", **kw):
    """Write `records` (JSONL, or a JSON list for *.json) and validate; returns (report, path)."""
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, records)
    else:
        path.write_text(json.dumps(records, indent=1))
    return validate_files([str(path)], **kw), str(path)


def one(report, kind):
    """The single problem of `kind` (and check its severity against the table)."""
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.format()
    assert found[0].severity == SEVERITY[kind]
    return found[0]


def kinds(report):
    return sorted({p.kind for p in report.problems})


# ---------------------------------------------------------------------------------------------
# clean data, report shape
# ---------------------------------------------------------------------------------------------
def test_clean_data_has_no_problems_jsonl_and_json(tmp_path):
    recs = good_records(tmp_path)
    for name in ("a.jsonl", "b.json"):
        report, _ = validate(tmp_path, recs, name=name)
        assert report.ok and report.problems == [], report.format()
        assert report.records == 4 and report.files == 1 and report.latent_dim == LATENT_DIM
    assert "0 error(s), 0 warning(s)" in report.format()


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    recs = good_records(tmp_path, n=6)
    recs[1]["conversations"][0]["from"] = "bot"
    recs[3]["conversations"] = "hello"
    recs[4]["hidden_state_path"] = "latents/nope.npy"
    recs[5]["conversations"][1]["value"] = 3
    report, path = validate(tmp_path, recs)
    assert [(p.kind, p.location) for p in report.errors] == [
        ("unknown_role", f"{path}:2"), ("conversations_not_list", f"{path}:4"),
        ("latent_file_missing", f"{path}:5"), ("value_not_string", f"{path}:6")]
    assert not report.ok


def test_format_one_line_per_problem_then_counts_per_kind(tmp_path):
    recs = good_records(tmp_path, n=5)
    for r in recs[:3]:
        del r["id"]
    for r in recs[3:]:
        del r["plan"]
    report, path = validate(tmp_path, recs)
    text = report.format()
    lines = text.splitlines()
    assert len(lines) == 5 + 2  # problems, the totals line, the warnings line
    assert lines[0].startswith(f"warning: {path}:1: id: no id")
    assert lines[3].startswith(f"warning: {path}:4: id 's003': plan: latents but no plan")
    assert "5 record(s): 0 error(s), 5 warning(s)" in lines[5]
    assert lines[6].strip() == "warnings: 3 missing_id, 2 latents_without_plan"
    short = report.format(max_per_kind=1).splitlines()
    assert "... and 2 more missing_id" in short and "... and 1 more latents_without_plan" in short
    assert report.ok  # warnings only


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def test_missing_file_and_folder_are_errors_and_other_files_still_checked(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", good_records(tmp_path, n=2))
    missing, folder = str(tmp_path / "nope.jsonl"), str(tmp_path / "latents")
    report = validate_files([missing, folder, good])
    assert [(p.kind, p.location) for p in report.problems] == [("unreadable_file", missing),
                                                                ("unreadable_file", folder)]
    assert "not found" in report.problems[0].message and "folder" in report.problems[1].message
    assert report.records == 2 and report.files == 3


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "a", "conversations": []}\n{"id": "caf\xe9"}\n')
    report = validate_files([str(path)])
    p = one(report, "unreadable_file")
    assert p.location.startswith(str(path)) and "UTF-8" in p.message


@pytest.mark.parametrize("name,text,line", [
    ("bad.json", '[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]\n', 3),
    ("bad.jsonl", '{"id": "a", "conversations": [{"from": "human", "value": "x"}]}\n\n{oops\n{"id": "c"}\n', 3),
])
def test_malformed_json_names_the_line_and_the_next_file_is_checked(tmp_path, name, text, line):
    bad = tmp_path / name
    bad.write_text(text)
    other = tmp_path / "other.jsonl"
    write_jsonl(other, [{"id": "z", "conversations": [{"from": "human", "value": "q"}]}])
    report = validate_files([str(bad), str(other)])
    p = one(report, "malformed_json")
    assert p.location == f"{bad}:{line}" and "column" in p.message and "not checked" in p.message
    # the next file was read: its record's missing assistant turn is reported
    assert f"{other}:1" in [p.location for p in report.problems if p.kind == "no_assistant_turn"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert one(validate_files([str(path)]), "empty_file").location == str(path)


def test_json_object_without_data_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{\n"records": []\n}')
    p = one(validate_files([str(path)]), "unreadable_file")
    assert p.location == str(path) and '"data"' in p.message


# ---------------------------------------------------------------------------------------------
# records and conversations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,suffix", [("d.jsonl", ":2"), ("d.json", "[1]")])
def test_record_not_an_object(tmp_path, name, suffix):
    recs = good_records(tmp_path, n=2)
    recs[1] = ["not", "a", "record"]
    report, path = validate(tmp_path, recs, name=name)
    p = one(report, "record_not_object")
    assert p.location == path + suffix and "found a list" in p.message


CONVERSATION_CASES = [
    # (mutation of record 2, kind, field, words in the message)
    (lambda r: r.pop("conversations"), "missing_conversations", "conversations", "missing"),
    (lambda r: r.update(conversations=None), "missing_conversations", "conversations", "missing"),
    (lambda r: r.update(conversations={"from": "human"}), "conversations_not_list", "conversations",
     "found a object; expected a list"),
    (lambda r: r.update(conversations=[]), "empty_conversations", "conversations", "empty"),
    (lambda r: r["conversations"].insert(1, "hi"), "turn_not_object", "conversations[1]", "found a string"),
    (lambda r: r["conversations"][1].update({"from": "bot"}), "unknown_role", "conversations[1].from",
     "found 'bot'; expected one of assistant, gpt, human, model, system, user"),
    (lambda r: r["conversations"][0].pop("from"), "unknown_role", "conversations[0].from", "missing"),
    (lambda r: r["conversations"][1].update(value=["a"]), "value_not_string", "conversations[1].value",
     "found a list; expected a string"),
    (lambda r: r["conversations"][1].pop("value"), "value_not_string", "conversations[1].value", "missing"),
    (lambda r: r["conversations"][0].update(value="x <FIRST_HUMAN_END> y"), "reserved_token",
     "conversations[0].value", "<FIRST_HUMAN_END>"),
    (lambda r: r["conversations"][0].update({"from": "system"}), "no_human_turn", "conversations",
     "no human/user turn"),
    (lambda r: r.update(conversations=[r["conversations"][0]]), "no_assistant_turn", "conversations",
     "nothing to learn"),
]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
@pytest.mark.parametrize("mutate,kind,field,words", CONVERSATION_CASES,
                         ids=[c[1] + str(i) for i, c in enumerate(CONVERSATION_CASES)])
def test_conversation_problems(tmp_path, name, mutate, kind, field, words):
    recs = good_records(tmp_path, n=3)
    mutate(recs[2])
    report, path = validate(tmp_path, recs, name=name)
    p = one(report, kind)
    assert p.location == path + (":3" if name.endswith(".jsonl") else "[2]")
    assert (p.sample_id, p.field) == ("s002", field)
    assert words in p.message
    assert f"{path}" in p.format() and "id 's002'" in p.format() and field in p.format()
    assert [q.kind for q in report.problems] == [kind]  # nothing else: one cause, one report


def test_alternative_role_names_are_accepted(tmp_path):
    recs = good_records(tmp_path, n=1)
    recs[0]["conversations"] = [{"from": "system", "value": "s"}, {"from": "user", "value": "u"},
                                {"from": "assistant", "value": "a"}, {"from": "human", "value": "h"},
                                {"from": "model", "value": "m"}]
    report, _ = validate(tmp_path, recs)
    assert report.problems == []


# ---------------------------------------------------------------------------------------------
# ids
# ---------------------------------------------------------------------------------------------
def test_duplicate_ids_name_the_first_occurrence_also_across_files(tmp_path):
    recs = good_records(tmp_path, n=3)
    recs[2]["id"] = "s000"
    train = write_jsonl(tmp_path / "train.jsonl", recs)
    evaluation = str(tmp_path / "eval.json")
    with open(evaluation, "w") as f:
        json.dump([dict(recs[1])], f)  # s001 again: train/eval overlap
    report = validate_files([train, evaluation])
    dups = [p for p in report.problems if p.kind == "duplicate_id"]
    assert [(p.location, p.sample_id, p.field) for p in dups] == [(f"{train}:3", "s000", "id"),
                                                                  (f"{evaluation}[0]", "s001", "id")]
    assert f"first seen at {train}:1" in dups[0].message and f"first seen at {train}:2" in dups[1].message
    assert all(p.severity == "error" for p in dups)


def test_missing_id_is_a_warning(tmp_path):
    recs = good_records(tmp_path, n=2)
    del recs[1]["id"]
    report, path = validate(tmp_path, recs)
    p = one(report, "missing_id")
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", None, "id") and report.ok


# ---------------------------------------------------------------------------------------------
# latents
# ---------------------------------------------------------------------------------------------
def _with_latent_file(tmp_path, recs, i, array, name="x.npy"):
    path = tmp_path / "latents" / name
    if name.endswith(".npy"):
        np.save(path, array)
    else:
        torch.save(array, path)
    recs[i]["hidden_state_path"] = f"latents/{name}"


def _inline(recs, i, value):
    del recs[i]["hidden_state_path"]
    recs[i]["hidden_state"] = value


@pytest.mark.parametrize("value,kind,words", [
    ([1.0, 2.0, 3.0], "latent_not_2d", "shape (3,)"),
    ([[[1.0]]], "latent_not_2d", "shape (1, 1, 1)"),
    ([[]], "latent_not_2d", "d > 0"),
    ([], "latent_not_2d", "shape (0,)"),
    ("0.1 0.2", "latent_not_2d", "found a string"),
    ([[1.0, 2.0], [3.0]], "latent_not_numeric", "ragged"),
    ([["a", "b"]], "latent_not_numeric", "string"),
    ([[1.0, None]], "latent_not_numeric", "null"),
    ([[True, False]], "latent_not_numeric", "boolean"),
])
def test_inline_hidden_state_shape_and_type(tmp_path, value, kind, words):
    recs = good_records(tmp_path, n=2)
    _inline(recs, 1, value)
    report, path = validate(tmp_path, recs)
    p = one(report, kind)
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", "hidden_state") and words in p.message


@pytest.mark.parametrize("where", ["inline", "npy", "pt"])
@pytest.mark.parametrize("bad,words", [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                       (-float("inf"), "infinite")])
def test_nan_and_inf_latents(tmp_path, where, bad, words):
    recs = good_records(tmp_path, n=2)
    array = np.zeros((4, LATENT_DIM), np.float32)
    array[2, 5] = bad
    if where == "inline":
        _inline(recs, 1, array.tolist())  # json writes NaN / Infinity, which Python's json reads back
        field = "hidden_state"
    else:
        _with_latent_file(tmp_path, recs, 1, array if where == "npy" else torch.from_numpy(array), "x." + where)
        field = "hidden_state_path"
    report, path = validate(tmp_path, recs)
    p = one(report, "latent_not_finite")
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", field)
    assert words in p.message and "row 2, column 5" in p.message


def test_values_beyond_float32_range_and_chunked_reading(tmp_path, monkeypatch):
    from common import validation

    monkeypatch.setattr(validation, "_CHUNK_BYTES", 64)  # several chunks for a small array
    recs = good_records(tmp_path, n=2)
    array = np.zeros((40, LATENT_DIM), np.float64)
    array[33, 1] = 1e39  # finite in float64, inf once training casts to float32
    array[35, 2] = np.nan
    _with_latent_file(tmp_path, recs, 1, array)
    report, _ = validate(tmp_path, recs)
    p = one(report, "latent_not_finite")
    assert "1 NaN" in p.message and "1 beyond float32 range" in p.message and "row 33, column 1" in p.message
    # check_values=False skips reading the values
    path = str(tmp_path / "data.jsonl")
    assert validate_files([path], check_values=False).ok


def test_empty_latent_is_a_warning(tmp_path):
    recs = good_records(tmp_path, n=2)
    _with_latent_file(tmp_path, recs, 1, np.zeros((0, LATENT_DIM), np.float32))
    report, path = validate(tmp_path, recs)
    p = one(report, "latent_empty")
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", "hidden_state_path") and "K = 0" in p.message
    assert report.ok


def test_width_differs_from_the_majority(tmp_path):
    recs = good_records(tmp_path, n=4)
    _with_latent_file(tmp_path, recs, 2, np.zeros((3, 16), np.float32))
    report, path = validate(tmp_path, recs)
    p = one(report, "latent_width_mismatch")
    assert (p.location, p.sample_id, p.field) == (f"{path}:3", "s002", "hidden_state_path")
    assert "d = 16; expected 24" in p.message and "majority width (3 of 4" in p.message
    assert f"first at {path}:1" in p.message and report.latent_dim == LATENT_DIM


def test_width_differs_from_the_loaded_head(tmp_path):
    recs = good_records(tmp_path, n=3)
    _inline(recs, 1, np.zeros((2, 32)).tolist())
    report, path = validate(tmp_path, recs, expected_latent_dim=32)
    bad = [p for p in report.problems if p.kind == "latent_width_mismatch"]
    assert [p.location for p in bad] == [f"{path}:1", f"{path}:3"]  # s001 has the head's width
    assert all("d = 24; expected 32" in p.message and "built for" in p.message for p in bad)


def test_more_rows_than_prepended_length_is_a_warning(tmp_path):
    recs = good_records(tmp_path, n=1)
    _with_latent_file(tmp_path, recs, 0, np.zeros((10, LATENT_DIM), np.float32))
    report, path = validate(tmp_path, recs, prepended_length=8)
    p = one(report, "latent_rows_cut")
    assert p.location == f"{path}:1" and "10 rows" in p.message and "first prepended_length = 8" in p.message


@pytest.mark.parametrize("case,kind,words", [
    ("missing", "latent_file_missing", "file not found"),
    ("suffix", "latent_unsupported_type", "unsupported file type '.txt'"),
    ("no_suffix", "latent_unsupported_type", "'(none)'"),
    ("truncated_npy", "latent_unreadable", "truncated"),
    ("garbage_pt", "latent_unreadable", "not a file written by torch.save"),
    ("dict_pt", "latent_unreadable", "expected a plain tensor, found dict"),
    ("npz_named_npy", "latent_unreadable", "not a .npy file"),
    ("string_npy", "latent_not_numeric", "string"),
    ("3d_npy", "latent_not_2d", "shape (2, 3, 4)"),
    ("3d_pt", "latent_not_2d", "2-D"),
    ("path_not_string", "latent_path_not_string", "found a list"),
])
def test_latent_file_problems(tmp_path, case, kind, words):
    recs = good_records(tmp_path, n=2)
    lat = tmp_path / "latents"
    if case == "missing":
        recs[1]["hidden_state_path"] = "latents/none.npy"
    elif case == "suffix":
        (lat / "x.txt").write_text("1 2 3")
        recs[1]["hidden_state_path"] = "latents/x.txt"
    elif case == "no_suffix":
        recs[1]["hidden_state_path"] = "latents/x"
    elif case == "truncated_npy":
        (lat / "x.npy").write_bytes((lat / "001.npy").read_bytes()[:100])
        recs[1]["hidden_state_path"] = "latents/x.npy"
    elif case == "garbage_pt":
        (lat / "x.pt").write_bytes(b"not a torch file")
        recs[1]["hidden_state_path"] = "latents/x.pt"
    elif case == "dict_pt":
        _with_latent_file(tmp_path, recs, 1, {"h": torch.zeros(2, LATENT_DIM)}, "x.pt")
    elif case == "npz_named_npy":
        np.savez(lat / "x.npz", a=np.zeros((2, LATENT_DIM)))
        os.replace(lat / "x.npz", lat / "x.npy")
        recs[1]["hidden_state_path"] = "latents/x.npy"
    elif case == "string_npy":
        _with_latent_file(tmp_path, recs, 1, np.array([["a", "b"]]))
    elif case == "3d_npy":
        _with_latent_file(tmp_path, recs, 1, np.zeros((2, 3, 4), np.float32))
    elif case == "3d_pt":
        _with_latent_file(tmp_path, recs, 1, torch.zeros(2, 3, 4), "x.pt")
    elif case == "path_not_string":
        recs[1]["hidden_state_path"] = ["a.npy"]
    report, path = validate(tmp_path, recs)
    p = one(report, kind)
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", "hidden_state_path")
    assert words in p.message, p.message
    if case != "path_not_string":
        assert repr(recs[1]["hidden_state_path"]) in p.message  # names the file as the record wrote it


def test_both_latent_fields_path_wins(tmp_path):
    recs = good_records(tmp_path, n=1)
    recs[0]["hidden_state"] = [[float("nan")] * 3]  # ignored: not read, not reported as NaN
    report, path = validate(tmp_path, recs)
    assert [p.kind for p in report.problems] == ["hidden_state_ignored"] and report.ok


def test_absolute_latent_paths_work_and_relative_ones_follow_the_data_file(tmp_path, monkeypatch):
    recs = good_records(tmp_path, n=3)
    recs[0]["hidden_state_path"] = str(tmp_path / recs[0]["hidden_state_path"])
    assert os.path.isabs(recs[0]["hidden_state_path"])
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)  # relative paths are relative to the data file, not the working folder
    report, _ = validate(tmp_path, recs)
    assert report.problems == [], report.format()
    assert load_latents(recs[0]["hidden_state_path"]).shape[1] == LATENT_DIM


# ---------------------------------------------------------------------------------------------
# plans and the latent / plan combinations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,kind,field,words", [
    ("missing", "plan_file_missing", "plan_path", "file not found"),
    ("not_utf8", "plan_file_unreadable", "plan_path", "UTF-8"),
    ("folder", "plan_file_unreadable", "plan_path", "is a folder, not a file"),
    ("not_string", "plan_not_string", "plan", "found a list; expected a string"),
    ("both", "plan_path_ignored", "plan_path", "plan is used"),
])
def test_plan_problems(tmp_path, case, kind, field, words):
    recs = good_records(tmp_path, n=2)
    r = recs[1]
    if case != "both":
        del r["plan"]
    if case == "missing":
        r["plan_path"] = "plans/none.txt"
    elif case == "not_utf8":
        (tmp_path / "p.txt").write_bytes(b"caf\xe9")
        r["plan_path"] = "p.txt"
    elif case == "folder":
        r["plan_path"] = "latents"
    elif case == "not_string":
        r["plan"] = ["step 1"]
    elif case == "both":
        r["plan_path"] = "whatever.txt"
    report, path = validate(tmp_path, recs)
    p = one(report, kind)
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", field) and words in p.message


def test_plan_path_is_read(tmp_path):
    recs = good_records(tmp_path, n=1)
    (tmp_path / "plan.txt").write_text("Go to room 2.\n")
    del recs[0]["plan"]
    recs[0]["plan_path"] = "plan.txt"
    report, _ = validate(tmp_path, recs)
    assert report.problems == []


@pytest.mark.parametrize("drop,kind,field", [
    (("plan", "hidden_state_path"), "no_plan_no_latents", "plan, hidden_state"),
    (("hidden_state_path",), "plan_without_latents", "hidden_state"),
    (("plan",), "latents_without_plan", "plan"),
])
def test_plan_and_latent_combinations_are_warnings(tmp_path, drop, kind, field):
    recs = good_records(tmp_path, n=2)
    for key in drop:
        del recs[1][key]
    report, path = validate(tmp_path, recs)
    p = one(report, kind)
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", field)
    assert report.ok and [q.kind for q in report.problems] == [kind]


# ---------------------------------------------------------------------------------------------
# length (needs a tokenizer)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_too_long_sample_reports_the_truncated_token_count(tmp_path, raw_tokenizer):
    import copy

    from latent_head import MARKER_TOKEN, add_special_tokens

    recs = good_records(tmp_path, n=3, multi_turn=False)
    recs[1]["conversations"][1]["value"] = "word " * 200
    vocab_before = len(raw_tokenizer)
    max_len, prep = 150, 16
    report, path = validate(tmp_path, recs, tokenizer=raw_tokenizer, model_max_length=max_len,
                            prepended_length=prep)
    assert len(raw_tokenizer) == vocab_before and MARKER_TOKEN not in raw_tokenizer.get_vocab()  # untouched
    p = one(report, "truncated")
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", "conversations")
    # the count is exactly what training's truncation rule cuts
    tok = copy.deepcopy(raw_tokenizer)
    add_special_tokens(tok)
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
            for t in recs[1]["conversations"]]
    expected = tokenize_sample({"messages": msgs, "plan": recs[1]["plan"]}, tok, max_len, prep)["truncated_tokens"]
    assert expected > 0 and f"the last {expected} tokens will be truncated" in p.message
    assert f"model_max_length {max_len}" in p.message and report.ok

    # so short that no assistant token is left: skipped
    report, _ = validate(tmp_path, recs, tokenizer=raw_tokenizer, model_max_length=40, prepended_length=prep)
    assert {p.kind for p in report.problems} == {"truncated_to_nothing"} and len(report.problems) == 3
    # without model_max_length: the template is checked, lengths are not
    assert validate(tmp_path, recs, tokenizer=raw_tokenizer)[0].problems == []


# ---------------------------------------------------------------------------------------------
# security: a latent file can never run code
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls exec(...): writes the marker file
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".npy"])
def test_a_latent_file_that_would_run_code_is_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "latents" / f"evil{suffix}"
    recs = good_records(tmp_path, n=2)
    if suffix == ".npy":
        np.save(evil, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    else:
        torch.save({"latents": torch.zeros(2, LATENT_DIM), "x": _Payload(str(marker))}, evil)
    recs[1]["hidden_state_path"] = f"latents/evil{suffix}"

    report, path = validate(tmp_path, recs)
    p = one(report, "latent_unreadable")
    assert (p.location, p.sample_id, p.field) == (f"{path}:2", "s001", "hidden_state_path")
    assert "refused, never unpickled" in p.message and "weights_only" not in p.message and not report.ok
    with pytest.raises(DataError, match="refused, never unpickled") as e:
        load_latents(str(evil), "here")
    assert "weights_only" not in str(e.value)
    assert not marker.exists()

    # control: the file really is hostile; an unsafe load runs its code
    if suffix == ".npy":
        np.load(evil, allow_pickle=True)
    else:
        torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_cli_exit_codes_in_process(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", good_records(tmp_path, n=2))
    assert main([good]) == 0
    out = capsys.readouterr().out
    assert "0 error(s)" in out
    recs = good_records(tmp_path, n=2)
    recs[1]["conversations"] = 5
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    assert main([good, bad, "--max_per_kind", "5"]) == 1
    out = capsys.readouterr().out
    assert f"error: {bad}:2: id 's001': conversations: found a number" in out
    assert main([good, "--tokenizer", str(tmp_path / "no_such_tokenizer")]) == 2
    assert "cannot load the tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_no_traceback(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", good_records(tmp_path, n=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}\n{oops\n')
    cmd = [sys.executable, "-m", "common.validation"]
    clean = subprocess.run(cmd + [good], capture_output=True, text=True, cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    dirty = subprocess.run(cmd + [good, str(bad), str(tmp_path / "missing.json")], capture_output=True, text=True,
                           cwd=tmp_path)
    text = dirty.stdout + dirty.stderr
    assert dirty.returncode == 1, text
    assert "Traceback" not in text
    assert f"{bad}:1: id 'a': conversations[1].value: missing; expected a string" in text
    assert f"{bad}:2: column 2: malformed JSON line" in text
    assert "missing.json: file not found" in text


# ---------------------------------------------------------------------------------------------
# train_actor.py --validate_only: structure without a model, lengths with its tokenizer
# ---------------------------------------------------------------------------------------------
def test_validate_only_needs_no_model_and_checks_lengths_with_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import train_actor
    from common import models
    from training import setup

    def no_model(*a, **k):  # offline, the default Qwen id cannot load: nothing may try
        raise AssertionError("--validate_only without --model_name_or_path looked for a model")

    path = write_jsonl(tmp_path / "d.jsonl", good_records(tmp_path, n=3))
    for module in (models, setup):
        monkeypatch.setattr(module, "resolve_model", no_model)
    assert train_actor.main(["--train_file", path, "--validate_only", "true", "--model_max_length", "20",
                             "--prepended_length", "6"]) == 0
    out = capsys.readouterr().out
    assert "3 record(s): 0 error(s)" in out and "the chat template and the lengths need the model's tokenizer" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "conversations": "not a list"}])
    assert train_actor.main(["--train_file", bad, "--validate_only", "true"]) == 1  # structure: still checked
    assert "conversations_not_list" in capsys.readouterr().err
    monkeypatch.undo()
    # with the model's tokenizer, the lengths: 20 tokens cannot hold a conversation
    assert train_actor.main(["--train_file", path, "--validate_only", "true", "--model_max_length", "20",
                             "--prepended_length", "6", "--model_name_or_path", tiny_model_dir]) in (0, 1)
    out = capsys.readouterr()
    assert "truncat" in (out.out + out.err) and "need the model's tokenizer" not in out.out
