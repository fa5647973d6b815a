"""Every quantized artifact's perplexity, through its own runtime, beside llama.cpp's Q4_1.

    python benchmarks/quant_exports.py [--fold runs/main/folded] [--tokens 4096]

Models: the dense default model (dequantized from its Q4_1 GGUF, which `compress.load`
now records: weights still on that grid export exactly, `export.grid`), the same weights
with the record removed (how every export rounded before: the control), and a finished
fold (default: the main job's, healed, so off the grid). Each is exported at every
quantized precision of both backends with the parity gate off (this measures what the gate
would), and its perplexity on WikiText-2 validation (dev file, measurement only; nothing
is chosen on it) is computed through the runtime itself, in disjoint 512-token windows,
against the fp32 model in torch on the same windows (the fp32 exports equal it within the
gate's 1e-3 logits). llama.cpp runs the GGUF itself. Decode ms/token: paired (DECODE_PAIRS),
alternating rounds in one process per runtime.

Writes benchmarks/results/quant_exports.{json,md,png}; exports and scores are kept under
benchmarks/work/quant_exports/ and reused, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, WIKI, WORK, require_dev

OUT = WORK / "quant_exports"
WINDOW = 512
# (model, backend, precision, 4-bit method), in the order they run: what the targets need first
PLAN = (("dense", "executorch", "8da4w+emb8", "rtn"), ("dense", "onnx", "int4", "rtn"), ("dense", "onnx", "int4+emb8", "rtn"),
        ("dense", "onnx", "int8", "rtn"), ("dense", "executorch", "int8+emb8", "rtn"),
        ("fold", "executorch", "8da4w+emb8", "rtn"), ("fold", "executorch", "8da4w+emb8", "gptq"),
        ("fold", "onnx", "int4+emb8", "rtn"), ("fold", "onnx", "int4+emb8", "gptq"), ("fold", "onnx", "int8", "rtn"),
        ("fold", "executorch", "int8+emb8", "rtn"), ("fold", "onnx", "int4", "rtn"),
        ("dense-nogrid", "executorch", "8da4w+emb8", "rtn"), ("dense-nogrid", "onnx", "int4", "rtn"),
        "decode",  # the paired decode timing, once its artifacts exist
        ("dense", "executorch", "8da4w", "rtn"), ("fold", "executorch", "8da4w", "rtn"))


def windows(tokenizer, tokens: int) -> list[list[int]]:
    ids = tokenizer(WIKI.read_text(), verbose=False)["input_ids"][:tokens]
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)]


def models(fold: Path) -> dict[str, Path]:
    """dense (grid recorded), dense-nogrid (record removed), fold: folded-format directories."""
    from compress.format import SOURCE_GRID_KEY
    from compress.load import DEFAULT_MODEL, save_dense

    dense = save_dense(DEFAULT_MODEL, OUT / "models" / "dense")
    control = OUT / "models" / "dense-nogrid"
    if not (control / "config.json").is_file():
        import shutil

        tmp = control.with_name(".dense-nogrid.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dense, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop(SOURCE_GRID_KEY, None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(control)
    return {"dense": dense, "dense-nogrid": control, "fold": fold}


def calibration_file() -> Path:
    """The default calibration text (self text, generation seed 0: what calibration and healing
    use, never the held-out seed the gate scores), 8192 tokens' worth, as a file for gptq."""
    file = OUT / "calibration_self_text.txt"
    if not file.is_file():
        from compress.data import DataConfig, load_texts
        from compress.load import DEFAULT_MODEL, load_model

        OUT.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text("\n\n".join(load_texts(DataConfig(num_sequences=32, seq_len=256), *load_model(DEFAULT_MODEL))))
        tmp.replace(file)
    return file


def export(name: str, src: Path, backend: str, precision: str, method: str = "rtn") -> Path:
    from export.registry import ExportConfig, get_backend

    folder = OUT / "exports" / f"{name}-{backend}-{precision}{'' if method == 'rtn' else '-' + method}"
    b = get_backend(backend)
    path = b.artifact_path(folder)
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        extra = {"weight_method": method, "calibration": str(calibration_file())} if method == "gptq" else {}
        report = b.export(src, path, ExportConfig.from_spec(precision, max_context=WINDOW + 8, parity=False, **extra),
                          measure=False)
        report["seconds"]["total"] = round(time.perf_counter() - t, 1)
        (folder / "export_report.json").write_text(json.dumps(report, indent=1, default=str))
    return path


def factory(backend: str, path: Path, threads: int):
    if backend == "executorch":
        from export.executorch_runtime import PteLM

        return PteLM(path, num_threads=threads).steps
    if backend == "onnx":
        from export.onnx import OnnxLM

        return OnnxLM(Path(path) / "model.onnx", threads).steps  # the export's folder is its artifact
    from runtime_tests.runtimes import LlamaCppRunner

    lm = LlamaCppRunner(path, threads=threads, n_ctx=WINDOW + 8)

    def steps():
        lm.reset()
        return lambda ids: np.stack([lm.step(int(t)) for t in ids])

    return steps


def scored(key: str, make, wins) -> float:
    """Perplexity over the windows, cached in OUT/scores.json under `key`; `make()` returns the
    step factory (called only when the score is not cached)."""
    from export.parity import perplexity

    cache_file = OUT / "scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cache:
        t = time.perf_counter()
        cache[key] = {"ppl": perplexity(make(), wins), "seconds": round(time.perf_counter() - t, 1)}
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_file)
        print(f"  {key}: {cache[key]['ppl']:.3f} ({cache[key]['seconds']} s)", flush=True)
    return cache[key]["ppl"]


def decode_ms(backend: str, paths: dict[str, Path], rounds: int = 5, steps: int = 64) -> dict[str, float]:
    """Median ms/token of `steps` decode steps (fixed tokens) after a 32-token prompt, 1 thread,
    the artifacts alternating round by round (paired on this noisy machine)."""
    make = {k: factory(backend, p, 1) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, f in make.items():
            step = f()
            step(list(range(100, 132)))
            t = time.perf_counter()
            for i in range(steps):
                step([200 + i])
            times[k].append((time.perf_counter() - t) * 1e3 / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    from compress.format import load_folded
    from export.parity import torch_steps
    from runtime_tests.runtimes import llamacpp_available

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", default="runs/main/folded", help="a finished fold (default: what `make run` leaves)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    require_dev()
    fold = Path(args.fold)
    if not (fold / "config.json").is_file():
        sys.exit(f"{fold}: not a folded model")
    srcs = models(fold)
    loaded = {name: load_folded(src) for name, src in srcs.items()}
    wins = {name: windows(tok, args.tokens) for name, (_, tok) in loaded.items()}
    fp32 = {}
    rows = []
    for name, (model, _) in loaded.items():
        fp32[name] = scored(f"{name}/torch:fp32", lambda: torch_steps(model.float().eval(), args.threads), wins[name])
        size = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
        rows.append({"model": name, "runtime": "torch", "precision": "fp32", "method": "-", "ppl": fp32[name], "x_fp32": 1.0,
                     "mib": size / 2**20})
    del loaded
    if llamacpp_available():
        from compress.load import default_gguf

        ppl = scored("dense/llamacpp:q4_1", lambda: factory("llamacpp", default_gguf(), args.threads), wins["dense"])
        rows.append({"model": "dense", "runtime": "llamacpp", "precision": "q4_1", "method": "-", "ppl": ppl,
                     "x_fp32": ppl / fp32["dense"], "mib": default_gguf().stat().st_size / 2**20})
    speed = {}
    for item in PLAN:
        if item == "decode":
            speed = decode_speed(srcs)
            write(rows, speed, args)
            continue
        name, backend, precision, method = item
        print(f"-- {name} {backend} {precision} {method}", flush=True)
        path = export(name, srcs[name], backend, precision, method)
        suffix = "" if method == "rtn" else f"/{method}"
        ppl = scored(f"{name}/{backend}:{precision}{suffix}", lambda: factory(backend, path, args.threads), wins[name])
        report = json.loads((path.parent if backend == "executorch" else path).joinpath("export_report.json").read_text())
        files = [path, path.with_suffix(".ptd")] if backend == "executorch" else list(path.glob("model.onnx*"))
        rows.append({"model": name, "runtime": backend, "precision": precision, "method": method, "ppl": ppl,
                     "x_fp32": ppl / fp32[name], "mib": sum(f.stat().st_size for f in files if f.exists()) / 2**20,
                     "grid_weights": report.get("source_grid_weights", "-")})  # 4-bit exports only
        write(rows, speed, args)  # as it goes: a long run leaves its rows so far


# decode pairs (label, backend, (model, precision) now, (model, precision) before): the grid at one
# precision, and the new default ONNX export against the old one
DECODE_PAIRS = (("executorch 8da4w+emb8: grid / no grid", "executorch", ("dense", "8da4w+emb8"), ("dense-nogrid", "8da4w+emb8")),
                ("onnx int4: grid / no grid", "onnx", ("dense", "int4"), ("dense-nogrid", "int4")),
                ("onnx int4+emb8 with grid / int4 without (the old default)", "onnx", ("dense", "int4+emb8"), ("dense-nogrid", "int4")))


def decode_speed(srcs: dict[str, Path]) -> dict:
    """Decode ms/token of each pair's two artifacts, paired; speed x = before / now."""
    speed = {}
    for label, backend, now, before in DECODE_PAIRS:
        paths = {"now": export(now[0], srcs[now[0]], backend, now[1]), "before": export(before[0], srcs[before[0]], backend, before[1])}
        ms = decode_ms(backend, paths)
        speed[label] = {"now_ms": round(ms["now"], 3), "before_ms": round(ms["before"], 3), "speed_x": round(ms["before"] / ms["now"], 3)}
        print(f"  decode {label}: {speed[label]}", flush=True)
    return speed


def write(rows: list[dict], speed: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = "python benchmarks/quant_exports.py " + shlex.join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_exports.json").write_text(json.dumps({"command": command, "tokens": args.tokens, "window": WINDOW,
                                                            "rows": rows, "decode": speed}, indent=1))
    lines = ["# Quantized exports: perplexity through each runtime, bytes, decode", "",
             f"Reproduce: `{command}` (WikiText-2 validation: dev file, measurement only; {args.tokens} tokens in disjoint "
             f"{WINDOW}-token windows, each artifact through its own runtime; x fp32: against the same model's fp32 in torch "
             "on the same windows). dense: the default model as loaded from its Q4_1 GGUF (the grid recorded: weights on it "
             "export exactly, `export.grid`); dense-nogrid: the same weights without the record, i.e. every earlier export "
             "(round to nearest, symmetric groups of 32); fold: the main job's healed fold (off the grid). gptq: `export.gptq` "
             "against 8192 tokens of self text (generation seed 0, the calibration text; not WikiText). MiB: files on disk.",
             "", "| model | runtime | precision | 4-bit method | wikitext2 ppl | x fp32 | MiB | weights stored exactly from the grid |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['runtime']} | {r['precision']} | {r['method']} | {r['ppl']:.3f} | {r['x_fp32']:.4f} | {r['mib']:.1f} | "
              f"{r.get('grid_weights', '-')} |" for r in rows]
    if speed:
        lines += ["", "Decode, dense, 1 thread, median ms/token of 64 steps over 5 alternating rounds (paired):", "",
                  "| pair (now / before) | now ms/token | before ms/token | speed x before |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['now_ms']} | {v['before_ms']} | {v['speed_x']} |" for k, v in speed.items()]
    (RESULTS / "quant_exports.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = {"torch": "s", "executorch": "o", "onnx": "^", "llamacpp": "*"}[r["runtime"]]
        color = {"dense": "tab:blue", "dense-nogrid": "tab:gray", "fold": "tab:orange"}[r["model"]]
        ax.scatter(r["mib"], r["ppl"], marker=marker, color=color, s=80 if marker == "*" else 40)
        ax.annotate(f"{r['runtime']}:{r['precision']}", (r["mib"], r["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("artifact MiB (log)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("blue: dense (grid kept), gray: dense (no grid), orange: fold")
    fig.tight_layout()
    fig.savefig(RESULTS / "quant_exports.png", dpi=120)


if __name__ == "__main__":
    main()
