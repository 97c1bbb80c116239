"""Steps-to-read: how many optimizer steps (batch 32) until the actor reads the sender's latents.

Steps-to-read is the first evaluation step at which, on the held-out set, true latents beat shuffled ones
by >= 1 bit/token and >= 90% of the reference replies are the actor's greedy (teacher-forced arg-max)
prediction with true latents (`cond/delta_bits_shuffled_minus_true`, `cond/true_exact_match`, logged by
`train_actor.py`'s evaluation; `--stop_when_latents_read` ends a run there).

    # data: three tasks (rooms without distractors, rooms with distractors, counts), latents by the embedded SmolLM2
    python benchmarks/steps_to_read.py prepare --out /tmp/str --n_train 2000 --n_eval 64
    # the grid: task x seed x recipe, several runs at a time on one GPU; one JSON line per finished run
    python benchmarks/steps_to_read.py grid --data /tmp/str --results results.jsonl --recipes old,recommended \\
        --seeds 1,2,3 --workers 8 --max_steps 150 --eval_steps 10 --deadline_s 500
    python benchmarks/steps_to_read.py table results.jsonl     # markdown table, task x seed x recipe

A run that ends (max_steps or the deadline) without reading counts as "> its last evaluated step".
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# task name -> demo/make_demo_task.py flags
TASKS = {
    "rooms": ["--task", "rooms", "--max_distractors", "0"],
    "rooms_distract": ["--task", "rooms", "--max_distractors", "2"],
    "count": ["--task", "count", "--max_distractors", "2"],
}

# recipe name -> train_actor.py flags on top of the common ones (batch 32, lr 1e-4)
OLD = ["--negative_form", "latents_only"]  # the specification's defaults with the earlier negative
RECIPES = {
    "old": OLD,
    "published_neg": [],  # the defaults now: the published negative
    "old_gpu_readme": OLD + ["--pure_latent_prob", "1.0", "--head_learning_rate", "2e-3"],
    "warm": ["--head_warm_start_steps", "300"],
    "warm_hlr": ["--head_warm_start_steps", "300", "--head_learning_rate", "1e-3"],
    "warm_pure50": ["--head_warm_start_steps", "300", "--pure_latent_prob", "0.5"],
    "warm_const": ["--head_warm_start_steps", "300", "--lr_scheduler_type", "constant_with_warmup",
                   "--warmup_steps", "5"],
    "warm_oldneg": OLD + ["--head_warm_start_steps", "300"],
    "hlr": ["--head_learning_rate", "2e-3"],
    "warm_const_pure50": ["--head_warm_start_steps", "300", "--lr_scheduler_type", "constant_with_warmup",
                          "--warmup_steps", "5", "--pure_latent_prob", "0.5"],
    "warm_const_lr2": ["--head_warm_start_steps", "300", "--lr_scheduler_type", "constant_with_warmup",
                       "--warmup_steps", "5", "--learning_rate", "2e-4"],
    "warm_const_pure50_lr2": ["--head_warm_start_steps", "300", "--lr_scheduler_type", "constant_with_warmup",
                              "--warmup_steps", "5", "--pure_latent_prob", "0.5", "--learning_rate", "2e-4"],
    "published_all": ["--contrast_divergence", "published", "--loss_weighting", "adaptive", "--fused_loss", "false"],
    "warm_published_all": ["--head_warm_start_steps", "300", "--contrast_divergence", "published",
                           "--loss_weighting", "adaptive", "--fused_loss", "false"],
}


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)  # `-m` modules resolve from the repo root


def prepare(args) -> None:
    """Each task's raw records and their latents (the embedded SmolLM2 as sender)."""
    procs = []
    for task, flags in TASKS.items():
        out = os.path.join(args.out, task)
        run([sys.executable, os.path.join(ROOT, "demo", "make_demo_task.py"), "--out_dir", out, "--n_train",
             str(args.n_train), "--n_eval", str(args.n_eval), *flags])
    # The first collection converts the embedded model into the cache; the others then run side by side.
    for i, task in enumerate(TASKS):
        out = os.path.join(args.out, task)
        for split in ("eval", "train"):
            cmd = [sys.executable, "-m", "sender.collect", "--model_name_or_path", MODEL,
                   "--mode", "teacher_forced", "--batch_size", str(args.batch_size),
                   "--input_file", os.path.join(out, f"{split}_raw.jsonl"),
                   "--output_file", os.path.join(out, f"{split}.jsonl")]
            if i == 0 and split == "eval":
                run(cmd)
            else:
                procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL, cwd=ROOT))
    if any(p.wait() for p in procs):
        raise SystemExit("a latent collection failed")


def common_flags(data: str, task: str, seed: int, out_dir: str, max_steps: int, eval_steps: int,
                 batch_size: int = 32) -> list[str]:
    task_dir = os.path.join(data, task)
    return ["--model_name_or_path", MODEL, "--train_file", os.path.join(task_dir, "train.jsonl"),
            "--eval_file", os.path.join(task_dir, "eval.jsonl"), "--output_dir", out_dir,
            "--max_steps", str(max_steps), "--per_device_train_batch_size", str(batch_size), "--per_device_eval_batch_size", "64",
            "--learning_rate", "1e-4", "--seed", str(seed), "--eval_strategy", "steps", "--eval_steps", str(eval_steps),
            "--logging_steps", str(eval_steps), "--save_strategy", "no", "--report_to", "none",
            "--prepended_length", "64", "--model_max_length", "512", "--eval_latent_conditions", "64",
            "--enable_loss_plot", "false", "--stop_when_latents_read", "true", "--dataloader_num_workers", "0",
            "--compile_layers", "false", "--loss_kernel", "eager", "--disable_tqdm", "true"]


def read_log(out_dir: str) -> list[dict]:
    """The rows of a run's loss_log.csv ([] when it has none)."""
    path = os.path.join(out_dir, "loss_log.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def read_curve(rows: list[dict]) -> list[dict]:
    """The cond/* rows of a run's loss log (`read_log`), as floats."""
    keys = ("cond/delta_bits_shuffled_minus_true", "cond/true_exact_match", "cond/shuffled_exact_match",
            "cond/none_exact_match", "cond/true_ce_bits", "cond/shuffled_ce_bits", "cond/plan_text_exact_match")
    curve = []
    for r in rows:
        if r.get("cond/delta_bits_shuffled_minus_true"):
            curve.append({"step": int(float(r["step"])), **{k.split("/")[1]: float(r[k]) for k in keys if r.get(k)}})
    return curve


def steps_to_read(curve: list[dict], margin: float = 1.0, min_exact: float = 0.9) -> int | None:
    for point in curve:
        if point.get("delta_bits_shuffled_minus_true", -1) >= margin and point.get("true_exact_match", 0) >= min_exact:
            return point["step"]
    return None


def grid(args) -> None:
    jobs = [(recipe, task, seed) for recipe in args.recipes.split(",") for seed in map(int, args.seeds.split(","))
            for task in args.tasks.split(",")]
    done = set()
    if os.path.exists(args.results):
        with open(args.results) as f:
            done = {(r["recipe"], r["task"], r["seed"]) for r in map(json.loads, f)}
    jobs = [j for j in jobs if j not in done]
    start = time.time()
    running: dict = {}
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    os.makedirs(args.work, exist_ok=True)
    while jobs or running:
        left = args.deadline_s - (time.time() - start)
        while jobs and len(running) < args.workers and left > args.min_run_s:
            recipe, task, seed = job = jobs.pop(0)
            out_dir = os.path.join(args.work, f"{recipe}-{task}-{seed}")
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(out_dir)
            flags = list(RECIPES[recipe])
            if args.warm_steps is not None and "--head_warm_start_steps" in flags:
                flags[flags.index("--head_warm_start_steps") + 1] = str(args.warm_steps)
            cmd = [sys.executable, os.path.join(ROOT, "train_actor.py"),
                   *common_flags(args.data, task, seed, out_dir, args.max_steps, args.eval_steps, args.batch_size),
                   *flags]
            log = open(os.path.join(out_dir, "log.txt"), "w")
            running[job] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                            time.time(), out_dir, log)
        if not jobs and not running:
            break
        if left <= 0:  # out of time: stop the runs; they are not recorded, so a later call runs them again
            for job, (proc, _, out_dir, log) in running.items():
                proc.kill()
                proc.wait()
                log.close()
                print(f"stopped at the deadline (not recorded): {' '.join(map(str, job))}", flush=True)
            break
        time.sleep(2)
        for job, (proc, t0, out_dir, log) in list(running.items()):
            if proc.poll() is None and left > 0:
                continue
            proc.wait()
            log.close()
            rows = read_log(out_dir)  # read once: the curve and the warm start's entry
            curve = read_curve(rows)
            recipe, task, seed = job
            result = {"recipe": recipe, "task": task, "seed": seed, "steps_to_read": steps_to_read(curve),
                      "last_step": curve[-1]["step"] if curve else 0, "wall_s": round(time.time() - t0, 1),
                      "returncode": proc.returncode, "max_steps": args.max_steps, "curve": curve}
            if proc.returncode not in (0, None) and not curve:
                with open(os.path.join(out_dir, "log.txt")) as f:
                    result["error"] = f.read()[-2000:]
            warm = [r for r in rows if r.get("warm_start/loss")]
            if warm:
                result["warm_start"] = {k: float(v) for k, v in warm[0].items() if k.startswith("warm_start/") and v}
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{time.time() - start:6.0f}s] {recipe:>16} {task:>15} seed {seed}: steps_to_read "
                  f"{result['steps_to_read']} (last {result['last_step']}, {result['wall_s']} s, rc {proc.returncode})",
                  flush=True)
            if not args.keep:
                shutil.rmtree(out_dir, ignore_errors=True)
            del running[job]
    for recipe, task, seed in jobs:
        print(f"not run (deadline): {recipe} {task} {seed}", flush=True)


def table(args) -> None:
    with open(args.results) as f:
        rows = [json.loads(line) for line in f]
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by = {(r["recipe"], r["task"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    fmt = lambda r: "-" if r is None else (str(r["steps_to_read"]) if r["steps_to_read"] is not None
                                           else f"> {r['last_step']}")
    print("| recipe | " + " | ".join(f"{t} s{s}" for t in tasks for s in seeds) + " | read | median | worst |")
    print("| --- " * (len(tasks) * len(seeds) + 4) + "|")
    for recipe in recipes:
        cells = [by.get((recipe, t, s)) for t in tasks for s in seeds]
        got = [c for c in cells if c is not None]
        read = [c["steps_to_read"] for c in got if c["steps_to_read"] is not None]
        worst = "never" if len(read) < len(got) else (max(read) if read else "-")
        median = statistics.median([c["steps_to_read"] if c["steps_to_read"] is not None else float("inf")
                                    for c in got]) if got else "-"
        print(f"| {recipe} | " + " | ".join(fmt(c) for c in cells) + f" | {len(read)}/{len(got)} | {median} | {worst} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--out", required=True)
    pp.add_argument("--n_train", type=int, default=2000)
    pp.add_argument("--n_eval", type=int, default=64)
    pp.add_argument("--batch_size", type=int, default=64)
    pg = sub.add_parser("grid")
    pg.add_argument("--data", required=True)
    pg.add_argument("--results", required=True)
    pg.add_argument("--work", default="/tmp/steps_to_read_runs")
    pg.add_argument("--recipes", default="old,warm")
    pg.add_argument("--tasks", default=",".join(TASKS))
    pg.add_argument("--seeds", default="1,2,3")
    pg.add_argument("--workers", type=int, default=8)
    pg.add_argument("--max_steps", type=int, default=150)
    pg.add_argument("--batch_size", type=int, default=32)
    pg.add_argument("--warm_steps", type=int, default=None, help="override the recipes' warm-start steps")
    pg.add_argument("--eval_steps", type=int, default=10)
    pg.add_argument("--deadline_s", type=float, default=500)
    pg.add_argument("--min_run_s", type=float, default=60, help="start no run with less time than this left")
    pg.add_argument("--keep", action="store_true", help="keep each run's output folder")
    pt = sub.add_parser("table")
    pt.add_argument("results")
    args = p.parse_args(argv)
    {"prepare": prepare, "grid": grid, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
