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


@dataclass
class LossSums:
    """Sums over supervised tokens of every term; divide by a token count to get means."""

    ce: torch.Tensor
    plan_similarity: torch.Tensor
    random_contrast: torch.Tensor
    neg_ce: torch.Tensor
    js: torch.Tensor
    ce_on_contrast: torch.Tensor  # positive-branch CE on the rows that have a negative
    plan_tokens: torch.Tensor
    contrast_tokens: torch.Tensor


def _chunk_terms(pos_h, plan_h, neg_h, labels, plan_w, neg_w, project):
    """Loss sums of one chunk of supervised rows; logits exist only inside this call."""
    pos_logits = project(pos_h)
    ce = token_ce(pos_logits, labels)
    zero = ce.new_zeros(())
    plan_sum = neg_ce_sum = js_sum = contrast_sum = ce_on_contrast = zero
    if plan_h is not None:
        plan_sum = (plan_similarity(pos_logits, project(plan_h)) * plan_w).sum()
    if neg_h is not None:
        neg_logits = project(neg_h)
        js = js_divergence(pos_logits, neg_logits)
        contrast_sum = (random_contrast(js) * neg_w).sum()
        js_sum = (js.detach() * neg_w).sum()
        neg_ce_sum = (token_ce(neg_logits, labels).detach() * neg_w).sum()
        ce_on_contrast = (ce.detach() * neg_w).sum()
    return torch.stack([ce.sum(), plan_sum, contrast_sum, neg_ce_sum, js_sum, ce_on_contrast])


def latent_comm_loss_sums(
    pos_hidden: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    plan_hidden: torch.Tensor | None = None,
    plan_mask: torch.Tensor | None = None,
    neg_hidden: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    chunk_size: int | None = 2048,
) -> LossSums:
    """Sum every loss term over the supervised rows, projecting to the vocabulary in chunks.

    `*_hidden` are final hidden states [N, H] at the positions predicting `labels` [N]; the
    plan and negative branches are expected without gradient; `project` maps hidden states to
    logits (the LM head). `plan_mask`/`neg_mask` [N]
    say which rows have a plan / a negative. With `chunk_size`, each chunk's logits are
    recomputed in backward (activation checkpointing), so peak memory holds one chunk of
    [chunk, vocab] logits instead of all of them; `chunk_size=None` is the plain path.
    """
    n = labels.shape[0]
    ones = pos_hidden.new_ones(n, dtype=torch.float32)
    plan_w = ones if plan_mask is None else plan_mask.float()
    neg_w = ones if neg_mask is None else neg_mask.float()
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
    return LossSums(ce=sums[0], plan_similarity=sums[1], random_contrast=sums[2], neg_ce=sums[3], js=sums[4], ce_on_contrast=sums[5],
                    plan_tokens=plan_w.sum() if plan_hidden is not None else plan_w.new_zeros(()),
                    contrast_tokens=neg_w.sum() if neg_hidden is not None else neg_w.new_zeros(()))


def infonce_from_scores(scores: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss and MI lower bound (nats) from scores [K, K], s[j, o] = -CE(j | latent o)."""
    k = scores.shape[0]
    loss = -(scores.diagonal() - torch.logsumexp(scores, dim=1)).mean() / tau
    return loss, math.log(k) - loss
