"""The actor's loss terms, as pure functions on tensors.

Every function works on distributions at *supervised positions*: row k of each branch's
logits is the distribution that predicts the k-th supervised label of the batch (the
causal shift is taken care of by the caller, see `latent_head.LatentActor.forward`).
Because all branches share the same conversation after the latent block, row k means
the same target token in the positive, plan and negative branches.

Per-token values are returned (or summed) so that a caller can normalise by the number of
supervised tokens of a whole optimizer step, which keeps gradient accumulation exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN2 = math.log(2.0)
CONTRAST_MARGIN = 0.69  # ~ln 2, the maximum of JS in nats
PLAN_KL_WEIGHT, PLAN_COS_WEIGHT = 0.7, 0.3


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats per row: `logits` [N, V], `labels` [N] -> [N]."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities [N, V] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def plan_similarity(pos_logits: torch.Tensor, plan_logits: torch.Tensor) -> torch.Tensor:
    """`0.7 * KL(P_plan || P_pos) + 0.3 * (1 - cos(P_pos, P_plan))` per row [N].

    The cosine is between the two probability vectors *of one position*, not over a
    flattened [tokens x vocab] matrix.
    """
    log_pos = F.log_softmax(pos_logits.float(), dim=-1)
    log_plan = F.log_softmax(plan_logits.float(), dim=-1)
    kl = kl_divergence(log_plan, log_pos)
    cos = F.cosine_similarity(log_pos.exp(), log_plan.exp(), dim=-1)
    return PLAN_KL_WEIGHT * kl + PLAN_COS_WEIGHT * (1.0 - cos)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats per row [N] (between 0 and ln 2)."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    # log of the mixture, computed stably in log space.
    log_m = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - LN2
    return 0.5 * (kl_divergence(log_a, log_m) + kl_divergence(log_b, log_m))


def random_contrast(js: torch.Tensor, margin: float = CONTRAST_MARGIN) -> torch.Tensor:
    """Hinge `max(0, margin - JS(P_pos, P_neg))` per row."""
    return (margin - js).clamp_min(0.0)


def published_divergence(p_mean: torch.Tensor, q_mean: torch.Tensor) -> torch.Tensor:
    """The published code's `js()`: `0.5 KL(M||P) + 0.5 KL(M||Q)`, M = (P+Q)/2, per row of probability
    vectors [B, V] (a sample's mean distributions). Not JS (argument order of `F.kl_div`), not bounded by
    ln 2: it grows without limit as P and Q separate."""
    tiny = torch.finfo(p_mean.dtype).tiny  # a mean probability that underflowed to 0 would give log 0
    m = (p_mean + q_mean) / 2
    log_m = m.clamp_min(tiny).log()
    kl_mp = (m * (log_m - p_mean.clamp_min(tiny).log())).sum(-1)
    kl_mq = (m * (log_m - q_mean.clamp_min(tiny).log())).sum(-1)
    return 0.5 * kl_mp + 0.5 * kl_mq


def adaptive_weights(plan_mean: torch.Tensor, contrast_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published code's loss-driven weights (detached): `w_plan = 0.01 + 0.04 clip(L_plan/4, 0, 1)`,
    `w_rand = 0.01 + 0.49 clip(L_rand/0.69, 0, 1)`, from the batch's mean plan and contrast terms."""
    w_plan = 0.01 + 0.04 * (plan_mean.detach() / 4.0).clamp(0.0, 1.0)
    w_rand = 0.01 + 0.49 * (contrast_mean.detach() / CONTRAST_MARGIN).clamp(0.0, 1.0)
    return w_plan, w_rand


@dataclass
class LossSums:
    """Sums over supervised tokens of every term; divide by a token count to get means.

    `total` = ce + plan_weight * plan_similarity + contrast_weight * random_contrast carries the
    gradient; in the fused path the components are detached (their gradient lives in `total`).
    """

    total: torch.Tensor
    ce: torch.Tensor
    plan_similarity: torch.Tensor
    random_contrast: torch.Tensor
    neg_ce: torch.Tensor
    js: torch.Tensor
    ce_on_contrast: torch.Tensor  # positive-branch CE on the rows that have a negative
    plan_tokens: torch.Tensor
    contrast_tokens: torch.Tensor


def _chunk_terms(pos_h, plan_h, neg_h, labels, plan_w, neg_w, project):
    """Loss sums of one chunk of supervised rows; logits exist only inside this call.

    The plan and negative distributions are targets: detached, as their branches run without
    gradient in the method (the shared LM head learns from the positive branch only).
    """
    pos_logits = project(pos_h)
    ce = token_ce(pos_logits, labels)
    plan_term = js = neg_ce = None
    if plan_h is not None:
        plan_term = plan_similarity(pos_logits, project(plan_h).detach())
    if neg_h is not None:
        neg_logits = project(neg_h).detach()
        js = js_divergence(pos_logits, neg_logits)
        neg_ce = token_ce(neg_logits, labels)
    return row_sums(ce, plan_term, plan_w, js, neg_ce, neg_w)


def row_sums(ce: torch.Tensor, plan_term: torch.Tensor | None, plan_w: torch.Tensor, js: torch.Tensor | None,
             neg_ce: torch.Tensor | None, neg_w: torch.Tensor) -> torch.Tensor:
    """A chunk's six sums [ce, plan_similarity, random_contrast, neg_ce, js, ce_on_contrast] from its
    per-row values [C] (`plan_term`/`js` None for an absent branch); only ce, plan and contrast keep a
    gradient, the rest are metrics."""
    zero = ce.new_zeros(())
    plan_sum = zero if plan_term is None else (plan_term * plan_w).sum()
    if js is None:
        return torch.stack([ce.sum(), plan_sum, zero, zero, zero, zero])
    return torch.stack([ce.sum(), plan_sum, (random_contrast(js) * neg_w).sum(), (neg_ce.detach() * neg_w).sum(),
                        (js.detach() * neg_w).sum(), (ce.detach() * neg_w).sum()])


def _row_weights(n: int, like: torch.Tensor, plan_hidden, plan_mask, neg_hidden, neg_mask):
    ones = like.new_ones(n, dtype=torch.float32)
    plan_w = ones if plan_mask is None else plan_mask.float()
    neg_w = ones if neg_mask is None else neg_mask.float()
    plan_tokens = plan_w.sum() if plan_hidden is not None else plan_w.new_zeros(())
    contrast_tokens = neg_w.sum() if neg_hidden is not None else neg_w.new_zeros(())
    return plan_w, neg_w, plan_tokens, contrast_tokens


def _weighted_total(sums: torch.Tensor, plan_weight: float, contrast_weight: float, weighting: str = "fixed",
                    plan_tokens: torch.Tensor | None = None, contrast_tokens: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The loss: ce + plan_weight * plan_similarity + contrast_weight * random_contrast (sums[0:3]).

    `weighting="adaptive"`: the weights are `adaptive_weights` of the terms' means over their tokens."""
    if weighting == "adaptive":
        plan_weight, contrast_weight = adaptive_weights(sums[1] / plan_tokens.clamp_min(1),
                                                        sums[2] / contrast_tokens.clamp_min(1))
    return sums[0] + plan_weight * sums[1] + contrast_weight * sums[2]


def _loss_sums(sums: torch.Tensor, total: torch.Tensor, plan_tokens, contrast_tokens) -> LossSums:
    return LossSums(total=total, ce=sums[0], plan_similarity=sums[1], random_contrast=sums[2], neg_ce=sums[3],
                    js=sums[4], ce_on_contrast=sums[5], plan_tokens=plan_tokens, contrast_tokens=contrast_tokens)


def latent_comm_loss_sums(
    pos_hidden: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    plan_hidden: torch.Tensor | None = None,
    plan_mask: torch.Tensor | None = None,
    neg_hidden: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    chunk_size: int | None = 2048,
    plan_weight: float = 1.0,
    contrast_weight: float = 2.0,
    contrast_divergence: str = "js",
    loss_weighting: str = "fixed",
    sample_index: torch.Tensor | None = None,
) -> LossSums:
    """Sum every loss term over the supervised rows, projecting to the vocabulary in chunks.

    The reference path, and the one for any `project` (e.g. an adapter-wrapped LM head).
    `*_hidden` are final hidden states [N, H] at the positions predicting `labels` [N]; the
    plan and negative branches are expected without gradient; `project` maps hidden states to
    logits (the LM head). `plan_mask`/`neg_mask` [N]
    say which rows have a plan / a negative. With `chunk_size`, each chunk's logits are
    recomputed in backward (activation checkpointing), so peak memory holds one chunk of
    [chunk, vocab] logits instead of all of them; `chunk_size=None` is the plain path.

    `contrast_divergence="published"`: the contrast term is, per sample (`sample_index` [N] says whose
    each row is), `max(0, 0.69 - published_divergence(mean P_pos, mean P_neg))` over its rows with a
    negative, counted once per such row (so it is normalised by tokens like every other term); the `js`
    sum stays the per-position JS, a metric comparable across settings. `loss_weighting="adaptive"`:
    see `_weighted_total`.
    """
    n = labels.shape[0]
    plan_w, neg_w, plan_tokens, contrast_tokens = _row_weights(n, pos_hidden, plan_hidden, plan_mask,
                                                               neg_hidden, neg_mask)
    sums = pos_hidden.new_zeros(6, dtype=torch.float32)
    step = n if not chunk_size else chunk_size
    for start in range(0, n, max(step, 1)):
        sl = slice(start, start + step)
        args = (pos_hidden[sl], None if plan_hidden is None else plan_hidden[sl],
                None if neg_hidden is None else neg_hidden[sl], labels[sl], plan_w[sl], neg_w[sl],
                project)
        if chunk_size and torch.is_grad_enabled():
            sums = sums + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_terms(*args)
    if contrast_divergence == "published" and neg_hidden is not None:
        contrast = _published_contrast_sum(pos_hidden, neg_hidden, neg_w, sample_index, project, step)
        sums = torch.cat([sums[:2], contrast[None], sums[3:]])
    elif contrast_divergence not in ("js", "published"):
        raise ValueError(f"contrast_divergence {contrast_divergence!r}: expected js or published")
    total = _weighted_total(sums, plan_weight, contrast_weight, loss_weighting, plan_tokens, contrast_tokens)
    return _loss_sums(sums, total, plan_tokens, contrast_tokens)


def _chunk_prob_sums(pos_h, neg_h, weights, sample_index, n_samples: int, project):
    """Per-sample sums of the positive's and the (detached) negative's probabilities over weighted rows:
    two [n_samples, V] tensors."""
    p = torch.softmax(project(pos_h).float(), dim=-1) * weights[:, None]
    r = torch.softmax(project(neg_h).detach().float(), dim=-1) * weights[:, None]
    zeros = p.new_zeros(n_samples, p.shape[-1])
    return zeros.index_add(0, sample_index, p), zeros.index_add(0, sample_index, r)


def _published_contrast_sum(pos_hidden, neg_hidden, neg_w, sample_index, project, step: int) -> torch.Tensor:
    """Sum over rows with a negative of their sample's `max(0, 0.69 - published_divergence(means))`."""
    if sample_index is None:
        raise ValueError("contrast_divergence='published' needs sample_index (each row's sample)")
    n_samples = int(sample_index.max()) + 1 if sample_index.numel() else 0
    p_sum = r_sum = None
    for start in range(0, sample_index.shape[0], max(step, 1)):
        sl = slice(start, start + step)
        args = (pos_hidden[sl], neg_hidden[sl], neg_w[sl], sample_index[sl], n_samples, project)
        p, r = (checkpoint(_chunk_prob_sums, *args, use_reentrant=False) if torch.is_grad_enabled()
                else _chunk_prob_sums(*args))
        p_sum, r_sum = (p, r) if p_sum is None else (p_sum + p, r_sum + r)
    if p_sum is None:
        return neg_w.new_zeros(())
    rows = torch.zeros(n_samples, device=neg_w.device).index_add(0, sample_index, neg_w.float())
    mean = lambda s: s / rows.clamp_min(1)[:, None]
    hinge = random_contrast(published_divergence(mean(p_sum), mean(r_sum)))
    return (hinge * rows).sum()


# -- the fused path: values and the gradient w.r.t. the positive logits in one pass ------------------
def chunk_values_and_grad(pos_logits: torch.Tensor, labels: torch.Tensor,
                          plan_logits: torch.Tensor | None, plan_w: torch.Tensor,
                          neg_logits: torch.Tensor | None, neg_w: torch.Tensor,
                          plan_weight: float, contrast_weight: float, need_grad: bool = True,
                          grad_dtype: torch.dtype = torch.float32):
    """The six sums of `_chunk_terms` and d(total)/d(pos_logits) [C, V] (as `grad_dtype`), from float32
    logits [C, V]. `loss_kernel.chunk_values_and_grad` is the same function as one Triton kernel.

    Closed forms per row, with p = softmax(pos), q = softmax(plan), r = softmax(neg), m = (p+r)/2:
      CE:                      d/dz = p - onehot(label)
      KL(q||p):                d/dz = p - q
      cos(p,q) = <p,q>/(|p||q|):  d/dz = p * (q - <p,q>/|p|^2 p) / (|p||q|)
      JS(p,r):                 d/dz = p * (g - <p,g>),  g = (log p - log m) / 2
    so no logits need to be kept or recomputed for the backward pass.
    """
    log_p = F.log_softmax(pos_logits, dim=-1)
    p = log_p.exp()
    ce = -log_p.gather(1, labels[:, None]).squeeze(-1)
    plan_term = js = neg_ce = None
    grad = None
    if need_grad:
        grad = p.clone()
        grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), -1.0))
    if plan_logits is not None:
        log_q = F.log_softmax(plan_logits, dim=-1)
        q = log_q.exp()
        kl = (q * (log_q - log_p)).sum(-1)
        s_pq, s_pp, s_qq = (p * q).sum(-1), (p * p).sum(-1), (q * q).sum(-1)
        norms = (s_pp * s_qq).sqrt().clamp_min(1e-8)
        plan_term = PLAN_KL_WEIGHT * kl + PLAN_COS_WEIGHT * (1.0 - s_pq / norms)
        if need_grad:
            d_cos = p * (q - (s_pq / s_pp)[:, None] * p) / norms[:, None]
            grad += (plan_weight * plan_w)[:, None] * (PLAN_KL_WEIGHT * (p - q) - PLAN_COS_WEIGHT * d_cos)
    if neg_logits is not None:
        log_r = F.log_softmax(neg_logits, dim=-1)
        log_m = torch.logaddexp(log_p, log_r) - LN2
        g = 0.5 * (log_p - log_m)  # dJS/dp
        kl_pm = (p * g).sum(-1)  # = KL(p||m) / 2
        js = kl_pm + 0.5 * (log_r.exp() * (log_r - log_m)).sum(-1)
        neg_ce = -log_r.gather(1, labels[:, None]).squeeze(-1)
        if need_grad:
            active = (CONTRAST_MARGIN - js >= 0).float() * neg_w  # the hinge's slope is -1 where not clamped
            grad -= (contrast_weight * active)[:, None] * p * (g - kl_pm[:, None])
    return row_sums(ce, plan_term, plan_w, js, neg_ce, neg_w), None if grad is None else grad.to(grad_dtype)


_MM_OUT_DTYPE: bool | None = None  # whether torch.mm takes `out_dtype` on this device (checked on first use)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` as float32 whatever the operands' dtype: bf16 operands accumulate in float32 and, where torch
    allows it (CUDA), are never rounded to bf16 on the way out."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return a @ b
    if _MM_OUT_DTYPE is None:
        try:
            torch.mm(a[:1, :1], b[:1, :1], out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE = False
    return torch.mm(a, b, out_dtype=torch.float32) if _MM_OUT_DTYPE else (a @ b).float()


class _FusedLoss(torch.autograd.Function):
    """Chunked vocabulary projection + every loss term, with gradients computed in the forward pass.

    Per chunk the positive, plan and negative logits exist once; the gradient w.r.t. the positive
    hidden states and the output weight is accumulated right away (as liger-kernel's fused linear
    losses do), so the backward pass only scales it: no checkpoint recompute, no saved logits.
    """

    @staticmethod
    def forward(ctx, pos_hidden, weight, labels, plan_hidden, plan_w, neg_hidden, neg_w,
                plan_weight, contrast_weight, chunk_size, chunk_fn, matmul_dtype):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.to(matmul_dtype)  # operands of the projections; logits and gradients stay float32
        n = labels.shape[0]
        sums = pos_hidden.new_zeros(6, dtype=torch.float32)
        grad_hidden = torch.zeros_like(pos_hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type=pos_hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                h = pos_hidden[sl].to(matmul_dtype)
                logits = lambda x: None if x is None else _mm_float32(x[sl].to(matmul_dtype), w.T)
                part, grad = chunk_fn(_mm_float32(h, w.T), labels[sl], logits(plan_hidden), plan_w[sl],
                                      logits(neg_hidden), neg_w[sl], plan_weight, contrast_weight, need_grad,
                                      grad_dtype=matmul_dtype)
                sums += part
                if grad_hidden is not None:
                    grad_hidden[sl] = _mm_float32(grad, w)
                if grad_weight is not None and matmul_dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)  # in place: no [V, H] temporary
                elif grad_weight is not None:
                    grad_weight += _mm_float32(grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (pos_hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(sums)
        return _weighted_total(sums, plan_weight, contrast_weight), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g, dtype: None if g is None else (g * grad_total).to(dtype)
        return (scale(grad_hidden, ctx.dtypes[0]), scale(grad_weight, ctx.dtypes[1]),
                None, None, None, None, None, None, None, None, None, None)


def fused_latent_comm_loss_sums(
    pos_hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    plan_hidden: torch.Tensor | None = None,
    plan_mask: torch.Tensor | None = None,
    neg_hidden: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    chunk_size: int | None = 1024,
    plan_weight: float = 1.0,
    contrast_weight: float = 2.0,
    chunk_fn: Callable = chunk_values_and_grad,
    matmul_dtype: torch.dtype = torch.float32,
) -> LossSums:
    """`latent_comm_loss_sums` for a bias-free linear LM head `weight` [V, H], in float32 (TF32 on GPUs).

    Same values; the gradient flows through `total` only. `chunk_fn` may be a compiled
    `chunk_values_and_grad` (one fused kernel per reduction instead of ~30 passes over the logits).
    `matmul_dtype` bfloat16: the vocabulary projections take bf16 operands (float32 accumulation, float32
    logits on CUDA), twice TF32's speed, with bf16 training's rounding in the loss terms.
    """
    n = labels.shape[0]
    plan_w, neg_w, plan_tokens, contrast_tokens = _row_weights(n, pos_hidden, plan_hidden, plan_mask,
                                                               neg_hidden, neg_mask)
    detach = lambda x: None if x is None else x.detach()
    total, sums = _FusedLoss.apply(pos_hidden, weight, labels, detach(plan_hidden), plan_w, detach(neg_hidden),
                                   neg_w, float(plan_weight), float(contrast_weight), max(chunk_size or n, 1),
                                   chunk_fn, matmul_dtype)
    return _loss_sums(sums, total, plan_tokens, contrast_tokens)


def infonce_from_scores(scores: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss and MI lower bound (nats) from scores [K, K], s[j, o] = -CE(j | latent o)."""
    k = scores.shape[0]
    loss = -(scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() / tau
    return loss, math.log(k) - loss


# -- the compression stage (train_sender.py): the sender learns to speak in K latents -----------------
COMPRESSION_KL_WEIGHT, COMPRESSION_ALIGN_WEIGHT = 0.1, 0.1
DISTILL_TEMPERATURE = 4.0
DISTILL_WINDOW = 64  # supervised tokens per sample that the distillation term looks at
UNCERTAINTY_QUANTILE = 0.95


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats per row: `logits` [N, V] -> [N]."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def first_rows_per_sample(sample_index: torch.Tensor, window: int) -> torch.Tensor:
    """[N] bool: the first `window` rows of each sample, for rows grouped by sample in batch order
    (as `LatentActor.branch` returns supervised positions)."""
    n = sample_index.shape[0]
    counts = torch.bincount(sample_index, minlength=int(sample_index.max()) + 1 if n else 0)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(n, device=sample_index.device) - starts[sample_index]
    return rank < window


def uncertainty_weights(entropy_none: torch.Tensor, entropy_data: torch.Tensor,
                        quantile: float = UNCERTAINTY_QUANTILE) -> torch.Tensor:
    """Per-token distillation weights [N], detached: `relu(H_none - H_data)`, how much the real latents
    lower the actor's entropy versus no message, clipped at the `quantile` of the positive values (as
    published) and normalised to mean 1. All zero when the latents lower no token's entropy."""
    w = (entropy_none - entropy_data).detach().float().clamp_min(0.0)
    # nanquantile over the positive values: no boolean indexing, so no wait for the device.
    cap = torch.nanquantile(torch.where(w > 0, w, torch.nan), quantile) if w.numel() else w.new_tensor(torch.nan)
    w = torch.where(torch.isnan(cap), w, torch.minimum(w, cap))
    return w / w.mean().clamp_min(1e-6) if w.numel() else w


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                    temperature: float = DISTILL_TEMPERATURE) -> torch.Tensor:
    """`T^2 * KL(P_teacher^T || P_student^T)` per row, averaged with `weights` [N] (0 for no rows):
    the softened teacher distribution is the target (detached)."""
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature ** 2
    return (weights * kl).sum() / (weights.sum() + 1e-6)


def alignment_loss(student_pooled: torch.Tensor, data_pooled: torch.Tensor) -> torch.Tensor:
    """`1 - cos` between each sample's mean-pooled student and data messages [B, H], averaged (0 for B = 0)."""
    if not student_pooled.shape[0]:
        return student_pooled.new_zeros(())
    cos = F.cosine_similarity(student_pooled.float(), data_pooled.detach().float(), dim=-1)
    return (1.0 - cos).mean()


def compression_loss(ce: torch.Tensor, distill: torch.Tensor, align: torch.Tensor,
                     kl_weight: float = COMPRESSION_KL_WEIGHT,
                     align_weight: float = COMPRESSION_ALIGN_WEIGHT) -> torch.Tensor:
    """The compression stage's total: `CE + kl_weight * distillation + align_weight * alignment`."""
    return ce + kl_weight * distill + align_weight * align
