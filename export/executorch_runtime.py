"""Run an exported .pte the way ExecuTorch's LLM runner (Android `LlmModule`) does.

    lm = PteLM("out/model.pte")                 # + out/model.ptd if present
    ids = lm.encode("The capital of France is")
    new = lm.generate(ids, 32, on_token=print)  # greedy, stops on the program's get_eos_ids

The program contract (what `export.executorch` writes and the runner reads):
    forward(tokens: int64 (1, seq), input_pos: int64 (1,)) -> logits float32 (1, vocab)
        appends `tokens` at positions input_pos .. input_pos+seq-1 of the static KV cache
        and returns the next-token logits of the last one; 1 <= seq <= get_max_seq_len
    get_max_seq_len, get_max_context_len, get_vocab_size, get_n_layers, get_bos_id,
    get_eos_ids, use_kv_cache, use_sdpa_with_kv_cache, enable_dynamic_shape: constant methods
The tokenizer is `tokenizer.json` beside the .pte; weights a delegate shares with the
tied embedding may live in `<stem>.ptd` beside it (see export/executorch.py).

The pip runtime needs three things an Android LLM build links in: the LLM custom ops
(`llama::custom_sdpa`, `llama::update_cache`), the quantized kernels
(`quantized_decomposed::embedding_byte` / `embedding_4bit`) and, for one packed copy of
each shared weight, XNNPACK's weight cache. XNNPACK packs each delegate's weights when
the program loads; without the cache, depths sharing a weight get a packed copy each and
resident memory grows with depth, not with unique weights. The cache packs once per
named-data key and frees the unpacked bytes. The pip wheel builds it in but leaves it
off, and the pybindings have no call for it, so `set_xnnpack_weight_cache` sets the
runtime backend option through `executorch::runtime::set_option`. A phone build needs
`-DEXECUTORCH_XNNPACK_ENABLE_WEIGHT_CACHE=ON` (set by ExecuTorch's android and apple CMake
presets, off in the generic build) or the same `set_option("XnnpackBackend",
{"weight_cache_enabled", true})` call before the program loads.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from export.pages import mapped_resident, release_mapped_pages

INSTALL_HINT = "pip install executorch==1.5.1"
TOKENIZER_FILE = "tokenizer.json"
METADATA = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_n_layers", "get_bos_id",
            "get_eos_ids", "use_kv_cache", "use_sdpa_with_kv_cache", "enable_dynamic_shape")

_runtime = None


def runtime():
    """The pybindings module, with the LLM custom ops and quantized kernels registered (once)."""
    global _runtime
    if _runtime is None:
        try:
            import executorch
            from executorch.extension.pybindings import portable_lib
            from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: ops, eager + runtime
        except ImportError as e:
            raise ValueError(f"the executorch backend needs {e.name}: {INSTALL_HINT}") from None
        lib = Path(list(executorch.__path__)[0]) / "lib"
        # quantized_decomposed::* kernels self-register when the library is loaded
        ctypes.CDLL(str(lib / "libexecutorch_kernels_quantized.so"), mode=ctypes.RTLD_GLOBAL)
        _runtime = portable_lib
    return _runtime


class _BackendOption(ctypes.Structure):
    """executorch::runtime::BackendOption: char key[64]; std::variant<bool, int, std::array<char, 256>>."""
    _fields_ = [("key", ctypes.c_char * 64), ("storage", ctypes.c_int32 * 64), ("index", ctypes.c_uint8)]


def set_xnnpack_weight_cache(enabled: bool) -> None:
    """Turn XNNPACK's weight cache on or off for programs loaded after this call (process-wide).

    With the cache, weights are packed once per named-data key, so depths sharing a
    weight share one packed copy, and the unpacked bytes are released after packing.
    """
    import executorch

    runtime()
    lib = ctypes.CDLL(str(Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch.so"), mode=ctypes.RTLD_GLOBAL)
    set_option = lib._ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE
    set_option.argtypes = [ctypes.c_char_p, ctypes.POINTER(_BackendOption), ctypes.c_size_t]
    set_option.restype = ctypes.c_uint32
    option = _BackendOption(key=b"weight_cache_enabled", index=0)
    option.storage[0] = int(enabled)
    err = set_option(b"XnnpackBackend", ctypes.byref(option), 1)
    if err:
        raise RuntimeError(f"XnnpackBackend rejected weight_cache_enabled={enabled} (error {err:#x})")


def data_file(pte: Path) -> Path | None:
    """The external weights file of a .pte, if it has one: `<stem>.ptd` beside it."""
    ptd = Path(pte).with_suffix(".ptd")
    return ptd if ptd.is_file() else None


class PteLM:
    """One loaded program and the static KV cache of one sequence (batch 1).

    `prefill(ids)` and `step(token)` return next-token logits (vocab,) as float32;
    `position` is where the next token goes. Raises ValueError when a sequence would
    pass the program's context length.
    """

    def __init__(self, pte, weight_cache: bool = True, num_threads: int | None = None, eos_ids=None,
                 release_pages: bool = True):
        pte = Path(pte)
        if not pte.is_file():
            raise FileNotFoundError(f"{pte}: no such .pte file")
        rt = runtime()
        set_xnnpack_weight_cache(weight_cache)
        if num_threads:
            rt._unsafe_reset_threadpool(num_threads)
        ptd = data_file(pte)
        try:  # the pybindings parse lazily: a bad file surfaces at the first query
            self.module = rt._load_for_executorch(str(pte), str(ptd) if ptd else None)
            names = self.module.method_names()
        except RuntimeError as e:
            raise ValueError(f"{pte}: cannot load the program ({e})") from None
        missing = [m for m in ("forward", *METADATA) if m not in names]
        if missing:
            raise ValueError(f"{pte}: not an LLM-runner program (no {', '.join(missing)})")
        self.metadata = {name: self._constant(name) for name in METADATA}
        self.max_seq_len = int(self.metadata["get_max_seq_len"])
        self.max_context = int(self.metadata["get_max_context_len"])
        self.vocab_size = int(self.metadata["get_vocab_size"])
        self.eos_ids = set(eos_ids if eos_ids is not None else self.metadata["get_eos_ids"])
        self.tokenizer_path = pte.parent / TOKENIZER_FILE
        self._tokenizer = None
        self.position = 0
        # XNNPACK packs the weights at the first forward; then the mapped file pages can go
        self._release = [pte, *([ptd] if ptd else [])] if release_pages else []

    def _constant(self, name: str):
        values = self.module.run_method(name, [])
        values = [v.tolist() if hasattr(v, "tolist") else v for v in values]
        return values if name == "get_eos_ids" else values[0]

    # ------------------------------------------------------------------ decode loop

    def reset(self) -> None:
        """Start a new sequence (the cache is overwritten from position 0)."""
        self.position = 0

    def _forward(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        if self.position + len(ids) > self.max_context:
            raise ValueError(f"sequence of {self.position + len(ids)} tokens is longer than the program's "
                             f"context of {self.max_context} (export with a larger --max-context)")
        out = self.module.forward([torch.tensor([list(ids)], dtype=torch.long), torch.tensor([self.position], dtype=torch.long)])
        self.position += len(ids)
        if self._release:
            release_mapped_pages(self._release)
            self._release = []
        return out[0].reshape(-1, self.vocab_size)[-1].numpy()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` in chunks of at most get_max_seq_len; logits after the last one."""
        if not len(ids):
            raise ValueError("nothing to prefill: the prompt has no tokens")
        for start in range(0, len(ids), self.max_seq_len):
            logits = self._forward(ids[start:start + self.max_seq_len])
        return logits

    def step(self, token: int) -> np.ndarray:
        return self._forward([int(token)])

    def generate(self, ids: Sequence[int], max_new_tokens: int, on_token: Callable[[int], None] | None = None,
                 stats: dict | None = None) -> list[int]:
        """Greedy decode after a fresh prefill of `ids`; stops on an EOS id or a full cache.
        `stats`, if given, receives prefill_s, decode_s and stopped_on_eos (what the app shows)."""
        import time

        self.reset()
        t0 = time.perf_counter()
        logits, new, eos = self.prefill(ids), [], False
        t1 = time.perf_counter()
        while len(new) < max_new_tokens:
            token = int(logits.argmax())
            if token in self.eos_ids:
                eos = True
                break
            new.append(token)
            if on_token is not None:
                on_token(token)
            if self.position >= self.max_context:
                break
            logits = self.step(token)
        if stats is not None:
            stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, stopped_on_eos=eos)
        return new

    # ------------------------------------------------------------------ parity

    def steps(self):
        """A fresh-sequence step factory for `export.parity` (logits of every fed token).

        The program returns only the last position's logits, as the runner needs. So a
        multi-token call feeds all but the last token one at a time (decode path: the
        earlier rows), then prefills the whole call from its start position (the
        prefill path: the last row, and the cache the next steps read).
        """
        self.reset()

        def step(ids: Sequence[int]) -> np.ndarray:
            start = self.position
            rows = [self.step(t) for t in ids[:-1]]
            self.position = start
            rows.append(self.prefill(list(ids)))
            return np.stack(rows)

        return step

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if not self.tokenizer_path.is_file():
                raise FileNotFoundError(f"{self.tokenizer_path}: no tokenizer beside the .pte")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if not ids:
            raise ValueError("the prompt is empty after tokenization")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream_text(self, on_text: Callable[[str], None]) -> tuple[Callable[[int], None], list[int]]:
        """An `on_token` that turns tokens into text pieces (whole characters only) for `on_text`."""
        tokens, shown = [], [""]

        def on_token(token: int) -> None:
            tokens.append(token)
            text = self.decode(tokens)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text[len(shown[0]):])
                shown[0] = text

        return on_token, tokens


# ---------------------------------------------------------------------- resident memory


def resident_memory(pte: Path, weight_cache: bool, prompt_tokens: int = 8, release_pages: bool = True) -> dict:
    """Resident-set growth (bytes) from loading `pte`, then from running it (a `prompt_tokens`
    prefill and 9 decode steps), in a fresh process, one thread; and the mean time of the
    last 8 decode steps (a rough number on a shared machine)."""
    code = ("import sys; from export.executorch_runtime import _rss_probe; "
            "_rss_probe(sys.argv[1], sys.argv[2] == '1', int(sys.argv[3]), sys.argv[4] == '1')")
    done = subprocess.run([sys.executable, "-c", code, str(pte), "1" if weight_cache else "0", str(prompt_tokens),
                           "1" if release_pages else "0"], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if done.returncode != 0:
        raise RuntimeError(f"resident-memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_probe(pte: str, weight_cache: bool, prompt_tokens: int, release_pages: bool) -> None:
    files = [pte, *([data_file(Path(pte))] if data_file(Path(pte)) else [])]

    def status() -> dict:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}

    runtime()  # libraries, kernels and thread pool are the runtime's cost, not the model's
    before = status()
    lm = PteLM(pte, weight_cache=weight_cache, num_threads=1, release_pages=release_pages)
    loaded, loaded_mapped = status(), mapped_resident(files)
    lm.prefill(list(range(prompt_tokens)))
    lm.step(1)
    clock = time.perf_counter()
    for token in range(100, 108):  # decode reads embedding rows the prefill did not
        lm.step(token % lm.vocab_size)
    decode_ms = (time.perf_counter() - clock) / 8 * 1000
    ran, ran_mapped = status(), mapped_resident(files)
    # model = anonymous growth (packed weights, planned memory, KV cache) + the program's file pages;
    # shared-library code paged in by the first run is left out (it is the same for every model)
    print(json.dumps({"load": loaded["RssAnon"] - before["RssAnon"] + loaded_mapped,
                      "after_forward": ran["RssAnon"] - before["RssAnon"] + ran_mapped,
                      "after_forward_anon": ran["RssAnon"] - before["RssAnon"], "after_forward_file": ran_mapped,
                      "after_forward_vmrss": ran["VmRSS"] - before["VmRSS"], "decode_ms_per_token": round(decode_ms, 2)}))
