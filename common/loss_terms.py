"""What `losses.py` (the loss in torch) and `training/loss_kernel.py` (its chunk as one Triton kernel) share:
the loss's constants and the two tuples a chunk of supervised rows travels in. Both import it; neither
imports the other for it, so the two modules form no import cycle.

Imports nothing of the package, and torch only for the type names.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor

LN2 = math.log(2.0)
CONTRAST_MARGIN = 0.69  # ~ln 2, the maximum of JS in nats
PLAN_KL_WEIGHT, PLAN_COS_WEIGHT = 0.7, 0.3


class ChunkLogits(NamedTuple):
    """A chunk of supervised rows as the chunk functions read it: float32 logits [C, V] of the three branches
    (row k of each predicts `labels[k]`), and per row whether it has a plan / a negative, as float weights [C].
    An absent branch is None (its weights are then never read)."""

    pos: Tensor
    labels: Tensor
    plan: Tensor | None
    plan_w: Tensor
    neg: Tensor | None
    neg_w: Tensor


class RowTerms(NamedTuple):
    """A chunk's per-row loss values [C]; a term of an absent branch is None."""

    ce: Tensor
    plan: Tensor | None  # 0.7 KL(plan || pos) + 0.3 (1 - cos)
    js: Tensor | None  # JS(pos, neg), nats
    neg_ce: Tensor | None
