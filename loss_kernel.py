"""The fused loss's per-chunk function as one Triton kernel (CUDA): `losses.chunk_values_and_grad`'s
values and gradient in three streaming passes over the float32 logits, instead of the ~10 that
`torch.compile` makes of it.

Per row (one program per row of the chunk), with p, q, r the positive, plan and negative softmaxes:
  pass 1: log-normalisers of p, q, r (online softmax), and sum q*(z_q - z_p), <p,q>, |p|^2, |q|^2;
  pass 2: the JS sums, which need both final log-normalisers;
  pass 3: the gradient w.r.t. the positive logits, written once, in the projections' dtype.
The loss's float32 logits are memory-bound to read: at a chunk of 1024 x 151,936 each pass over
the three of them is ~1.9 GB. Values and gradients match the torch function to float32 rounding
(tests/test_losses.py runs this kernel in Triton's interpreter on the CPU).
"""
from __future__ import annotations

import torch

from losses import CONTRAST_MARGIN, PLAN_COS_WEIGHT, PLAN_KL_WEIGHT, row_sums

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
    def _chunk_kernel(pos_ptr, plan_ptr, neg_ptr, labels_ptr, plan_w_ptr, neg_w_ptr, grad_ptr, rows_out_ptr,
                      stride_pos, stride_plan, stride_neg, stride_grad, vocab,
                      plan_weight, contrast_weight, kl_weight, cos_weight, margin,
                      HAS_PLAN: tl.constexpr, HAS_NEG: tl.constexpr, NEED_GRAD: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pos_row = pos_ptr + row * stride_pos
        plan_row = plan_ptr + row * stride_plan
        neg_row = neg_ptr + row * stride_neg
        label = tl.load(labels_ptr + row).to(tl.int64)
        offsets = tl.arange(0, BLOCK)

        # Pass 1. Running maxima m_*, and sums relative to them, rescaled when a maximum grows.
        m_p, s_p = float("-inf"), 0.0
        m_q, s_q, a_q, c_pq, c_pp, c_qq = float("-inf"), 0.0, 0.0, 0.0, 0.0, 0.0
        m_r, s_r = float("-inf"), 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            valid = cols < vocab
            z_p = tl.load(pos_row + cols, mask=valid, other=_MASKED)
            new_p = tl.maximum(m_p, tl.max(z_p, 0))
            scale_p = tl.exp(m_p - new_p)
            e_p = tl.exp(z_p - new_p)
            s_p = s_p * scale_p + tl.sum(e_p, 0)
            m_p = new_p
            if HAS_PLAN:
                z_q = tl.load(plan_row + cols, mask=valid, other=_MASKED)
                new_q = tl.maximum(m_q, tl.max(z_q, 0))
                scale_q = tl.exp(m_q - new_q)
                e_q = tl.exp(z_q - new_q)
                s_q = s_q * scale_q + tl.sum(e_q, 0)
                a_q = a_q * scale_q + tl.sum(e_q * (z_q - z_p), 0)
                c_pq = c_pq * scale_p * scale_q + tl.sum(e_p * e_q, 0)
                c_pp = c_pp * scale_p * scale_p + tl.sum(e_p * e_p, 0)
                c_qq = c_qq * scale_q * scale_q + tl.sum(e_q * e_q, 0)
                m_q = new_q
            if HAS_NEG:
                z_r = tl.load(neg_row + cols, mask=valid, other=_MASKED)
                new_r = tl.maximum(m_r, tl.max(z_r, 0))
                s_r = s_r * tl.exp(m_r - new_r) + tl.sum(tl.exp(z_r - new_r), 0)
                m_r = new_r
        lse_p = m_p + tl.log(s_p)
        tl.store(rows_out_ptr + row * 4, lse_p - tl.load(pos_row + label))  # CE

        # Plan similarity: 0.7 * KL(q||p) + 0.3 * (1 - cos(p, q)).
        s_pq, s_pp, norms = 0.0, 1.0, 1.0
        if HAS_PLAN:
            lse_q = m_q + tl.log(s_q)
            kl = a_q / s_q - lse_q + lse_p
            s_pq = c_pq / (s_p * s_q)
            s_pp = c_pp / (s_p * s_p)
            norms = tl.maximum(tl.sqrt(s_pp * (c_qq / (s_q * s_q))), 1e-8)
            tl.store(rows_out_ptr + row * 4 + 1, kl_weight * kl + cos_weight * (1.0 - s_pq / norms))

        # Pass 2: JS(p, r) = sum p*g + sum r*(log r - log m)/2, g = (log p - log m)/2, m = (p + r)/2.
        kl_pm, js = 0.0, 0.0
        if HAS_NEG:
            lse_r = m_r + tl.log(s_r)
            tl.store(rows_out_ptr + row * 4 + 3, lse_r - tl.load(neg_row + label))  # the negative's CE
            kl_rm = 0.0
            for start in range(0, vocab, BLOCK):
                cols = start + offsets
                valid = cols < vocab
                log_p = tl.load(pos_row + cols, mask=valid, other=0.0) - lse_p
                log_r = tl.load(neg_row + cols, mask=valid, other=0.0) - lse_r
                high = tl.maximum(log_p, log_r)
                log_m = high + tl.log(1.0 + tl.exp(tl.minimum(log_p, log_r) - high)) - _LN2
                kl_pm += tl.sum(tl.where(valid, tl.exp(log_p) * (log_p - log_m), 0.0), 0) * 0.5
                kl_rm += tl.sum(tl.where(valid, tl.exp(log_r) * (log_r - log_m), 0.0), 0) * 0.5
            js = kl_pm + kl_rm
            tl.store(rows_out_ptr + row * 4 + 2, js)

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
                log_p = tl.load(pos_row + cols, mask=valid, other=0.0) - lse_p
                p = tl.exp(log_p)
                grad = p - tl.where(cols == label, 1.0, 0.0)
                if HAS_PLAN:
                    q = tl.exp(tl.load(plan_row + cols, mask=valid, other=0.0) - lse_q)
                    d_cos = p * (q - (s_pq / s_pp) * p) / norms
                    grad += plan_coef * (kl_weight * (p - q) - cos_weight * d_cos)
                if HAS_NEG:
                    log_r = tl.load(neg_row + cols, mask=valid, other=0.0) - lse_r
                    high = tl.maximum(log_p, log_r)
                    log_m = high + tl.log(1.0 + tl.exp(tl.minimum(log_p, log_r) - high)) - _LN2
                    grad -= contrast_coef * p * (0.5 * (log_p - log_m) - kl_pm)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def chunk_values_and_grad(pos_logits: torch.Tensor, labels: torch.Tensor,
                          plan_logits: torch.Tensor | None, plan_w: torch.Tensor,
                          neg_logits: torch.Tensor | None, neg_w: torch.Tensor,
                          plan_weight: float, contrast_weight: float, need_grad: bool = True,
                          grad_dtype: torch.dtype = torch.float32, block: int = 2048, num_warps: int = 8,
                          num_stages: int = 3):
    """`losses.chunk_values_and_grad` (same arguments and results) by `_chunk_kernel`. The defaults were
    the fastest on an H200 at 1024 x 151,936 (benchmarks/loss_kernel_check.py)."""
    rows, vocab = pos_logits.shape
    per_row = pos_logits.new_zeros(rows, 4, dtype=torch.float32)  # ce, plan term, js, negative's ce
    grad = torch.empty(rows, vocab, dtype=grad_dtype, device=pos_logits.device) if need_grad else None
    stride = lambda t: pos_logits.stride(0) if t is None else t.stride(0)
    if rows:
        _chunk_kernel[(rows,)](
            pos_logits, pos_logits if plan_logits is None else plan_logits,
            pos_logits if neg_logits is None else neg_logits, labels, plan_w, neg_w,
            per_row if grad is None else grad, per_row,
            pos_logits.stride(0), stride(plan_logits), stride(neg_logits), vocab if grad is None else grad.stride(0),
            vocab, float(plan_weight), float(contrast_weight), PLAN_KL_WEIGHT, PLAN_COS_WEIGHT, CONTRAST_MARGIN,
            HAS_PLAN=plan_logits is not None, HAS_NEG=neg_logits is not None, NEED_GRAD=need_grad,
            BLOCK=block, num_warps=num_warps, num_stages=num_stages)
    ce, plan_term, js, neg_ce = per_row.unbind(1)
    return row_sums(ce, plan_term if plan_logits is not None else None, plan_w,
                    js if neg_logits is not None else None, neg_ce, neg_w), grad
