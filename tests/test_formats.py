"""Both record formats (ShareGPT `conversations`, chat `messages`) read the same everywhere; datasets through
`datasets.load_dataset` (a local folder posing as a dataset, no network); structured errors name their place."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

from sender import collect as chs
import train_actor
from tests.helpers import ROOT, make_records, write_jsonl
from common.validation import validate_files
from data import (ActorDataset, DatasetSource, DataError, LatentCollator, build_hf_dataset, dataset_data_files,
                  load_latents, load_samples, read_records, record_messages)


EXAMPLES = os.path.join(ROOT, "examples")
MESSAGES_FILE, SHAREGPT_FILE = (os.path.join(EXAMPLES, f"train_{k}.jsonl") for k in ("messages", "sharegpt"))
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "model": "assistant", "system": "system"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: `datasets` may only read local folders and files."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def as_messages(record: dict) -> dict:
    """The same record in the `messages` format, converted by hand (not by data.py)."""
    out = {k: v for k, v in record.items() if k != "conversations"}
    out["messages"] = [{"role": ROLE_NAMES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    return out


def batch_of(actor, source):
    dataset = ActorDataset(build_hf_dataset(source), actor.tokenizer, 3072, 6)
    return LatentCollator(actor.pad_id, actor.head.config.latent_dim)([dataset[i] for i in range(len(dataset))])


def test_examples_are_valid_jsonl_and_validate_clean():
    for path in (MESSAGES_FILE, SHAREGPT_FILE):
        with open(path) as f:
            records = [json.loads(line) for line in f]  # plain JSON, no comments
        assert len(records) == 3
        report = validate_files([path])
        assert report.ok and report.problems == [] and report.latent_dim == 8, report.format()
    messages, sharegpt = load_samples(MESSAGES_FILE), load_samples(SHAREGPT_FILE)
    assert [s["messages"] for s in messages] == [s["messages"] for s in sharegpt]
    assert messages[0]["messages"][1] == {"role": "user", "content": "Where is the teammate's notebook? Answer with "
                                                                     "the room name."}


def test_both_formats_give_identical_batches(actor, tmp_path):
    records = make_records(6, str(tmp_path / "latents"))
    records[1]["conversations"][0]["from"] = "user"  # ShareGPT's alternative role names
    records[2]["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", records)
    messages = write_jsonl(tmp_path / "messages.jsonl", [as_messages(r) for r in records])
    assert validate_files([messages]).problems == []
    a, b = batch_of(actor, sharegpt), batch_of(actor, messages)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (a["labels"] != -100).sum() > 0 and a["latent_lengths"].min() > 0  # a batch with something in it


def test_messages_errors_name_file_line_and_field(tmp_path):
    recs = [as_messages(r) for r in make_records(3, str(tmp_path / "latents"))]
    recs[1]["messages"][0]["role"] = "human"  # a ShareGPT name in the messages format
    recs[2]["conversations"] = [{"from": "human", "value": "x"}]  # both formats in one record
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    report = validate_files([path])
    assert [(p.kind, p.location, p.sample_id, p.field) for p in report.errors] == [
        ("unknown_role", f"{path}:2", "s001", "messages[0].role"),
        ("conversations_and_messages", f"{path}:3", "s002", "conversations, messages")]
    assert "found 'human'; expected one of assistant, system, user" in report.errors[0].message
    # Reading without validation: the same place in one line, and in parts.
    with pytest.raises(DataError) as e:
        load_samples(path)
    assert (e.value.where, e.value.sample_id, e.value.field, e.value.kind) == (f"{path}:2", "s001",
                                                                               "messages[0].role", "unknown_role")
    assert str(e.value).startswith(f"{path}:2: id 's001': messages[0].role: found 'human'")


def test_structured_errors_of_files_and_latents(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "messages": []}\n{"id": 2, oops}\n')
    with pytest.raises(DataError) as e:
        list(read_records(str(bad)))
    assert (e.value.where, e.value.kind) == (f"{bad}:2", "malformed_json") and str(e.value).startswith(f"{bad}:2:")
    assert e.value.detail.startswith("column 11: malformed JSON line")
    report = validate_files([str(bad)])  # validation reports the same parts, no message parsing
    p = [p for p in report.problems if p.kind == "malformed_json"]
    assert [(p.location, p.field) for p in p] == [(f"{bad}:2", None)]
    assert p[0].message.startswith("column 11: malformed JSON line") and "not checked" in p[0].message
    assert [p.kind for p in report.problems if p.location == f"{bad}:1"][0] == "empty_conversations"
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError) as e:
        load_latents(str(tmp_path / "x.npy"), "f.jsonl:7")
    assert (e.value.where, e.value.field, e.value.kind) == ("f.jsonl:7", "hidden_state_path", "latent_not_2d")
    assert e.value.detail == "expected a 2-D array [K, d], got shape (2, 3, 4)"


def test_record_messages_reads_both_formats_the_sender_too():
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "task"},
                                  {"from": "gpt", "value": "a"}]}
    messages = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "task"},
                             {"role": "assistant", "content": "a"}]}
    assert record_messages(sharegpt) == record_messages(messages) == messages["messages"]
    for rec in (sharegpt, messages):  # `from: "user"` was a StopIteration traceback in the compressed sender
        assert chs.first_human_message(rec) == "task"
        assert chs.chat_messages(rec) == messages["messages"][:2]


def test_a_local_dataset_reads_as_its_file(actor, tmp_path):
    """--dataset_name: a local folder through datasets.load_dataset gives the rows the file gives (paths
    relative to the folder), split by name."""
    folder = tmp_path / "ds"
    folder.mkdir()
    records = [as_messages(r) for r in make_records(5, str(folder / "latents"))]
    records[0].pop("plan")  # a column some rows lack: Arrow fills null, read as absent
    write_jsonl(folder / "train.jsonl", records[:4])
    write_jsonl(folder / "test.jsonl", records[4:])
    train, test = DatasetSource(str(folder), "train"), DatasetSource(str(folder), "test")
    report = validate_files([train, test])
    assert [(p.kind, p.location) for p in report.problems] == [("latents_without_plan", f"{folder}:train[0]")]
    from_dataset, from_file = load_samples(train), load_samples(str(folder / "train.jsonl"))
    keys = ("id", "messages", "plan", "hidden_state_path", "hidden_state")
    assert [{k: s[k] for k in keys} for s in from_dataset] == [{k: s[k] for k in keys} for s in from_file]
    assert from_dataset[1]["where"] == f"{folder}:train[1]" and [s["id"] for s in load_samples(test)] == ["s004"]
    a, b = batch_of(actor, train), batch_of(actor, str(folder / "train.jsonl"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DataError, match="not found: expected a local dataset folder or data file, or a hub id"):
        load_samples(DatasetSource(str(tmp_path / "no_such_folder")))
    with pytest.raises(DataError, match=r"no split 'validation' \(found: train, test; splits come from file names"):
        load_samples(DatasetSource(str(folder), "validation"))


def _sender_folder(root, latent_folder: str):
    """A folder laid out as sender/collect.py writes one: train.jsonl and test.jsonl, latents in `latent_folder`
    (`__latents__/<stem>` now, `<stem>_latents` before), paths relative to the folder."""
    os.makedirs(root)
    records = {}
    for split, n, seed in (("train", 4, 0), ("test", 2, 1)):
        latents = os.path.join(root, latent_folder.format(stem=split))
        records[split] = make_records(n, latents, seed=seed, prefix=split[:2])
        for r in records[split]:  # make_records writes paths relative to the latent folder's parent
            r["hidden_state_path"] = os.path.relpath(os.path.join(os.path.dirname(latents), r["hidden_state_path"]),
                                                     root)
        write_jsonl(os.path.join(root, f"{split}.jsonl"), records[split])
    return records


@pytest.mark.parametrize("latent_folder", ["__latents__/{stem}", "{stem}_latents"], ids=["now", "before"])
def test_the_sender_s_folder_and_a_data_file_load_with_dataset_name(tmp_path, latent_folder):
    """--dataset_name FOLDER reads the folder sender/collect.py writes (train.jsonl, test.jsonl and their latents)
    through datasets' json loader, split by file name; `train_latents/` (the old name, which datasets' folder
    rule takes for the train split) too. A single data file is the train split."""
    folder = str(tmp_path / "sender_out")
    records = _sender_folder(folder, latent_folder)
    assert dataset_data_files(folder) == {"train": [os.path.join(folder, "train.jsonl")],
                                          "test": [os.path.join(folder, "test.jsonl")]}
    for split in ("train", "test"):
        from_dataset = load_samples(DatasetSource(folder, split))
        from_file = load_samples(os.path.join(folder, f"{split}.jsonl"))
        assert [s["id"] for s in from_dataset] == [r["id"] for r in records[split]]
        assert [s["hidden_state_path"] for s in from_dataset] == [s["hidden_state_path"] for s in from_file]
        assert all(os.path.exists(s["hidden_state_path"]) for s in from_dataset)
    assert validate_files([DatasetSource(folder, "train"), DatasetSource(folder, "test")]).ok
    single = load_samples(DatasetSource(os.path.join(folder, "test.jsonl")))  # a file: its records, split train
    assert [s["id"] for s in single] == [r["id"] for r in records["test"]]
    as_object = os.path.join(folder, "all.json")  # the {"data": [...]} form of a data file
    with open(as_object, "w") as f:
        json.dump({"data": records["train"]}, f)
    assert [s["id"] for s in load_samples(DatasetSource(as_object))] == [r["id"] for r in records["train"]]
    os.remove(as_object)
    if latent_folder.startswith("__"):  # datasets' own folder rule reads it too (the hub's, for an uploaded copy)
        import datasets

        assert datasets.load_dataset(folder, split="test")["id"] == [r["id"] for r in records["test"]]


def _train(tiny_model_dir, out, *data_flags):
    rc = train_actor.main(["--model_name_or_path", tiny_model_dir, *data_flags, "--output_dir", str(out),
                           "--report_to", "none", "--num_heads", "4", "--prepended_length", "6",
                           "--per_device_train_batch_size", "3", "--max_steps", "2", "--save_strategy", "no",
                           "--logging_steps", "1", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
                           "--enable_loss_plot", "false", "--head_warm_start_steps", "0"])
    assert rc == 0
    with open(out / "loss_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


@pytest.mark.slow
def test_a_messages_dataset_trains_as_the_sharegpt_file(tiny_model_dir, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(MESSAGES_FILE, folder / "train.jsonl")
    from_dataset = _train(tiny_model_dir, tmp_path / "a", "--dataset_name", str(folder))
    from_file = _train(tiny_model_dir, tmp_path / "b", "--train_file", SHAREGPT_FILE)
    assert len(from_dataset) == 2 and all(np.isfinite(from_dataset))
    assert from_dataset == from_file  # the same records, the same seed: the same losses


def test_dataset_flags_are_checked(capsys):
    assert train_actor.main(["--output_dir", "o", "--report_to", "none"]) == 2
    assert "--train_file or --dataset_name is required" in capsys.readouterr().err
    assert train_actor.main(["--output_dir", "o", "--report_to", "none", "--train_file", "a.jsonl",
                             "--dataset_name", "x"]) == 2
    assert "both given" in capsys.readouterr().err


def test_the_sender_reads_a_dataset(tmp_path, tiny_model_dir):
    """sender/collect.py --dataset_name: a local dataset of messages-format records."""
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(MESSAGES_FILE, folder / "train.jsonl")
    out = tmp_path / "out.jsonl"
    assert chs.main(["--model_name_or_path", tiny_model_dir, "--dataset_name", str(folder), "--output_file", str(out),
                     "--device", "cpu", "--dtype", "float32"]) == 0
    with open(out) as f:
        written = [json.loads(line) for line in f]
    assert [r["id"] for r in written] == ["ex0", "ex1", "ex2"] and "messages" in written[0]
    assert all(r["hidden_state_path"].startswith("__latents__/out/") for r in written)  # no split rule takes it
    assert [s["id"] for s in load_samples(DatasetSource(str(out)))] == ["ex0", "ex1", "ex2"]
    rows = np.load(out.parent / written[0]["hidden_state_path"])
    assert rows.shape[0] == len(chs.plan_token_ids(_tokenizer(tiny_model_dir), written[0]["plan"])) and rows.shape[1] == 32
    assert validate_files([str(out)]).ok


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
