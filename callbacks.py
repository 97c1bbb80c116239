"""What watches training: `loss_log.csv` and `loss_curve.png`, the InfoNCE probe, the latent conditions, and
TensorBoard's metric groups."""
from __future__ import annotations

import csv
import logging
import os
import signal
import threading

import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.integrations.integration_utils import rewrite_logs

from common.constants import LOSS_CURVE_FILE, LOSS_LOG_FILE, TEXT_KEYS
from losses import infonce_from_scores

logger = logging.getLogger(__name__)

# Panels of loss_curve.png: (title, train key, eval key).
PANELS = (
    ("total loss", "loss", "eval_loss"),
    ("cross-entropy (nats/token)", "ce_loss", "eval_ce_loss"),
    ("plan similarity", "plan_similarity", "eval_plan_similarity"),
    ("random contrast", "random_contrast", "eval_random_contrast"),
    ("delta NLL, wrong vs true latent (bits/token)", "delta_nll_bits", "eval_delta_nll_bits"),
    ("InfoNCE lower bound (nats)", "probe/cInfoNCE_LB", None),
    ("eval CE, shuffled - true latents (bits/token)", None, "cond/delta_bits_shuffled_minus_true"),
    # sender/train.py (compression stage)
    ("distillation KL (T^2-scaled, uncertainty-weighted)", "distill_kl", "eval_distill_kl"),
    ("alignment (1 - cos, after the head)", "alignment", "eval_alignment"),
)


def write_loss_log(log_history: list[dict], path: str) -> None:
    """Every logged entry as a CSV row; columns are the union of keys, `step` first."""
    keys = sorted({k for row in log_history for k in row} - {"step"})
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        writer.writerows(log_history)
    os.replace(tmp, path)


def plot_loss_curve(log_history: list[dict], path: str) -> None:
    """One panel per loss component, training and evaluation on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any((p[1] and p[1] in r) or (p[2] and p[2] in r) for r in log_history)]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, train_key, eval_key) in zip(axes.flat, panels):
        for key, label, style in ((train_key, "probe" if train_key and train_key.startswith("probe/") else "train",
                                   "-"), (eval_key, "eval", "o-")):
            points = [(r["step"], r[key]) for r in log_history if key and key in r]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class LossLogCallback(TrainerCallback):
    """Keeps `loss_log.csv` current at every log, and redraws `loss_curve.png` at evaluations and the end."""

    def __init__(self, output_dir: str, plot: bool = True):
        self.output_dir, self.plot = output_dir, plot

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(self.output_dir, exist_ok=True)
            write_loss_log(state.log_history, os.path.join(self.output_dir, LOSS_LOG_FILE))
            if self.plot and logs and any(k.startswith(("eval_", "cond/")) for k in logs):
                plot_loss_curve(state.log_history, os.path.join(self.output_dir, LOSS_CURVE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot:
            plot_loss_curve(state.log_history, os.path.join(self.output_dir, LOSS_CURVE_FILE))


@torch.no_grad()
def conditional_ce_matrix(actor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """s[j, o] = -CE(conversation j | latents of sample o), mean nats per supervised token, [K, K].

    One batched forward per latent o over all K conversations (pure latents, head in eval mode).
    """
    from evaluation.conditions import ce_sums

    k = batch["input_ids"].shape[0]
    text = {name: batch[name] for name in TEXT_KEYS}
    scores = torch.empty(k, k)
    for o in range(k):
        lengths = batch["latent_lengths"][o:o + 1].expand(k)
        sums, counts = ce_sums(actor, dict(text, latents=batch["latents"][o:o + 1].expand(k, -1, -1),
                                           latent_lengths=lengths, latent_rows=lengths))
        scores[:, o] = -(sums / counts.clamp_min(1)).float()
    return scores


class InfoNCEProbeCallback(TrainerCallback):
    """Every `interval` steps, scores K held-out samples against each other's latents.

    Logs `probe/cInfoNCE_loss` and `probe/cInfoNCE_LB` (= ln K - loss, a lower bound on the
    mutual information between latent and conversation, in nats).
    """

    def __init__(self, trainer, samples: list[dict], interval: int, tau: float = 1.0):
        self.trainer, self.interval, self.tau = trainer, interval, tau
        self.batch = trainer.data_collator(samples)

    def on_step_end(self, args, state, control, **kwargs):
        if self.interval > 0 and state.global_step % self.interval == 0:
            self.run()

    def run(self) -> dict[str, float]:
        actor = self.trainer.accelerator.unwrap_model(self.trainer.model)
        was_training = actor.training
        actor.eval()
        try:
            batch = {k: v.to(actor.device) for k, v in self.batch.items()}
            with torch.autocast(actor.device.type, dtype=torch.bfloat16, enabled=self.trainer.args.bf16):
                scores = conditional_ce_matrix(actor, batch)
        finally:
            actor.train(was_training)
        loss, bound = infonce_from_scores(scores, self.tau)
        metrics = {"probe/cInfoNCE_loss": round(loss.item(), 6), "probe/cInfoNCE_LB": round(bound.item(), 6)}
        self.trainer.log(metrics)  # every rank runs the probe (same weights, same samples), so logs agree
        return metrics


class LatentConditionsCallback(TrainerCallback):
    """After each evaluation, logs the eval set's CE (bits/token) under the four messages of
    `evaluation/conditions.py` (true, shuffled, none, plan_text latents), so the curves show whether
    the actor reads its latents while it trains."""

    def __init__(self, trainer, max_samples: int = 64):
        self.trainer, self.max_samples = trainer, max_samples

    def on_evaluate(self, args, state, control, **kwargs):
        from evaluation.conditions import evaluate_conditions

        trainer = self.trainer
        actor = trainer.accelerator.unwrap_model(trainer.model)
        with torch.autocast(actor.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            metrics = evaluate_conditions(actor, trainer.eval_dataset, trainer.data_collator,
                                          args.per_device_eval_batch_size, actor.device,
                                          max_samples=self.max_samples,
                                          progress=not args.disable_tqdm and state.is_local_process_zero)
        trainer.log({f"cond/{k}": round(v, 6) for k, v in metrics.items()})


class NonFiniteGuardCallback(TrainerCallback):
    """Before each optimizer step, checks that the gradients are finite.

    A NaN/inf gradient (from a NaN loss, a bad latent, an overflow) is reported with the step
    and the ids of the samples in that step, and its update is dropped, so it never reaches the
    weights. `policy="skip"` goes on with the next step; `policy="stop"` ends training cleanly.
    """

    def __init__(self, trainer, policy: str = "skip"):
        if policy not in ("skip", "stop"):
            raise ValueError(f"--nonfinite_policy must be 'skip' or 'stop', got {policy!r}")
        self.trainer, self.policy = trainer, policy
        self.skipped_steps: list[int] = []
        self.stopped = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        indices, trainer.step_sample_indices = trainer.step_sample_indices, []
        grads = [p.grad for p in (model or trainer.model).parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            return
        for p in (model or trainer.model).parameters():
            p.grad = None  # the optimizer skips parameters without a gradient: no update at all
        ids = trainer.sample_ids(indices)
        logger.error("Non-finite gradient at step %d (samples: %s); this step's update is dropped%s",
                     state.global_step + 1, ", ".join(ids), "; stopping" if self.policy == "stop" else "")
        self.skipped_steps.append(state.global_step + 1)
        if self.policy == "stop":
            self.stopped = True
            control.should_training_stop = True


class StepsToReadCallback(TrainerCallback):
    """Watches the `cond/*` metrics of each evaluation and records *steps-to-read*: the first evaluated step
    at which held-out true latents beat shuffled ones by >= `margin_bits` bits/token and the reference reply
    is the teacher-forced arg-max (greedy) for >= `min_exact` of the samples with true latents. Logged once
    as `cond/steps_to_read`; with `stop=True` training ends there (benchmarks/steps_to_read.py)."""

    def __init__(self, margin_bits: float = 1.0, min_exact: float = 0.9, stop: bool = False):
        self.margin_bits, self.min_exact, self.stop = margin_bits, min_exact, stop
        self.steps_to_read: int | None = None

    def reads(self, logs: dict) -> bool:
        delta, exact = logs.get("cond/delta_bits_shuffled_minus_true"), logs.get("cond/true_exact_match")
        return delta is not None and exact is not None and delta >= self.margin_bits and exact >= self.min_exact

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.steps_to_read is None and logs and self.reads(logs):
            self.steps_to_read = state.global_step
            state.log_history.append({"step": state.global_step, "cond/steps_to_read": state.global_step})
            logger.info("Latents read at step %d (held-out true beats shuffled by %.3f bits/token, exact %.3f)",
                        state.global_step, logs["cond/delta_bits_shuffled_minus_true"], logs["cond/true_exact_match"])
            if self.stop:
                control.should_training_stop = True


class InterruptCallback(TrainerCallback):
    """Ctrl-C (SIGINT) ends training cleanly: the current step finishes, a resumable checkpoint (weights,
    optimizer, scheduler, RNG states) is saved, and training stops; `interrupted` then says so. A second
    Ctrl-C stops at once (the last complete checkpoint stays resumable). One process only: under
    torchrun the ranks could see the signal at different steps and wait for each other forever."""

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        logger.warning("Ctrl-C: finishing this step, then saving a resumable checkpoint (Ctrl-C again to stop "
                       "at once)")

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Give Ctrl-C back to the handler it had (also when training ended on an exception)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# Metrics logged under a group of their own ("cond/...", "probe/...") keep it in TensorBoard.
GROUPED_PREFIXES = ("cond/", "probe/")


class MetricGroupTensorBoardCallback(TensorBoardCallback):
    """TensorBoard as the Trainer writes it (`train/loss`, `eval/loss`), except that `cond/*` and `probe/*` stay
    their own groups: the Trainer's `rewrite_logs` would file them under `train/cond/...`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.tb_writer is None:
            self._init_summary_writer(args)
        if self.tb_writer is None:
            return
        grouped = {k: v for k, v in logs.items() if k.startswith(GROUPED_PREFIXES)}
        rest = rewrite_logs({k: v for k, v in logs.items() if k not in grouped})
        if grouped:  # a cond/probe log's bookkeeping ("epoch") adds nothing: the train logs carry it
            rest = {k: v for k, v in rest.items() if k != "train/epoch"}
        for key, value in {**rest, **grouped}.items():
            if isinstance(value, (int, float)):
                self.tb_writer.add_scalar(key, value, state.global_step)
            elif isinstance(value, str):
                self.tb_writer.add_text(key, value, state.global_step)
        self.tb_writer.flush()


def use_metric_group_tensorboard(trainer) -> None:
    """With `--report_to tensorboard`, replace the Trainer's TensorBoard callback with `MetricGroupTensorBoardCallback`."""
    if trainer.pop_callback(TensorBoardCallback) is not None:
        trainer.add_callback(MetricGroupTensorBoardCallback())
