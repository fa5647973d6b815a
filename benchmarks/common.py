"""What the quality benchmarks share: paths, the dev-set evaluation, one dense reference,
held-out self text and paired accuracy differences. Scripts in benchmarks/ import this
module (run as scripts, benchmarks/ is on the path) instead of each other.

The dev sets in ../shared/data/dev are for measurement only: nothing is trained,
calibrated or selected on them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from compress.data import held_out_text

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "dev"
WIKI = DEV / "wikitext2_valid" / "wiki.valid.raw"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"  # run dirs and caches, not committed
HELD_OUT_TOKENS = 8192


def require_dev() -> None:
    if not DEV.is_dir():
        raise SystemExit(f"{DEV} not found: this benchmark needs the development sets beside the repository")


def held_out_file(tokens: int = HELD_OUT_TOKENS) -> Path:
    """compress.data.held_out_text as a file for EvalConfig.ppl_files (the dense model loads only to make it)."""
    file = WORK / f"self_held_out_{tokens}.txt"
    if not file.is_file():
        from compress.load import load_model

        WORK.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(held_out_text(*load_model("default"), tokens))
        tmp.replace(file)
    return file


def eval_config(limit: int | None, ppl_tokens: int):
    """Perplexity on WikiText-2 and held-out self text; three zero-shot tasks, `limit` items each."""
    from compress.evaluate import EvalConfig

    return EvalConfig(
        ppl_files={"wikitext2": str(WIKI), "self_held_out": str(held_out_file())},
        ppl_max_tokens=ppl_tokens,
        tasks={
            "arc_challenge": str(DEV / "arc_challenge" / "ARC-Challenge-Test.jsonl"),
            "openbookqa": str(DEV / "openbookqa" / "test.jsonl"),
            "arc_easy_dev": str(DEV / "arc_easy_dev" / "ARC-Easy-Dev.jsonl"),
        },
        limit=limit,
    )


def dense_reference(eval_cfg) -> dict:
    """The dense model's evaluate() result, measured once per evaluation config and reused by every row."""
    from compress.evaluate import evaluate
    from compress.load import load_model

    file = WORK / "dense_eval.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        if saved["config"] == json.loads(json.dumps(asdict(eval_cfg))):
            return saved
    model, tok = load_model("default")
    result = evaluate(model, tok, eval_cfg)
    WORK.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, default=str))
    return result


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """acc_norm(a) - acc_norm(b) on the same items (evaluate()'s per-task dicts), and its paired standard error."""
    if a["ids"] != b["ids"]:
        raise SystemExit("two rows were scored on different items: rerun with the same --limit")
    d = [int(x) - int(y) for x, y in zip(a["correct"], b["correct"])]
    mean = sum(d) / len(d)
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def write_table(name: str, payload: dict, title: str, intro: str, columns: dict[str, str], rows: list[dict]) -> None:
    """results/NAME.json (`payload`) and results/NAME.md: a title, one paragraph and one table
    whose columns map a header to a row key; prints the Markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    lines = [f"# {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in columns.values()) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

