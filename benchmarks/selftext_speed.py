"""Self-text generation speed: tokens/s of the ways `compress.data` can sample, in one run.

    python benchmarks/selftext_speed.py [--new-tokens 128]

Each setting samples the same seed prompts with `model.generate` (same temperature and
top-p as the default self text) after a warm-up batch; the figure is generated tokens per
second of wall time, and the ratio is against today's default (fp32, batches of 32) in
this run. Writes benchmarks/results/selftext_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_table
from compress.data import DataConfig, generate_batch, sampler_for, seed_prompts
from compress.load import load_model

SETTINGS = [  # (name, dtype, batch)
    ("fp32 batch 32 (before)", "float32", 32),
    ("fp32 batch 128", "float32", 128),
    ("bf16 batch 32", "bfloat16", 32),
    ("bf16 batch 128", "bfloat16", 128),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_model("default")
    rows = []
    for name, dtype, batch in SETTINGS:
        cfg = DataConfig(gen_dtype=dtype, gen_batch_size=batch, gen_max_new_tokens=args.new_tokens)
        sampler = sampler_for(model, cfg)
        generate_batch(sampler, tok, seed_prompts(4, 99), DataConfig(**{**cfg.__dict__, "gen_max_new_tokens": 8}), 0)
        start = time.perf_counter()
        _, counts = generate_batch(sampler, tok, seed_prompts(batch, 0), cfg, 0)
        seconds, tokens = time.perf_counter() - start, sum(counts)
        rows.append({"setting": name, "dtype": dtype, "batch": batch, "tokens": tokens,
                     "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)})
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = round(r["tokens_per_s"] / base, 2)
    write_table("selftext_speed", {"new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "rows": rows},
                "Self-text generation speed",
                f"`python benchmarks/selftext_speed.py --new-tokens {args.new_tokens}`; default model, "
                f"{torch.get_num_threads()} threads, one batch per setting after a short warm-up (tokens: generated, padding after an EOS not counted).",
                {"setting": "setting", "tokens": "tokens", "s": "seconds", "tokens/s": "tokens_per_s", "x before": "ratio"}, rows)

if __name__ == "__main__":
    main()
