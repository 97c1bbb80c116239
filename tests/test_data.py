"""Formatting, labels, marker position, truncation, file formats and latent loading."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.helpers import make_records, write_jsonl
from data import (ActorDataset, DataError, LatentCollator, build_hf_dataset, encode_conversation, load_latents,
                  load_samples, tokenize_sample)
from latent_head import IGNORE_INDEX, MARKER_TOKEN, add_special_tokens


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    add_special_tokens(tok)
    return tok


MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is the key?"},
            {"role": "assistant", "content": "In the kitchen."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."}]


def test_labels_supervise_only_assistant_content_and_end_of_turn(tokenizer):
    enc = encode_conversation(tokenizer, MESSAGES)
    ids, labels = enc["input_ids"], enc["labels"]
    supervised_text = tokenizer.decode(ids[labels != IGNORE_INDEX])
    # exactly the two replies, each with its end-of-turn token; nothing of system/user turns
    assert supervised_text == "In the kitchen.<|im_end|>Yes.<|im_end|>"
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()


def test_marker_ends_the_first_human_message(tokenizer):
    enc = encode_conversation(tokenizer, MESSAGES)
    ids, m = enc["input_ids"], enc["marker_index"]
    assert tokenizer.convert_ids_to_tokens(int(ids[m])) == MARKER_TOKEN
    assert tokenizer.decode(ids[:m]).endswith("<|im_start|>user\nWhere is the key?")
    assert tokenizer.decode(ids[m + 1:]).startswith("<|im_end|>\n<|im_start|>assistant\nIn the kitchen.")
    assert (ids == ids[m]).sum() == 1


def test_truncation_cuts_the_end_and_leaves_room_for_the_block(tokenizer):
    long = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": " ".join(["word"] * 300)}]
    sample = {"messages": long, "plan": "a plan of a few tokens"}
    out = tokenize_sample(sample, tokenizer, model_max_length=128, prepended_length=40)
    full = encode_conversation(tokenizer, long)
    assert len(out["input_ids"]) == 128 - 1 - 40  # the marker is replaced by <bop> 40 rows <eop>
    assert (out["input_ids"] == full["input_ids"][: len(out["input_ids"])]).all()  # cut at the end only
    assert out["truncated_tokens"] == len(full["input_ids"]) - len(out["input_ids"])
    assert out["marker_index"] == full["marker_index"]


def test_json_jsonl_and_data_object_read_the_same(tmp_path):
    records = make_records(3, str(tmp_path / "lat"))
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    (tmp_path / "c.json").write_text(json.dumps({"data": records}))
    loaded = [load_samples(str(tmp_path / n)) for n in ("a.jsonl", "b.json", "c.json")]
    for samples in loaded:
        assert [s["messages"] for s in samples] == [s["messages"] for s in loaded[0]]
        # relative latent paths resolve against the data file's folder
        assert all(os.path.isabs(s["hidden_state_path"]) and os.path.exists(s["hidden_state_path"]) for s in samples)
    assert loaded[0][0]["where"].endswith("a.jsonl:1") and loaded[1][2]["where"].endswith("b.json[2]")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "conversations": []}\n{"id": "b", oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_samples(str(path))


def test_plan_path_and_inline_latents(tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "p.txt").write_text("Plan from a file.\n")
    rec = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}],
           "plan_path": "plans/p.txt", "hidden_state": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}
    write_jsonl(tmp_path / "d.jsonl", [rec])
    (sample,) = load_samples(str(tmp_path / "d.jsonl"))
    assert sample["plan"] == "Plan from a file."
    assert load_latents(sample["hidden_state"]).shape == (3, 2)


def test_pt_latents_load_with_weights_only_and_npy_without_pickle(tmp_path):
    t = torch.randn(4, 3)
    torch.save(t, tmp_path / "x.pt")
    np.testing.assert_allclose(load_latents(str(tmp_path / "x.pt")), t.numpy())
    torch.save({"not": "a tensor"}, tmp_path / "y.pt")
    with pytest.raises(DataError, match="plain tensor"):
        load_latents(str(tmp_path / "y.pt"))
    np.save(tmp_path / "z.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="refused, never unpickled"):
        load_latents(str(tmp_path / "z.npy"))


def test_dataset_and_collator_pad_dynamically(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", make_records(5, str(tmp_path / "lat")))
    for lazy in (False, True):
        ds = ActorDataset(build_hf_dataset(path), tokenizer, model_max_length=3072, prepended_length=6, lazy=lazy)
        samples = [ds[i] for i in range(len(ds))]
        batch = LatentCollator(tokenizer.pad_token_id, latent_dim=24)(samples)
        lengths = [len(s["input_ids"]) for s in samples]
        assert batch["input_ids"].shape == (5, max(lengths))  # the longest sample, not model_max_length
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert batch["latent_lengths"].max() <= 6  # only the first prepended_length rows
        assert batch["latents"].shape[1] == batch["latent_lengths"].max()
        pad_region = batch["attention_mask"] == 0
        assert (batch["labels"][pad_region] == IGNORE_INDEX).all()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_length_grouped_batches_are_dealt_evenly_over_ranks(world_size):
    from data import RankBalancedLengthSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 2000, 130).tolist()  # not a multiple of any global batch
    b = 8
    sampler = RankBalancedLengthSampler(lengths, b, world_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(130)) and order == list(sampler)  # a permutation, the same on every rank
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(130))
    # accelerate's sharding: per-device batch k of the stream goes to rank k % world_size
    device_batches = [order[i:i + b] for i in range(0, len(order), b)]
    steps = [device_batches[i:i + world_size] for i in range(0, len(device_batches), world_size)]
    full_steps = [s for s in steps if len(s) == world_size and all(len(x) == b for x in s)]
    assert len(full_steps) == 130 // (b * world_size)
    assert lengths[full_steps[0][0][0]] == max(lengths)  # the longest batch first: out-of-memory shows at once
    gaps, contiguous_gaps = [], []
    for step in full_steps:
        together = [i for batch in step for i in batch]
        tokens = [sum(lengths[i] for i in batch) for batch in step]
        spread = max(lengths[i] for i in together) - min(lengths[i] for i in together)
        assert max(tokens) - min(tokens) <= spread  # dealt round-robin from a sorted global batch
        by_length = sorted(together, key=lengths.__getitem__, reverse=True)
        contiguous = [sum(lengths[i] for i in by_length[r * b:(r + 1) * b]) for r in range(world_size)]
        gaps.append(max(tokens) - min(tokens))
        contiguous_gaps.append(max(contiguous) - min(contiguous))
    if world_size > 1:  # slices of a sorted batch (what LengthGroupedSampler gives each rank) are far apart
        assert sum(gaps) * 4 < sum(contiguous_gaps)
