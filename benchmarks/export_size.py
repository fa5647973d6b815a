"""Export size: what an exported model costs on disk and in memory, against its unique weights.

    python benchmarks/export_size.py                       # onnx, fp32/int8/int4, dense + folded
    python benchmarks/export_size.py --precisions fp32 --work /tmp/export_size

For the default model (SmolLM2-135M-Instruct) dense, and folded at the 25% point (4 of
30 blocks removed, the remaining 26 stored as 5 adjacent shared pairs + 16 single
blocks = 21 unique blocks), each backend reports per precision:
  unique weight bytes  every unique parameter once, at the export precision (the bound)
  bytes on disk        the exported files holding the graph and weights
  bytes ORT optimized  (onnx) the graph ONNX Runtime actually runs, saved and weighed
  session RSS          resident growth from loading the model in a fresh process
and each of them over the unique weight bytes. Results go to
benchmarks/results/export_size_<backend>.{json,md}.

Adding a backend: write `bench_<name>(model_dir, precision, out) -> dict` returning the
same row keys (None where a number does not apply), list it in BACKENDS with its
precisions, and run with --backends <name>.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RESULTS = ROOT / "benchmarks" / "results"
REMOVED = [20, 21, 22, 23]  # late-middle blocks, where adjacent blocks are most alike
PAIRS = [(14, 15), (16, 17), (18, 19), (20, 21), (22, 23)]  # depths after removal (26 left)


def build_models(work: Path) -> dict[str, Path]:
    """The two model directories the benchmark exports, built once and reused."""
    from compress.blocks import count_parameters, remove_blocks, share_blocks
    from compress.format import save_folded
    from compress.load import load_model

    dirs = {"dense": work / "dense", "folded25": work / "folded25"}
    if all((d / "config.json").is_file() for d in dirs.values()):
        return dirs
    model, tok = load_model("default")
    dense_unique = count_parameters(model).unique
    save_folded(model, dirs["dense"], tok, provenance={"source": "default"})
    folded = copy.deepcopy(model)
    remove_blocks(folded, REMOVED)
    schedule, block = [], -1
    for depth in range(folded.config.num_hidden_layers):
        block += 0 if any(depth == b for _, b in PAIRS) else 1
        schedule.append(block)
    share_blocks(folded, schedule)
    unique = count_parameters(folded).unique
    print(f"folded25: removed source blocks {REMOVED}, shared pairs (depths) {PAIRS}, schedule {schedule}: "
          f"{unique / 1e6:.2f}M unique params vs {dense_unique / 1e6:.2f}M dense ({1 - unique / dense_unique:.1%} fewer)")
    save_folded(folded, dirs["folded25"], tok, provenance={"source": "default", "method": "benchmark 25% point"})
    return dirs


def bench_onnx(model_dir: Path, precision: str, out: Path) -> dict:
    from export.onnx import export_onnx
    from export.registry import ExportConfig

    start = time.perf_counter()
    r = export_onnx(model_dir, out, ExportConfig(precision=precision))
    rss = r["session_rss"]
    return {
        "unique_weight_bytes": r["unique_weight_bytes"], "bytes_on_disk": r["bytes_on_disk"],
        "bytes_optimized": r["bytes_ort_optimized"],
        "rss_load": rss["default"]["load"], "session_overhead": r["session_overhead"],
        "resident_weights": r["resident_weights"], "resident_weights_pages_kept": r["resident_weights_pages_kept"],
        "resident_weights_no_prepack": r["resident_weights_no_prepack"],
        "ratio_disk": r["ratios"]["disk"], "ratio_optimized": r["ratios"]["ort_optimized"],
        "ratio_rss_load": r["ratios"]["rss_load"], "ratio_resident_weights": r["ratios"]["resident_weights"],
        "ratio_resident_weights_pages_kept": r["ratios"]["resident_weights_pages_kept"],
        "ratio_resident_weights_no_prepack": r["ratios"]["resident_weights_no_prepack"],
        "session_rss": rss, "initializers": r["initializers"]["count"],
        "parity": r["parity"]["reason"], "parity_passed": r["parity"]["passed"],
        "ppl_ratio": r["parity"]["details"].get("ppl_ratio"), "seconds": round(time.perf_counter() - start, 1),
    }


BACKENDS = {"onnx": (bench_onnx, ["fp32", "int8", "int4"])}


def to_markdown(backend: str, result: dict) -> str:
    mb = 1024 * 1024
    lines = [f"# Export size: {backend}", "", f"`{result['command']}`  ", f"{result['machine']}, {result['date']}", "",
             result["note"], "",
             "| model | precision | unique weights MiB | on disk MiB (x) | ORT optimized MiB (x) "
             "| RSS after load MiB (x) | resident weights MiB (x) | resident, mapped pages kept MiB (x) "
             "| resident, no prepack MiB (x) | session overhead MiB | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(b, ratio):
        return "n/a" if b is None else f"{b / mb:.2f} ({ratio:.4f})"

    def mib(b):
        return "n/a" if b is None else f"{b / mb:.1f}"

    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['precision']} | {row['unique_weight_bytes'] / mb:.2f} | "
                     f"{cell(row['bytes_on_disk'], row['ratio_disk'])} | {cell(row['bytes_optimized'], row['ratio_optimized'])} | "
                     f"{cell(row['rss_load'], row['ratio_rss_load'])} | {cell(row['resident_weights'], row['ratio_resident_weights'])} | "
                     f"{cell(row['resident_weights_pages_kept'], row['ratio_resident_weights_pages_kept'])} | "
                     f"{cell(row['resident_weights_no_prepack'], row['ratio_resident_weights_no_prepack'])} | "
                     f"{mib(row['session_overhead'])} | "
                     f"{'pass' if row['parity_passed'] else 'FAIL'}: {row['parity']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="onnx", help=f"comma-separated, of {', '.join(BACKENDS)}")
    ap.add_argument("--precisions", default=None, help="comma-separated subset of each backend's precisions")
    ap.add_argument("--models", default="dense,folded25")
    ap.add_argument("--work", default="/tmp/foldgpt-export-size", help="model directories and exports")
    args = ap.parse_args(argv)
    work = Path(args.work)
    dirs = build_models(work)
    for backend in args.backends.split(","):
        bench, precisions = BACKENDS[backend]
        if args.precisions:
            precisions = [p for p in args.precisions.split(",") if p in precisions]
        rows = []
        for name in args.models.split(","):
            for precision in precisions:
                row = {"model": name, "precision": precision, **bench(dirs[name], precision, work / backend / f"{name}-{precision}")}
                print(json.dumps(row), flush=True)
                rows.append(row)
        result = {
            "command": "python benchmarks/export_size.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "note": (f"folded25 = default model with source blocks {REMOVED} removed and depths {PAIRS} shared in pairs "
                     "(21 unique blocks for 26 depths). Unique weight bytes: each unique parameter once at the export "
                     "precision (int8: 1 B/element + per-tensor scale and zero point; int4: block 32, 4 bits + one fp32 "
                     "scale per block; norms fp32). RSS: resident-set growth in a fresh process, after a warm-up session "
                     "on a throwaway graph. 'After load': from creating the session with default options "
                     "(memory-mapped weights a run has not touched yet are not resident). 'Session overhead': anonymous "
                     "memory of a session that copies no weight (prepacking off): graph, kernels, session state. "
                     "'Resident weights': anonymous memory allocated while loading minus that overhead (copies, "
                     "prepacked weights) + memory-mapped weight pages resident after an 8-token prefill and 8 decode "
                     "steps; activations left out. Default (OnnxLM): prepacking on, then the mapped weight pages "
                     "released (export/pages.py: MADV_PAGEOUT; pages read again fault back in and are counted). "
                     "'Mapped pages kept': the same without the release. 'No prepack': session.disable_prepacking=1."),
            "rows": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"export_size_{backend}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"export_size_{backend}.md").write_text(to_markdown(backend, result))
        print(to_markdown(backend, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
