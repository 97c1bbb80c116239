"""Several benchmark runs in one process, for a device call with little time (issue 24: the code before and
after, at batch 2, 8 and 32, and the reference path's losses, in about five minutes).

Each run is `bench.py`'s `main` (the real `train_actor.main`, timed by its callback), called in turn in this
process: the interpreter, torch and transformers start once, and torch.compile's compiled layers carry over
from run to run (each run still builds its own model, data loader and trainer). A run that would end after
`--deadline` (by its estimate) is skipped and recorded as skipped; every finished run's JSON is written by
bench.py as it ends, so a process killed later loses only the run in flight.

    python benchmarks/speed_runs.py --root .base --plan base --results_dir $OUT/results --deadline EPOCH_S
    python benchmarks/speed_runs.py --root . --plan new --results_dir $OUT/results --deadline EPOCH_S

`--root`: the code tree to measure (its bench.py at the root or in benchmarks/): `.base` is a copy of the
code before the change (`git archive`), so both are measured on the same machine in the same call.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time

# (steps, warmup) per batch size, the same for every code and variant: batches differ in length, so rates
# compare only over the same steps. Batch 2 runs longer: a CUDA-graph variant records a graph set for each
# new shape bucket, twice each, in its first steps.
STEPS = {2: (40, 18), 8: (24, 10), 32: (14, 4)}
REFERENCE = ["--fused_loss", "false", "--loss_kernel", "eager", "--packed_sequences", "false",
             "--compile_layers", "false"]
GRAPHS = ["--cuda_graphs", "true"]
# name, batch, extra train_actor flags, steps (None: STEPS), compile mode ("default", "graphs", "eager")
PLANS = {
    "base": [("base_b2", 2, [], None, "default"), ("base_b32", 32, [], None, "default"),
             ("base_b8", 8, [], None, "default")],
    # in order of need, as the deadline may cut the last ones: the default at 2 and 32, the graphs at 2 and 8
    # (the small batches they are for), the default at 8, the graphs at 32
    "new": [("ref_b2", 2, REFERENCE, (10, 5), "eager"),
            ("new_b2", 2, [], None, "default"), ("new_b32", 32, [], None, "default"),
            ("graphs_b2", 2, GRAPHS, None, "graphs"), ("graphs_b8", 8, GRAPHS, None, "graphs"),
            ("new_b8", 8, [], None, "default"), ("graphs_b32", 32, GRAPHS, None, "graphs")],
    # the CPU dry run (tiny shape, a few steps): the same driver and report, no GPU variant
    "cpu_base": [("base_b2", 2, [], (3, 1), "eager")],
    "cpu": [("ref_b2", 2, REFERENCE, (3, 1), "eager"), ("new_b2", 2, [], (3, 1), "eager")],
}
COMMON = ["--head_warm_start_steps", "0"]  # the head's warm start runs before the timed steps: skip its wall time
# Estimated wall seconds, for skipping what cannot end before the deadline (H200, earlier device calls): a run's
# setup (model, data, trainer: ~10 s in calls 19-22), the first compile of a mode in this process (the default's
# from the disk cache that an earlier process filled: ~9 s; the graphs' from nothing), a step at each batch size.
SETUP_S, LATER_COMPILE_S, GRAPH_RECORDING_S = 9.0, 6.0, 8.0
FIRST_COMPILE_S = {"default": 15.0, "graphs": 30.0}
STEP_S = {2: 0.17, 8: 0.27, 32: 0.72}
EAGER_STEP_S = 0.5


def load_bench(root: str):
    """`bench.py` of the code tree at `root` (before or after its move into benchmarks/), with that tree first on
    sys.path, so that everything it imports comes from that tree."""
    root = os.path.abspath(root)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (here, os.getcwd())]
    sys.path[:0] = [root, os.path.join(root, "benchmarks")]
    path = next(p for p in (os.path.join(root, "bench.py"), os.path.join(root, "benchmarks", "bench.py"))
                if os.path.exists(p))
    spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def estimate_s(batch: int, steps: int, mode: str, first_of_mode: bool) -> float:
    step = EAGER_STEP_S if mode == "eager" else STEP_S.get(batch, 0.72 * batch / 32)
    compile_s = 0.0 if mode == "eager" else (FIRST_COMPILE_S[mode] if first_of_mode else LATER_COMPILE_S)
    return SETUP_S + compile_s + (GRAPH_RECORDING_S if mode == "graphs" else 0.0) + steps * step


def counters() -> dict:
    """torch.compile's counters (graphs compiled, recompiles, CUDA-graph skips and their reasons), as plain numbers."""
    from torch._dynamo.utils import counters as c

    return {group: dict(values) for group, values in c.items() if values}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".")
    ap.add_argument("--plan", choices=sorted(PLANS), required=True)
    ap.add_argument("--results_dir", required=True)
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds by which every run must have ended")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: the whole plan)")
    ap.add_argument("--bench_args", default="", help="extra bench.py flags for every run (e.g. the CPU dry run's)")
    args = ap.parse_args(argv)
    bench = load_bench(args.root)
    import torch
    import torch._dynamo

    # Runs of several batch sizes and two compile modes share this process: never fall back to eager because
    # the per-function cache of compiled variants filled up (the default limit is 8).
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    import workload  # the root's benchmarks/workload.py (load_bench put it first): checked once per process

    build, built = workload.build, {}
    workload.build = lambda *a, **k: built.setdefault("summary", build(*a, **k))
    os.makedirs(args.results_dir, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    report, modes_seen, failed_modes, previous_mode = [], set(), set(), None
    extra = args.bench_args.split()
    for name, batch, flags, steps, mode in PLANS[args.plan]:
        if only and name not in only:
            continue
        steps, warmup = steps or STEPS.get(batch, (20, 6))
        est = estimate_s(batch, steps, mode, mode not in modes_seen)
        entry = {"name": name, "batch": batch, "steps": steps, "warmup": warmup, "flags": flags, "mode": mode,
                 "estimate_s": est, "root": args.root}
        now = time.time()
        if mode in failed_modes:  # e.g. CUDA graphs that broke at batch 2: not again at 8 and 32
            entry.update(status="skipped", reason=f"an earlier {mode} run failed")
            print(f"[speed_runs] skip {name}: {entry['reason']}", flush=True)
            report.append(entry)
            continue
        if args.deadline is not None and now + est > args.deadline:
            entry.update(status="skipped", reason=f"{est:.0f} s estimated, {args.deadline - now:.0f} s left")
            print(f"[speed_runs] skip {name}: {entry['reason']}", flush=True)
            report.append(entry)
            continue
        if previous_mode not in (None, mode, "eager") and mode != "eager":
            torch._dynamo.reset()  # compiled with other options: a fresh cache, not a ninth variant
            if previous_mode == "graphs":  # and the graphs' memory pools go (else the next run's peak has them)
                try:
                    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                    reset_cudagraph_trees()
                except ImportError:
                    pass
        if mode == "graphs":
            torch._logging.set_logs(perf_hints=True)  # why a CUDA graph was not used, if one was not
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            entry["allocated_before_gib"] = torch.cuda.memory_allocated() / 2 ** 30
        before = counters()
        t = time.time()
        argv_run = ["--batch_size", str(batch), "--steps", str(steps), "--warmup", str(warmup), "--out_name", name,
                    "--results_dir", args.results_dir] + extra + ["--"] + COMMON + flags
        print(f"[speed_runs] run {name}: {' '.join(argv_run)} (estimated {est:.0f} s)", flush=True)
        try:
            rc = bench.main(argv_run)
            entry["status"] = "ok" if rc == 0 else f"rc {rc}"
        except Exception as e:  # recorded; the next run goes on (a CUDA error may break them too: they say so)
            import traceback

            traceback.print_exc()
            entry["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if entry["status"] != "ok":
            failed_modes.add(mode)
        entry["wall_s"] = time.time() - t
        after = counters()
        entry["compile_counters"] = {g: {k: v - before.get(g, {}).get(k, 0) for k, v in vals.items()
                                         if v != before.get(g, {}).get(k, 0)} for g, vals in after.items()}
        modes_seen.add(mode)
        previous_mode = mode
        print(f"[speed_runs] {name}: {entry['status']} in {entry['wall_s']:.1f} s (estimated {est:.0f} s)", flush=True)
        report.append(entry)
        with open(os.path.join(args.results_dir, f"driver_{args.plan}.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: data loader workers and CUDA-graph pools of finished runs need not be torn down.
    os._exit(status)
