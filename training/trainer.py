"""`LatentActorTrainer`: a `transformers.Trainer` whose step draws its random choices, runs the three
branches inside one call of the model (`LatentActor.loss_step`) and normalises and logs the loss sums.

The trainer owns what needs the run's state: the seeded random streams (they survive resumption), the
negatives drawn from every rank's batch (one all-gather), the token count of the optimizer step, and the
metrics. Every component is logged the Trainer way (see `log`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil

import torch
from transformers import Trainer

from common.constants import HEAD_FILE, HEAD_SAFETENSORS_FILE
from common.runs import RUN_FILE
from common.safe_io import INCOMPLETE_MARKER
from data import RankBalancedLengthSampler
from latent_head import LatentActor, StepDraws, pad_rows
from losses import LN2, METRIC_FIELDS, LossConfig, LossSums

logger = logging.getLogger(__name__)


def draw_mix_ratios(batch_size: int, mix_ratios: tuple[float, ...], pure_latent_prob: float,
                    generator: torch.Generator) -> torch.Tensor:
    """A fresh ratio per sample: 1.0 with probability `pure_latent_prob`, else uniform over `mix_ratios`."""
    device = generator.device
    choices = torch.tensor(mix_ratios, dtype=torch.float32, device=device)
    ratios = choices[torch.randint(len(choices), (batch_size,), generator=generator, device=device)]
    pure = torch.rand(batch_size, generator=generator, device=device) < pure_latent_prob
    return torch.where(pure, torch.ones_like(ratios), ratios)


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
    # A placeholder draw for rows without any candidate, masked out by `found` (where, not a boolean-mask
    # assignment: that one waits for the device to count the rows)
    weights[:, 0] = torch.where(found, weights[:, 0], 1.0)
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
    fitted = pad_rows(donor, 1).gather(1, k[..., None].expand(-1, -1, donor.shape[-1]))
    tiled = (donor_lengths < lengths)[:, None, None]
    noise = torch.randn(fitted.shape, generator=generator, device=donor.device, dtype=fitted.dtype) * noise_std
    return torch.where(tiled, fitted + noise, fitted)


def checkpoint_is_complete(path: str, weights_file: str = HEAD_FILE) -> bool:
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


def resolve_resume(value: str | None, output_dir: str, weights_file: str = HEAD_FILE) -> str | None:
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


class HubError(RuntimeError):
    """The hub cannot take this run's pushes: one line for the user."""


def hub_push_problem() -> str | None:
    """Why `--push_to_hub` cannot work now (the hub cannot be reached), as one line; None when it can."""
    from common.models import hub_unreachable_reason

    reason = hub_unreachable_reason()
    if reason is None:
        return None
    return (f"--push_to_hub: the hub cannot be reached ({reason}); train without --push_to_hub and upload the output "
            f"folder when online (`hf upload REPO_ID OUTPUT_DIR`: its README.md is the model card)")


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
        self._step_metrics: dict[str, float] = {}  # measured at a step's end, logged with its training loss
        # "auto" settings decided for this run's device, once (train_actor.py passes them decided already)
        self.loss_config = self.loss_config.resolved(self.args.device.type, self.args.bf16)

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
    def _negative_pool(self, latents: torch.Tensor, lengths: torch.Tensor, max_rows: int):
        """Every rank's latents [M, K, d] (then the bank's), their lengths, which are candidates (pool and
        bank entries with latents) and this batch's own indices into the pool [B]."""
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
        everything = torch.cat([pad_rows(pool, rows), pad_rows(bank_latents, rows)])
        return everything, torch.cat([pool_lengths, bank_lengths]), own, pool_lengths > 0, bank_lengths > 0

    def _draw(self, inputs: dict[str, torch.Tensor], max_rows: int) -> StepDraws:
        """The step's random choices, in a fixed order from one stream: each sample's latent share (training:
        `draw_mix_ratios`; evaluation: pure latents), then its negative (never itself; any rank's sample)."""
        cfg = self.loss_config
        latents, lengths = inputs["latents"], inputs["latent_lengths"]
        gen = self._generator(lengths.device)
        ratio = (draw_mix_ratios(len(lengths), cfg.mix_ratios, cfg.pure_latent_prob, gen) if self.model.training
                 else torch.ones(len(lengths), device=lengths.device))
        if not cfg.random_contrast_weight:
            return StepDraws(ratio)
        everything, all_lengths, own, candidates, bank = self._negative_pool(latents, lengths, max_rows)
        donor, found = pick_negatives(own, candidates, bank, gen)
        self.last_negatives = {"own": own, "donor": donor, "found": found, "pool_size": candidates.shape[0]}
        if self.model.training:
            self._bank = (latents.detach(), lengths.detach())
        negative, negative_lengths = everything[donor], all_lengths[donor] * found
        if cfg.negative_form == "published":  # cut or tiled to the sample's own K, for its own latent rows
            negative = fit_donor_latents(negative, negative_lengths, lengths, latents.shape[1], gen)
        return StepDraws(ratio, negative, negative_lengths, found)

    # -- the loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Draw, run the three branches inside one call of the (DDP- or FSDP-wrapped) model, normalise, log.

        One call: FSDP gathers its sharded parameters only there, and the loss projects with the LM head's
        weight directly. One autocast region: also for evaluation, where the model's forward is not wrapped."""
        actor: LatentActor = self.accelerator.unwrap_model(model)
        draws = self._draw(inputs, actor.head.config.prepended_length)
        with self.accelerator.autocast():
            sums: LossSums = model(batch=inputs, draws=draws, loss_config=self.loss_config)
        if num_items_in_batch is None:
            loss = sums.total / sums.tokens.clamp_min(1)
        else:
            # DDP averages gradients over ranks, while num_items_in_batch counts every rank's tokens.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = sums.total / num_items_in_batch * scale
        if model.training:
            self.step_sample_indices.append(inputs["index"])
        self._add_metric_sums("train" if model.training else "eval", sums.metrics())
        return (loss, {"loss": loss}) if return_outputs else loss

    def sample_ids(self, indices: list[torch.Tensor]) -> list[str]:
        """The ids of training-set rows, for messages about a batch."""
        rows = [int(i) for t in indices for i in t.tolist()]
        try:
            return [str(self.train_dataset.rows[i]["id"]) for i in rows]
        except (AttributeError, KeyError, IndexError):
            return [f"#{i}" for i in rows]

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

    def _pop_metrics(self, mode: str) -> dict[str, float]:
        """The log period's means per token (and per token with a plan / a negative), over all ranks."""
        vec = self._take_metric_sums(mode)
        if vec is None:
            return {}
        s = dict(zip(METRIC_FIELDS, vec.tolist()))  # `LossSums.metrics()` order
        out = {"ce_loss": s["ce"] / max(s["tokens"], 1)}
        if s["plan_tokens"]:
            out["plan_similarity"] = s["plan_similarity"] / s["plan_tokens"]
        if s["contrast_tokens"]:
            out["random_contrast"] = s["random_contrast"] / s["contrast_tokens"]
            out["delta_nll_bits"] = (s["neg_ce"] - s["ce_on_contrast"]) / s["contrast_tokens"] / LN2
            out["js_bits"] = s["js"] / s["contrast_tokens"] / LN2
        return out

    def add_step_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics measured at the end of an optimizer step (the InfoNCE probe), for the row of that step's training
        loss: the caller sets `control.should_log` so that the Trainer logs the step."""
        self._step_metrics.update(metrics)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "train" and "loss" not in logs:
            return super().log(logs, *args, **kwargs)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: round(v, 6) for k, v in self._pop_metrics(mode).items()})
        if mode == "train":
            logs.update(self._step_metrics)
            self._step_metrics = {}
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
        if getattr(self, "run_fingerprint", None) is not None:  # which run wrote this (common/runs.py); before trainer_state
            with open(os.path.join(output_dir, RUN_FILE), "w", encoding="utf-8") as f:
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
    def create_model_card(self, *args, license: str | None = None, **kwargs) -> None:
        """The Trainer's draft card describes a plain fine-tune: write this actor's card (common/model_card.py) into the
        output folder instead, from `card_info` (set by train_actor.py) and the log. Also at the end of every run."""
        if not self.is_world_process_zero():
            return
        from common.model_card import write_actor_card

        actor: LatentActor = self.accelerator.unwrap_model(self.model)
        info = dict(getattr(self, "card_info", {}))
        if license:
            info["license"] = license
        repo_id = self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        lora = actor.is_lora or bool(info.get("settings", {}).get("lora_r"))  # the final folder has it merged
        write_actor_card(self.args.output_dir, repo_id, actor.head.config, self.state.log_history, lora=lora, **info)

    def init_hf_repo(self, *args, **kwargs) -> None:
        """`--push_to_hub`: the Trainer creates the hub repository when built; a failure is one line (HubError)."""
        problem = hub_push_problem()
        if problem:
            raise HubError(problem)
        try:
            super().init_hf_repo(*args, **kwargs)
        except Exception as e:  # offline, refused token, no network: whatever the hub client raises
            from common.models import first_sentence

            raise HubError(f"--push_to_hub: creating the hub repository {self.args.hub_model_id or ''} failed "
                           f"({type(e).__name__}: {first_sentence(e)})") from None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The Trainer copies only the base model's files from a checkpoint into the folder it uploads: copy the
        head as well (else the hub pairs new weights with an old head or none) and write the card."""
        busy = not self.args.hub_always_push and self.push_in_progress is not None \
            and not self.push_in_progress.is_done()  # the Trainer skips this push: leave the uploading folder alone
        if self.is_world_process_zero() and self.args.hub_strategy != "end" and not busy:
            for name in (HEAD_FILE, HEAD_SAFETENSORS_FILE):
                if os.path.isfile(os.path.join(checkpoint_folder, name)):
                    shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)
