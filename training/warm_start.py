"""A cheap warm start of the latent head: its processed row k is fitted to the actor's own input
embedding of plan token k, before the actor is trained.

The sender's latents are its hidden states at the plan's tokens (`sender/collect.py`: one row
per plan token, same order). A fresh head maps them to small vectors the actor has never seen, so the
actor first has to learn that anything useful comes through the latent slots at all; with rows that
already resemble the plan's token embeddings, the latent block starts out reading like the plan text,
which the actor learns to use within a few steps (the curriculum trains it on plan text too). Only the
head runs and learns here: no forward or backward pass through the language model.

Rows are paired by position, so this assumes the sender and the actor tokenize the plan alike (the same
model family); with another tokenizer the pairing is approximate and the warm start should stay off.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch

from latent_head import LatentCommHead

logger = logging.getLogger(__name__)


def alignment_loss(head: LatentCommHead, embedding: torch.nn.Embedding, batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative squared error `sum ||head(latents)_k - E[plan_k]||^2 / sum ||E[plan_k]||^2` over the rows k
    below both the sample's latent and plan lengths (and the head's `prepended_length`), and the mean cosine
    between the pairs (a metric). `batch` holds a collated `latents`, `latent_lengths`, `plan_ids`,
    `plan_lengths`."""
    out = head(batch["latents"], batch["latent_lengths"])
    rows = min(out.shape[1], batch["plan_ids"].shape[1])
    pair_lengths = torch.minimum(batch["latent_lengths"], batch["plan_lengths"]).clamp(max=rows)
    valid = torch.arange(rows, device=out.device)[None, :] < pair_lengths[:, None]
    target = embedding(batch["plan_ids"][:, :rows]).detach().float()
    out = out[:, :rows]
    error = ((out - target) ** 2).sum(-1)
    loss = (error * valid).sum() / ((target ** 2).sum(-1) * valid).sum().clamp_min(1e-12)
    cos = (torch.nn.functional.cosine_similarity(out, target, dim=-1) * valid).sum() / valid.sum().clamp_min(1)
    return loss, cos.detach()


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return


def warm_start_head(head: LatentCommHead, embedding: torch.nn.Embedding, batches: Iterable[dict], steps: int,
                    learning_rate: float = 1e-3, device: torch.device | str = "cpu") -> dict[str, float]:
    """`steps` AdamW steps of `alignment_loss` on the head's parameters only (cycling over `batches`);
    returns the first and last step's loss and cosine."""
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    was_training = head.training
    head.train()
    first = last = None
    skipped = 0
    try:
        for step, batch in zip(range(steps), _cycle(batches)):
            batch = {k: batch[k].to(device) for k in ("latents", "latent_lengths", "plan_ids", "plan_lengths")}
            loss, cos = alignment_loss(head, embedding, batch)
            if not torch.isfinite(loss):  # a bad latent must not poison the head before training starts
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = {"loss": loss.item(), "cosine": cos.item()}
            first = first or last
    finally:
        head.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    if skipped:
        logger.warning("Head warm start: %d of %d steps skipped on a non-finite loss", skipped, steps)
    if last is None:
        return {}
    metrics = {"warm_start/first_loss": first["loss"], "warm_start/first_cosine": first["cosine"],
               "warm_start/loss": last["loss"], "warm_start/cosine": last["cosine"], "warm_start/steps": steps}
    logger.info("Head warm start: %d steps, relative error %.3f -> %.3f, cosine %.3f -> %.3f", steps,
                first["loss"], last["loss"], first["cosine"], last["cosine"])
    return metrics
