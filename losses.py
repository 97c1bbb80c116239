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
import os
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LN2 = math.log(2.0)
CONTRAST_MARGIN = 0.69  # ~ln 2, the maximum of JS in nats
PLAN_KL_WEIGHT, PLAN_COS_WEIGHT = 0.7, 0.3
LOSS_CHUNK_SIZE = 1024  # supervised rows projected to the vocabulary at a time: bounds [rows, vocab] logits


@dataclass
class LossConfig:
    """The three-branch loss's settings; every default here is the command line's (train_actor.py reads them)."""

    plan_similarity_weight: float = 1.0
    random_contrast_weight: float = 2.0
    mix_ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    pure_latent_prob: float = 0.5  # share of training samples that see pure latents (ratio 1)
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE
    fused_loss: bool = True  # closed-form gradients per chunk (bias-free linear LM heads); else autograd
    loss_kernel: str = "auto"  # the fused chunk: "triton", "compile", "eager"; auto: see `resolve_loss_kernel`
    loss_matmul_dtype: str = "auto"  # projections' operands: "auto" = bfloat16 under bf16 on CUDA, else float32
    # The negative branch: "published" = the donor's latents in the positive's latent rows, then the sample's
    # own plan suffix (only the latent part differs from the positive); "latents_only" = the donor's latents
    # alone (this project's earlier form, kept for ablation: in mixed samples it differs in the text too).
    negative_form: str = "published"
    contrast_divergence: str = "js"  # "js": per-position Jensen-Shannon; "published": 0.5 KL(M||P)+0.5 KL(M||Q) of means
    loss_weighting: str = "fixed"  # "fixed": the weights above; "adaptive": the published code's loss-driven weights

    def __post_init__(self):
        for name, allowed in (("negative_form", ("published", "latents_only")),
                              ("contrast_divergence", ("js", "published")), ("loss_weighting", ("fixed", "adaptive"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    def check_loss_path(self) -> None:
        """The fused loss computes each chunk's gradient in one pass with fixed weights, per position: the
        published divergence (of per-sample means) and adaptive weights (of the whole batch's values) need
        the autograd path."""
        if self.fused_loss and (self.contrast_divergence != "js" or self.loss_weighting != "fixed"):
            raise ValueError(f"--contrast_divergence {self.contrast_divergence} / --loss_weighting "
                             f"{self.loss_weighting} run on the autograd loss only: add --fused_loss false")

    def resolved(self, device_type: str, bf16: bool) -> "LossConfig":
        """This configuration with its "auto" values decided for training on `device_type` (in bf16 or not)."""
        dtype = self.loss_matmul_dtype
        if dtype == "auto":  # the training precision's: the projections are a quarter of a large step in TF32
            dtype = "bfloat16" if device_type == "cuda" and bf16 else "float32"
        elif dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--loss_matmul_dtype {dtype!r}: expected auto, float32 or bfloat16")
        return replace(self, loss_kernel=resolve_loss_kernel(self.loss_kernel, device_type), loss_matmul_dtype=dtype)


def resolve_loss_kernel(choice: str, device_type: str) -> str:
    """`--loss_kernel` on a device. On CUDA the chunk's ~30 elementwise passes over [chunk, vocab] float32
    logits are memory-bound: the Triton kernel makes them 3 passes, torch.compile about 10; so `auto` is
    triton on CUDA where triton is installed, else compile on CUDA, else eager."""
    from training import loss_kernel

    if choice == "auto":
        return ("triton" if loss_kernel.available() else "compile") if device_type == "cuda" else "eager"
    if choice == "triton":
        if not loss_kernel.available():
            raise ValueError("--loss_kernel triton: triton is not installed (it comes with torch's CUDA builds); "
                             "use --loss_kernel compile or eager")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"--loss_kernel triton needs a CUDA device (training runs on {device_type}); "
                             "use --loss_kernel compile or eager")
    elif choice not in ("compile", "eager"):
        raise ValueError(f"--loss_kernel {choice!r}: expected auto, triton, compile or eager")
    return choice


_COMPILED_CHUNK_FN = None  # torch.compile of `chunk_values_and_grad`, built on first use


def chunk_function(kernel: str) -> Callable:
    """The fused loss's per-chunk function for a resolved `--loss_kernel` (triton, compile or eager)."""
    global _COMPILED_CHUNK_FN
    if kernel == "triton":
        from training import loss_kernel

        return loss_kernel.chunk_values_and_grad
    if kernel == "eager":
        return chunk_values_and_grad
    if kernel != "compile":
        raise ValueError(f"loss kernel {kernel!r}: resolve it first (LossConfig.resolved)")
    if _COMPILED_CHUNK_FN is None:
        _COMPILED_CHUNK_FN = torch.compile(chunk_values_and_grad, dynamic=True)
    return _COMPILED_CHUNK_FN


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
    """Sums over supervised tokens of every term, and the token counts to divide them by.

    `total` = ce + plan_weight * plan_similarity + contrast_weight * random_contrast carries the
    gradient (in the fused path only it: the components are detached). The other fields are metrics;
    `metrics()`/`from_metrics` turn them into one vector (in field order) and back, for one all-reduce.
    """

    ce: torch.Tensor
    plan_similarity: torch.Tensor
    random_contrast: torch.Tensor
    neg_ce: torch.Tensor  # the negative branch's CE, on rows that have a negative
    js: torch.Tensor
    tokens: torch.Tensor  # supervised tokens
    plan_tokens: torch.Tensor  # ... with a plan
    contrast_tokens: torch.Tensor  # ... with a negative
    ce_on_contrast: torch.Tensor  # positive-branch CE on the rows that have a negative
    total: torch.Tensor | None = None

    @classmethod
    def zeros(cls, like: torch.Tensor) -> "LossSums":
        zero = like.new_zeros((), dtype=torch.float32)
        return cls(*[zero] * len(METRIC_FIELDS))

    def __add__(self, other: "LossSums") -> "LossSums":
        return LossSums(*[getattr(self, f) + getattr(other, f) for f in METRIC_FIELDS])

    def metrics(self) -> torch.Tensor:
        """The metric fields, detached, as one float32 vector in field order."""
        return torch.stack([getattr(self, f).detach().float() for f in METRIC_FIELDS])

    @classmethod
    def from_metrics(cls, vector: torch.Tensor, total: torch.Tensor | None = None) -> "LossSums":
        return cls(*vector.unbind(0), total=total)


METRIC_FIELDS = tuple(f.name for f in fields(LossSums) if f.name != "total")


class RowTerms(NamedTuple):
    """A chunk's per-row loss values [C]; a term of an absent branch is None."""

    ce: torch.Tensor
    plan: torch.Tensor | None  # 0.7 KL(plan || pos) + 0.3 (1 - cos)
    js: torch.Tensor | None  # JS(pos, neg), nats
    neg_ce: torch.Tensor | None


def sum_rows(terms: RowTerms, plan_w: torch.Tensor, neg_w: torch.Tensor) -> LossSums:
    """A chunk's `LossSums` from its per-row values and row weights (which rows have a plan / a negative);
    only ce, plan_similarity and random_contrast keep a gradient, the rest are metrics."""
    ce = terms.ce
    zero = ce.new_zeros((), dtype=torch.float32)
    has_plan, has_neg = terms.plan is not None, terms.js is not None
    return LossSums(
        ce=ce.sum(), plan_similarity=(terms.plan * plan_w).sum() if has_plan else zero,
        random_contrast=(random_contrast(terms.js) * neg_w).sum() if has_neg else zero,
        neg_ce=(terms.neg_ce.detach() * neg_w).sum() if has_neg else zero,
        js=(terms.js.detach() * neg_w).sum() if has_neg else zero,
        tokens=ce.new_tensor(float(ce.shape[0]), dtype=torch.float32),
        plan_tokens=plan_w.float().sum() if has_plan else zero,
        contrast_tokens=neg_w.float().sum() if has_neg else zero,
        ce_on_contrast=(ce.detach() * neg_w).sum() if has_neg else zero)


def _chunk_terms(pos_h, plan_h, neg_h, labels, plan_w, neg_w, project) -> LossSums:
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
    return sum_rows(RowTerms(ce, plan_term, js, neg_ce), plan_w, neg_w)


def _row_weights(n: int, like: torch.Tensor, plan_mask, neg_mask):
    """Per-row weights [N] of the plan and contrast terms: the masks as floats (all ones without a mask)."""
    ones = like.new_ones(n, dtype=torch.float32)
    return (ones if plan_mask is None else plan_mask.float()), (ones if neg_mask is None else neg_mask.float())


def _weighted_total(sums: LossSums, plan_weight: float, contrast_weight: float, weighting: str = "fixed"
                    ) -> torch.Tensor:
    """The loss: ce + plan_weight * plan_similarity + contrast_weight * random_contrast.

    `weighting="adaptive"`: the weights are `adaptive_weights` of the terms' means over their tokens."""
    if weighting == "adaptive":
        plan_weight, contrast_weight = adaptive_weights(sums.plan_similarity / sums.plan_tokens.clamp_min(1),
                                                        sums.random_contrast / sums.contrast_tokens.clamp_min(1))
    return sums.ce + plan_weight * sums.plan_similarity + contrast_weight * sums.random_contrast


def latent_comm_losses(pos_hidden: torch.Tensor, labels: torch.Tensor, lm_head_weight: torch.Tensor | None,
                       project: Callable[[torch.Tensor], torch.Tensor], plan_hidden: torch.Tensor | None,
                       plan_mask: torch.Tensor | None, neg_hidden: torch.Tensor | None, neg_mask: torch.Tensor | None,
                       sample_index: torch.Tensor, config: LossConfig) -> LossSums:
    """The three-branch loss of a `config` (its "auto" values resolved): the fused path where the LM head is a
    bias-free linear map (`lm_head_weight`), else autograd through `project` (the reference path)."""
    weights = dict(chunk_size=config.loss_chunk_size, plan_weight=config.plan_similarity_weight,
                   contrast_weight=config.random_contrast_weight)
    if config.fused_loss and lm_head_weight is not None:
        config.check_loss_path()
        return fused_latent_comm_loss_sums(pos_hidden, labels, lm_head_weight, plan_hidden, plan_mask, neg_hidden,
                                           neg_mask, chunk_fn=chunk_function(config.loss_kernel),
                                           matmul_dtype=getattr(torch, config.loss_matmul_dtype), **weights)
    return latent_comm_loss_sums(pos_hidden, labels, project, plan_hidden, plan_mask, neg_hidden, neg_mask,
                                 contrast_divergence=config.contrast_divergence,
                                 loss_weighting=config.loss_weighting, sample_index=sample_index, **weights)


def latent_comm_loss_sums(
    pos_hidden: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    plan_hidden: torch.Tensor | None = None,
    plan_mask: torch.Tensor | None = None,
    neg_hidden: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    chunk_size: int | None = LOSS_CHUNK_SIZE,
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
    if contrast_divergence not in ("js", "published"):  # before any work
        raise ValueError(f"contrast_divergence {contrast_divergence!r}: expected js or published")
    n = labels.shape[0]
    plan_w, neg_w = _row_weights(n, pos_hidden, plan_mask, neg_mask)
    sums = LossSums.zeros(pos_hidden)
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
        sums.random_contrast = _published_contrast_sum(pos_hidden, neg_hidden, neg_w, sample_index, project, step)
    sums.total = _weighted_total(sums, plan_weight, contrast_weight, loss_weighting)
    return sums


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
    """The per-row terms of `_chunk_terms` (`RowTerms`) and d(total)/d(pos_logits) [C, V] (as `grad_dtype`),
    from float32 logits [C, V]. `loss_kernel.chunk_values_and_grad` is the same function as one Triton kernel.

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
    return RowTerms(ce, plan_term, js, neg_ce), None if grad is None else grad.to(grad_dtype)


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
        metrics = pos_hidden.new_zeros(len(METRIC_FIELDS), dtype=torch.float32)  # one vector: one add per chunk
        grad_hidden = torch.zeros_like(pos_hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type=pos_hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, start + chunk_size)
                h = pos_hidden[sl].to(matmul_dtype)
                logits = lambda x: None if x is None else _mm_float32(x[sl].to(matmul_dtype), w.T)
                terms, grad = chunk_fn(_mm_float32(h, w.T), labels[sl], logits(plan_hidden), plan_w[sl],
                                       logits(neg_hidden), neg_w[sl], plan_weight, contrast_weight, need_grad,
                                       grad_dtype=matmul_dtype)
                metrics += sum_rows(terms, plan_w[sl], neg_w[sl]).metrics()
                if grad_hidden is not None:
                    grad_hidden[sl] = _mm_float32(grad, w)
                if grad_weight is not None and matmul_dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)  # in place: no [V, H] temporary
                elif grad_weight is not None:
                    grad_weight += _mm_float32(grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (pos_hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(metrics)
        return _weighted_total(LossSums.from_metrics(metrics), plan_weight, contrast_weight), metrics

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
    chunk_size: int | None = LOSS_CHUNK_SIZE,
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
    plan_w, neg_w = _row_weights(n, pos_hidden, plan_mask, neg_mask)
    detach = lambda x: None if x is None else x.detach()
    total, metrics = _FusedLoss.apply(pos_hidden, weight, labels, detach(plan_hidden), plan_w, detach(neg_hidden),
                                   neg_w, float(plan_weight), float(contrast_weight), max(chunk_size or n, 1),
                                   chunk_fn, matmul_dtype)
    return LossSums.from_metrics(metrics, total=total)


def infonce_from_scores(scores: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss and MI lower bound (nats) from scores [K, K], s[j, o] = -CE(j | latent o)."""
    k = scores.shape[0]
    loss = -(scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() / tau
    return loss, math.log(k) - loss


# -- the compression stage (sender/train.py): the sender learns to speak in K latents -----------------
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
