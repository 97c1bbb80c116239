"""Does the actor read the latents? The command line of `evaluation/conditions.py`: a report, a table and a plot.

    python -m evaluation.evaluate --model_dir checkpoints/actor --eval_file data/demo/eval.jsonl \
        --output results/eval.json [--batch_size 8] [--max_samples N] [--generate true|false] \
        [--max_new_tokens 32] [--plot results/eval.png]

The conditions (true, shuffled, none, plan_text latents), the CE and exact-match measures and answer
scoring are described in `evaluation/conditions.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import torch

from common.constants import MODEL_MAX_LENGTH
from common.safe_io import check_output_file, remove_quietly, write_text_atomic
from data import ActorDataset, DataError, LatentCollator, build_hf_dataset, read_records
from evaluation.conditions import (CONDITIONS, answer_in_reply, ce_and_exact, ce_sums, condition_inputs,  # noqa: F401
                        donor_indices, evaluate, evaluate_conditions, iter_batches)  # (the tests' names too)
from latent_head import LatentActor, resolve_actor_dir

COLORS = {"true": "C0", "shuffled": "C3", "none": "C7", "plan_text": "C2"}


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
    p.add_argument("--model_max_length", type=int, default=MODEL_MAX_LENGTH, help="As in training: longer samples are cut.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--disable_tqdm", type=_str2bool, default=False, help="No progress bar (as the Trainer's flag).")
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> str:
    """Everything checkable before the model loads: the output paths, the model folder's files, and every
    record of the eval file (as training checks them, against the head's latent width). Returns the model
    folder (a hub id resolved to its snapshot)."""
    from transformers import AutoTokenizer

    from common.validation import validate_files

    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise DataError("--batch_size and --max_samples must be positive")
    check_output_file(args.output, "--output")
    check_output_file(args.plot or os.path.splitext(args.output)[0] + ".png", "--plot")
    model_dir, head = resolve_actor_dir(args.model_dir, "--model_dir")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise DataError(f"--model_dir {model_dir}: cannot load its tokenizer ({type(e).__name__})") from None
    report = validate_files([args.eval_file], tokenizer=tokenizer, model_max_length=args.model_max_length,
                            prepended_length=head["config"]["prepended_length"],
                            expected_latent_dim=head["config"]["latent_dim"])
    if not report.ok:
        print(report.format_errors(), file=sys.stderr)
        raise DataError(f"{args.eval_file}: the eval file has errors (listed above); nothing was evaluated")
    return model_dir


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
    try:
        model_dir = check_inputs(args)
        # keyed like the dataset's rows, which name the file by its absolute path
        answers_by_where = {where: rec.get("answer") if isinstance(rec, dict) else None
                            for where, rec in read_records(os.path.abspath(args.eval_file))}
        rows = build_hf_dataset(args.eval_file)
        actor = LatentActor.from_pretrained(model_dir, device=args.device)
        dataset = ActorDataset(rows, actor.tokenizer, args.model_max_length, actor.head.config.prepended_length)
        collator = LatentCollator(actor.pad_id, actor.head.config.latent_dim)
        answers = [answers_by_where.get(w) for w in dataset.rows["where"]] if args.generate else None
        report = evaluate(actor, dataset, collator, args.batch_size, args.device, args.max_samples, answers,
                          args.max_new_tokens, progress=not args.disable_tqdm)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = finite_or_none({"model_dir": args.model_dir, "eval_file": args.eval_file, **report})
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


def cli() -> None:
    """The `interlat-eval` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
