"""Measure a model, dense or folded: windowed perplexity on text files, zero-shot
multiple choice through lm-evaluation-harness, and LLM-Streamline's *stability* of the
compressed model's answers against the dense model's.

These are measurements only: nothing here fits, calibrates or tunes anything.

    from compress.evaluate import EvalConfig, evaluate
    cfg = EvalConfig(ppl_files={"wikitext2": "wiki.valid.raw"}, tasks={"arc_easy": "ARC-Easy-Dev.jsonl"}, limit=300)
    dense = evaluate(model, tok, cfg)
    folded = evaluate(folded_model, tok, cfg, reference=dense)   # adds "stability" per task

Multiple-choice files use the AI2 ARC schema (`{"id", "question": {"stem", "choices":
[{"text", "label"}]}, "answerKey"}`; OpenBookQA ships in it too). Labels may be A-D or
1-4 and an item may have 3 to 5 choices, so the answer is found through each item's own
label list. Each item is scored as lm-eval's `arc_easy` task scores it: prompt
"Question: {stem}\\nAnswer:", each choice " {text}" as the continuation, `acc` from the
summed log-likelihood and `acc_norm` from the log-likelihood per character.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASK_NAME = re.compile(r"[A-Za-z0-9_]+")  # becomes an lm-eval task name and a file name


@dataclass
class EvalConfig:
    ppl_files: dict[str, str] = field(default_factory=dict)  # name -> text file
    ppl_seq_len: int = 512
    ppl_stride: int = 256
    ppl_max_tokens: int | None = None  # read at most this many tokens of each file
    tasks: dict[str, str] = field(default_factory=dict)  # name -> ARC-schema .jsonl
    limit: int | None = None  # items per task: a seeded random subset, kept in file order
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self):
        for name in ("ppl_seq_len", "ppl_stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("ppl_max_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.ppl_stride > self.ppl_seq_len:
            raise ValueError(
                f"ppl_stride ({self.ppl_stride}) must not exceed ppl_seq_len ({self.ppl_seq_len}): "
                "the tokens between two windows would never be scored"
            )
        for name in self.tasks:
            if not TASK_NAME.fullmatch(name):
                raise ValueError(f"tasks: name {name!r} must be letters, digits and underscores")
        self.ppl_files = {name: _existing_file("ppl_files", name, p) for name, p in self.ppl_files.items()}
        self.tasks = {name: _existing_file("tasks", name, p) for name, p in self.tasks.items()}


def _existing_file(field_name: str, name: str, path: str | os.PathLike) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{field_name}[{name!r}]: {path}: no such file")
    return str(path.resolve())


# ----------------------------------------------------------------------------- perplexity


@torch.inference_mode()
def perplexity(
    model: nn.Module, tokenizer, text: str, seq_len: int = 512, stride: int = 256, max_tokens: int | None = None
) -> float:
    """Strided-window perplexity, as in Hugging Face's "Perplexity of fixed-length models".

    Windows of `seq_len` tokens start every `stride` tokens; each window scores only the
    tokens no earlier window scored, so every token but the first is scored exactly once,
    with at least `seq_len - stride` tokens of context (fewer only near the start). With
    `stride == seq_len` the windows are disjoint and each window's first token has no
    context, so it is not scored (as in the guide). The text is tokenized with the
    tokenizer's defaults, so models that expect a BOS token get one.

    Raises ValueError for a bad window or a text of fewer than two tokens.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's max_position_embeddings ({max_pos})")
    ids = tokenizer(text, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids)
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, the text has {n}")
    device = next(model.parameters()).device
    ids = torch.tensor(ids, device=device)

    nll_sum, n_scored, prev_end = 0.0, 0, 0
    begins = range(0, max(n - seq_len, 0) + stride, stride)  # the last window is the first to reach token n-1
    for begin in tqdm(begins, desc="perplexity", unit="window", leave=False):
        end = min(begin + seq_len, n)
        first = max(prev_end, begin + 1)  # first target not yet scored; position `begin` has no context
        if end > first:
            k = end - first  # targets in this window
            # logits_to_keep: only the last k+1 positions reach lm_head; the last one predicts past `end`.
            logits = model(ids[None, begin:end], use_cache=False, logits_to_keep=k + 1).logits[0, :-1]  # (k, V)
            nll_sum += F.cross_entropy(logits.float(), ids[first:end], reduction="sum").item()
            n_scored += k
        prev_end = end
    return math.exp(nll_sum / n_scored)


# ----------------------------------------------------------------------------- zero-shot


def load_arc(path: str | os.PathLike) -> list[dict]:
    """Read an ARC-schema .jsonl into `{"id", "question", "choices", "gold"}` docs, file order.

    `gold` is the index of `answerKey` in the item's own label list (labels are A-D for most
    items, 1-4 for some). Raises ValueError naming file and line for a malformed item.
    """
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                item = json.loads(line)
                question = item["question"]
                labels = [str(c["label"]).strip() for c in question["choices"]]
                texts = [c["text"] for c in question["choices"]]
                stem, key = question["stem"], str(item["answerKey"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: not an ARC-schema item ({type(e).__name__}: {e})") from None
            if len(texts) < 2 or len(set(labels)) != len(labels):
                raise ValueError(f"{where}: needs at least 2 choices with distinct labels, got {labels}")
            if key not in labels:
                raise ValueError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
            docs.append({"id": str(item.get("id", line_no)), "question": stem, "choices": texts, "gold": labels.index(key)})
    if not docs:
        raise ValueError(f"{path}: no items")
    return docs


def _subset(docs: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random subset, kept in file order so results line up across models."""
    if limit is None or limit >= len(docs):
        return docs
    keep = sorted(random.Random(seed).sample(range(len(docs)), limit))
    return [docs[i] for i in keep]


def _task_config(name: str, data_file: Path, cache_dir: Path) -> dict:
    """An lm-eval task reading one local jsonl; the same prompt and metrics as lm-eval's arc_easy."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",  # a field name: used as is, never re-parsed
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def zero_shot(
    model: nn.Module, tokenizer, tasks: dict[str, str], limit: int | None = None, seed: int = 0, batch_size: int = 16
) -> dict:
    """Zero-shot multiple choice through lm-evaluation-harness, on local ARC-schema files.

    Returns, per task: `acc`, `acc_norm`, `n`, and per item in file order `ids`,
    `correct` (acc_norm-based) and `choice_nll` (each choice's mean negative log-likelihood
    per token, the dense model's confidence that `stability` weights by).
    Task YAMLs and normalized data are written to a temporary directory; nothing is
    downloaded and no global random state is touched.
    """
    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    with tempfile.TemporaryDirectory(prefix="foldgpt-eval-") as tmp:
        tmp = Path(tmp)
        docs = {}
        for name, path in tasks.items():
            if not TASK_NAME.fullmatch(name):
                raise ValueError(f"task name {name!r} must be letters, digits and underscores")
            docs[name] = _subset(load_arc(path), limit, seed)
            data_file = tmp / f"{name}.jsonl"
            data_file.write_text("".join(json.dumps(d) + "\n" for d in docs[name]), encoding="utf-8")
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(_task_config(name, data_file, tmp / "cache")))

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
        )

    results = {}
    for name in tasks:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        if [s["doc"]["id"] for s in samples] != [d["id"] for d in docs[name]]:
            raise RuntimeError(f"{name}: lm-eval returned other items than were written")
        choice_nll = []
        for s in samples:
            lls = [resp[0] for resp in s["filtered_resps"]]
            n_tok = [len(lm._encode_pair(ctx, cont)[1]) for ctx, cont in s["arguments"]]  # lm-eval's own split
            choice_nll.append([-ll / k for ll, k in zip(lls, n_tok)])
        metrics = out["results"][name]
        results[name] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": float(metrics["acc_norm,none"]),
            "n": len(samples),
            "ids": [s["doc"]["id"] for s in samples],
            "correct": [bool(s["acc_norm"]) for s in samples],
            "choice_nll": choice_nll,
        }
    return results


# ----------------------------------------------------------------------------- stability


def stability(dense_correct: list[bool], compressed_correct: list[bool], dense_choice_nll: list[list[float]]) -> float:
    """LLM-Streamline's stability (Chen et al., "Streamlining Redundant Layers to Compress
    Large Language Models", ICLR 2025, arXiv:2403.19135): the weighted share of items on
    which the compressed model is right exactly when the dense model is right.

        sigma_i   = std over item i's choices of the dense model's per-choice loss
        w_i       = exp(sigma_i) / sum_j exp(sigma_j)
        stability = sum_i w_i * [dense_correct_i == compressed_correct_i]

    Items the dense model separates its choices sharply on (large sigma) weigh more, so a
    compressed model cannot score well by matching the dense model's near-guesses.

    Source: the authors' `calculate_stability.py` (repo RUCKBReasoning/LLM-Streamline;
    read from a fork, wangziyannb/LLM-Streamline), since the paper's own section could not
    be retrieved here. There the per-choice loss is OpenCompass's "PPL" (mean token
    cross-entropy, population std via np.std); here it is `choice_nll` from `zero_shot`
    (mean NLL per token of each choice's continuation). That script sums
    `weights[i] for i in range(matches)`, i.e. the first `matches` weights rather than the
    weights of the matching items; this function sums the matching items' weights, which
    is what the per-item weighting is for.

    Raises ValueError if the three lists differ in length or are empty.
    """
    n = len(dense_correct)
    if n == 0 or len(compressed_correct) != n or len(dense_choice_nll) != n:
        raise ValueError(
            f"stability needs equally long, non-empty lists: dense_correct {n}, "
            f"compressed_correct {len(compressed_correct)}, dense_choice_nll {len(dense_choice_nll)}"
        )
    sigma = [statistics.pstdev(row) for row in dense_choice_nll]  # population std, as np.std
    top = max(sigma)
    weights = [math.exp(s - top) for s in sigma]  # softmax numerator, shifted against overflow
    agree = sum(w for w, a, b in zip(weights, dense_correct, compressed_correct) if bool(a) == bool(b))
    return agree / sum(weights)


# ----------------------------------------------------------------------------- evaluate


def evaluate(model: nn.Module, tokenizer, cfg: EvalConfig, reference: dict | None = None) -> dict:
    """Perplexity on every `cfg.ppl_files` entry and zero-shot accuracy on every `cfg.tasks`
    entry; with `reference` (the dense model's `evaluate` result) also stability per task.

    Returns a JSON-serialisable dict: {"perplexity": {name: ppl}, "tasks": {name: {...}},
    "config": asdict(cfg)}. Raises ValueError if `reference` lacks a task or was measured
    on other items (a different file, limit or seed).
    """
    result = {"perplexity": {}, "tasks": {}, "config": asdict(cfg)}
    for name, path in cfg.ppl_files.items():
        text = Path(path).read_text(encoding="utf-8")
        result["perplexity"][name] = perplexity(model, tokenizer, text, cfg.ppl_seq_len, cfg.ppl_stride, cfg.ppl_max_tokens)
        logger.info("perplexity %s: %.3f", name, result["perplexity"][name])
    result["tasks"] = zero_shot(model, tokenizer, cfg.tasks, cfg.limit, cfg.seed, cfg.batch_size)
    if reference is not None:
        for name, res in result["tasks"].items():
            ref = reference.get("tasks", {}).get(name)
            if ref is None:
                raise ValueError(f"reference has no result for task {name!r}")
            if ref["ids"] != res["ids"]:
                raise ValueError(f"reference for task {name!r} was measured on other items (same file, limit and seed?)")
            res["stability"] = stability(ref["correct"], res["correct"], ref["choice_nll"])
    return result
