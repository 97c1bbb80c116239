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

from common.args import LossArguments, parse_mix_ratios
from common.constants import (COMPRESSION_ALIGN_WEIGHT, COMPRESSION_KL_WEIGHT, DISTILL_TEMPERATURE,  # noqa: F401
                              DISTILL_WINDOW, LOSS_CHUNK_SIZE, UNCERTAINTY_QUANTILE)
# The constants and row tuples that the Triton kernel shares (re-exported here: the loss's names live in losses)
from common.loss_terms import CONTRAST_MARGIN, LN2, PLAN_COS_WEIGHT, PLAN_KL_WEIGHT, ChunkLogits, RowTerms  # noqa: F401


@dataclass
class LossConfig(LossArguments):
    """The three-branch loss's settings: the command line's loss flags (their names, defaults, checks and help
    are `common.args.LossArguments`, defined once there), with `mix_ratios` as numbers and a `loss_chunk_size`
    of 0 as None (no chunking)."""

    def __post_init__(self):
        super().__post_init__()  # the values' checks
        if isinstance(self.mix_ratios, str):
            self.mix_ratios = parse_mix_ratios(self.mix_ratios)
        self.mix_ratios = tuple(self.mix_ratios)
        self.loss_chunk_size = self.loss_chunk_size or None

    @classmethod
    def from_arguments(cls, args: LossArguments) -> "LossConfig":
        """The loss settings of parsed arguments (any object with `LossArguments`' fields)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(LossArguments)})

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


@dataclass
class LossInputs:
    """What a training step hands the loss: the supervised rows of its three branches, by name.

    Row k of every tensor is the k-th supervised target token of the batch, the same token in every branch
    (all branches share the conversation after the latent block). The plan and negative branches are
    targets, run without gradient; a branch that is None has no term. A mask says which rows' samples have
    that branch (None: all of them)."""

    pos_hidden: torch.Tensor  # [N, H] the positive branch's final hidden states (the gradient flows here)
    labels: torch.Tensor  # [N] the target tokens
    sample_index: torch.Tensor | None = None  # [N] the batch row of each (the published divergence needs it)
    plan_hidden: torch.Tensor | None = None  # [N, H] the plan branch's
    plan_mask: torch.Tensor | None = None  # [N] bool: rows whose sample has a plan
    neg_hidden: torch.Tensor | None = None  # [N, H] the negative branch's
    neg_mask: torch.Tensor | None = None  # [N] bool: rows whose sample has a negative

    def __len__(self) -> int:
        return self.labels.shape[0]

    def rows(self, sl: slice) -> "LossInputs":
        """These inputs restricted to a slice of rows (a chunk)."""
        cut = lambda t: None if t is None else t[sl]  # noqa: E731
        return LossInputs(*[cut(getattr(self, f.name)) for f in fields(self)])

    def row_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row weights [N] of the plan and contrast terms: the masks as floats (all ones without a mask)."""
        ones = self.pos_hidden.new_ones(len(self), dtype=torch.float32)
        as_weight = lambda mask: ones if mask is None else mask.float()  # noqa: E731
        return as_weight(self.plan_mask), as_weight(self.neg_mask)

    def detached_targets(self) -> "LossInputs":
        """The plan and negative rows detached (targets: the method runs their branches without gradient)."""
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, plan_hidden=detach(self.plan_hidden), neg_hidden=detach(self.neg_hidden))


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
        # a fill on the device: a tensor made from a Python number is copied there, and that copy waits for it
        tokens=torch.full((), float(ce.shape[0]), dtype=torch.float32, device=ce.device),
        plan_tokens=plan_w.float().sum() if has_plan else zero,
        contrast_tokens=neg_w.float().sum() if has_neg else zero,
        ce_on_contrast=(ce.detach() * neg_w).sum() if has_neg else zero)


def _chunk_terms(chunk: LossInputs, plan_w: torch.Tensor, neg_w: torch.Tensor,
                 project: Callable[[torch.Tensor], torch.Tensor]) -> LossSums:
    """Loss sums of one chunk of supervised rows; logits exist only inside this call.

    The plan and negative distributions are targets: detached, as their branches run without
    gradient in the method (the shared LM head learns from the positive branch only).
    """
    pos_logits = project(chunk.pos_hidden)
    ce = token_ce(pos_logits, chunk.labels)
    plan_term = js = neg_ce = None
    if chunk.plan_hidden is not None:
        plan_term = plan_similarity(pos_logits, project(chunk.plan_hidden).detach())
    if chunk.neg_hidden is not None:
        neg_logits = project(chunk.neg_hidden).detach()
        js = js_divergence(pos_logits, neg_logits)
        neg_ce = token_ce(neg_logits, chunk.labels)
    return sum_rows(RowTerms(ce, plan_term, js, neg_ce), plan_w, neg_w)


def _weighted_total(sums: LossSums, plan_weight: float, contrast_weight: float, weighting: str = "fixed"
                    ) -> torch.Tensor:
    """The loss: ce + plan_weight * plan_similarity + contrast_weight * random_contrast.

    `weighting="adaptive"`: the weights are `adaptive_weights` of the terms' means over their tokens."""
    if weighting == "adaptive":
        plan_weight, contrast_weight = adaptive_weights(sums.plan_similarity / sums.plan_tokens.clamp_min(1),
                                                        sums.random_contrast / sums.contrast_tokens.clamp_min(1))
    return sums.ce + plan_weight * sums.plan_similarity + contrast_weight * sums.random_contrast


def latent_comm_losses(inputs: LossInputs, config: LossConfig, project: Callable[[torch.Tensor], torch.Tensor],
                       lm_head_weight: torch.Tensor | None = None) -> LossSums:
    """The three-branch loss of a `config` (its "auto" values resolved): the fused path where the LM head is a
    bias-free linear map (`lm_head_weight`), else autograd through `project` (the reference path)."""
    if config.fused_loss and lm_head_weight is not None:
        config.check_loss_path()
        return fused_latent_comm_loss_sums(inputs, lm_head_weight, config)
    return latent_comm_loss_sums(inputs, project, config)


def latent_comm_loss_sums(inputs: LossInputs, project: Callable[[torch.Tensor], torch.Tensor],
                          config: LossConfig | None = None) -> LossSums:
    """Sum every loss term over the supervised rows, projecting to the vocabulary in chunks.

    The reference path, and the one for any `project` (e.g. an adapter-wrapped LM head): `project` maps
    hidden states to logits (the LM head). From `config` (default `LossConfig()`): the weights of the terms;
    `loss_chunk_size`, with which each chunk's logits are recomputed in backward (activation checkpointing),
    so peak memory holds one chunk of [chunk, vocab] logits instead of all of them (None: one chunk);
    `contrast_divergence="published"`: the contrast term is, per sample (`inputs.sample_index` says whose
    each row is), `max(0, 0.69 - published_divergence(mean P_pos, mean P_neg))` over its rows with a
    negative, counted once per such row (so it is normalised by tokens like every other term); the `js`
    sum stays the per-position JS, a metric comparable across settings. `loss_weighting="adaptive"`:
    see `_weighted_total`.
    """
    config = config or LossConfig()
    n = len(inputs)
    plan_w, neg_w = inputs.row_weights()
    sums = LossSums.zeros(inputs.pos_hidden)
    step = max(config.loss_chunk_size or n, 1)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        args = (inputs.rows(sl), plan_w[sl], neg_w[sl], project)
        if config.loss_chunk_size and torch.is_grad_enabled():
            sums = sums + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_terms(*args)
    if config.contrast_divergence == "published" and inputs.neg_hidden is not None:
        sums.random_contrast = _published_contrast_sum(inputs, neg_w, project, step)
    sums.total = _weighted_total(sums, config.plan_similarity_weight, config.random_contrast_weight,
                                 config.loss_weighting)
    return sums


def _chunk_prob_sums(chunk: LossInputs, weights: torch.Tensor, n_samples: int, project):
    """Per-sample sums of the positive's and the (detached) negative's probabilities over weighted rows:
    two [n_samples, V] tensors."""
    p = torch.softmax(project(chunk.pos_hidden).float(), dim=-1) * weights[:, None]
    r = torch.softmax(project(chunk.neg_hidden).detach().float(), dim=-1) * weights[:, None]
    zeros = p.new_zeros(n_samples, p.shape[-1])
    return zeros.index_add(0, chunk.sample_index, p), zeros.index_add(0, chunk.sample_index, r)


def _published_contrast_sum(inputs: LossInputs, neg_w: torch.Tensor, project, step: int) -> torch.Tensor:
    """Sum over rows with a negative of their sample's `max(0, 0.69 - published_divergence(means))`."""
    sample_index = inputs.sample_index
    if sample_index is None:
        raise ValueError("contrast_divergence='published' needs sample_index (each row's sample)")
    n_samples = int(sample_index.max()) + 1 if sample_index.numel() else 0
    p_sum = r_sum = None
    for start in range(0, sample_index.shape[0], max(step, 1)):
        sl = slice(start, start + step)
        args = (inputs.rows(sl), neg_w[sl], n_samples, project)
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
def chunk_values_and_grad(chunk: ChunkLogits, plan_weight: float, contrast_weight: float, need_grad: bool = True,
                          grad_dtype: torch.dtype = torch.float32):
    """The per-row terms of `_chunk_terms` (`RowTerms`) and d(total)/d(chunk.pos) [C, V] (as `grad_dtype`),
    from float32 logits (`ChunkLogits`). `loss_kernel.chunk_values_and_grad` is the same function as one
    Triton kernel.

    Closed forms per row, with p = softmax(pos), q = softmax(plan), r = softmax(neg), m = (p+r)/2:
      CE:                      d/dz = p - onehot(label)
      KL(q||p):                d/dz = p - q
      cos(p,q) = <p,q>/(|p||q|):  d/dz = p * (q - <p,q>/|p|^2 p) / (|p||q|)
      JS(p,r):                 d/dz = p * (g - <p,g>),  g = (log p - log m) / 2
    so no logits need to be kept or recomputed for the backward pass.
    """
    labels = chunk.labels
    log_p = F.log_softmax(chunk.pos, dim=-1)
    p = log_p.exp()
    ce = -log_p.gather(1, labels[:, None]).squeeze(-1)
    plan_term = js = neg_ce = None
    grad = None
    if need_grad:
        grad = p.clone()
        grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), -1.0))
    if chunk.plan is not None:
        log_q = F.log_softmax(chunk.plan, dim=-1)
        q = log_q.exp()
        kl = (q * (log_q - log_p)).sum(-1)
        s_pq, s_pp, s_qq = (p * q).sum(-1), (p * p).sum(-1), (q * q).sum(-1)
        norms = (s_pp * s_qq).sqrt().clamp_min(1e-8)
        plan_term = PLAN_KL_WEIGHT * kl + PLAN_COS_WEIGHT * (1.0 - s_pq / norms)
        if need_grad:
            d_cos = p * (q - (s_pq / s_pp)[:, None] * p) / norms[:, None]
            grad += (plan_weight * chunk.plan_w)[:, None] * (PLAN_KL_WEIGHT * (p - q) - PLAN_COS_WEIGHT * d_cos)
    if chunk.neg is not None:
        log_r = F.log_softmax(chunk.neg, dim=-1)
        log_m = torch.logaddexp(log_p, log_r) - LN2
        g = 0.5 * (log_p - log_m)  # dJS/dp
        kl_pm = (p * g).sum(-1)  # = KL(p||m) / 2
        js = kl_pm + 0.5 * (log_r.exp() * (log_r - log_m)).sum(-1)
        neg_ce = -log_r.gather(1, labels[:, None]).squeeze(-1)
        if need_grad:
            active = (CONTRAST_MARGIN - js >= 0).float() * chunk.neg_w  # the hinge's slope is -1 where not clamped
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


_ADDMM_OUT_DTYPE: dict[str, bool] = {}  # device type -> addmm adds a bf16 product into float32 in place there


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` in place, `acc` float32: one fused multiply-add where torch has one for the operands' dtype
    (bf16 operands: `addmm`'s `out_dtype` on CUDA), else through a float32 product (a temporary of acc's size:
    545 MB for Qwen2.5's LM head, written and read again every chunk)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    kind = acc.device.type
    if kind not in _ADDMM_OUT_DTYPE:  # checked once per device type, on small tensors, against the plain sum
        try:
            c, x, y = torch.ones(2, 3, device=acc.device), a[:2, :4], b[:4, :3]
            want = c + x.float() @ y.float()
            torch.addmm(c, x, y, out_dtype=torch.float32, out=c)
            _ADDMM_OUT_DTYPE[kind] = bool(torch.allclose(c, want, rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[kind] = False
    if _ADDMM_OUT_DTYPE[kind]:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += _mm_float32(a, b)


class _FusedSettings(NamedTuple):
    """The fused loss's fixed settings for one call (`_FusedLoss`)."""

    plan_weight: float
    contrast_weight: float
    chunk_size: int
    chunk_fn: Callable
    matmul_dtype: torch.dtype


class _FusedLoss(torch.autograd.Function):
    """Chunked vocabulary projection + every loss term, with gradients computed in the forward pass.

    Per chunk the positive, plan and negative logits exist once; the gradient w.r.t. the positive
    hidden states and the output weight is accumulated right away (as liger-kernel's fused linear
    losses do), so the backward pass only scales it: no checkpoint recompute, no saved logits.
    `targets`: the step's `LossInputs` with the plan and negative rows detached (its `pos_hidden` is the
    first argument, which autograd tracks).
    """

    @staticmethod
    def forward(ctx, pos_hidden, weight, targets: LossInputs, settings: _FusedSettings):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dtype = settings.matmul_dtype
        w = weight.to(dtype)  # operands of the projections; logits and gradients stay float32
        plan_w, neg_w = targets.row_weights()
        n, size = len(targets), settings.chunk_size
        metrics = pos_hidden.new_zeros(len(METRIC_FIELDS), dtype=torch.float32)  # one vector: one add per chunk
        grad_hidden = torch.zeros_like(pos_hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        with torch.autocast(device_type=pos_hidden.device.type, enabled=False):
            for start in range(0, n, size):
                sl = slice(start, start + size)
                h = pos_hidden[sl].to(dtype)
                logits = lambda x: None if x is None else _mm_float32(x[sl].to(dtype), w.T)  # noqa: E731
                chunk = ChunkLogits(_mm_float32(h, w.T), targets.labels[sl], logits(targets.plan_hidden),
                                    plan_w[sl], logits(targets.neg_hidden), neg_w[sl])
                terms, grad = settings.chunk_fn(chunk, settings.plan_weight, settings.contrast_weight, need_grad,
                                                grad_dtype=dtype)
                metrics += sum_rows(terms, plan_w[sl], neg_w[sl]).metrics()
                if grad_hidden is not None:
                    grad_hidden[sl] = _mm_float32(grad, w)
                if grad_weight is not None:
                    _add_product(grad_weight, grad.T, h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (pos_hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(metrics)
        return _weighted_total(LossSums.from_metrics(metrics), settings.plan_weight, settings.contrast_weight), metrics

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = lambda g, dtype: None if g is None else (g * grad_total).to(dtype)  # noqa: E731
        return scale(grad_hidden, ctx.dtypes[0]), scale(grad_weight, ctx.dtypes[1]), None, None


def fused_latent_comm_loss_sums(inputs: LossInputs, weight: torch.Tensor, config: LossConfig | None = None,
                                chunk_fn: Callable | None = None) -> LossSums:
    """`latent_comm_loss_sums` for a bias-free linear LM head `weight` [V, H]: same values; the gradient flows
    through `total` only.

    From `config` (default `LossConfig()`; "auto" values decided for the hidden states' device, without bf16:
    the trainer passes them decided): the weights, the chunk size, `loss_kernel` (the chunk function: the
    Triton kernel, a compiled or the eager `chunk_values_and_grad`; `chunk_fn` overrides it) and
    `loss_matmul_dtype` (bfloat16: the projections take bf16 operands, float32 accumulation and float32 logits
    on CUDA, twice TF32's speed, with bf16 training's rounding in the loss terms; float32: TF32 on GPUs).
    """
    config = config or LossConfig()
    if "auto" in (config.loss_kernel, config.loss_matmul_dtype):
        config = config.resolved(inputs.pos_hidden.device.type, bf16=False)
    settings = _FusedSettings(float(config.plan_similarity_weight), float(config.random_contrast_weight),
                              max(config.loss_chunk_size or len(inputs), 1),
                              chunk_fn or chunk_function(config.loss_kernel), getattr(torch, config.loss_matmul_dtype))
    total, metrics = _FusedLoss.apply(inputs.pos_hidden, weight, inputs.detached_targets(), settings)
    return LossSums.from_metrics(metrics, total=total)


def infonce_from_scores(scores: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss and MI lower bound (nats) from scores [K, K], s[j, o] = -CE(j | latent o)."""
    k = scores.shape[0]
    loss = -(scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() / tau
    return loss, math.log(k) - loss


# -- the compression stage (sender/train.py): the sender learns to speak in K latents -----------------
# (its defaults, COMPRESSION_KL_WEIGHT ... UNCERTAINTY_QUANTILE, are common/constants.py's, imported above)


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
