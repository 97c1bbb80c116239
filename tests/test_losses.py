"""Each loss term against a hand computation on small tensors."""
import math

import numpy as np
import pytest
import torch

import losses


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)


def test_ce_matches_hand_computation(logits):
    a, _ = logits
    labels = torch.tensor([0, 3, 6, 2, 1])
    p = softmax(a.numpy())
    expected = -np.log(p[np.arange(5), labels.numpy()])
    np.testing.assert_allclose(losses.token_ce(a, labels).numpy(), expected, rtol=1e-6)


def test_plan_similarity_is_kl_plan_to_pos_plus_per_position_cosine(logits):
    pos, plan = logits
    p, q = softmax(pos.numpy()), softmax(plan.numpy())
    kl = (q * (np.log(q) - np.log(p))).sum(-1)  # KL(P_plan || P_pos)
    cos = (p * q).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1))  # one per position
    expected = 0.7 * kl + 0.3 * (1 - cos)
    np.testing.assert_allclose(losses.plan_similarity(pos, plan).numpy(), expected, rtol=1e-5)
    # identical distributions: zero
    assert torch.allclose(losses.plan_similarity(pos, pos), torch.zeros(5, dtype=torch.float32), atol=1e-6)


def test_js_and_contrast_hinge(logits):
    a, b = logits
    p, q = softmax(a.numpy()), softmax(b.numpy())
    m = (p + q) / 2
    js = 0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)
    got = losses.js_divergence(a, b)
    np.testing.assert_allclose(got.numpy(), js, rtol=1e-5)
    np.testing.assert_allclose(losses.random_contrast(got).numpy(), np.maximum(0, 0.69 - js), rtol=1e-5)
    # disjoint supports reach ln 2, so the hinge is zero
    far = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])
    assert losses.js_divergence(*far).item() == pytest.approx(math.log(2), abs=1e-6)
    assert losses.random_contrast(losses.js_divergence(*far)).item() == 0.0


def test_loss_sums_chunked_equals_plain_and_masks_apply():
    g = torch.Generator().manual_seed(1)
    n, h, v = 11, 6, 13
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    pos = torch.randn(n, h, generator=g, requires_grad=True)
    plan, neg = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    labels = torch.randint(v, (n,), generator=g)
    plan_mask = torch.rand(n, generator=g) > 0.3
    neg_mask = torch.rand(n, generator=g) > 0.3

    project = lambda h: h @ weight.T
    plain = losses.latent_comm_loss_sums(pos, labels, project, plan, plan_mask, neg, neg_mask, chunk_size=None)
    total_plain = plain.ce + plain.plan_similarity + 2 * plain.random_contrast
    grads_plain = torch.autograd.grad(total_plain, (pos, weight))
    chunked = losses.latent_comm_loss_sums(pos, labels, project, plan, plan_mask, neg, neg_mask, chunk_size=4)
    total_chunked = chunked.ce + chunked.plan_similarity + 2 * chunked.random_contrast
    grads_chunked = torch.autograd.grad(total_chunked, (pos, weight))
    assert torch.allclose(total_plain, total_chunked, atol=1e-5)
    for a, b in zip(grads_plain, grads_chunked):
        assert torch.allclose(a, b, atol=1e-5)

    # by hand, from the per-token functions
    pl, ql, nl = pos @ weight.T, plan @ weight.T, neg @ weight.T
    assert plain.ce.item() == pytest.approx(losses.token_ce(pl, labels).sum().item(), rel=1e-5)
    assert plain.plan_similarity.item() == pytest.approx(
        losses.plan_similarity(pl, ql)[plan_mask].sum().item(), rel=1e-5)
    js = losses.js_divergence(pl, nl)
    assert plain.random_contrast.item() == pytest.approx(losses.random_contrast(js)[neg_mask].sum().item(), rel=1e-5)
    assert plain.contrast_tokens.item() == neg_mask.sum().item()
    assert plain.neg_ce.item() == pytest.approx(losses.token_ce(nl, labels)[neg_mask].sum().item(), rel=1e-5)


def test_infonce_from_scores_by_hand():
    s = torch.tensor([[-1.0, -3.0, -2.0], [-2.5, -0.5, -2.0], [-1.0, -1.0, -1.5]])
    tau = 0.5
    per_row = [-(s[j, j] - torch.logsumexp(s[j], 0)) for j in range(3)]
    expected = sum(per_row) / 3 / tau
    loss, bound = losses.infonce_from_scores(s, tau)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bound.item() == pytest.approx(math.log(3) - expected.item(), rel=1e-6)
