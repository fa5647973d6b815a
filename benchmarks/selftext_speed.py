"""Self-text generation speed: tokens/s of the ways `compress.data` can sample, in one run.

    python benchmarks/selftext_speed.py [--new-tokens 256]

Each setting samples the same seed prompts (same temperature, top-k 50 and top-p 0.95 as
the default self text) after a warm-up batch; the figure is generated tokens per second of
wall time, and the ratio is against the sampler before this one (transformers' `generate`,
fp32, batches of 32) in this run. `compress.data.sample` draws from the same distribution on
the top-k candidates only, and drops finished rows from the batch.
Writes benchmarks/results/selftext_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import write_table
from compress.data import DataConfig, _render, generate_batch, sampler_for, seed_prompts
from compress.load import load_model

SETTINGS = [  # (name, sampler, dtype, batch)
    ("transformers generate, fp32 batch 32 (before)", "hf", "float32", 32),
    ("compress.data.sample, fp32 batch 32", "ours", "float32", 32),
    ("compress.data.sample, bf16 batch 32", "ours", "bfloat16", 32),
    ("compress.data.sample, bf16 batch 128 (default)", "ours", "bfloat16", 128),
]


def hf_generate_batch(model, tokenizer, prompts: list[str], cfg: DataConfig, batch: int) -> tuple[list[str], list[int]]:
    """The sampler before compress.data.sample: transformers' generate (whole-vocabulary top-p and sampling)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([_render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.gen_seed * 7919 + batch)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=cfg.gen_max_new_tokens, do_sample=True,
                             temperature=cfg.gen_temperature, top_p=0.95, pad_token_id=pad)
    rows = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows], [int((r != pad).sum()) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    model, tok = load_model("default")
    rows = []
    for name, how, dtype, batch in SETTINGS:
        run = hf_generate_batch if how == "hf" else generate_batch
        cfg = DataConfig(gen_dtype=dtype, gen_batch_size=batch, gen_max_new_tokens=args.new_tokens)
        sampler = sampler_for(model, cfg)
        run(sampler, tok, seed_prompts(4, 99), DataConfig(**{**cfg.__dict__, "gen_max_new_tokens": 8}), 0)
        start = time.perf_counter()
        _, counts = run(sampler, tok, seed_prompts(batch, 0), cfg, 0)
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
                f"{torch.get_num_threads()} threads, one batch per setting after a short warm-up (tokens: generated, "
                "a stop token and padding not counted).",
                {"setting": "setting", "tokens": "tokens", "s": "seconds", "tokens/s": "tokens_per_s", "x before": "ratio"}, rows)


if __name__ == "__main__":
    main()
