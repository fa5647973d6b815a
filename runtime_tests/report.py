"""Bench result -> bench.json, report.md and PNG plots (matplotlib, Agg).

    write_report(result, "runs/bench")   # result as returned by runtime_tests.bench.bench

Measured numbers and projections sit in separate, labelled columns; a run that did
not happen (missing export, does not fit, error) is a row with its message, and the
rest of the report is still written.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.outputs import write_atomic

MB = 1 << 20


def write_report(result: dict, out) -> dict:
    """Write bench.json, report.md and plots into `out`; returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "bench.json"), "markdown": str(out / "report.md")}
    files.update(plots(result, out))
    write_atomic(out / "report.md", markdown(result, files))
    write_atomic(out / "bench.json", json.dumps({**result, "files": files}, indent=1, default=str) + "\n")
    return files


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result: dict, files: dict | None = None) -> str:
    p, emu = result["profile"], result.get("emulation", {})
    bw = result.get("host_bandwidth") or {}
    lines = [f"# FoldGPT bench: {p['name']}", "", p.get("description", ""), "",
             f"Emulation: pinned to cores {emu.get('pinned_cores')} ({emu.get('threads')} threads for torch, "
             f"ONNX Runtime intra-op and the XNNPACK threadpool; the profile has {emu.get('profile_cores')} "
             f"performance cores). Memory cap: {_fmt(result.get('budget_mb'), 0)} MB of address space over the "
             f"imported runtime (RLIMIT_AS). {emu.get('note', '')}. Load average (1/5/15 min) at start "
             f"{emu.get('load_average_at_start')}, at end {emu.get('load_average_at_end')}: other jobs on this machine "
             "share its cores, and a pinned multi-threaded run waits for the busiest of them.", "",
             f"This machine's bandwidth (measured, STREAM-style triad): **{_fmt(bw.get('triad_gbs'), 2)} GB/s**. "
             f"Target bandwidth (profile, theoretical peak): {p['memory_bandwidth_gbs']} GB/s; LLC {p['llc_mb']} MB.", "",
             "## Profile figures", "", "| figure | value | source |", "|---|---|---|"]
    for k, src in p.get("sources", {}).items():
        lines.append(f"| {k} | {p[k]} | {src['source']} |")

    lines += ["", "## Models", "", "| model | depth | unique blocks | effective params | unique params | on disk MB |",
              "|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['depth']} | {m['num_unique_blocks']} | {m['effective_params'] / 1e6:.2f}M | "
                     f"{m['unique_params'] / 1e6:.2f}M | {_fmt((m.get('bytes_on_disk') or 0) / MB)} |")

    lengths = [str(n) for n in result["config"]["prompt_lengths"]]
    lines += ["", "## Latency (measured on this machine, pinned)", "",
              "| model | runtime | status | " + " | ".join(f"TTFT {n} p50/p90 ms" for n in lengths)
              + " | decode ms/token p50/p90 | decode tok/s p50 |", "|---|---|---|" + "---|" * (len(lengths) + 2)]
    for r in result["runs"]:
        lat = r.get("latency") or {}
        ttft = [(lat.get("ttft_ms") or {}).get(n) for n in lengths]
        cells = [f"{_fmt(t['p50'])} / {_fmt(t['p90'])}" if t else "-" for t in ttft]
        d = lat.get("decode_ms_per_token") or {}
        status = r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('message')}"
        lines.append(f"| {r['model']} | {r['backend']} {r['precision']} | {status} | " + " | ".join(cells)
                     + f" | {_fmt(d.get('p50'), 2)} / {_fmt(d.get('p90'), 2)} | "
                       f"{_fmt((lat.get('decode_tokens_per_s') or {}).get('p50'))} |")

    peak = result.get("host_compute") or {}
    lines += ["", "## Prefill: measured vs this machine's compute roofline", "",
              f"GEMM peak on the pinned cores (measured: {peak.get('label', 'not measured')}): "
              f"**{_fmt(peak.get('fp32_gflops'))} GFLOP/s fp32, {_fmt(peak.get('int8_gops'))} GOP/s int8**. "
              "Roofline = peak at the run's compute precision (int8 for 8da4w, int4, int8, q4_1; fp32 otherwise) / "
              "FLOPs per prompt token (2 x every depth's block parameters, attention over half the prompt on "
              "average, the head once per prompt). Measured = prompt tokens / TTFT p50.", "",
              "| model | runtime | compute | " + " | ".join(f"{n} tokens: tok/s (of roofline)" for n in lengths)
              + " | GFLOP/token at the longest |", "|---|---|---|" + "---|" * (len(lengths) + 1)]
    for r in result["runs"]:
        pre = r.get("prefill") or {}
        if not pre:
            continue
        cells = [f"{_fmt(pre[n]['tokens_per_s'])} ({_fmt(pre[n].get('fraction_of_roofline'), 2)})" if n in pre else "-"
                 for n in lengths]
        longest = pre[max(pre, key=int)].get("flops_per_token")
        lines.append(f"| {r['model']} | {r['backend']} {r['precision']} | {next(iter(pre.values()))['compute']} | "
                     + " | ".join(cells) + f" | {_fmt(longest / 1e9 if longest else None, 3)} |")

    lines += ["", "## Decode speed: measured vs roofline projections", "",
              "Projection = bandwidth / bytes read per token (weights + KV cache); an upper bound that ignores "
              "compute. 'cache-resident' assumes a shared block's weights are read from DRAM once per group "
              "when they fit in the LLC.", "",
              "| model | runtime | **measured** tok/s (this machine) | projection, this machine | "
              "projection, target | projection, target, cache-resident | bytes/token (MB) |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        pr = r.get("projection") or {}
        host, tgt = pr.get("host") or {}, pr.get("target") or {}
        measured = ((r.get("latency") or {}).get("decode_tokens_per_s") or {}).get("p50")
        lines.append(f"| {r['model']} | {r['backend']} {r['precision']} | {_fmt(measured)} | "
                     f"{_fmt(host.get('tokens_per_s'))} (projection) | {_fmt(tgt.get('tokens_per_s'))} (projection) | "
                     f"{_fmt(tgt.get('tokens_per_s_cache_resident'))} (projection) | {_fmt((tgt.get('bytes_per_token') or 0) / MB, 2)} |")

    lines += ["", "## Memory (measured, fresh process per run)", "",
              "| model | runtime | RSS after load MB | RSS after a run MB | peak RSS MB | weight files MB | "
              "KV cache MB (max context) | RSS after run / unique weights | / effective weights |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        m, s = r.get("memory") or {}, r.get("sizes") or {}
        wc = m.get("weights_check") or {}
        kv = s.get("kv_cache_bytes_at") or {}
        kv_max = max(kv.values()) / MB if kv else None
        if "rss_after_load" not in m:
            lines.append(f"| {r['model']} | {r['backend']} {r['precision']} | {m.get('message') or r.get('message')} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['backend']} {r['precision']} | {_fmt(m['rss_after_load'] / MB)} | "
                     f"{_fmt(m['rss_after_run'] / MB)} | {_fmt(m['peak_rss'] / MB)} | {_fmt(s.get('weight_file_bytes', 0) / MB)} | {_fmt(kv_max)} | "
                     f"{_fmt(wc.get('rss_over_unique'), 3)} | {_fmt(wc.get('rss_over_effective'), 3)} |")
    if result.get("memory_vs_dense"):
        lines += ["", "Does resident memory follow unique parameters? RSS after a run, dense minus folded on the same "
                  "runtime, against the unique and the effective parameter saving at the runtime's precision:", "",
                  "| model/runtime | RSS saved MB | unique saving MB | effective saving MB | follows unique |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['rss_saved'] / MB)} | {_fmt(v['unique_saving'] / MB)} | "
                  f"{_fmt(v['effective_saving'] / MB)} | {'n/a (nothing shared)' if v['follows_unique'] is None else v['follows_unique']} |" for k, v in result["memory_vs_dense"].items()]

    if result.get("ratios"):
        lines += ["", "## Folded vs dense (same runtime, same cores, alternating rounds in one process)", "",
                  "| model/runtime | decode speed vs dense | target (dense depth / folded depth x 0.95) | meets |", "|---|---|---|---|"]
        for k, v in result["ratios"].items():
            if "decode_speedup_vs_dense" in v:
                lines.append(f"| {k} | {v['decode_speedup_vs_dense']} | {v['target']} | {v['meets_target']} |")
        peers = {k: v for k, v in result["ratios"].items() if "decode_speed_vs_llamacpp" in v}
        if peers:
            lines += ["", "## 4-bit exports vs llama.cpp on the dense model (same cores, separate processes, ratio of medians)", "",
                      "| comparison | decode speed vs llama.cpp | meets (>= 1) |", "|---|---|---|"]
            lines += [f"| {k} | {v['decode_speed_vs_llamacpp']} | {v['meets_target']} |" for k, v in peers.items()]

    if files:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in files.items() if v.endswith(".png")]
    lines += ["", "## Method", "",
              "Each measurement runs in a fresh Python process pinned with sched_setaffinity; the runtime is imported "
              "before the memory cap is set, so the cap and the RSS numbers are the model's growth over the runtime. "
              f"TTFT: prefill + first argmax, {result['config']['warmup']} warm-up + {result['config']['repeats']} timed "
              f"runs, p50/p90 over the timed runs. Decode: {result['config']['decode_tokens']} greedy steps after the "
              "shortest prompt; the runs that are compared (one runtime and precision across models) are loaded side "
              "by side in one process and timed in alternating rounds "
              f"({result['config']['warmup']} warm-up + {result['config'].get('rounds', '?')} timed, order reversed "
              "every round); p50/p90 over the rounds, and folded/dense is the median of the per-round ratios, so load "
              "from other tenants of this shared machine hits both sides alike. Runtimes are not mixed in one "
              "process (their thread pools compete for the cores), so llama.cpp runs in its own and is compared "
              "by medians. Prompt ids are seeded random tokens.", ""]
    return "\n".join(lines)


def plots(result: dict, out: Path) -> dict:
    """PNG plots; each one only when it has data. Returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, models = {}, result["models"]
    ok = [r for r in result["runs"] if r.get("status") == "ok"]
    by_runtime: dict[str, list] = {}
    for r in ok:
        by_runtime.setdefault(f"{r['backend']} {r['precision']}", []).append(r)

    def unique_m(r):
        return models[r["model"]]["unique_params"] / 1e6

    def save(fig, name):
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files[name] = str(path)

    if ok:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for label, rs in by_runtime.items():
            rs = sorted(rs, key=unique_m)
            a.plot([unique_m(r) for r in rs], [r["latency"]["decode_tokens_per_s"]["p50"] for r in rs], "o-", label=label)
            first = str(min(int(k) for k in rs[0]["latency"]["ttft_ms"])) if rs[0]["latency"]["ttft_ms"] else None
            if first:
                b.plot([unique_m(r) for r in rs], [r["latency"]["ttft_ms"].get(first, {}).get("p50") for r in rs], "o-", label=label)
        a.set(xlabel="unique parameters (M)", ylabel="decode tokens/s (p50, measured)", title="decode vs compression")
        b.set(xlabel="unique parameters (M)", ylabel="TTFT ms (p50, shortest prompt)", title="TTFT vs compression")
        a.legend(fontsize=8)
        save(fig, "latency_vs_compression")

        fig, ax = plt.subplots(figsize=(5, 4))
        for label, rs in by_runtime.items():
            rs = [r for r in sorted(rs, key=unique_m) if "peak_rss" in (r.get("memory") or {})]
            ax.plot([unique_m(r) for r in rs], [r["memory"]["peak_rss"] / MB for r in rs], "o-", label=label)
        ax.set(xlabel="unique parameters (M)", ylabel="peak RSS over runtime (MB)", title="memory vs compression")
        ax.legend(fontsize=8)
        save(fig, "memory_vs_compression")

    if models:
        fig, ax = plt.subplots(figsize=(5, 4))
        names = list(models)
        bottom = [0.0] * len(names)
        for part in ("embedding", "blocks", "head", "other"):
            vals = [models[n]["size_breakdown_params"][part] * 4 / MB for n in names]
            ax.bar(names, vals, bottom=bottom, label=part)
            bottom = [x + y for x, y in zip(bottom, vals)]
        ax.set(ylabel="unique fp32 MB", title="size breakdown (tied head counted in embedding)")
        ax.legend(fontsize=8)
        save(fig, "size_breakdown")

    gated = {n: _gate_values(m.get("gates")) for n, m in models.items()}
    gated = {n: g for n, g in gated.items() if g}
    if gated:
        fig, ax = plt.subplots(figsize=(6, 3))
        for n, g in gated.items():
            ax.bar([i + 0.4 * list(gated).index(n) for i in range(len(g))], g, width=0.4, label=n)
        ax.set(xlabel="source block", ylabel="gate value", title="gates per block (fold.provenance.gates)", ylim=(0, 1.05))
        ax.legend(fontsize=8)
        save(fig, "gates")
    return files


def _gate_values(gates) -> list[float] | None:
    """Gate values from fold.provenance.gates: a list, or a {block: value} dict."""
    if isinstance(gates, dict):
        try:
            return [float(gates[k]) for k in sorted(gates, key=int)]
        except (TypeError, ValueError):
            return None
    if isinstance(gates, list) and gates and all(isinstance(g, (int, float)) for g in gates):
        return [float(g) for g in gates]
    return None
