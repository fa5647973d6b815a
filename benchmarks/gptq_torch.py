"""GPTQ against round to nearest on a healed fold, in torch, on two texts.

    python benchmarks/gptq_torch.py [--fold runs/main/folded] [--tokens 4096]

The fold's decoder Linears hold the 4-bit weights each method gives (the exporters store
exactly these: `export.grid.centered_grid` reads GPTQ's grid back); the tied embedding / head
stays fp32. Perplexity in disjoint 512-token windows on held-out self text (generation seed 1:
the text the exports' gate scores in `foldgpt run`, from the calibration text's distribution)
and on WikiText-2 validation (dev file, measurement only; nothing is chosen on it). GPTQ
calibrates on 8192 tokens of self text (generation seed 0).
Writes benchmarks/results/gptq_torch.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys

import torch

from common import WIKI, held_out_file, require_dev, write_table
from quant_exports import calibration_file
from quant_quality import rounded  # the exporters' 4-bit weights in every decoder Linear, each shared one once


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    with torch.no_grad():
        losses = [model(ids[:, i:i + window], labels=ids[:, i:i + window]).loss.item()
                  for i in range(0, ids.shape[1] - window + 1, window)]
    return math.exp(sum(losses) / len(losses))


def rounded_gptq(model, tokenizer):
    from export.gptq import gptq_
    from export.parity import text_windows

    model = copy.deepcopy(model)
    gptq_(model, text_windows(tokenizer, None, str(calibration_file()), 8192), 32)
    return model


def main() -> None:
    from compress.format import load_folded

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", default="runs/main/folded")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    require_dev()
    model, tok = load_folded(args.fold)
    model = model.float().eval()
    texts = {"self_held_out": held_out_file().read_text(), "wikitext2": WIKI.read_text()}
    ids = {k: tok(t, return_tensors="pt").input_ids[:, :args.tokens] for k, t in texts.items()}
    rows = []
    for name, m in (("fp32", model), ("rtn", rounded(model, "rtn")), ("gptq", rounded_gptq(model, tok))):
        row = {"weights": name, **{k: round(perplexity(m, v), 3) for k, v in ids.items()}}
        rows.append(row)
        print(row, flush=True)
    for r in rows:
        for k in ids:
            r[f"{k}_x"] = round(r[k] / rows[0][k], 4)
    command = "python benchmarks/gptq_torch.py " + shlex.join(sys.argv[1:])
    write_table("gptq_torch", {"command": command, "fold": args.fold, "tokens": args.tokens, "rows": rows},
                "GPTQ against round to nearest on the main job's fold (torch)",
                f"Reproduce: `{command}`. {args.tokens} tokens a text in disjoint 512-token windows; decoder Linears at 4 bits "
                "(symmetric groups of 32), head fp32; GPTQ calibrated on 8192 tokens of self text (seed 0). Held-out self "
                "text (seed 1) is the exports' gate text in `foldgpt run`; WikiText-2 is a dev file, measured only.",
                {"weights": "weights", "self held-out ppl": "self_held_out", "x fp32": "self_held_out_x",
                 "wikitext2 ppl": "wikitext2", "x fp32 ": "wikitext2_x"}, rows)


if __name__ == "__main__":
    main()
