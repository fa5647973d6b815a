"""What ExecuTorch's attention costs as the context grows, and whether the prefill chunk length helps.

    python benchmarks/et_attention.py --pte runs/main/exports/folded-executorch-8da4w+emb8/model.pte \
        --model runs/main/folded --blocks 6 --chunks 128,512,1024

1. decode after a prompt of 32 / 256 / 512 / 1024 tokens on `--pte` (ms per token, median of
   32 greedy steps, 5 rounds alternating the prompt lengths): the report times decode only after
   its shortest prompt.
2. `llama::custom_sdpa` alone at decode shapes (1 query over N cached keys; the kernel source the
   program runs, via its eager registration) beside torch's SDPA, with the K/V bytes each reads.
3. with `--chunks`: the model exported at each prefill chunk length (`get_max_seq_len`; the runner
   splits longer prompts), its first `--blocks` depths only so that lowering takes a minute, then
   TTFT at 128 / 512 / 1024 tokens and decode after 32 / 1024, all programs in one process in
   alternating rounds (paired).
Writes benchmarks/results/et_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS

THREADS = 2
ROUNDS = 5
STEPS = 32


def _ms(call, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def decode_after(lms: dict, prompts: tuple[int, ...], ttft: tuple[int, ...] = ()) -> dict:
    """{name: {"decode_after_N": ms/token, "ttft_N": ms}}, medians over ROUNDS alternating rounds."""
    ids = list(range(1000, 1000 + max(prompts + ttft)))
    samples: dict[tuple[str, str], list[float]] = {}
    for lm in lms.values():  # XNNPACK packs the weights at the first call
        lm.reset(); lm.prefill(ids[:64])
    for _ in range(ROUNDS):
        for n in ttft:
            for name, lm in lms.items():
                lm.reset()
                samples.setdefault((name, f"ttft_{n}"), []).append(_ms(lambda: lm.prefill(ids[:n]), 1))
        for n in prompts:
            for name, lm in lms.items():
                lm.reset(); lm.prefill(ids[:n])
                samples.setdefault((name, f"decode_after_{n}"), []).append(_ms(lambda: lm.step(5), STEPS))
    out: dict[str, dict] = {}
    for (name, key), v in samples.items():
        out.setdefault(name, {})[key] = round(statistics.median(v), 2)
    return out


def sdpa_alone(keys: tuple[int, ...], heads=9, kv_heads=3, head_dim=64, context=1152) -> list[dict]:
    """custom_sdpa and torch SDPA for one query over `n` cached keys (ms, and GB/s of K/V read)."""
    import torch

    from export.executorch_runtime import runtime

    runtime()
    torch.set_num_threads(THREADS)
    k = torch.randn(1, context, kv_heads, head_dim)
    v = torch.randn(1, context, kv_heads, head_dim)
    rows = []
    for n in keys:
        q = torch.randn(1, 1, heads, head_dim)
        et = _ms(lambda: torch.ops.llama.custom_sdpa(q, k, v, n - 1, None, 0.0, True, None), 50)
        qt, kt, vt = q.transpose(1, 2), k[:, :n].transpose(1, 2), v[:, :n].transpose(1, 2)
        th = _ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), 50)
        kv_bytes = 2 * n * kv_heads * head_dim * 4
        rows.append({"keys": n, "custom_sdpa_ms": round(et, 3), "torch_sdpa_ms": round(th, 3),
                     "custom_sdpa_gbs": round(kv_bytes / et / 1e6, 2), "torch_sdpa_gbs": round(kv_bytes / th / 1e6, 2)})
    return rows


def export_chunks(model_dir: Path, blocks: int, chunks: tuple[int, ...], root: Path, context: int = 1152) -> dict:
    """The model's first `blocks` depths as 8da4w+emb8 programs, one per prefill chunk length."""
    from export.executorch import lower, metadata, package, tied_layout, trace, write_program
    from export.quantize import prepare_weights, quantize_shared
    from export.registry import ExportConfig, load_model

    paths = {}
    for chunk in chunks:
        model, tok = load_model(model_dir)
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        cfg = ExportConfig(precision="8da4w", embedding_bits=8, parity=False, max_context=context)
        prepare_weights(model, tok, cfg)
        quantize_shared(model, cfg.precision, cfg.group_size, cfg.embedding_bits, cfg.weight_method)
        head, external, _ = tied_layout(model, cfg.embedding_bits)
        program = lower(trace(model, context, chunk, head_outside=head is not None),
                        metadata(model, tok, context, chunk), head, external)
        folder = root / f"chunk{chunk}"
        folder.mkdir(parents=True)
        paths[f"chunk {chunk}"] = write_program(program, folder, "model", external)["pte"]
        package(folder, tok)
        print(f"exported {blocks} depths at chunk {chunk}", flush=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pte", required=True, help="an 8da4w program of the main job (decode vs context)")
    ap.add_argument("--model", default=None, help="folded model directory, for --chunks")
    ap.add_argument("--blocks", type=int, default=6, help="depths kept for the --chunks exports")
    ap.add_argument("--chunks", default=None, help="prefill chunk lengths to export and compare, e.g. 128,512,1024")
    args = ap.parse_args()
    from export.executorch_runtime import PteLM

    prompts = (32, 256, 512, 1024)
    result = {"command": "python benchmarks/et_attention.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
              "threads": THREADS, "rounds": ROUNDS, "steps": STEPS}
    result["decode"] = decode_after({"program": PteLM(args.pte, num_threads=THREADS)}, prompts)["program"]
    result["sdpa_alone"] = sdpa_alone(prompts)
    if args.chunks:
        if not args.model:
            raise SystemExit("--chunks needs --model")
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_chunks(Path(args.model), args.blocks, tuple(int(c) for c in args.chunks.split(",")), Path(tmp))
            lms = {name: PteLM(p, num_threads=THREADS) for name, p in paths.items()}
            result["chunks"] = {"blocks": args.blocks, **decode_after(lms, (32, 1024), ttft=(128, 512, 1024))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "et_attention.json").write_text(json.dumps(result, indent=1))
    d = result["decode"]
    lines = ["# ExecuTorch attention against the context", "", f"`{result['command']}` ({THREADS} threads; "
             f"medians of {STEPS} greedy steps, {ROUNDS} alternating rounds).", "",
             "## Decode after a prompt of N tokens", "", "| N | ms/token | x after 32 |", "|---|---|---|"]
    lines += [f"| {n} | {d[f'decode_after_{n}']} | {d[f'decode_after_{n}'] / d['decode_after_32']:.2f} |" for n in prompts]
    lines += ["", "## The attention kernel alone, one query over N cached keys (9 heads, 3 KV heads, dim 64)", "",
              "| N | custom_sdpa ms | GB/s of K/V | torch SDPA ms | GB/s of K/V |", "|---|---|---|---|---|"]
    lines += [f"| {r['keys']} | {r['custom_sdpa_ms']} | {r['custom_sdpa_gbs']} | {r['torch_sdpa_ms']} | {r['torch_sdpa_gbs']} |"
              for r in result["sdpa_alone"]]
    if "chunks" in result:
        c = result["chunks"]
        lines += ["", f"## Prefill chunk length (the model's first {c['blocks']} depths, paired)", "",
                  "| program | TTFT 128 ms | TTFT 512 ms | TTFT 1024 ms | decode after 32 | decode after 1024 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['ttft_128']} | {r['ttft_512']} | {r['ttft_1024']} | {r['decode_after_32']} | "
                  f"{r['decode_after_1024']} |" for name, r in c.items() if name != "blocks"]
    (RESULTS / "et_attention.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
