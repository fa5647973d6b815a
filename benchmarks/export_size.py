"""Export size: what an exported model costs on disk and in memory, against its unique weights.

    python benchmarks/export_size.py                                # both backends, their precisions, dense + folded
    python benchmarks/export_size.py --backends onnx --precisions fp32 --work /tmp/export_size
    python benchmarks/export_size.py --backends executorch --precisions fp32 --merge   # redo rows, keep the others

For the default model (SmolLM2-135M-Instruct) dense, and folded at the 25% point (4 of
30 blocks removed, the remaining 26 stored as 5 adjacent shared pairs + 16 single
blocks = 21 unique blocks), each backend in the export registry reports per precision
the unique weight bytes (every unique parameter once at the export precision: the bound),
the bytes on disk and the resident memory of a fresh process that loaded and ran it, each
over the unique bytes:

  onnx        fp32 / int8 / int4; also the graph ONNX Runtime optimizes and saves, and the
              session's own overhead apart from the weights
  executorch  fp32 / int8 (= 8da8w) / 8da4w, optionally +emb8 (the tied embedding and head
              in 8 bits, one tensor); resident with XNNPACK's weight cache (as PteLM runs),
              with the mapped pages kept, and with the cache off; planned memory (activations
              + KV cache) listed apart; a rough decode ms/token (1 thread, shared machine)

Results go to benchmarks/results/export_size_<backend>.{json,md}. Adding a backend: one
`Bench` entry in BENCHES (a row function, its precisions, its table and note).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def _head(backend: str, result: dict, columns: list[str]) -> list[str]:
    """Title, command, machine, note and the table's header rows."""
    return [f"# Export size: {backend}", "", f"`{result['command']}`  ", f"{result['machine']}, {result['date']}", "",
            result["note"], "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def onnx_markdown(result: dict) -> str:
    mb = 1024 * 1024
    lines = _head("onnx", result, [
        "model", "precision", "unique weights MiB", "on disk MiB (x)", "ORT optimized MiB (x)", "RSS after load MiB (x)",
        "resident weights MiB (x)", "resident, mapped pages kept MiB (x)", "resident, no prepack MiB (x)",
        "session overhead MiB", "parity"])

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


def bench_executorch(model_dir: Path, spec: str, out: Path) -> dict:
    """One export and its numbers. An export the gate rejects is still measured, at the
    temporary path the gate left it (its row says FAIL and why)."""
    from compress.format import sync_files
    from export.executorch import GateFailed, export_executorch, measure_resident, sizes
    from export.registry import ExportConfig

    start = time.perf_counter()
    try:
        r = export_executorch(model_dir, out, ExportConfig.from_spec(spec))
    except GateFailed as e:
        r = e.report
        files = {k: e.stage / f"{out.stem}.{k}" for k in ("pte", "ptd") if (e.stage / f"{out.stem}.{k}").is_file()}
        sync_files(e.stage)  # as a commit would: only written-back pages can be released
        r.update(sizes(files, r["unique_weight_bytes"]))
        r["resident"] = measure_resident(files["pte"], r["unique_weight_bytes"])
    res, parity = r["resident"], r["parity"]
    return {
        "unique_weight_bytes": r["unique_weight_bytes"], "bytes_pte": r["bytes"]["pte"], "bytes_ptd": r["bytes"]["ptd"],
        "bytes_on_disk": r["bytes"]["total"], "ratio_disk": r["ratio"],
        "rss": res["weight_cache"]["after_forward"], "ratio_rss": res["weight_cache"]["ratio"],
        "rss_pages_kept": res["pages_kept"]["after_forward"], "ratio_rss_pages_kept": res["pages_kept"]["ratio"],
        "rss_no_cache": res["no_weight_cache"]["after_forward"], "ratio_rss_no_cache": res["no_weight_cache"]["ratio"],
        "planned_memory": r["pte_layout"]["planned_memory"], "delegates": r["pte_layout"]["delegates"],
        "decode_ms_per_token": res["weight_cache"]["decode_ms_per_token"],
        "export_seconds": round(r["seconds"]["trace"] + r["seconds"]["lower"], 1),
        "parity": parity["reason"], "parity_passed": parity["passed"], "ppl_ratio": parity["details"].get("ppl_ratio"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def executorch_markdown(result: dict) -> str:
    mb = 1024 * 1024
    lines = _head("executorch", result, [
        "model", "precision", "unique weights MiB", ".pte (+ .ptd) MiB (x)", "resident MiB (x)",
        "resident MiB (x), mapped pages kept", "resident MiB (x), no weight cache", "planned MiB",
        "weights resident (x) = resident - planned", "decode ms/token", "export s", "parity"])
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | | | | | | | | | | FAIL: {r['error']} |")
            continue
        disk = f"{r['bytes_pte'] / mb:.2f}" + (f" + {r['bytes_ptd'] / mb:.2f}" if r["bytes_ptd"] else "")
        lines.append(f"| {r['model']} | {r['precision']} | {r['unique_weight_bytes'] / mb:.2f} | {disk} ({r['ratio_disk']:.4f}) | "
                     f"{r['rss'] / mb:.1f} ({r['ratio_rss']:.3f}) | {r['rss_pages_kept'] / mb:.1f} ({r['ratio_rss_pages_kept']:.3f}) | "
                     f"{r['rss_no_cache'] / mb:.1f} ({r['ratio_rss_no_cache']:.3f}) | "
                     f"{r['planned_memory'] / mb:.1f} | {(r['rss'] - r['planned_memory']) / r['unique_weight_bytes']:.3f} | "
                     f"{r['decode_ms_per_token']:.1f} | {r['export_seconds']:.0f} | "
                     f"{'pass' if r['parity_passed'] else 'FAIL'}: {r['parity']} |")
    return "\n".join(lines) + "\n"


EXECUTORCH_NOTE = (
    "Unique weight bytes: each unique parameter once (shared blocks and the tied embedding once) at the export "
    "precision: fp32 4 B/element; 8-bit 1 B/element + one fp32 scale per output row; 4-bit (8da4w, group 32) "
    "0.5 B/element + one fp32 scale per group; norms fp32 (XNNPACK keeps 4-bit group scales in bf16, so 8da4w files "
    "can come out below 1.0). int8 is 8da8w (int8 dynamic activations, int8 per-channel weights): torchao's int8 "
    "weight-only lowers to XNNPACK with wrong logits in ExecuTorch 1.5.1. Tied embedding: without +emb it stays fp32, "
    "one program constant read by the gather and by the head (mm outside XNNPACK, ~2x slower than an XNNPACK head); "
    "+emb8: the head is 8da8w in XNNPACK and all weights go to model.ptd, where the head's int8 rows and scales are "
    "the embedding_byte table (stored once on disk; XNNPACK packs the head from the mapped file, after which "
    "PteLM releases the mapped pages (export/pages.py, MADV_PAGEOUT) so only the rows the gather reads come back); +emb4 is refused: XNNPACK and embedding_4bit pack nibbles differently, so the table would be stored twice (measured in the previous run of this benchmark: 8da4w+emb4 89.7 MiB vs 8da4w+emb8 84.8 MiB on disk for the dense model, commit 7efbfe6). Resident: fresh process, "
    "anonymous growth + resident pages of the .pte/.ptd after loading and a run (8-token prefill + 9 decode steps, "
    "1 thread; mapped pages released after the first forward, or kept), planned memory (activations + static KV cache, max_context 512) included and listed apart; weight "
    "cache = XNNPACK weight_cache_enabled (packs each named weight once, frees the unpacked bytes). Decode ms/token: "
    "8 steps, 1 thread, on a machine shared with other jobs (rough)."
)


ONNX_NOTE = ("Unique weight bytes: each unique parameter once at the export "
    "precision (int8: 1 B/element + per-tensor scale and zero point; int4: block 32, 4 bits + one fp32 "
    "scale per block; norms fp32). RSS: resident-set growth in a fresh process, after a warm-up session "
    "on a throwaway graph. 'After load': from creating the session with default options "
    "(memory-mapped weights a run has not touched yet are not resident). 'Session overhead': anonymous "
    "memory of a session that copies no weight (prepacking off): graph, kernels, session state. "
    "'Resident weights': anonymous memory allocated while loading minus that overhead (copies, "
    "prepacked weights) + memory-mapped weight pages resident after an 8-token prefill and 8 decode "
    "steps; activations left out. Default (OnnxLM): prepacking on, then the mapped weight pages "
    "released (export/pages.py: MADV_PAGEOUT; pages read again fault back in and are counted). "
    "'Mapped pages kept': the same without the release. 'No prepack': session.disable_prepacking=1.")


@dataclass(frozen=True)
class Bench:
    """One backend's half: a row per (model, precision), and how its table reads."""
    row: Callable[[Path, str, Path], dict]  # (model dir, precision spec, export path) -> the row's numbers
    precisions: list[str]
    markdown: Callable[[dict], str]
    note: str


BENCHES = {
    "onnx": Bench(bench_onnx, ["fp32", "int8", "int4"], onnx_markdown, ONNX_NOTE),
    "executorch": Bench(bench_executorch, ["fp32", "int8+emb8", "8da4w", "8da4w+emb8"], executorch_markdown, EXECUTORCH_NOTE),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(BENCHES), help=f"comma-separated, of {', '.join(BENCHES)}")
    ap.add_argument("--precisions", default=None, help="comma-separated subset of each backend's precisions")
    ap.add_argument("--models", default="dense,folded25")
    ap.add_argument("--work", default="/tmp/foldgpt-export-size", help="model directories and exports")
    ap.add_argument("--merge", action="store_true", help="replace these rows in the existing results, keep the rest")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown backend {unknown[0]!r}; known: {', '.join(BENCHES)}")
    from export.registry import get_backend

    work = Path(args.work)
    dirs = build_models(work)
    command = "python benchmarks/export_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for backend in backends:
        bench = BENCHES[backend]
        precisions = [p for p in args.precisions.split(",") if p in bench.precisions] if args.precisions else bench.precisions
        rows = []
        for name in args.models.split(","):
            for spec in precisions:
                folder = work / backend / f"{name}-{spec}"
                row = {"model": name, "precision": spec}
                try:
                    row.update(bench.row(dirs[name], spec, get_backend(backend).artifact_path(folder)))
                except (ValueError, RuntimeError) as e:  # one failed export is a row, not a lost run
                    row["error"] = str(e).splitlines()[0][:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
                gc.collect()
        file = RESULTS / f"export_size_{backend}.json"
        commands = [command]
        if args.merge and file.is_file():
            old = json.loads(file.read_text())
            new = {(r["model"], r["precision"]): r for r in rows}
            rows = [new.pop((r["model"], r["precision"]), r) for r in old["rows"]] + list(new.values())
            commands = old.get("commands", [old["command"]]) + commands
        result = {
            "command": " && ".join(commands), "commands": commands,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "note": f"folded25 = default model with source blocks {REMOVED} removed and depths {PAIRS} shared in pairs "
                    f"(21 unique blocks for 26 depths). " + bench.note,
            "rows": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(result, indent=1) + "\n")
        file.with_suffix(".md").write_text(bench.markdown(result))
        print(bench.markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
