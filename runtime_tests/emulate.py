"""Emulate a phone CPU on this machine, measure its bandwidth, project a target's decode speed.

Three pieces:
  run_isolated   one measurement in a fresh Python process: pinned to N cores
                 (os.sched_setaffinity), every runtime's thread count set to N, address
                 space capped at the profile's app budget (RLIMIT_AS); an out-of-memory
                 comes back as {"status": "does_not_fit", "message": "does not fit: ..."}
  stream_triad   STREAM-style triad a = b + s*c in numpy, split over N threads
  project_decode roofline: tokens/s = bandwidth / bytes read per generated token
                 (weights + KV cache), with and without a shared block staying in the
                 last-level cache across the depths of its group. Always a projection.

The memory cap. RLIMIT_AS limits address space, not resident memory, and Python plus
torch and onnxruntime map ~700 MB before a model exists (libraries, reserved arenas).
So the child imports the runtime first ("preload"), then sets the limit to its address
space at that point plus the budget: the budget is what the model may add (weights,
mapped files, KV cache, activations, thread stacks). A cgroup v2 memory.max would cap
resident memory instead; it needs a writable cgroup, which this machine does not give.

Thread counts: torch.set_num_threads(N); ONNX Runtime intra_op_num_threads = N (set by
the latency/memory runners, which receive N); ExecuTorch's XNNPACK threadpool through
the pybindings' `_unsafe_reset_threadpool(N)` (what `export.executorch_runtime.PteLM`
calls with num_threads). OMP/MKL env variables are set too, before any import.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULT_MARK = "@@foldgpt-result@@"
ROOT = Path(__file__).resolve().parents[1]
OOM_PATTERNS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
                "failed to allocate", "memoryerror", "allocation failed", "enomem")
MB = 1 << 20

# --------------------------------------------------------------------------- isolation


@dataclass
class Isolation:
    """Where and how one measurement runs."""
    cores: list[int]              # CPUs to pin to
    budget_mb: float | None = None  # address space the model may add; None = uncapped
    timeout_s: float = 1800.0

    @property
    def threads(self) -> int:
        return len(self.cores)


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per arena; keep RLIMIT_AS about the model
            "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


def pin(cores: list[int]) -> None:
    """Pin this process (and threads it starts later) to `cores`, and set torch's thread count."""
    os.sched_setaffinity(0, set(cores))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(len(cores))


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_isolated(target: str, kwargs: dict, iso: Isolation, preload: tuple[str, ...] = (),
                 needs_mb: float | None = None) -> dict:
    """Call `module:function(**kwargs)` in a fresh process under `iso`; returns a result record.

    {"status": "ok", "result": <the function's JSON-able return>, "affinity": [...],
     "threads": N, "budget_mb": ..., "seconds": ...}
    {"status": "does_not_fit", "message": "does not fit: needs X MB, budget Y MB", "needs_mb", "budget_mb"}
    {"status": "error", "message": one line}
    `needs_mb` is the caller's estimate of what the model needs (weights + KV cache), used
    in the does-not-fit message when it exceeds what the child saw before failing.
    """
    spec = {"target": target, "kwargs": kwargs, "cores": iso.cores, "budget_mb": iso.budget_mb, "preload": list(preload)}
    env = {**os.environ, **thread_env(iso.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "runtime_tests.emulate"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=iso.timeout_s, env=env, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"{target} timed out after {iso.timeout_s:.0f} s"}
    seconds = round(time.perf_counter() - start, 2)
    record = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            record = json.loads(line[len(RESULT_MARK):])
            break
    if record is None:  # killed, or crashed below Python (e.g. an uncaught std::bad_alloc aborts)
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode < 0:  # a signal: SIGKILL is the OOM killer's; SIGILL or SIGSEGV is a crash, not memory
            name = signal.Signals(-done.returncode).name
            if iso.budget_mb is None or not (name == "SIGKILL" or _is_oom(done.stderr)):
                return {"status": "error", "message": f"{target}: killed by {name}", "seconds": seconds}
            record = {"status": "does_not_fit", "vm_growth_mb": None, "detail": tail}
        elif iso.budget_mb is not None and _is_oom(done.stderr):
            record = {"status": "does_not_fit", "vm_growth_mb": None, "detail": tail}
        else:
            return {"status": "error", "message": f"{target}: {tail}", "seconds": seconds}
    if record["status"] == "does_not_fit":
        seen = record.get("vm_growth_mb") or 0
        need = max(seen, needs_mb or 0)
        basis = "estimate (weights + KV cache)" if needs_mb and needs_mb >= seen else "address space in use at the failure plus the failed request (a lower bound)"
        record.update(needs_mb=round(need, 1), budget_mb=iso.budget_mb, needs_basis=basis,
                      message=f"does not fit: needs {need:.0f} MB, budget {iso.budget_mb:.0f} MB")
    record["seconds"] = seconds
    return record


def _requested_mb(message: str) -> float:
    """The size of the allocation that failed, when the message says it (numpy, torch)."""
    m = re.search(r"allocate\D{0,20}?([\d.]+)\s*(bytes|KiB|MiB|GiB)", message)
    if not m:
        return 0.0
    return float(m.group(1).rstrip(".")) * {"bytes": 1 / MB, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[m.group(2)]


def _is_oom(text: str) -> bool:
    text = text.lower()
    return any(p in text for p in OOM_PATTERNS)


def _child() -> None:
    """Entry of the fresh process: pin, preload, cap, call, print one marked JSON line."""
    spec = json.loads(sys.stdin.read())
    os.sched_setaffinity(0, set(spec["cores"]))  # before any import starts a thread pool
    for name in spec["preload"]:
        importlib.import_module(name)
    pin(spec["cores"])
    base_kb = _vm_kb("VmSize")
    if spec["budget_mb"] is not None:
        limit = base_kb * 1024 + int(spec["budget_mb"] * MB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    module, _, function = spec["target"].partition(":")
    try:
        result = getattr(importlib.import_module(module), function)(**spec["kwargs"])
        record = {"status": "ok", "result": result}
    except BaseException as e:  # noqa: BLE001  the parent decides; the child only reports
        message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        if spec["budget_mb"] is not None and (isinstance(e, MemoryError) or _is_oom(message)):
            # address space in use when it failed, plus the request that failed
            growth = (_vm_kb("VmSize") - base_kb) / 1024 + _requested_mb(message)
            record = {"status": "does_not_fit", "vm_growth_mb": round(growth, 1), "detail": message}
        else:
            record = {"status": "error", "message": message}
    record.update(affinity=sorted(os.sched_getaffinity(0)), threads=len(spec["cores"]), budget_mb=spec["budget_mb"],
                  vm_base_mb=round(base_kb / 1024, 1))
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(record, default=str), flush=True)


def affinity_probe() -> dict:
    """What the child sees: its affinity mask and torch's thread count (for tests and the report)."""
    import torch

    return {"affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}


def allocate_probe(mb: float) -> dict:
    """Allocate and touch `mb` MB (for the does-not-fit test)."""
    a = np.ones(int(mb * MB) // 8)
    return {"allocated_mb": a.nbytes / MB}


# --------------------------------------------------------------------------- bandwidth


def stream_triad(array_mb: float = 128.0, threads: int | None = None, repeats: int = 5) -> dict:
    """STREAM triad a = b + s*c over float64 arrays of `array_mb` MB each, split in `threads` chunks.

    Bandwidth counted as STREAM does, 3 arrays x 8 bytes per element per pass (write-allocate
    traffic not counted). numpy evaluates b + s*c in two passes (a = s*c; a += b), both
    inside one timed region per chunk; best of `repeats`. Arrays should be many times
    the last-level cache.
    """
    threads = threads or len(os.sched_getaffinity(0))
    n = int(array_mb * MB) // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    chunks = np.array_split(np.arange(n), threads)
    bounds = [(int(ch[0]), int(ch[-1]) + 1) for ch in chunks if len(ch)]

    def triad(lo_hi):
        lo, hi = lo_hi
        np.multiply(c[lo:hi], 3.0, out=a[lo:hi])
        np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(triad, bounds))  # warm-up: page in
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(triad, bounds))
            best = min(best, time.perf_counter() - t)
    assert a[0] == 7.0
    return {"triad_gbs": round(3 * 8 * n / best / 1e9, 2), "array_mb": array_mb, "threads": threads,
            "repeats": repeats, "label": "measured (STREAM-style triad, numpy)"}


def gemm_peak(n: int = 1024, threads: int | None = None, repeats: int = 5) -> dict:
    """This machine's matrix-multiply peak, measured as the triad is: fp32 GFLOP/s of torch.mm
    and int8 GOP/s of torch._int_mm (int8 x int8 -> int32: the VNNI path that XNNPACK's dynamic
    8-bit kernels and ONNX Runtime's MatMulNBits at accuracy level 4 take), n x n x n, best of
    `repeats` after a warm-up."""
    import torch

    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    ai, bi = (torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8) for _ in range(2))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / min(times) / 1e9

    return {"fp32_gflops": round(best(lambda: torch.mm(a, b)), 1), "int8_gops": round(best(lambda: torch._int_mm(ai, bi)), 1),
            "n": n, "threads": threads, "repeats": repeats, "label": "measured (torch.mm fp32, torch._int_mm int8)"}


# --------------------------------------------------------------------------- roofline


@dataclass
class ModelShape:
    """What a decoder reads per generated token, in parameters (dtype-free)."""
    schedule: list[int]           # depth -> physical block
    block_params: dict[int, int]  # physical block -> unique parameters
    embedding_params: int
    head_params: int              # the LM head matrix (== embedding_params when tied)
    other_params: int             # final norm, biases outside blocks
    hidden: int
    vocab: int
    kv_heads: int
    head_dim: int

    @property
    def depth(self) -> int:
        return len(self.schedule)

    def kv_bytes(self, context: int, bytes_per_value: float = 4.0) -> float:
        """K and V of every depth for `context` tokens (each depth has its own cache slot)."""
        return 2 * self.depth * self.kv_heads * self.head_dim * context * bytes_per_value

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"depth": self.depth}


def model_shape(model_dir) -> ModelShape:
    """Shape of a folded (or dense) model directory, via `compress.format`."""
    from compress.format import load_folded

    model, _ = load_folded(model_dir)
    return shape_of(model)


def shape_of(model) -> ModelShape:
    from compress.format import summarize

    s = summarize(model)
    c = model.config.get_text_config(decoder=True)
    blocks = {g["block"]: g["unique_params"] for g in s["groups"]}
    head = s["embedding_params"] if s["tied_embeddings"] else c.vocab_size * c.hidden_size
    other = s["unique_params"] - s["embedding_params"] - sum(blocks.values()) - (0 if s["tied_embeddings"] else head)
    return ModelShape(schedule=list(s["schedule"]), block_params=blocks, embedding_params=s["embedding_params"],
                      head_params=head, other_params=max(0, other), hidden=c.hidden_size, vocab=c.vocab_size,
                      kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                      head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def bytes_per_token(shape: ModelShape, bytes_per_param: float, context: int, llc_bytes: float | None = None,
                    kv_bytes_per_value: float = 4.0) -> dict:
    """DRAM bytes read to generate one token at `context` tokens of KV cache.

    Weights: one embedding row, every depth's block, the head matrix, the rest. With
    `llc_bytes`, a run of consecutive depths sharing a block whose weights fit in the
    last-level cache reads them from DRAM once (the run's first depth); otherwise each
    depth reads its block again, as a dense model does.
    """
    blocks, runs = 0.0, []
    for depth, block in enumerate(shape.schedule):
        size = shape.block_params[block] * bytes_per_param
        resident = llc_bytes is not None and size <= llc_bytes
        first_of_run = depth == 0 or shape.schedule[depth - 1] != block
        if first_of_run or not resident:
            blocks += size
        if first_of_run:
            runs.append(block)
    weights = blocks + (shape.head_params + shape.hidden + shape.other_params) * bytes_per_param
    kv = shape.kv_bytes(context, kv_bytes_per_value)
    return {"weights": weights, "blocks": blocks, "kv_cache": kv, "total": weights + kv}


def prefill_flops_per_token(shape: ModelShape, prompt_len: int) -> float:
    """Multiply-adds x 2 per prompt token: every depth's block and the head (a prefill runs the
    head on its last row only, so the head is spread over the prompt), plus attention's scores
    and weighted sum over the causal prefix (on average half the prompt)."""
    blocks = sum(shape.block_params[b] for b in shape.schedule)
    attention = 2 * 2 * shape.hidden * (prompt_len + 1) / 2 * shape.depth
    return 2 * blocks + attention + 2 * shape.head_params / prompt_len


def project_prefill(shape: ModelShape, peak_gflops: float, prompt_len: int) -> dict:
    """Roofline prefill tokens/s at `peak_gflops`: a projection (upper bound; memory ignored)."""
    flops = prefill_flops_per_token(shape, prompt_len)
    return {"label": "projection (roofline: GEMM peak / FLOPs per prompt token)", "prompt_len": prompt_len,
            "peak_gflops": peak_gflops, "flops_per_token": round(flops), "tokens_per_s": round(peak_gflops * 1e9 / flops, 1)}


def project_decode(shape: ModelShape, bandwidth_gbs: float, llc_mb: float, bytes_per_param: float,
                   context: int, kv_bytes_per_value: float = 4.0) -> dict:
    """Roofline decode tokens/s at `bandwidth_gbs`: a projection (upper bound; compute ignored)."""
    stream = bytes_per_token(shape, bytes_per_param, context, None, kv_bytes_per_value)
    cached = bytes_per_token(shape, bytes_per_param, context, llc_mb * MB, kv_bytes_per_value)
    bw = bandwidth_gbs * 1e9
    return {"label": "projection (roofline: bandwidth / bytes per token)",
            "bandwidth_gbs": bandwidth_gbs, "context": context, "bytes_per_param": bytes_per_param,
            "bytes_per_token": round(stream["total"]), "bytes_per_token_cache_resident": round(cached["total"]),
            "tokens_per_s": round(bw / stream["total"], 2),
            "tokens_per_s_cache_resident": round(bw / cached["total"], 2)}


if __name__ == "__main__":
    _child()
