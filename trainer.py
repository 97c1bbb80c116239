"""`LatentActorTrainer`: a `transformers.Trainer` whose `compute_loss` runs the three branches.

positive (with gradient): the curriculum mix of latents and plan tokens;
plan (no gradient): the plan text between <bop>/<eop>;
negative (no gradient): the positive's layout with another sample's latents (any rank; never the sample's
own) in its latent rows, then the sample's own plan suffix (as published; `--negative_form`).
Loss terms come from `losses.py`; every component is logged the Trainer way (see `log`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
from transformers import Trainer

import loss_kernel
from data import RankBalancedLengthSampler
from latent_head import LatentActor
from losses import LN2, chunk_values_and_grad, fused_latent_comm_loss_sums, latent_comm_loss_sums
from safe_io import INCOMPLETE_MARKER

logger = logging.getLogger(__name__)


@dataclass
class LossConfig:
    plan_similarity_weight: float = 1.0
    random_contrast_weight: float = 2.0
    mix_ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    pure_latent_prob: float = 0.5  # share of training samples that see pure latents (ratio 1)
    loss_chunk_size: int | None = 1024
    fused_loss: bool = True  # closed-form gradients per chunk (bias-free linear LM heads); else autograd
    loss_kernel: str = "auto"  # the fused chunk: "triton", "compile", "eager"; auto: triton/compile on CUDA, else eager
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


def draw_mix_ratios(batch_size: int, mix_ratios: tuple[float, ...], pure_latent_prob: float,
                    generator: torch.Generator) -> torch.Tensor:
    """A fresh ratio per sample: 1.0 with probability `pure_latent_prob`, else uniform over `mix_ratios`."""
    device = generator.device
    choices = torch.tensor(mix_ratios, dtype=torch.float32, device=device)
    ratios = choices[torch.randint(len(choices), (batch_size,), generator=generator, device=device)]
    pure = torch.rand(batch_size, generator=generator, device=device) < pure_latent_prob
    return torch.where(pure, torch.ones_like(ratios), ratios)


def shift_left(ids: torch.Tensor, lengths: torch.Tensor, start: torch.Tensor, pad_id: int):
    """Row b of the result is `ids[b, start[b]:lengths[b]]`, left-aligned and padded: (ids, lengths)."""
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    src = (pos + start[:, None]).clamp(max=max(ids.shape[1] - 1, 0))
    new_lengths = (lengths - start).clamp_min(0)
    out = torch.where(pos < new_lengths[:, None], ids.gather(1, src) if ids.shape[1] else ids, pad_id)
    return out, new_lengths


def pick_negatives(own_index: torch.Tensor, candidate_valid: torch.Tensor, bank_valid: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, a random candidate that is not itself (bank entries only when no other exists).

    `own_index` [B] indexes the sample's own entry in the pool [M]; `candidate_valid` [M]
    marks pool entries with latents; `bank_valid` [M_bank] marks latents kept from an
    earlier batch (indices M...M+M_bank-1). Returns (index into pool+bank [B], found [B]).
    """
    m = candidate_valid.shape[0]
    others = candidate_valid[None, :] & (torch.arange(m, device=own_index.device)[None, :] != own_index[:, None])
    has_other = others.any(1)
    bank = bank_valid[None, :] & ~has_other[:, None]
    weights = torch.cat([others, bank], dim=1).float()
    found = weights.sum(1) > 0
    weights[~found, 0] = 1.0  # placeholder draw for rows without any candidate; masked out by `found`
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), found


NEGATIVE_NOISE_STD = 0.01  # the published noise on a donor's latents repeated to a longer sample


def fit_donor_latents(donor: torch.Tensor, donor_lengths: torch.Tensor, lengths: torch.Tensor, rows: int,
                      generator: torch.Generator, noise_std: float | None = None) -> torch.Tensor:
    """Donor latents [B, K_d, d] cut or tiled to each sample's own length `lengths` [B], as [B, rows, d].

    As published: a longer donor is cut to the sample's K; a shorter one is repeated (row k takes donor
    row k mod K_d) and, being repeated, gets N(0, noise_std^2) noise on every row. Rows past a sample's
    own length are padding.
    """
    noise_std = NEGATIVE_NOISE_STD if noise_std is None else noise_std
    k = torch.arange(rows, device=donor.device)[None, :] % donor_lengths.clamp_min(1)[:, None]
    fitted = _pad_rows(donor, 1).gather(1, k[..., None].expand(-1, -1, donor.shape[-1]))
    tiled = (donor_lengths < lengths)[:, None, None]
    noise = torch.randn(fitted.shape, generator=generator, device=donor.device, dtype=fitted.dtype) * noise_std
    return torch.where(tiled, fitted + noise, fitted)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[1])) if t.shape[1] < rows else t


def resolve_loss_kernel(choice: str, device_type: str) -> str:
    """`--loss_kernel` on a device. On CUDA the chunk's ~30 elementwise passes over [chunk, vocab] float32
    logits are memory-bound: the Triton kernel makes them 3 passes, torch.compile about 10; so `auto` is
    triton on CUDA where triton is installed, else compile on CUDA, else eager."""
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


def checkpoint_is_complete(path: str, weights_file: str = "latent_comm_head.pt") -> bool:
    """The Trainer writes `trainer_state.json` last: a checkpoint whose state parses was fully written
    (`weights_file`: the file of our own that it must hold too), and no save into it was cut short
    (`safe_io.INCOMPLETE_MARKER`)."""
    if os.path.exists(os.path.join(path, INCOMPLETE_MARKER)):
        return False
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
        return os.path.exists(os.path.join(path, weights_file))
    except (OSError, ValueError):
        return False


def resolve_resume(value: str | None, output_dir: str, weights_file: str = "latent_comm_head.pt") -> str | None:
    """`--resume_from_checkpoint` as a folder: `true`/`latest` pick the newest *complete* checkpoint.

    A checkpoint left half-written by a killed process is never picked, and naming one is an error.
    """
    if not value or value.lower() in ("false", "none"):
        return None
    if value.lower() in ("true", "latest"):
        steps = sorted((int(m.group(1)), name) for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                       if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
        complete = [os.path.join(output_dir, name) for _, name in steps
                    if checkpoint_is_complete(os.path.join(output_dir, name), weights_file)]
        for _, name in steps:
            if os.path.join(output_dir, name) not in complete:
                logger.warning("Ignoring %s: it was not completely written", os.path.join(output_dir, name))
        if not complete:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return complete[-1]
    if not checkpoint_is_complete(value, weights_file):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (missing or "
                                f"half-written trainer_state.json / {weights_file})")
    return value


class LatentActorTrainer(Trainer):
    """HF Trainer for a `LatentActor`, adding plan-similarity and random-contrast terms."""

    def __init__(self, *args, loss_config: LossConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config or LossConfig()
        # Our loss is a sum over supervised tokens divided by `num_items_in_batch`, the token count of
        # the whole optimizer step (all accumulation micro-batches, all ranks). Saying the model
        # "accepts loss kwargs" makes the Trainer count them and not divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True
        self._metric_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None  # latents kept for batch-size-1 negatives
        self._draw_key = (-1, 0)  # (global_step, micro-batch within it) -> random stream
        self._eval_draws = 0  # batches seen in the current evaluation
        self.step_sample_indices: list[torch.Tensor] = []  # dataset rows of the current optimizer step
        self._compiled_chunk_fn = None  # built on first use (see `_chunk_fn`)

    # -- randomness that survives resumption: a stream per (seed, rank, step, micro-batch) ------------
    def _generator(self, device: torch.device) -> torch.Generator:
        if self.model.training:
            step, micro = self._draw_key
            micro = micro + 1 if step == self.state.global_step else 0
            self._draw_key = (self.state.global_step, micro)
            key = f"{self.args.seed}/{self.args.process_index}/train/{self.state.global_step}/{micro}"
        else:  # every evaluation draws the same negatives: eval metrics compare across steps
            self._eval_draws += 1
            key = f"{self.args.seed}/{self.args.process_index}/eval/{self._eval_draws}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
        # On the batch's device: draws need no host round trip (no sync in the step).
        return torch.Generator(device=device).manual_seed(seed)

    # -- negatives from every rank ----------------------------------------------------------------------
    def _negatives(self, latents: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator, max_rows: int):
        """Donor latents [B, K, d], their lengths [B], and whether a donor was found [B]."""
        own = torch.arange(lengths.shape[0], device=lengths.device)
        pool, pool_lengths = latents, lengths
        if self.accelerator.num_processes > 1:
            # One tensor all-gather (never pickled objects) of shapes every rank knows without asking the
            # others: the configured batch size and the head's row limit `max_rows`. Exchanging the actual
            # shapes first would make every step wait for the device.
            args = self.args
            batch = args.per_device_train_batch_size if self.model.training else args.per_device_eval_batch_size
            if latents.shape[0] > batch or latents.shape[1] > max_rows:
                raise ValueError(f"a batch of {tuple(latents.shape[:2])} latents exceeds ({batch}, {max_rows})")
            padded = torch.nn.functional.pad(latents, (0, 0, 0, max_rows - latents.shape[1],
                                                       0, batch - latents.shape[0]))
            padded_lengths = torch.nn.functional.pad(lengths, (0, batch - lengths.shape[0]))  # 0: not a candidate
            pool, pool_lengths = self.accelerator.gather(padded), self.accelerator.gather(padded_lengths)
            own = own + self.accelerator.process_index * batch
        bank_latents, bank_lengths = self._bank if self._bank is not None else (pool[:0], pool_lengths[:0])
        rows = max(pool.shape[1], bank_latents.shape[1])
        everything = torch.cat([_pad_rows(pool, rows), _pad_rows(bank_latents, rows)])
        all_lengths = torch.cat([pool_lengths, bank_lengths])
        donor, found = pick_negatives(own, pool_lengths > 0, bank_lengths > 0, gen)
        self.last_negatives = {"own": own, "donor": donor, "found": found, "pool_size": pool.shape[0]}
        if self.model.training:
            self._bank = (latents.detach(), lengths.detach())
        return everything[donor], all_lengths[donor] * found, found

    # -- the loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The whole step runs inside one call of the (DDP- or FSDP-wrapped) model: FSDP gathers its
        # sharded parameters only there, and the loss projects with the LM head's weight directly.
        # One autocast region: also for evaluation, where the model's forward is not autocast-wrapped.
        with self.accelerator.autocast():
            loss = model(compute=lambda actor: self._three_branch_loss(actor, inputs, num_items_in_batch))
        return (loss, {"loss": loss}) if return_outputs else loss

    def _three_branch_loss(self, actor: LatentActor, inputs, num_items_in_batch):
        cfg = self.loss_config
        gen = self._generator(inputs["latent_lengths"].device)
        text = {k: inputs[k] for k in ("input_ids", "labels", "attention_mask", "marker_index")}
        latents, latent_lengths = inputs["latents"], inputs["latent_lengths"]
        plan_ids, plan_lengths = inputs["plan_ids"], inputs["plan_lengths"]
        has_latent, has_plan = latent_lengths > 0, plan_lengths > 0

        # Curriculum: first round(r*K) latent rows, then the plan tokens from round(r*P) on.
        # Evaluation (and samples without a plan) use pure latents; samples without latents the plan.
        if actor.training:
            ratio = draw_mix_ratios(len(latent_lengths), cfg.mix_ratios, cfg.pure_latent_prob, gen)
        else:
            ratio = torch.ones(len(latent_lengths), device=latent_lengths.device)
        ratio = torch.where(has_plan, ratio, 1.0)
        ratio = torch.where(has_latent, ratio, 0.0)
        latent_rows = torch.round(ratio * latent_lengths).long()
        block_ids, block_lengths = shift_left(plan_ids, plan_lengths, torch.round(ratio * plan_lengths).long(),
                                              actor.pad_id)
        pos = actor.branch(**text, latents=latents, latent_lengths=latent_lengths, latent_rows=latent_rows,
                           block_ids=block_ids, block_lengths=block_lengths)

        plan_hidden = neg_hidden = plan_mask = neg_mask = None
        with torch.no_grad():
            # The plan and negative branches share one forward (batch stacked twice): half the
            # per-layer launch and CPU cost of two passes, and larger matrix products.
            branches = {}
            no_rows = torch.zeros_like(latent_lengths)
            if cfg.plan_similarity_weight:
                branches["plan"] = dict(latents=latents, latent_lengths=no_rows, block_ids=plan_ids,
                                        block_lengths=plan_lengths)
            if cfg.random_contrast_weight:
                neg_latents, neg_lengths, found = self._negatives(latents, latent_lengths, gen,
                                                                  actor.head.config.prepended_length)
                if cfg.negative_form == "published":
                    # The positive's layout with the donor's latents in its latent rows: same round(r*K)
                    # rows, same own plan suffix; the donor is cut or tiled to the sample's own K.
                    neg_latents = fit_donor_latents(neg_latents, neg_lengths, latent_lengths, latents.shape[1], gen)
                    branches["negative"] = dict(latents=neg_latents, latent_lengths=latent_lengths * found,
                                                latent_rows=latent_rows * found, block_ids=block_ids,
                                                block_lengths=block_lengths)
                else:
                    branches["negative"] = dict(latents=neg_latents, latent_lengths=neg_lengths,
                                                block_ids=plan_ids[:, :0], block_lengths=no_rows)
            hidden = dict(zip(branches, self._stacked_no_grad_forward(actor, text, list(branches.values()))))
            if "plan" in hidden:
                plan_hidden, plan_mask = hidden["plan"], has_plan[pos.sample_index]
            if "negative" in hidden:
                neg_hidden, neg_mask = hidden["negative"], (found & has_latent)[pos.sample_index]

        weights = dict(chunk_size=cfg.loss_chunk_size, plan_weight=cfg.plan_similarity_weight,
                       contrast_weight=cfg.random_contrast_weight)
        output_weight = actor.output_weight()
        if cfg.fused_loss and output_weight is not None:
            cfg.check_loss_path()
            sums = fused_latent_comm_loss_sums(pos.hidden, pos.labels, output_weight, plan_hidden, plan_mask,
                                               neg_hidden, neg_mask, chunk_fn=self._chunk_fn(pos.hidden.device),
                                               matmul_dtype=self._loss_matmul_dtype(pos.hidden.device), **weights)
        else:  # the reference path: autograd through any LM head (e.g. one wrapped by adapters)
            sums = latent_comm_loss_sums(pos.hidden, pos.labels, actor.logits, plan_hidden, plan_mask,
                                         neg_hidden, neg_mask, contrast_divergence=cfg.contrast_divergence,
                                         loss_weighting=cfg.loss_weighting, sample_index=pos.sample_index,
                                         **weights)
        tokens = pos.labels.new_tensor(pos.labels.numel(), dtype=torch.float32)
        if num_items_in_batch is None:
            loss = sums.total / tokens.clamp_min(1)
        else:
            # DDP averages gradients over ranks, while num_items_in_batch counts every rank's tokens.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = sums.total / num_items_in_batch * scale
        if actor.training:
            self.step_sample_indices.append(inputs["index"])
        self._accumulate_metrics("train" if actor.training else "eval", sums, tokens)
        return loss

    def _loss_matmul_dtype(self, device: torch.device) -> torch.dtype:
        """The fused loss's projection operands: the training precision's (bf16 under bf16 on CUDA: the
        projections are a quarter of a large batch's GPU time in TF32), else float32."""
        choice = self.loss_config.loss_matmul_dtype
        if choice == "auto":
            return torch.bfloat16 if device.type == "cuda" and self.args.bf16 else torch.float32
        return getattr(torch, choice)

    def _chunk_fn(self, device: torch.device):
        """The fused loss's per-chunk function (see `resolve_loss_kernel`)."""
        kernel = resolve_loss_kernel(self.loss_config.loss_kernel, device.type)
        if kernel == "triton":
            return loss_kernel.chunk_values_and_grad
        if kernel == "eager":
            return chunk_values_and_grad
        if self._compiled_chunk_fn is None:
            self._compiled_chunk_fn = torch.compile(chunk_values_and_grad, dynamic=True)
        return self._compiled_chunk_fn

    def sample_ids(self, indices: list[torch.Tensor]) -> list[str]:
        """The ids of training-set rows, for messages about a batch."""
        rows = [int(i) for t in indices for i in t.tolist()]
        try:
            return [str(self.train_dataset.rows[i]["id"]) for i in rows]
        except (AttributeError, KeyError, IndexError):
            return [f"#{i}" for i in rows]

    @staticmethod
    def _stacked_no_grad_forward(actor: LatentActor, text: dict, branches: list[dict]) -> list[torch.Tensor]:
        """Run several branches of one batch (each: latents, latent_lengths, block_ids, block_lengths, and
        latent_rows where fewer than latent_lengths) as one forward, stacked along the batch; returns each
        branch's supervised hidden states."""
        if not branches:
            return []
        width = max(b["block_ids"].shape[1] for b in branches)
        rows = max(b["latents"].shape[1] for b in branches)
        pad_ids = lambda ids: torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=actor.pad_id)
        stack = lambda key: torch.cat([b[key] for b in branches])
        out = actor.branch(**{k: torch.cat([v] * len(branches)) for k, v in text.items()},
                           latents=torch.cat([_pad_rows(b["latents"], rows) for b in branches]),
                           latent_lengths=stack("latent_lengths"),
                           latent_rows=torch.cat([b.get("latent_rows", b["latent_lengths"]) for b in branches]),
                           block_ids=torch.cat([pad_ids(b["block_ids"]) for b in branches]),
                           block_lengths=stack("block_lengths"))
        # Every branch supervises the same positions of the same conversations, in batch order.
        return list(out.hidden.chunk(len(branches)))

    # -- metrics: detached sums per log period; averaged (and synced) only when logging ------------------
    def _add_metric_sums(self, mode: str, vec: torch.Tensor) -> None:
        """Add a step's detached metric sums to the log period's (no sync with the device)."""
        vec = vec.detach().float()
        self._metric_sums[mode] = vec if self._metric_sums[mode] is None else self._metric_sums[mode] + vec

    def _take_metric_sums(self, mode: str) -> torch.Tensor | None:
        """The log period's sums, summed over ranks, and a fresh period; None when nothing was added."""
        vec, self._metric_sums[mode] = self._metric_sums[mode], None
        if vec is not None and self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        return vec

    def _accumulate_metrics(self, mode, sums, tokens):
        self._add_metric_sums(mode, torch.stack([sums.ce, sums.plan_similarity, sums.random_contrast, sums.neg_ce,
                                                 sums.js, tokens, sums.plan_tokens, sums.contrast_tokens,
                                                 sums.ce_on_contrast]))

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        vec = self._take_metric_sums(mode)
        if vec is None:
            return {}
        ce, plan, contrast, neg_ce, js, tokens, plan_tokens, contrast_tokens, ce_on_contrast = vec.tolist()
        out = {"ce_loss": ce / max(tokens, 1)}
        if plan_tokens:
            out["plan_similarity"] = plan / plan_tokens
        if contrast_tokens:
            out["random_contrast"] = contrast / contrast_tokens
            out["delta_nll_bits"] = (neg_ce - ce_on_contrast) / contrast_tokens / LN2
            out["js_bits"] = js / contrast_tokens / LN2
        return out

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "train" and "loss" not in logs:
            return super().log(logs, *args, **kwargs)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: round(v, 6) for k, v in self._pop_metrics(mode).items()})
        return super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the latent head in groups of its own at `--head_learning_rate`."""
        optimizer = super().create_optimizer(model)
        head_lr = getattr(self.args, "head_learning_rate", None)
        if head_lr and not getattr(optimizer, "_head_split", False):
            head = {id(p) for p in self.accelerator.unwrap_model(model or self.model).head.parameters()}
            groups = []
            for group in optimizer.param_groups:
                for params, lr in (([p for p in group["params"] if id(p) not in head], group["lr"]),
                                   ([p for p in group["params"] if id(p) in head], head_lr)):
                    if params:
                        groups.append({**group, "params": params, "lr": lr})
            optimizer.param_groups = groups
            optimizer._head_split = True
        return optimizer

    def evaluate(self, *args, **kwargs):
        self._eval_draws = 0
        return super().evaluate(*args, **kwargs)

    # -- sampling, saving and loading a wrapper that is not a PreTrainedModel --------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and lengths is not None:
            return RankBalancedLengthSampler(lengths, self.args.per_device_train_batch_size, self.args.world_size,
                                             seed=self.args.data_seed if self.args.data_seed is not None
                                             else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        actor: LatentActor = self.accelerator.unwrap_model(self.model)
        # Under FSDP, `state_dict` holds the full weights gathered on this rank (the module's own are shards).
        actor.save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if getattr(self, "run_fingerprint", None) is not None:  # which run wrote this (runs.py); before trainer_state
            with open(os.path.join(output_dir, "run_fingerprint.json"), "w", encoding="utf-8") as f:
                json.dump(self.run_fingerprint, f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:  # the Trainer's FSDP loader: every rank takes its shard of the full weights
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        actor: LatentActor = self.accelerator.unwrap_model(model or self.model)
        actor.load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self.accelerator.unwrap_model(self.model).load_weights(self.state.best_model_checkpoint)

    # -- the hub: every push carries the head and a model card -----------------------------------------------
    def create_model_card(self, *args, **kwargs) -> None:
        """The Trainer's draft card describes a plain fine-tune; write this actor's card (model_card.py) instead."""
        if not self.is_world_process_zero():
            return
        from model_card import write_actor_card

        actor: LatentActor = self.accelerator.unwrap_model(self.model)
        info = getattr(self, "card_info", {})
        repo_id = self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        write_actor_card(self.args.output_dir, repo_id, info.get("base_model"), info.get("sender_model"),
                         actor.head.config, self.state.log_history, lora=actor.is_lora)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer copies only the base model's files from a checkpoint into the folder it uploads: copy the
        head as well (else the hub pairs new weights with an old head or none) and write the card."""
        busy = not self.args.hub_always_push and self.push_in_progress is not None \
            and not self.push_in_progress.is_done()  # the Trainer skips this push: leave the uploading folder alone
        if self.is_world_process_zero() and self.args.hub_strategy != "end" and not busy:
            import shutil

            from latent_head import HEAD_FILE, HEAD_SAFETENSORS_FILE

            for name in (HEAD_FILE, HEAD_SAFETENSORS_FILE):
                if os.path.isfile(os.path.join(checkpoint_folder, name)):
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)
