"""The household games' results (issue 25): success by condition, family and split, from envs.play reports.

    python benchmarks/envs_summary.py --data DATA --out summary.json \
        --report seed0:eval_seen=s0/play_eval_seen.json --report seed0:eval_unseen=... \
        --report expert:eval_seen=baselines/expert_eval_seen.json ...

Each `--report PLAYER:SPLIT=FILE` is an envs.play report (missing files are skipped: a cut run reports what
finished). Families come from DATA/SPLIT_raw.jsonl. Writes the JSON (per player, split, condition: success,
episodes, mean steps of won games, per family), a markdown table (`--table`) and a chart (`--plot`): success
by condition, seen vs unseen, the actor seeds' mean with each seed as a dot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from envs.household import FAMILIES

CONDITIONS = ("true", "shuffled", "none", "plan_text")
SPLITS = ("eval_seen", "eval_unseen")


def families(data: str, split: str) -> dict[str, str]:
    with open(os.path.join(data, f"{split}_raw.jsonl")) as f:
        return {r["id"]: r["family"] for r in map(json.loads, f)}


def score(episodes: list[dict]) -> dict:
    played = [e for e in episodes if e["applies"]]
    won = [e for e in played if e["won"]]
    return {"episodes": len(played), "success": len(won) / len(played) if played else None,
            "mean_steps_won": float(np.mean([e["steps"] for e in won])) if won else None}


def summarise(data: str, reports: dict[tuple[str, str], str]) -> dict:
    """{player: {split: {condition: score + per-family scores}}} of the reports that exist."""
    out: dict = defaultdict(dict)
    for (player, split), path in reports.items():
        if not os.path.exists(path):
            continue
        with open(path) as f:
            report = json.load(f)
        fam = families(data, split)
        by_condition = defaultdict(list)
        for e in report["episodes"]:
            by_condition[e["condition"]].append(e)
        out[player][split] = {c: dict(score(eps), families={f: score([e for e in eps if fam[e["id"]] == f])
                                                            for f in FAMILIES})
                              for c, eps in by_condition.items()}
    return dict(out)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def actor_players(summary: dict) -> list[str]:
    return sorted(p for p in summary if p.startswith("seed"))


def table(summary: dict) -> str:
    """Markdown: overall success per player/split/condition, then per family (actor seeds' mean)."""
    lines = ["| player | split | true latents | shuffled | no message | plan as text | steps of won games |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for player in actor_players(summary) + [p for p in ("expert", "explorer") if p in summary]:
        for split in SPLITS:
            res = summary[player].get(split)
            if not res:
                continue
            if player in ("expert", "explorer"):
                r = res.get("none", {})
                cells = ["-", "-", _pct(r.get("success")), "-"]
                steps = r.get("mean_steps_won")
            else:
                cells = [_pct(res.get(c, {}).get("success")) for c in CONDITIONS]
                steps = res.get("true", {}).get("mean_steps_won")
            steps_cell = "-" if steps is None else f"{steps:.1f}"
            lines.append(f"| {player} | {split[5:]} | " + " | ".join(cells) + f" | {steps_cell} |")
    seeds = actor_players(summary)
    if summary:
        lines += ["", "Per family (the actor seeds' mean; the expert and the blind explorer; the expert's steps):", "",
                  "| split | family | true | shuffled | none | plan text | expert | explorer | expert steps |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for split in SPLITS:
            for fam in FAMILIES:
                cells = []
                for c in CONDITIONS:
                    fams = [summary[s][split][c]["families"][fam] for s in seeds if c in summary[s].get(split, {})]
                    vals = [f["success"] for f in fams if f["success"] is not None]
                    cells.append(_pct(float(np.mean(vals))) if vals else "-")
                for p in ("expert", "explorer"):
                    r = summary.get(p, {}).get(split, {}).get("none")
                    cells.append(_pct(r["families"][fam]["success"]) if r else "-")
                r = summary.get("expert", {}).get(split, {}).get("none")
                steps = r["families"][fam]["mean_steps_won"] if r else None
                cells.append("-" if steps is None else f"{steps:.1f}")
                lines.append(f"| {split[5:]} | {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = actor_players(summary)
    labels = list(CONDITIONS) + ["expert", "explorer"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.38
    for k, split in enumerate(SPLITS):
        means, dots = [], []
        for label in labels:
            if label in CONDITIONS:
                vals = [summary[s][split][label]["success"] for s in seeds if label in summary[s].get(split, {})]
            else:
                r = summary.get(label, {}).get(split, {}).get("none")
                vals = [r["success"]] if r else []
            means.append(float(np.mean(vals)) if vals else 0.0)
            dots.append(vals)
        x = np.arange(len(labels)) + (k - 0.5) * width
        bars = ax.bar(x, means, width, label=split[5:], color="C0" if k == 0 else "C1", alpha=0.85)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        for xi, vals in zip(x, dots):
            if len(vals) > 1:
                ax.plot([xi] * len(vals), vals, "k.", ms=4)
    ax.set_xticks(np.arange(len(labels)), ["true latents", "shuffled", "no message", "plan as text", "expert",
                                           "blind explorer"], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("success rate")
    ax.set_title(title or "household games: success by condition, seen vs unseen", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--report", action="append", default=[], help="PLAYER:SPLIT=FILE (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--table", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    reports = {}
    for item in args.report:
        key, _, path = item.partition("=")
        player, _, split = key.partition(":")
        if not path or split not in SPLITS:
            print(f"error: --report {item!r}: expected PLAYER:SPLIT=FILE with SPLIT in {', '.join(SPLITS)}",
                  file=sys.stderr)
            return 2
        reports[(player, split)] = path
    summary = summarise(args.data, reports)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    text = table(summary)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    if args.plot and summary:
        plot(summary, args.plot, args.title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
