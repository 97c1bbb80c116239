"""Generate a reply from a trained actor with a latent message (and/or plan text, or nothing) injected.

    python -m evaluation.inference --model_dir checkpoints/actor --record data/eval.jsonl:3
    python -m evaluation.inference --model_dir checkpoints/actor --record data/eval.jsonl:eval_0007 --no_latents --with_plan
    python -m evaluation.inference --model_dir checkpoints/actor --prompt "Where is the key?" --latents message.npy

The prompt and the latent block are laid out as in training (see `evaluation/generation.py`, the library this
command line uses): the first user message ends with `<bop> [latent rows] [plan tokens] <eop>`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from common.constants import PREPENDED_LENGTH
from data import DataError, load_latents, normalise_record, read_records
from evaluation.generation import (build_prompt_batch, encode_prompt, generate_replies, generate_reply,  # noqa: F401
                        generate_token_ids, prompt_embeddings, prompt_messages)  # (the tests' names too)
from latent_head import LatentActor, resolve_actor_dir


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def find_record(spec: str, expected_latent_dim: int | None = None, prepended_length: int = PREPENDED_LENGTH) -> dict:
    """`FILE`, `FILE:INDEX` (0-based) or `FILE:ID` -> the normalised record (see `data.normalise_record`),
    checked as training checks it (`validation.validate_record`) first."""
    from common.validation import validate_record

    path, selector = spec, None
    if not os.path.exists(spec) and ":" in spec:
        path, selector = spec.rsplit(":", 1)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    base_dir = os.path.dirname(os.path.abspath(path))
    for i, (where, rec) in enumerate(read_records(path)):
        if selector is None or selector == str(i) or (isinstance(rec, dict) and str(rec.get("id")) == selector):
            report = validate_record(where, rec, base_dir, expected_latent_dim=expected_latent_dim,
                                     prepended_length=prepended_length)
            if not report.ok:
                raise DataError(report.errors[0].format().removeprefix("error: "))
            try:
                return normalise_record(rec, where, base_dir)
            except (KeyError, TypeError, AttributeError, OSError) as e:
                raise DataError(f"{where}: malformed record ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: no record with index or id {selector!r}" if selector else f"{path}: no records")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate an actor's reply with a latent message injected.")
    p.add_argument("--model_dir", required=True, help="An output folder of train_actor.py (model + head), or its "
                                                       "hub id.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--record", help="FILE[:index or id]: a data record; its reply is generated (first "
                                      "assistant turn), with its latents unless --latents/--no_latents.")
    src.add_argument("--prompt", help="A single user message.")
    p.add_argument("--latents", help="A [K, d] latent matrix (.npy, or .pt/.pth holding a plain tensor).")
    p.add_argument("--no_latents", action="store_true", help="Send no latent rows.")
    p.add_argument("--plan", help="Plan text to inject after the latent rows.")
    p.add_argument("--with_plan", action="store_true", help="Inject the record's plan text after the latents.")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="Seed for sampling.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model_dir, head_file = resolve_actor_dir(args.model_dir, "--model_dir")
        head = head_file["config"]
        if args.max_new_tokens < 1:
            raise DataError("--max_new_tokens must be at least 1")
        if args.record:
            record = find_record(args.record, head["latent_dim"], head["prepended_length"])
            messages = prompt_messages(record["messages"])
            source = record["hidden_state_path"] or record["hidden_state"]
            plan = args.plan if args.plan is not None else (record["plan"] if args.with_plan else None)
        else:
            if args.with_plan:
                raise DataError("--with_plan needs --record (use --plan TEXT with --prompt)")
            messages, source, plan = [{"role": "user", "content": args.prompt}], None, args.plan
        if args.latents:
            source = args.latents
        latents = None if args.no_latents or source is None else \
            load_latents(source, "--latents" if args.latents else args.record, max_rows=head["prepended_length"])
        if not messages:
            raise DataError("the record has no user turn before its first reply")
        if latents is not None and latents.shape[1] != head["latent_dim"]:
            raise DataError(f"latents have width {latents.shape[1]}, the actor's head expects {head['latent_dim']}")
        actor = LatentActor.from_pretrained(model_dir, device=args.device)
        torch.manual_seed(args.seed)
        reply = generate_reply(actor, messages, latents, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                               temperature=args.temperature, top_p=args.top_p, plan_text=plan)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(reply)
    return 0


def cli() -> None:
    """The `interlat-generate` console command (exits with main's status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
