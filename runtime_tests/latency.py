"""Latency harness: time to first token per prompt length, decode tokens/s, p50/p90.

Every backend is driven through one small protocol, a `Runner`:
    reset()                      start a new sequence (empty KV cache)
    prefill(ids) -> logits       append a prompt, return the last position's logits (vocab,)
    step(token)  -> logits       append one token
Runners are thin adapters over what each backend already has:
    torch       compress.format.load_folded + a transformers DynamicCache (eager)
    onnx        export.onnx.OnnxLM (one session, explicit past/present tensors)
    executorch  export.executorch_runtime.PteLM (static KV cache, prefill/step)
    llamacpp    llama-cpp-python on a GGUF file: the peer a phone app would otherwise ship
                (optional: `pip install llama-cpp-python`, which builds llama.cpp from source)

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
from typing import Callable, Protocol

import numpy as np

PROMPT_LENGTHS = (32, 128, 512)
DECODE_TOKENS = 128


class Runner(Protocol):
    max_context: int | None

    def reset(self) -> None: ...
    def prefill(self, ids: list[int]) -> np.ndarray: ...
    def step(self, token: int) -> np.ndarray: ...


class TorchRunner:
    """PyTorch eager on a folded (or dense) model directory, KV cache as transformers keeps it."""

    def __init__(self, model_dir, threads: int | None = None):
        import torch
        from compress.format import load_folded

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = load_folded(model_dir)
        self.model = self.model.float().eval()
        self.vocab_size = self.model.config.vocab_size
        self.max_context = None
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache, self.length = DynamicCache(config=self.model.config), 0

    def _forward(self, ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long)
            pos = torch.arange(self.length, self.length + len(ids))[None]
            out = self.model(input_ids=x, position_ids=pos, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
        self.cache, self.length = out.past_key_values, self.length + len(ids)
        return out.logits[0, -1].numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._forward(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._forward([int(token)])


class OnnxRunner:
    """ONNX Runtime (CPU EP) on an `export.onnx` directory, intra_op_num_threads = threads."""

    def __init__(self, artifact, threads: int | None = None):
        from pathlib import Path

        from export.onnx import MODEL_FILE, OnnxLM

        path = Path(artifact)
        path = path / MODEL_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{artifact}: no {MODEL_FILE} (not an ONNX export)")
        self.lm = OnnxLM(path, num_threads=threads)
        self.max_context = None

    def reset(self) -> None:
        self.lm.reset()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.lm.step(list(ids))[-1]

    def step(self, token: int) -> np.ndarray:
        return self.lm.step([int(token)])[-1]


class PteRunner:
    """ExecuTorch pybindings on a .pte, XNNPACK threadpool reset to `threads`."""

    def __init__(self, artifact, threads: int | None = None):
        from export.executorch_runtime import PteLM

        self.lm = PteLM(artifact, num_threads=threads)
        self.max_context = self.lm.max_context

    def reset(self) -> None:
        self.lm.reset()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.lm.prefill(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self.lm.step(int(token))


class LlamaCppRunner:
    """llama.cpp (through llama-cpp-python) on a .gguf file, n_threads = n_threads_batch = threads.

    Logits of the last evaluated position only (logits_all off), as llama.cpp's own
    generate loop runs; the context is sized for the harness's longest prompt + decode."""

    def __init__(self, artifact, threads: int | None = None, n_ctx: int = 1024):
        from pathlib import Path

        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise RuntimeError("the llamacpp runtime needs llama-cpp-python: pip install llama-cpp-python") from e
        if Path(artifact).suffix != ".gguf" or not Path(artifact).is_file():
            raise FileNotFoundError(f"{artifact}: not a .gguf file")
        threads = threads or 1
        self.llm = Llama(str(artifact), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=False, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.max_context = n_ctx

    def reset(self) -> None:
        self.llm.reset()

    def _eval(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[self.llm.n_tokens - 1])

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._eval(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._eval([int(token)])


RUNNERS: dict[str, Callable[..., Runner]] = {"torch": TorchRunner, "onnx": OnnxRunner, "executorch": PteRunner,
                                             "llamacpp": LlamaCppRunner}
# modules a fresh process imports before the memory cap is set (the runtime, not the model)
PRELOAD = {"torch": ("torch", "transformers"), "onnx": ("numpy", "onnxruntime", "transformers"),
           "executorch": ("torch", "export.executorch_runtime"), "llamacpp": ("numpy", "llama_cpp")}


def llamacpp_available() -> bool:
    """llama-cpp-python is optional: the comparison runs when it is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def make_runner(backend: str, artifact, threads: int | None = None) -> Runner:
    """The runner for `backend` on `artifact`. Raises ValueError listing the known backends."""
    if backend not in RUNNERS:
        raise ValueError(f"unknown runtime backend {backend!r}; known: {', '.join(sorted(RUNNERS))}")
    return RUNNERS[backend](artifact, threads)


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
        times = []
        for i in range(warmup + repeats):
            runner.reset()
            t = time.perf_counter()
            int(runner.prefill(ids).argmax())
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
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


def decode_ms(runner: Runner, ids: list[int], decode_tokens: int) -> float:
    """ms per token of `decode_tokens` greedy steps after prefilling `ids` (prefill not timed)."""
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
