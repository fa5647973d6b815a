"""How a folded point's quality grows with the cure's budget: the same fold, cured for several budgets.

    python benchmarks/heal_curve.py [--point p25r10] [--minutes 5,10,20,40]

Issue 3's target (1.3x dense perplexity, 97% of dense accuracy at 25% removed) is set
against a 20-minute cure on two CPU cores; this shows how far a larger budget moves it.
Each budget is its own cure (warm-up, cosine decay over that budget) from the same gates,
removal and sharing: fold_quality.py's point NAME@MINUTES, whose work dir copies the
base point's data and fold stages (the budget equal to --heal-minutes is the base point
itself). Cures run without the teacher cache, as every committed cure. Writes
benchmarks/results/heal_curve.{json,md,png}; dev sets from ../shared/data/dev,
measurement only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fold_quality import DEV, HEAL_SEQUENCES, RESULTS, dense_reference, eval_config, parse_point, row, run_point, table_head

TARGET_PPL, TARGET_ACC = 1.3, 0.97  # issue 3, at 25% of total parameters removed


def base_name(point: str) -> str:
    """The point without its budget: p25r10@5+1024 -> p25r10+1024."""
    head, plus, windows = point.partition("+")
    return head.partition("@")[0] + plus + windows


def write_report(runs: list[dict], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heal_curve.json").write_text(json.dumps(runs, indent=1, default=str))
    dense = runs[0]["dense"]
    lines = [
        f"# Cure budget vs quality: {base_name(runs[0]['name'])} on SmolLM2-135M-Instruct",
        "",
        f"Reproduce: `{command}`. One fold (same gates, removal, sharing), each budget its own cure",
        f"({len(os.sched_getaffinity(0))} CPU cores, teacher cache off). Target (issue 3): wikitext2 ppl <= {TARGET_PPL}x dense, accuracy >= {TARGET_ACC:.0%} of dense.",
        "",
    ] + table_head(dense, runs[0]["params"]["source_unique"], "cure", {"steps": "-"})
    for r in runs:
        cure = r["cure"] or {}
        lines.append(row(f"{r['heal_minutes']:g}-min cure", r["params"]["unique"], r["bytes"], r["folded"], dense,
                         cure.get("seconds"), (str(cure.get("steps", "-")),)))
    (RESULTS / "heal_curve.md").write_text("\n".join(lines) + "\n")
    plot(runs)


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = runs[0]["dense"]
    minutes = [r["heal_minutes"] for r in runs]
    fig, (ppl_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    ppl_ax.plot(minutes, [r["folded"]["perplexity"]["wikitext2"] / dense["perplexity"]["wikitext2"] for r in runs], marker="o")
    ppl_ax.axhline(TARGET_PPL, color="gray", linestyle="--", label="target")
    ppl_ax.set_ylabel("wikitext2 ppl / dense")
    for task in dense["tasks"]:
        acc_ax.plot(minutes, [r["folded"]["tasks"][task]["acc_norm"] / dense["tasks"][task]["acc_norm"] for r in runs],
                    marker="o", label=task)
    acc_ax.axhline(TARGET_ACC, color="gray", linestyle="--", label="target")
    acc_ax.set_ylabel("acc_norm / dense")
    for ax in (ppl_ax, acc_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
        ax.set_xlabel(f"cure budget (minutes, {len(os.sched_getaffinity(0))} CPU cores)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{base_name(runs[0]['name'])}: quality vs cure budget")
    fig.tight_layout()
    fig.savefig(RESULTS / "heal_curve.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", default="p25r10", help="a fold_quality.py point (NAME[:DISTILL][+WINDOWS])")
    ap.add_argument("--minutes", default="5,10,20,40", help="cure budgets, comma-separated")
    ap.add_argument("--heal-minutes", type=float, default=20.0, help="fold_quality's budget: that budget is the base point itself")
    ap.add_argument("--limit", type=int, default=300, help="items per multiple-choice task (as fold_quality)")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    args = ap.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"{DEV} not found: this benchmark needs the development sets beside the repository")
    if "@" in args.point:
        raise SystemExit(f"--point {args.point!r}: give the point without a budget; --minutes sets the budgets")
    try:
        budgets = sorted({float(m) for m in args.minutes.split(",")})
    except ValueError:
        raise SystemExit(f"--minutes {args.minutes!r}: expected comma-separated numbers") from None
    if budgets[0] <= 0:
        raise SystemExit("--minutes: every budget must be positive")
    head, plus, windows = args.point.partition("+")
    points = [args.point if m == args.heal_minutes else f"{head}@{m:g}{plus}{windows}" for m in budgets]
    for p in points:
        parse_point(p)
    eval_cfg = eval_config(args.limit, args.ppl_tokens)
    reference = dense_reference(eval_cfg)
    command = "python benchmarks/heal_curve.py " + " ".join(sys.argv[1:])
    runs = []
    for p in sorted(points, key=lambda p: "@" in p):  # the base point first: every other budget copies its fold
        t = time.monotonic()
        runs.append(run_point(p, args.heal_minutes, eval_cfg, reference, HEAL_SEQUENCES))
        print(f"{p}: done in {(time.monotonic() - t) / 60:.1f} min", flush=True)
        runs.sort(key=lambda r: r["heal_minutes"])
        write_report(runs, command)
    print((RESULTS / "heal_curve.md").read_text())


if __name__ == "__main__":
    main()
