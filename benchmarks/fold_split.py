"""How to spend one size budget: remove blocks, or share them? Unhealed, on held-out text.

    python benchmarks/fold_split.py [--points p25,p25r6,p25r10] [--tokens 8192]
                                    [--also shortgpt=work/peers/shortgpt-p25.work/folded]   # from benchmarks/

Points of benchmarks/fold_quality.py with the same unique-parameter count but a
different split between blocks removed (gates) and adjacent pairs shared (p25: 3
removed + 7 pairs; p25r6: 6 + 4; p25r10: 10 + none). Each runs fold_quality's own data
and fold stages (same work dirs, so a later fold_quality run cures the very same fold),
then the uncured fold is measured by perplexity on held-out self-generated text: the
dense model's samples from another generation seed than the calibration and healing
text, so no development set steers the choice. Also reported: which candidate each
shared group took and its KL. `--also NAME=DIR` measures other folded models beside
them (e.g. a peer method's uncured removal at the same size). Writes
benchmarks/results/fold_split.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from fold_quality import POINTS, RESULTS, WORK, compress_config

from compress.data import held_out_text


def measure(name: str, text: str, tokens: int) -> dict:
    from compress.recipe import compress

    t = time.monotonic()
    work = WORK / f"{name}.work"
    fold_stage = work / "fold.json"
    if not (fold_stage.is_file() and json.loads(fold_stage.read_text())["done"]):
        # data + fold stages only; the uncured model is saved beside, never over the point's
        # cured output (fold_quality's) that may already be there
        cfg = compress_config(name, heal=None)
        compress(replace(cfg, out=str(WORK / f"{name}-uncured"), work_dir=str(work)))
    report = json.loads((work / "fold_report.json").read_text())
    chosen = {g: min((k for k in report["share_scores"] if k.startswith(g + ":")), key=report["share_scores"].get)
              for g in {k.partition(":")[0] for k in report["share_scores"]}}
    return {
        "name": name, "removed": report["removed"], "schedule": report["schedule"], "params": report["params"],
        "shared": {g: {"choice": c.partition(":")[2], "kl": report["share_scores"][c]} for g, c in sorted(chosen.items())},
        "ppl_held_out": held_out(work / "folded", text, tokens)[0],
        "seconds": round(time.monotonic() - t, 1),
    }


def held_out(path: str | Path, text: str, tokens: int) -> tuple[float, dict]:
    """(perplexity on the held-out text, unique/effective parameters) of a folded model."""
    from compress.blocks import count_parameters
    from compress.evaluate import perplexity
    from compress.format import load_folded

    model, tok = load_folded(path)
    params = count_parameters(model)
    return perplexity(model, tok, text, max_tokens=tokens), {"unique": params.unique, "effective": params.effective}


def measure_dir(name: str, path: str, text: str, tokens: int) -> dict:
    """Any folded model (--also): the removal its config records, and the same perplexity."""
    config = json.loads((Path(path) / "config.json").read_text())["fold"]
    ppl, params = held_out(path, text, tokens)
    return {"name": name, "path": path, "removed": config["provenance"].get("removed_blocks", []),
            "schedule": config["schedule"], "params": params, "shared": {}, "ppl_held_out": ppl}


def write_report(dense_ppl: float, rows: list[dict], tokens: int, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fold_split.json").write_text(json.dumps({"dense_ppl_held_out": dense_ppl, "tokens": tokens,
                                                         "command": command, "points": rows}, indent=1))
    lines = [
        "# One size, three ways to reach it: blocks removed vs pairs shared (uncured unless marked cured)",
        "",
        f"Reproduce: `{command}`. Perplexity on {tokens} tokens of held-out self-generated text",
        f"(generation seed {HELD_OUT_GEN_SEED}; calibration and healing use seed 0). Dense: {dense_ppl:.2f}.",
        "",
        "| point | removed source blocks | pairs shared | unique params | depth | held-out ppl (x dense) | shared groups: choice (KL) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        groups = ", ".join(f"{g} {v['choice']} ({v['kl']:.2f})" for g, v in r["shared"].items()) or "-"
        lines.append(f"| {r['name']} | {r['removed']} | {len(r['schedule']) - len(set(r['schedule']))} | "
                     f"{r['params']['unique'] / 1e6:.1f}M | {len(r['schedule'])} | "
                     f"{r['ppl_held_out']:.2f} ({r['ppl_held_out'] / dense_ppl:.2f}x) | {groups} |")
    (RESULTS / "fold_split.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="p25,p25r6,p25r10", help=f"of {', '.join(POINTS)}")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR", help="another folded model to measure")
    args = ap.parse_args()
    names = args.points.split(",") if args.points else []
    for n in names:
        if n not in POINTS:
            raise SystemExit(f"unknown point {n!r}; known: {', '.join(POINTS)}")
    extra = [a.partition("=")[::2] for a in args.also]
    for n, d in extra:
        if not n or not (Path(d) / "config.json").is_file():
            raise SystemExit(f"--also wants NAME=DIR of a folded model, got {n}={d}")
    from compress.evaluate import perplexity
    from compress.load import load_model

    command = "python benchmarks/fold_split.py " + shlex.join(sys.argv[1:])
    dense, tok = load_model("default")
    text = held_out_text(dense, tok, args.tokens)
    dense_ppl = perplexity(dense, tok, text, max_tokens=args.tokens)
    del dense
    rows = []
    for n in names:
        rows.append(measure(n, text, args.tokens))
        print(f"{n}: held-out ppl {rows[-1]['ppl_held_out']:.2f} (dense {dense_ppl:.2f}), {rows[-1]['seconds']:.0f} s",
              flush=True)
        write_report(dense_ppl, rows, args.tokens, command)
    for n, d in extra:
        rows.append(measure_dir(n, d, text, args.tokens))
        write_report(dense_ppl, rows, args.tokens, command)
    print((RESULTS / "fold_split.md").read_text())


if __name__ == "__main__":
    main()
