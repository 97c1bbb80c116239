"""Each loss term against a hand computation on small tensors."""
import math
import os
from dataclasses import replace

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
    inputs = losses.LossInputs(pos, labels, plan_hidden=plan, plan_mask=plan_mask, neg_hidden=neg, neg_mask=neg_mask)
    plain = losses.latent_comm_loss_sums(inputs, project, losses.LossConfig(loss_chunk_size=None))
    total_plain = plain.total
    grads_plain = torch.autograd.grad(total_plain, (pos, weight))
    chunked = losses.latent_comm_loss_sums(inputs, project, losses.LossConfig(loss_chunk_size=4))
    total_chunked = chunked.total
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


def _loss_case(seed=3, n=13, h=6, v=17):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g) * 2
    pos = torch.randn(n, h, generator=g)
    plan, neg = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    labels = torch.randint(v, (n,), generator=g)
    plan_mask, neg_mask = torch.rand(n, generator=g) > 0.3, torch.rand(n, generator=g) > 0.3
    neg[:2] = pos[:2] + 0.01 * neg[:2]  # near-identical rows: JS below the margin, the hinge is active
    neg[2:4], pos[2:4] = -pos[2:4] * 8, pos[2:4] * 8  # opposite peaks: JS passes the margin, the hinge is clamped
    neg_mask[:4] = True
    return weight, pos, plan, neg, labels, plan_mask, neg_mask


@pytest.mark.parametrize("with_plan,with_neg", [(True, True), (True, False), (False, True), (False, False)])
def test_fused_loss_matches_plain_path_values_and_gradients(with_plan, with_neg):
    """The closed-form gradients of the fused path equal autograd through the plain path."""
    weight, pos, plan, neg, labels, plan_mask, neg_mask = _loss_case()
    branches = dict(plan_hidden=plan if with_plan else None, plan_mask=plan_mask,
                    neg_hidden=neg if with_neg else None, neg_mask=neg_mask)
    weights = dict(plan_similarity_weight=0.7, random_contrast_weight=2.5)
    results = []
    for fused in (False, True):
        w, h = weight.clone().requires_grad_(), pos.clone().requires_grad_()
        inputs = losses.LossInputs(h, labels, **branches)
        if fused:
            sums = losses.fused_latent_comm_loss_sums(inputs, w, losses.LossConfig(loss_chunk_size=5, **weights))
        else:
            sums = losses.latent_comm_loss_sums(inputs, lambda x: x @ w.T,
                                                losses.LossConfig(loss_chunk_size=None, **weights))
        (3.0 * sums.total).backward()  # an upstream scale, as the division by the token count
        results.append((sums, h.grad, w.grad))
    (plain, g_h, g_w), (fused, f_h, f_w) = results
    for name in ("total", "ce", "plan_similarity", "random_contrast", "neg_ce", "js", "ce_on_contrast",
                 "plan_tokens", "contrast_tokens"):
        assert getattr(fused, name).item() == pytest.approx(getattr(plain, name).item(), rel=1e-5, abs=1e-6), name
    for got, want in ((f_h, g_h), (f_w, g_w)):  # float32 arithmetic on logits of magnitude ~50
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    if with_neg:  # the case exercises both sides of the hinge
        js = losses.js_divergence(pos @ weight.T, neg @ weight.T)
        assert (js[neg_mask] < losses.CONTRAST_MARGIN).any() and (js[neg_mask] > losses.CONTRAST_MARGIN).any()


def test_fused_loss_without_gradient_and_frozen_head():
    weight, pos, plan, neg, labels, plan_mask, neg_mask = _loss_case(seed=4)
    rows = lambda h: losses.LossInputs(h, labels, plan_hidden=plan, plan_mask=plan_mask, neg_hidden=neg,  # noqa: E731
                                       neg_mask=neg_mask)
    unchunked, chunks_of_4 = losses.LossConfig(loss_chunk_size=None), losses.LossConfig(loss_chunk_size=4)
    plain = losses.latent_comm_loss_sums(rows(pos), lambda x: x @ weight.T, unchunked)
    with torch.no_grad():
        fused = losses.fused_latent_comm_loss_sums(rows(pos), weight, chunks_of_4)
    assert fused.total.item() == pytest.approx(plain.total.item(), rel=1e-5)
    h = pos.clone().requires_grad_()  # LoRA-style: the head is frozen, only the hidden states get a gradient
    losses.fused_latent_comm_loss_sums(rows(h), weight, chunks_of_4).total.backward()
    p = pos.clone().requires_grad_()
    losses.latent_comm_loss_sums(rows(p), lambda x: x @ weight.T, unchunked).total.backward()
    assert torch.allclose(h.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_bf16_projections_stay_within_bf16_tolerance_of_float32():
    """`matmul_dtype=bfloat16` (the default under bf16 training on CUDA) rounds only the projections'
    operands (and, on CPU, the logits): loss terms and gradients stay within bf16's precision."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 300, 64, 4096  # logits of an LM's spread (std ~3): a peaked softmax, as in training
    weight = torch.randn(v, h, generator=g) * 0.4
    pos, plan = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    neg = pos + 0.5 * torch.randn(n, h, generator=g)
    labels = torch.randint(v, (n,), generator=g)
    masks = dict(plan_mask=torch.rand(n, generator=g) > 0.3, neg_mask=torch.rand(n, generator=g) > 0.3)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        w, p = weight.clone().requires_grad_(), pos.clone().requires_grad_()
        sums = losses.fused_latent_comm_loss_sums(
            losses.LossInputs(p, labels, plan_hidden=plan, neg_hidden=neg, **masks), w,
            losses.LossConfig(loss_chunk_size=128, loss_matmul_dtype=str(dtype).removeprefix("torch.")))
        sums.total.backward()
        results[dtype] = (sums, p.grad, w.grad)
    (ref, ref_h, ref_w), (got, got_h, got_w) = results[torch.float32], results[torch.bfloat16]
    for name in ("total", "ce", "plan_similarity", "random_contrast", "neg_ce"):
        assert getattr(got, name).item() == pytest.approx(getattr(ref, name).item(), rel=2e-3), name
    assert got.js.item() == pytest.approx(ref.js.item(), rel=5e-3)
    for a, b in ((got_h, ref_h), (got_w, ref_w)):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
        assert (a - b).norm() < 2e-2 * b.norm(), ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def interpreted_loss_kernel():
    """`loss_kernel` run by Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    from training import loss_kernel

    return loss_kernel


@pytest.mark.parametrize("with_plan,with_neg,need_grad", [(True, True, True), (True, False, True),
                                                          (False, True, True), (False, False, True),
                                                          (True, True, False)])
def test_triton_chunk_kernel_matches_the_torch_chunk_function(interpreted_loss_kernel, with_plan, with_neg,
                                                               need_grad):
    g = torch.Generator().manual_seed(3)
    rows, vocab = 6, 300  # 300 = two full blocks of 128 and a masked tail: the online maxima are rescaled
    pos = torch.randn(rows, vocab, generator=g) * 4
    plan = pos + torch.randn(rows, vocab, generator=g)  # near the positive: the contrast hinge is active
    neg = torch.randn(rows, vocab, generator=g) * 4
    # Row 0's negative is peaked far from its positive: JS ~ ln 2 > the margin, the hinge is clamped.
    pos[0, 7], neg[0, 200] = 60.0, 60.0
    labels = torch.tensor([7, 0, 299, 128, 5, 64])
    plan_w = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    neg_w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    args = (losses.ChunkLogits(pos, labels, plan if with_plan else None, plan_w, neg if with_neg else None, neg_w),
            1.3, 2.0, need_grad)
    want_terms, want_grad = losses.chunk_values_and_grad(*args)
    got_terms, got_grad = interpreted_loss_kernel.chunk_values_and_grad(*args, block=128, num_warps=4)
    sums = lambda terms: losses.sum_rows(terms, plan_w, neg_w).metrics()  # noqa: E731
    torch.testing.assert_close(sums(got_terms), sums(want_terms), rtol=1e-5, atol=1e-5)
    if with_neg:  # the test's premise: one row with the hinge clamped, the others with it active
        first_two = losses.ChunkLogits(pos[:2], labels[:2], None, plan_w[:2], neg[:2], neg_w[:2])
        js = interpreted_loss_kernel.chunk_values_and_grad(first_two, 1.0, 1.0, False, block=128)[0].js.sum()
        assert js > losses.CONTRAST_MARGIN
    if need_grad:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    else:
        assert got_grad is None and want_grad is None


_COMPILE_FOR_HOPPER = """
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from training import loss_kernel

kernel = loss_kernel._chunk_kernel
signature = {name: "constexpr" for name in kernel.arg_names}
for name in ("pos_ptr", "plan_ptr", "neg_ptr", "plan_w_ptr", "neg_w_ptr", "rows_out_ptr"):
    signature[name] = "*fp32"
signature |= {"grad_ptr": "*bf16", "labels_ptr": "*i64"}
signature |= {name: "i32" for name in ("stride_pos", "stride_plan", "stride_neg", "stride_grad", "vocab")}
signature |= {name: "fp32" for name in ("plan_weight", "contrast_weight", "kl_weight", "cos_weight", "margin")}
for plan, neg, grad in itertools.product((False, True), repeat=3):
    constants = {"HAS_PLAN": plan, "HAS_NEG": neg, "NEED_GRAD": grad, "BLOCK": 4096}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".target sm_90" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
    print("compiled", constants)
"""


@pytest.mark.slow
def test_triton_chunk_kernel_compiles_for_hopper(tmp_path):
    """The interpreter accepts code that the compiler refuses (e.g. a global that is not a constexpr): compile
    every variant of the kernel to an sm_90 binary (an H100's), with the ptxas that ships in triton's wheel.
    In a fresh process: compiling does not work while the interpreter is on."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cached one
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 8


@pytest.mark.slow
def test_triton_plan_term_keeps_float32_accuracy_when_plan_and_positive_nearly_agree(interpreted_loss_kernel):
    """KL(q||p) of nearly equal distributions is a small difference of ~log(vocab)-sized numbers: the kernel
    must not lose it. torch's float32 function gets the plan term's sum within 1.5e-4 to 8.4e-4 of float64
    here; the kernel must stay within 1e-3 (taking the KL as a difference of log-normalisers gave 1.8e-3)."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        rows, vocab = 32, 8192
        pos = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
        plan = pos + 0.01 * torch.randn(rows, vocab, generator=g, dtype=torch.float64)  # KL ~ 5e-5 a row
        labels, w = torch.randint(vocab, (rows,), generator=g), torch.ones(rows)
        exact = losses.chunk_values_and_grad(losses.ChunkLogits(pos, labels, plan, w.double(), None, w.double()),
                                             1.0, 2.0, False)[0].plan.sum()
        chunk = losses.ChunkLogits(pos.float(), labels, plan.float(), w, None, w)
        for block in (512, 2048):
            got = interpreted_loss_kernel.chunk_values_and_grad(chunk, 1.0, 2.0, False, block=block)[0].plan.sum()
            assert abs(got.item() - exact.item()) < 1e-3 * exact.item(), (seed, block, got.item(), exact.item())


def _switch_inputs(seed=3, n=12, h=6, v=9):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    plan, neg = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(n, h, generator=g, dtype=torch.float64)
    labels = torch.randint(v, (n,), generator=g)
    neg_mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    sample_index = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    return weight, pos, plan, neg, labels, neg_mask, sample_index


def test_published_contrast_divergence_by_hand():
    """`--contrast_divergence published`: per sample, max(0, 0.69 - (0.5 KL(M||P) + 0.5 KL(M||Q))) of the
    sample's mean distributions over its rows with a negative, counted once per such row."""
    weight, pos, plan, neg, labels, neg_mask, sample_index = _switch_inputs()
    project = lambda x: x @ weight.T
    inputs = losses.LossInputs(pos, labels, sample_index=sample_index, plan_hidden=plan, neg_hidden=neg,
                               neg_mask=neg_mask)
    weights = dict(plan_similarity_weight=1.0, random_contrast_weight=2.0)
    js = losses.latent_comm_loss_sums(inputs, project, losses.LossConfig(loss_chunk_size=5, **weights))
    published = losses.LossConfig(loss_chunk_size=5, contrast_divergence="published", fused_loss=False, **weights)
    pub = losses.latent_comm_loss_sums(inputs, project, published)
    p, r = softmax(project(pos).detach().numpy()), softmax(project(neg).detach().numpy())
    expected = 0.0
    for b in range(3):
        rows = (sample_index.numpy() == b) & neg_mask.numpy()
        pm, qm = p[rows].mean(0), r[rows].mean(0)
        m = (pm + qm) / 2
        d = 0.5 * (m * np.log(m / pm)).sum() + 0.5 * (m * np.log(m / qm)).sum()
        expected += rows.sum() * max(0.0, 0.69 - d)
    assert pub.random_contrast.item() == pytest.approx(expected, rel=1e-6)
    assert pub.random_contrast.item() != pytest.approx(js.random_contrast.item(), rel=1e-3)  # it changes the term
    assert pub.js.item() == pytest.approx(js.js.item(), rel=1e-6)  # the logged per-position JS is unchanged
    assert pub.total.item() == pytest.approx((js.total + 2.0 * (pub.random_contrast - js.random_contrast)).item(),
                                             rel=1e-6)
    # the gradient of the hinge of means, chunked with recomputation, equals the unchunked one
    grad_chunked = torch.autograd.grad(pub.total, pos)[0]
    plain = losses.latent_comm_loss_sums(inputs, project, replace(published, loss_chunk_size=None))
    assert torch.allclose(grad_chunked, torch.autograd.grad(plain.total, pos)[0], atol=1e-6)
    # unbounded, unlike JS: far-apart means exceed ln 2
    far = torch.tensor([[0.999, 0.001]], dtype=torch.float64), torch.tensor([[0.001, 0.999]], dtype=torch.float64)
    assert losses.published_divergence(*far).item() > math.log(2)


def test_adaptive_loss_weighting_by_hand():
    """`--loss_weighting adaptive`: w_plan = 0.01 + 0.04 clip(L_plan/4), w_rand = 0.01 + 0.49 clip(L_rand/0.69),
    L = the term's mean per token; the weights are constants for the gradient."""
    weight, pos, plan, neg, labels, neg_mask, _ = _switch_inputs()
    project = lambda x: x @ weight.T
    inputs = losses.LossInputs(pos, labels, plan_hidden=plan, neg_hidden=neg, neg_mask=neg_mask)
    adaptive = losses.latent_comm_loss_sums(inputs, project, losses.LossConfig(loss_chunk_size=5, fused_loss=False,
                                                                               loss_weighting="adaptive"))
    l_plan = adaptive.plan_similarity.item() / adaptive.plan_tokens.item()
    l_rand = adaptive.random_contrast.item() / adaptive.contrast_tokens.item()
    w_plan = 0.01 + 0.04 * min(max(l_plan / 4, 0), 1)
    w_rand = 0.01 + 0.49 * min(max(l_rand / 0.69, 0), 1)
    assert 0 < l_rand < 0.69 and 0 < l_plan < 4  # inside the clip: both weights move with their terms
    fixed = losses.latent_comm_loss_sums(inputs, project, losses.LossConfig(
        loss_chunk_size=5, plan_similarity_weight=w_plan, random_contrast_weight=w_rand))
    expected = adaptive.ce.item() + w_plan * adaptive.plan_similarity.item() + w_rand * adaptive.random_contrast.item()
    assert adaptive.total.item() == pytest.approx(expected, rel=1e-6)
    assert fixed.total.item() == pytest.approx(expected, rel=1e-6)
    # detached weights: the gradient is that of fixed weights of the same value
    assert torch.allclose(torch.autograd.grad(adaptive.total, pos)[0], torch.autograd.grad(fixed.total, pos)[0],
                          atol=1e-6)
    # clipped at the top: a contrast term above 0.69 a token gives w_rand = 0.5
    w_p, w_r = losses.adaptive_weights(torch.tensor(9.0), torch.tensor(1.2))
    assert (w_p.item(), w_r.item()) == (pytest.approx(0.05), pytest.approx(0.5))


def test_switches_of_the_autograd_path_are_refused_on_the_fused_path():
    from training.trainer import LossConfig

    for switch in (dict(contrast_divergence="published"), dict(loss_weighting="adaptive")):
        with pytest.raises(ValueError, match="--fused_loss false"):
            LossConfig(fused_loss=True, **switch).check_loss_path()
        LossConfig(fused_loss=False, **switch).check_loss_path()
    with pytest.raises(ValueError, match="expected one of js, published"):
        LossConfig(contrast_divergence="jsd")
