"""The fused loss's chunk function on the GPU: the Triton kernel against the torch function (eager and
compiled), on one chunk of the benchmark's shape (1024 rows x Qwen2.5's 151,936-token vocabulary).

Checks values and the gradient agree, then times each (CUDA events, median of repeats), the kernel at
several block sizes and warp counts. Writes a JSON next to `--out`.
  python benchmarks/loss_kernel_check.py --out $OUT/loss_kernel_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
from training import loss_kernel  # noqa: E402


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after three warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = args.rows, args.vocab
    randn = lambda: torch.randn(rows, vocab, device="cuda", generator=g)
    pos = randn() * 3
    plan = pos + randn()  # a plan distribution near the positive one; a negative far from it
    neg = randn() * 3
    labels = torch.randint(vocab, (rows,), device="cuda", generator=g)
    plan_w = (torch.rand(rows, device="cuda", generator=g) > 0.1).float()
    neg_w = (torch.rand(rows, device="cuda", generator=g) > 0.1).float()
    chunk = losses.ChunkLogits(pos, labels, plan, plan_w, neg, neg_w)
    call = lambda fn, **kw: fn(chunk, 1.0, 2.0, True, grad_dtype=torch.bfloat16, **kw)  # noqa: E731

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "vocab": vocab}
    import triton
    result["triton"] = triton.__version__

    # Agreement: float32 gradients of both against each other, and the bf16 gradient the loss uses.
    sums = lambda terms: losses.sum_rows(terms, plan_w, neg_w).metrics()  # noqa: E731
    want_terms, want_grad = losses.chunk_values_and_grad(chunk, 1.0, 2.0, True)
    got_terms, got_grad = loss_kernel.chunk_values_and_grad(chunk, 1.0, 2.0, True)
    want_sums, got_sums = sums(want_terms), sums(got_terms)
    result["sums_torch"] = want_sums.tolist()
    result["sums_triton"] = got_sums.tolist()
    result["sums_max_rel_diff"] = ((got_sums - want_sums).abs() / want_sums.abs().clamp_min(1e-6)).max().item()
    result["grad_max_abs_diff"] = (got_grad - want_grad).abs().max().item()
    result["grad_max_abs"] = want_grad.abs().max().item()
    print(json.dumps({k: result[k] for k in ("sums_max_rel_diff", "grad_max_abs_diff", "grad_max_abs")}))
    del want_grad, got_grad

    compiled = torch.compile(losses.chunk_values_and_grad, dynamic=True)
    times = {"torch_eager": timed(lambda: call(losses.chunk_values_and_grad), repeats=5),
             "torch_compiled": timed(lambda: call(compiled))}
    for block, warps, stages in [(1024, 4, 3), (1024, 8, 3), (2048, 4, 3), (2048, 8, 1), (2048, 8, 2),
                                 (2048, 8, 3), (2048, 8, 4), (2048, 16, 3), (4096, 8, 3), (4096, 16, 3)]:
        times[f"triton_b{block}_w{warps}_s{stages}"] = timed(lambda: call(
            loss_kernel.chunk_values_and_grad, block=block, num_warps=warps, num_stages=stages))
    times["triton_default"] = timed(lambda: call(loss_kernel.chunk_values_and_grad))
    result["ms"] = times
    # What the kernel moves: each of its three passes reads the three float32 logits; pass 3 writes a bf16 gradient.
    gbytes = (3 * 3 * 4 + 2) * rows * vocab / 1e9
    result["bytes_moved_gb"] = gbytes
    result["triton_best"] = min((v, k) for k, v in times.items() if k.startswith("triton"))
    result["triton_best_tb_per_s"] = gbytes / result["triton_best"][0]
    print(json.dumps(times, indent=1))
    print("RESULT", json.dumps({k: result[k] for k in ("device", "triton_best", "triton_best_tb_per_s")}))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
