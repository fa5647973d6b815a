"""ExecuTorch's own LLM runner on an exported .pte: the C++ `TextLLMRunner` that Android's
`LlmModule` wraps, from the executorch wheel.

    lm = RunnerLM("out/model.pte")        # tokenizer.json (and model.ptd) beside it
    text, stats = lm.generate("The capital of France is", 32, on_text=print)

`PteLM` (export/executorch_runtime.py) imitates this loop in Python for parity gates and
memory probes; this is the app's code, so `foldgpt chat` runs on it and the bench reports its
own prefill and decode rates. The runner reads the program's metadata methods and the
tokenizer; it needs the kernel libraries an Android LLM build links (the LLM custom ops and
the quantized kernels), which `runtime()` registers before anything loads. A program that
needs an operator none of them provides is refused with that operator's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from export.executorch_runtime import TOKENIZER_FILE, data_file, runtime

# kernel libraries beyond the portable ops, by operator namespace (android_demo/README.md)
LIBRARIES = {"llama": "LLM custom ops (extension/llm/custom_ops)",
             "quantized_decomposed": "quantized kernels (kernels/quantized)"}


def operators(program) -> set[str]:
    """name.overload of every operator a (deserialized or just lowered) program calls."""
    return {f"{op.name}.{op.overload}" if op.overload else op.name
            for plan in program.execution_plan for op in plan.operators}


def kernel_libraries(program) -> list[str]:
    """What an app must link to run `program`: the delegates it uses and the kernel libraries
    its operators live in (export reports carry this as `link`)."""
    delegates = {f"{d.id} backend" for plan in program.execution_plan for d in plan.delegates}
    namespaces = {op.split("::")[0] for op in operators(program) if "::" in op}
    return sorted(delegates | {LIBRARIES[n] for n in namespaces if n in LIBRARIES})


def missing_operators(pte: Path) -> list[str]:
    """Operators the program calls that no registered kernel library provides (reads the whole file)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    have = set(runtime()._get_operator_names())
    return sorted(op for op in operators(deserialize_pte_binary(Path(pte).read_bytes()).program) if op not in have)


class RunnerLM:
    """One TextLLMRunner; `generate` is greedy (temperature 0), echo off, from a fresh cache."""

    def __init__(self, pte, tokenizer=None):
        self.pte = Path(pte)
        if not self.pte.is_file():
            raise FileNotFoundError(f"{self.pte}: no such .pte file")
        self.tokenizer_path = Path(tokenizer) if tokenizer else self.pte.parent / TOKENIZER_FILE
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"{self.tokenizer_path}: no tokenizer for {self.pte.name}")
        runtime()
        from executorch.extension.llm.runner import TextLLMRunner

        ptd = data_file(self.pte)
        try:
            self.runner = TextLLMRunner(str(self.pte), str(self.tokenizer_path), str(ptd) if ptd else None)
        except RuntimeError as e:
            raise ValueError(f"{self.pte}: the LLM runner cannot load it ({e})") from None

    def generate(self, prompt: str, max_new_tokens: int, on_text: Callable[[str], None] | None = None
                 ) -> tuple[str, dict]:
        """The generated text and the runner's own stats: prompt_tokens, generated_tokens (all
        emitted), prefill_s (to the first token), decode_tokens and decode_s (the tokens after it)."""
        from executorch.extension.llm.runner import GenerationConfig

        pieces, stats = [], {}

        def on_piece(piece: str) -> None:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

        def on_stats(s) -> None:
            # the runner counts the tokens after the first (which the prefill produced) as generated
            stats.update(prompt_tokens=s.num_prompt_tokens, decode_tokens=s.num_generated_tokens,
                         prefill_s=(s.prompt_eval_end_ms - s.inference_start_ms) / 1e3,
                         decode_s=(s.inference_end_ms - s.prompt_eval_end_ms) / 1e3)

        cfg = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0)
        self.runner.reset()
        try:
            self.runner.generate(prompt, cfg, on_piece, on_stats)
        except RuntimeError as e:
            missing = missing_operators(self.pte)
            why = f"it needs operators no linked kernel library provides: {', '.join(missing)}" if missing else e
            raise ValueError(f"{self.pte}: the LLM runner failed ({why})") from None
        stats["generated_tokens"] = len(pieces)
        return "".join(pieces), stats
