"""Compression, measured: answer accuracy / CE with full latents vs K-latent messages, and the latency
of producing one message (K latent steps vs generating the plan text), as one JSON file.

    python benchmarks/compression_eval.py --actor_dir checkpoints/demo \
        --train_file checkpoints/demo_data/train.jsonl --eval_file checkpoints/demo_data/eval.jsonl \
        --out_dir benchmarks/results/compression_demo --ks 32,16,8,4 --seeds 0,1 \
        --train_flags "--max_steps 300 --per_device_train_batch_size 32 --learning_rate 1e-4"

For each K and seed: `sender/train.py` (a subprocess; `--nproc N` runs it under torchrun), then
`sender/collect.py --mode compressed` on the eval file and `evaluation/evaluate.py` on the
result; the same evaluation on the eval file's own (full) latents is the reference row. Latency:
the sender of each K (`LatentSender.rollout`, no gradient) and the same sender model writing the
plan greedily (`collect_hidden_states.generate_plans`: until its end of turn, up to `--max_plan_tokens`,
and forced to the mean length of the eval file's plans, those the full latents come from), at each batch size
of `--latency_batches`, median of `--reps` timed runs after `--warmup` (CUDA synchronised), in the
dtype sender/collect.py uses (bf16 on a GPU). Writes `<out_dir>/compression.json` and prints
the two tables; they hold every K/seed evaluated in `<out_dir>`, also by earlier or concurrent invocations
(one per GPU), each with the settings it was trained with (`K<k>_seed<s>/run.json`). Runs resume: a K/seed
whose report exists is not trained again. `--jobs N` runs N K/seed trainings at once on the same GPU (a 135M
model leaves most of an H200 idle); with `--time_budget_s`, a K/seed not started in time is skipped and left
out of the tables (said so).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.constants import SENDER_FILE  # noqa: E402  (after the path: the package's modules live in ROOT)

SETTINGS_FILE = "run.json"  # in each K/seed folder: the settings its sender was trained with


def run(cmd: list[str], log: str) -> None:
    """A step as a subprocess (its GPU memory is freed when it ends), its output in `log`."""
    print("$", shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {shlex.join(cmd)}; see {log}")


def evaluate(args, eval_file: str, out: str) -> str:
    """evaluation/evaluate.py on `eval_file`, its report in `out` (kept: not run again when it exists)."""
    if not os.path.exists(out):
        run([sys.executable, "-m", "evaluation.evaluate", "--model_dir", args.actor_dir, "--eval_file", eval_file,
             "--output", out, "--batch_size", str(args.eval_batch_size), "--model_max_length", str(args.model_max_length)],
            out + ".log")
    return out


def summary(report_file: str) -> dict:
    """An evaluation/evaluate.py report, cut to what the table shows: per condition CE, accuracy, samples."""
    with open(report_file) as f:
        report = json.load(f)
    return {c: {"ce_bits": v["ce_bits"], "accuracy": v.get("accuracy"), "samples": v["samples"]}
            for c, v in report["conditions"].items()}


def train_and_evaluate(args, k: int, seed: int) -> None:
    """Train the K/seed sender, write its messages for the eval file and the actor's report on them (each
    step skipped when its output exists)."""
    folder = os.path.join(args.out_dir, f"K{k}_seed{seed}")
    sender_dir, report = os.path.join(folder, "sender"), os.path.join(folder, "eval_report.json")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(sender_dir, SENDER_FILE)):
        with open(os.path.join(folder, SETTINGS_FILE), "w") as f:  # what trained it, for the table's reader
            json.dump({"k": k, "seed": seed, "train_flags": args.train_flags, "nproc": args.nproc}, f)
        launcher = [sys.executable] if args.nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc)]
        run(launcher + ["-m", "sender.train", "--actor_dir", args.actor_dir, "--model_name_or_path", args.sender_model,
                        "--train_file", args.train_file, "--output_dir", sender_dir, "--num_latents", str(k),
                        "--seed", str(seed), "--model_max_length", str(args.model_max_length), "--report_to", "none",
                        "--save_strategy", "no", *shlex.split(args.train_flags)], os.path.join(folder, "train.log"))
    compressed = os.path.join(folder, "eval_compressed.jsonl")
    if not os.path.exists(report):
        if os.path.exists(compressed):
            os.remove(compressed)  # a complete file or none: its latents are cheap to write again
        run([sys.executable, "-m", "sender.collect", "--mode", "compressed", "--sender_dir", sender_dir,
             "--input_file", args.eval_file, "--output_file", compressed, "--dtype", "float32",
             "--batch_size", str(args.eval_batch_size)], os.path.join(folder, "collect.log"))
    evaluate(args, compressed, report)


def finished_runs(out_dir: str) -> dict[str, dict[str, dict]]:
    """Every K/seed evaluated in `out_dir` (this invocation's, earlier ones', concurrent ones'): K -> seed ->
    its conditions, plus `run` (the settings it was trained with). Two invocations sharing an `out_dir`
    (one per GPU) therefore each write the whole table, whichever writes last."""
    runs: dict[int, dict[int, dict]] = {}
    for name in os.listdir(out_dir):
        match = re.fullmatch(r"K(\d+)_seed(\d+)", name)
        report = os.path.join(out_dir, name, "eval_report.json")
        if match and os.path.exists(report):
            run_file = os.path.join(out_dir, name, SETTINGS_FILE)
            entry = summary(report)
            entry["run"] = None
            if os.path.exists(run_file):
                with open(run_file) as f:
                    entry["run"] = json.load(f)
            runs.setdefault(int(match[1]), {})[int(match[2])] = entry
    return {str(k): {str(s): runs[k][s] for s in sorted(runs[k])} for k in sorted(runs, reverse=True)}


def timed(fn, reps: int, warmup: int) -> float:
    """Median seconds of `fn()` over `reps` runs after `warmup` runs."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency(args, sender_dirs: dict[int, str]) -> dict:
    import torch

    from common import models
    from sender.collect import chat_messages, first_human_message, generate_plans, load_records
    from sender.model import LatentSender

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = load_records(args.eval_file)
    model, tokenizer = models.load_model_and_tokenizer(args.sender_model, dtype=dtype)
    model.to(device).eval()
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
           "batches": {}}
    # The plans the full latents were taken from: writing one as long is what a full message costs.
    plans = [r["plan"] for r in records if isinstance(r.get("plan"), str) and r["plan"]]
    data_tokens = round(statistics.mean(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in plans)) \
        if plans else args.max_plan_tokens
    out["data_plan_tokens"] = data_tokens
    batches = {b: [records[i % len(records)] for i in range(b)] for b in args.latency_batches}
    for b, batch in batches.items():
        tasks = [first_human_message(r) for r in batch]
        lengths = []

        def write_plans(forced: int | None = None):
            plans = generate_plans(model, tokenizer, tasks, device, max_new_tokens=forced or args.max_plan_tokens,
                                   min_new_tokens=forced or 0, temperature=0)
            lengths[:] = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in plans]

        # As the sender writes it (greedy, until its end of turn), and forced to the data plans' length.
        row = {"plan_text_s": timed(write_plans, args.reps, args.warmup)}
        row["plan_tokens_mean"] = sum(lengths) / len(lengths)
        row["data_length_plan_s"] = timed(lambda: write_plans(data_tokens), args.reps, args.warmup)
        out["batches"][str(b)] = row
    for k, sender_dir in sender_dirs.items():  # each sender loaded once, timed at every batch size
        sender = LatentSender.from_pretrained(sender_dir, dtype=dtype, device=device)
        for b, batch in batches.items():
            row = out["batches"][str(b)]
            ids, mask = sender.encode_contexts([chat_messages(r) for r in batch], [r.get("plan") for r in batch])
            ids, mask = ids.to(device), mask.to(device)
            with torch.inference_mode():
                row[f"K{k}_s"] = timed(lambda: sender.rollout(ids, mask), args.reps, args.warmup)
            row[f"K{k}_speedup"] = row["plan_text_s"] / row[f"K{k}_s"]
            row[f"K{k}_speedup_data_length"] = row["data_length_plan_s"] / row[f"K{k}_s"]
        del sender
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actor_dir", required=True, help="an output folder of train_actor.py")
    p.add_argument("--sender_model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="the sender whose hidden states the actor was trained on")
    p.add_argument("--train_file", required=True)
    p.add_argument("--eval_file", required=True, help="records with full latents (and `answer` for accuracy)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--ks", default="32,16,8,4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--train_flags", default="", help="more sender/train.py flags, one string")
    p.add_argument("--nproc", type=int, default=1, help="GPUs for sender/train.py (torchrun)")
    p.add_argument("--model_max_length", type=int, default=512)
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--latency_batches", default="1,32")
    p.add_argument("--max_plan_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip_latency", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="K/seed trainings run at once (same GPU)")
    p.add_argument("--time_budget_s", type=float, default=0,
                   help="skip K/seed runs not started within this many seconds (0: no limit)")
    args = p.parse_args(argv)
    args.ks = [int(x) for x in args.ks.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.latency_batches = [int(x) for x in args.latency_batches.split(",")]
    return args


def tables(result: dict) -> str:
    lines = ["| message | seeds | CE true (bits/token) | accuracy true | accuracy shuffled | accuracy none |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda values: "-" if not values or None in values else (
        f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""))
    full = result["full"]
    lines.append(f"| full latents | - | {fmt([full['true']['ce_bits']])} | {fmt([full['true']['accuracy']])} | "
                 f"{fmt([full['shuffled']['accuracy']])} | {fmt([full['none']['accuracy']])} |")
    for k, runs in result["compressed"].items():
        get = lambda c, key: [r[c][key] for r in runs.values()]
        lines.append(f"| K = {k} | {','.join(runs)} | {fmt(get('true', 'ce_bits'))} | {fmt(get('true', 'accuracy'))} | "
                     f"{fmt(get('shuffled', 'accuracy'))} | {fmt(get('none', 'accuracy'))} |")
    if "latency" in result:
        lat = result["latency"]
        ks = [k for k in result["compressed"] if f"K{k}_s" in next(iter(lat["batches"].values()))]
        lines += ["", f"latency of one message on {lat['device']} ({lat['dtype']}), median seconds "
                  f"(speedup vs the sender's own plan / vs a plan of the data plans' {lat['data_plan_tokens']} tokens):",
                  "", "| batch | own plan (tokens) | data-length plan | " + " | ".join(f"K = {k}" for k in ks) + " |",
                  "| --- | --- | --- |" + " --- |" * len(ks)]
        for b, row in lat["batches"].items():
            lines.append(f"| {b} | {row['plan_text_s']:.4f} ({row['plan_tokens_mean']:.0f}) | "
                         f"{row['data_length_plan_s']:.4f} | " + " | ".join(
                             f"{row[f'K{k}_s']:.4f} ({row[f'K{k}_speedup']:.1f}x / "
                             f"{row[f'K{k}_speedup_data_length']:.1f}x)" for k in ks) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"args": {k: v for k, v in vars(args).items()},
              "full": summary(evaluate(args, args.eval_file, os.path.join(args.out_dir, "eval_full.json"))),
              "compressed": {}}
    start = time.time()

    def job(k: int, seed: int) -> bool:
        """Whether the K/seed run was done (or had been); False: skipped, the time budget spent."""
        done = os.path.exists(os.path.join(args.out_dir, f"K{k}_seed{seed}", "eval_report.json"))
        if args.time_budget_s and time.time() - start > args.time_budget_s and not done:
            print(f"K = {k}, seed {seed}: skipped (--time_budget_s {args.time_budget_s:.0f} spent)", flush=True)
            return False
        train_and_evaluate(args, k, seed)
        return True

    from concurrent.futures import ThreadPoolExecutor  # each job is subprocesses: threads only wait on them

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # seeds of the same K first: the table needs both
        futures = {(k, s): pool.submit(job, k, s) for k in args.ks for s in args.seeds}
    result["compressed"] = finished_runs(args.out_dir)
    result["skipped"] = [f"K{k}_seed{s}" for (k, s), f in futures.items() if not f.result()]
    latency_ks = [k for k in args.ks if str(args.seeds[0]) in result["compressed"].get(str(k), {})]
    if not args.skip_latency and latency_ks:
        result["latency"] = latency(args, {k: os.path.join(args.out_dir, f"K{k}_seed{args.seeds[0]}", "sender")
                                           for k in latency_ks})
    with open(os.path.join(args.out_dir, "compression.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(tables(result))
    print(f"wrote {os.path.join(args.out_dir, 'compression.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
