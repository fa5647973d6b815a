"""`foldgpt chat OUT.pte`: the Android demo's loop, run on the host.

The app (android_demo/) does, per message: wrap the text in the prompt template,
clear the KV cache, prefill, stream greedy tokens until an EOS id from the program's
`get_eos_ids` or the token cap, then show tokens/s, model size and resident memory.
`chat` runs that loop on ExecuTorch's own C++ LLM runner, the one Android's `LlmModule`
wraps (export/llm_runner.py), so a .pte that chats here is one the app can load;
`chat_turn` runs it on this project's Python twin (PteLM), which also gives token ids. The template is read from the same file the app's
Kotlin constant is checked against (android_demo/prompt_template.txt).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "android_demo" / "prompt_template.txt"


def prompt_template() -> str:
    if not TEMPLATE_FILE.is_file():
        raise FileNotFoundError(f"{TEMPLATE_FILE}: the prompt template shared with the Android app is missing")
    return TEMPLATE_FILE.read_text()


def render(prompt: str, template: str | None = None) -> str:
    """Plain substitution (not str.format: chat text may contain braces)."""
    return (template if template is not None else prompt_template()).replace("{prompt}", prompt)


@dataclass
class ChatTurn:
    text: str
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_tokens_per_s: float
    stopped_on_eos: bool
    tokens: list[int] | None = None  # the ids, when the runtime gives them (PteLM)


def chat_turn(lm, prompt: str, max_new_tokens: int = 128, on_text: Callable[[str], None] | None = None) -> ChatTurn:
    """One message, as the app sends it: template, fresh cache, greedy stream, stop on EOS."""
    ids = lm.encode(render(prompt))
    if len(ids) >= lm.max_context:
        raise ValueError(f"the prompt is {len(ids)} tokens; the program's context is {lm.max_context}")
    stream, _ = lm.stream_text(on_text) if on_text is not None else (None, None)
    stats: dict = {}
    new = lm.generate(ids, max_new_tokens, on_token=stream, stats=stats)
    decode_s = stats["decode_s"]
    return ChatTurn(lm.decode(new), len(ids), len(new), stats["prefill_s"], len(new) / decode_s if decode_s > 0 else 0.0,
                    stats["stopped_on_eos"], new)


def runner_turn(lm, prompt: str, max_new_tokens: int = 128, on_text: Callable[[str], None] | None = None) -> ChatTurn:
    """One message on ExecuTorch's LLM runner (RunnerLM): the app's own code path. It stops on
    the program's EOS ids or the cap, so fewer tokens than the cap means EOS (or a full context)."""
    text, stats = lm.generate(render(prompt), max_new_tokens, on_text=on_text)
    n, decode_s = stats["generated_tokens"], stats["decode_s"]
    return ChatTurn(text, stats["prompt_tokens"], n, stats["prefill_s"],
                    stats["decode_tokens"] / decode_s if decode_s > 0 else 0.0, n < max_new_tokens)


def chat(pte: str | Path, prompts: Iterable[str] | None = None, max_new_tokens: int = 128, out=None) -> list[ChatTurn]:
    """Chat with `pte`: over `prompts`, or interactively from stdin when None."""
    import psutil

    out = out or sys.stdout

    from export.llm_runner import RunnerLM

    pte = Path(pte)
    lm = RunnerLM(pte)
    size = sum(f.stat().st_size for f in pte.parent.glob(pte.stem + ".pt*"))
    turns = []
    source = prompts if prompts is not None else _stdin_prompts(out)
    for prompt in source:
        turn = runner_turn(lm, prompt, max_new_tokens, on_text=lambda t: print(t, end="", flush=True, file=out))
        rss = psutil.Process().memory_info().rss
        print(f"\n[{turn.generated_tokens} tokens, {turn.decode_tokens_per_s:.1f} tok/s, prefill {turn.prefill_s * 1000:.0f} ms, "
              f"model {size / 2**20:.0f} MiB, resident {rss / 2**20:.0f} MiB{', EOS' if turn.stopped_on_eos else ''}]",
              file=out)
        turns.append(turn)
    return turns


def _stdin_prompts(out):
    while True:
        print("> ", end="", flush=True, file=out)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line.strip()
