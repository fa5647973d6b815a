"""The quality benchmark: methods x sizes x variants on the default model, one dense reference.

    python benchmarks/quality.py --rows foldgpt:p25:removal,foldgpt:p25:share,foldgpt:p25:share-d32,sleb:p25
    python benchmarks/quality.py --rows all          # every method and FoldGPT variant at p15 / p25 / p36

A row is METHOD:POINT[:VARIANT]. POINT is the size: p15 / p25 / p36 remove about 15 / 25 /
36 % of the unique parameters (6 / 10 / 14 blocks' worth of 30). FoldGPT's variants:

    removal     the gates' removal only (the whole size), cuts repaired    work/repair/<pNNrK>
    share       6 blocks removed (3 at p15), adjacent pairs shared for     work/share/<point>
                the rest of the size
    share-dR    share's removed blocks, rank-R per-depth deltas on each    work/share-dR/<point>
                shared group (compress.delta: shares more pairs to pay
                for them), 4 of the cure's minutes on block-local healing
    share-local share with the same 4 local minutes and no deltas          work/share-local/<point>

Peers (shortgpt, sleb, streamline, layerchop) run as benchmarks/peers.py runs them. Every
row is a `compress` run with the same self-generated calibration and healing text and the
same 20-minute budget; a row whose work dir holds a finished run is reused (the report
lists each row's directory, so which ones were is visible), an interrupted one resumes.
Every row is evaluated against one dense result (benchmarks/work/dense_eval.json).

Writes benchmarks/results/quality.{json,md} and quality.png. The JSON has `dense` and
`rows`; a row carries method, point, variant, unique_params, unique_bytes, wikitext2_ppl,
self_held_out_ppl and the dev accuracies (acc_norm), never per-item lists (those stay in
the work dirs and feed the paired standard errors of the report's standing section).
The dev sets (../shared/data/dev) are measurement only: nothing here trains, calibrates
or selects on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from fold_quality import DEV, HEAL_SEQUENCES, RESULTS, Variant, dense_reference, eval_config, point_dir
from fold_quality import run_point as run_fold_point
from peers import PEERS, paired_difference
from peers import point_dir as peer_dir
from peers import run_point as run_peer_point

POINTS = ("p15", "p25", "p36")
REMOVAL = {"p15": "p15r6", "p25": "p25r10", "p36": "p36r14"}  # fold_quality points: removal only
SHARE = {"p15": "p15", "p25": "p25r6", "p36": "p36"}  # fold_quality points: some removed, pairs shared
LOCAL_MINUTES = 4.0
DEFAULT_VARIANT = "removal"  # FoldGPT's row in the standing section: what `foldgpt compress` ships by default


def foldgpt_point(point: str, variant: str) -> tuple[str, Variant, str | None]:
    """(fold_quality point, its Variant, the variant whose removed blocks it reuses)."""
    if variant == "removal":
        return REMOVAL[point], Variant(tag="repair", candidates="gates"), None
    if variant == "share":
        return SHARE[point], Variant(tag="share", candidates="gates"), None
    if variant == "share-local":
        return SHARE[point], Variant(tag=variant, local_minutes=LOCAL_MINUTES), "share"
    if variant.startswith("share-d") and variant[7:].isdigit() and int(variant[7:]) > 0:
        return SHARE[point], Variant(tag=variant, local_minutes=LOCAL_MINUTES, delta_rank=int(variant[7:])), "share"
    raise SystemExit(f"unknown FoldGPT variant {variant!r}: removal, share, share-local or share-dR (R > 0)")


def parse_rows(spec: str) -> list[tuple[str, str, str]]:
    """'all' or a comma list of METHOD:POINT[:VARIANT] -> [(method, point, variant)], checked up front."""
    if spec == "all":
        return [(m, p, v) for p in POINTS for m, v in
                [("foldgpt", "removal"), ("foldgpt", "share"), ("foldgpt", "share-d32")] + [(m, "") for m in PEERS]]
    rows = []
    for item in spec.split(","):
        method, _, rest = item.partition(":")
        point, _, variant = rest.partition(":")
        if point not in POINTS:
            raise SystemExit(f"row {item!r}: point must be one of {', '.join(POINTS)}")
        if method == "foldgpt":
            foldgpt_point(point, variant or DEFAULT_VARIANT)
            rows.append((method, point, variant or DEFAULT_VARIANT))
        elif method in PEERS or method.removesuffix("-nocure") in PEERS:
            rows.append((method, point, variant))
        else:
            raise SystemExit(f"row {item!r}: method must be foldgpt or one of {', '.join(PEERS)}")
    return rows


def peer_args(args) -> SimpleNamespace:
    """What peers.py's run_point reads from its command line, as this benchmark runs every peer."""
    return SimpleNamespace(heal_minutes=args.heal_minutes, heal_sequences=args.heal_sequences, sleb_sequences=8,
                           training_free_as_published=False, teacher_cache_mb=0.0)


def row_dir(method: str, point: str, variant: str, args) -> Path:
    if method == "foldgpt":
        name, var, _ = foldgpt_point(point, variant)
        return point_dir(name, var.tag)
    return peer_dir(method, point, peer_args(args))[2]


def run_row(method: str, point: str, variant: str, args, eval_cfg, reference: dict) -> dict:
    """Run (or reuse) one row; returns it in the results' shape plus `_eval` (per-item lists, not saved)."""
    if method == "foldgpt":
        name, var, reuse = foldgpt_point(point, variant)
        if reuse:  # the same removal as that variant's row: run it first, then skip the selection here
            source = run_row(method, point, reuse, args, eval_cfg, reference)
            var = var._replace(remove=tuple(source["removed_blocks"]))
        r = run_fold_point(name, args.heal_minutes, eval_cfg, reference, args.heal_sequences, 0.0, var)
        out = point_dir(name, var.tag)
    else:
        r = run_peer_point(method, point, peer_args(args), eval_cfg, reference)
        out = Path(r["dir"])
    folded = r["folded"]
    return {
        "method": method, "point": point, "variant": variant,
        "unique_params": r["params"]["unique"], "unique_reduction": round(r["params"]["unique_reduction"], 4),
        "unique_bytes": r["bytes"],
        **{f"{text}_ppl": round(ppl, 3) for text, ppl in folded["perplexity"].items()},
        **{task: round(m["acc_norm"], 4) for task, m in folded["tasks"].items()},
        "removed_blocks": r["removed_blocks"], "schedule": r.get("schedule") or (r.get("report") or {}).get("schedule"),
        "cure_steps": (r["cure"] or {}).get("steps"), "cure_minutes": round((r["cure"] or {}).get("seconds", 0) / 60, 1),
        "local_heal": bool(r.get("local_heal")), "dir": str(out.relative_to(RESULTS.parent.parent)),
        "_eval": folded,
    }


def write_report(dense: dict, rows: list[dict], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dense_row = {**{f"{t}_ppl": round(p, 3) for t, p in dense["perplexity"].items()},
                 **{t: round(m["acc_norm"], 4) for t, m in dense["tasks"].items()}}
    saved = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (RESULTS / "quality.json").write_text(json.dumps({"command": command, "dense": dense_row, "rows": saved}, indent=1))
    tasks = list(dense["tasks"])
    lines = [
        "# Quality per byte: FoldGPT variants and peers on SmolLM2-135M-Instruct",
        "",
        f"Reproduce: `{command}` (dev sets from ../shared/data/dev, measurement only; calibration and healing",
        "text generated by the dense model; every row the same 20-minute budget and the same texts).",
        "Perplexity in brackets: x dense. Accuracy: acc_norm, in brackets relative to dense.",
        "",
        "| point | method | variant | unique params | wikitext2 ppl | self held-out ppl | " + " | ".join(tasks) + " | cure |",
        "|---" * (7 + len(tasks)) + "|",
        f"| - | dense | - | {rows[0]['unique_params'] / (1 - rows[0]['unique_reduction']) / 1e6:.1f}M | "
        f"{dense_row['wikitext2_ppl']:.2f} | {dense_row['self_held_out_ppl']:.2f} | "
        + " | ".join(f"{dense_row[t]:.3f}" for t in tasks) + " | - |",
    ]
    for r in sorted(rows, key=lambda r: (POINTS.index(r["point"]), r["method"] != "foldgpt", r["method"], r["variant"])):
        cells = [r["point"], r["method"], r["variant"] or "-",
                 f"{r['unique_params'] / 1e6:.1f}M (-{r['unique_reduction']:.0%})"]
        cells += [f"{r[k]:.2f} ({r[k] / dense_row[k]:.2f}x)" for k in ("wikitext2_ppl", "self_held_out_ppl")]
        cells += [f"{r[t]:.3f} ({r[t] / dense_row[t]:.0%})" for t in tasks]
        cells.append(f"{r['cure_steps']} steps, {r['cure_minutes']:g} min" + (" + local" if r["local_heal"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += standing(rows)
    lines += ["", "Rows and their work dirs (a finished dir is reused on a rerun):", ""]
    lines += [f"- {r['point']} {r['method']} {r['variant']}: removed {r['removed_blocks']}, schedule {r['schedule']}, "
              f"`{r['dir']}`" for r in rows]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    plot(dense_row, rows, tasks)


def standing(rows: list[dict]) -> list[str]:
    """At each size: FoldGPT's best row by WikiText perplexity against every other row, accuracy
    differences paired over the same items (+- one SE; 'clear' beyond two)."""
    lines = ["", "Where FoldGPT stands (its row with the lowest WikiText perplexity at each size against every",
             "other method's; accuracy differences paired over the same items, +- one SE, 'clear' beyond two):", ""]
    for point in POINTS:
        mine = [r for r in rows if r["point"] == point and r["method"] == "foldgpt"]
        others = [r for r in rows if r["point"] == point and r["method"] != "foldgpt"]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["wikitext2_ppl"])
        if not others:
            lines.append(f"- {point}: FoldGPT {best['variant']} {best['wikitext2_ppl']:.1f}; no peer run at this size in this series")
            continue
        lower = [f"{r['method']} {r['wikitext2_ppl']:.1f}" for r in others if r["wikitext2_ppl"] < best["wikitext2_ppl"]]
        parts = [f"FoldGPT {best['variant']} wikitext2 {best['wikitext2_ppl']:.1f}, "
                 + (f"beaten by {', '.join(lower)}" if lower else "no peer lower")]
        for task, m in best["_eval"]["tasks"].items():
            diffs = [(r["method"], *paired_difference(r["_eval"]["tasks"][task], m)) for r in others]
            ahead = [f"{n} +{d * 100:.1f} +- {se * 100:.1f} pts{' (clear)' if d > 2 * se else ''}" for n, d, se in diffs if d > 0]
            parts.append(f"{task} {m['acc_norm']:.3f}, " + (f"beaten by {', '.join(ahead)}" if ahead else "no peer higher"))
        lines.append(f"- {point}: " + "; ".join(parts))
    return lines


def plot(dense: dict, rows: list[dict], tasks: list[str]) -> None:
    """WikiText perplexity and each task's accuracy against unique parameters, a line per method / variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["wikitext2_ppl", *tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    dense_params = rows[0]["unique_params"] / (1 - rows[0]["unique_reduction"]) / 1e6
    for ax, key in zip(axes, panels):
        for label in dict.fromkeys(f"{r['method']} {r['variant']}".strip() for r in rows):
            pts = sorted((r["unique_params"] / 1e6, r[key]) for r in rows if f"{r['method']} {r['variant']}".strip() == label)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.scatter([dense_params], [dense[key]], color="black", marker="*", s=80, label="dense")
        ax.set_title(key)
        ax.set_xlabel("unique parameters (M)")
    axes[0].set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Quality vs size on the default model (20-minute budget)")
    fig.tight_layout()
    fig.savefig(RESULTS / "quality.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help="'all' or a comma list of METHOD:POINT[:VARIANT]")
    ap.add_argument("--heal-minutes", type=float, default=20.0)
    ap.add_argument("--heal-sequences", type=int, default=HEAL_SEQUENCES)
    ap.add_argument("--limit", type=int, default=300, help="items per multiple-choice task")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from finished rows; run nothing")
    args = ap.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"{DEV} not found: this benchmark needs the development sets beside the repository")
    wanted = parse_rows(args.rows)
    eval_cfg = eval_config(args.limit, args.ppl_tokens)
    reference = dense_reference(eval_cfg)
    command = f"python benchmarks/quality.py --rows {args.rows}"
    rows = []
    for method, point, variant in wanted:
        t = time.monotonic()
        if args.report_only and not (row_dir(method, point, variant, args) / "eval.json").is_file():
            print(f"{method}:{point}:{variant}: not run, left out")
            continue
        rows.append(run_row(method, point, variant, args, eval_cfg, reference))
        print(f"{method}:{point}:{variant}: {(time.monotonic() - t) / 60:.1f} min", flush=True)
        write_report(reference, rows, command)
    print((RESULTS / "quality.md").read_text())


if __name__ == "__main__":
    main()
