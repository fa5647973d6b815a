"""The runtimes the harness drives: one registry entry per runtime, next to its runner.

Every runtime is driven through one small protocol, a `Runner`:
    reset()                      start a new sequence (empty KV cache)
    prefill(ids) -> logits       append a prompt, return the last position's logits (vocab,)
    step(token)  -> logits       append one token
A runtime that does not hand out logits (ExecuTorch's C++ LLM runner runs its own loop)
instead has `timed_generate(ids, n) -> (prefill_ms, decode_ms_per_token)`, timed by the
runtime's own stats. Each entry also says which modules a fresh process imports before its
memory cap (`preload`) and how to pay the runtime's one-off costs before a memory baseline
(`warm`). Adding a runtime is one `@register_runtime` here; latency.py, memory.py and
bench.py ask the registry.

    torch       compress.format.load_folded + a transformers DynamicCache (eager)
    onnx        export.onnx.OnnxLM (one session, explicit past/present tensors)
    genai       ONNX Runtime GenAI on the same ONNX export: the runtime ONNX apps ship
    executorch  export.executorch_runtime.PteLM (static KV cache, prefill/step)
    etrunner    ExecuTorch's C++ TextLLMRunner on the same .pte: what Android's LlmModule wraps
    llamacpp    llama-cpp-python on a GGUF file: the peer a phone app would otherwise ship
                (optional: `pip install llama-cpp-python`, which builds llama.cpp from source)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from compress.registry import Registry


class Runner(Protocol):
    max_context: int | None

    def reset(self) -> None: ...
    def prefill(self, ids: list[int]) -> np.ndarray: ...
    def step(self, token: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Runtime:
    name: str
    runner: Callable[..., Runner]  # (artifact, threads) -> Runner
    preload: tuple[str, ...]  # modules a fresh process imports before the memory cap (the runtime, not the model)
    warm: Callable[[str], None]  # pays the runtime's one-off costs before a memory baseline
    reads: str | None  # the export backend whose artifacts it runs (None: a model dir or a GGUF)


_RUNTIMES: Registry[Runtime] = Registry("runtime")


def register_runtime(name: str, preload: tuple[str, ...], warm: Callable[[str], None] = lambda artifact: None,
                     reads: str | None = None):
    """Class decorator: the runner class of runtime `name`."""
    def add(cls):
        _RUNTIMES.add(name, Runtime(name, cls, preload, warm, reads))
        return cls
    return add


def known_runtimes() -> list[str]:
    return _RUNTIMES.known()


def get_runtime(name: str) -> Runtime:
    return _RUNTIMES.get(name)


def runtimes_reading(export_backend: str) -> list[str]:
    """Every runtime that runs `export_backend`'s artifacts: ours and the one apps ship."""
    return [name for name, rt in _RUNTIMES if rt.reads == export_backend]


def make_runner(backend: str, artifact, threads: int | None = None) -> Runner:
    """The runner for `backend` on `artifact`. Raises ValueError listing the known backends."""
    return get_runtime(backend).runner(artifact, threads)


def _warm_torch(artifact: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import compress.format  # noqa: F401

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(artifact))


@register_runtime("torch", preload=("torch", "transformers"), warm=_warm_torch)
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


def _warm_onnx(artifact: str) -> None:
    import onnx
    import onnxruntime as ort

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "warmup", [x], [y], [w])
    ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(),
                         providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((1, 4), np.float32)})


@register_runtime("onnx", preload=("numpy", "onnxruntime", "transformers"), warm=_warm_onnx, reads="onnx")
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


@register_runtime("genai", preload=("numpy", "onnxruntime_genai"), reads="onnx")
class GenaiRunner:
    """ONNX Runtime GenAI's Generator on an `export.onnx` directory: append_tokens runs the
    model, get_logits reads the last position's logits."""

    def __init__(self, artifact, threads: int | None = None):
        from export.genai_runner import GenaiLM

        self.lm = GenaiLM(artifact, num_threads=threads)
        self.max_context = None
        self.reset()

    def reset(self) -> None:
        og = self.lm.og
        params = og.GeneratorParams(self.lm.model)
        params.set_search_options(do_sample=False, max_length=self.lm.max_length)
        self.generator = og.Generator(self.lm.model, params)

    def _append(self, ids: list[int]) -> np.ndarray:
        self.generator.append_tokens([list(map(int, ids))])
        return np.asarray(self.generator.get_logits()).reshape(-1)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._append(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._append([int(token)])


def _warm_executorch(artifact: str) -> None:
    from export.executorch_runtime import runtime

    runtime()


@register_runtime("executorch", preload=("torch", "export.executorch_runtime"), warm=_warm_executorch,
                  reads="executorch")
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


@register_runtime("etrunner", preload=("torch", "export.executorch_runtime"), warm=_warm_executorch,
                  reads="executorch")
class EtRunnerRunner:
    """ExecuTorch's C++ TextLLMRunner on a .pte. It takes text and runs its own loop, so the
    ids are decoded to text (the runner re-tokenizes: the prompt length it reports may differ
    by a few tokens) and the times are its own stats; it stops early only on an EOS id."""

    def __init__(self, artifact, threads: int | None = None):
        from export.executorch_runtime import runtime
        from export.llm_runner import RunnerLM

        if threads:
            runtime()._unsafe_reset_threadpool(threads)
        self.lm = RunnerLM(artifact)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.lm.tokenizer_path))
        self.max_context = None

    def reset(self) -> None:
        pass  # generate starts from a fresh cache

    def timed_generate(self, ids: list[int], decode_tokens: int) -> tuple[float, float]:
        _, stats = self.lm.generate(self.tokenizer.decode(list(ids)), max(1, decode_tokens))
        return stats["prefill_s"] * 1e3, stats["decode_s"] * 1e3 / max(1, stats["decode_tokens"])


def _warm_llamacpp(artifact: str) -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()


@register_runtime("llamacpp", preload=("numpy", "llama_cpp"), warm=_warm_llamacpp)
class LlamaCppRunner:
    """llama.cpp (through llama-cpp-python) on a .gguf file, n_threads = n_threads_batch = threads.

    Logits of the last evaluated position only (logits_all off), as llama.cpp's own
    generate loop runs; the context is sized for the harness's longest prompt + decode."""

    def __init__(self, artifact, threads: int | None = None, n_ctx: int = 1152):
        from pathlib import Path

        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as e:
            raise RuntimeError("the llamacpp runtime needs llama-cpp-python: pip install llama-cpp-python") from e
        if Path(artifact).suffix != ".gguf" or not Path(artifact).is_file():
            raise FileNotFoundError(f"{artifact}: not a .gguf file")
        threads = threads or 1
        with _without_amx(llama_cpp):
            self.llm = Llama(str(artifact), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                             logits_all=False, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self.max_context = n_ctx
        self._logits_ith = llama_cpp.llama_get_logits_ith

    def reset(self) -> None:
        self.llm.reset()

    def _eval(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        # with logits_all off llama-cpp-python keeps no scores (its `scores` rows are never
        # written, and hold only n_batch rows): read the last output row from the context
        return np.ctypeslib.as_array(self._logits_ith(self.llm.ctx, -1), shape=(self.vocab_size,)).copy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._eval(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._eval([int(token)])


def cpu_reports_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_tile" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def _without_amx(llama_cpp):
    """llama.cpp (built for the host CPU) moves weights into its AMX buffers when the CPU
    reports AMX, and on guests that report AMX without enabling its tile state the first
    matmul dies with SIGILL (`tilezero`; seen on this project's Intel machines). There,
    load without llama.cpp's extra buffer types (AMX, repacking): llama-cpp-python exposes
    no argument for it, so its default model parameters are patched while `Llama` loads."""
    lib = getattr(llama_cpp, "llama_cpp", None)
    if lib is None or not cpu_reports_amx():
        yield
        return
    default = lib.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llamacpp_available() -> bool:
    """llama-cpp-python is optional: the comparison runs when it is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
