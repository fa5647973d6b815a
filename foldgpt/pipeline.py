"""`foldgpt run`: the main job, as its stages in order.

    1. dense     the source model, saved in the folded format      OUT/dense
    2. compress  FoldGPT at the default point (gates, removal,      OUT/folded (+ OUT/folded.work)
                 local healing, a short end-to-end heal), then its
                 perplexity beside dense on held-out self text       OUT/quality.json
    3. export    ONNX and ExecuTorch, dense and folded, each        OUT/exports/<model>-<backend>-<precision>
                 behind its parity gate, two at a time; the dense
                 model's are kept per machine (export.cache)
    4. bench     latency and memory under the default phone          OUT/bench (bench.json, report.md, plots)
                 profile, dense beside folded on the same runtime

A finished stage is not redone: each leaves its artifact, and a rerun of the same
command picks up from the first missing one. An export that fails is recorded and the
report is still written without it. OUT must be new, empty or a run folder of ours
(`compress.outputs`; `overwrite` lifts that).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from compress.data import DataConfig
from compress.fold import FoldConfig
from compress.format import WEIGHTS_NAME, format_summary, summarize
from compress.heal import HealConfig
from compress.importance import GateConfig
from compress.load import DEFAULT_MODEL, save_dense
from compress.outputs import Kind, check_output, mark, write_atomic
from compress.select import SelectConfig

# (backend, precision) pairs exported for each model, chosen to fit the 30-minute budget:
# ONNX fp32, which the parity gate pins exactly, and ExecuTorch 8da4w with the tied
# embedding/head in 8 bits (stored once), the 4-bit program a phone app ships and the one
# compared with llama.cpp. More: --exports onnx:int4,executorch:fp32,...
# int4+emb8: the phone-sized ONNX, its tied head and embedding at 8 bits (on the dense model x1.003
# WikiText perplexity against int4's x1.15 with a 4-bit head: benchmarks/results/quant_exports.md)
DEFAULT_EXPORTS = (("onnx", "fp32"), ("onnx", "int4+emb8"), ("executorch", "8da4w+emb8"))


def parse_exports(spec: str) -> tuple[tuple[str, str], ...]:
    """'onnx:fp32,executorch:8da4w+emb8' -> (("onnx", "fp32"), ("executorch", "8da4w+emb8"))."""
    from export.registry import ExportConfig, get_backend, known_backends

    pairs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        backend, sep, precision = item.partition(":")
        if not sep or backend not in known_backends():
            raise ValueError(f"export {item!r}: write BACKEND:PRECISION with BACKEND one of {', '.join(known_backends())}")
        get_backend(backend).check(ExportConfig.from_spec(precision))  # a bad precision fails here, before any work
        pairs.append((backend, precision))
    if not pairs:
        raise ValueError("--exports is empty")
    return tuple(pairs)


def default_fold() -> FoldConfig:
    """10 of 30 blocks removed, none shared: 20 depths, ~26% fewer parameters. At this size a
    shared pair costs more quality than a removed block of the same bytes, with or without
    per-depth deltas (benchmarks/results/quality.md, p25), so the default removes only. The
    gates alone propose the removal (still scored on held-back windows): proposing with every
    candidate took 31 min at 10 of 30 blocks, and the gates' set won there
    (benchmarks/results/cut_repair_r10.md). A sharing fold: num_unique_blocks below the kept
    depths (e.g. removal_rate 0.2, num_unique_blocks 20)."""
    return FoldConfig(removal_rate=1 / 3, group_size=None, num_unique_blocks=20, gate=GateConfig(),
                      select=SelectConfig(candidates="gates"))


@dataclass
class RunConfig:
    """The main job's settings. Like ExecuTorch's LlmConfig it holds each stage's own config,
    validated where it is defined, and adds only what belongs to the run."""

    model: str = DEFAULT_MODEL
    out: str = "runs/main"
    dtype: str = "float32"
    fold: FoldConfig = field(default_factory=default_fold)
    # the cure heals through the 4-bit exports' rounding (compress.qat): the fold ships in 4 bits, and there it
    # measured x1.06 of its fp32 perplexity against the plain cure's x1.20 (WikiText; self text x1.06 against x1.38),
    # with lower absolute 4-bit perplexity on both texts (benchmarks/results/quant_quality.md)
    # 12.5 minutes: 2.5 of local healing and 10 of the cure, paid for by the faster self text (compress.data.sample)
    heal: HealConfig = field(default_factory=lambda: HealConfig(max_minutes=12.5, qat_bits=4))
    # 256-token windows; FoldGPT holds 8 calibration windows back to score which blocks go;
    # 256 healing windows: a few passes in a 10-minute cure (64 windows overfit: 15+ passes in 20 min)
    calib: DataConfig = field(default_factory=lambda: DataConfig(num_sequences=40))
    heal_data: DataConfig = field(default_factory=lambda: DataConfig(num_sequences=256, seed=1))
    exports: tuple[tuple[str, str], ...] = DEFAULT_EXPORTS
    # the 4-bit exports' rounding: rtn, the grid the cure trained through (gptq would round the fold a second way;
    # on a plain-cured fold gptq moved held-out self text x1.32 -> x1.20 and WikiText x1.25 -> x1.35, gptq_torch.md)
    weight_method: str = "rtn"
    # the exports' gate: refuse an export above x1.5 its fp32 perplexity on held-out self text. Looser than the
    # exporters' own x1.10 so that a run whose fold misses it still benches it; the report shows each ratio.
    # None: the exporters' defaults (x1.02 / x1.10).
    max_ppl_ratio: float | None = 1.5
    # exports at once, each in its own process: tracing and lowering are single-threaded Python,
    # so two of them share 2 cores with little loss (export_all)
    export_workers: int = 2
    # the dense model's exports are kept per machine (export.cache): it does not change between runs
    cache_dense_exports: bool = True
    max_context: int = 1152  # static KV cache of the ExecuTorch programs: 1024-token prompts + 128 decoded
    bench: bool = True
    profile: str | None = None  # default: runtime_tests' default profile
    repeats: int = 3  # TTFT runs per prompt length
    rounds: int = 5  # decode rounds, dense beside folded (runtime_tests.latency.decode_rounds)
    quality_tokens: int = 4096  # held-out self text the folded model's perplexity is measured on (0: skip)
    overwrite: bool = False  # write into an existing OUT this tool did not make (never one holding the model)

    def __post_init__(self):
        if self.quality_tokens < 0 or self.max_context < 2 or min(self.repeats, self.rounds, self.export_workers) < 1:
            raise ValueError(f"quality_tokens >= 0, max_context >= 2, repeats, rounds and export_workers >= 1 (got "
                             f"{self.quality_tokens}, {self.max_context}, {self.repeats}, {self.rounds}, {self.export_workers})")
        parse_exports(",".join(f"{b}:{p}" for b, p in self.exports))  # a bad pair fails here
        from compress.registry import enum_choice
        from export.registry import WeightMethod

        self.weight_method = enum_choice(WeightMethod, self.weight_method, "weight method").value
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1:
            raise ValueError(f"max_ppl_ratio bounds quantized / fp32 perplexity and must be at least 1, got {self.max_ppl_ratio}")


def _stage(name: str, text: str) -> float:
    print(f"\n== {name}: {text}", flush=True)
    return time.monotonic()


def run(cfg: RunConfig) -> dict:
    """Run stages 1-4 (each skipped when its artifact exists); returns a summary dict."""
    from compress.recipe import CompressConfig, compress

    # the settings were checked when cfg was built (each config's __post_init__): OUT is made only now
    out = mark(check_output(cfg.out, Kind.RUN, inputs=(cfg.model,), overwrite=cfg.overwrite), Kind.RUN)
    timings: dict[str, float] = {}
    earlier, kept = _earlier_timings(out), set()  # a stage this run skips keeps the minutes it took when it ran

    t = _stage("1/4 dense", f"load {cfg.model}")
    skipped = (out / "dense" / WEIGHTS_NAME).is_file()
    dense_dir = save_dense(cfg.model, out / "dense", cfg.dtype)
    _took(timings, "dense_s", t, earlier if skipped else {}, kept)

    t = _stage("2/4 compress", f"removal {cfg.fold.removal_rate:.3g}, unique blocks {cfg.fold.num_unique_blocks}, "
                               f"{cfg.heal.max_minutes} min of healing")
    folded_dir = out / "folded"
    skipped = (folded_dir / WEIGHTS_NAME).is_file()
    if not skipped:
        compress(CompressConfig(
            out=str(folded_dir), model=str(dense_dir), dtype=cfg.dtype, fold=cfg.fold, heal=cfg.heal, resume=True,
            calib=cfg.calib, heal_data=cfg.heal_data,
        ))
    _took(timings, "compress_s", t, earlier if skipped else {}, kept)
    from compress.format import load_folded

    folded, _ = load_folded(folded_dir)
    print(format_summary(summarize(folded, folded_dir)))
    del folded
    quality = None
    if cfg.quality_tokens:
        t = _stage("2/4 quality", f"perplexity on {cfg.quality_tokens} tokens of held-out self text, dense beside folded")
        skipped = (out / "quality.json").is_file()
        quality = measure_quality(dense_dir, folded_dir, cfg.quality_tokens, out / "quality.json")
        _took(timings, "quality_s", t, earlier if skipped else {}, kept)

    t = _stage("3/4 export", ", ".join(f"{b} {p}" for b, p in cfg.exports))
    texts = gate_and_calibration_texts(dense_dir, out, cfg)
    exports = export_all({"dense": dense_dir, "folded": folded_dir}, cfg.exports, out / "exports", cfg.max_context,
                         texts, cfg.weight_method, cfg.max_ppl_ratio, workers=cfg.export_workers,
                         cached=("dense",) if cfg.cache_dense_exports else ())
    _took(timings, "export_s", t, earlier if all(e.get("kept") for rows in exports.values() for e in rows) else {}, kept)

    bench_result = None
    if cfg.bench:
        from runtime_tests.bench import BenchConfig, bench
        from runtime_tests.runtimes import runtimes_reading

        t = _stage("4/4 bench", "latency and memory, dense beside folded")
        # each export on every runtime that reads it: ours, and the one apps ship (runtime_tests/runtimes.py)
        artifacts = {name: {f"{rt}:{e['precision']}": e["path"] for e in rows if e["status"] == "ok"
                            for rt in runtimes_reading(e["backend"])}
                     for name, rows in exports.items()}
        peer = llamacpp_peer(cfg.model)
        if peer:  # llama.cpp on the dense model in 4 bits: the peer the 4-bit exports are compared with
            artifacts["dense"]["llamacpp:q4_1"] = peer
        bench_cfg = BenchConfig(models={"dense": str(dense_dir), "folded": str(folded_dir)}, artifacts=artifacts,
                                out=str(out / "bench"), repeats=cfg.repeats, rounds=cfg.rounds,
                                **({"profile": cfg.profile} if cfg.profile else {}))
        bench_result = bench(bench_cfg)
        timings["bench_s"] = time.monotonic() - t
        report = out / "bench" / "report.md"
        extra = [quality_section(quality)] if quality else []
        extra.append(exports_section(exports, cfg.export_workers))
        extra.append(timing_section(timings, _compress_timings(folded_dir), tuple(kept)))
        write_atomic(report, report.read_text() + "\n" + "\n".join(extra))

    summary = {"config": asdict(cfg), "timings_s": {k: round(v, 1) for k, v in timings.items()}, "quality": quality,
               "exports": exports,
               "report": str(out / "bench" / "report.md") if bench_result else None}
    summary["timings_from_earlier_run"] = sorted(kept)
    write_atomic(out / "run.json", json.dumps(summary, indent=1, default=str))
    print(f"\nfoldgpt run: done in {sum(timings.values()) / 60:.1f} min; summary in {out / 'run.json'}"
          + (f", report in {summary['report']}" if summary["report"] else ""))
    return summary


def measure_quality(dense_dir: Path, folded_dir: Path, tokens: int, file: Path) -> dict:
    """What the speed-up costs: perplexity on self text no stage saw (compress.data.held_out_text),
    dense beside folded, with the blocks and bytes each keeps. Kept in `file` once measured."""
    if file.is_file():
        return json.loads(file.read_text())
    from compress.data import held_out_text
    from compress.evaluate import perplexity
    from compress.format import load_folded

    dense, tok = load_folded(dense_dir)
    text = held_out_text(dense, tok, tokens)
    window = min(512, dense.config.max_position_embeddings)
    rows = {}
    for name, path in (("dense", dense_dir), ("folded", folded_dir)):
        model = dense if name == "dense" else load_folded(path)[0]
        s = summarize(model, path)
        ppl = perplexity(model, tok, text, seq_len=window, stride=window // 2, max_tokens=tokens)
        rows[name] = {"perplexity": round(ppl, 3), "depths": s["num_layers"],
                      "unique_blocks": s["num_unique_blocks"], "unique_params": s["unique_params"],
                      "unique_bytes": s["unique_bytes"]}
    quality = {"text": f"{tokens} tokens of held-out self text (generation seed 1)", **rows}
    write_atomic(file, json.dumps(quality, indent=1))
    return quality


def quality_section(q: dict) -> str:
    """The report's quality table: what the speed-up costs."""
    mb, dense = 1024 * 1024, q["dense"]["perplexity"]
    lines = ["## What the folded model costs in quality", "",
             f"Perplexity on {q['text']}: text no stage trained, calibrated or selected on.", "",
             "| model | perplexity | x dense | depths | unique blocks | unique params | unique MiB |",
             "|---|---|---|---|---|---|---|"]
    for name in ("dense", "folded"):
        r = q[name]
        lines.append(f"| {name} | {r['perplexity']:.2f} | {r['perplexity'] / dense:.2f}x | {r['depths']} | "
                     f"{r['unique_blocks']} | {r['unique_params'] / 1e6:.1f}M | {r['unique_bytes'] / mb:.1f} |")
    return "\n".join(lines) + "\n"


def exports_section(exports: dict[str, list[dict]], workers: int = 1) -> str:
    """The report's export table: each artifact's parity gate, so what quantization cost is in view,
    and where its export's time went (trace, lowering, gate)."""
    lines = ["## Exports and their parity gates", "",
             "fp32: logits within 1e-3 of PyTorch and the same greedy tokens. Quantized: perplexity on held-out self "
             "text against the fp32 model, refused above its bound (x1.02 for 8-bit, x1.10 for 4-bit weights by default)."
             + (f" The exports ran {workers} at a time, each in its own process: a row's seconds are its own wall time, "
                "beside another export." if workers > 1 else ""),
             "", "| model | backend | precision | status | gate | seconds |", "|---|---|---|---|---|---|"]
    for name, rows in exports.items():
        for r in rows:
            gate = (r.get("parity") or {}).get("reason", "-")
            secs = r.get("seconds") or {}
            took = ", ".join(f"{k} {v:g}" for k, v in secs.items()) if secs else "-"
            status = r["status"] + (", from an earlier run" if r.get("from_cache") else "")
            lines.append(f"| {name} | {r['backend']} | {r['precision']} | {status} | {gate} | {took} |")
    return "\n".join(lines) + "\n"


def _compress_timings(folded_dir: Path) -> dict[str, float]:
    """The compress stage's own split (data, fold, local, heal), from the folded model's provenance."""
    from compress.format import read_fold_section

    return ((read_fold_section(folded_dir) or {}).get("provenance") or {}).get("timings", {})


def _earlier_timings(out: Path) -> dict[str, float]:
    """The stage timings of the run that made OUT's artifacts (its run.json), for a rerun to keep."""
    try:
        return {k: float(v) for k, v in json.loads((out / "run.json").read_text())["timings_s"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def _took(timings: dict[str, float], key: str, t0: float, earlier: dict[str, float], kept: set[str]) -> None:
    """A stage's wall time: this run's, or, for a stage it skipped, the earlier run's (noted in `kept`)."""
    if key in earlier:
        timings[key] = earlier[key]
        kept.add(key)
    else:
        timings[key] = time.monotonic() - t0


def timing_section(timings: dict[str, float], compress_timings: dict[str, float], earlier: tuple[str, ...] = ()) -> str:
    """The report's per-stage wall time, the compress stage split into its own stages: where
    the run's minutes went, and how many of them trained the model. A stage a rerun skipped
    shows the time it took in the run that made its artifact (marked), so the table is the
    whole job's; the compress split is the run that made the fold."""
    names = {"data_s": "self text (calibration + healing)", "fold_s": "selection, removal, repair, sharing",
             "local_s": "local healing", "heal_s": "end-to-end healing"}
    lines = ["## Where the time went", "", "| stage | minutes |", "|---|---|"]
    for key, label in (("dense_s", "dense"), ("compress_s", "compress"), ("quality_s", "quality"),
                       ("export_s", "exports"), ("bench_s", "bench")):
        if key in timings:
            lines.append(f"| {label}{' (earlier run)' if key in earlier else ''} | {timings[key] / 60:.1f} |")
        if key == "compress_s":
            lines += [f"| - {part} | {compress_timings[k] / 60:.1f} |" for k, part in names.items() if k in compress_timings]
    lines.append(f"| **total** | **{sum(timings.values()) / 60:.1f}** |")
    return "\n".join(lines) + "\n"


def llamacpp_peer(model: str) -> str | None:
    """The default model's Q4_1 GGUF when llama-cpp-python is installed (optional), else None."""
    from compress.load import default_gguf
    from runtime_tests.runtimes import llamacpp_available

    if model != DEFAULT_MODEL or not llamacpp_available():
        print("   llama.cpp comparison skipped: " + ("llama-cpp-python is not installed" if model == DEFAULT_MODEL
              else "only the default model ships its GGUF"), flush=True)
        return None
    return str(default_gguf())


def gate_and_calibration_texts(dense_dir: Path, out: Path, cfg: RunConfig, tokens: int = 8192) -> dict[str, str]:
    """Two text files the exports read: the gate's held-out self text (generation seed 1, no
    stage's input; as much as the quality stage made, so nothing new is generated) and gptq's
    calibration text (`tokens` of the fold's own calibration source, seed 0)."""
    from compress.data import held_out_text, load_texts

    files = {"gate_text": out / "texts" / "held_out.txt", "calibration": out / "texts" / "calibration.txt"}
    if not all(f.is_file() for f in files.values()):
        from compress.format import load_folded

        dense, tok = load_folded(dense_dir)
        files["gate_text"].parent.mkdir(parents=True, exist_ok=True)
        write_atomic(files["gate_text"], held_out_text(dense, tok, max(cfg.quality_tokens, 1024)))
        calib = replace(cfg.calib, num_sequences=tokens // cfg.calib.seq_len)
        write_atomic(files["calibration"], "\n\n".join(load_texts(calib, dense, tok)))
    return {k: str(v) for k, v in files.items()}


def export_all(models: dict[str, Path], exports: tuple[tuple[str, str], ...], root: Path, max_context: int,
               texts: dict[str, str] | None = None, weight_method: str = "rtn",
               max_ppl_ratio: float | None = None, workers: int = 1,
               cached: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """Every (model, backend, precision) export into root/NAME-BACKEND-PRECISION; an existing
    artifact is kept, a failure (e.g. a fold no exporter stores, or a gate's refusal) recorded in
    one line. `texts`: the gate's text and gptq's calibration file (gate_and_calibration_texts).

    `workers` > 1 runs the exports in that many fresh processes, longest first. Tracing and
    lowering are single-threaded Python (torch.export, ExecuTorch's passes), so on a 2-core
    machine two exports at once take about the time of one; only a gate's few seconds of
    inference share the cores. The rows come back in the order of `models` and `exports`.
    The models named in `cached` are exported once per machine (`export.cache`): a later run
    copies the kept export in (its row says `from_cache`)."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(name, Path(model_dir), backend, precision, root, max_context, texts or {}, weight_method, max_ppl_ratio,
             name in cached) for name, model_dir in models.items() for backend, precision in exports]
    if workers > 1 and sum(not _kept(job) for job in jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker (torch's thread pools do not survive fork)
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {i: pool.submit(export_one, *jobs[i]) for i in sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))}
            rows = [futures[i].result() for i in range(len(jobs))]
    else:
        rows = [export_one(*job) for job in jobs]
    results: dict[str, list[dict]] = {name: [] for name in models}
    for job, row in zip(jobs, rows):
        results[job[0]].append(row)
    return results


def _folder(root: Path, name: str, backend: str, precision: str) -> Path:
    return root / f"{name}-{backend}-{precision}"


def _kept(job: tuple) -> bool:
    """Whether a job's artifact is already there (kept, not redone)."""
    from export.registry import get_backend

    name, _, backend, precision, root = job[:5]
    return get_backend(backend).artifact_path(_folder(root, name, backend, precision)).exists()


def _cost(job: tuple) -> int:
    """Rough order of an export's minutes, to start the longest first: ExecuTorch lowering, then
    a model stored from a GGUF's 4-bit grid (its split adds nodes), then the rest."""
    from compress.format import SOURCE_GRID_KEY

    name, model_dir, backend, precision = job[:4]
    try:
        grid = SOURCE_GRID_KEY in json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        grid = False
    return 2 * (backend == "executorch") + (grid and precision != "fp32")


def export_one(name: str, model_dir: Path, backend: str, precision: str, root: Path, max_context: int,
               texts: dict[str, str], weight_method: str = "rtn", max_ppl_ratio: float | None = None,
               cache: bool = False) -> dict:
    """One export of `export_all` (a plain function, so a worker process can run it): its row."""
    from export import cache as kept
    from export.registry import ExportConfig, Precision, get_backend

    folder = _folder(root, name, backend, precision)
    path = get_backend(backend).artifact_path(folder)
    if path != folder:
        folder.mkdir(parents=True, exist_ok=True)
    row = {"backend": backend, "precision": precision, "path": str(path)}
    report_file = folder / "export_report.json"
    if path.exists():
        row.update(status="ok", kept=True)
        earlier = json.loads(report_file.read_text()) if report_file.is_file() else {}
        row.update({k: earlier[k] for k in ("parity", "seconds") if earlier.get(k)})
        return row
    try:
        # the bench stage measures memory in its own fresh processes: skip the export's probes
        cfg = ExportConfig.from_spec(precision, max_context=max_context, max_ppl_ratio=max_ppl_ratio,
                                     gate_text=texts.get("gate_text"))
        if cfg.precision in (Precision.INT4, Precision.INT8DA4W) and weight_method != "rtn":
            cfg = ExportConfig.from_spec(precision, max_context=max_context, max_ppl_ratio=max_ppl_ratio,
                                         gate_text=cfg.gate_text, weight_method=weight_method,
                                         calibration=texts.get("calibration"))
        key = None
        if cache:
            settings = {k: v for k, v in asdict(cfg).items() if k not in ("gate_text", "calibration")}
            key = kept.export_key(model_dir, backend, settings, {"gate_text": cfg.gate_text, "calibration": cfg.calibration})
            if kept.restore(key, folder):
                report = json.loads(report_file.read_text())
                row.update(status="ok", from_cache=True, **{k: report[k] for k in ("parity", "seconds") if report.get(k)})
                print(f"-- export {name} {backend} {precision}: kept from an earlier run ({kept.cache_root() / key})", flush=True)
                return row
        print(f"-- export {name} {backend} {precision}", flush=True)
        report = get_backend(backend).export(model_dir, path, cfg, measure=False)
        write_atomic(report_file, json.dumps(report, indent=1, default=str))
        row["status"] = "ok"
        row.update({k: report[k] for k in ("parity", "seconds") if report.get(k)})
        if key:
            kept.store(key, folder)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        row.update(status="failed", error=str(e).splitlines()[0][:300])
        if getattr(e, "report", None):  # a gate's refusal: what it measured
            row["parity"] = e.report.get("parity")
        print(f"   failed {name} {backend} {precision}: {row['error']}", flush=True)
    else:
        print(f"   done {name} {backend} {precision}", flush=True)
    return row
