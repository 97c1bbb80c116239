"""Numerics of the `bf16_lm_head` experiment: loss sums and gradients, fp32 vs bf16 vocabulary projection.

    python benchmarks/check_bf16_loss.py          # CUDA if present; Qwen2.5-0.5B's width and vocabulary
Hidden states are random rows scaled like a final RMSNorm output (unit RMS) times a learned-like gain,
the weight is N(0, 0.02) (the workload's init) plus a few large rows; labels random.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402


def run(mode: str, h, plan_h, neg_h, labels, w):
    """mode: fp32 | tf32 (fp32 GEMMs on tensor cores) | bf16 (bf16 operands and logits)."""
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    if mode == "bf16":
        project = lambda x: x.to(torch.bfloat16) @ w.to(torch.bfloat16).T  # noqa: E731
    else:
        project = lambda x: x @ w.T  # noqa: E731
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        s = losses.latent_comm_loss_sums(losses.LossInputs(h, labels, plan_hidden=plan_h, neg_hidden=neg_h), project,
                                         losses.LossConfig(loss_chunk_size=1024))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    total = s.ce + s.plan_similarity + 2 * s.random_contrast
    total.backward()
    return torch.stack([s.ce, s.plan_similarity, s.random_contrast, s.js]).detach(), h.grad, w.grad


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = 3000 if dev == "cuda" else 300, 896, 151936
    w = (torch.randn(v, d, generator=g) * 0.02)
    w[:1000] *= 8  # some frequent tokens with larger logits
    gain = 1 + 3 * torch.rand(d, generator=g)
    mk = lambda: (torch.randn(n, d, generator=g) * gain)  # noqa: E731
    h, plan_h = mk(), mk()
    plan_h = 0.7 * h + 0.3 * plan_h  # the plan branch is close to the positive one
    neg_h = mk()
    labels = torch.randint(0, v, (n,), generator=g)
    args = [t.to(dev) for t in (h, plan_h, neg_h, labels, w)]
    s32, gh32, gw32 = run("fp32", *args)
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    print(f"[{dev}] sums fp32 [ce, plan_sim, contrast, js]:", [f"{x:.6g}" for x in s32.tolist()])
    for mode in (["tf32", "bf16"] if dev == "cuda" else ["bf16"]):
        s, gh, gw = run(mode, *args)
        print(f"[{dev}] {mode}: sums", [f"{x:.6g}" for x in s.tolist()], "relative error per sum",
              [f"{abs(a - b) / max(abs(b), 1e-30):.1e}" for a, b in zip(s.tolist(), s32.tolist())],
              f"grad(hidden) {rel(gh, gh32):.1e}, grad(weight) {rel(gw, gw32):.1e}")


if __name__ == "__main__":
    main()
