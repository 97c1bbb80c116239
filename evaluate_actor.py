"""Does the actor read the latents? Reference-reply CE (and answer accuracy) under four messages.

    python evaluate_actor.py --model_dir checkpoints/actor --eval_file data/demo/eval.jsonl \
        --output results/eval.json [--batch_size 8] [--max_samples N] [--generate true|false] \
        [--max_new_tokens 32] [--plot results/eval.png]

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

import argparse
import json
import os
import re
import sys
from typing import Iterator, Sequence

import torch

from data import ActorDataset, DataError, LatentCollator, build_hf_dataset, read_records
from inference import build_prompt_batch, encode_prompt, generate_token_ids, prompt_messages
from latent_head import HEAD_FILE, LatentActor, load_head_file
from losses import LN2, token_ce
from models import ModelNotFoundError, resolve_model_dir
from safe_io import check_model_folder, check_output_file, remove_quietly, write_text_atomic

CONDITIONS = ("true", "shuffled", "none", "plan_text")
TEXT_KEYS = ("input_ids", "labels", "attention_mask", "marker_index")
COLORS = {"true": "C0", "shuffled": "C3", "none": "C7", "plan_text": "C2"}
LOGIT_CHUNK = 1024  # supervised rows projected to the vocabulary at a time (bounds [rows, vocab] memory)


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
    def token_ces(actor: LatentActor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each supervised token's CE, whether it is the arg-max, and its sample; inside one call of the model
        (FSDP gathers there)."""
        out = actor.branch(**inputs)
        ce, hit = [out.hidden.new_zeros(0)], [torch.zeros(0, dtype=torch.bool, device=out.labels.device)]
        for s in range(0, out.labels.shape[0], LOGIT_CHUNK):
            logits, labels = actor.logits(out.hidden[s:s + LOGIT_CHUNK]), out.labels[s:s + LOGIT_CHUNK]
            ce.append(token_ce(logits, labels))
            hit.append(logits.argmax(-1) == labels)
        return torch.cat(ce), torch.cat(hit), out.sample_index

    ce, hit, sample_index = actor(compute=token_ces)
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


@torch.no_grad()
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
        replies[condition] = [r.strip() for r in actor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
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


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    has_acc = any("accuracy" in v for v in report["conditions"].values())
    lines = [f"{'condition':<10} {'ce_bits':>8} {'exact':>6} {'samples':>8}" + (f" {'accuracy':>9}" if has_acc else "")]
    for c, v in report["conditions"].items():
        ce = f"{v['ce_bits']:.4f}" if v["ce_bits"] is not None else "-"
        exact = f"{v['exact_match']:.3f}" if v.get("exact_match") is not None else "-"
        line = f"{c:<10} {ce:>8} {exact:>6} {v['samples']:>8}"
        if has_acc:
            line += f" {v['accuracy']:>9.3f}" if v.get("accuracy") is not None else f" {'-':>9}"
        lines.append(line)
    delta = report["delta_bits_shuffled_minus_true"]
    lines.append(f"delta bits (shuffled - true): {delta:+.4f}" if delta is not None else "delta bits: -")
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> None:
    """Bar chart of ce_bits per condition, and of accuracy where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = report["conditions"]
    panels = [("CE on reference replies (bits/token)", "ce_bits")]
    if any(v.get("accuracy") is not None for v in conds.values()):
        panels.append(("answer accuracy", "accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, key) in zip(axes[0], panels):
        names = [c for c in conds if conds[c].get(key) is not None]
        values = [conds[c][key] for c in names]
        bars = ax.bar(names, values, color=[COLORS.get(c, "C1") for c in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "accuracy":
            ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        remove_quietly(tmp)


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="An output folder of train_actor.py, or its hub id.")
    p.add_argument("--eval_file", required=True, help="Records in the training format (optionally with `answer`).")
    p.add_argument("--output", required=True, help="The JSON report to write.")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_samples", type=int, default=None, help="Evaluate the first N samples only.")
    p.add_argument("--generate", type=_str2bool, default=True, help="Generate replies where records have `answer`.")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--plot", default=None, help="Bar chart path (default: the output's name with .png).")
    p.add_argument("--model_max_length", type=int, default=3072, help="As in training: longer samples are cut.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--disable_tqdm", type=_str2bool, default=False, help="No progress bar (as the Trainer's flag).")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> tuple[dict, object]:
    """Everything checkable before the model loads: the output paths, the model folder's files, and every
    record of the eval file (as training checks them, against the head's latent width). Returns the head
    file and the tokenizer."""
    from transformers import AutoTokenizer

    from validation import validate_files

    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise DataError("--batch_size and --max_samples must be positive")
    check_output_file(args.output, "--output")
    check_output_file(args.plot or os.path.splitext(args.output)[0] + ".png", "--plot")
    try:  # a hub id: the HF cache's (or a downloaded) snapshot folder
        args.model_dir = resolve_model_dir(args.model_dir, "--model_dir")
    except ModelNotFoundError as e:
        raise DataError(str(e)) from None
    check_model_folder(args.model_dir, "--model_dir")
    head = load_head_file(os.path.join(args.model_dir, HEAD_FILE))
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError) as e:
        raise DataError(f"--model_dir {args.model_dir}: cannot load its tokenizer ({type(e).__name__})") from None
    report = validate_files([args.eval_file], tokenizer=tokenizer, model_max_length=args.model_max_length,
                            prepended_length=head["config"]["prepended_length"],
                            expected_latent_dim=head["config"]["latent_dim"])
    if not report.ok:
        print(report.format_errors(), file=sys.stderr)
        raise DataError(f"{args.eval_file}: the eval file has errors (listed above); nothing was evaluated")
    return head, tokenizer


def finite_or_none(obj):
    """The report with NaN/inf numbers as null: the report is always valid JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model_source = args.model_dir  # as given (a hub id stays one in the report)
    try:
        check_inputs(args)
        # keyed like the dataset's rows, which name the file by its absolute path
        answers_by_where = {where: rec.get("answer") if isinstance(rec, dict) else None
                            for where, rec in read_records(os.path.abspath(args.eval_file))}
        rows = build_hf_dataset(args.eval_file)
        actor = LatentActor.from_pretrained(args.model_dir, device=args.device)
        dataset = ActorDataset(rows, actor.tokenizer, args.model_max_length, actor.head.config.prepended_length)
        collator = LatentCollator(actor.pad_id, actor.head.config.latent_dim)
        answers = [answers_by_where.get(w) for w in dataset.rows["where"]] if args.generate else None
        report = evaluate(actor, dataset, collator, args.batch_size, args.device, args.max_samples, answers,
                          args.max_new_tokens, progress=not args.disable_tqdm)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = finite_or_none({"model_dir": model_source, "eval_file": args.eval_file, **report})
    plot_path = args.plot or os.path.splitext(args.output)[0] + ".png"
    for what, path, write in (("report", args.output,
                               lambda: write_text_atomic(args.output, json.dumps(report, indent=1, allow_nan=False))),
                              ("plot", plot_path, lambda: plot_report(report, plot_path))):
        try:
            write()
        except OSError as e:
            done = f"; the report {args.output} was written" if what == "plot" else ""
            print(f"error: writing the {what} {path} failed: {e.strerror or type(e).__name__}; no partial file "
                  f"was left{done}", file=sys.stderr)
            return 1
    print(format_table(report))
    print(f"wrote {args.output} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
