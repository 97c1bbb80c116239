"""Generation with a latent message: prompts in the training layout, batched, and the stop rule.

The prompt is the conversation so far rendered with the actor's chat template up to the generation
prompt of the next assistant turn. As in training (`data.encode_conversation`), the first user message
ends with the `<FIRST_HUMAN_END>` marker; it is replaced by `<bop> [latent rows] [plan tokens] <eop>`
(`latent_head.assemble_inputs` + `LatentActor.embed`), so the actor sees the layout it was trained on.
With no latent rows and no plan the block is `<bop><eop>`: the "no message" input. `stop_token_ids` and
`until_stop` are the one end-of-turn rule, for the actor and for the sender writing plans.
Used by `evaluation/inference.py`, `evaluation/conditions.py`, `envs/play.py` and `sender/collect.py`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common.constants import IGNORE_INDEX
from data import chat_messages, check_messages_text, encode_plan, find_marker, with_marker
from latent_head import LatentActor, assemble_inputs

LatentLike = np.ndarray | torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def to_chat_messages(messages: Sequence[dict]) -> list[dict]:
    """`[{role, content}]`, accepting record-style turns `[{from, value}]` too (`data.chat_messages`)."""
    return chat_messages(messages, field="messages")


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation before its first assistant turn: the reply a latent message is sent for."""
    messages = to_chat_messages(messages)
    first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first_assistant]


def encode_prompt(tokenizer, messages: Sequence[dict]) -> tuple[np.ndarray, int]:
    """Token ids of the conversation plus the next assistant header, marker after the first user message.

    Same convention as `data.encode_conversation` (marker appended to the first user message's
    content, rendered text tokenized without extra special tokens), so a prompt's ids are a prefix
    of the training ids of the same conversation with its reply.
    """
    messages = to_chat_messages(messages)
    if not messages or messages[-1]["role"] == "assistant":
        raise ValueError("the conversation must end with a user (or system) turn: the reply to generate is next")
    check_messages_text(messages, tokenizer)  # control tokens in data are refused, as in training
    text = tokenizer.apply_chat_template(with_marker(messages), tokenize=False, add_generation_prompt=True)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return ids, find_marker(ids, tokenizer)


# ---------------------------------------------------------------------------------------------
# Batches: left-padded prompts with the latent block in place of the marker
# ---------------------------------------------------------------------------------------------
def _as_latent_tensor(latents: LatentLike, actor: LatentActor) -> torch.Tensor:
    """[K', d] float32 on CPU, K' <= prepended_length (the head uses only the first rows)."""
    dim = actor.head.config.latent_dim
    if latents is None:
        return torch.zeros(0, dim)
    t = torch.as_tensor(np.asarray(latents, dtype=np.float32) if isinstance(latents, np.ndarray) else latents)
    t = t.detach().float().cpu()
    if t.ndim != 2 or (t.shape[0] and t.shape[1] != dim):
        raise ValueError(f"latents must have shape [K, {dim}] (the head's latent_dim), got {tuple(t.shape)}")
    return t[: actor.head.config.prepended_length].reshape(-1, dim)


def build_prompt_batch(actor: LatentActor, prompts: Sequence[tuple[np.ndarray, int]],
                       latents: Sequence[LatentLike], plan_ids: Sequence[Sequence[int] | None] | None = None,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for prompts `(ids, marker_index)` from `encode_prompt`.

    Sample b's marker becomes `<bop>`, its first `min(K_b, prepended_length)` latent rows,
    `plan_ids[b]`, `<eop>`. Returns `input_ids` (latent slots hold the pad id), `attention_mask`,
    `latent_slots` [B, T], and `latents` [B, K, d], `latent_lengths` = `latent_rows` [B] for `actor.embed`.
    Left padding: generation appends new tokens at the right end of every row.
    """
    b = len(prompts)
    plan_ids = plan_ids if plan_ids is not None else [None] * b
    if not (len(latents) == len(plan_ids) == b):
        raise ValueError("prompts, latents and plan_ids must have the same length")
    pad = actor.pad_id
    text = pad_sequence([torch.as_tensor(ids, dtype=torch.long) for ids, _ in prompts], batch_first=True,
                        padding_value=pad)
    text_lengths = torch.tensor([len(ids) for ids, _ in prompts])
    marker_index = torch.tensor([m for _, m in prompts])
    rows = [_as_latent_tensor(x, actor) for x in latents]
    latent_lengths = torch.tensor([len(r) for r in rows])
    latent_tensor = pad_sequence(rows, batch_first=True) if int(latent_lengths.max()) else \
        torch.zeros(b, 1, actor.head.config.latent_dim)
    blocks = [torch.as_tensor(np.asarray(p if p is not None else [], dtype=np.int64)) for p in plan_ids]
    block_lengths = torch.tensor([len(x) for x in blocks])
    block_ids = pad_sequence(blocks, batch_first=True, padding_value=pad) if int(block_lengths.max()) else None
    asm = assemble_inputs(text, torch.full_like(text, IGNORE_INDEX), text_lengths, marker_index, latent_lengths,
                          block_ids, block_lengths if block_ids is not None else None, actor.bop_id, actor.eop_id,
                          pad)
    # Right-padded -> left-padded: shift each row right by its padding.
    lengths = asm["attention_mask"].sum(1)
    width = asm["input_ids"].shape[1]
    pos = torch.arange(width)[None, :]
    shift = (width - lengths)[:, None]
    valid = pos >= shift
    src = (pos - shift).clamp_min(0)
    input_ids = torch.where(valid, asm["input_ids"].gather(1, src), pad)
    latent_slots = valid & asm["latent_slots"].gather(1, src)
    batch = {"input_ids": input_ids, "attention_mask": valid.long(), "latent_slots": latent_slots,
             "latents": latent_tensor, "latent_lengths": latent_lengths, "latent_rows": latent_lengths}
    return {k: v.to(device or actor.device) for k, v in batch.items()}


def prompt_embeddings(actor: LatentActor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Input embeddings of a `build_prompt_batch` batch: token embeddings with head rows in the slots."""
    has_latents = bool(batch["latent_rows"].any())
    return actor.embed(batch["input_ids"], batch["latent_slots"], batch["latents"] if has_latents else None,
                       batch["latent_lengths"])


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's EOS ids plus the tokenizer's (chat models end turns with it)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return sorted(ids)


def until_stop(new_ids: torch.Tensor, stop_ids: Sequence[int]) -> list[list[int]]:
    """Each row of generated ids [B, N] up to (not including) its first stop token; `generate` pads a row that
    stopped early after it."""
    new_ids = new_ids.cpu()
    is_stop = torch.isin(new_ids, torch.tensor(list(stop_ids), dtype=new_ids.dtype))
    lengths = torch.where(is_stop.any(1), is_stop.int().argmax(1), new_ids.shape[1]).tolist()
    return [row[:n] for row, n in zip(new_ids.tolist(), lengths)]


@torch.no_grad()
def generate_token_ids(actor: LatentActor, batch: dict[str, torch.Tensor], max_new_tokens: int = 128,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       **generate_kwargs) -> list[list[int]]:
    """New token ids per sample (up to, not including, the first end-of-sequence token)."""
    was_training = actor.training
    actor.eval()  # the head's attention dropout must be off
    try:
        embeds = prompt_embeddings(actor, batch)
        stop = stop_token_ids(actor.base_model, actor.tokenizer)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else \
            {"temperature": None, "top_p": None, "top_k": None}  # greedy: ignore the model's sampling defaults
        # Passing the ids too makes the output start with the prompt (sliced off below), whatever the
        # model, and keeps id-based logits processors (repetition penalty) working.
        out = actor.base_model.generate(input_ids=batch["input_ids"], inputs_embeds=embeds,
                                        attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                                        do_sample=do_sample, pad_token_id=actor.pad_id, eos_token_id=stop,
                                        **sampling, **generate_kwargs)
    finally:
        actor.train(was_training)
    return until_stop(out[:, batch["input_ids"].shape[1]:], stop)


def generate_replies(actor: LatentActor, conversations: Sequence[Sequence[dict]], latents: Sequence[LatentLike],
                     max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, plan_texts: Sequence[str | None] | None = None,
                     **generate_kwargs) -> list[str]:
    """Batched `generate_reply`: one reply per conversation, each with its own latents / plan text."""
    tok = actor.tokenizer
    prompts = [encode_prompt(tok, messages) for messages in conversations]
    plan_ids = None if plan_texts is None else [encode_plan(tok, p) if p else None for p in plan_texts]
    batch = build_prompt_batch(actor, prompts, latents, plan_ids)
    ids = generate_token_ids(actor, batch, max_new_tokens, do_sample, temperature, top_p, **generate_kwargs)
    return decode_replies(tok, ids)


def decode_replies(tokenizer, ids: Sequence[torch.Tensor]) -> list[str]:
    """Generated token ids (each row up to its stop token: `until_stop`) as reply texts, stripped."""
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def generate_reply(actor: LatentActor, messages: Sequence[dict], latents: LatentLike = None,
                   max_new_tokens: int = 128, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   plan_text: str | None = None, **generate_kwargs) -> str:
    """The actor's next assistant reply to `messages` with `latents` [K, d] (and `plan_text`) injected.

    `messages` are `[{role, content}]` (or record turns `[{from, value}]`) ending with a user turn;
    `latents=None` (or K=0) and no plan send the empty block `<bop><eop>`. Greedy unless `do_sample`.
    """
    return generate_replies(actor, [messages], [latents], max_new_tokens, do_sample, temperature, top_p,
                            [plan_text], **generate_kwargs)[0]
