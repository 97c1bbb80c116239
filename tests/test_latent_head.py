"""Injection against hand-built sequences, the head's shape/dtype rules, and save/load round trips."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_head import (HEAD_FILE, IGNORE_INDEX, HeadConfig, LatentActor, LatentCommHead, assemble_inputs,
                         graph_row_length, pack_rows)

BOP, EOP, PAD = 901, 902, 0


def test_assemble_inputs_matches_hand_built_rows():
    text = torch.tensor([[10, 11, 99, 12, 13, 14], [20, 99, 21, 0, 0, 0]])  # 99 = marker
    labels = torch.tensor([[-100, -100, -100, -100, 13, 14], [-100, -100, 21, -100, -100, -100]])
    out = assemble_inputs(text, labels, text_lengths=torch.tensor([6, 3]), marker_index=torch.tensor([2, 1]),
                          latent_rows=torch.tensor([2, 0]), block_ids=torch.tensor([[50, 51, 52], [60, 0, 0]]),
                          block_lengths=torch.tensor([1, 1]), bop_id=BOP, eop_id=EOP, pad_id=PAD)
    L = PAD  # latent slots hold the pad id
    expected_ids = [[10, 11, BOP, L, L, 50, EOP, 12, 13, 14],
                    [20, BOP, 60, EOP, 21, PAD, PAD, PAD, PAD, PAD]]
    expected_labels = [[-100] * 8 + [13, 14], [-100, -100, -100, -100, 21] + [-100] * 5]
    assert out["input_ids"].tolist() == expected_ids
    assert out["labels"].tolist() == expected_labels
    assert out["attention_mask"].tolist() == [[1] * 10, [1] * 5 + [0] * 5]
    assert out["latent_slots"].nonzero().tolist() == [[0, 3], [0, 4]]


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    return LatentActor.from_base(base, tok, latent_dim=24, num_heads=4, prepended_length=5)


def test_injected_embeddings_equal_hand_built_sequence(actor):
    actor.eval()
    m = actor.marker_id
    text = torch.tensor([[5, 6, m, 7, 8], [9, m, 10, 11, PAD]])
    labels = torch.full_like(text, IGNORE_INDEX)
    latents = torch.randn(2, 7, 24)  # 7 rows, prepended_length 5: rows 5 and 6 must never be used
    lengths = torch.tensor([7, 3])
    rows = torch.tensor([4, 2])
    batch = assemble_inputs(text, labels, torch.tensor([5, 4]), torch.tensor([2, 1]), rows, None, None,
                            actor.bop_id, actor.eop_id, actor.pad_id)
    got = actor.embed(batch["input_ids"], batch["latent_slots"], latents, lengths)

    emb = actor.base_model.get_input_embeddings()
    processed = actor.head(latents, lengths)
    assert processed.shape == (2, 5, 32) and processed.dtype == torch.float32
    tok = lambda ids: emb(torch.tensor(ids))
    row0 = torch.cat([tok([5, 6, actor.bop_id]), processed[0, :4], tok([actor.eop_id, 7, 8])])
    row1 = torch.cat([tok([9, actor.bop_id]), processed[1, :2], tok([actor.eop_id, 10, 11])])
    assert torch.allclose(got[0], row0, atol=1e-6)
    assert torch.allclose(got[1, : len(row1)], row1, atol=1e-6)
    # a sample's processed rows do not depend on its padding (key padding mask works)
    alone = actor.head(latents[1:, :3], lengths[1:])
    assert torch.allclose(alone[0, :2], processed[1, :2], atol=1e-5)


def test_head_runs_in_float32_and_casts_to_model_dtype(actor):
    rows = actor.head(torch.randn(1, 3, 24, dtype=torch.bfloat16), torch.tensor([3]))
    assert rows.dtype == torch.float32
    with pytest.raises(ValueError, match="num_heads"):
        LatentCommHead(HeadConfig(latent_dim=8, hidden_size=30, num_heads=4))


def test_save_load_round_trip_gives_equal_logits(actor, tmp_path):
    torch.manual_seed(1)
    with torch.no_grad():  # make the head non-trivial so the test would catch a missing piece
        for p in actor.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    actor.eval()
    m = actor.marker_id
    inputs = dict(input_ids=torch.tensor([[5, 6, m, 7, 8]]), labels=torch.tensor([[-100, -100, -100, 7, 8]]),
                  attention_mask=torch.ones(1, 5, dtype=torch.long), marker_index=torch.tensor([2]),
                  latents=torch.randn(1, 4, 24), latent_lengths=torch.tensor([4]), latent_rows=torch.tensor([4]))
    before = actor.logits(actor(**inputs).hidden)
    actor.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / HEAD_FILE)
    state = torch.load(tmp_path / HEAD_FILE, weights_only=True)  # plain tensors + config
    assert state["config"]["latent_dim"] == 24 and "projection.mlp.0.weight" in state["state_dict"]
    restored = LatentActor.from_pretrained(str(tmp_path))
    assert not restored.training and not restored.head.training
    after = restored.logits(restored(**inputs).hidden)
    assert torch.equal(before, after)


def test_packed_sequences_equal_padded_batch_and_are_not_saved(actor_dir, tmp_path):
    """One row of concatenated samples (positions restarting, attention kept per sample) gives the
    padded batch's hidden states and gradients; the custom attention never reaches the saved config."""
    from tests.helpers import make_records, write_jsonl
    from data import ActorDataset, LatentCollator, build_hf_dataset

    padded, packed = LatentActor.from_pretrained(actor_dir), LatentActor.from_pretrained(actor_dir)
    packed.use_packed_sequences()
    tok = padded.tokenizer
    path = write_jsonl(tmp_path / "t.jsonl", make_records(3, str(tmp_path / "lat")))
    batch = LatentCollator(tok.pad_token_id, 24)([ActorDataset(build_hf_dataset(path), tok, 512, 6)[i] for i in range(3)])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # samples of different lengths: padding
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "marker_index", "latents",
                                    "latent_lengths")}
    inputs["latent_rows"] = batch["latent_lengths"] - 1
    outs = []
    for actor in (padded, packed):
        actor.eval()  # no dropout: the two runs must see the same numbers
        out = actor(**inputs, block_ids=batch["plan_ids"], block_lengths=batch["plan_lengths"])
        out.hidden.square().sum().backward()
        outs.append((out, actor.base_model.get_input_embeddings().weight.grad))
    (a, grad_a), (b, grad_b) = outs
    assert torch.equal(a.labels, b.labels) and torch.equal(a.sample_index, b.sample_index)
    assert torch.allclose(a.hidden, b.hidden, atol=1e-5)
    assert torch.allclose(grad_a, grad_b, atol=1e-4)
    # the second sample of a packed row sees nothing of the first: equal to running it alone
    decoder = packed.base_model.get_decoder()
    embeds, cu = torch.randn(1, 9, 32), torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.no_grad():
        together = decoder(inputs_embeds=embeds, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]]),
                           use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5,
                           max_length_k=5).last_hidden_state
        alone = decoder(inputs_embeds=embeds[:, 4:], use_cache=False).last_hidden_state
    assert torch.allclose(together[0, 4:], alone[0], atol=1e-5)
    packed.save_pretrained(tmp_path / "saved")
    assert "interlat" not in (tmp_path / "saved" / "config.json").read_text()


def test_graph_row_lengths_and_padded_packing_by_hand():
    """Under CUDA graphs a packed row takes one of a few lengths: whole units up to 8, then 4 steps a doubling; the
    extra tokens end the samples' segments (each at most the limit), after every real token of their sample."""
    lengths = [graph_row_length(t, 10 ** 6, unit=4) for t in (1, 4, 5, 32, 33, 40, 41, 65)]
    assert lengths == [4, 4, 8, 32, 40, 40, 48, 80]
    assert graph_row_length(30, 24, unit=4) == 30 and graph_row_length(17, 24, unit=4) == 20  # limit; never short
    row = pack_rows(torch.tensor([3, 1]), 4, width=4, segment_limit=4)  # room 1 and 3: 4 extra tokens fill both
    assert row.length == 8 and row.real_tokens == 4 and row.cu.tolist() == [0, 4, 8]
    assert row.position.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert row.real.tolist() == [True, True, True, False, True, False, False, False]
    assert row.source[row.real].tolist() == [0, 1, 2, 4]  # sample b's token t comes from b * width + t
    plain = pack_rows(torch.tensor([3, 1]), 4, width=4)
    assert plain.length == 4 and plain.real is None and plain.source.tolist() == [0, 1, 2, 4]


def test_branch_positions_are_the_assembled_supervised_labels(actor):
    """`branch` finds the supervised positions from the text (no boolean mask over the assembled rows, which
    waits for the device): the same labels, rows and hidden states as the assembled rows' shifted labels give,
    with the marker first or inside, with and without a block."""
    actor.eval()
    m = actor.marker_id
    text = torch.tensor([[m, 6, 7, 8, 9, 10], [5, 6, m, 7, 8, PAD], [5, m, 7, 8, 9, 10]])
    labels = torch.tensor([[-100, 6, -100, 8, 9, 10], [-100, 6, -100, 7, 8, -100], [5, -100, 7, -100, 9, 10]])
    lengths, marker = torch.tensor([6, 5, 6]), torch.tensor([0, 2, 1])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    latents, latent_lengths, rows = torch.randn(3, 4, 24), torch.tensor([4, 2, 3]), torch.tensor([2, 2, 0])
    plan = (torch.tensor([[50, 51], [52, 0], [53, 54]]), torch.tensor([2, 1, 2]))
    for block_ids, block_lengths in ((None, None), plan):
        with torch.no_grad():
            out = actor.branch(text, labels, mask, marker, latents, latent_lengths, rows, block_ids, block_lengths)
            asm = assemble_inputs(text, labels, lengths, marker, rows, block_ids, block_lengths, actor.bop_id,
                                  actor.eop_id, actor.pad_id)
            embeds = actor.embed(asm["input_ids"], asm["latent_slots"], latents, latent_lengths)
            hidden = actor.base_model.get_decoder()(inputs_embeds=embeds, attention_mask=asm["attention_mask"]
                                                    ).last_hidden_state
        want_rows, want_cols = (asm["labels"][:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        assert out.labels.tolist() == asm["labels"][:, 1:][want_rows, want_cols].tolist()
        assert out.sample_index.tolist() == want_rows.tolist() and len(want_rows) == 10
        assert torch.allclose(out.hidden, hidden[want_rows, want_cols], atol=1e-5)


def test_rows_padded_for_cuda_graphs_give_equal_hidden_states_and_gradients(actor_dir, tmp_path):
    """The CUDA-graph layout (each packed row padded to a recurring length, the extra tokens at the ends of the
    samples' segments) changes no value and no gradient: run on the CPU without the graphs themselves, in float64
    (float32 rounds the two layouts' sums differently, and some of the tiny model's gradients cancel to 1e-6 of
    their terms)."""
    from tests.helpers import make_records, write_jsonl
    from data import ActorDataset, LatentCollator, build_hf_dataset

    plain, padded = (LatentActor.from_pretrained(actor_dir).double() for _ in range(2))
    plain.use_packed_sequences()
    padded.use_packed_sequences()
    padded.cuda_graphs = True  # what compile_layers(cuda_graphs=True) sets, without compiling
    tok = plain.tokenizer
    path = write_jsonl(tmp_path / "t.jsonl", make_records(3, str(tmp_path / "lat")))
    dataset = ActorDataset(build_hf_dataset(path), tok, 512, 6)
    batch = LatentCollator(tok.pad_token_id, 24)([dataset[i] for i in range(3)])
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "marker_index", "latent_lengths")}
    inputs["latents"] = batch["latents"].double()
    outs = []
    for actor in (plain, padded):
        actor.eval()
        out = actor(**inputs, block_ids=batch["plan_ids"], block_lengths=batch["plan_lengths"])
        out.hidden.square().sum().backward()
        outs.append((out, {n: p.grad for n, p in actor.named_parameters() if p.grad is not None}, actor.packed_tokens))
    (a, grads_a, tokens_a), (b, grads_b, tokens_b) = outs
    assert tokens_a[0] == tokens_a[1] and tokens_b == (tokens_a[0], 1024)  # the padded row really was longer
    assert torch.equal(a.labels, b.labels) and torch.equal(a.sample_index, b.sample_index)
    assert torch.allclose(a.hidden, b.hidden, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-9, atol=1e-14), name
    with pytest.raises(ValueError, match="packed rows"):
        LatentActor.from_pretrained(actor_dir).compile_layers(cuda_graphs=True)


def test_building_an_actor_sets_no_global_backend_flag_training_does(tiny_model_dir, monkeypatch):
    """Process-wide CUDA flags belong where training starts (`set_training_backends`), not in a constructor."""
    from latent_head import set_training_backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.backends.cuda.matmul.allow_tf32 = False
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, latent_dim=24, num_heads=4)
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32) == (True, False)
        assert len(set_training_backends()) == 2  # what it set, for the log
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32) == (False, True)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
