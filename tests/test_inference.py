"""Generation with a latent message: prompt layout, the zero-latent equivalence, batching, the CLI."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluation import inference
from conftest import LATENT_DIM, PREPENDED, make_records, write_jsonl
from data import encode_conversation
from latent_head import LatentActor

QUESTION = [{"role": "user", "content": "Where is the key? Answer with the room name only."}]




def test_prompt_ids_are_the_training_ids_up_to_the_reply(actor):
    conversation = QUESTION + [{"role": "assistant", "content": "kitchen"}]
    ids, marker = inference.encode_prompt(actor.tokenizer, inference.prompt_messages(conversation))
    train = encode_conversation(actor.tokenizer, conversation)
    assert marker == train["marker_index"]
    assert ids.tolist() == train["input_ids"][: len(ids)].tolist()
    # the reply starts right where the prompt ends: the first supervised token
    assert train["labels"][len(ids) - 1] == -100 and train["labels"][len(ids)] != -100
    with pytest.raises(ValueError, match="end with a user"):
        inference.encode_prompt(actor.tokenizer, conversation)


@pytest.mark.parametrize("latents", [None, np.zeros((0, LATENT_DIM), np.float32)], ids=["none", "K=0"])
def test_zero_length_latent_generation_equals_the_base_model(actor, latents):
    ids, marker = inference.encode_prompt(actor.tokenizer, QUESTION)
    batch = inference.build_prompt_batch(actor, [(ids, marker)], [latents])
    got = inference.generate_token_ids(actor, batch, max_new_tokens=12)[0]

    # The same prompt for the plain LM: the marker replaced by <bop><eop>, given as token ids.
    plain = torch.tensor([ids[:marker].tolist() + [actor.bop_id, actor.eop_id] + ids[marker + 1:].tolist()])
    assert batch["input_ids"].tolist() == plain.tolist()
    out = actor.base_model.generate(input_ids=plain, attention_mask=torch.ones_like(plain), max_new_tokens=12,
                                    do_sample=False, pad_token_id=actor.pad_id)
    expected = out[0, plain.shape[1]:].tolist()
    eos = actor.tokenizer.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert len(got) > 3 and got == expected  # token for token
    reply = inference.generate_reply(actor, QUESTION, latents, max_new_tokens=12)
    assert reply == actor.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_prompt_batch_layout_and_batched_generation(actor):
    tok = actor.tokenizer
    other = [{"role": "user", "content": "Another question, of another length?"}]
    prompts = [inference.encode_prompt(tok, m) for m in (QUESTION, other)]
    latents = [np.random.default_rng(0).standard_normal((9, LATENT_DIM)).astype(np.float32), None]
    plan = tok("It is in the kitchen.", add_special_tokens=False)["input_ids"]
    batch = inference.build_prompt_batch(actor, prompts, latents, [plan, None])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = [len(prompts[0][0]) + 1 + PREPENDED + len(plan), len(prompts[1][0]) + 1]  # marker -> bop .. eop
    assert mask.sum(1).tolist() == lengths and lengths[0] != lengths[1]
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # left-padded
    for b, (inner, slots) in enumerate([([actor.pad_id] * PREPENDED + plan, PREPENDED), ([], 0)]):
        bop = int((ids[b] == actor.bop_id).nonzero())
        eop = int((ids[b] == actor.eop_id).nonzero())
        assert ids[b, bop + 1:eop].tolist() == inner and int(batch["latent_slots"][b].sum()) == slots
    embeds = inference.prompt_embeddings(actor, batch)
    with torch.no_grad():
        rows = actor.head(torch.from_numpy(latents[0][None, :PREPENDED]), torch.tensor([PREPENDED]))[0]
    assert torch.allclose(embeds[0][batch["latent_slots"][0]], rows, atol=1e-6)

    together = inference.generate_replies(actor, [QUESTION, other], latents, max_new_tokens=8,
                                          plan_texts=["It is in the kitchen.", None])
    alone = [inference.generate_reply(actor, QUESTION, latents[0], max_new_tokens=8,
                                      plan_text="It is in the kitchen."),
             inference.generate_reply(actor, other, None, max_new_tokens=8)]
    assert together == alone


def test_cli_prints_a_reply_and_reports_bad_input(actor_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", make_records(3, str(tmp_path / "latents")))
    assert inference.main(["--model_dir", actor_dir, "--record", f"{data}:s002", "--max_new_tokens", "6"]) == 0
    by_id = capsys.readouterr().out
    assert inference.main(["--model_dir", actor_dir, "--record", f"{data}:2", "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == by_id and by_id.strip()
    np.save(tmp_path / "msg.npy", np.ones((4, LATENT_DIM), np.float32))
    assert inference.main(["--model_dir", actor_dir, "--prompt", "Where is it?", "--latents",
                           str(tmp_path / "msg.npy"), "--max_new_tokens", "4"]) == 0
    bad = [(["--record", f"{data}:7"], "no record"), (["--record", str(tmp_path / "missing.jsonl")], "not found"),
           (["--prompt", "hi", "--latents", str(tmp_path / "none.npy")], "not found")]
    for argv, message in bad:
        assert inference.main(["--model_dir", actor_dir, *argv]) == 2
        assert message in capsys.readouterr().err
    assert inference.main(["--model_dir", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
