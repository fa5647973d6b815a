"""Which blocks to remove and how to repair the cuts, on the default model, before any cure.

    python benchmarks/cut_repair.py [--remove 10] [--fits none,dense,sequential] [--ppl-tokens 16384]

Every removal candidate of compress.select proposes a set of --remove blocks from the
default calibration windows (the model's own text, 32 windows; 8 more are held back) and
is scored there by held-back KL to the dense model with the default repair, as `foldgpt
compress` scores them. Then every distinct set is removed and its cuts repaired with each
fit of compress.repair (none: removal alone), and measured by perplexity on WikiText-2
(dev set, measurement only: nothing is fitted or chosen on it) and on held-out self text
(another generation seed). No cure: this isolates what the choice and the repair do.

Writes benchmarks/results/cut_repair_rN.{json,md,png}. Rows are kept in
benchmarks/work/cut_repair_rN.json as they finish, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, WORK = ROOT / "benchmarks" / "results", ROOT / "benchmarks" / "work"
WIKI = ROOT.parent / "shared" / "data" / "dev" / "wikitext2_valid" / "wiki.valid.raw"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remove", type=int, default=10)
    ap.add_argument("--fits", default="none,dense,sequential")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    args = ap.parse_args()

    import torch

    from compress.blocks import remove_blocks
    from compress.evaluate import perplexity
    from compress.load import load_model
    from compress.recipe import CompressConfig
    from compress.repair import RepairConfig, repair_cuts
    from compress.select import SelectConfig, choose_removal

    from common import held_out_file  # benchmarks/ is on the path when run as a script

    torch.manual_seed(0)
    dense, tok = load_model("default")
    texts = {"wikitext2": WIKI.read_text(), "self_held_out": held_out_file().read_text()}
    state_file = WORK / f"cut_repair_r{args.remove}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"rows": []}

    def save():
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(state_file)

    def ppl(model) -> dict:
        return {k: round(perplexity(model, tok, t, max_tokens=args.ppl_tokens), 3) for k, t in texts.items()}

    if "dense" not in state:
        state["dense"] = ppl(dense)
        save()
    if "selection" not in state:
        from compress.data import build_sequences

        calib = build_sequences(CompressConfig(out="unused").calib, dense, tok)
        t = time.monotonic()
        chosen = choose_removal(dense, calib, args.remove, SelectConfig(), repair=RepairConfig())
        state["selection"] = {"winner": chosen.winner, "table": chosen.table, "seconds": round(time.monotonic() - t, 1),
                              "calib_windows": len(calib)}
        torch.save(calib, WORK / f"cut_repair_r{args.remove}_calib.pt")
        save()
    calib = torch.load(WORK / f"cut_repair_r{args.remove}_calib.pt")
    fit_windows = SelectConfig().split(calib)[0]
    sets: dict[tuple, list[str]] = {}
    for cand, row in state["selection"]["table"].items():
        sets.setdefault(tuple(row["removed"]), []).append(cand)
    done = {(tuple(r["removed"]), r["fit"]) for r in state["rows"]}
    for removed, cands in sets.items():
        for fit in args.fits.split(","):
            if (removed, fit) in done:
                continue
            model = remove_blocks(copy.deepcopy(dense), list(removed))
            t, report = time.monotonic(), None
            if fit != "none":
                _, report = repair_cuts(model, dense, fit_windows, RepairConfig(fit=fit))
            row = {"candidates": cands, "removed": list(removed), "fit": fit, "repair_s": round(time.monotonic() - t, 1),
                   "ppl": ppl(model), "cuts": asdict(report)["cuts"] if report else []}
            print(json.dumps({k: row[k] for k in ("candidates", "fit", "ppl")}), flush=True)
            state["rows"].append(row)
            save()
            del model
    write_report(state, args)


def write_report(state: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"cut_repair_r{args.remove}"
    sel, dense = state["selection"], state["dense"]
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": f"python benchmarks/cut_repair.py --remove {args.remove}",
                                                       **state}, indent=1))
    lines = [f"# Removal candidates and cut repair, {args.remove} of 30 blocks removed, no cure",
             "", f"`python benchmarks/cut_repair.py --remove {args.remove}`; dense perplexity WikiText-2 "
             f"{dense['wikitext2']:.2f}, held-out self text {dense['self_held_out']:.2f} (first {args.ppl_tokens} tokens "
             "of each; WikiText is a dev set, measurement only).", "",
             f"Selection (`compress.select`, as `foldgpt compress` runs it): {sel['calib_windows'] - 8} calibration windows "
             f"propose, 8 held back score (KL to dense per token, cuts repaired sequentially). Winner: **{sel['winner']}**; "
             f"whole selection {sel['seconds'] / 60:.1f} min (this run scored repaired sets only; `compress.select` now "
             "scores each set as removed too and keeps a repair only where it lowers the held-back KL).", "",
             "| candidate | removed | held-back KL | propose s | score s |", "|---|---|---|---|---|"]
    for c, r in sel["table"].items():
        lines.append(f"| {c} | {r['removed']} | {r['kl']:.4f} | {r['propose_s']} | {r['score_s']} |")
    lines += ["", "Perplexity x dense after removal, by repair fit (repair seconds in brackets):", "",
              "| candidates | removed | " + " | ".join(f"{f} wiki / self" for f in args.fits.split(",")) + " |",
              "|---|---|" + "---|" * len(args.fits.split(","))]
    by_set: dict[tuple, dict] = {}
    for r in state["rows"]:
        by_set.setdefault(tuple(r["removed"]), {"candidates": r["candidates"]})[r["fit"]] = r
    for removed, fits in by_set.items():
        cells = []
        for f in args.fits.split(","):
            r = fits.get(f)
            cells.append("-" if r is None else f"{r['ppl']['wikitext2'] / dense['wikitext2']:.2f}x / "
                         f"{r['ppl']['self_held_out'] / dense['self_held_out']:.2f}x ({r['repair_s']:.0f})")
        lines.append(f"| {', '.join(fits['candidates'])} | {list(removed)} | " + " | ".join(cells) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(8, 4))
    fits = args.fits.split(",")
    width = 0.8 / len(fits)
    for i, f in enumerate(fits):
        ys = [by_set[k][f]["ppl"]["wikitext2"] / dense["wikitext2"] if f in by_set[k] else 0 for k in by_set]
        ax.bar([x + i * width for x in range(len(by_set))], ys, width, label=f"repair: {f}")
    ax.set_xticks([x + width * (len(fits) - 1) / 2 for x in range(len(by_set))])
    ax.set_xticklabels(["\n".join(v["candidates"]) for v in by_set.values()], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 perplexity / dense (log)")
    ax.set_title(f"{args.remove} of 30 blocks removed, no cure")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
