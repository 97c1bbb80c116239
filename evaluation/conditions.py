"""Does the actor read the latents? Reference-reply CE, exact match and answer accuracy under four messages.

The library behind `evaluation/evaluate.py` (the command line) and `callbacks.LatentConditionsCallback` (the
same measurement while training).

Conditions (what sits between `<bop>` and `<eop>` in place of the first human message's marker):
  true       the sample's own latents: pure latents, its first `prepended_length` rows (deployment input)
  shuffled   another sample's latents, by a fixed derangement: sample i gets sample (i+1) mod N's
  none       nothing: `<bop><eop>`. This is "no message" in this architecture: the layout training
             uses, minus the content; dropping the delimiters too would be an input never seen in training
  plan_text  the plan's text tokens (the training "plan" branch)

`exact_match`: the share of samples whose every supervised token is the arg-max prediction under
teacher forcing, i.e. greedy decoding would write the reference reply exactly (no generation needed).

CE is the training CE: over the supervised (assistant) tokens of the reference conversation,
batched through `ActorDataset` + `LatentCollator` + `LatentActor.forward`, head in eval mode.
`ce_bits` = sum of per-token CE / number of tokens / ln 2, per sample and over all samples (token
weighted). A condition that does not apply to a sample (no latents, no plan, no other sample with
latents) is null for it and left out of its mean. `delta_bits_shuffled_minus_true` is taken over
the samples where both apply: > 0 means the actor's predictions depend on *which* latents it reads.

Where records carry an `answer`, the first reply is generated (greedy) under each condition and
counted correct when the normalised answer appears as a word (or word sequence) in the normalised
reply: lowercase, punctuation -> space, whitespace collapsed; "Kitchen." matches "the kitchen".
"""
from __future__ import annotations

import json
import re
from typing import Iterator, Sequence

import torch

from common.constants import TEXT_KEYS
from data import ActorDataset, DataError, LatentCollator
from evaluation.generation import build_prompt_batch, decode_replies, encode_prompt, generate_token_ids, prompt_messages
from latent_head import LatentActor
from losses import LN2

CONDITIONS = ("true", "shuffled", "none", "plan_text")


# ---------------------------------------------------------------------------------------------
# The four conditions
# ---------------------------------------------------------------------------------------------
def donor_indices(n: int) -> list[int]:
    """The shuffled condition's donors: sample i reads sample (i+1) mod n's latents (never its own if n > 1)."""
    return [(i + 1) % n for i in range(n)]


def condition_inputs(condition: str, batch: dict[str, torch.Tensor],
                     donor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword arguments of `LatentActor.forward` for one condition; `donor` is the batch of donor samples."""
    text = {k: batch[k] for k in TEXT_KEYS}
    if condition == "true":
        return dict(text, latents=batch["latents"], latent_lengths=batch["latent_lengths"],
                    latent_rows=batch["latent_lengths"])
    if condition == "shuffled":
        return dict(text, latents=donor["latents"], latent_lengths=donor["latent_lengths"],
                    latent_rows=donor["latent_lengths"])
    if condition == "none":
        return text  # zero latent rows, no block: <bop><eop>
    if condition == "plan_text":
        return dict(text, block_ids=batch["plan_ids"], block_lengths=batch["plan_lengths"])
    raise ValueError(f"unknown condition {condition!r} (expected one of {', '.join(CONDITIONS)})")


def condition_applies(condition: str, batch: dict[str, torch.Tensor], donor: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: whether the condition means what it says for each sample."""
    if condition == "true":
        return batch["latent_lengths"] > 0
    if condition == "shuffled":
        return (donor["latent_lengths"] > 0) & (donor["index"] != batch["index"])
    if condition == "none":
        return torch.ones_like(batch["latent_lengths"], dtype=torch.bool)
    if condition == "plan_text":
        return batch["plan_lengths"] > 0
    raise ValueError(f"unknown condition {condition!r}")


@torch.no_grad()
def ce_and_exact(actor: LatentActor, inputs: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample of the batch: summed CE (nats, float64), count of supervised tokens, and whether every
    supervised token is the arg-max prediction (teacher forced: greedy decoding would write exactly the
    reference reply), all [B]."""
    ce, hit, sample_index = actor(**inputs, output="token_scores")  # one call of the model: FSDP gathers there
    b = inputs["input_ids"].shape[0]
    sums = torch.zeros(b, dtype=torch.float64, device=ce.device).index_add_(0, sample_index, ce.double())
    counts = torch.bincount(sample_index, minlength=b)
    misses = torch.bincount(sample_index, weights=(~hit).float(), minlength=b)
    return sums.cpu(), counts.cpu(), ((misses == 0) & (counts > 0)).cpu()


def ce_sums(actor: LatentActor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of the batch: summed CE (nats, float64) and count of supervised tokens, both [B]."""
    return ce_and_exact(actor, inputs)[:2]


def iter_batches(dataset: ActorDataset, collator: LatentCollator, batch_size: int, n: int,
                 device: torch.device | str) -> Iterator[tuple[list[int], list[dict], list[dict], dict, dict]]:
    """`(indices, items, donor_items, batch, donor_batch)` over the first n samples, in order.

    `items`/`donor_items` are dataset items; the batches are collated, with tensors on `device`.
    """
    donors = donor_indices(n)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        items = [dataset[i] for i in indices]
        donor_items = [dataset[donors[i]] for i in indices]
        batch, donor = collator(items), collator(donor_items)
        width = batch["latents"].shape[-1]
        if width != collator.latent_dim or donor["latents"].shape[-1] != collator.latent_dim:
            raise DataError(f"latents of width {width} do not fit the actor's head (latent_dim {collator.latent_dim})")
        yield (indices, items, donor_items, {k: v.to(device) for k, v in batch.items()},
               {k: v.to(device) for k, v in donor.items()})


# ---------------------------------------------------------------------------------------------
# Scoring and generation
# ---------------------------------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Lowercase, punctuation -> space, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def answer_in_reply(reply: str, answer: str) -> bool:
    """The normalised answer appears as a whole word (or word sequence) in the normalised reply."""
    answer = normalise_text(str(answer))
    return bool(answer) and f" {answer} " in f" {normalise_text(reply)} "


def _generate_conditions(actor: LatentActor, items: list[dict], donor_items: list[dict], messages: list[list[dict]],
                         max_new_tokens: int) -> dict[str, list[str]]:
    """Greedy first replies of a batch under each condition (batched per condition)."""
    prompts = [encode_prompt(actor.tokenizer, m) for m in messages]
    inputs = {"true": ([it["latents"] for it in items], None),
              "shuffled": ([d["latents"] for d in donor_items], None),
              "none": ([None] * len(items), None),
              "plan_text": ([None] * len(items), [it["plan_ids"] for it in items])}
    replies = {}
    for condition, (latents, plan_ids) in inputs.items():
        batch = build_prompt_batch(actor, prompts, latents, plan_ids)
        ids = generate_token_ids(actor, batch, max_new_tokens=max_new_tokens)
        replies[condition] = decode_replies(actor.tokenizer, ids)
    return replies


def evaluate(actor: LatentActor, dataset: ActorDataset, collator: LatentCollator, batch_size: int = 8,
             device: torch.device | str | None = None, max_samples: int | None = None,
             answers: Sequence[str | None] | None = None, max_new_tokens: int = 32, progress: bool = False) -> dict:
    """Full report: per-condition `ce_bits` (+ `accuracy` where answers are given), delta, per-sample values.

    `answers[i]` is sample i's expected answer (None: not scored); with no answers nothing is generated.
    `progress`: a progress bar over the samples (tqdm).
    """
    from tqdm.auto import tqdm

    device = device or actor.device
    n = min(len(dataset), max_samples) if max_samples is not None else len(dataset)
    sums = {c: torch.zeros(n, dtype=torch.float64) for c in CONDITIONS}
    counts = {c: torch.zeros(n, dtype=torch.long) for c in CONDITIONS}
    applies = {c: torch.zeros(n, dtype=torch.bool) for c in CONDITIONS}
    exact = {c: torch.zeros(n, dtype=torch.bool) for c in CONDITIONS}
    do_generate = answers is not None and any(a is not None for a in answers[:n])
    replies: dict[str, list[str | None]] = {c: [None] * n for c in CONDITIONS}
    was_training = actor.training
    actor.eval()  # head dropout off: deterministic, deployment-like scores
    bar = tqdm(total=n, desc="latent conditions", unit="sample", disable=not progress, leave=False)
    try:
        for indices, items, donor_items, batch, donor in iter_batches(dataset, collator, batch_size, n, device):
            for c in CONDITIONS:
                s, k, e = ce_and_exact(actor, condition_inputs(c, batch, donor))
                sums[c][indices], counts[c][indices], exact[c][indices] = s, k, e
                applies[c][indices] = condition_applies(c, batch, donor).cpu()
            if do_generate:
                messages = [prompt_messages(json.loads(dataset.rows[i]["messages"])) for i in indices]
                for c, texts in _generate_conditions(actor, items, donor_items, messages, max_new_tokens).items():
                    for i, text in zip(indices, texts):
                        replies[c][i] = text
            bar.update(len(indices))
    finally:
        bar.close()
        actor.train(was_training)

    valid = {c: applies[c] & (counts[c] > 0) for c in CONDITIONS}
    conditions: dict[str, dict] = {}
    for c in CONDITIONS:
        tokens = int(counts[c][valid[c]].sum())
        conditions[c] = {"ce_bits": float(sums[c][valid[c]].sum() / tokens / LN2) if tokens else None,
                         "exact_match": float(exact[c][valid[c]].float().mean()) if tokens else None,
                         "samples": int(valid[c].sum()), "tokens": tokens}
    paired = valid["true"] & valid["shuffled"]
    paired_tokens = int(counts["true"][paired].sum())
    delta = float((sums["shuffled"][paired].sum() - sums["true"][paired].sum()) / paired_tokens / LN2) \
        if paired_tokens else None

    per_sample = []
    for i in range(n):
        row = dataset.rows[i]
        entry = {"id": row["id"], "ce_bits": {c: float(sums[c][i] / counts[c][i] / LN2) if valid[c][i] else None
                                              for c in CONDITIONS}}
        if do_generate and answers[i] is not None:
            entry["answer"] = answers[i]
            entry["reply"] = {c: replies[c][i] if applies[c][i] else None for c in CONDITIONS}
            entry["correct"] = {c: answer_in_reply(replies[c][i], answers[i]) if applies[c][i] else None
                                for c in CONDITIONS}
        per_sample.append(entry)
    if do_generate:
        for c in CONDITIONS:
            marks = [e["correct"][c] for e in per_sample if "correct" in e and e["correct"][c] is not None]
            conditions[c]["accuracy"] = sum(marks) / len(marks) if marks else None
    return {"num_samples": n, "conditions": conditions, "delta_bits_shuffled_minus_true": delta,
            "per_sample": per_sample}


def evaluate_conditions(actor: LatentActor, dataset: ActorDataset, collator: LatentCollator, batch_size: int,
                        device: torch.device | str | None = None, max_samples: int | None = None,
                        progress: bool = False) -> dict[str, float]:
    """No generation, flat, for logging at eval time: `{cond}_ce_bits`, `{cond}_exact_match` (share of samples
    whose reference reply is the teacher-forced arg-max, token by token) and `delta_bits_shuffled_minus_true`.

    Keys of conditions that apply to no sample are left out (never NaN in logs).
    """
    report = evaluate(actor, dataset, collator, batch_size, device, max_samples, progress=progress)
    out = {f"{c}_{key}": v[key] for c, v in report["conditions"].items() if v["ce_bits"] is not None
           for key in ("ce_bits", "exact_match")}
    if report["delta_bits_shuffled_minus_true"] is not None:
        out["delta_bits_shuffled_minus_true"] = report["delta_bits_shuffled_minus_true"]
    return out
