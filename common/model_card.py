"""The model card (`README.md`) of a trained actor's folder: what it is, how it was trained, how to load it.

Written at the end of every training run and before every push to the hub (`--push_to_hub`, checkpoints included),
with `huggingface_hub`'s `ModelCard`/`ModelCardData`: the front matter carries what the hub indexes (base model,
datasets, license, tags, the held-out evaluation as a `model-index`), the text what a reader needs (the latent
method's settings, the command line, the evaluation table, loading).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from typing import TYPE_CHECKING, Sequence

from common.constants import EMBEDDED_MODEL, HEAD_FILE, HEAD_SAFETENSORS_FILE

if TYPE_CHECKING:  # the rest loads when a card is written: train_actor.py's --help imports `command_line` alone
    from latent_head import HeadConfig

CARD_FILE = "README.md"
REPORT_FILE = "eval_report.json"  # evaluation/evaluate.py's report, when written into the folder (make demo does)
CONDITION_NAMES = {"true": "the sample's own latents", "shuffled": "another sample's latents", "none": "nothing",
                   "plan_text": "the plan as text"}
TAGS = ["interlat", "latent-communication", "multi-agent"]
# Licenses of base models whose card may not be on this machine (the embedded copy has none).
KNOWN_LICENSES = {EMBEDDED_MODEL: "apache-2.0"}
# The flags of train_actor.py that say how the latent method was trained (named in the card, in this order).
METHOD_SETTINGS = ("prepended_length", "num_heads", "plan_similarity_weight", "random_contrast_weight", "mix_ratios",
                   "pure_latent_prob", "negative_form", "contrast_divergence", "loss_weighting",
                   "head_warm_start_steps", "head_warm_start_lr", "lora_r", "learning_rate", "head_learning_rate",
                   "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                   "model_max_length", "seed")
SECRET_FLAG = re.compile(r"--\w*(token|password|secret|key)\w*", re.IGNORECASE)


def command_line(argv: Sequence[str] | None, program: str | None = None) -> str:
    """The command as typed (`argv`: the arguments after the program; default `sys.argv[1:]`), for the card, with the
    value of any token-like flag (`--hub_token ...`) replaced by HIDDEN."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if program is None:
        name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        program = name if name.startswith("interlat-") else "python train_actor.py"
    shown, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            shown.append("HIDDEN")
            hide_next = False
        elif SECRET_FLAG.fullmatch(flag):
            shown.append(f"{flag}=HIDDEN" if eq else arg)
            hide_next = not eq
        else:
            shown.append(arg)
    return " ".join([program, shlex.join(shown)]).strip()


def base_model_license(base_model: str | None) -> str | None:
    """The base model's license as its own card states it, when that card is on this machine (a local folder, the
    Hugging Face cache); never goes online. None when unknown."""
    if not base_model:
        return None
    if base_model in KNOWN_LICENSES:
        return KNOWN_LICENSES[base_model]
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from common.models import looks_like_repo_id

    path = os.path.join(base_model, CARD_FILE)
    if not os.path.isfile(path) and looks_like_repo_id(base_model):
        cached = try_to_load_from_cache(base_model, CARD_FILE)
        path = cached if isinstance(cached, str) else ""
    try:
        return ModelCard.load(path).data.license if os.path.isfile(path) else None
    except (OSError, ValueError):
        return None


def evaluation_rows(output_dir: str, log_history: list[dict]) -> tuple[str, list[dict]] | None:
    """(where from, rows of condition -> ce_bits / exact_match / accuracy): `eval_report.json` when the folder
    holds one, else the newest `cond/*` metrics the training logged; None when neither exists."""
    from evaluation.conditions import CONDITIONS

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


def card_data(repo_id: str, base_model: str | None, datasets: Sequence[str], license: str | None,
              settings: dict, head: HeadConfig, evaluation: tuple[str, list[dict]] | None,
              eval_data: str | None, lora: bool = False):
    """The front matter: what the hub indexes and filters by."""
    from huggingface_hub import EvalResult, ModelCardData

    from common.models import looks_like_repo_id

    results = []
    if evaluation and eval_data:
        for row in evaluation[1]:
            for metric, key in (("exact_match", "exact_match"), ("cross_entropy_bits", "ce_bits"),
                                ("accuracy", "accuracy")):
                if row.get(key) is not None:
                    results.append(EvalResult(
                        task_type="text-generation", dataset_type="json", dataset_name=eval_data,
                        metric_type=metric, metric_value=round(float(row[key]), 6),
                        metric_name=f"{metric.replace('_', ' ')}, message: {row['condition']}"))
    return ModelCardData(
        base_model=base_model if base_model and looks_like_repo_id(base_model) else None,
        datasets=[d for d in datasets if looks_like_repo_id(d)] or None,
        license=license or "other", license_name=None if license else "same-as-the-base-model",
        library_name="transformers", pipeline_tag="text-generation", tags=TAGS + (["lora"] if lora else []),
        model_name=repo_id, eval_results=results or None,
        # the latent method, machine-readable: what a loader needs to know before loading
        interlat={"latent_dim": head.latent_dim, "prepended_length": head.prepended_length, "num_heads": head.num_heads,
                  **{k: v for k, v in settings.items() if v is not None}})


def actor_card(repo_id: str, head: HeadConfig, evaluation: tuple[str, list[dict]] | None, *,
               base_model: str | None = None, sender_model: str | None = None, datasets: Sequence[str] = (),
               eval_data: str | None = None, settings: dict | None = None, command: str | None = None,
               license: str | None = None, lora: bool = False, load_from: str | None = None):
    """The card (`huggingface_hub.ModelCard`): front matter, then what this is, how it was trained, its evaluation
    and how to load it. `load_from`: the name the loading snippet uses (default `repo_id`)."""
    from huggingface_hub import ModelCard

    settings = settings or {}
    license = license or base_model_license(base_model)
    load_from = load_from or repo_id
    data = card_data(repo_id, base_model, datasets, license, settings, head, evaluation, eval_data, lora)
    lines = [
        f"# {repo_id}: an Interlat actor",
        "",
        "A causal LM fine-tuned to act on another agent's **latent message**: the sender's last-layer hidden states",
        "`[K, d]` go through a small attention head (`latent_comm_head`) and are spliced into the actor's input",
        "embeddings between `<bop>` and `<eop>` at the end of the first user message (Interlat, arXiv 2511.09149).",
        "This folder holds the base model's weights (`model.safetensors`" + (", LoRA merged" if lora else "") +
        "), the tokenizer with the special tokens `<FIRST_HUMAN_END>`, `<bop>`, `<eop>`, and the head "
        f"(`{HEAD_FILE}`, read with `torch.load(..., weights_only=True)`; the same weights in "
        f"`{HEAD_SAFETENSORS_FILE}`).",
        "",
        "| | |", "| --- | --- |",
        f"| base model | {base_model or 'not recorded'} |",
        "| sender (whose hidden states are the latents) | "
        f"{sender_model or 'not recorded (--sender_model_name_or_path)'} |",
        f"| training data | {', '.join(f'`{d}`' for d in datasets) or 'not recorded'} |",
        f"| license | {license or 'not found on this machine: the base model license applies'} |",
        f"| latent width (sender's hidden size) | {head.latent_dim} |",
        f"| actor hidden size | {head.hidden_size} |",
        f"| `prepended_length` (latent rows read per message) | {head.prepended_length} |",
        f"| head attention heads | {head.num_heads} |",
        "",
    ]
    if settings or command:
        lines += ["## Training", ""]
        if settings:
            lines += ["| setting | value |", "| --- | --- |"]
            lines += [f"| `--{k}` | {v} |" for k, v in settings.items() if v is not None]
            lines.append("")
        if command:
            lines += ["The command line:", "", "```bash", command, "```", ""]
    if evaluation:
        source, rows = evaluation
        lines += ["## Evaluation: does the actor read the latents?", "", f"From {source}:", "",
                  "| message between `<bop>`/`<eop>` | CE on the reply (bits/token) | greedy reply = reference "
                  "| answer accuracy |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {CONDITION_NAMES.get(r['condition'], r['condition'])} | {_cell(r['ce_bits'], '.4f')} | "
                  f"{_cell(r['exact_match'], '.1%')} | {_cell(r['accuracy'], '.1%')} |" for r in rows]
        lines.append("")
    lines += [
        "## Loading", "",
        "With the interlat toolkit installed (`pip install .` in its repository: the modules `latent_head` and",
        "`evaluation`, and the commands `interlat-generate`, `interlat-eval`):", "",
        "```python",
        "import numpy as np",
        "from latent_head import LatentActor",
        "from evaluation.generation import generate_reply",
        "",
        f'actor = LatentActor.from_pretrained("{load_from}")   # base model + head + tokenizer, eval mode',
        'reply = generate_reply(actor, [{"role": "user", "content": "Where is the key?"}],',
        '                       latents=np.load("message.npy"))   # [K, latent width] hidden states of the sender',
        "```",
        "",
        f"or `interlat-generate --model_dir {load_from} --prompt \"...\" --latents message.npy`, and",
        f"`interlat-eval --model_dir {load_from} --eval_file eval.jsonl --output report.json`.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_actor_card(output_dir: str, repo_id: str, head: HeadConfig, log_history: list[dict], **info) -> str:
    """Write `README.md` into `output_dir` (whole or not at all); returns its path. `info`: `actor_card`'s keywords."""
    from common.safe_io import write_text_atomic

    path = os.path.join(output_dir, CARD_FILE)
    write_text_atomic(path, str(actor_card(repo_id, head, evaluation_rows(output_dir, log_history), **info)))
    return path


def run_card_info(model_args, data_args, args, command: str | None = None) -> dict:
    """`actor_card`'s keywords from a run's parsed arguments (read by name: any of the argument dataclasses)."""
    every = {}
    for parsed in (args, data_args, model_args):  # the model's and the data's settings win over same-named others
        every.update({k: v for k, v in vars(parsed).items() if not k.startswith("_")})
    if every.get("dataset_name"):
        datasets = [every["dataset_name"]]
        eval_data = f"{every['dataset_name']} ({every['eval_split']})" if every.get("eval_split") else None
    else:
        datasets = [f for f in (every.get("train_file"), every.get("eval_file")) if f]
        eval_data = os.path.basename(every["eval_file"]) if every.get("eval_file") else None
    if eval_data is None and every.get("eval_ratio"):
        eval_data = f"{every['eval_ratio']:.0%} of the training records, held out"
    return {"base_model": every.get("model_name_or_path"), "sender_model": every.get("sender_model_name_or_path"),
            "datasets": datasets, "eval_data": eval_data, "command": command,
            "settings": {k: every[k] for k in METHOD_SETTINGS
                         if k in every and not (k == "num_train_epochs" and (every.get("max_steps") or 0) > 0)},
            "load_from": every.get("hub_model_id") if every.get("push_to_hub") else every.get("output_dir")}
