"""Training-throughput benchmark of the real path: `train_actor.main(argv)` on the shared workload.

    python benchmarks/bench.py --batch_size 2 --model_max_length 3072 --steps 25 --out_name b2_3072
    python benchmarks/bench.py --shape tiny --steps 3 --n_samples 16 --out_name cpu_tiny      # CPU smoke test
    python benchmarks/bench.py ... -- --gradient_checkpointing True --loss_chunk_size 1024   # extra train_actor flags

The workload (../shared/bench: Qwen2.5-0.5B's shape, random bf16 weights, 128 ALFWorld-like
conversations with plans and 64-256 x 896 sender latents) is built once under --workload_dir.
Then `train_actor.main` runs unchanged (its parser, datasets, collator, LatentActorTrainer with
the three-branch loss and default loss weights, bf16 auto-detection) for `steps` optimizer
steps, through its public hooks only: a `TrainerCallback` times the steps and counts each branch's
real (unpadded) tokens with a forward pre-hook on the base model's decoder (`torch.nn.Module`'s
public hook), and `save_final_model=False` leaves out writing the final model (not a training step).

Timing: `torch.cuda.synchronize()` at every step end; a step's time is the interval between
consecutive step ends (data loading, three branches, backward, optimizer). Rates are total work over
the total time of steps warmup+1..steps (batches differ in length, so single steps vary widely);
the median step is reported too. Extra `--profile_steps` run after those and are profiled only.
Results: printed, and written to `<results_dir>/<out_name>.json`.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common.constants import MODEL_MAX_LENGTH  # noqa: E402

N_PARAMS_MFU = 494e6  # Qwen2.5-0.5B, the convention of ../shared/bench/README.md (10*N FLOPs per token)
PEAK_BF16_DENSE = 989e12  # H100/H200 SXM dense bf16 datasheet figure


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen05", choices=["qwen05", "qwen7b", "tiny"])
    ap.add_argument("--workload_dir", default=None, help="default: /tmp/interlat_bench/<shape>_n<n_samples>")
    ap.add_argument("--n_samples", type=int, default=128)
    ap.add_argument("--min_words", type=int, default=500, help="workload conversation length (shared default)")
    ap.add_argument("--max_words", type=int, default=1800, help="workload conversation length (shared default)")
    ap.add_argument("--batch_size", type=int, default=2, help="per-device train batch size")
    ap.add_argument("--model_max_length", type=int, default=MODEL_MAX_LENGTH, help="default: train_actor.py's")
    ap.add_argument("--steps", type=int, default=25, help="timed run length (optimizer steps)")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--profile_steps", type=int, default=0, help="extra steps after the timed ones, profiled")
    ap.add_argument("--profile_dir", default=None, help="where the profile table/trace go (default results_dir)")
    ap.add_argument("--measure_matmul", action="store_true", help="time an 8192^3 bf16 matmul first")
    ap.add_argument("--out_name", default=None)
    ap.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--output_dir", default=None, help="train_actor's --output_dir (default: a temp folder)")
    args, extra = ap.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    args.out_name = args.out_name or f"{args.shape}_b{args.batch_size}_L{args.model_max_length}"
    default_words = (args.min_words, args.max_words) == (500, 1800)
    args.workload_dir = args.workload_dir or f"/tmp/interlat_bench/{args.shape}_n{args.n_samples}" + \
        ("" if default_words else f"_w{args.min_words}-{args.max_words}")
    if args.warmup >= args.steps:
        args.warmup = args.steps // 2
        print(f"[bench] --warmup lowered to {args.warmup} (fewer steps than warmup)")
    return args, extra


def code_version() -> dict:
    """Which code was measured: git HEAD (where .git exists) and a hash of each source file."""
    import glob
    import hashlib
    import subprocess

    out = {}
    try:
        out["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
    except Exception:
        out["git_head"] = None
    out["files"] = {os.path.basename(p): hashlib.sha1(open(p, "rb").read()).hexdigest()[:10]
                    for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))}
    return out


def measure_matmul_tflops(n: int = 8192, reps: int = 20) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times) / 1e12


class TokenCounter:
    """Real tokens of each branch, counted by a forward pre-hook on the base model's decoder (on the device: no
    sync): the attention mask's ones (padded rows), or the packed row's length (packed rows have no mask)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.grad = self.nograd = self.grad_padded = self.nograd_padded = 0
        self.grad_calls = self.nograd_calls = self.grad_samples = 0

    def attach(self, decoder, actor=None) -> None:
        self.actor = actor
        decoder.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        import torch

        cu, embeds = kwargs.get("cu_seq_lens_q"), kwargs["inputs_embeds"]
        if cu is not None:  # one packed row of every sample's tokens: no padding, except to a CUDA graph's length
            real = padded = embeds.shape[1]
            known = getattr(self.actor, "packed_tokens", None)  # (real, row length) of the row being run
            if known is not None and known[1] == padded:
                real = known[0]
            samples = cu.shape[0] - 1
        else:  # padded rows [B, T]
            mask = kwargs["attention_mask"]
            real, padded, samples = mask.sum(), mask.numel(), mask.shape[0]
        if torch.is_grad_enabled():
            self.grad, self.grad_padded = self.grad + real, self.grad_padded + padded
            self.grad_calls, self.grad_samples = self.grad_calls + 1, self.grad_samples + samples
        else:
            self.nograd, self.nograd_padded, self.nograd_calls = self.nograd + real, self.nograd_padded + padded, \
                self.nograd_calls + 1

    def take(self) -> dict:
        val = lambda x: int(x.item()) if hasattr(x, "item") else int(x)  # noqa: E731
        out = {"grad_tokens": val(self.grad), "nograd_tokens": val(self.nograd),
               "grad_padded": val(self.grad_padded), "nograd_padded": val(self.nograd_padded),
               "grad_calls": self.grad_calls, "nograd_calls": self.nograd_calls, "samples": self.grad_samples}
        self.reset()
        return out


def make_timer_callback(bench, counter: TokenCounter):
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimer(TrainerCallback):
        """Times every optimizer step (synchronised at its end), profiles the steps after the timed ones, and
        keeps the model and the log history for the report."""

        def __init__(self):
            self.records, self.prof, self.t_prev, self.t_begin = [], None, None, None
            self.model, self.log_history = None, []

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.model = model
            counter.attach(model.base_model.get_decoder(), model)
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            counter.reset()
            self.t_prev = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            now = time.perf_counter()
            step = state.global_step
            rec = {"step": step, "interval_s": now - self.t_prev, "compute_s": now - self.t_begin, **counter.take()}
            self.t_prev = now
            if step <= bench.steps:
                self.records.append(rec)
                if cuda:
                    rec["max_alloc_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                if step == bench.steps and bench.profile_steps:
                    self.prof = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU]
                        + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                    self.prof.start()
                    self.t_prof = time.perf_counter()
            elif self.prof is not None and step == bench.steps + bench.profile_steps:
                sync()
                self.prof.stop()
                self.prof_wall = time.perf_counter() - self.t_prof
            print(f"[bench] step {step}: {rec['interval_s'] * 1e3:.1f} ms (compute {rec['compute_s'] * 1e3:.1f} ms), "
                  f"tokens grad {rec['grad_tokens']} nograd {rec['nograd_tokens']}", flush=True)

        def on_train_end(self, args, state, control, **kw):
            self.log_history = list(state.log_history)

    return StepTimer()


def profile_report(prof, wall_s: float, steps: int, out_dir: str, name: str) -> dict:
    import torch

    os.makedirs(out_dir, exist_ok=True)
    ka = prof.key_averages()
    sort_self = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    sort_total = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    labelled = {}  # CPU and GPU-side ranges of one label come as two rows: keep the larger of each figure
    for e in ka:
        if e.key.startswith("Optimizer.step"):
            row = labelled.setdefault(e.key, {"device_ms": 0.0, "cpu_ms": 0.0, "count": 0.0})
            row["device_ms"] = max(row["device_ms"], e.device_time_total / 1e3 / steps)
            row["cpu_ms"] = max(row["cpu_ms"], e.cpu_time_total / 1e3 / steps)
            row["count"] = max(row["count"], e.count / steps)
    path = os.path.join(out_dir, f"{name}_profile.txt")
    with open(path, "w") as f:
        f.write(f"{steps} profiled steps, {wall_s:.3f} s wall (profiler on)\n\n")
        f.write("Labelled regions, per step:\n" + json.dumps(labelled, indent=1) + "\n\n")
        f.write(f"Top 25 by self device time ({sort_self}):\n")
        f.write(ka.table(sort_by=sort_self, row_limit=25, max_name_column_width=70) + "\n\n")
        f.write(f"Top 25 by total device time ({sort_total}):\n")
        f.write(ka.table(sort_by=sort_total, row_limit=25, max_name_column_width=70) + "\n\n")
        f.write("Top 25 by self CPU time:\n")
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70) + "\n")
    trace = os.path.join(out_dir, f"{name}_trace.json")
    busy = None
    try:
        prof.export_chrome_trace(trace)
        busy = gpu_busy_from_trace(trace, steps)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
    except Exception as e:
        print(f"[bench] trace export failed: {e}")
    if busy:
        with open(path, "a") as f:
            f.write("\nFrom the trace (per profiled step): " + json.dumps(busy) + "\n")
    print(open(path).read(), flush=True)
    return {"profile_table": path, "regions_per_step": labelled, "trace_summary": busy}


def gpu_busy_from_trace(path: str, steps: int) -> dict:
    """Per profiled step: GPU busy time (union of kernel/memcpy/memset intervals), syncs, launches."""
    t = json.load(open(path))
    ev = t["traceEvents"] if isinstance(t, dict) else t
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not spans:
        return {}
    busy, cur = 0.0, list(spans[0])
    for s, e in spans[1:]:
        if s > cur[1]:
            busy += cur[1] - cur[0]
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    busy += cur[1] - cur[0]
    span = spans[-1][1] - spans[0][0]
    syncs = [e for e in ev if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "")]
    launches = [e for e in ev if e.get("cat") == "cuda_runtime" and "Launch" in e.get("name", "")]
    return {"gpu_busy_ms": busy / 1e3 / steps, "gpu_span_ms": span / 1e3 / steps, "gpu_busy_fraction": busy / span,
            "syncs": len(syncs) / steps, "sync_wait_ms": sum(e["dur"] for e in syncs) / 1e3 / steps,
            "launches": len(launches) / steps}


def main(argv=None) -> int:
    bench, extra = parse(argv)
    import workload

    t0 = time.perf_counter()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if rank:  # under torchrun rank 0 builds the workload; the others wait for it
        while not os.path.exists(os.path.join(bench.workload_dir, "workload.json")):
            time.sleep(1)
    summary = workload.build(bench.workload_dir, bench.shape, bench.n_samples, min_words=bench.min_words,
                             max_words=bench.max_words)
    t_workload = time.perf_counter() - t0
    import torch

    cuda = torch.cuda.is_available()
    matmul = measure_matmul_tflops() if bench.measure_matmul else None
    if matmul:
        print(f"[bench] bf16 8192^3 matmul: {matmul:.0f} TFLOP/s", flush=True)

    output_dir = bench.output_dir or f"/tmp/interlat_bench_out/{bench.out_name}"
    total_steps = bench.steps + bench.profile_steps
    argv_train = [
        "--model_name_or_path", os.path.join(bench.workload_dir, "model"),
        "--train_file", os.path.join(bench.workload_dir, "train.jsonl"),
        "--output_dir", output_dir,
        "--per_device_train_batch_size", str(bench.batch_size),
        "--model_max_length", str(bench.model_max_length),
        "--max_steps", str(total_steps),
        "--save_strategy", "no", "--report_to", "none", "--enable_loss_plot", "False",
        "--overwrite_output_dir", "True",  # a scratch folder, reused by every benchmark run
        "--disable_tqdm", "True", "--seed", "0",
        # a loss per step (one host sync, where the timer synchronises anyway): configurations that
        # should compute the same thing can be compared on their first steps
        "--logging_steps", "1",
    ] + extra

    import train_actor

    timer = make_timer_callback(bench, TokenCounter())
    result = {"name": bench.out_name, "shape": bench.shape, "per_device_batch_size": bench.batch_size,
              "model_max_length": bench.model_max_length, "steps": bench.steps, "warmup": bench.warmup,
              "settings": {"train_actor_argv": argv_train, "extra_flags": extra, "n_samples": bench.n_samples},
              "code": code_version(),
              "workload": summary, "workload_build_s": t_workload,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "matmul_bf16_tflops": matmul}
    t1 = time.perf_counter()
    try:
        rc = train_actor.main(argv_train, callbacks=[timer], save_final_model=False)
        result["rc"] = rc
    except torch.OutOfMemoryError as e:
        result["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
    except Exception as e:  # record and report; the JSON says what broke
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result["wall_s_main"] = time.perf_counter() - t1
    if cuda:
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30

    records = timer.records
    result["per_step"] = records
    if timer.model is not None:
        losses = {r["step"]: r for r in timer.log_history if "loss" in r}
        for r in records:
            log = losses.get(r["step"], {})
            r.update({k: log[k] for k in ("loss", "ce_loss", "plan_similarity", "random_contrast") if k in log})
        result["packed_sequences"] = getattr(timer.model, "packed", False)
    timed = [r for r in records if r["step"] > bench.warmup]
    if timed and "error" not in result:
        med = statistics.median(r["interval_s"] for r in timed)
        med_compute = statistics.median(r["compute_s"] for r in timed)
        # Rates over the whole timed window (total work / total time): batches differ in length, so step
        # times are spread (bimodally at some batch sizes) and a median step would misstate throughput.
        window = sum(r["interval_s"] for r in timed)
        totals = torch.tensor([sum(r[k] for r in timed) for k in ("grad_tokens", "nograd_tokens", "grad_padded",
                                                                   "samples")],
                              dtype=torch.float64, device="cuda" if cuda else "cpu")
        if world > 1:  # every rank's tokens (ranks' batches differ in length): the global token rate
            torch.distributed.all_reduce(totals)
        grad_tok, nograd_tok, padded, samples = (totals / len(timed)).tolist()  # per step, all ranks
        n_params = sum(p.numel() for p in timer.model.base_model.parameters())
        tps = grad_tok * len(timed) / window  # all ranks
        n = N_PARAMS_MFU if bench.shape == "qwen05" else n_params
        result.update({
            "median_step_s": med, "median_compute_s": med_compute, "timed_window_s": window,
            "mean_step_s": window / len(timed),
            "min_step_s": min(r["interval_s"] for r in timed), "max_step_s": max(r["interval_s"] for r in timed),
            "world_size": world,
            # the samples really trained (an epoch's last batch is short when the batch does not divide the
            # data), every rank's, in rank 0's time
            "samples_per_s": samples * len(timed) / window,
            "samples_per_s_from_median_step": samples / med,
            "tokens_per_step": grad_tok, "nograd_tokens_per_step": nograd_tok,
            "padded_tokens_per_step": padded, "padding_fraction": 1 - grad_tok / padded if padded else 0.0,
            "tokens_per_s": tps,
            "tokens_per_sample": grad_tok / samples,
            "mfu": 10 * n * tps / world / PEAK_BF16_DENSE,  # per GPU
            "mfu_branch_exact": (6 * n * grad_tok + 2 * n * nograd_tok) * len(timed) / window / world
                                / PEAK_BF16_DENSE,
            "mfu_vs_measured_matmul": (10 * n * tps / world / (matmul * 1e12)) if matmul else None,
            "n_params_base": n_params, "n_params_mfu": n, "peak_flops": PEAK_BF16_DENSE,
            "tokens_note": "tokens = real tokens of the gradient branch (chat text + <bop> + latents/plan + <eop>),"
                           " no padding; mfu = 10*N*tokens_per_s/peak; mfu_branch_exact counts "
                           "6N x grad-branch + 2N x no-grad-branch tokens",
        })
    if timer.prof is not None and hasattr(timer, "prof_wall"):
        result["profile"] = profile_report(timer.prof, timer.prof_wall, bench.profile_steps,
                                           bench.profile_dir or bench.results_dir, bench.out_name)
    if rank:
        return 0 if "error" not in result else 1
    os.makedirs(bench.results_dir, exist_ok=True)
    path = os.path.join(bench.results_dir, f"{bench.out_name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    keys = ("device", "per_device_batch_size", "model_max_length", "median_step_s", "samples_per_s", "tokens_per_s",
            "mfu", "mfu_branch_exact", "peak_alloc_gib", "padding_fraction", "error")
    print("[bench] RESULT " + json.dumps({k: result.get(k) for k in keys if k in result}), flush=True)
    print(f"[bench] wrote {path}")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    from common.cli import exit_process

    exit_process(main())
