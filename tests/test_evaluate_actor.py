"""The four evaluation conditions feed what they claim; the report's CE is the hand-computed one."""
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evaluation import evaluate as ev
from tests.helpers import PREPENDED, make_records, write_jsonl
from data import ActorDataset, LatentCollator, build_hf_dataset, encode_conversation
from latent_head import IGNORE_INDEX, LatentActor, assemble_inputs




def records_with_answers(tmp_path, n=5):
    records = make_records(n, str(tmp_path / "latents"))
    for i, r in enumerate(records):
        r["answer"] = f"room {i % 3}"
    return records, write_jsonl(tmp_path / "eval.jsonl", records)


def dataset_of(actor, path):
    return ActorDataset(build_hf_dataset(path), actor.tokenizer, 3072, PREPENDED)


def test_derangement_never_gives_a_sample_its_own_latents():
    for n in range(2, 9):
        donors = ev.donor_indices(n)
        assert all(d != i for i, d in enumerate(donors)) and sorted(donors) == list(range(n))


def test_conditions_build_the_inputs_they_claim(actor, tmp_path, monkeypatch):
    records, path = records_with_answers(tmp_path)
    n = len(records)
    raw = [np.load(tmp_path / r["hidden_state_path"])[:PREPENDED] for r in records]  # independent of data.py
    dataset = dataset_of(actor, path)
    collator = LatentCollator(actor.pad_id, actor.head.config.latent_dim)
    seen = []  # embeddings the base model really receives
    backbone = actor.backbone
    monkeypatch.setattr(actor, "backbone", lambda embeds, mask, **kw: (seen.append(embeds), backbone(embeds, mask, **kw))[1])

    def head_rows(latents):
        with torch.no_grad():
            return actor.head(torch.from_numpy(latents)[None], torch.tensor([len(latents)]))[0]

    checked = dict.fromkeys(ev.CONDITIONS, 0)
    for indices, _, _, batch, donor in ev.iter_batches(dataset, collator, 2, n, "cpu"):  # 3 batches: 2, 2, 1
        for condition in ev.CONDITIONS:
            kwargs = ev.condition_inputs(condition, batch, donor)
            seen.clear()
            ev.ce_sums(actor, kwargs)
            embeds = seen[0]
            # The same assembly as LatentActor.forward, to read the token ids around the block.
            asm = assemble_inputs(kwargs["input_ids"], kwargs["labels"], kwargs["attention_mask"].sum(1),
                                  kwargs["marker_index"], kwargs.get("latent_rows", torch.zeros(len(indices),
                                                                                                  dtype=torch.long)),
                                  kwargs.get("block_ids"), kwargs.get("block_lengths"), actor.bop_id, actor.eop_id,
                                  actor.pad_id)
            for b, i in enumerate(indices):
                ids = asm["input_ids"][b]
                bop, eop = int((ids == actor.bop_id).nonzero()), int((ids == actor.eop_id).nonzero())
                inner, inner_embeds = ids[bop + 1:eop].tolist(), embeds[b, bop + 1:eop]
                if condition == "true":
                    assert inner == [actor.pad_id] * len(raw[i])
                    assert torch.allclose(inner_embeds, head_rows(raw[i]), atol=1e-5)
                elif condition == "shuffled":
                    j = (i + 1) % n
                    assert inner == [actor.pad_id] * len(raw[j])
                    assert torch.allclose(inner_embeds, head_rows(raw[j]), atol=1e-5)
                    own = head_rows(raw[i])
                    assert own.shape != inner_embeds.shape or not torch.allclose(inner_embeds, own, atol=1e-3)
                elif condition == "none":
                    assert eop == bop + 1
                else:
                    plan = actor.tokenizer(records[i]["plan"], add_special_tokens=False)["input_ids"]
                    assert inner == plan and len(plan) > 0
                    emb = actor.base_model.get_input_embeddings()(torch.tensor(plan))
                    assert torch.equal(inner_embeds, emb)
                checked[condition] += 1
    assert checked == dict.fromkeys(ev.CONDITIONS, n)


@pytest.mark.slow
def test_cli_writes_the_report_with_hand_checked_ce(actor_dir, tmp_path, capsys):
    records, path = records_with_answers(tmp_path, n=4)
    out = str(tmp_path / "results" / "eval.json")
    assert ev.main(["--model_dir", actor_dir, "--eval_file", path, "--output", out, "--batch_size", "3",
                    "--max_new_tokens", "4"]) == 0
    report = json.load(open(out))
    assert {"model_dir", "eval_file", "num_samples", "conditions", "delta_bits_shuffled_minus_true",
            "per_sample"} <= report.keys()
    assert report["num_samples"] == 4 and set(report["conditions"]) == set(ev.CONDITIONS)
    for c, v in report["conditions"].items():
        assert math.isfinite(v["ce_bits"]) and 0 <= v["accuracy"] <= 1
    assert math.isfinite(report["delta_bits_shuffled_minus_true"])
    first = report["per_sample"][0]
    assert first["id"] == "s000" and set(first["ce_bits"]) == set(first["correct"]) == set(first["reply"])
    assert all(isinstance(x, str) for x in first["reply"].values())
    assert first["ce_bits"]["true"] != first["ce_bits"]["shuffled"]
    assert os.path.exists(str(tmp_path / "results" / "eval.png"))
    assert "plan_text" in capsys.readouterr().out

    # Hand-computed: the plain LM on <bop> plan tokens <eop> in place of the marker, HF's own mean CE.
    base = AutoModelForCausalLM.from_pretrained(actor_dir)
    actor_tok = LatentActor.from_pretrained(actor_dir).tokenizer
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in records[0]["conversations"]]
    enc = encode_conversation(actor_tok, messages)
    m = enc["marker_index"]
    bop, eop = actor_tok.convert_tokens_to_ids(["<bop>", "<eop>"])
    plan = actor_tok(records[0]["plan"], add_special_tokens=False)["input_ids"]
    ids = enc["input_ids"][:m].tolist() + [bop, *plan, eop] + enc["input_ids"][m + 1:].tolist()
    labels = enc["labels"][:m].tolist() + [IGNORE_INDEX] * (len(plan) + 2) + enc["labels"][m + 1:].tolist()
    with torch.no_grad():
        loss = base(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    assert first["ce_bits"]["plan_text"] == pytest.approx(loss / math.log(2), rel=1e-5)


def test_evaluate_conditions_for_the_trainer(actor, tmp_path):
    _, path = records_with_answers(tmp_path, n=3)
    dataset = dataset_of(actor, path)
    actor.train()
    metrics = ev.evaluate_conditions(actor, dataset, LatentCollator(actor.pad_id, actor.head.config.latent_dim),
                                     batch_size=2, device="cpu", max_samples=2)
    assert actor.training and actor.head.training  # the caller's mode is restored
    assert set(metrics) == ({f"{c}_{k}" for c in ev.CONDITIONS for k in ("ce_bits", "exact_match")}
                            | {"delta_bits_shuffled_minus_true"})
    assert metrics["delta_bits_shuffled_minus_true"] == pytest.approx(
        metrics["shuffled_ce_bits"] - metrics["true_ce_bits"], abs=1e-9)  # same samples and tokens
    actor.eval()


def test_answer_matching_is_whole_words():
    assert ev.answer_in_reply("The key is in the Kitchen.", "kitchen")
    assert ev.answer_in_reply("room 1!", "Room 1")
    assert not ev.answer_in_reply("kitchenette", "kitchen")
    assert not ev.answer_in_reply("room 12", "room 1")
    assert not ev.answer_in_reply("anything", "")


def test_exact_match_is_every_supervised_token_the_argmax(actor, monkeypatch):
    """`ce_and_exact`: a sample counts as exact when each of its supervised tokens is the arg-max (so greedy
    decoding writes the reference); CE sums by hand from the same logits."""
    from latent_head import BranchOutput

    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0],   # sample 0: both tokens right
                           [0.0, 0.0, 1.0], [2.0, 0.0, 0.0],   # sample 1: second token wrong
                           [0.0, 5.0, 0.0]])                    # sample 2: right; sample 3: no tokens
    labels, sample_index = torch.tensor([0, 1, 2, 1, 1]), torch.tensor([0, 0, 1, 1, 2])
    monkeypatch.setattr(actor, "branch", lambda **kw: BranchOutput(logits, labels, sample_index))
    monkeypatch.setattr(actor, "logits", lambda hidden: hidden)
    sums, counts, exact = ev.ce_and_exact(actor, {"input_ids": torch.zeros(4, 1, dtype=torch.long)})
    assert exact.tolist() == [True, False, True, False] and counts.tolist() == [2, 2, 1, 0]
    ce = -torch.log_softmax(logits.double(), -1)[torch.arange(5), labels]
    assert torch.allclose(sums, torch.stack([ce[:2].sum(), ce[2:4].sum(), ce[4], torch.tensor(0.0).double()]))


def test_steps_to_read_is_the_first_evaluation_meeting_both_thresholds():
    from transformers import TrainerControl, TrainerState

    from callbacks import StepsToReadCallback

    cb, state, control = StepsToReadCallback(stop=True), TrainerState(), TrainerControl()
    evals = [(10, 1.4, 0.85), (20, 0.9, 0.95), (30, 1.0, 0.9), (40, 2.0, 1.0)]  # step, delta bits, exact
    for step, delta, exact in evals:
        state.global_step = step
        cb.on_log(None, state, control, logs={"cond/delta_bits_shuffled_minus_true": delta,
                                              "cond/true_exact_match": exact})
        if cb.steps_to_read:
            break
    assert cb.steps_to_read == 30 and control.should_training_stop
    assert state.log_history[-1] == {"step": 30, "cond/steps_to_read": 30}
