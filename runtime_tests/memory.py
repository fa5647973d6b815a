"""Memory harness: resident memory of one model in a fresh process, file sizes, KV-cache bytes.

    memory_job("torch", "runs/folded", threads=2)     # run it through emulate.run_isolated

In the fresh process the runtime is imported first (its registry entry's `preload` and
`warm`, runtime_tests/runtimes.py), then the
peak-RSS counter is reset (/proc/self/clear_refs, "5"), so every number is this
model's growth over the runtime:
    rss_after_load   VmRSS growth from building the runner (weights loaded or mapped)
    rss_after_run    after a prefill of `prompt_tokens` and `decode_tokens` steps
    peak_rss         VmHWM growth over the whole measurement
    anon / file      the same split into anonymous and file-backed pages at the end
`weights_check` relates rss_after_run to the model's unique and effective weight bytes
(after a run, not after load: ExecuTorch's XNNPACK packs weights at the first forward,
and mapped weights are only resident once read); `bench.memory_vs_dense` decides whether
a folded model's memory follows its unique parameters.
"""

from __future__ import annotations

from pathlib import Path

from runtime_tests.latency import decode_ms
from runtime_tests.runtimes import get_runtime, make_runner

MB = 1 << 20


def _status() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile") if k in fields}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_job(backend: str, artifact: str, threads: int, prompt_tokens: int = 32, decode_tokens: int = 8,
               vocab: int = 2) -> dict:
    """Entry point for `emulate.run_isolated`; all sizes in bytes."""
    import numpy as np

    get_runtime(backend).warm(artifact)
    peak_reset = _reset_peak()
    before = _status()
    runner = make_runner(backend, artifact, threads)
    loaded = _status()
    ids = np.random.default_rng(0).integers(3, max(vocab, 4), size=prompt_tokens).tolist()
    decode_ms(runner, ids, decode_tokens)
    ran = _status()
    grow = lambda now, k: now[k] - before[k]  # noqa: E731
    return {"rss_after_load": grow(loaded, "VmRSS"), "rss_after_run": grow(ran, "VmRSS"),
            "peak_rss": ran["VmHWM"] - (before["VmRSS"] if peak_reset else before["VmHWM"]),
            "anon_after_run": grow(ran, "RssAnon"), "file_after_run": grow(ran, "RssFile"),
            "runtime_baseline_rss": before["VmRSS"], "peak_counter_reset": peak_reset,
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}


def artifact_bytes(path) -> int:
    """Bytes on disk of an artifact: a file, a .pte with its .ptd, or a directory's files."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    total = path.stat().st_size
    if path.suffix == ".pte" and path.with_suffix(".ptd").is_file():
        total += path.with_suffix(".ptd").stat().st_size
    return total


def weight_bytes(path) -> int:
    """Bytes of weight files only (safetensors / onnx + external data / pte + ptd), without tokenizer files."""
    path = Path(path)
    if path.is_file():
        return artifact_bytes(path)
    names = ("*.safetensors", "*.onnx", "*.data", "*.pte", "*.ptd", "*.bin", "*.gguf")
    files = {f for pattern in names for f in path.glob(pattern)}  # a set: one file may match two patterns
    return sum(f.stat().st_size for f in files)


def weights_check(rss: int, unique_bytes: int, effective_bytes: int) -> dict:
    """Resident memory (after a run) over the unique and the effective weight bytes. Whether
    a folded model's memory follows unique weights is decided against dense on the same
    runtime (`runtime_tests.bench.memory_vs_dense`), where the non-weight memory cancels."""
    return {"rss": rss, "unique_bytes": unique_bytes, "effective_bytes": effective_bytes,
            "rss_over_unique": round(rss / unique_bytes, 3) if unique_bytes else None,
            "rss_over_effective": round(rss / effective_bytes, 3) if effective_bytes else None}
