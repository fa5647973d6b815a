"""`foldgpt bench`: latency and memory of dense and folded models under one phone profile.

    from runtime_tests.bench import BenchConfig, bench
    bench(BenchConfig(models={"dense": "runs/dense", "folded": "runs/folded"},
                      artifacts={"folded": {"onnx:fp32": "runs/onnx", "executorch:fp32": "runs/model.pte"}},
                      profile="apple_a17_pro", out="runs/bench"))

Stages:
  1. setup     profile (unknown name -> ValueError listing the known ones), cores (more
               than the machine has -> ValueError), `out` (new, empty or a bench folder
               of ours, unless `overwrite`: compress.outputs), before any measurement
  2. bandwidth STREAM triad on the pinned cores: this machine's measured bandwidth
  3. measure   per model x runtime, each in a fresh pinned, memory-capped process:
               memory (RSS after load, peak), then TTFT; a missing artifact, an error
               or an OOM is recorded and the rest still runs. Then decode, per group
               of runs that are compared (one backend:precision across models): the
               group's runners side by side in one process, in alternating rounds
               (latency.decode_rounds), so folded/dense is taken round by round under
               the same machine conditions. llama.cpp is its own group (see decode_groups)
  4. project   roofline decode tokens/s on this machine and on the target, streaming
               and with shared blocks cache-resident, labelled projections
  5. report    bench.json, report.md and plots in `out` (runtime_tests.report)
PyTorch eager always runs on each model directory; exported artifacts are keyed
"backend:precision" (precision sets the roofline's bytes per weight).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compress.outputs import Kind, check_output, mark
from export.registry import split_precision
from runtime_tests.emulate import Isolation, project_decode, project_prefill, run_isolated, shape_of
from runtime_tests.latency import DECODE_TOKENS, PROMPT_LENGTHS, decode_summary, round_ratio
from runtime_tests.runtimes import get_runtime, known_runtimes
from runtime_tests.memory import artifact_bytes, weight_bytes, weights_check
from runtime_tests.profiles import DEFAULT_PROFILE, check_cores, load_profile

MB = 1 << 20
# stored bytes per weight at an export precision (int8: 1 byte, ONNX's fp32 scale per 32 adds 1/8;
# int4: 4 bits + one fp32 scale per 32;
# GGUF q4_1: 4 bits + fp16 scale and minimum per 32). A "+emb8"/"+emb4" suffix (embedding
# quantized too) is read by its base precision: the roofline counts the blocks' weights.
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.625, "8da4w": 0.625, "q4_1": 0.625}
# precisions whose matmuls run in int8 (dynamic 8-bit activations): XNNPACK's 8da4w / 8da8w, ONNX
# MatMulNBits (8- and 4-bit) at accuracy level 4, llama.cpp's Q4_1 x Q8_1 dot products
INT8_COMPUTE = {"int8", "int4", "8da4w", "q4_1"}


def bytes_per_param(precision: str) -> float:
    return BYTES_PER_PARAM[split_precision(precision)[0]]


@dataclass
class BenchConfig:
    models: dict[str, str]                                   # name -> folded/dense model directory
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> "backend:precision" -> path
    out: str = "runs/bench"
    profile: str = DEFAULT_PROFILE
    cores: int | None = None                                 # default: the profile's performance cores
    torch_eager: bool = True
    prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS
    decode_tokens: int = DECODE_TOKENS
    warmup: int = 1
    repeats: int = 5                                         # TTFT repeats per prompt length
    rounds: int = 5                                          # decode rounds per compared group
    memory_cap: bool = True                                  # RLIMIT_AS at the profile's app budget
    overwrite: bool = False                                  # write into an OUT this tool did not make
    budget_mb: float | None = None                           # override the profile's budget (tests)

    def __post_init__(self):
        if not self.models:
            raise ValueError("nothing to benchmark: give at least one model directory")
        for name, specs in self.artifacts.items():
            if name not in self.models:
                raise ValueError(f"artifacts for {name!r}, which is not among the models ({', '.join(self.models)})")
            for key in specs:
                backend, _, precision = key.partition(":")
                if backend not in known_runtimes():
                    raise ValueError(f"artifact {key!r}: unknown backend {backend!r}; known: {', '.join(known_runtimes())}")
                if split_precision(precision or "fp32")[0] not in BYTES_PER_PARAM:
                    raise ValueError(f"artifact {key!r}: unknown precision; known: {', '.join(BYTES_PER_PARAM)}")
        if self.repeats < 1 or self.rounds < 1 or self.decode_tokens < 1 or not self.prompt_lengths:
            raise ValueError("repeats, rounds and decode_tokens must be at least 1, and prompt_lengths non-empty")


def bench(cfg: BenchConfig) -> dict:
    """Run stages 1-5; returns the result dict also written to OUT/bench.json."""
    # 1. setup
    profile = load_profile(cfg.profile)
    cores = check_cores(cfg.cores or profile.performance_cores)
    budget = (cfg.budget_mb or profile.app_ram_budget_mb) if cfg.memory_cap else None
    iso = Isolation(cores=cores, budget_mb=budget)
    reads = [*cfg.models.values(), *(p for specs in cfg.artifacts.values() for p in specs.values())]
    out = mark(check_output(cfg.out, Kind.BENCH, inputs=reads, overwrite=cfg.overwrite), Kind.BENCH)
    result = {"config": asdict(cfg), "profile": profile.to_dict(), "cores": cores, "budget_mb": budget,
              "emulation": {"pinned_cores": cores, "threads": len(cores),
                            "profile_cores": profile.performance_cores,
                            "note": "clock speed is not emulated; only core count, threads and memory",
                            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "models": {}, "runs": []}

    # 2. bandwidth
    _progress("bandwidth", f"STREAM triad on cores {cores}")
    bw = run_isolated("runtime_tests.emulate:stream_triad", {}, Isolation(cores=cores))
    result["host_bandwidth"] = bw.get("result") or {"error": bw.get("message")}
    host_gbs = (bw.get("result") or {}).get("triad_gbs")
    _progress("compute", f"GEMM peak (fp32, int8) on cores {cores}")
    peak = run_isolated("runtime_tests.emulate:gemm_peak", {}, Isolation(cores=cores))
    result["host_compute"] = peak.get("result") or {"error": peak.get("message")}

    # 3. measure: memory and TTFT per run, then decode per group; 4. project
    for name, model_dir in cfg.models.items():
        info = describe_model(model_dir)
        result["models"][name] = info
        runs = ([("torch", "fp32", model_dir)] if cfg.torch_eager else []) + [
            (key.partition(":")[0], key.partition(":")[2] or "fp32", path) for key, path in cfg.artifacts.get(name, {}).items()]
        for backend, precision, path in runs:
            _progress("measure", f"{name} / {backend} {precision}")
            result["runs"].append(measure_one(name, backend, precision, path, info, cfg, iso))
    result["decode_groups"] = {}
    for key, members in decode_groups(result["runs"]).items():
        _progress("decode", f"{key}: {', '.join(label(r) for r in members)} in alternating rounds")
        result["decode_groups"][key] = measure_decode(members, cfg, iso)
    for run in result["runs"]:
        run["projection"] = project(result["models"][run["model"]]["shape_obj"], run["precision"], run, profile, host_gbs, cfg)
        run["prefill"] = prefill_vs_roofline(result["models"][run["model"]]["shape_obj"], run, result["host_compute"])

    result["emulation"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["ratios"] = ratios(result)
    result["memory_vs_dense"] = memory_vs_dense(result)
    for info in result["models"].values():
        info.pop("shape_obj")
    # 5. report
    from runtime_tests.report import write_report

    result["files"] = write_report(result, out)
    _progress("report", f"written to {out}")
    return result


def _progress(stage: str, text: str) -> None:
    print(f"[bench:{stage}] {text}", flush=True)


def describe_model(model_dir) -> dict:
    """Shape, parameter counts and fold provenance (gates) of a model directory."""
    from compress.format import load_folded, summarize

    model, _ = load_folded(model_dir)
    s = summarize(model, Path(model_dir))
    shape = shape_of(model)
    prov = s.get("provenance") or {}
    return {"path": str(model_dir), "depth": s["num_layers"], "num_unique_blocks": s["num_unique_blocks"],
            "effective_params": s["effective_params"], "unique_params": s["unique_params"],
            "embedding_params": s["embedding_params"], "tied_embeddings": s["tied_embeddings"],
            "bytes_on_disk": s["bytes_on_disk"], "schedule": s["schedule"],
            "size_breakdown_params": {"embedding": shape.embedding_params,
                                      "blocks": sum(shape.block_params.values()),
                                      "head": 0 if s["tied_embeddings"] else shape.head_params,
                                      "other": shape.other_params},
            "gates": prov.get("gates"), "removed_blocks": prov.get("removed_blocks"),
            "shape": shape.to_dict(), "shape_obj": shape}


def measure_one(name: str, backend: str, precision: str, path: str, info: dict, cfg: BenchConfig, iso: Isolation) -> dict:
    run = {"model": name, "backend": backend, "precision": precision, "artifact": str(path),
           "cores": iso.cores, "threads": iso.threads, "budget_mb": iso.budget_mb}
    if not Path(path).exists():
        run.update(status="missing", message=f"{path}: no such artifact (export it first)")
        return run
    shape = info["shape_obj"]
    bpp = bytes_per_param(precision)
    max_ctx = max(cfg.prompt_lengths) + cfg.decode_tokens
    run["sizes"] = {"artifact_bytes": artifact_bytes(path), "weight_file_bytes": weight_bytes(path),
                    "kv_cache_bytes_at": {str(n): int(shape.kv_bytes(n)) for n in (*cfg.prompt_lengths, max_ctx)}}
    needs_mb = (run["sizes"]["weight_file_bytes"] + shape.kv_bytes(max_ctx)) / MB
    common = {"backend": backend, "artifact": str(path), "threads": iso.threads}
    vocab = run["vocab"] = shape.vocab
    mem = run_isolated("runtime_tests.memory:memory_job", {**common, "vocab": vocab}, iso,
                       preload=get_runtime(backend).preload, needs_mb=needs_mb)
    run["memory"] = mem.get("result") or {k: v for k, v in mem.items() if k != "result"}
    if mem["status"] == "ok":
        unique_b, effective_b = info["unique_params"] * bpp, info["effective_params"] * bpp
        run["memory"]["weights_check"] = weights_check(mem["result"]["rss_after_run"], int(unique_b), int(effective_b))
        run["affinity_seen"] = mem.get("affinity")
    if mem["status"] != "ok":
        run.update(status=mem["status"], message=mem.get("message"))
        return run
    lat = run_isolated("runtime_tests.latency:latency_job",
                       {**common, "prompt_lengths": list(cfg.prompt_lengths), "decode_tokens": 0,
                        "warmup": cfg.warmup, "repeats": cfg.repeats, "vocab": vocab},
                       iso, preload=get_runtime(backend).preload, needs_mb=needs_mb)
    run["latency"] = lat.get("result")
    run.update(status=lat["status"], message=lat.get("message"))
    return run


def project(shape, precision: str, run: dict, profile, host_gbs: float | None, cfg: BenchConfig) -> dict:
    """Roofline projections at the decode context actually measured (prompt + half the decode)."""
    lat = run.get("latency") or {}
    context = int(lat.get("decode_after_prompt", min(cfg.prompt_lengths)) + lat.get("decode_tokens", cfg.decode_tokens) / 2)
    bpp = bytes_per_param(precision)
    out = {"target": project_decode(shape, profile.memory_bandwidth_gbs, profile.llc_mb, bpp, context)}
    out["target"]["device"] = profile.name
    if host_gbs:
        # the same model on this machine, for checking the roofline against the measured number
        out["host"] = project_decode(shape, host_gbs, profile.llc_mb, bpp, context)
        out["host"]["device"] = "this machine (measured triad bandwidth)"
    return out


def prefill_vs_roofline(shape, run: dict, peak: dict) -> dict:
    """Per prompt length: measured prefill tokens/s (prompt / TTFT p50) against this machine's
    compute roofline at the run's compute precision (int8 or fp32 GEMM peak)."""
    int8 = split_precision(run["precision"])[0] in INT8_COMPUTE
    gflops = peak.get("int8_gops" if int8 else "fp32_gflops")
    out = {}
    for n, t in ((run.get("latency") or {}).get("ttft_ms") or {}).items():
        measured = int(n) / (t["p50"] / 1000)
        row = {"tokens_per_s": round(measured, 1), "compute": "int8" if int8 else "fp32"}
        if gflops:
            roof = project_prefill(shape, gflops, int(n))
            row.update(roofline_tokens_per_s=roof["tokens_per_s"], flops_per_token=roof["flops_per_token"],
                       fraction_of_roofline=round(measured / roof["tokens_per_s"], 3))
        out[str(n)] = row
    return out


def label(run: dict) -> str:
    return f"{run['model']}/{run['backend']}:{run['precision']}"


def decode_groups(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs whose decode speeds are compared, grouped to be measured together: each
    backend:precision across models. Runtimes are not mixed in one process: beside ExecuTorch,
    llama.cpp decoded at 29-31 ms/token against 7.2-8.3 alone (the two thread pools compete
    for the same cores; benchmarks/results/foldgpt_run), so llama.cpp is a group of its own."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("status") == "ok":
            groups.setdefault(f"{r['backend']}:{r['precision']}", []).append(r)
    return groups


def measure_decode(members: list[dict], cfg: BenchConfig, iso: Isolation) -> dict:
    """Decode rounds of one group in one pinned process; fills each member's latency["decode_*"].
    Not memory-capped: the cap is the app budget for one model, which the memory job
    checks; here several models share the process."""
    vocab = max(r["vocab"] for r in members)
    iso = Isolation(cores=iso.cores, timeout_s=iso.timeout_s)
    record = run_isolated("runtime_tests.latency:decode_rounds_job",
                          {"entries": [[label(r), r["backend"], r["artifact"]] for r in members], "threads": iso.threads,
                           "rounds": cfg.rounds, "decode_tokens": cfg.decode_tokens,
                           "prompt_len": min(cfg.prompt_lengths), "warmup": cfg.warmup, "vocab": vocab},
                          iso, preload=tuple(dict.fromkeys(m for r in members for m in get_runtime(r["backend"]).preload)))
    if record["status"] != "ok":
        return {"members": [label(r) for r in members], "status": record["status"], "message": record.get("message")}
    rounds = record["result"]
    for r in members:
        r.setdefault("latency", {}).update(decode_summary(rounds["ms_per_token"][label(r)]),
                                           decode_tokens=rounds["decode_tokens"],
                                           decode_after_prompt=rounds["decode_after_prompt"], rounds=rounds["rounds"])
    return {"members": [label(r) for r in members], "status": "ok", **rounds}


def ratios(result: dict) -> dict:
    """Folded vs dense decode speed on the same runtime (median of per-round ratios within a
    decode group), and each 4-bit export vs llama.cpp on the dense model (ratio of the two
    groups' medians: separate processes, see `decode_groups`)."""
    models = result["models"]
    dense = next((n for n in models if n == "dense"), None)
    if dense is None:
        return {}
    groups = [g for g in result.get("decode_groups", {}).values() if g.get("status") == "ok"]
    all_ms = {name: ms for g in groups for name, ms in g["ms_per_token"].items()}
    peer = next((p for p in all_ms if p.startswith(f"{dense}/llamacpp:")), None)
    out = {}
    for g in groups:
        ms = g["ms_per_token"]
        for name in ms:
            model, _, runtime = name.partition("/")
            backend, _, precision = runtime.partition(":")
            base = f"{dense}/{runtime}"
            if model != dense and base in ms:
                speedup = round_ratio(ms[base], ms[name])
                target = models[dense]["depth"] / models[model]["depth"] * 0.95
                out[name] = {"decode_speedup_vs_dense": speedup, "target": round(target, 3),
                             "meets_target": speedup >= target, "rounds": len(ms[name])}
            if peer and backend != "llamacpp" and bytes_per_param(precision) < 1:
                speed = round(float(np.median(all_ms[peer]) / np.median(ms[name])), 3)
                out[f"{name} vs {peer}"] = {"decode_speed_vs_llamacpp": speed, "target": 1.0,
                                            "meets_target": speed >= 1.0, "paired": False}
    return out


def memory_vs_dense(result: dict) -> dict:
    """Does a folded model's resident memory shrink by its unique or its effective parameter
    saving? Differences against dense on the same runtime cancel what both runs hold besides
    weights (runtime buffers, activations, KV cache), which a ratio to the weights does not."""
    models = result["models"]
    if "dense" not in models:
        return {}
    rss = {(r["model"], r["backend"], r["precision"]): r["memory"]["rss_after_run"]
           for r in result["runs"] if r.get("status") == "ok" and "rss_after_run" in (r.get("memory") or {})}
    out = {}
    for (model, backend, precision), value in rss.items():
        base = rss.get(("dense", backend, precision))
        if model == "dense" or base is None:
            continue
        bpp = bytes_per_param(precision)  # the models differ only in blocks, stored at this precision
        unique = (models["dense"]["unique_params"] - models[model]["unique_params"]) * bpp
        effective = (models["dense"]["effective_params"] - models[model]["effective_params"]) * bpp
        saved = base - value
        out[f"{model}/{backend}:{precision}"] = {
            "rss_saved": saved, "unique_saving": int(unique), "effective_saving": int(effective),
            # nothing shared: both savings are the same bytes, and there is nothing to decide
            "follows_unique": None if unique == effective else abs(saved - unique) < abs(saved - effective)}
    return out
