"""Where a long prompt's prefill time goes, per operator, on ExecuTorch and ONNX Runtime.

    python benchmarks/prefill_profile.py --pte runs/main/exports/folded-executorch-8da4w+emb8/model.pte \
        --onnx runs/main/exports/folded-onnx-int4 --tokens 512

ExecuTorch: the program loads with ETDump on (the pip runtime's event tracer), prefills
`--tokens` tokens in the program's own chunks, and the devtools Inspector reads the
events: each XNNPACK delegate call, each custom op (`llama::custom_sdpa`,
`llama::update_cache`) and each portable kernel, summed over the timed prefill.
ONNX Runtime: one session with its profiler on, the same prefill, nodes summed by op type.
Each runtime gets one thread per core this process may run on; one warm-up prefill first,
whose events are not counted. Writes benchmarks/results/prefill_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import RESULTS


def executorch_profile(pte: Path, tokens: int, threads: int) -> dict:
    """Per-event milliseconds of one timed prefill (the second; the first packs the weights)."""
    import torch
    from executorch.devtools import Inspector

    from export.executorch_runtime import data_file, runtime, set_xnnpack_weight_cache

    rt = runtime()
    set_xnnpack_weight_cache(True)
    torch.set_num_threads(threads)
    ptd = data_file(pte)
    module = rt._load_for_executorch(str(pte), str(ptd) if ptd else None, enable_etdump=True,
                                     debug_buffer_size=0)
    chunk = int(module.run_method("get_max_seq_len", [])[0])
    ids = np.random.default_rng(0).integers(100, 20000, tokens).tolist()
    walls = []
    for _ in range(2):  # warm-up (weight packing), then the timed prefill
        t = time.perf_counter()
        for start in range(0, tokens, chunk):
            part = ids[start:start + chunk]
            module.forward([torch.tensor([part], dtype=torch.long), torch.tensor([start], dtype=torch.long)])
        walls.append((time.perf_counter() - t) * 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "prefill.etdp"
        module.write_etdump_result_to_file(str(dump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(dump))
    calls = len(range(0, tokens, chunk))
    per_event: dict[str, float] = defaultdict(float)
    sdpa_calls: list[float] = []
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            raw = (event.perf_data.raw if event.perf_data else None) or []
            timed = raw[-calls:] if len(raw) >= 2 * calls else raw[len(raw) // 2:]  # the timed prefill's calls
            per_event[str(event.name)] += float(sum(timed))
            if "sdpa" in str(event.name):  # attention's cost per chunk: does it grow with the keys so far?
                sdpa_calls += list(timed)
    # nested events: Method::execute holds every call; DELEGATE_CALL holds XNNPACK's own
    # operators, OPERATOR_CALL the kernels outside the delegate (custom ops, portable kernels)
    containers = {"Method::execute": "execute_ms", "DELEGATE_CALL": "xnnpack_ms", "OPERATOR_CALL": "outside_delegate_ms"}
    total = per_event.get("Method::execute") or sum(per_event.values())
    leaves = {k: v for k, v in per_event.items() if k not in containers}
    return {"wall_ms": round(walls[-1], 1), "chunk": chunk,
            **{key: round(per_event.get(name, 0.0), 1) for name, key in containers.items()},
            "events_ms": _top(leaves, total),
            "sdpa_ms_per_chunk": [round(sum(c), 1) for c in np.array_split(np.array(sdpa_calls), calls)] if sdpa_calls else None}


def attention_kernels(tokens: int, chunk: int, heads: int, kv_heads: int, head_dim: int, context: int,
                      threads: int) -> list[dict]:
    """ExecuTorch's attention kernel (llama::custom_sdpa, eager: the kernel source the program runs)
    against torch's fused SDPA on the same shapes: each prefill chunk's queries over the keys
    so far, median ms of 10 calls. Says whether the kernel or the graph around it is slow."""
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama::custom_sdpa

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(1, context, kv_heads, head_dim, generator=gen) for _ in range(2))
    rows = []
    for start in range(0, tokens, chunk):
        q = torch.randn(1, chunk, heads, head_dim, generator=gen)
        keys = start + chunk
        qt = q.transpose(1, 2)
        kt, vt = (c[:, :keys].transpose(1, 2).repeat_interleave(heads // kv_heads, 1) for c in (k_cache, v_cache))
        mask = torch.ones(chunk, keys, dtype=torch.bool).tril(start)
        et = _median_ms(lambda: torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, None))
        th = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask))
        gflop = 4 * chunk * keys * heads * head_dim / 1e9  # QK^T and PV over the keys so far
        rows.append({"start": start, "keys": keys, "custom_sdpa_ms": round(et, 2), "torch_sdpa_ms": round(th, 2),
                     "custom_sdpa_gflops": round(gflop / et * 1e3, 1), "torch_sdpa_gflops": round(gflop / th * 1e3, 1)})
    return rows


def _median_ms(call, n: int = 10) -> float:
    call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def onnx_profile(folder: Path, tokens: int, threads: int) -> dict:
    """Per-op-type milliseconds of one timed prefill through ONNX Runtime's profiler."""
    import onnxruntime as ort

    model = next(folder.glob("*.onnx"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "prefill")
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        feeds = _onnx_feeds(sess, tokens)
        walls = []
        for _ in range(2):
            t = time.perf_counter()
            sess.run(None, feeds)
            walls.append((time.perf_counter() - t) * 1e3)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    per_op: dict[str, float] = defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3
    return {"wall_ms": round(walls[-1], 1), "events_ms": _top(per_op, sum(per_op.values()))}


def _onnx_feeds(sess, tokens: int) -> dict:
    """input_ids / attention_mask / position_ids for `tokens` tokens, and an empty past for every cache input."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.random.default_rng(0).integers(100, 20000, (1, tokens), dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, tokens), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(tokens, dtype=np.int64)[None]
        else:  # past key / value: (batch, heads, 0, head_dim)
            shape = [1 if n == 0 else d if isinstance(d, int) else 0 for n, d in enumerate(i.shape)]
            feeds[i.name] = np.zeros(shape, dtype=np.float16 if "float16" in i.type else np.float32)
    return feeds


def _top(times: dict[str, float], total: float) -> list[dict]:
    """Operators by time, each with its share of `total` (the prefill's)."""
    total = total or 1.0
    return [{"op": k, "ms": round(v, 2), "share": round(v / total, 3)}
            for k, v in sorted(times.items(), key=lambda kv: -kv[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pte", type=Path, default=None, help="an ExecuTorch program (.pte)")
    ap.add_argument("--onnx", type=Path, default=None, help="an ONNX export's folder")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--attention", default="9,3,64,1152",
                    help="HEADS,KV_HEADS,HEAD_DIM,CONTEXT of the attention kernels timed beside the .pte (default model's)")
    args = ap.parse_args()
    if not args.pte and not args.onnx:
        raise SystemExit("give --pte and/or --onnx")
    threads = len(os.sched_getaffinity(0))
    result = {"tokens": args.tokens, "threads": threads}
    if args.pte:
        result["executorch"] = {"artifact": str(args.pte), **executorch_profile(args.pte, args.tokens, threads)}
        heads, kv_heads, head_dim, context = (int(x) for x in args.attention.split(","))
        result["attention_kernels"] = attention_kernels(args.tokens, result["executorch"]["chunk"], heads, kv_heads,
                                                        head_dim, context, threads)
    if args.onnx:
        result["onnx"] = {"artifact": str(args.onnx), **onnx_profile(args.onnx, args.tokens, threads)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefill_profile.json").write_text(json.dumps(result, indent=1))
    lines = ["# Prefill per operator", "",
             f"`python benchmarks/prefill_profile.py {shlex.join(sys.argv[1:])}` ({args.tokens}-token prompt, {threads} threads, the second of two "
             "prefills; ExecuTorch events from ETDump via the devtools Inspector, ONNX Runtime nodes from its profiler).", ""]
    for rt in ("executorch", "onnx"):
        if rt not in result:
            continue
        r = result[rt]
        lines += [f"## {rt}: `{r['artifact']}`, wall {r['wall_ms']} ms"
                  + (f" (chunks of {r['chunk']} tokens)" if "chunk" in r else ""), ""]
        if "execute_ms" in r:
            lines += [f"Method::execute {r['execute_ms']} ms: inside the XNNPACK delegate {r['xnnpack_ms']} ms, "
                      f"kernels outside it {r['outside_delegate_ms']} ms. Shares below are of Method::execute."
                      + (f" Attention (custom_sdpa) per {r['chunk']}-token chunk, in order: "
                         f"{', '.join(str(x) for x in r['sdpa_ms_per_chunk'])} ms." if r.get("sdpa_ms_per_chunk") else ""), ""]
        lines += ["| operator | ms | share |", "|---|---|---|"]
        lines += [f"| {e['op']} | {e['ms']} | {e['share']:.1%} |" for e in r["events_ms"][:15]]
        lines.append("")
    if "attention_kernels" in result:
        lines += ["## Attention kernel alone: ExecuTorch's custom_sdpa against torch's fused SDPA", "",
                  "Each prefill chunk's queries over the keys so far (`--attention`), median of 10 calls.", "",
                  "| chunk start | keys | custom_sdpa ms (GFLOP/s) | torch SDPA ms (GFLOP/s) |", "|---|---|---|---|"]
        lines += [f"| {a['start']} | {a['keys']} | {a['custom_sdpa_ms']} ({a['custom_sdpa_gflops']}) | "
                  f"{a['torch_sdpa_ms']} ({a['torch_sdpa_gflops']}) |" for a in result["attention_kernels"]]
        lines.append("")
    (RESULTS / "prefill_profile.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
