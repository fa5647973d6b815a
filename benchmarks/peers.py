"""FoldGPT beside the peer layer-pruning methods on the default model, at FoldGPT's budgets.

    python benchmarks/peers.py [--heal-minutes 20] [--methods shortgpt,streamline,layerchop,sleb]
                               [--points p15,p25,p36] [--training-free-as-published]
    python benchmarks/peers.py --points p25 --methods shortgpt,shortgpt-nocure   # both in one table

Every method removes the same share of total parameters as benchmarks/fold_quality.py's
points (whole blocks of 3.54M of 134.5M parameters: 6, 10 and 14 blocks), on the same
self-generated calibration and healing text, with the same healing budget in minutes,
and is measured by the same evaluation (`eval_config` and `dense_reference` are imported
from fold_quality.py). How each method spends the budget:

    shortgpt, sleb   training-free in their papers; here they get the default cure
                     (FoldGPT's: fine-tune + hidden-state distillation) for the same
                     minutes, or none with --training-free-as-published (for one
                     method: list it as shortgpt-nocure / sleb-nocure)
    streamline       the budget trains its replacement block (MSE), nothing else
    layerchop        continued pretraining of every weight, LM loss only

FoldGPT's own points are read from benchmarks/results/fold_quality.json (run that
benchmark first to have them in the table and the plot). Each (method, point) is a
`compress` run in its own work dir under benchmarks/work/peers/ (not committed), so an
interrupted benchmark resumes where it stopped. At the end every model on disk decodes
beside dense in one process (torch fp32, alternating rounds: `--decode-rounds`), for the
table's speed column. Writes benchmarks/results/peers.{json,md} and peers_accuracy.png. SLEB costs about (30 + 29 + ... ) perplexity passes over
--sleb-sequences calibration sequences per point: the slowest method here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from fold_quality import (DEFAULT_POINTS, DEV, HEAL_SEQUENCES, RESULTS, WORK, check_budget, dense_reference,
                          eval_config, parse_point, row, table_head)
from fold_quality import point_dir as fold_point_dir

PEER_WORK = WORK / "peers"
PEERS = ("shortgpt", "streamline", "layerchop", "sleb")
TRAINING_FREE = ("shortgpt", "sleb")
NO_CURE = "-nocure"
# name -> whole blocks removed; fold_quality.py's FoldGPT points remove as many blocks' worth
# of unique parameters (e.g. p25: 3 blocks removed, 27 depths over 20 blocks -> 10 fewer)
POINTS = {"p15": 6, "p25": 10, "p36": 14}


def peer_config(method: str, blocks: int, heal_minutes: float, sleb_sequences: int):
    """The method's config removing `blocks` whole blocks."""
    from compress.layerchop import LayerChopConfig
    from compress.shortgpt import ShortGPTConfig
    from compress.sleb import SLEBConfig
    from compress.streamline import StreamlineConfig

    return {
        "shortgpt": lambda: ShortGPTConfig(num_remove=blocks),
        # a span of blocks + 1 replaced by one block, trained for the whole budget
        "streamline": lambda: StreamlineConfig(span=blocks + 1, train_steps=None, train_minutes=heal_minutes),
        "layerchop": lambda: LayerChopConfig(num_remove=blocks),
        "sleb": lambda: SLEBConfig(num_remove=blocks, max_sequences=sleb_sequences),
    }[method]()


def point_dir(method: str, name: str, args) -> tuple[str, bool, Path]:
    """(method without -nocure, whether it runs as published without a cure, its output dir)."""
    as_published = method.endswith(NO_CURE) or (args.training_free_as_published and method in TRAINING_FREE)
    method = method.removesuffix(NO_CURE)
    return method, as_published, PEER_WORK / f"{method}{'-nocure' if as_published else ''}-{name}"


def run_point(method: str, name: str, args, eval_cfg, reference: dict) -> dict:
    from compress.data import DataConfig
    from compress.methods import heal_config
    from compress.recipe import CompressConfig, compress

    blocks = POINTS[name]
    method, as_published, out = point_dir(method, name, args)
    heal = None if as_published or method == "streamline" else heal_config(
        method, {"max_minutes": args.heal_minutes}, teacher_cache_mb=args.teacher_cache_mb)
    # Streamline trains on the calibration set: give it as many sequences as the others heal on
    calib = DataConfig(num_sequences=max(32, args.heal_sequences) if method == "streamline" else 32, seq_len=256)
    if (out / "eval.json").is_file():
        check_budget(out, None if as_published else args.heal_minutes)
    else:
        compress(CompressConfig(
            out=str(out), model="default", method=method, calib=calib,
            peer=peer_config(method, blocks, args.heal_minutes, args.sleb_sequences),
            heal_data=DataConfig(num_sequences=args.heal_sequences, seq_len=256, seed=1),
            heal=heal, eval=eval_cfg, eval_reference=reference, resume=True,
        ))
    config = json.loads((out / "config.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    prov = config["fold"]["provenance"]
    report = prov["method_report"]
    return {"method": method if not as_published else f"{method} (no cure)", "name": name, "blocks": blocks,
            "removed_blocks": prov["removed_blocks"], "params": prov["params"], "cure": prov["cure"],
            "training_s": (report.get("training") or {}).get("seconds"),
            "report": {k: v for k, v in report.items() if k not in ("training", "params")},
            "dense": ev["dense"], "folded": ev["folded"], "bytes": (out / "model.safetensors").stat().st_size,
            "dir": str(out)}


def foldgpt_points() -> list[dict]:
    """FoldGPT's rows from fold_quality.json, in this benchmark's shape (empty if not run)."""
    file = RESULTS / "fold_quality.json"
    if not file.is_file():
        return []

    def method(p: dict) -> str:  # the benchmark's own points are "foldgpt"; other splits say theirs
        if p["name"] in DEFAULT_POINTS:
            return "foldgpt"
        pairs = len(p["schedule"]) - p["unique_blocks"]
        variant = parse_point(p["name"]).variant()
        return f"foldgpt {len(p['removed_blocks'])} removed + {pairs} pairs" + (f" ({variant})" if variant else "")

    return [{"method": method(p),
             "name": re.match(r"p\d+", p["name"]).group(0), "removed_blocks": p["removed_blocks"], "params": p["params"],
             "cure": p["cure"], "training_s": None, "report": {"schedule": p["schedule"], "gates": p.get("gate_setting")},
             "dense": p["dense"], "folded": p["folded"], "bytes": p["bytes"],
             "dir": str(fold_point_dir(p["name"]))} for p in json.loads(file.read_text())]


def summary(m: dict) -> dict:
    """An evaluate() result's headline numbers, to tell two references apart."""
    return {"ppl": m["perplexity"], **{t: (v["n"], v["acc_norm"]) for t, v in m["tasks"].items()}}


def label(r: dict) -> str:
    return f"{r['name']} {r['method']}"


def decode_speeds(rows: list[dict], rounds: int, tokens: int) -> dict:
    """Decode speed of every row's model beside dense with the runtime harness: torch fp32,
    all models in one pinned process, alternating rounds (runtime_tests.latency.decode_rounds);
    a row's speed is its per-round median ratio to dense, so load from other tenants cancels.
    Fills r["decode"]; returns the harness record (rows whose model is not on disk are left out)."""
    from compress.load import save_dense
    from runtime_tests.emulate import Isolation, run_isolated
    from runtime_tests.latency import PRELOAD, decode_summary, round_ratio

    dense = save_dense("default", WORK / "dense")
    present = [r for r in rows if (Path(r["dir"]) / "model.safetensors").is_file()]
    vocab = json.loads((dense / "config.json").read_text())["vocab_size"]
    cores = sorted(os.sched_getaffinity(0))
    record = run_isolated("runtime_tests.latency:decode_rounds_job",
                          {"entries": [["dense", "torch", str(dense)]] + [[label(r), "torch", r["dir"]] for r in present],
                           "threads": len(cores), "rounds": rounds, "decode_tokens": tokens, "vocab": vocab},
                          Isolation(cores=cores, timeout_s=3600), preload=PRELOAD["torch"])
    if record["status"] != "ok":
        print(f"decode speeds not measured: {record.get('message')}", flush=True)
        return record
    ms = record["result"]["ms_per_token"]
    for r in present:
        r["decode"] = {**decode_summary(ms[label(r)]), "vs_dense": round_ratio(ms["dense"], ms[label(r)])}
    record["dense"] = decode_summary(ms["dense"])
    return record


def write_report(rows: list[dict], command: str, decode: dict | None = None, missing: list[str] = ()) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps({"command": command, "decode": decode, "rows": rows,
                                                    "not_run": list(missing)}, indent=1, default=str))
    dense = rows[0]["dense"]
    for r in rows:  # every ratio is taken against this one dense result
        if summary(r["dense"]) != summary(dense):
            raise SystemExit(f"{label(r)} was evaluated against another dense result (other --limit or --ppl-tokens?): "
                             f"{summary(r['dense'])} vs {summary(dense)}")
    speed = "decode tok/s (x dense)"
    dense_speed = f"{decode['dense']['decode_tokens_per_s']['p50']:.1f}" if decode and "dense" in decode else "-"

    def speed_cell(r: dict) -> str:
        d = r.get("decode")
        return f"{d['decode_tokens_per_s']['p50']:.1f} ({d['vs_dense']:.2f}x)" if d else "-"

    lines = [
        "# FoldGPT and peer layer-pruning methods on SmolLM2-135M-Instruct",
        "",
        f"Reproduce: `{command}` (FoldGPT rows: benchmarks/fold_quality.py).",
        "Same parameter budgets, self-generated calibration/healing text, healing minutes and evaluation as fold_quality.",
        "Decode: torch fp32 on this machine's cores, every model beside dense in one process, alternating rounds;",
        "in brackets the median over rounds of the speed ratio to dense (runtime_tests.latency.decode_rounds).",
    ] + table_head(dense, rows[0]["params"]["source_unique"], "training", {speed: dense_speed})
    for point in POINTS:
        for r in (r for r in rows if r["name"] == point):
            seconds = (r["cure"] or {}).get("seconds") or r["training_s"]
            name = f"{label(r)}: -{r['params']['unique_reduction']:.0%} unique"
            lines.append(row(name, r["params"]["unique"], r["bytes"], r["folded"], dense, seconds, (speed_cell(r),)))
    lines += standing(rows)
    if missing:
        lines += ["", f"Not run yet (so not in the table): {', '.join(missing)}."]
    lines += ["", "Removed source blocks (and each method's choice):", ""]
    for r in rows:
        detail = {k: r["report"][k] for k in ("span", "order", "placement", "schedule", "gates") if r["report"].get(k)}
        if r["cure"]:  # a budget in minutes: steps vary with depth and with the machine's load
            detail["cure steps"] = r["cure"]["steps"]
        lines.append(f"- {r['name']} {r['method']}: removed {r['removed_blocks']} {json.dumps(detail)}")
    (RESULTS / "peers.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """acc_norm(a) - acc_norm(b) on the same items, and its paired standard error."""
    if a["ids"] != b["ids"]:
        raise SystemExit("two rows were scored on different items: rerun with the same --limit")
    d = [int(x) - int(y) for x, y in zip(a["correct"], b["correct"])]
    mean = sum(d) / len(d)
    return mean, (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def standing(rows: list[dict]) -> list[str]:
    """Issue 7's question in words: at each size, which peers beat FoldGPT's default point,
    on perplexity and on each task (paired over the same items; 'clear' beyond 2 SE)."""
    lines = ["", "Where FoldGPT stands (its default point against every peer run at the same size; accuracy",
             "differences are paired over the same items, +- one standard error, 'clear' when beyond two):", ""]
    for point in POINTS:
        fold = next((r for r in rows if r["name"] == point and r["method"] == "foldgpt"), None)
        others = [r for r in rows if r["name"] == point and not r["method"].startswith("foldgpt")]
        if fold is None or not others:
            continue
        ppl = {label(r): r["folded"]["perplexity"]["wikitext2"] for r in [fold, *others]}
        better = [f"{r['method']} {ppl[label(r)]:.1f}" for r in others if ppl[label(r)] < ppl[label(fold)]]
        parts = [f"wikitext2 ppl {ppl[label(fold)]:.1f}, " + (f"beaten (lower) by {', '.join(better)}" if better else "no peer lower")]
        for task, mine in fold["folded"]["tasks"].items():
            diffs = [(r["method"], *paired_difference(r["folded"]["tasks"][task], mine)) for r in others]
            ahead = [f"{m} +{d * 100:.1f} +- {se * 100:.1f} pts{' (clear)' if d > 2 * se else ''}" for m, d, se in diffs if d > 0]
            parts.append(f"{task} {mine['acc_norm']:.3f}, " + (f"beaten by {', '.join(ahead)}" if ahead else "no peer higher"))
        lines.append(f"- {point}: " + "; ".join(parts))
    return lines


def plot(rows: list[dict]) -> None:
    """acc_norm vs weight bytes, one panel per task, one line per method (dense at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = rows[0]["dense"]
    dense_bytes = rows[0]["params"]["source_unique"] * 4 / 2**20
    tasks = list(dense["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), sharey=True)
    for ax, task in zip(axes, tasks):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["bytes"] / 2**20, r["folded"]["tasks"][task]["acc_norm"]) for r in rows if r["method"] == method)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
        ax.scatter([dense_bytes], [dense["tasks"][task]["acc_norm"]], color="black", marker="*", s=80, label="dense")
        ax.set_title(task)
        ax.set_xlabel("fp32 weight bytes (MiB)")
    axes[0].set_ylabel("acc_norm")
    axes[-1].legend()
    fig.suptitle("Accuracy vs size: FoldGPT and peer layer pruning")
    fig.tight_layout()
    fig.savefig(RESULTS / "peers_accuracy.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heal-minutes", type=float, default=20.0, help="training budget of every method, per point")
    ap.add_argument("--methods", default=",".join(PEERS))
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--training-free-as-published", action="store_true", help="no cure for shortgpt and sleb")
    ap.add_argument("--sleb-sequences", type=int, default=8, help="calibration sequences per SLEB perplexity")
    ap.add_argument("--limit", type=int, default=300, help="items per multiple-choice task (as fold_quality)")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--heal-sequences", type=int, default=HEAL_SEQUENCES, help="256-token windows of self-generated healing text")
    ap.add_argument("--teacher-cache-mb", type=float, default=0.0,
                    help="the cure's teacher cache (compress.heal.TeacherCache); 0, as the committed FoldGPT cures ran")
    ap.add_argument("--finished-only", action="store_true",
                    help="report the (method, point) runs already finished and list the others as not run")
    ap.add_argument("--decode-rounds", type=int, default=3, help="timed decode rounds over all models at the end (0: none)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    if not DEV.is_dir():
        raise SystemExit(f"{DEV} not found: this benchmark needs the development sets beside the repository")
    methods = args.methods.split(",")
    for m in methods:
        if m not in PEERS + tuple(t + NO_CURE for t in TRAINING_FREE):
            raise SystemExit(f"unknown method {m!r}; this benchmark runs {', '.join(PEERS)} and "
                             f"{', '.join(t + NO_CURE for t in TRAINING_FREE)} (FoldGPT: fold_quality.py)")
    eval_cfg = eval_config(args.limit, args.ppl_tokens)
    reference = dense_reference(eval_cfg)
    command = "python benchmarks/peers.py " + shlex.join(sys.argv[1:])
    rows, missing = foldgpt_points(), []
    for name in args.points.split(","):
        for method in methods:
            if args.finished_only and not (point_dir(method, name, args)[2] / "eval.json").is_file():
                missing.append(f"{name} {method}")
                continue
            t = time.monotonic()
            rows.append(run_point(method, name, args, eval_cfg, reference))
            print(f"{method} {name}: done in {(time.monotonic() - t) / 60:.1f} min", flush=True)
            write_report(rows, command, missing=missing)
    if args.decode_rounds:
        print(f"decode speed: {len(rows) + 1} models, {args.decode_rounds} rounds", flush=True)
        write_report(rows, command, decode_speeds(rows, args.decode_rounds, args.decode_tokens), missing)
    print((RESULTS / "peers.md").read_text())


if __name__ == "__main__":
    main()
