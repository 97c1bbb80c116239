"""The head's warm start: its loss by hand, and a fit that brings the head's rows to the plan's embeddings."""
import pytest
import torch

from conftest import LATENT_DIM, make_records, write_jsonl
from data import ActorDataset, LatentCollator, build_hf_dataset
from latent_head import HeadConfig, LatentCommHead
from training.warm_start import alignment_loss, warm_start_head


def test_alignment_loss_by_hand():
    torch.manual_seed(0)
    head = LatentCommHead(HeadConfig(latent_dim=4, hidden_size=8, num_heads=2, prepended_length=5, dropout=0.0))
    embedding = torch.nn.Embedding(20, 8)
    batch = {"latents": torch.randn(2, 5, 4), "latent_lengths": torch.tensor([5, 2]),
             "plan_ids": torch.tensor([[3, 4, 5], [6, 7, 8]]), "plan_lengths": torch.tensor([3, 3])}
    loss, cos = alignment_loss(head, embedding, batch)
    out = head(batch["latents"], batch["latent_lengths"])
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # k < min(latent rows, plan tokens) per sample
    err = sum(((out[b, k] - embedding.weight[batch["plan_ids"][b, k]]) ** 2).sum() for b, k in pairs)
    norm = sum((embedding.weight[batch["plan_ids"][b, k]] ** 2).sum() for b, k in pairs)
    assert loss.item() == pytest.approx((err / norm).item(), rel=1e-5)
    expected_cos = sum(torch.cosine_similarity(out[b, k], embedding.weight[batch["plan_ids"][b, k]], 0)
                       for b, k in pairs) / len(pairs)
    assert cos.item() == pytest.approx(expected_cos.item(), rel=1e-5)


def test_warm_start_fits_the_head_to_the_plan_embeddings_and_touches_nothing_else(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latent_head import LatentActor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    actor = LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, LATENT_DIM, 4, 8)
    ds = ActorDataset(build_hf_dataset(write_jsonl(tmp_path / "t.jsonl", make_records(8, str(tmp_path / "l")))),
                      tok, 3072, 8)
    batches = [LatentCollator(tok.pad_token_id, LATENT_DIM)([ds[i] for i in range(j, j + 4)]) for j in (0, 4)]
    base_before = {k: v.clone() for k, v in actor.base_model.state_dict().items()}
    embedding = actor.base_model.get_input_embeddings()
    metrics = warm_start_head(actor.head, embedding, batches, steps=150, learning_rate=3e-3)
    assert metrics["warm_start/first_loss"] > 0.9  # a fresh head's rows are far from the embeddings
    assert metrics["warm_start/loss"] < 0.2 * metrics["warm_start/first_loss"]
    loss, _ = alignment_loss(actor.head.eval(), embedding, batches[0])
    assert loss.item() < 0.3
    assert all(torch.equal(v, base_before[k]) for k, v in actor.base_model.state_dict().items())


def test_a_non_finite_warm_start_step_leaves_the_head_unchanged():
    torch.manual_seed(0)
    head = LatentCommHead(HeadConfig(latent_dim=4, hidden_size=8, num_heads=2, prepended_length=5, dropout=0.0))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    bad = {"latents": torch.full((1, 3, 4), float("nan")), "latent_lengths": torch.tensor([3]),
           "plan_ids": torch.tensor([[1, 2, 3]]), "plan_lengths": torch.tensor([3])}
    assert warm_start_head(head, torch.nn.Embedding(5, 8), [bad], steps=3) == {}
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
