"""`SenderTrainer`: a `transformers.Trainer` for the compression stage (`train_sender.py`).

Per step: the sender's batched K-step rollout; the frozen actor reads those K latents (gradient
through the actor's head and base model into the sender, whose own parameters are the only ones
trained); two no-grad actor passes give the targets: the data latents cut or tiled to K rows, and no
message at all. Loss (`losses.py`): CE of the actor's reply given the student's latents
+ 0.1 uncertainty-weighted distillation KL (T = 4, times T^2, the first 64 supervised tokens of each
sample) + 0.1 alignment (1 - cos of the mean-pooled messages after the actor's head).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from constants import TEXT_KEYS
from losses import (COMPRESSION_ALIGN_WEIGHT, COMPRESSION_KL_WEIGHT, DISTILL_TEMPERATURE, DISTILL_WINDOW,
                    LOSS_CHUNK_SIZE, UNCERTAINTY_QUANTILE, alignment_loss, compression_loss, distillation_kl,
                    first_rows_per_sample, latent_comm_loss_sums, token_ce, token_entropy, uncertainty_weights)
from sender import CompressionModel, fit_rows
from trainer import LatentActorTrainer

logger = logging.getLogger(__name__)

# Order of the per-mode metric sums (see `_accumulate_metrics`).
METRICS = ("ce", "tokens", "distill", "align", "batches", "window_student", "window_data", "window_none", "window_tokens")


@dataclass
class CompressionLossConfig:
    kl_weight: float = COMPRESSION_KL_WEIGHT
    alignment_weight: float = COMPRESSION_ALIGN_WEIGHT
    temperature: float = DISTILL_TEMPERATURE
    window: int = DISTILL_WINDOW
    quantile: float = UNCERTAINTY_QUANTILE
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE


class SenderTrainer(LatentActorTrainer):
    """Trains a `CompressionModel`'s sender against its frozen actor; saves and resumes the sender only.

    Reuses `LatentActorTrainer`'s length-grouped sampler, metric logging and sample ids (for the
    non-finite guard); the loss is a mean per micro-batch, so the Trainer divides it by the
    accumulation steps."""

    def __init__(self, *args, compression_config: CompressionLossConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.compression_config = compression_config or CompressionLossConfig()
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():
            loss = model(compute=lambda m: self._compression_loss(m, inputs))
        return (loss, {"loss": loss}) if return_outputs else loss

    def _compression_loss(self, model: CompressionModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.compression_config
        sender, actor = model.sender, model.actor
        k = sender.config.num_latents
        text = {key: inputs[key] for key in TEXT_KEYS}
        rows = torch.full_like(inputs["marker_index"], k)
        no_rows = torch.zeros_like(rows)

        latents = sender.rollout(inputs["context_ids"], inputs["context_mask"])  # [B, K, d], with gradient
        student = actor.branch(**text, latents=latents, latent_lengths=rows, latent_rows=rows)

        has_data = inputs["latent_lengths"] > 0
        data = fit_rows(inputs["latents"], inputs["latent_lengths"], k)
        no_block = inputs["input_ids"][:, :0]
        with torch.no_grad():  # the teacher (data latents) and no-message branches, as one stacked forward
            data_hidden, none_hidden = actor.stacked_branches(text, [
                dict(latents=data, latent_lengths=torch.where(has_data, rows, 0), block_ids=no_block,
                     block_lengths=no_rows),
                dict(latents=data, latent_lengths=no_rows, block_ids=no_block, block_lengths=no_rows)])

        tokens = student.labels.shape[0]
        ce_sum = latent_comm_loss_sums(student.hidden, student.labels, actor.logits,
                                       chunk_size=cfg.loss_chunk_size).ce
        # Distillation over each sample's first `window` supervised tokens (samples with data latents).
        window = first_rows_per_sample(student.sample_index, cfg.window) & has_data[student.sample_index]
        student_logits = actor.logits(student.hidden[window])
        with torch.no_grad():
            data_logits, none_logits = actor.logits(data_hidden[window]), actor.logits(none_hidden[window])
        weights = uncertainty_weights(token_entropy(none_logits), token_entropy(data_logits), cfg.quantile)
        distill = distillation_kl(student_logits, data_logits, weights, cfg.temperature)
        # Alignment of the messages as the actor sees them: after its head, mean-pooled over the K rows.
        student_pooled = actor.head(latents[has_data], rows[has_data]).mean(1)
        with torch.no_grad():
            data_pooled = actor.head(data[has_data], rows[has_data]).mean(1)
        align = alignment_loss(student_pooled, data_pooled)
        ce = ce_sum / max(tokens, 1)
        loss = compression_loss(ce, distill, align, cfg.kl_weight, cfg.alignment_weight)

        if model.training:
            self.step_sample_indices.append(inputs["index"])
        with torch.no_grad():
            window_labels = student.labels[window]
            window_ce = [token_ce(x, window_labels).sum() for x in (student_logits, data_logits, none_logits)]
            vec = torch.stack([ce_sum, ce_sum.new_tensor(float(tokens)), distill, align, ce_sum.new_tensor(1.0),
                               *window_ce, ce_sum.new_tensor(float(window_labels.shape[0]))]).float()
        mode = "train" if model.training else "eval"
        self._add_metric_sums(mode, vec)
        return loss

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        vec = self._take_metric_sums(mode)
        if vec is None:
            return {}
        m = dict(zip(METRICS, vec.tolist()))
        out = {"ce_loss": m["ce"] / max(m["tokens"], 1), "distill_kl": m["distill"] / max(m["batches"], 1),
               "alignment": m["align"] / max(m["batches"], 1)}
        if m["window_tokens"]:  # CE (nats/token) in the distillation window: student vs its two references
            for name in ("student", "data", "none"):
                out[f"window_ce_{name}"] = m[f"window_{name}"] / m["window_tokens"]
        return out

    # -- saving and loading: the sender only (the actor is frozen and stays where it is) -----------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).sender.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).sender.load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self.accelerator.unwrap_model(self.model).sender.load_weights(self.state.best_model_checkpoint)
