"""The fused loss's per-chunk function as one Triton kernel (CUDA): `losses.chunk_values_and_grad`'s
values and gradient in three streaming passes over the float32 logits, instead of the ~10 that
`torch.compile` makes of it.

Per row (one program per row of the chunk), with p, q, r the positive, plan and negative softmaxes:
  pass 1: the log-normalisers of p, q, r (online softmax);
  pass 2: sum q (z_q - z_p) for KL(q||p), <p,q>, |p|^2, |q|^2 and the JS sums, with the final normalisers;
  pass 3: the gradient w.r.t. the positive logits, written once, in the projections' dtype.
The work is reading float32 logits: at a chunk of 1024 x 151,936, each pass over the three of them
moves ~1.9 GB. Values and gradients match the torch function to float32 rounding
(tests/test_losses.py runs this kernel in Triton's interpreter on the CPU).
"""
from __future__ import annotations

import torch

from common.loss_terms import CONTRAST_MARGIN, PLAN_COS_WEIGHT, PLAN_KL_WEIGHT, ChunkLogits, RowTerms

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: `available()` says no and the torch function is used
    triton = None


def available() -> bool:
    """Triton is importable (it ships with torch's CUDA builds on Linux)."""
    return triton is not None


if triton is not None:
    _LN2 = tl.constexpr(0.6931471805599453)
    _MASKED = tl.constexpr(-1e30)  # logit of the columns past the vocabulary: exp() is 0, differences are not NaN

    @triton.jit
    def _online_max_and_sum(m, s, z):
        """One block of an online softmax: the running maximum and sum of exp(z - maximum), rescaled."""
        new = tl.maximum(m, tl.max(z, 0))
        return new, s * tl.exp(m - new) + tl.sum(tl.exp(z - new), 0)

    @triton.jit
    def _log_mean(log_p, log_r):
        """log((p + r) / 2), stably."""
        high = tl.maximum(log_p, log_r)
        return high + tl.log(1.0 + tl.exp(tl.minimum(log_p, log_r) - high)) - _LN2

    @triton.jit
    def _chunk_kernel(pos_ptr, plan_ptr, neg_ptr, labels_ptr, plan_w_ptr, neg_w_ptr, grad_ptr, rows_out_ptr,
                      stride_pos, stride_plan, stride_neg, stride_grad, vocab,
                      plan_weight, contrast_weight, kl_weight, cos_weight, margin,
                      HAS_PLAN: tl.constexpr, HAS_NEG: tl.constexpr, NEED_GRAD: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pos_row = pos_ptr + row * stride_pos
        plan_row = plan_ptr + row * stride_plan
        neg_row = neg_ptr + row * stride_neg
        out = rows_out_ptr + row * 4  # ce, plan term, js, the negative's ce
        label = tl.load(labels_ptr + row).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        # Columns past the vocabulary load as _MASKED: their probability is 0 and their log-probability
        # differences are 0, so they add nothing to any sum below.

        # Pass 1: the log-normalisers (online softmax).
        m_p, s_p, m_q, s_q, m_r, s_r = float("-inf"), 0.0, float("-inf"), 0.0, float("-inf"), 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            valid = cols < vocab
            m_p, s_p = _online_max_and_sum(m_p, s_p, tl.load(pos_row + cols, mask=valid, other=_MASKED))
            if HAS_PLAN:
                m_q, s_q = _online_max_and_sum(m_q, s_q, tl.load(plan_row + cols, mask=valid, other=_MASKED))
            if HAS_NEG:
                m_r, s_r = _online_max_and_sum(m_r, s_r, tl.load(neg_row + cols, mask=valid, other=_MASKED))
        lse_p = m_p + tl.log(s_p)
        tl.store(out, lse_p - tl.load(pos_row + label))

        # Pass 2: the plan and JS sums, from the final log-normalisers.
        q_gap, s_pq, s_pp, s_qq, kl_pm, kl_rm = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        if HAS_PLAN:
            lse_q = m_q + tl.log(s_q)
        if HAS_NEG:
            lse_r = m_r + tl.log(s_r)
        if HAS_PLAN or HAS_NEG:
            for start in range(0, vocab, BLOCK):
                cols = start + offsets
                valid = cols < vocab
                z_p = tl.load(pos_row + cols, mask=valid, other=_MASKED)
                log_p = z_p - lse_p
                p = tl.exp(log_p)
                if HAS_PLAN:
                    z_q = tl.load(plan_row + cols, mask=valid, other=_MASKED)
                    q = tl.exp(z_q - lse_q)
                    q_gap += tl.sum(q * (z_q - z_p), 0)
                    s_pq += tl.sum(p * q, 0)
                    s_pp += tl.sum(p * p, 0)
                    s_qq += tl.sum(q * q, 0)
                if HAS_NEG:
                    log_r = tl.load(neg_row + cols, mask=valid, other=_MASKED) - lse_r
                    log_m = _log_mean(log_p, log_r)
                    kl_pm += tl.sum(p * (log_p - log_m), 0) * 0.5
                    kl_rm += tl.sum(tl.exp(log_r) * (log_r - log_m), 0) * 0.5
        if HAS_PLAN:  # 0.7 * KL(q||p) + 0.3 * (1 - cos(p, q))
            # KL(q||p) = sum q (z_q - z_p) - (lse_q - lse_p), the normalisers' gap as (m_q - m_p) + log(s_q / s_p):
            # when q is close to p, log-probabilities (~ -log(vocab)) would lose the small differences.
            kl = q_gap - (m_q - m_p) - tl.log(s_q / s_p)
            norms = tl.maximum(tl.sqrt(s_pp * s_qq), 1e-8)
            tl.store(out + 1, kl_weight * kl + cos_weight * (1.0 - s_pq / norms))
        js = kl_pm + kl_rm  # JS(p, r) = KL(p||m)/2 + KL(r||m)/2
        if HAS_NEG:
            tl.store(out + 2, js)
            tl.store(out + 3, lse_r - tl.load(neg_row + label))

        # Pass 3: d(total)/d(z_p), the closed forms of `losses.chunk_values_and_grad`.
        if NEED_GRAD:
            plan_coef = 0.0
            if HAS_PLAN:
                plan_coef = plan_weight * tl.load(plan_w_ptr + row)
            contrast_coef = 0.0
            if HAS_NEG:
                contrast_coef = tl.where(margin - js >= 0, contrast_weight * tl.load(neg_w_ptr + row), 0.0)
            grad_row = grad_ptr + row * stride_grad
            for start in range(0, vocab, BLOCK):
                cols = start + offsets
                valid = cols < vocab
                log_p = tl.load(pos_row + cols, mask=valid, other=_MASKED) - lse_p
                p = tl.exp(log_p)
                grad = p - tl.where(cols == label, 1.0, 0.0)
                if HAS_PLAN:
                    q = tl.exp(tl.load(plan_row + cols, mask=valid, other=_MASKED) - lse_q)
                    d_cos = p * (q - (s_pq / s_pp) * p) / norms
                    grad += plan_coef * (kl_weight * (p - q) - cos_weight * d_cos)
                if HAS_NEG:
                    log_r = tl.load(neg_row + cols, mask=valid, other=_MASKED) - lse_r
                    grad -= contrast_coef * p * (0.5 * (log_p - _log_mean(log_p, log_r)) - kl_pm)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def chunk_values_and_grad(chunk: ChunkLogits, plan_weight: float, contrast_weight: float, need_grad: bool = True,
                          grad_dtype: torch.dtype = torch.float32, block: int = 2048, num_warps: int = 8,
                          num_stages: int = 3):
    """`losses.chunk_values_and_grad` (same arguments and results) by `_chunk_kernel`. The defaults were
    the fastest on an H200 at 1024 x 151,936 (benchmarks/loss_kernel_check.py)."""
    rows, vocab = chunk.pos.shape
    # The kernel walks each row with unit stride; an absent branch passes the positive logits, never read.
    unit = lambda t: chunk.pos if t is None else (t if t.stride(1) == 1 else t.contiguous())  # noqa: E731
    pos, plan, neg = unit(chunk.pos), unit(chunk.plan), unit(chunk.neg)
    per_row = pos.new_zeros(rows, 4, dtype=torch.float32)  # ce, plan term, js, negative's ce
    grad = torch.empty(rows, vocab, dtype=grad_dtype, device=pos.device) if need_grad else None
    if rows:
        _chunk_kernel[(rows,)](
            pos, plan, neg, chunk.labels, chunk.plan_w, chunk.neg_w, per_row if grad is None else grad, per_row,
            pos.stride(0), plan.stride(0), neg.stride(0), vocab, vocab,
            float(plan_weight), float(contrast_weight), PLAN_KL_WEIGHT, PLAN_COS_WEIGHT, CONTRAST_MARGIN,
            HAS_PLAN=chunk.plan is not None, HAS_NEG=chunk.neg is not None, NEED_GRAD=need_grad,
            BLOCK=block, num_warps=num_warps, num_stages=num_stages)
    ce, plan_term, js, neg_ce = per_row.unbind(1)  # the kernel's output layout
    return RowTerms(ce, plan_term if chunk.plan is not None else None, js if chunk.neg is not None else None,
                    neg_ce if chunk.neg is not None else None), grad
