"""The table of issue 24's device call (`gpu_speed.sh`): every run's rate and peak memory against the code
before (`base_*`, same machine, same steps), the targets, and each run's first losses against the reference
path's (`ref_b2`: no fused loss, no packing, no compiled layers).

    python benchmarks/speed_report.py RESULTS_DIR [--out summary.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os

TARGETS = {2: 25.0, 8: 45.0, 32: 60.0}  # samples/s (issue 24; 32 stands for the best batch)
PEAK_B2_GIB = 15.0
LOSS_STEPS, LOSS_TOLERANCE = 10, 1e-3  # the reference path's first 10 logged losses, within 1e-3
LOSS_KEYS = ("loss", "ce_loss", "plan_similarity", "random_contrast")


def load(results_dir: str) -> dict[str, dict]:
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        if os.path.basename(path).startswith("driver_"):
            continue
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and "per_step" in data:
            runs[data.get("name") or os.path.basename(path)[:-5]] = data
    return runs


def driver_entries(results_dir: str) -> list[dict]:
    """What `speed_runs.py` recorded of every run: status, wall time, torch.compile's counters."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "driver_*.json"))):
        with open(path) as f:
            out += json.load(f)
    return out


def graph_notes(entries: list[dict]) -> list[str]:
    """For the CUDA-graph runs: how many compiled graphs inductor ran without CUDA graphs (their reasons are in
    the log's perf hints), and the compiles of the run."""
    notes = []
    for e in entries:
        if e.get("mode") == "graphs" and e.get("status") == "ok":
            inductor = e.get("compile_counters", {}).get("inductor", {})
            stats = e.get("compile_counters", {}).get("stats", {})
            notes.append(f"{e['name']}: cudagraph_skips {inductor.get('cudagraph_skips', 0)}, "
                         f"graphs compiled {stats.get('unique_graphs', 0)}, wall {e.get('wall_s', 0):.0f} s")
    return notes


def loss_gap(run: dict, ref: dict) -> dict | None:
    """The largest |run - reference| of each logged loss over the first LOSS_STEPS steps both have."""
    mine = {r["step"]: r for r in run["per_step"]}
    theirs = {r["step"]: r for r in ref["per_step"]}
    steps = [s for s in sorted(theirs) if s in mine and s <= LOSS_STEPS]
    if not steps:
        return None
    gaps = {}
    for key in LOSS_KEYS:
        pairs = [(mine[s][key], theirs[s][key]) for s in steps if key in mine[s] and key in theirs[s]]
        if pairs:
            gaps[key] = max(abs(a - b) for a, b in pairs)
    return {"steps": len(steps), "max_abs": gaps, "within": all(v <= LOSS_TOLERANCE for v in gaps.values())}


def summarize(runs: dict[str, dict]) -> dict:
    ref = runs.get("ref_b2")
    rows = []
    for name, run in runs.items():
        batch = run.get("per_device_batch_size")
        base = runs.get(f"base_b{batch}")
        rate = run.get("samples_per_s")
        row = {"name": name, "batch": batch, "device": run.get("device"), "samples_per_s": rate,
               "tokens_per_s": run.get("tokens_per_s"), "median_step_ms": (run.get("median_step_s") or 0) * 1e3,
               "peak_alloc_gib": run.get("peak_alloc_gib"), "error": run.get("error"),
               "vs_base": rate / base["samples_per_s"] if rate and base and base.get("samples_per_s") else None}
        if ref is not None and batch == ref.get("per_device_batch_size") and run is not ref:
            row["losses_vs_reference"] = loss_gap(run, ref)
        rows.append(row)
    targets = {}
    for batch, goal in TARGETS.items():
        best = max((r for r in rows if r["batch"] == batch and r["samples_per_s"] and not r["name"].startswith(
            ("base", "ref"))), key=lambda r: r["samples_per_s"], default=None)
        targets[f"b{batch}"] = {"goal": goal, "best": best and best["samples_per_s"], "run": best and best["name"],
                                "met": bool(best and best["samples_per_s"] >= goal)}
    peaks = [r for r in rows if r["batch"] == 2 and r["peak_alloc_gib"] and not r["name"].startswith(("base", "ref"))]
    targets["b2_peak_gib"] = {"goal": PEAK_B2_GIB, "runs": {r["name"]: r["peak_alloc_gib"] for r in peaks},
                              "met": all(r["peak_alloc_gib"] <= PEAK_B2_GIB for r in peaks) if peaks else None}
    return {"rows": rows, "targets": targets}


def table(summary: dict, not_run: list[dict]) -> str:
    lines = ["| run | batch | samples/s | vs base | median step | peak GiB | first 10 losses vs reference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(summary["rows"], key=lambda r: (r["batch"] or 0, r["name"])):
        gap = r.get("losses_vs_reference")
        gap_text = "" if not gap else ("ok " if gap["within"] else "OFF ") + ", ".join(
            f"{k} {v:.1e}" for k, v in gap["max_abs"].items())
        rate = f"{r['samples_per_s']:.2f}" if r["samples_per_s"] else (r["error"] or "-")
        vs_base = "" if r["vs_base"] is None else f"{r['vs_base']:.3f}x"
        peak = "" if r["peak_alloc_gib"] is None else f"{r['peak_alloc_gib']:.1f}"
        lines.append(f"| {r['name']} | {r['batch']} | {rate} | {vs_base} | {r['median_step_ms']:.0f} ms | {peak} | "
                     f"{gap_text} |")
    for r in not_run:
        lines.append(f"| {r['name']} | {r['batch']} | {r.get('status')} {r.get('reason', '')} | | | | |")
    t = summary["targets"]
    lines.append("targets: " + "; ".join(
        f"{k} {v['best'] and round(v['best'], 2)} / {v['goal']} ({'met' if v['met'] else 'not met'}, {v['run']})"
        for k, v in t.items() if k != "b2_peak_gib")
        + f"; peak at b2 <= {PEAK_B2_GIB} GiB: {t['b2_peak_gib']['met']} {t['b2_peak_gib']['runs']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    summary = summarize(load(args.results_dir))
    entries = driver_entries(args.results_dir)
    not_run = [e for e in entries if e.get("status") != "ok"]
    summary["not_run"], summary["graph_notes"] = not_run, graph_notes(entries)
    summary["wall_s"] = {e["name"]: round(e.get("wall_s", 0), 1) for e in entries if "wall_s" in e}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    for note in summary["graph_notes"]:
        print(note)
    print("wall s per run: " + ", ".join(f"{k} {v}" for k, v in summary["wall_s"].items()))
    print(table(summary, not_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
