"""Parity gate: does an exported model compute what the PyTorch model computes?

Backend-neutral: the gate sees each model only as a *step factory*,

    Step        = Callable[[Sequence[int]], np.ndarray]
    StepFactory = Callable[[], Step]

A step factory starts a fresh sequence (empty KV cache) and returns its `step`. Calling
`step(ids)` appends the tokens `ids` to that sequence and returns their next-token
logits, float32 of shape (len(ids), vocab). The first call is the prefill (the whole
prompt), later calls are single-token decode steps, so a backend's real KV-cache path
is what is checked. `torch_steps(model)` adapts a transformers causal LM; the ONNX
backend passes `OnnxLM(...).steps`, and an ExecuTorch backend passes a factory around
its static-cache method (a step may feed the tokens one by one inside).

    gate = parity_gate(torch_steps(model), candidate, prompts(tokenizer, vocab), quantized=False)
    if not gate.passed: raise ValueError(gate.reason)

fp32 (quantized=False): on each fixed prompt, the logits of the prefill and of each of
32 greedy decode steps differ by less than `atol` (1e-3), and the 32 greedy tokens are
identical. Quantized (quantized=True): logits cannot match, so the gate measures the
perplexity of both models on text held back from calibration (`text_windows`: a file, or a
built-in prose passage) and passes while the candidate's is at most `max_ppl_ratio` times
the reference's: the exporters pass `ExportConfig.ppl_bound()`, by default x1.02 for 8-bit
and x1.10 for 4-bit weights (export.registry.PPL_BOUNDS), a quality bar rather than a
broken-export check. Greedy-token agreement is reported, not gated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

Step = Callable[[Sequence[int]], np.ndarray]
StepFactory = Callable[[], Step]

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village by the sea,",
)

# Plain English prose written for this project (no dataset needed): the perplexity text.
PPL_TEXT = (
    "The harbour town woke slowly. Fishing boats came in with the tide, and the market opened "
    "before the sun had cleared the hills. Merchants set out baskets of bread, cheese and fruit, "
    "while children ran between the stalls. An old clockmaker unlocked his shop on the corner, "
    "as he had done every morning for forty years. He believed that a good clock should be "
    "simple, accurate and easy to repair, and he refused to sell anything he could not fix himself. "
    "In the afternoon, a traveller arrived with a broken pocket watch. The glass was cracked and "
    "the hands had stopped at a quarter past three. The clockmaker opened the case, cleaned each "
    "gear, replaced a worn spring and adjusted the balance wheel until it ticked evenly again. "
    "When the traveller asked what he owed, the old man smiled and said that the watch had been "
    "made by his own teacher, many years ago, and that seeing it again was payment enough. "
    "The traveller thanked him, wound the watch, and walked down to the harbour to wait for the "
    "evening ferry. Above the water, gulls circled in the fading light, and the lamps along the "
    "quay were lit one by one."
)


@dataclass
class ParityResult:
    passed: bool
    kind: str  # "logits" (fp32) or "perplexity" (quantized)
    reason: str  # one line: what was measured against which bound
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def torch_steps(model, num_threads: int | None = 1) -> StepFactory:
    """Step factory for a transformers causal LM (batch 1, DynamicCache).

    Runs with `num_threads` torch threads (None: leave torch's setting). One by default:
    on a shared 2-core machine, OpenMP's spinning threads made these small matmuls
    ~30x slower with 2 threads than with 1.
    """
    import torch
    from transformers import DynamicCache

    def factory() -> Step:
        cache = DynamicCache(config=model.config)
        seen = 0

        def step(ids: Sequence[int]) -> np.ndarray:
            nonlocal seen
            x = torch.tensor([list(ids)], dtype=torch.long)
            pos = torch.arange(seen, seen + x.shape[1]).unsqueeze(0)
            threads = torch.get_num_threads()
            torch.set_num_threads(num_threads or threads)
            try:
                with torch.no_grad():
                    out = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True,
                                attention_mask=torch.ones(1, seen + x.shape[1], dtype=torch.long))
            finally:
                torch.set_num_threads(threads)
            seen += x.shape[1]
            return out.logits[0].float().numpy()

        return step

    return factory


def prompts(tokenizer=None, vocab_size: int | None = None, texts: Sequence[str] = PROMPTS) -> list[list[int]]:
    """Token ids of the fixed prompts; seeded random ids when there is no tokenizer."""
    if tokenizer is not None:
        return [list(tokenizer(t).input_ids) for t in texts]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, 6 + 3 * i).tolist() for i in range(len(texts))]


def ppl_ids(tokenizer=None, vocab_size: int | None = None, max_tokens: int = 256) -> list[int]:
    if tokenizer is not None:
        return list(tokenizer(PPL_TEXT).input_ids)[:max_tokens]
    return np.random.default_rng(1).integers(0, vocab_size, 64).tolist()


def text_windows(tokenizer=None, vocab_size: int | None = None, path=None, tokens: int = 1024,
                 window: int = 256) -> list[list[int]]:
    """Windows of up to `window` tokens, `tokens` in all, of the text file at `path`, else of
    the built-in prose: the quantized gate's text (held back from calibration: the main job
    passes held-out self text) and GPTQ's calibration. A window under 16 tokens is dropped."""
    if path is None or tokenizer is None:
        ids = ppl_ids(tokenizer, vocab_size, tokens)
    else:
        with open(path, encoding="utf-8") as f:
            ids = list(tokenizer(f.read(8 * tokens + 4096)).input_ids)[:tokens]  # ~4 chars a token: more than enough
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 16] or [ids]


def compare_greedy(reference: StepFactory, candidate: StepFactory, prompt: Sequence[int], new_tokens: int = 32) -> dict:
    """Greedy-decode both in lockstep; logits are compared while the token paths agree."""
    ref, cand = reference(), candidate()
    lr, lc = ref(prompt), cand(prompt)
    diff, ref_tokens, cand_tokens = 0.0, [], []
    for i in range(new_tokens):
        if lr.shape != lc.shape:
            raise ValueError(f"candidate logits have shape {lc.shape}, reference {lr.shape}")
        if ref_tokens == cand_tokens:
            diff = max(diff, float(np.abs(lr - lc).max()) if np.isfinite(lc).all() else float("inf"))
        ref_tokens.append(int(lr[-1].argmax()))
        cand_tokens.append(int(lc[-1].argmax()))
        if i + 1 < new_tokens:
            lr, lc = ref([ref_tokens[-1]]), cand([cand_tokens[-1]])
    same = [a == b for a, b in zip(ref_tokens, cand_tokens)]
    return {"max_abs_diff": diff, "tokens_identical": all(same), "first_mismatch": same.index(False) if not all(same) else None,
            "token_agreement": sum(same) / len(same), "reference_tokens": ref_tokens, "candidate_tokens": cand_tokens}


def perplexity(factory: StepFactory, ids: Sequence[int] | Sequence[Sequence[int]]) -> float:
    """exp(mean next-token NLL) over `ids` (one window, or several: each from a fresh cache)."""
    windows = [ids] if len(ids) and np.isscalar(ids[0]) else ids
    nll = []
    for w in windows:
        logits = factory()(w)[:-1].astype(np.float64)  # (T-1, V)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(len(w) - 1), np.asarray(w[1:])])
    return float(np.exp(np.concatenate(nll).mean()))


def parity_gate(reference: StepFactory, candidate: StepFactory, prompt_ids: Sequence[Sequence[int]], *,
                quantized: bool = False, text_ids: Sequence[int] | None = None, new_tokens: int = 32,
                atol: float = 1e-3, max_ppl_ratio: float = 1.10) -> ParityResult:
    """Run the gate described in the module docstring. Never raises on a mismatch: the
    caller decides what a failed gate means (the export backends keep the artifact out of OUT)."""
    runs = [compare_greedy(reference, candidate, p, new_tokens) for p in prompt_ids]
    agreement = float(np.mean([r["token_agreement"] for r in runs]))
    if not quantized:
        diff = max(r["max_abs_diff"] for r in runs)
        identical = all(r["tokens_identical"] for r in runs)
        passed = diff < atol and identical
        reason = (f"max |logits diff| {diff:.3g} {'<' if diff < atol else '>='} {atol:g}; "
                  f"{new_tokens} greedy tokens {'identical' if identical else 'differ'} on {len(runs)} prompts")
        per_prompt = [{k: r[k] for k in ("max_abs_diff", "tokens_identical", "first_mismatch")} for r in runs]
        return ParityResult(passed, "logits", reason, {"max_abs_diff": diff, "tokens_identical": identical,
                                                       "token_agreement": agreement, "atol": atol, "prompts": per_prompt})
    if text_ids is None:
        raise ValueError("a quantized parity gate needs text_ids for perplexity")
    ppl_ref, ppl_cand = perplexity(reference, text_ids), perplexity(candidate, text_ids)
    ratio = ppl_cand / ppl_ref
    passed = bool(np.isfinite(ratio)) and ratio <= max_ppl_ratio
    tokens = len(text_ids) if np.isscalar(text_ids[0]) else sum(len(w) for w in text_ids)
    reason = (f"perplexity {ppl_ref:.3f} -> {ppl_cand:.3f} (x{ratio:.3f}, bound x{max_ppl_ratio:g}) on {tokens} tokens; "
              f"greedy token agreement {agreement:.2f}")
    return ParityResult(passed, "perplexity", reason, {
        "ppl_reference": ppl_ref, "ppl_candidate": ppl_cand, "ppl_ratio": ratio, "ppl_change": ppl_cand - ppl_ref,
        "max_ppl_ratio": max_ppl_ratio, "text_tokens": tokens, "token_agreement": agreement,
        "max_abs_diff": max(r["max_abs_diff"] for r in runs)})


class GateFailed(ValueError):
    """The parity gate rejected an export: it stays at `stage`; `report` holds what was measured."""

    def __init__(self, message: str, stage, report: dict):
        super().__init__(message)
        self.stage, self.report = stage, report


def record_gate(gate: ParityResult, report: dict, seconds: float, stage, out) -> None:
    """Put the gate's result in `report`; raise GateFailed (naming where the export was kept
    and that nothing was written to `out`) if it did not pass."""
    report["parity"] = gate.to_dict()
    report["seconds"]["parity"] = round(seconds, 1)
    if not gate.passed:
        raise GateFailed(f"parity gate failed: {gate.reason}; export kept at {stage}, nothing written to {out}",
                         stage, report)
