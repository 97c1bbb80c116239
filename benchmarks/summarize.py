"""Table of benchmarks/bench.py results: `python benchmarks/summarize.py DIR [--combined FILE] [--split DIR]`.

Reads every `*.json` result in DIR (or the runs inside a combined file), prints a markdown
table; `--combined` writes all of them into one file, `--split` writes one file per run.
"""
import argparse
import glob
import json
import os


def load(path):
    if os.path.isdir(path):
        runs = []
        for p in sorted(glob.glob(os.path.join(path, "*.json"))):
            r = json.load(open(p))
            runs += r["runs"] if "runs" in r else [r]
        return runs
    r = json.load(open(path))
    return r["runs"] if "runs" in r else [r]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(runs):
    rows = ["| run | card | batch | max len | median step | samples/s | tokens/s | MFU (10N) | MFU (branches) "
            "| peak alloc | padding |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (r.get("model_max_length", 0), r.get("per_device_batch_size", 0),
                                         r.get("name", ""))):
        if "error" in r:
            rows.append(f"| {r['name']} | {r.get('device')} | {r.get('per_device_batch_size')} | "
                        f"{r.get('model_max_length')} | {r['error'][:60]} | | | | | "
                        f"{fmt(r.get('peak_alloc_gib'), '.1f')} GiB | |")
            continue
        rows.append(
            f"| {r['name']} | {r['device']} | {r['per_device_batch_size']} | {r['model_max_length']} | "
            f"{r['median_step_s']:.3f} s | {r['samples_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['mfu_branch_exact']:.1f}% | {fmt(r.get('peak_alloc_gib'), '.1f')} GiB | "
            f"{100 * r['padding_fraction']:.1f}% |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--combined")
    ap.add_argument("--split")
    a = ap.parse_args()
    runs = load(a.path)
    print(table(runs))
    for r in runs:
        if r.get("matmul_bf16_tflops"):
            print(f"\nmeasured bf16 8192^3 matmul on {r['device']}: {r['matmul_bf16_tflops']:.0f} TFLOP/s")
    if a.combined:
        json.dump({"runs": runs}, open(a.combined, "w"), indent=1)
    if a.split:
        os.makedirs(a.split, exist_ok=True)
        for r in runs:
            json.dump(r, open(os.path.join(a.split, r["name"] + ".json"), "w"), indent=1)


if __name__ == "__main__":
    main()
