"""4-bit weights that keep the fold's quality: the exporters' rounding (rtn, hqq) and the
quantization-aware cure (compress.qat), measured in perplexity.

    python benchmarks/quant_quality.py [--fold benchmarks/work/repair-local/p25r10] [--minutes 5]

Rows: the dense model and a finished fold (default: the quality benchmark's FoldGPT p25
row), each with fp32, rtn-rounded and hqq-rounded weights; then the fold after `--minutes`
more of its cure, plain (the control: same minutes, same text) and through the 4-bit grid
(`qat_bits=4`). "Rounded" is what both exporters store for every decoder Linear
(`export.quantize.int4_weights`: ONNX int4 and ExecuTorch 8da4w hold exactly these values,
tests/test_export_onnx.py), applied in torch; the tied embedding / head stays fp32 here
(8 bits in the +emb8 exports) and the exports' int8 activations come on top (8da8w costs
x1.02, benchmarks/results/export_size_executorch.md).

Perplexity on WikiText-2 validation (dev file, measurement only; nothing is chosen on it)
and on held-out self text. The cures train on the quality benchmark's healing text.
Writes benchmarks/results/quant_quality.{json,md,png}; finished cures and evaluations are
kept under benchmarks/work/quant_quality/ and reused, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, WIKI, WORK, held_out_file, require_dev

HEAL_SEQUENCES = 256  # the quality benchmark's healing text: 256 windows of 256 tokens, seed 1


def rounded(model: nn.Module, method: str) -> nn.Module:
    """A copy whose decoder Linears hold their exported 4-bit weights (each shared weight once)."""
    from export.quantize import int4_rounded

    model = copy.deepcopy(model)  # deepcopy keeps sharing: one Parameter per shared weight
    weights = {id(m.weight): m.weight for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for w in weights.values():
            w.copy_(int4_rounded(w, 32, method))
    return model


def cured(fold_dir: Path, minutes: float, qat: bool, dense, tokenizer) -> Path:
    """The fold after `minutes` more cure (through the 4-bit grid if `qat`), saved once."""
    from compress.data import DataConfig, build_sequences
    from compress.format import load_folded, save_folded
    from compress.heal import HealConfig, heal

    out = WORK / "quant_quality" / f"{fold_dir.parent.name}-{fold_dir.name}-{'qat' if qat else 'plain'}-{minutes:g}min"
    if (out / "config.json").is_file():
        return out
    model, _ = load_folded(fold_dir)
    data = build_sequences(DataConfig(num_sequences=HEAL_SEQUENCES, seq_len=256, seed=1), dense, tokenizer)
    cfg = HealConfig(max_minutes=minutes, qat_bits=4 if qat else None, teacher_cache_mb=0.0)
    model, state = heal(model, dense, data, cfg, Path(f"{out}.work"), resume=True)
    return save_folded(model, out, tokenizer, provenance={"source": str(fold_dir), "heal": {
        "steps": state.step, "minutes": minutes, **({"qat": {"bits": 4, "group_size": 32}} if qat else {})}})


def main() -> None:
    from compress.evaluate import perplexity
    from compress.format import load_folded
    from compress.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", default=str(WORK / "repair-local" / "p25r10"), help="a finished fold directory")
    ap.add_argument("--minutes", type=float, default=5.0, help="the extra cure of each arm")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    args = ap.parse_args()
    require_dev()
    fold_dir = Path(args.fold)
    if not (fold_dir / "config.json").is_file():
        raise SystemExit(f"{fold_dir}: not a finished fold (run benchmarks/quality.py first)")
    texts = {"wikitext2": WIKI.read_text(), "self_held_out": held_out_file().read_text()}
    cache_file = WORK / "quant_quality" / "ppl.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    dense, tokenizer = load_model("default")
    dense.eval()
    models = {"dense": lambda: dense, "fold": lambda: load_folded(fold_dir)[0]}
    for qat in (False, True):
        path = cured(fold_dir, args.minutes, qat, dense, tokenizer)
        models[f"fold +{args.minutes:g} min {'qat' if qat else 'plain'} cure"] = lambda p=path: load_folded(p)[0]
    rows = []
    for name, make in models.items():
        model = make().float().eval()
        for method in ("fp32", "rtn", "hqq"):
            key = f"{name} | {method} | {args.ppl_tokens}"
            if key not in cache:
                m = model if method == "fp32" else rounded(model, method)
                with torch.no_grad():
                    cache[key] = {t: round(perplexity(m, tokenizer, text, max_tokens=args.ppl_tokens), 3) for t, text in texts.items()}
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cache, indent=1))
            rows.append({"model": name, "weights": method, **cache[key]})
            print(rows[-1], flush=True)
    write(rows, "python benchmarks/quant_quality.py " + shlex.join(sys.argv[1:]), args)


def write(rows: list[dict], command: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = {r["model"]: r for r in rows if r["weights"] == "fp32"}
    for r in rows:
        r.update({f"{t}_x_fp32": round(r[t] / fp32[r["model"]][t], 4) for t in ("wikitext2", "self_held_out")})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_quality.json").write_text(json.dumps({"command": command, "fold": args.fold, "rows": rows}, indent=1))
    lines = ["# 4-bit weights: the exporters' rounding and the quantization-aware cure", "",
             f"Reproduce: `{command}` (WikiText-2 validation: dev file, measurement only; {args.ppl_tokens} tokens).",
             "Rounded: every decoder Linear holds the 4-bit weights both exporters store (symmetric groups of 32;",
             "rtn: max|w| / 7.5 scales, hqq: half-quadratic scale search); embedding / head fp32. x fp32: against",
             "the same model's fp32 weights. The two cure arms continue the fold's cure for the same minutes on the",
             "same healing text; only qat's forward runs through the rounded weights.", "",
             "| model | weights | wikitext2 ppl | x fp32 | self held-out ppl | x fp32 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['wikitext2']:.2f} | {r['wikitext2_x_fp32']:.3f} | "
              f"{r['self_held_out']:.3f} | {r['self_held_out_x_fp32']:.3f} |" for r in rows]
    (RESULTS / "quant_quality.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(fp32)
    for i, method in enumerate(("fp32", "rtn", "hqq")):
        ys = [next(r["wikitext2"] for r in rows if r["model"] == n and r["weights"] == method) for n in names]
        ax.bar([j + (i - 1) * 0.27 for j in range(len(names))], ys, width=0.27, label=method)
    ax.set_xticks(range(len(names)), [n.replace(" cure", "\ncure") for n in names], fontsize=8)
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    ax.set_title("4-bit weights: rounding method and quantization-aware cure")
    fig.tight_layout()
    fig.savefig(RESULTS / "quant_quality.png", dpi=120)
    plt.close(fig)
    print((RESULTS / "quant_quality.md").read_text())


if __name__ == "__main__":
    main()
