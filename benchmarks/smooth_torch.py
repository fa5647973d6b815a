"""SmoothQuant against plain 8da8w (int8 dynamic activations, int8 weights), in torch, on two texts.

    python benchmarks/smooth_torch.py [--fold runs/main/folded] [--tokens 4096] [--alphas 0.5 0.8]

Each model computes as ExecuTorch's int8(+emb8) program does (`export.smooth.fake_8da8w`:
per-token int8 inputs and per-channel int8 weights in every Linear, the tied head too), with
and without smoothing (`export.smooth.smooth_`, calibrated on 8192 tokens of self text,
generation seed 0). Perplexity in disjoint 512-token windows on held-out self text (seed 1)
and WikiText-2 validation (dev file, measurement only; the alpha is not chosen on it).
Writes benchmarks/results/smooth_torch.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

from common import WIKI, held_out_file, require_dev, write_table
from gptq_torch import perplexity
from quant_exports import calibration_file


def main() -> None:
    from compress.format import load_folded
    from compress.load import load_model
    from export.parity import text_windows
    from export.smooth import fake_8da8w, smooth_

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", default="runs/main/folded")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8])
    args = ap.parse_args()
    require_dev()
    texts = {"self_held_out": held_out_file().read_text(), "wikitext2": WIKI.read_text()}
    rows = []
    for name, (model, tok) in (("dense", load_model("default")), ("fold", load_folded(args.fold))):
        model = model.float().eval()
        ids = {k: tok(t, return_tensors="pt").input_ids[:, :args.tokens] for k, t in texts.items()}
        windows = text_windows(tok, None, str(calibration_file()), 8192)
        arms = [("fp32", model), ("8da8w", fake_8da8w(model))]
        for alpha in args.alphas:
            smoothed = copy.deepcopy(model)
            smooth_(smoothed, windows, alpha)
            arms.append((f"8da8w smooth {alpha}", fake_8da8w(smoothed)))
        base = None
        for arm, m in arms:
            row = {"model": name, "weights": arm, **{k: round(perplexity(m, v), 3) for k, v in ids.items()}}
            base = base or row
            for k in ids:
                row[f"{k}_x"] = round(row[k] / base[k], 4)
            rows.append(row)
            print(row, flush=True)
    command = "python benchmarks/smooth_torch.py " + shlex.join(sys.argv[1:])
    write_table("smooth_torch", {"command": command, "fold": args.fold, "tokens": args.tokens, "rows": rows},
                "SmoothQuant and 8da8w (torch)",
                f"Reproduce: `{command}`. {args.tokens} tokens a text in disjoint 512-token windows; every Linear (head "
                "too) with per-token int8 inputs and per-channel int8 weights, as ExecuTorch's int8+emb8; smoothing "
                "calibrated on 8192 tokens of self text (seed 0). Held-out self text (seed 1) is the exports' gate text "
                "in `foldgpt run`; WikiText-2 is a dev file, measured only.",
                {"model": "model", "weights": "weights", "self held-out ppl": "self_held_out", "x fp32": "self_held_out_x",
                 "wikitext2 ppl": "wikitext2", "x fp32 ": "wikitext2_x"}, rows)


if __name__ == "__main__":
    main()
