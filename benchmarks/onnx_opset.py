"""ONNX graphs at opset 23 (fused Attention, RotaryEmbedding, RMSNormalization) against opset 18
(the same operators spelled out), on one model, through ONNX Runtime, in one run.

    python benchmarks/onnx_opset.py --model runs/main/folded [--precisions fp32 int4+emb8] [--rounds 5]

Each precision is exported at both opsets (`export.onnx.OPSET` set for the export; each behind
its parity gate, bound x1.5 for 4-bit as `foldgpt run`), then both sessions are timed side
by side in one process, in alternating rounds (order reversed every round): TTFT (prefill +
argmax) per prompt length and decode ms/token after a 32-token prompt. Ratios are opset-18
time / opset-23 time, the median over rounds (above 1: opset 23 faster). Prompt ids are seeded
random tokens. Writes benchmarks/results/onnx_opset.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from common import write_table

WORK = Path(__file__).parent / "work" / "onnx_opset"


def export(model: Path, precision: str, opset: int) -> Path:
    import export.onnx as onnx_backend
    from export.registry import ExportConfig

    out = WORK / f"{precision}-opset{opset}"
    if not (out / onnx_backend.MODEL_FILE).exists():
        onnx_backend.OPSET, before = opset, onnx_backend.OPSET
        try:
            onnx_backend.export_onnx(model, out, ExportConfig.from_spec(precision, max_ppl_ratio=1.5), measure=False)
        finally:
            onnx_backend.OPSET = before
    return out


def op_counts(folder: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node)


def main() -> None:
    from runtime_tests.latency import decode_rounds, first_token_ms, round_ratio
    from runtime_tests.runtimes import make_runner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int4+emb8"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for precision in args.precisions:
        arms = {opset: export(Path(args.model), precision, opset) for opset in (18, 23)}
        runners = {opset: make_runner("onnx", str(path), args.threads) for opset, path in arms.items()}
        rng = np.random.default_rng(0)
        for length in args.lengths:
            ids = rng.integers(3, 1000, size=length).tolist()
            ms = {opset: [] for opset in arms}
            for i in range(1 + args.rounds):  # one warm-up round
                for opset in (18, 23) if i % 2 else (23, 18):
                    t = first_token_ms(runners[opset], ids)
                    if i:
                        ms[opset].append(t)
            rows.append({"precision": precision, "measure": f"TTFT {length} tokens", "opset18_ms": round(float(np.median(ms[18])), 1),
                         "opset23_ms": round(float(np.median(ms[23])), 1), "ratio": round_ratio(ms[18], ms[23])})
            print(rows[-1], flush=True)
        dec = decode_rounds({str(k): v for k, v in runners.items()}, rounds=args.rounds, decode_tokens=64, vocab=1000)
        d18, d23 = dec["ms_per_token"]["18"], dec["ms_per_token"]["23"]
        rows.append({"precision": precision, "measure": "decode ms/token", "opset18_ms": round(float(np.median(d18)), 2),
                     "opset23_ms": round(float(np.median(d23)), 2), "ratio": round_ratio(d18, d23)})
        print(rows[-1], flush=True)
        counts = {opset: op_counts(path) for opset, path in arms.items()}
        rows.append({"precision": precision, "measure": "graph nodes", "opset18_ms": sum(counts[18].values()),
                     "opset23_ms": sum(counts[23].values()), "ratio": "-",
                     "fused": {k: v for k, v in counts[23].items() if k in ("Attention", "RotaryEmbedding", "RMSNormalization")}})
        del runners
    command = "python benchmarks/onnx_opset.py " + shlex.join(sys.argv[1:])
    write_table("onnx_opset", {"command": command, "model": args.model, "threads": args.threads, "rows": rows},
                "ONNX opset 23 (fused attention, rotary, RMSNorm) against opset 18",
                f"Reproduce: `{command}`. {args.threads} threads; both graphs of a precision timed side by side in "
                f"alternating rounds ({args.rounds} after one warm-up), medians; ratio = opset 18 time / opset 23 time, "
                "median over rounds (above 1: opset 23 faster). Graph nodes: the two graphs' node counts.",
                {"precision": "precision", "measure": "measure", "opset 18": "opset18_ms", "opset 23": "opset23_ms",
                 "x faster": "ratio"}, rows)


if __name__ == "__main__":
    main()
