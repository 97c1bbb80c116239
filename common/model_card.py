"""The model card (`README.md`) of a trained actor's folder: what it is, how it was trained, how to load it.

Written by the trainer before every push to the hub (`--push_to_hub`, checkpoints included), so the hub page
says that the folder is an actor with a latent head, not a plain fine-tune of its base model.
"""
from __future__ import annotations

import json
import os

from common.constants import HEAD_FILE, HEAD_SAFETENSORS_FILE
from common.models import looks_like_repo_id
from common.safe_io import write_text_atomic
from evaluation.conditions import CONDITIONS
from latent_head import HeadConfig

CARD_FILE = "README.md"
REPORT_FILE = "eval_report.json"  # evaluation/evaluate.py's report, when written into the folder (make demo does)
CONDITION_NAMES = {"true": "the sample's own latents", "shuffled": "another sample's latents", "none": "nothing",
                   "plan_text": "the plan as text"}


def evaluation_rows(output_dir: str, log_history: list[dict]) -> tuple[str, list[dict]] | None:
    """(where from, rows of condition -> ce_bits / exact_match / accuracy): `eval_report.json` when the folder
    holds one, else the newest `cond/*` metrics the training logged; None when neither exists."""
    path = os.path.join(output_dir, REPORT_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                conditions = json.load(f)["conditions"]
            return f"`evaluation/evaluate.py` ({REPORT_FILE})", [
                {"condition": c, **{k: conditions[c].get(k) for k in ("ce_bits", "exact_match", "accuracy")}}
                for c in CONDITIONS if c in conditions]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable report: fall back to the training log
    for entry in reversed(log_history):
        if any(k.startswith("cond/") and k.endswith("_ce_bits") for k in entry):
            rows = [{"condition": c, "ce_bits": entry.get(f"cond/{c}_ce_bits"),
                     "exact_match": entry.get(f"cond/{c}_exact_match"), "accuracy": None}
                    for c in CONDITIONS if f"cond/{c}_ce_bits" in entry]
            return f"the evaluation at step {entry.get('step', '?')} (held-out samples, `cond/*`)", rows
    return None


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def actor_card(repo_id: str, base_model: str | None, sender_model: str | None, head: HeadConfig,
               evaluation: tuple[str, list[dict]] | None, lora: bool = False) -> str:
    """The card's text: YAML front matter for the hub, then what this is, its head, its evaluation and loading."""
    front = ["---", "library_name: transformers", "tags:", "- interlat", "- latent-communication"]
    if base_model and looks_like_repo_id(base_model):  # a hub id, not a local path
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = [
        *front, "", f"# {repo_id}: an Interlat actor",
        "",
        "A causal LM fine-tuned to act on another agent's **latent message**: the sender's last-layer hidden states",
        "`[K, d]` go through a small attention head (`latent_comm_head`) and are spliced into the actor's input",
        "embeddings between `<bop>` and `<eop>` at the end of the first user message (Interlat, arXiv 2511.09149).",
        "This folder holds the base model's weights (`model.safetensors`" + (", LoRA merged" if lora else "") +
        "), the tokenizer with the special tokens `<FIRST_HUMAN_END>`, `<bop>`, `<eop>`, and the head "
        f"(`{HEAD_FILE}`, read with `torch.load(..., weights_only=True)`; the same weights in `{HEAD_SAFETENSORS_FILE}`).",
        "",
        "| | |", "| --- | --- |",
        f"| base model | {base_model or 'not recorded'} |",
        f"| sender (whose hidden states are the latents) | {sender_model or 'not recorded (--sender_model_name_or_path)'} |",
        f"| latent width (sender's hidden size) | {head.latent_dim} |",
        f"| actor hidden size | {head.hidden_size} |",
        f"| `prepended_length` (latent rows read per message) | {head.prepended_length} |",
        f"| head attention heads | {head.num_heads} |",
        "",
    ]
    if evaluation:
        source, rows = evaluation
        lines += [f"## Evaluation: does the actor read the latents? (from {source})", "",
                  "| message between `<bop>`/`<eop>` | CE on the reply (bits/token) | greedy reply = reference | answer accuracy |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {CONDITION_NAMES.get(r['condition'], r['condition'])} | {_cell(r['ce_bits'], '.4f')} | "
                  f"{_cell(r['exact_match'], '.1%')} | {_cell(r['accuracy'], '.1%')} |" for r in rows]
        lines.append("")
    lines += [
        "## Loading", "",
        "With the interlat toolkit (`latent_head.py`, `evaluation/generation.py`):", "",
        "```python",
        "import numpy as np",
        "from latent_head import LatentActor",
        "from generation import generate_reply",
        "",
        f'actor = LatentActor.from_pretrained("{repo_id}")   # base model + head + tokenizer, eval mode',
        'reply = generate_reply(actor, [{"role": "user", "content": "Where is the key?"}],',
        '                       latents=np.load("message.npy"))   # [K, latent width] hidden states of the sender',
        "```",
        "",
        f"or `python -m evaluation.inference --model_dir {repo_id} --prompt \"...\" --latents message.npy`, and",
        f"`python -m evaluation.evaluate --model_dir {repo_id} --eval_file eval.jsonl --output report.json`.",
        "",
    ]
    return "\n".join(lines)


def write_actor_card(output_dir: str, repo_id: str, base_model: str | None, sender_model: str | None,
                     head: HeadConfig, log_history: list[dict], lora: bool = False) -> str:
    """Write `README.md` into `output_dir` (whole or not at all); returns its path."""
    path = os.path.join(output_dir, CARD_FILE)
    write_text_atomic(path, actor_card(repo_id, base_model, sender_model, head,
                                       evaluation_rows(output_dir, log_history), lora))
    return path
