"""The actor: a causal LM with a latent-communication head that splices latents into its input.

`LatentCommHead` is the published head (pre-LN, bidirectional MHA over the latents,
post-LN, AdaptiveProjection), run in float32. `assemble_inputs` lays out every sequence
of a batch as `[... first human message, <bop>, latent rows, block tokens, <eop>, rest ...]`
with index arithmetic. `LatentActor` ties them to a Hugging Face causal LM and owns saving
and loading (base model + head + tokenizer).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from common.constants import HEAD_FILE, HEAD_SAFETENSORS_FILE, IGNORE_INDEX, PREPENDED_LENGTH, SPECIAL_TOKENS, TEXT_KEYS
from common.constants import MARKER_TOKEN  # noqa: F401 (re-exported: tests import it from here)
from losses import LOSS_CHUNK_SIZE, LossConfig, LossInputs, LossSums, latent_comm_losses, token_ce

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "interlat_packed"  # registered with transformers by `register_packed_attention`


class AdaptiveProjection(nn.Module):
    """`r = x * scale; out = (r + MLP(r)) * output_scale`, initialised close to a small identity."""

    def __init__(self, dim: int, scale_init: float = 0.2, output_scale_init: float = 0.1):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), scale_init))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.output_scale = nn.Parameter(torch.full((dim,), output_scale_init))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.xavier_uniform_(self.mlp[3].weight, gain=1e-2)
        nn.init.zeros_(self.mlp[3].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x * self.scale
        return (r + self.mlp(r)) * self.output_scale


@dataclass
class HeadConfig:
    latent_dim: int  # width of the sender's hidden states
    hidden_size: int  # width of the actor's embeddings
    num_heads: int = 8
    prepended_length: int = PREPENDED_LENGTH  # only the first this-many latent rows are used
    dropout: float = 0.1


class LatentCommHead(nn.Module):
    """Maps sender latents [B, K, latent_dim] to actor input embeddings [B, K, hidden_size] (float32)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        c = self.config = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"--num_heads {c.num_heads} must divide the model's hidden size {c.hidden_size}")
        # A sender of another family has another width: learn the map into the actor's space.
        self.input_proj = nn.Linear(c.latent_dim, c.hidden_size) if c.latent_dim != c.hidden_size else nn.Identity()
        self.pre_ln = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = nn.MultiheadAttention(c.hidden_size, c.num_heads, dropout=c.dropout, batch_first=True)
        self.post_ln = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.projection = AdaptiveProjection(c.hidden_size)
        d = c.hidden_size
        for i in range(3):  # q, k, v blocks of the packed in-projection
            nn.init.xavier_uniform_(self.attn.in_proj_weight[i * d:(i + 1) * d], gain=3 ** -0.5)
        nn.init.zeros_(self.attn.in_proj_bias)
        nn.init.xavier_uniform_(self.attn.out_proj.weight, gain=1.0)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, latents: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`latents` [B, K, d] padded, `lengths` [B] valid rows -> processed rows [B, K', H], K' <= prepended_length."""
        latents = latents[:, : self.config.prepended_length]
        # Float32 for stability whatever the surrounding autocast (the weights' dtype where FSDP's mixed
        # precision casts them for the forward).
        with torch.autocast(device_type=latents.device.type, enabled=False):
            x = self.input_proj(latents.to(self.pre_ln.weight.dtype))
            h = self.pre_ln(x)
            # Rows past a sample's length are padding; an empty sample keeps one (ignored) key
            # so that softmax over keys never sees an all-masked row (NaN).
            pad = torch.arange(h.shape[1], device=h.device)[None, :] >= lengths.clamp_min(1)[:, None]
            attended, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
            return self.projection(self.post_ln(h + attended))


def assembled_lengths(text_lengths: torch.Tensor, latent_rows: torch.Tensor,
                      block_lengths: torch.Tensor | None) -> torch.Tensor:
    """Length of each assembled row: the marker becomes `<bop>`, the latent slots, the block, `<eop>`."""
    return text_lengths + 1 + latent_rows + (0 if block_lengths is None else block_lengths)


def assemble_inputs(
    text_ids: torch.Tensor,
    text_labels: torch.Tensor,
    text_lengths: torch.Tensor,
    marker_index: torch.Tensor,
    latent_rows: torch.Tensor,
    block_ids: torch.Tensor | None,
    block_lengths: torch.Tensor | None,
    bop_id: int,
    eop_id: int,
    pad_id: int,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Replace each row's marker token by `<bop>, latent_rows x slot, block tokens, <eop>`.

    `text_ids`/`text_labels` [B, T] are right-padded with `text_lengths` [B]; `marker_index`
    [B] is the marker's position; `latent_rows` [B] the number of latent slots; `block_ids`
    [B, N] with `block_lengths` [B] the tokens after the latents (plan text). Returns
    `input_ids` (latent slots hold `pad_id`), `labels` (-100 over the block), `attention_mask`
    and `latent_slots` (bool), all [B, T'] with T' the longest assembled row (or `width`, when the
    caller knows it: reading the longest length from the device waits for the device).
    """
    device = text_ids.device
    if block_ids is None:
        block_ids = text_ids.new_zeros(text_ids.shape[0], 0)
        block_lengths = torch.zeros_like(latent_rows)
    m, n = latent_rows[:, None], block_lengths[:, None]
    marker = marker_index[:, None]
    out_lengths = assembled_lengths(text_lengths, latent_rows, block_lengths)
    pos = torch.arange(int(out_lengths.max()) if width is None else width, device=device)[None, :]
    # Region boundaries per row: [0, marker) text, marker bop, then m latent slots, n block tokens, eop, rest.
    latent_start, block_start = marker + 1, marker + 1 + m
    eop_pos = block_start + n
    is_prefix, is_bop = pos < marker, pos == marker
    is_latent = (pos >= latent_start) & (pos < block_start)
    is_block = (pos >= block_start) & (pos < eop_pos)
    is_eop = pos == eop_pos
    is_valid = pos < out_lengths[:, None]
    is_suffix = (pos > eop_pos) & is_valid
    # Index of the text token each prefix/suffix position copies (suffix shifts by the block's length).
    text_src = torch.where(is_suffix, pos - (m + n + 1), pos).clamp(0, text_ids.shape[1] - 1)
    block_src = (pos - block_start).clamp(0, max(block_ids.shape[1] - 1, 0))
    from_text = is_prefix | is_suffix
    ids = torch.full_like(pos.expand(text_ids.shape[0], -1), pad_id)
    ids = torch.where(from_text, text_ids.gather(1, text_src), ids)
    if block_ids.shape[1]:
        ids = torch.where(is_block, block_ids.gather(1, block_src), ids)
    ids = torch.where(is_bop, bop_id, torch.where(is_eop, eop_id, ids))
    labels = torch.where(from_text, text_labels.gather(1, text_src), IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "attention_mask": is_valid.long(), "latent_slots": is_latent}


# -- packed sequences: a batch as one row without padding, attention kept within each sample ----------
_VARLEN: tuple | None = None  # (varlen_attn, causal kwargs, has enable_gqa, has scale), set on registration


def _varlen_options() -> tuple | None:
    """torch's variable-length flash attention and how to call it (its arguments changed across versions)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


def _bucket(length: int, multiple: int = 1024) -> int:
    """A bound on the longest sample, rounded up: few distinct values, so compiled layers rarely recompile
    (the kernel only launches a few more, immediately finished, blocks)."""
    return -(-length // multiple) * multiple


GRAPH_ROW_UNIT = 1024  # packed rows under CUDA graphs are a multiple of this many tokens


def graph_row_length(tokens: int, limit: int, unit: int = GRAPH_ROW_UNIT) -> int:
    """The length of a packed row under CUDA graphs (a graph replays one shape): `tokens` rounded up to a
    multiple of `unit`, and past 8 units to one of 4 steps per doubling (8, 10, 12, 14, 16, 20, ... units: at
    most a quarter more), so that few lengths recur and each is recorded once; at most `limit`."""
    units = -(-tokens // unit)
    if units > 8:
        shift = units.bit_length() - 3  # keep the top 3 bits of the count: 4 steps per doubling
        units = -(-units >> shift) << shift
    return max(min(units * unit, limit), tokens)


@dataclass
class PackedRow:
    """Where the tokens of right-padded rows [B, width] sit in one packed row of `length` tokens (no padding
    between samples): sample b's tokens at `cu[b]` on. With CUDA graphs the row is longer than its real tokens:
    each sample's segment ends with extra tokens (zero embeddings), after all of its own, so that causal
    attention keeps them from every real token and they change no value or gradient."""

    source: torch.Tensor  # [length] index of each token in the flattened [B * width] rows
    position: torch.Tensor  # [length] position within its sample
    cu: torch.Tensor  # [B + 1] int64 segment starts (and the row's end)
    real: torch.Tensor | None  # [length] bool: not an extra token (None: all are real)
    length: int
    real_tokens: int


def pack_rows(lengths: torch.Tensor, total: int, width: int, segment_limit: int | None = None) -> PackedRow:
    """The `PackedRow` of rows with `lengths` [B] (their sum `total`, known to the caller) and `width`.
    `segment_limit` (CUDA graphs): pad the row to `graph_row_length`, no segment longer than the limit."""
    length, segments = total, lengths
    if segment_limit is not None:
        length = graph_row_length(total, lengths.shape[0] * segment_limit)
        room = segment_limit - lengths
        # The extra tokens fill the samples' room in batch order (on the device: no wait for it).
        segments = lengths + (length - total - (room.cumsum(0) - room)).clamp_min(0).minimum(room)
    cu = torch.nn.functional.pad(segments.cumsum(0), (1, 0))
    token = torch.arange(length, device=lengths.device)
    sample = torch.bucketize(token, cu[1:], right=True)
    position = token - cu[sample]
    real = None if segment_limit is None else position < lengths[sample]
    source = sample * width + (position if real is None else position.clamp(max=width - 1))
    return PackedRow(source, position, cu, real, length, total)


def supervised_text_positions(labels: torch.Tensor, text_lengths: torch.Tensor,
                              marker_index: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the text positions whose labels every branch of the batch supervises: inside the row, label
    not ignored, not the first token (no position predicts it) and not the marker (the latent block replaces it)."""
    pos = torch.arange(labels.shape[1], device=labels.device)[None, :]
    return (labels != IGNORE_INDEX) & (pos >= 1) & (pos != marker_index[:, None]) & (pos < text_lengths[:, None])


_NONZERO_STATIC: dict[str, bool] = {}  # device type -> torch.nonzero_static works there (checked on first use)


def true_positions(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask.nonzero(as_tuple=True)` of a 2-D mask whose number of True entries, `count`, the caller knows: the
    plain nonzero waits for the device to learn it."""
    kind = mask.device.type
    if _NONZERO_STATIC.get(kind, True):
        try:
            found = torch.nonzero_static(mask, size=count)
            _NONZERO_STATIC[kind] = True
            return found[:, 0], found[:, 1]
        except (NotImplementedError, RuntimeError):  # a torch or device without it
            if kind in _NONZERO_STATIC:
                raise
            _NONZERO_STATIC[kind] = False
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


def read_sizes(*values: torch.Tensor) -> list[int]:
    """Integers from the device (one wait for it, however many)."""
    return torch.stack(values).tolist()


def _varlen_flash(query, key, value, cu_seqlens, max_length, scaling):
    """Causal attention within each sample of packed [T, H, D] rows (flash kernel, no mask)."""
    varlen_attn, kwargs, has_gqa, has_scale = _VARLEN  # resolved once, outside any compiled code
    kwargs = dict(kwargs)
    if key.shape[1] != query.shape[1]:  # grouped KV heads: query head i reads KV head i // group
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    if has_scale:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - query.shape[-1] ** -0.5) > 1e-6:
        raise NotImplementedError("this torch's varlen_attn has no `scale`; use --packed_sequences False")
    return varlen_attn(query, key, value, cu_seqlens, cu_seqlens, max_length, max_length, **kwargs)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: SDPA, except for packed rows (`cu_seq_lens_q` given), where each
    sample attends causally to itself only: flash varlen on CUDA in bf16/fp16, a block mask elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query [1, Hq, T, D], key/value [1, Hkv, T, D]. Rotary embeddings follow the (float32) residual
    # stream's dtype, so under autocast q/k arrive in float32: cast as autocast does for SDPA.
    dtype = query.dtype
    if query.is_cuda and dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    if query.is_cuda and dtype in (torch.bfloat16, torch.float16) and _VARLEN is not None:
        rows = lambda t: t[0].transpose(0, 1).to(dtype).contiguous()  # -> [T, H, D]
        out = _varlen_flash(rows(query), rows(key), rows(value), cu, kwargs["max_length_q"], scaling)
        return out[None], None  # [1, T, Hq, D]
    positions = torch.arange(query.shape[2], device=query.device)
    sample = torch.bucketize(positions, cu[1:], right=True)
    mask = (sample[:, None] == sample[None, :]) & (positions[:, None] >= positions[None, :])
    return sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=dropout, scaling=scaling)


def _packed_mask(*args, **kwargs):
    """Masks for `packed_attention`: none for packed rows (the kernel keeps samples apart; `LatentActor.backbone`
    gives them a 4-D placeholder), SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    mask = kwargs.get("attention_mask")
    return None if mask is None or mask.dim() == 4 else sdpa_mask(*args, **kwargs)


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    global _VARLEN
    _VARLEN = _varlen_options()
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)


def packed_sequences_available() -> bool:
    """Flash varlen attention exists in this torch and a CUDA device is there to run it."""
    return torch.cuda.is_available() and _varlen_options() is not None


def set_training_backends() -> list[str]:
    """Process-wide CUDA settings for training, set where training starts (never by building a model);
    returns what was set, for the log (nothing without CUDA)."""
    if not torch.cuda.is_available():
        return []
    # cuDNN's attention builds an execution plan for every new sequence length (milliseconds of CPU
    # per layer call); with dynamic padding almost every call is new. The flash and memory-efficient
    # kernels need no plan: 1.7x faster steps at batch 2 on an H100 (benchmarks/NOTES.md).
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 logits of the loss (see `LatentActor.logits`)
    return ["torch.backends.cuda.enable_cudnn_sdp(False)", "torch.backends.cuda.matmul.allow_tf32 = True"]


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` [B, K, ...] zero-padded along dim 1 to at least `rows` rows."""
    return torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[1])) if t.shape[1] < rows else t


def shift_left(ids: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor, pad_id: int):
    """Row b of the result is `ids[b, start[b]:lengths[b]]`, left-aligned and padded: (ids, lengths)."""
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    src = (pos + start[:, None]).clamp(max=max(ids.shape[1] - 1, 0))
    new_lengths = (lengths - start).clamp_min(0)
    out = torch.where(pos < new_lengths[:, None], ids.gather(1, src) if ids.shape[1] else ids, pad_id)
    return out, new_lengths


@dataclass
class StepDraws:
    """A training step's random choices, drawn by the trainer (its seeded, resumable streams) before the forward.

    `mix_ratio` [B]: each sample's latent share (round(r*K) latent rows, then the plan from round(r*P) on).
    The negative (None without the contrast term): per sample the latents of another one (`negative_lengths`
    rows; for the published negative already cut or tiled to the sample's own K) and `has_negative` [B]."""

    mix_ratio: torch.Tensor
    negative_latents: torch.Tensor | None = None
    negative_lengths: torch.Tensor | None = None
    has_negative: torch.Tensor | None = None


@dataclass
class BranchOutput:
    """Final hidden states at the positions that predict supervised labels, in batch order."""

    hidden: torch.Tensor  # [N, H]
    labels: torch.Tensor  # [N]
    sample_index: torch.Tensor  # [N] row of the batch each position belongs to


@dataclass
class BranchLayout:
    """What the host must know to lay out one branch's forward: read from the device for all branches of a step
    at once (`LatentActor.loss_step`), they spare each branch a wait for it."""

    longest: int  # longest assembled row
    total: int  # tokens of all assembled rows
    supervised: int  # supervised positions


class LatentActor(nn.Module):
    """A causal LM plus a `LatentCommHead`; `forward` runs one branch and returns supervised hidden states."""

    def __init__(self, base_model: nn.Module, head: LatentCommHead, tokenizer):
        super().__init__()
        self.base_model = base_model
        self.head = head
        self.tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.marker_id, self.bop_id, self.eop_id = ids
        self.pad_id = tokenizer.pad_token_id
        self.packed = False
        self.cuda_graphs = False  # compiled layers replay CUDA graphs; packed rows padded to few lengths
        self.packed_tokens: tuple[int, int] | None = None  # the last packed row's (real, total) tokens

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_base(cls, base_model: nn.Module, tokenizer, latent_dim: int | None = None, num_heads: int = 8,
                  prepended_length: int = PREPENDED_LENGTH, dropout: float = 0.1) -> "LatentActor":
        """Add the special tokens (resizing embeddings only if needed) and attach a fresh head."""
        add_special_tokens(tokenizer)
        if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
            base_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        hidden = base_model.get_input_embeddings().weight.shape[1]
        head = LatentCommHead(HeadConfig(latent_dim or hidden, hidden, num_heads, prepended_length, dropout))
        return cls(base_model, head, tokenizer)

    @property
    def config(self):
        return self.base_model.config

    @property
    def _no_split_modules(self):
        """The decoder layer classes: what FSDP's automatic wrapping shards as one unit each."""
        return getattr(self.base_model, "_no_split_modules", None)

    @property
    def device(self) -> torch.device:
        return self.head.pre_ln.weight.device

    def activation_checkpointing_enable(self, **kwargs):
        """Checkpoint the base model's layers (the Trainer calls this by either name, per version)."""
        fn = getattr(self.base_model, "activation_checkpointing_enable", None)  # transformers >= 5.24
        (fn or self.base_model.gradient_checkpointing_enable)(**kwargs)
        self.base_model.config.use_cache = False

    gradient_checkpointing_enable = activation_checkpointing_enable

    def gradient_checkpointing_disable(self):
        self.base_model.gradient_checkpointing_disable()

    def use_packed_sequences(self, enabled: bool = True) -> "LatentActor":
        """Run each branch as one row of concatenated samples (no padding, no [T x T] mask); see
        `packed_attention`. Generation and other callers of the base model keep plain SDPA."""
        if enabled:
            register_packed_attention()
            self.base_model.set_attn_implementation(PACKED_ATTENTION)
        self.packed = enabled
        return self

    def compile_layers(self, cuda_graphs: bool = False) -> "LatentActor":
        """`torch.compile` each decoder layer (dynamic shapes): fuses the norms, rotary embedding and
        activation casts, and cuts the per-op launch cost that dominates small batches.

        `cuda_graphs` (packed rows on CUDA): the layers replay CUDA graphs (torch.compile's "reduce-overhead"),
        one launch per layer and pass instead of dozens; a graph replays one shape, so each packed row is
        padded to one of a few lengths (`graph_row_length`)."""
        if cuda_graphs and not self.packed:
            raise ValueError("CUDA graphs need packed rows (use_packed_sequences): padded rows vary in shape")
        for layer in self.base_model.get_decoder().layers:
            layer.compile(dynamic=True, mode="reduce-overhead" if cuda_graphs else None)
        self.cuda_graphs = cuda_graphs
        return self

    def add_lora(self, r: int, alpha: float, dropout: float = 0.0, target_modules: str | list[str] = "all-linear"):
        """Wrap the base model with LoRA adapters (peft); the new special tokens' embedding rows and the
        head stay fully trainable, everything else of the base model is frozen."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                            task_type="CAUSAL_LM", trainable_token_indices=[self.marker_id, self.bop_id, self.eop_id])
        self.base_model = get_peft_model(self.base_model, config)
        return self

    @property
    def is_lora(self) -> bool:
        return hasattr(self.base_model, "peft_config")

    def merge_lora(self) -> None:
        """Fold the adapters into the base weights: the output folder is then a plain HF model."""
        if self.is_lora:
            self.base_model = self.base_model.merge_and_unload()

    # -- the forward pass -----------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, latent_slots: torch.Tensor, latents: torch.Tensor | None,
              latent_lengths: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with row b's processed latent rows written, in order, into its slots."""
        embeds = self.base_model.get_input_embeddings()(input_ids)
        if latents is None:
            return embeds
        processed = self.head(latents, latent_lengths)
        # The k-th slot of row b takes processed row k: index arithmetic, no boolean indexing (which
        # would wait for the device to learn how many rows there are).
        k = (latent_slots.cumsum(1) - 1).clamp(0, processed.shape[1] - 1)
        rows = processed.gather(1, k[..., None].expand(-1, -1, processed.shape[-1]))
        return torch.where(latent_slots[..., None], rows.to(embeds.dtype), embeds)  # cast: float32 rows crash a bf16 model

    def forward(self, *args, draws: StepDraws | None = None, loss_config: LossConfig | None = None,
                output: str = "branch", **kwargs):
        """One call of the (wrapped) model, where FSDP has gathered what it shards. With `draws`: the training
        step (`loss_step(batch=..., draws, loss_config)`). Else one branch (`branch`'s arguments), returned as
        `output`: "branch" (`BranchOutput`), "logits" (its supervised rows' vocabulary logits) or
        "token_scores" (`token_scores`: what the evaluation needs)."""
        if draws is not None:
            return self.loss_step(*args, draws=draws, loss_config=loss_config, **kwargs)
        if output == "token_scores":
            return self.token_scores(*args, **kwargs)
        out = self.branch(*args, **kwargs)
        if output == "logits":
            return self.logits(out.hidden)
        if output != "branch":
            raise ValueError(f"output={output!r}: expected branch, logits or token_scores")
        return out

    def token_scores(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One branch (`branch`'s arguments): each supervised token's CE (nats), whether it is the arg-max
        prediction, and its sample index, all [rows]; the vocabulary projection a chunk of rows at a time."""
        out = self.branch(*args, **kwargs)
        ce, hit = [out.hidden.new_zeros(0)], [torch.zeros(0, dtype=torch.bool, device=out.labels.device)]
        for s in range(0, out.labels.shape[0], LOSS_CHUNK_SIZE):
            logits, labels = self.logits(out.hidden[s:s + LOSS_CHUNK_SIZE]), out.labels[s:s + LOSS_CHUNK_SIZE]
            ce.append(token_ce(logits, labels))
            hit.append(logits.argmax(-1) == labels)
        return torch.cat(ce), torch.cat(hit), out.sample_index

    def loss_step(self, batch: dict[str, torch.Tensor], draws: StepDraws, loss_config: LossConfig) -> LossSums:
        """The three branches of one batch and their loss sums (`losses.latent_comm_losses`).

        positive (with gradient): round(r*K) latent rows, then the plan tokens from round(r*P) on;
        plan (no gradient): the plan text between <bop>/<eop>;
        negative (no gradient): another sample's latents in the positive's latent rows, then the positive's own
        plan suffix (`negative_form` published), or the other sample's latents alone (latents_only).
        Every branch supervises the same tokens in the same order: row k of each is the same target token.
        The step waits for the device once, for the sizes of both forwards (`BranchLayout`)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the graphs' earlier outputs are spent
        text = {k: batch[k] for k in TEXT_KEYS}
        latents, latent_lengths = batch["latents"], batch["latent_lengths"]
        plan_ids, plan_lengths = batch["plan_ids"], batch["plan_lengths"]
        has_latent, has_plan, no_rows = latent_lengths > 0, plan_lengths > 0, torch.zeros_like(latent_lengths)
        # Samples without a plan read pure latents; samples without latents the plan.
        ratio = torch.where(has_latent, torch.where(has_plan, draws.mix_ratio, 1.0), 0.0)
        latent_rows = torch.round(ratio * latent_lengths).long()
        block_ids, block_lengths = shift_left(plan_ids, plan_lengths, torch.round(ratio * plan_lengths).long(),
                                              self.pad_id)
        positive = dict(latents=latents, latent_lengths=latent_lengths, latent_rows=latent_rows, block_ids=block_ids,
                        block_lengths=block_lengths)
        targets = {}  # the no-grad branches, run as one forward (batch stacked): half the launches of two
        if loss_config.plan_similarity_weight:
            targets["plan"] = dict(latents=latents, latent_lengths=no_rows, block_ids=plan_ids,
                                   block_lengths=plan_lengths)
        found = draws.has_negative
        if draws.negative_latents is not None and loss_config.negative_form == "published":
            targets["negative"] = dict(latents=draws.negative_latents, latent_lengths=latent_lengths * found,
                                       latent_rows=latent_rows * found, block_ids=block_ids,
                                       block_lengths=block_lengths)
        elif draws.negative_latents is not None:
            targets["negative"] = dict(latents=draws.negative_latents, latent_lengths=draws.negative_lengths,
                                       block_ids=plan_ids[:, :0], block_lengths=no_rows)
        forwards = [(text, positive)] + ([self._stack_branches(text, list(targets.values()))] if targets else [])
        layouts = self._layouts(forwards)
        pos = self.branch(**text, **positive, layout=layouts[0])
        hidden = {}
        if targets:
            with torch.no_grad():
                stacked_text, stacked = forwards[1]
                out = self.branch(**stacked_text, **stacked, layout=layouts[1])
            hidden = dict(zip(targets, out.hidden.chunk(len(targets))))
        row = pos.sample_index
        inputs = LossInputs(pos.hidden, pos.labels, sample_index=row,
                            plan_hidden=hidden.get("plan"), plan_mask=has_plan[row],
                            neg_hidden=hidden.get("negative"),
                            neg_mask=None if found is None else (found & has_latent)[row])
        return latent_comm_losses(inputs, loss_config, self.logits, self.output_weight())

    def _layouts(self, forwards: list[tuple[dict, dict]]) -> list[BranchLayout]:
        """The `BranchLayout` of each (text, branch) forward, read from the device at once."""
        sizes = []
        for text, branch in forwards:
            text_lengths = text["attention_mask"].sum(1)
            lengths = assembled_lengths(text_lengths, branch.get("latent_rows", branch["latent_lengths"]),
                                        branch["block_lengths"])
            keep = supervised_text_positions(text["labels"], text_lengths, text["marker_index"])
            sizes += [lengths.max(), lengths.sum(), keep.sum()]
        values = read_sizes(*sizes)
        return [BranchLayout(*values[i:i + 3]) for i in range(0, len(values), 3)]

    def _stack_branches(self, text: dict[str, torch.Tensor], branches: list[dict]) -> tuple[dict, dict]:
        """Several branches of one batch (each: latents, latent_lengths, block_ids, block_lengths, and latent_rows
        where fewer than latent_lengths) as one batch, stacked: (text, branch) arguments of one `branch` call."""
        width = max(b["block_ids"].shape[1] for b in branches)
        rows = max(b["latents"].shape[1] for b in branches)
        pad_ids = lambda ids: torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)  # noqa: E731
        stacked = dict(latents=torch.cat([pad_rows(b["latents"], rows) for b in branches]),
                       latent_lengths=torch.cat([b["latent_lengths"] for b in branches]),
                       latent_rows=torch.cat([b.get("latent_rows", b["latent_lengths"]) for b in branches]),
                       block_ids=torch.cat([pad_ids(b["block_ids"]) for b in branches]),
                       block_lengths=torch.cat([b["block_lengths"] for b in branches]))
        return {k: torch.cat([v] * len(branches)) for k, v in text.items()}, stacked

    def stacked_branches(self, text: dict[str, torch.Tensor], branches: list[dict]) -> list[torch.Tensor]:
        """Several branches of one batch (each: latents, latent_lengths, block_ids, block_lengths, and
        latent_rows where fewer than latent_lengths) as one forward, stacked along the batch; returns each
        branch's supervised hidden states (the same positions of the same conversations, in batch order)."""
        if not branches:
            return []
        stacked_text, stacked = self._stack_branches(text, branches)
        return list(self.branch(**stacked_text, **stacked).hidden.chunk(len(branches)))

    def branch(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
               marker_index: torch.Tensor, latents: torch.Tensor | None = None,
               latent_lengths: torch.Tensor | None = None, latent_rows: torch.Tensor | None = None,
               block_ids: torch.Tensor | None = None, block_lengths: torch.Tensor | None = None,
               layout: BranchLayout | None = None) -> BranchOutput:
        """Assemble one branch (`latent_rows` latents then `block_ids` between <bop>/<eop>) and run the LM.
        `layout`: its sizes, when the caller read them (else this waits for the device once)."""
        if latent_rows is None:
            latent_rows = torch.zeros_like(marker_index)
        text_lengths = attention_mask.sum(1)
        lengths = assembled_lengths(text_lengths, latent_rows, block_lengths)
        keep = supervised_text_positions(labels, text_lengths, marker_index)
        if layout is None:
            layout = BranchLayout(*read_sizes(lengths.max(), lengths.sum(), keep.sum()))
        batch = assemble_inputs(input_ids, labels, text_lengths, marker_index, latent_rows, block_ids,
                                block_lengths, self.bop_id, self.eop_id, self.pad_id, width=layout.longest)
        embeds = self.embed(batch["input_ids"], batch["latent_slots"], latents, latent_lengths)
        # The supervised text tokens, and the assembled positions that predict them (one before each: text
        # after the marker moved past the latent block).
        rows, text_cols = true_positions(keep, layout.supervised)
        block = latent_rows + 1 if block_lengths is None else latent_rows + block_lengths + 1
        cols = torch.where(text_cols < marker_index[rows], text_cols, text_cols + block[rows]) - 1
        hidden = self.backbone(embeds, batch["attention_mask"], rows=rows, cols=cols, lengths=lengths,
                               total_tokens=layout.total)
        return BranchOutput(hidden, labels[rows, text_cols], rows)

    def backbone(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, lengths: torch.Tensor | None = None, total_tokens: int | None = None
                 ) -> torch.Tensor:
        """Final (normed) hidden states of the base model at positions (`rows`, `cols`) of the [B, T] inputs:
        [N, H]; no cache, no logits.

        Packed (`use_packed_sequences`): rows must be right-padded; their `lengths` [B] and `total_tokens` (their
        sum), when the caller knows them, spare a wait for the device."""
        decoder = self.base_model.get_decoder()
        if not self.packed:
            return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           use_cache=False).last_hidden_state[rows, cols]
        # Packed: the valid tokens of all rows as one row; positions restart at every sample.
        width = attention_mask.shape[1]
        lengths = attention_mask.sum(1) if lengths is None else lengths
        total_tokens = int(lengths.sum()) if total_tokens is None else total_tokens
        longest = _bucket(width)  # an upper bound is enough for the kernel, and few values: few recompiles
        row = pack_rows(lengths, total_tokens, width, longest if self.cuda_graphs else None)
        embeds = inputs_embeds.flatten(0, 1)[row.source]
        if row.real is not None:
            embeds = torch.where(row.real[:, None], embeds, 0.0)
        self.packed_tokens = (row.real_tokens, row.length)
        cu = row.cu.int()
        # A 4-D mask is taken as given (transformers' masking_utils), which spares its check for packed
        # positions (a wait for the device); packed rows need no mask (`packed_attention` ignores it).
        packed = decoder(inputs_embeds=embeds[None], position_ids=row.position[None],
                         attention_mask=embeds.new_ones((1, 1, 1, 1), dtype=torch.bool), use_cache=False,
                         cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                         max_length_k=longest).last_hidden_state[0]
        return packed[row.cu[rows] + cols]

    def output_weight(self) -> torch.Tensor | None:
        """The LM head's weight [V, H] when the head is a plain bias-free linear map (the fused loss
        needs exactly that), else None (e.g. a head wrapped by adapters)."""
        head = self.base_model.get_output_embeddings()
        return head.weight if type(head) is nn.Linear and head.bias is None else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states. With float32 weights they are computed in float32 (TF32 on
        GPUs) even inside bf16 autocast: bf16 logits put ~1% error into the KL/JS terms."""
        head = self.base_model.get_output_embeddings()
        if head.weight.dtype != torch.float32:
            return head(hidden)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return head(hidden.float())

    # -- saving and loading -----------------------------------------------------------------
    def save_pretrained(self, output_dir: str, save_tokenizer: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the base model (`save_pretrained`), the tokenizer and the head (`latent_comm_head.pt` and
        `latent_comm_head.safetensors`, the same weights).

        `state_dict`: this actor's full weights when its own are sharded (gathered by FSDP on one rank).

        Written whole or not at all (`safe_io.staged_folder`): a failed save (full disk) leaves the folder's
        earlier model as it was; a kill while the files are moved in leaves a marker that loading refuses,
        so weights of one run never pass with the head of another."""
        from common.safe_io import staged_folder

        part = lambda prefix: None if state_dict is None else {
            k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        with staged_folder(output_dir, replaces=("model", "adapter_model", "pytorch_model")) as stage:
            self.base_model.save_pretrained(stage, state_dict=part("base_model."))
            if save_tokenizer:
                self.tokenizer.save_pretrained(stage)
            head_state = part("head.") or self.head.state_dict()
            save_head(self.head.config, head_state, os.path.join(stage, HEAD_FILE))
            save_head_safetensors(self.head.config, head_state, os.path.join(stage, HEAD_SAFETENSORS_FILE))

    def load_weights(self, checkpoint_dir: str) -> None:
        """Load base-model and head weights saved by `save_pretrained` into this actor (resume, best model)."""
        from safetensors.torch import load_file

        from common.safe_io import check_model_folder

        check_model_folder(checkpoint_dir)  # a corrupt, truncated or half-replaced file: one line, before any load

        if self.is_lora:  # a LoRA checkpoint holds the adapters (and new token rows) only
            from peft import set_peft_model_state_dict

            adapters = load_file(os.path.join(checkpoint_dir, "adapter_model.safetensors"))
            result = set_peft_model_state_dict(self.base_model, adapters)
            if result.unexpected_keys:
                raise RuntimeError(f"{checkpoint_dir}: adapter weights do not match: {result.unexpected_keys}")
            self.head.load_state_dict(load_head_file(os.path.join(checkpoint_dir, HEAD_FILE))["state_dict"])
            return

        index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
        files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
            else ["model.safetensors"]
        state = {}
        for name in files:
            state.update(load_file(os.path.join(checkpoint_dir, name)))
        result = self.base_model.load_state_dict(state, strict=False)
        # Tied output embeddings are saved once; anything else missing means a different model.
        tied = {k for k in result.missing_keys if "lm_head" in k}
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise RuntimeError(f"{checkpoint_dir}: weights do not match the model: {result}")
        if tied:
            self.base_model.tie_weights()
        state = load_head_file(os.path.join(checkpoint_dir, HEAD_FILE))
        self.head.load_state_dict(state["state_dict"])

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None) -> "LatentActor":
        """Restore an actor saved by `save_pretrained`: base model + head + tokenizer. `path` is a folder or a
        hub id (from the Hugging Face cache, or downloaded when the hub can be reached)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from common.safe_io import DataError

        path, state = resolve_actor_dir(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
            head = LatentCommHead(HeadConfig(**state["config"]))
            head.load_state_dict(state["state_dict"])
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise DataError(f"{path}: cannot be loaded as an actor ({type(e).__name__}: {detail})") from None
        actor = cls(base, head, tokenizer)
        if device is not None:
            actor.to(device)
        return actor.eval()


def add_special_tokens(tokenizer) -> None:
    """Register the marker and block delimiters as single special tokens, and a pad token."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def save_head(config: HeadConfig, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """A plain dict of tensors plus the head's configuration: loadable with `weights_only=True`."""
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path + ".tmp"
    torch.save({"config": asdict(config), "state_dict": state}, tmp)
    os.replace(tmp, path)  # never leave a half-written head in place of a good one


def save_head_safetensors(config: HeadConfig, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """The head as safetensors, its configuration as JSON in the file's metadata (`interlat_head_config`).
    Written in place: `save_pretrained` writes it into a staging folder, which is what makes the save whole."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(state, path, metadata={"format": "pt", "interlat_head_config": json.dumps(asdict(config))})


def load_head_safetensors(path: str) -> dict:
    """`latent_comm_head.safetensors` as `load_head_file` returns the `.pt`: {"config", "state_dict"}."""
    from safetensors import safe_open

    from common.safe_io import DataError, check_safetensors_file

    check_safetensors_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        config = json.loads(metadata["interlat_head_config"])
        HeadConfig(**config)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: no valid head configuration in its metadata ({type(e).__name__})") from None
    return {"config": config, "state_dict": state}


def resolve_actor_dir(path: str, what: str = "") -> tuple[str, dict]:
    """An actor's folder (a hub id resolved to its snapshot: `models.resolve_model_dir`) with every artifact
    checked (`safe_io.check_model_folder`: reads safely, no save cut short), and its head file
    (`latent_comm_head.pt`, or the safetensors copy when it is alone). `DataError` (one line) otherwise;
    `what` names the folder in messages (e.g. "--model_dir")."""
    from common.models import ModelNotFoundError, resolve_model_dir
    from common.safe_io import DataError, check_model_folder

    try:
        path = resolve_model_dir(path, what or "actor")
    except ModelNotFoundError as e:
        raise DataError(str(e)) from None
    check_model_folder(path, what)
    only_safetensors = not os.path.lexists(os.path.join(path, HEAD_FILE)) and \
        os.path.exists(os.path.join(path, HEAD_SAFETENSORS_FILE))
    state = load_head_safetensors(os.path.join(path, HEAD_SAFETENSORS_FILE)) if only_safetensors \
        else load_head_file(os.path.join(path, HEAD_FILE))
    return path, state


def load_head_file(path: str) -> dict:
    """`latent_comm_head.pt` read with `weights_only=True`; a missing, corrupt or foreign file is a `DataError`."""
    from common.safe_io import DataError, load_torch_file

    if not os.path.lexists(path):
        raise DataError(f"{path}: no latent head here; is this an output folder of train_actor.py?")
    state = load_torch_file(path)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict)
            and isinstance(state.get("state_dict"), dict)
            and all(isinstance(v, torch.Tensor) for v in state["state_dict"].values())):
        raise DataError(f"{path}: not a latent head file (expected a dict with 'config' and 'state_dict' of tensors)")
    try:
        config = HeadConfig(**state["config"])
    except TypeError as e:
        raise DataError(f"{path}: the head's config is not valid ({e})") from None
    if not all(isinstance(v, int) and v > 0 for v in (config.latent_dim, config.hidden_size, config.num_heads,
                                                      config.prepended_length)):
        raise DataError(f"{path}: the head's config is not valid ({state['config']})")
    return state
