"""Which blocks do the gates close under other settings, and how good is that removal?

    python benchmarks/gate_settings.py [--remove 10] [--settings "default;seed=1;steps=60,batch_size=2"]
                                       [--also "SLEB=work/peers/sleb-p25.work/folded"]   # from benchmarks/

The gates (compress.importance.learn_gates) pick the blocks FoldGPT removes. Each
setting (GateConfig fields over the defaults, `;`-separated, `default` for none) learns
gates on the benchmarks' calibration text (32 x 256 self-generated tokens, generation
seed 0), removes the closed blocks from a copy of the dense model and scores it uncured
by perplexity on held-out self-generated text (generation seed 1, as fold_split.py), so
no development set steers the choice. Beside them: ShortGPT's Block Influence ranking on
the same calibration text, and any `--also NAME=DIR` folded model (e.g. SLEB's removal).
Writes benchmarks/results/<--name>.{json,md} (gate_settings_one_sample: the estimator
before each sequence drew its own gate sample, commit 851d99e and earlier).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import fields

from fold_quality import RESULTS

from compress.data import held_out_text
from fold_split import measure_dir


def parse_setting(text: str) -> dict:
    """'steps=240,seed=1' -> {'steps': 240, 'seed': 1}, typed by GateConfig's fields."""
    from compress.importance import GateConfig

    if text in ("", "default"):
        return {}
    types = {f.name: f.type for f in fields(GateConfig)}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in types or key == "num_remove" or not value:
            raise SystemExit(f"bad setting {item!r}: want FIELD=VALUE with FIELD one of "
                             f"{', '.join(k for k in types if k != 'num_remove')}")
        out[key] = float(value) if "float" in str(types[key]) else int(value) if "int" in str(types[key]) else value
    return out


def removal_ppl(dense, tokenizer, blocks: list[int], text: str, tokens: int) -> float:
    from compress.blocks import remove_blocks
    from compress.evaluate import perplexity

    model = remove_blocks(copy.deepcopy(dense), blocks)
    return perplexity(model, tokenizer, text, max_tokens=tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remove", type=int, default=10, help="blocks to close (10 of 30: the 25%% point)")
    old = "steps=60,batch_size=2,seq_len=128"  # the defaults before 240 x 4 x 64
    ap.add_argument("--settings", default=f"{old};{old},seed=1;{old},seed=2;default;seed=1",
                    help="';'-separated GateConfig overrides, 'default' for none (default: gate_settings.md's rows)")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=DIR", help="another folded model to score")
    ap.add_argument("--name", default="gate_settings", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    settings = [(s, parse_setting(s)) for s in args.settings.split(";")]
    from compress.data import DataConfig, build_sequences
    from compress.evaluate import perplexity
    from compress.importance import GateConfig, learn_gates
    from compress.load import load_model
    from compress.shortgpt import block_influence

    command = "python benchmarks/gate_settings.py " + shlex.join(sys.argv[1:])
    dense, tok = load_model("default")
    calib = build_sequences(DataConfig(num_sequences=32, seq_len=256), dense, tok)
    text = held_out_text(dense, tok, args.tokens)
    dense_ppl = perplexity(dense, tok, text, max_tokens=args.tokens)
    rows = []

    def add(name: str, blocks: list[int], seconds: float, extra: dict | None = None) -> None:
        ppl = removal_ppl(dense, tok, blocks, text, args.tokens)
        rows.append({"name": name, "removed": sorted(blocks), "ppl_held_out": ppl, "seconds": round(seconds, 1), **(extra or {})})
        print(f"{name}: removed {sorted(blocks)}, held-out ppl {ppl:.2f} ({ppl / dense_ppl:.2f}x)", flush=True)
        write_report(dense_ppl, rows, args, command)

    for label, overrides in settings:
        t = time.monotonic()
        result = learn_gates(dense, calib, GateConfig(num_remove=args.remove, **overrides))
        add(f"gates {label}", result.closed, time.monotonic() - t, {"separated": result.separated})
    t = time.monotonic()
    bi = block_influence(dense, calib)
    add("ShortGPT BI", sorted(range(len(bi)), key=lambda i: bi[i])[: args.remove], time.monotonic() - t)
    for name, path in (a.partition("=")[::2] for a in args.also):
        r = measure_dir(name, path, text, args.tokens)
        rows.append({"name": name, "removed": r["removed"], "ppl_held_out": r["ppl_held_out"], "seconds": None})
        write_report(dense_ppl, rows, args, command)


def write_report(dense_ppl: float, rows: list[dict], args, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "remove": args.remove, "tokens": args.tokens, "dense_ppl_held_out": dense_ppl, "rows": rows},
        indent=1))
    lines = [
        f"# Gate settings at {args.remove} blocks removed: the removal each picks, uncured",
        "",
        f"Reproduce: `{command}`. Perplexity on {args.tokens} tokens of held-out self-generated text",
        f"(generation seed 1; calibration uses seed 0). Dense: {dense_ppl:.2f}.",
        "",
        "| selection | removed source blocks | held-out ppl (x dense) | seconds |",
        "|---|---|---|---|",
    ] + [f"| {r['name']} | {r['removed']} | {r['ppl_held_out']:.2f} ({r['ppl_held_out'] / dense_ppl:.2f}x) | "
         f"{r['seconds'] if r['seconds'] is not None else '-'} |" for r in rows]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
