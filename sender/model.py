"""The compressed sender: a causal LM that speaks in K latents instead of a written plan.

The compression stage of Interlat (`../shared/docs/compression.md`): the sender ("student",
initialised from the model that wrote the data latents) reads a fixed request followed by the
conversation up to the end of the first human message, then takes K autoregressive *latent*
steps: the input of step 1 is a learned start vector `lat_bos`, the input of step k > 1 is
`h2e(z_{k-1})` (bridge: LayerNorm -> Linear without bias), and `z_k` is the last layer's hidden
state at the new position. `z_1..z_K` [K, d] is the message, read by a trained actor exactly
like the hidden states of a written plan.

`LatentSender.rollout` runs a whole batch at once: one left-padded prefill of the contexts (each
row's positions counted from its first real token), then K decode steps that extend the KV cache.
`CompressionModel` pairs a sender with the frozen actor; its forward is the stage's training step (`sender/train.py`).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from common.constants import MARKER_TOKEN, SENDER_FILE, SENDER_REQUEST, TEXT_KEYS
from data import LatentCollator, with_marker
from latent_head import LatentActor
from losses import (COMPRESSION_ALIGN_WEIGHT, COMPRESSION_KL_WEIGHT, DISTILL_TEMPERATURE, DISTILL_WINDOW,
                    LOSS_CHUNK_SIZE, UNCERTAINTY_QUANTILE, LossConfig, LossInputs, alignment_loss, compression_loss,
                    distillation_kl, first_rows_per_sample, latent_comm_loss_sums, token_ce, token_entropy,
                    uncertainty_weights)

REQUEST = SENDER_REQUEST  # the published student's fixed request (common/constants.py: sender/train.py's default)
NOTES_PREFIX = "What you know: "  # before the plan, for a sender with knowledge="plan"
KNOWLEDGE = ("none", "plan")


@dataclass
class SenderConfig:
    num_latents: int = 8  # K: latent steps per message
    request: str = REQUEST
    hidden_size: int = 0  # the student's hidden size (width of the latents)
    # What the student reads besides the conversation: "none" (the published student: the task alone)
    # or "plan" (the record's plan as its private notes, for tasks where the plan carries knowledge
    # that is not in the task, such as where an object is: then K latents compress the plan).
    knowledge: str = "none"
    actor_dir: str | None = None  # the actor it was trained against (a record, not needed to load)


class LatentSender(nn.Module):
    """Student LM + `h2e` bridge + `lat_bos` start vector; `rollout` produces K latents per context."""

    def __init__(self, student: nn.Module, tokenizer, config: SenderConfig):
        super().__init__()
        hidden = student.get_input_embeddings().weight.shape[1]
        if config.num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {config.num_latents}")
        if config.knowledge not in KNOWLEDGE:
            raise ValueError(f"knowledge must be one of {KNOWLEDGE}, got {config.knowledge!r}")
        config.hidden_size = hidden
        self.student, self.tokenizer, self.config = student, tokenizer, config
        self.h2e = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden, bias=False))
        self.lat_bos = nn.Parameter(torch.empty(hidden))
        nn.init.normal_(self.lat_bos, mean=0.0, std=0.02)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return self.lat_bos.device

    # -- contexts -------------------------------------------------------------------------------
    def context_ids(self, messages: Sequence[dict], plan: str | None = None) -> list[int]:
        """This sender's context for a conversation (see `context_ids`); `plan` is read only when the
        sender was trained with `knowledge="plan"`."""
        return context_ids(self.tokenizer, messages, self.config.request, plan_notes(self.config.knowledge, plan))

    def encode_contexts(self, conversations: Sequence[Sequence[dict]],
                        plans: Sequence[str | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded `(input_ids, attention_mask)` [B, T] of the contexts of several conversations."""
        plans = plans if plans is not None else [None] * len(conversations)
        return left_pad([self.context_ids(m, p) for m, p in zip(conversations, plans)], self.tokenizer.pad_token_id)

    # -- the rollout ------------------------------------------------------------------------------
    def rollout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                num_latents: int | None = None) -> torch.Tensor:
        """The K latents [B, K, d] of left-padded contexts `input_ids`/`attention_mask` [B, T].

        One batched prefill fills the KV cache; each of the K steps feeds one vector per row and
        extends the cache. Position ids count each row's real tokens only, so a row's latents do
        not depend on the padding its batch gave it."""
        k = num_latents or self.config.num_latents
        decoder = self.student.get_decoder()
        mask = attention_mask.long()
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        # transformers renamed the decoder's cache argument and output (`past_key_values` -> `cache`, 5.2x).
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, next_position = getattr(out, cache_arg), mask.sum(1, keepdim=True)
        dtype = decoder.get_input_embeddings().weight.dtype
        step_input = self.lat_bos.expand(input_ids.shape[0], 1, -1)
        one = mask.new_ones(mask.shape[0], 1)
        latents = []
        for step in range(k):  # K sequential steps: each input is the previous step's output
            mask = torch.cat([mask, one], dim=1)
            out = decoder(inputs_embeds=step_input.to(dtype), attention_mask=mask, position_ids=next_position + step,
                          use_cache=True, **{cache_arg: cache})
            cache = getattr(out, cache_arg)
            z = out.last_hidden_state  # [B, 1, d]: the final (normed) layer, as the data latents were taken
            latents.append(z)
            if step + 1 < k:
                step_input = self.h2e(z.to(self.lat_bos.dtype))
        return torch.cat(latents, dim=1)

    @torch.no_grad()
    def messages(self, conversations: Sequence[Sequence[dict]], batch_size: int = 32,
                 plans: Sequence[str | None] | None = None) -> list[np.ndarray]:
        """The latent message [K, d] float32 of each conversation (eval mode, batches of `batch_size`)."""
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(conversations), batch_size):
                ids, mask = self.encode_contexts(conversations[start:start + batch_size],
                                                 None if plans is None else plans[start:start + batch_size])
                latents = self.rollout(ids.to(self.device), mask.to(self.device))
                out += [z.float().cpu().numpy() for z in latents]
        finally:
            self.train(was_training)
        return out

    # -- saving and loading ---------------------------------------------------------------------------
    def save_pretrained(self, output_dir: str) -> None:
        """The student (`save_pretrained`, with its tokenizer) and `latent_sender.pt` (bridge, start
        vector, configuration; loadable with `weights_only=True`)."""
        os.makedirs(output_dir, exist_ok=True)
        self.student.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        bridge = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                  if not k.startswith("student.")}
        tmp = os.path.join(output_dir, SENDER_FILE + ".tmp")
        torch.save({"config": asdict(self.config), "state_dict": bridge}, tmp)
        os.replace(tmp, os.path.join(output_dir, SENDER_FILE))  # never half a file in place of a good one

    def load_weights(self, checkpoint_dir: str) -> None:
        """Load student, bridge and start vector saved by `save_pretrained` into this sender (resume)."""
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=self.lat_bos.dtype)
        self.student.load_state_dict(saved.state_dict())
        self._load_bridge(checkpoint_dir, load_sender_file(checkpoint_dir))

    def _load_bridge(self, path: str, saved: dict) -> None:
        """Bridge and start vector from a loaded `latent_sender.pt`; every key but the student's must match."""
        missing, unexpected = self.load_state_dict(saved["state_dict"], strict=False)
        if unexpected or any(not k.startswith("student.") for k in missing):
            raise RuntimeError(f"{path}: {SENDER_FILE} does not match the sender (missing {missing}, "
                               f"unexpected {unexpected})")

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, trust_remote_code: bool = False) -> "LatentSender":
        """A sender saved by `save_pretrained` (an output folder of sender/train.py), in eval mode."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        state = load_sender_file(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        student = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
        sender = cls(student, tokenizer, SenderConfig(**state["config"]))
        sender._load_bridge(path, state)
        if dtype is not None:  # the bridge follows the student's dtype when one is asked for
            sender.h2e.to(student.dtype)
            sender.lat_bos.data = sender.lat_bos.data.to(student.dtype)
        if device is not None:
            sender.to(device)
        return sender.eval()


def context_ids(tokenizer, messages: Sequence[dict], request: str = REQUEST, notes: str | None = None) -> list[int]:
    """Token ids of the request (then the sender's private `notes`, if any) followed by the conversation
    rendered up to the end of the first user message (`[{role, content}]` chat messages), as the
    published student reads it."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("the conversation has no user message")
    # Render with the marker after the first user message and cut the text there: whatever the chat
    # template puts around messages, the context ends exactly where the actor's latent block goes.
    text = tokenizer.apply_chat_template(with_marker(list(messages[:first_user + 1])), tokenize=False)
    text = text[:text.index(MARKER_TOKEN)]
    ids = tokenizer(request, add_special_tokens=True)["input_ids"]
    if notes is not None:
        ids += tokenizer(f"{NOTES_PREFIX}{notes}\n\n", add_special_tokens=False)["input_ids"]
    return ids + tokenizer(text, add_special_tokens=False)["input_ids"]


def plan_notes(knowledge: str, plan: str | None) -> str | None:
    """The private notes a sender of this `knowledge` reads: the plan with "plan" (which must have text), else none."""
    if knowledge == "none":
        return None
    if not isinstance(plan, str) or not plan.strip():
        raise ValueError("this sender reads the record's `plan` (knowledge='plan'), and the record has none")
    return plan


def load_sender_file(path: str) -> dict:
    file = os.path.join(path, SENDER_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no {SENDER_FILE} here; is this an output folder of sender/train.py?")
    return torch.load(file, map_location="cpu", weights_only=True)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded `input_ids` and `attention_mask` [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # a loop over the batch, not over tokens
        if len(r):
            ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def fit_rows(latents: torch.Tensor, lengths: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's first k latents, tiled when it has fewer (row j = latent j mod length): [B, k, d].

    The published teacher message for a K-step student: the data latents cut or tiled to K rows."""
    j = torch.arange(k, device=latents.device)[None, :] % lengths.clamp_min(1)[:, None]
    return latents.gather(1, j[..., None].expand(-1, -1, latents.shape[-1]))


# -- training -------------------------------------------------------------------------------------------
@dataclass
class CompressionLossConfig:
    kl_weight: float = COMPRESSION_KL_WEIGHT
    alignment_weight: float = COMPRESSION_ALIGN_WEIGHT
    temperature: float = DISTILL_TEMPERATURE
    window: int = DISTILL_WINDOW
    quantile: float = UNCERTAINTY_QUANTILE
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE


@dataclass
class CompressionSums:
    """A micro-batch's loss (with gradient) and its metrics: CE summed over supervised tokens, the batch's
    distillation KL and alignment (means: `batches` counts them), and in the distillation window the CE sums
    with the student's message, the data latents and no message. `metrics()` stacks them (field order)."""

    ce: torch.Tensor
    tokens: torch.Tensor
    distill: torch.Tensor
    align: torch.Tensor
    batches: torch.Tensor
    window_student: torch.Tensor
    window_data: torch.Tensor
    window_none: torch.Tensor
    window_tokens: torch.Tensor
    loss: torch.Tensor | None = None

    def metrics(self) -> torch.Tensor:
        return torch.stack([getattr(self, f).detach().float() for f in COMPRESSION_METRICS])


COMPRESSION_METRICS = tuple(f.name for f in fields(CompressionSums) if f.name != "loss")


class CompressionModel(nn.Module):
    """What `sender/train.py` hands to the Trainer: a trainable sender and a frozen actor.

    The actor (base model and head) never gets a gradient and stays in eval mode (no head dropout),
    whatever mode the Trainer switches the model to."""

    def __init__(self, sender: LatentSender, actor: LatentActor):
        super().__init__()
        self.sender, self.actor = sender, actor
        actor.requires_grad_(False)
        actor.eval()

    def train(self, mode: bool = True) -> "CompressionModel":
        super().train(mode)
        self.actor.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor], loss_config: CompressionLossConfig) -> CompressionSums:
        """One micro-batch of the compression stage, in one call of the (DDP-wrapped) model.

        The sender's batched K-step rollout; the frozen actor reads those K latents (gradient through its
        head and base model into the sender); two no-grad actor passes give the targets: the data latents
        cut or tiled to K rows, and no message at all. Loss: CE of the reply given the student's latents
        + `kl_weight` * uncertainty-weighted distillation KL over each sample's first `window` supervised
        tokens + `alignment_weight` * (1 - cos) of the mean-pooled messages after the actor's head."""
        cfg, sender, actor = loss_config, self.sender, self.actor
        k = sender.config.num_latents
        text = {key: batch[key] for key in TEXT_KEYS}
        rows = torch.full_like(batch["marker_index"], k)
        no_rows = torch.zeros_like(rows)

        latents = sender.rollout(batch["context_ids"], batch["context_mask"])  # [B, K, d], with gradient
        student = actor.branch(**text, latents=latents, latent_lengths=rows, latent_rows=rows)
        has_data = batch["latent_lengths"] > 0
        data = fit_rows(batch["latents"], batch["latent_lengths"], k)
        no_block = batch["input_ids"][:, :0]
        with torch.no_grad():  # the teacher (data latents) and no-message branches, as one stacked forward
            data_hidden, none_hidden = actor.stacked_branches(text, [
                dict(latents=data, latent_lengths=torch.where(has_data, rows, 0), block_ids=no_block,
                     block_lengths=no_rows),
                dict(latents=data, latent_lengths=no_rows, block_ids=no_block, block_lengths=no_rows)])

        tokens = student.labels.shape[0]
        # Distillation over each sample's first `window` supervised tokens (samples with data latents). Those
        # rows' logits serve the CE too; the other rows are projected in chunks (bounded memory).
        window = first_rows_per_sample(student.sample_index, cfg.window) & has_data[student.sample_index]
        window_labels = student.labels[window]
        student_logits = actor.logits(student.hidden[window])
        window_student_ce = token_ce(student_logits, window_labels)
        ce_sum = window_student_ce.sum() + latent_comm_loss_sums(
            LossInputs(student.hidden[~window], student.labels[~window]), actor.logits,
            LossConfig(loss_chunk_size=cfg.loss_chunk_size)).ce
        with torch.no_grad():
            data_logits, none_logits = actor.logits(data_hidden[window]), actor.logits(none_hidden[window])
        weights = uncertainty_weights(token_entropy(none_logits), token_entropy(data_logits), cfg.quantile)
        distill = distillation_kl(student_logits, data_logits, weights, cfg.temperature)
        # Alignment of the messages as the actor sees them: after its head, mean-pooled over the K rows.
        student_pooled = actor.head(latents[has_data], rows[has_data]).mean(1)
        with torch.no_grad():
            data_pooled = actor.head(data[has_data], rows[has_data]).mean(1)
        align = alignment_loss(student_pooled, data_pooled)
        loss = compression_loss(ce_sum / max(tokens, 1), distill, align, cfg.kl_weight, cfg.alignment_weight)
        with torch.no_grad():
            window_ce = [token_ce(x, window_labels).sum() for x in (data_logits, none_logits)]
        count = lambda n: ce_sum.new_tensor(float(n))  # noqa: E731
        return CompressionSums(ce_sum, count(tokens), distill, align, count(1), window_student_ce.detach().sum(),
                               *window_ce, count(window_labels.shape[0]), loss=loss)


class SenderDataset(torch.utils.data.Dataset):
    """The actor's dataset items (conversation tokens, data latents) plus the sender's context ids."""

    def __init__(self, actor_dataset, sender_tokenizer, request: str = REQUEST, knowledge: str = "none"):
        # The tokenizer, not the sender: data loader workers need no model.
        self.actor_dataset, self.tokenizer, self.request = actor_dataset, sender_tokenizer, request
        self.knowledge = knowledge

    @property
    def rows(self):
        return self.actor_dataset.rows

    @property
    def lengths(self) -> list[int] | None:
        return self.actor_dataset.lengths

    def __len__(self) -> int:
        return len(self.actor_dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.actor_dataset[i]
        row = self.rows[int(i)]
        try:
            notes = plan_notes(self.knowledge, row["plan"])
        except ValueError:
            raise ValueError(f"{row['where']}: --sender_knowledge plan needs the record's `plan` text") from None
        item["context_ids"] = context_ids(self.tokenizer, json.loads(row["messages"]), self.request, notes)
        return item


@dataclass
class SenderCollator(LatentCollator):
    """`LatentCollator`'s batch plus the sender's left-padded `context_ids` and `context_mask`."""

    context_pad_id: int = 0

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(samples)
        batch["context_ids"], batch["context_mask"] = left_pad([s["context_ids"] for s in samples],
                                                               self.context_pad_id)
        return batch
