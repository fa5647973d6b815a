"""Latency harness: time to first token per prompt length, decode tokens/s, p50/p90.

Every runtime is driven through the `Runner` protocol of runtime_tests/runtimes.py (one
registry entry per runtime).

    result = measure_latency(make_runner("torch", "runs/folded", threads=2))

Timing: TTFT = prefill + argmax of the first token, per prompt length; decode =
`decode_tokens` greedy steps after the shortest prompt, reported as ms per token and
tokens/s. Each is repeated `repeats` times after `warmup` untimed runs; p50 and p90
are over the repeats. Decode speeds that are compared (folded vs dense on one runtime)
are measured together by `decode_rounds`: runners side by side in one process, in
alternating rounds, compared round by round. Prompt ids are seeded random tokens (latency does not depend
on the text), so no tokenizer is needed. A prompt that does not fit the backend's
context (a static-cache .pte) is reported as skipped, not truncated.
"""

from __future__ import annotations

import time

import numpy as np

from runtime_tests.runtimes import Runner, make_runner

PROMPT_LENGTHS = (32, 128, 512, 1024)  # a chat app feeds long prompts: system prompt + history
DECODE_TOKENS = 128


def _percentiles(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "runs": [round(float(v), 3) for v in a]}


def measure_latency(runner: Runner, prompt_lengths=PROMPT_LENGTHS, decode_tokens: int = DECODE_TOKENS,
                    warmup: int = 1, repeats: int = 5, vocab: int | None = None, seed: int = 0) -> dict:
    """TTFT per prompt length and decode speed of `runner`; see the module docstring."""
    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0, decode_tokens >= 0 (got {repeats}, {warmup}, {decode_tokens})")
    rng = np.random.default_rng(seed)
    vocab = vocab or 2
    limit = runner.max_context
    result = {"ttft_ms": {}, "skipped": {}, "warmup": warmup, "repeats": repeats, "decode_tokens": decode_tokens}

    for length in prompt_lengths:
        if limit is not None and length > limit:
            result["skipped"][str(length)] = f"prompt of {length} tokens is longer than the context of {limit}"
            continue
        ids = rng.integers(3, vocab, size=length).tolist()
        times = [first_token_ms(runner, ids) for _ in range(warmup + repeats)][warmup:]
        result["ttft_ms"][str(length)] = _percentiles(times)
    if decode_tokens == 0:  # TTFT only (the bench times decode with `decode_rounds`)
        return result

    prompt_len = min(prompt_lengths)
    if limit is not None and prompt_len + decode_tokens > limit:
        decode_tokens = max(1, limit - prompt_len)
        result["decode_tokens"] = decode_tokens
        result["skipped"]["decode"] = f"decode shortened to {decode_tokens} tokens by the context of {limit}"
    ids = rng.integers(3, vocab, size=prompt_len).tolist()
    per_token = [decode_ms(runner, ids, decode_tokens) for _ in range(warmup + repeats)][warmup:]
    result.update(decode_summary(per_token))
    result["decode_after_prompt"] = prompt_len
    return result


def first_token_ms(runner: Runner, ids: list[int]) -> float:
    """Prefill of `ids` from an empty cache plus the first token's argmax, in ms."""
    if hasattr(runner, "timed_generate"):
        return runner.timed_generate(ids, 1)[0]
    runner.reset()
    t = time.perf_counter()
    int(runner.prefill(ids).argmax())
    return (time.perf_counter() - t) * 1e3


def decode_ms(runner: Runner, ids: list[int], decode_tokens: int) -> float:
    """ms per token of `decode_tokens` greedy steps after prefilling `ids` (prefill not timed)."""
    if hasattr(runner, "timed_generate"):
        return runner.timed_generate(ids, decode_tokens + 1)[1]
    runner.reset()
    token = int(runner.prefill(ids).argmax())
    t = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(runner.step(token).argmax())
    return (time.perf_counter() - t) * 1e3 / decode_tokens


def decode_summary(ms_per_token: list[float]) -> dict:
    ms = _percentiles(ms_per_token)
    return {"decode_ms_per_token": ms,
            "decode_tokens_per_s": {"p50": round(1e3 / ms["p50"], 2), "p10_speed_of_p90_latency": round(1e3 / ms["p90"], 2)}}


def decode_rounds(runners: dict[str, Runner], rounds: int = 5, decode_tokens: int = DECODE_TOKENS, prompt_len: int = 32,
                  warmup: int = 1, vocab: int | None = None, seed: int = 0) -> dict:
    """Decode ms/token of several runners measured in alternating rounds in one process.

    The host is shared: load from other tenants comes and goes over seconds to minutes,
    and one ExecuTorch program was seen running 2-3x apart between consecutive runs
    (benchmarks/results/executorch_warmup.md). Measured one process after the other, two
    models meet different conditions; measured round by round (order reversed every other
    round), both see the same ones, and `round_ratio` compares them round by round.
    """
    if rounds < 1 or warmup < 0 or decode_tokens < 1 or not runners:
        raise ValueError(f"need runners, rounds >= 1, warmup >= 0, decode_tokens >= 1 (got {len(runners)}, {rounds}, "
                         f"{warmup}, {decode_tokens})")
    limits = [r.max_context for r in runners.values() if r.max_context is not None]
    if limits and prompt_len + decode_tokens > min(limits):
        decode_tokens = max(1, min(limits) - prompt_len)
    ids = np.random.default_rng(seed).integers(3, vocab or 2, size=prompt_len).tolist()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            ms = decode_ms(runners[name], ids, decode_tokens)
            if i >= warmup:
                times[name].append(ms)
    return {"rounds": rounds, "warmup": warmup, "decode_tokens": decode_tokens, "decode_after_prompt": prompt_len,
            "ms_per_token": {name: [round(v, 3) for v in t] for name, t in times.items()}}


def round_ratio(ms_base: list[float], ms_other: list[float]) -> float:
    """Speed of `other` relative to `base`: the median over rounds of base ms / other ms."""
    return round(float(np.median(np.asarray(ms_base) / np.asarray(ms_other))), 3)


def decode_rounds_job(entries: list[list[str]], threads: int, rounds: int = 5, decode_tokens: int = DECODE_TOKENS,
                      prompt_len: int = 32, warmup: int = 1, vocab: int | None = None) -> dict:
    """Entry point for `emulate.run_isolated`: entries are [label, backend, artifact]."""
    runners = {label: make_runner(backend, artifact, threads) for label, backend, artifact in entries}
    return decode_rounds(runners, rounds, decode_tokens, prompt_len, warmup, vocab)


def latency_job(backend: str, artifact: str, threads: int, prompt_lengths=PROMPT_LENGTHS,
                decode_tokens: int = DECODE_TOKENS, warmup: int = 1, repeats: int = 5, vocab: int | None = None) -> dict:
    """Entry point for `emulate.run_isolated`: build the runner, measure, return JSON-able numbers."""
    t = time.perf_counter()
    runner = make_runner(backend, artifact, threads)
    load_s = time.perf_counter() - t
    vocab = vocab or getattr(runner, "vocab_size", None) or getattr(getattr(runner, "lm", None), "vocab_size", None)
    out = measure_latency(runner, tuple(prompt_lengths), decode_tokens, warmup, repeats, vocab=vocab)
    out["load_s"] = round(load_s, 3)
    return out
