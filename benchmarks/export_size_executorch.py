"""Export size, ExecuTorch half: .pte bytes and resident memory over the unique weight bytes.

    python benchmarks/export_size_executorch.py            # dense + folded25 x fp32, int8+emb8, 8da4w, 8da4w+emb8
    python benchmarks/export_size_executorch.py --models folded25 --precisions fp32 --work /tmp/export_size
    python benchmarks/export_size_executorch.py --precisions fp32 --merge   # redo rows, keep the others

The models are `benchmarks/export_size.py`'s (`build_models`): the default model
(SmolLM2-135M-Instruct) dense, and folded25 (4 of 30 blocks removed, 5 adjacent pairs
shared: 21 unique blocks for 26 depths, ~24% fewer unique parameters), so both backends
measure the same directories. A precision is `fp32`, `int8` (= 8da8w), `8da4w`, optionally
`+emb8` (the tied embedding and head quantized, one tensor; +emb4 is refused, see
export/executorch.py). Per row:
  unique weight bytes   each unique parameter once at the export precision (export.quantize)
  bytes on disk         the .pte (+ .ptd), and over the unique bytes
  resident              fresh process, after loading and a run (8-token prefill + 9 decode steps):
                        anonymous growth + resident pages of the program's own files, as PteLM
                        runs (XNNPACK's weight cache on, mapped pages released after packing),
                        with the mapped pages kept, and with the cache off; over the unique bytes.
                        Includes the planned memory (activations + KV cache), listed apart.
  decode ms/token       mean of the last 8 decode steps in the resident probe (1 thread; a rough number here,
                        the machine is shared: runtime_tests measures latency properly)
  export seconds        trace + lower; the gate and measurement are timed apart
Results: benchmarks/results/export_size_executorch.{json,md}. `measure_executorch` is the
function the combined benchmark calls.
"""

from __future__ import annotations

import argparse
import gc
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
PRECISIONS = ["fp32", "int8+emb8", "8da4w", "8da4w+emb8"]


def bench_one(model_dir: Path, spec: str, out: Path) -> dict:
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


def measure_executorch(model_dirs: dict[str, Path], precisions: list[str], work: Path) -> list[dict]:
    """One row per (model, precision); exports go to work/executorch/<model>-<precision>/model.pte."""
    rows = []
    for name, model_dir in model_dirs.items():
        for spec in precisions:
            row = {"model": name, "precision": spec}
            try:
                row.update(bench_one(Path(model_dir), spec, Path(work) / "executorch" / f"{name}-{spec}" / "model.pte"))
            except (ValueError, RuntimeError) as e:  # one failed export is a row, not a lost run
                row["error"] = str(e).splitlines()[0][:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
            gc.collect()
    return rows


def to_markdown(result: dict) -> str:
    mb = 1024 * 1024
    lines = ["# Export size: executorch", "", f"`{result['command']}`  ", f"{result['machine']}, {result['date']}", "",
             result["note"], "",
             "| model | precision | unique weights MiB | .pte (+ .ptd) MiB (x) | resident MiB (x) | "
             "resident MiB (x), mapped pages kept | resident MiB (x), no weight cache | planned MiB | "
             "weights resident (x) = resident - planned | decode ms/token | export s | parity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
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


NOTE = (
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, e.g. fp32,int8,8da4w+emb8")
    ap.add_argument("--models", default="dense,folded25")
    ap.add_argument("--work", default="/tmp/foldgpt-export-size", help="model directories and exports")
    ap.add_argument("--merge", action="store_true", help="replace these rows in the existing results, keep the rest")
    args = ap.parse_args(argv)
    from benchmarks.export_size import build_models  # the shared model directories (and the folding choice)

    work = Path(args.work)
    dirs = build_models(work)
    dirs = {name: dirs[name] for name in args.models.split(",")}
    rows = measure_executorch(dirs, args.precisions.split(","), work)
    from benchmarks.export_size import PAIRS, REMOVED

    command = "python benchmarks/export_size_executorch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = [command]
    if args.merge and (RESULTS / "export_size_executorch.json").is_file():
        old = json.loads((RESULTS / "export_size_executorch.json").read_text())
        new = {(r["model"], r["precision"]): r for r in rows}
        rows = [new.pop((r["model"], r["precision"]), r) for r in old["rows"]] + list(new.values())
        commands = old.get("commands", [old["command"]]) + commands
    result = {
        "command": " && ".join(commands), "commands": commands,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "note": f"folded25 = default model with source blocks {REMOVED} removed and depths {PAIRS} shared in pairs "
                f"(21 unique blocks for 26 depths). " + NOTE,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export_size_executorch.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "export_size_executorch.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
