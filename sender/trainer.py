"""`SenderTrainer`: a `transformers.Trainer` for the compression stage (`sender/train.py`).

The step itself (rollout, the actor's three passes, the loss) is `CompressionModel.forward` (`sender/model.py`):
one call of the wrapped model, returning named sums. The trainer records sample ids, accumulates the
metrics and returns the loss, and saves and resumes the sender only.
"""
from __future__ import annotations

import logging
import os

import torch

from sender.model import COMPRESSION_METRICS, CompressionLossConfig
from training.trainer import LatentActorTrainer

logger = logging.getLogger(__name__)


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
            sums = model(batch=inputs, loss_config=self.compression_config)
        if model.training:
            self.step_sample_indices.append(inputs["index"])
        self._add_metric_sums("train" if model.training else "eval", sums.metrics())
        return (sums.loss, {"loss": sums.loss}) if return_outputs else sums.loss

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        vec = self._take_metric_sums(mode)
        if vec is None:
            return {}
        m = dict(zip(COMPRESSION_METRICS, vec.tolist()))
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
