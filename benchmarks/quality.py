"""The quality benchmark: methods x sizes x variants on the default model, one dense reference.

    python benchmarks/quality.py --rows foldgpt:p25:removal,foldgpt:p25:share,foldgpt:p25:share-d32,sleb:p25
    python benchmarks/quality.py --rows all               # every method and FoldGPT's main variants, 3 sizes
    python benchmarks/quality.py --rows ... --report-only  # rewrite the report from finished rows
    python benchmarks/quality.py --rows ... --decode-rounds 5 --decode-on executorch:8da4w+emb8
                                  # each row exported once: its bytes, and decode x dense in paired rounds

A row is METHOD:POINT[:VARIANT]. POINT is the size: p15 / p25 / p36 remove about 15 / 25 /
36 % of the unique parameters (6 / 10 / 14 of 30 blocks' worth). FoldGPT's VARIANT is
BASE[+MOD...]:

    removal   the removal only (the whole size), chosen by the gates, cuts repaired (as first run;
              `foldgpt compress` no longer repairs by default: +norepair is its default)
    share     6 blocks removed (3 at p15), adjacent pairs shared for the rest of the size
    share-dR  share's removed blocks; each shared depth gets rank-R deltas (compress.delta;
              more pairs pay for them), trained block-locally for 4 of healing's minutes
    +local    4 of healing's minutes on block-local healing (cuts, and groups)
    +logits / +both / +ce   healing's distillation target (default: final hidden state)
    +kl       healing is logit KL at temperature 1 alone, no next-token loss (Minitron)
    +lastK    healing trains only the last K depths (arXiv 2411.15558)
    +bf16     healing's forward passes in bf16 (autocast): more steps in the same minutes
    +norepair no closed-form cut repair
    +PEERset  removal only: the blocks the PEER row (sleb or shortgpt) at this point removed
              (run it first), so FoldGPT's repair, local healing and end-to-end healing meet that peer's healing
              on the same set (+slebset, +shortgptset)
A variant with a MOD, and share-dR, reuse their BASE row's removed blocks (run it first),
so an ablation changes one thing. Peers (shortgpt, sleb, streamline, layerchop; NAME-nocure
for shortgpt / sleb without healing) remove whole blocks of the same size; SLEB and ShortGPT
get FoldGPT's healing, Streamline's budget trains its replacement, LayerChop continues
pretraining (compress.methods).

Every row is a `compress` run with the same self-generated calibration and healing text
and the same 20-minute budget; its work dir is benchmarks/work/TAG/NAME (FoldGPT) or
benchmarks/work/peers/METHOD-POINT. A dir holding a finished run with that budget is
reused (the report lists each row's dir), an interrupted one resumes. A row whose work dir is
gone (work dirs are not committed; a fresh machine has none) is taken from the committed
results, as is its base row's removed set: only new rows run. All rows are evaluated against
one dense result (benchmarks/work/dense_eval.json).

Writes benchmarks/results/quality.{json,md} and quality.png. The JSON has `dense` and
`rows`; each row carries method, point, variant, unique_params, unique_bytes,
wikitext2_ppl, self_held_out_ppl and the dev accuracies (acc_norm), no per-item lists
(those feed the paired standard errors in the report and are committed apart, one 0/1
string per row and task, in quality_items.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

from common import RESULTS, WORK, dense_reference, eval_config, paired_difference, require_dev

POINTS = ("p15", "p25", "p36")
BLOCKS = {"p15": 6, "p25": 10, "p36": 14}  # blocks' worth of unique parameters each size removes
# (base, point) -> FoldGPT's run name (its work dir), removal rate, unique blocks kept
FOLD_POINTS = {
    ("removal", "p15"): ("p15r6", 0.2, 24), ("removal", "p25"): ("p25r10", 1 / 3, 20),
    ("removal", "p36"): ("p36r14", 14 / 30, 16),
    ("share", "p15"): ("p15", 0.1, 24), ("share", "p25"): ("p25r6", 0.2, 20), ("share", "p36"): ("p36", 0.2, 16),
}
PEERS = ("shortgpt", "streamline", "layerchop", "sleb")
NO_CURE = "-nocure"
HEAL_SEQUENCES = 256  # 256-token windows of self-generated healing text, every row
LOCAL_MINUTES = 4.0
DECODE_CONTEXT = 256  # positions of the exported programs the decode rounds run (32-token prompt + decoded tokens)
MAIN_VARIANTS = ("removal", "share", "share-d32")
SET_PEERS = ("sleb", "shortgpt")  # peers whose removed set a FoldGPT variant may borrow (+PEERset)
MODIFIERS = ("local", "logits", "both", "ce", "kl", "norepair", "bf16", *(f"{p}set" for p in SET_PEERS))


def parse_variant(variant: str) -> tuple[str, int | None, list[str]]:
    """'share-d32+local' -> ('share', 32, ['local']); SystemExit naming the grammar on a bad one."""
    base, *mods = variant.split("+")
    rank = None
    if base.startswith("share-d"):
        if not (base[7:].isdigit() and int(base[7:]) > 0):
            raise SystemExit(f"variant {variant!r}: share-dR needs a positive rank R")
        base, rank = "share", int(base[7:])
    if base not in ("removal", "share"):
        raise SystemExit(f"variant {variant!r}: the base must be removal, share or share-dR")
    for m in mods:
        if m not in MODIFIERS and not (m.startswith("last") and m[4:].isdigit()):
            raise SystemExit(f"variant {variant!r}: unknown modifier {m!r} ({', '.join(MODIFIERS)}, lastK)")
    sets = [m for m in mods if m.endswith("set")]
    if sets and (base != "removal" or rank or len(sets) > 1):
        raise SystemExit(f"variant {variant!r}: +PEERset is a removal variant and takes one peer's set")
    return base, rank, mods


def fold_dir(point: str, variant: str) -> Path:
    """removal -> work/repair/p25r10, share-d32 -> work/share-d32/p25r6, removal+local -> work/repair-local/p25r10."""
    base, rank, mods = parse_variant(variant)
    head = "repair" if base == "removal" else f"share-d{rank}" if rank else "share"
    return WORK / "-".join([head, *mods]) / FOLD_POINTS[(base, point)][0]


def fold_config(point: str, variant: str, remove: list[int] | None, args, eval_cfg, reference: dict):
    from compress.data import DataConfig
    from compress.delta import DeltaConfig
    from compress.fold import FoldConfig
    from compress.heal import HealConfig
    from compress.local_heal import LocalHealConfig
    from compress.recipe import CompressConfig
    from compress.repair import RepairConfig
    from compress.select import SelectConfig

    base, rank, mods = parse_variant(variant)
    _, rate, unique = FOLD_POINTS[(base, point)]
    distill = {"logits": "logits", "both": "both", "ce": "none"}
    healing = {"distill": distill[m] for m in mods if m in distill}
    healing.update({"last_blocks": int(m[4:]) for m in mods if m.startswith("last")})
    if "kl" in mods:
        healing.update(distill="logits", ce_weight=0.0, temperature=1.0)
    if "bf16" in mods:
        healing.update(compute_dtype="bfloat16")
    fold = {"remove": remove} if remove is not None else {"select": SelectConfig(candidates="gates")}
    fold["repair"] = None if "norepair" in mods else RepairConfig()  # the variants as they ran: repaired unless +norepair
    if rank:
        fold["delta"] = DeltaConfig(rank=rank)
    local = rank or "local" in mods
    return CompressConfig(
        out=str(fold_dir(point, variant)), model="default",
        heal_data=DataConfig(num_sequences=args.heal_sequences, seq_len=256, seed=1),
        fold=FoldConfig(removal_rate=rate, group_size=None, num_unique_blocks=unique, **fold),
        local=LocalHealConfig(max_minutes=LOCAL_MINUTES) if local else None,
        heal=HealConfig(max_minutes=args.heal_minutes, teacher_cache_mb=0.0, **healing),
        eval=eval_cfg, eval_reference=reference, resume=True,
    )


def peer_dir(method: str, point: str) -> Path:
    return WORK / "peers" / f"{method}-{point}"


def peer_config(method: str, point: str, args, eval_cfg, reference: dict):
    from compress.data import DataConfig
    from compress.layerchop import LayerChopConfig
    from compress.methods import heal_config
    from compress.recipe import CompressConfig
    from compress.shortgpt import ShortGPTConfig
    from compress.sleb import SLEBConfig
    from compress.streamline import StreamlineConfig

    blocks, name = BLOCKS[point], method.removesuffix(NO_CURE)
    peer = {
        "shortgpt": lambda: ShortGPTConfig(num_remove=blocks),
        # a span of blocks + 1 replaced by one block, trained for the whole budget
        "streamline": lambda: StreamlineConfig(span=blocks + 1, train_steps=None, train_minutes=args.heal_minutes),
        "layerchop": lambda: LayerChopConfig(num_remove=blocks),
        "sleb": lambda: SLEBConfig(num_remove=blocks, max_sequences=8),
    }[name]()
    heal = None if method.endswith(NO_CURE) or name == "streamline" else heal_config(
        name, {"max_minutes": args.heal_minutes}, teacher_cache_mb=0.0)
    # Streamline trains on the calibration set: as many windows as the others heal on
    calib = DataConfig(num_sequences=args.heal_sequences if name == "streamline" else 32, seq_len=256)
    return CompressConfig(out=str(peer_dir(method, point)), model="default", method=name, calib=calib, peer=peer,
                          heal_data=DataConfig(num_sequences=args.heal_sequences, seq_len=256, seed=1),
                          heal=heal, eval=eval_cfg, eval_reference=reference, resume=True)


def parse_rows(spec: str) -> list[tuple[str, str, str]]:
    """'all' or a comma list of METHOD:POINT[:VARIANT] -> [(method, point, variant)], all checked up front."""
    if spec == "all":
        return [(m, p, v) for p in POINTS for m, v in [("foldgpt", v) for v in MAIN_VARIANTS] + [(m, "") for m in PEERS]]
    rows = []
    for item in spec.split(","):
        method, _, rest = item.partition(":")
        point, _, variant = rest.partition(":")
        if point not in POINTS:
            raise SystemExit(f"row {item!r}: the point must be one of {', '.join(POINTS)}")
        if method == "foldgpt":
            variant = variant or "removal"
            parse_variant(variant)
        elif method.removesuffix(NO_CURE) not in PEERS or (method.endswith(NO_CURE) and method[:-7] not in ("shortgpt", "sleb")):
            raise SystemExit(f"row {item!r}: the method must be foldgpt, {', '.join(PEERS)}, shortgpt-nocure or sleb-nocure")
        rows.append((method, point, variant))
    return rows


def row_dir(method: str, point: str, variant: str) -> Path:
    return fold_dir(point, variant) if method == "foldgpt" else peer_dir(method, point)


def budget_of(work: Path) -> float | None:
    """The training minutes a finished run had: its healing's (plus local healing's), or Streamline's training."""
    def setting(stage: str, *path: str):
        file = work / f"{stage}.json"
        value = json.loads(file.read_text())["settings"] if file.is_file() else None
        for key in path:
            value = (value or {}).get(key)
        return value

    # the healing stage's record: "heal.json" (work-dir version 3 on), "cure.json" before
    heal = setting("heal", "heal", "max_minutes") or setting("cure", "heal", "max_minutes")
    if heal is not None:
        return heal + (setting("local", "local", "max_minutes") or 0)
    return setting("fold", "peer", "train_minutes")


@functools.cache
def committed() -> tuple[dict, dict, dict | None, dict]:
    """The committed rows by label, their per-item records ({label: {task: '0110...'}}, with the
    tasks' item ids under 'ids'), decode series and standing lines, as they were before this
    run rewrote them, so a fresh machine reruns only what is new."""
    res, items = RESULTS / "quality.json", RESULTS / "quality_items.json"
    results = json.loads(res.read_text()) if res.is_file() else {"rows": []}
    return ({row_label(r): r for r in results["rows"]}, json.loads(items.read_text()) if items.is_file() else {},
            results.get("decode"), results.get("standing", {}))


def committed_row(label: str, args) -> dict | None:
    """The committed row `label` in the results' shape (its `_eval` rebuilt from the committed
    items, None where none were kept), or None; a committed row ran with the default budget."""
    rows, items, _, _ = committed()
    if label not in rows or args.heal_minutes != 20.0:
        return None
    tasks = items.get("rows", {}).get(label)
    evaluated = {"tasks": {t: {"ids": items["ids"][t], "correct": [c == "1" for c in bits],
                               "acc_norm": rows[label][t]} for t, bits in tasks.items()}} if tasks else None
    return {**rows[label], "reused": "committed", "_eval": evaluated}


def run_row(method: str, point: str, variant: str, args, eval_cfg, reference: dict) -> dict:
    """Run (or reuse) one row; returns it in the results' shape, plus `_eval` (per-item lists, not saved)."""
    from compress.recipe import compress

    out = row_dir(method, point, variant)
    if not (out / "eval.json").is_file() and not Path(f"{out}.work").exists() and (
            kept := committed_row(row_label({"method": method, "point": point, "variant": variant}), args)):
        return kept
    if (out / "eval.json").is_file():
        ran, asked = budget_of(Path(f"{out}.work")), None if method.endswith(NO_CURE) else args.heal_minutes
        if ran != asked:
            raise SystemExit(f"{out} ran with a {ran} min budget, not {asked}: delete it (and {out}.work) to rerun")
    elif method == "foldgpt":
        base, rank, mods = parse_variant(variant)
        remove = None
        peer = next((m[:-3] for m in mods if m.endswith("set")), None)
        if peer:
            remove = run_row(peer, point, "", args, eval_cfg, reference)["removed_blocks"]
        elif rank or mods:  # the base row's removal, so the variant changes one thing
            remove = run_row(method, point, base, args, eval_cfg, reference)["removed_blocks"]
        record_cpu(out)
        compress(fold_config(point, variant, remove, args, eval_cfg, reference))
    else:
        record_cpu(out)
        compress(peer_config(method, point, args, eval_cfg, reference))
    prov = json.loads((out / "config.json").read_text())["fold"]["provenance"]
    folded = json.loads((out / "eval.json").read_text())["folded"]
    healing = prov.get("heal") or prov.get("cure") or {}  # "cure" in folds made before work-dir version 3
    return {
        "method": method, "point": point, "variant": variant,
        "unique_params": prov["params"]["unique"], "unique_reduction": round(prov["params"]["unique_reduction"], 4),
        "unique_bytes": (out / "model.safetensors").stat().st_size,
        **{f"{text}_ppl": round(ppl, 3) for text, ppl in folded["perplexity"].items()},
        **{task: round(m["acc_norm"], 4) for task, m in folded["tasks"].items()},
        "removed_blocks": prov["removed_blocks"],
        "schedule": json.loads((out / "config.json").read_text())["fold"]["schedule"],
        "heal_steps": healing.get("steps"), "heal_minutes": round(healing.get("seconds", 0) / 60, 1),
        "local_minutes": _local_minutes(prov.get("local_heal")), "deltas": bool(json.loads((out / "config.json").read_text())["fold"].get("deltas")),
        "dir": str(out.relative_to(WORK.parent.parent)), "_eval": folded,
        "cpu": json.loads(cpu_file(out).read_text())["cpu"] if cpu_file(out).is_file() else None,
        "heal_text_sha": text_sha(Path(f"{out}.work") / "heal.pt"),
    }


def text_sha(windows: Path) -> str | None:
    """The healing windows' fingerprint: rows compare only on the same text (self text is sampled
    on the CPU at hand, and another CPU's arithmetic can sample other documents)."""
    import hashlib

    import torch

    return hashlib.sha256(torch.load(windows).numpy().tobytes()).hexdigest()[:12] if windows.is_file() else None


def cpu_file(out: Path) -> Path:
    return Path(f"{out}.cpu.json")


def record_cpu(out: Path) -> None:
    """The CPU a row trains on (the first to start it): it sets how many steps the minutes buy."""
    if not cpu_file(out).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        cpu_file(out).write_text(json.dumps({"cpu": cpu_name()}))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def _local_minutes(report: dict | None) -> float | None:
    """The local stage's wall minutes (runs before the stage bounded its captures too: the units' sum)."""
    if not report:
        return None
    seconds = report.get("seconds") or sum(u["seconds"] for u in report["groups"] + report["cuts"])
    return round(seconds / 60, 1)


def decode_speeds(rows: list[dict], rounds: int, tokens: int, on: str = "torch") -> dict:
    """Each row's decode speed beside dense through the runtime harness, on eager torch fp32 or
    an export (`on` = BACKEND:PRECISION, e.g. executorch:8da4w: each model exported once into
    its work dir, its artifact bytes recorded; a fold no exporter stores is recorded as such).
    Every model runs in one pinned process in alternating rounds; a row's figure is its
    per-round median ratio to dense (runtime_tests.latency.round_ratio), so other tenants'
    load cancels. Writes and returns the series (decode_file(on)): per row label its
    decode_vs_dense and, for an export, artifact_bytes or export_error."""
    from compress.load import save_dense
    from foldgpt.pipeline import export_all, parse_exports
    from runtime_tests.emulate import Isolation, run_isolated
    from runtime_tests.latency import decode_summary, round_ratio
    from runtime_tests.memory import artifact_bytes
    from runtime_tests.runtimes import get_runtime

    dense = save_dense("default", WORK / "dense")
    gone = [row_label(r) for r in rows if not (WORK.parent.parent / r["dir"]).is_dir()]
    if gone:
        print(f"not timed (their folded models are not on this machine): {', '.join(gone)}")
    models = {"dense": dense, **{row_label(r): WORK.parent.parent / r["dir"] for r in rows if row_label(r) not in gone}}
    artifacts = {name: str(path) for name, path in models.items()}
    out = {name: {} for name in models}
    if on != "torch":
        (pair,) = parse_exports(on)
        for name, path in models.items():  # each into its own work dir, kept for a rerun
            (made,) = export_all({"model": path}, (pair,), Path(f"{path}.work") / "exports", DECODE_CONTEXT)["model"]
            artifacts[name] = made["path"] if made["status"] == "ok" else None
            out[name] = ({"artifact_bytes": artifact_bytes(made["path"])} if artifacts[name]
                         else {"export_error": made["error"].removeprefix(f"{path}: ")})
    backend = on.partition(":")[0]
    entries = [[name, backend, artifact] for name, artifact in artifacts.items() if artifact]
    vocab = json.loads((dense / "config.json").read_text())["vocab_size"]
    cores = sorted(os.sched_getaffinity(0))
    record = run_isolated("runtime_tests.latency:decode_rounds_job",
                          {"entries": entries, "threads": len(cores), "rounds": rounds, "decode_tokens": tokens, "vocab": vocab},
                          Isolation(cores=cores, timeout_s=3600), preload=get_runtime(backend).preload)
    if record["status"] != "ok":
        raise SystemExit(f"decode speeds not measured: {record.get('message')}")
    ms = record["result"]["ms_per_token"]
    for name in ms:
        out[name]["decode_vs_dense"] = round_ratio(ms["dense"], ms[name])
    series = {"on": on, "rounds": rounds, "tokens": tokens, "dense": decode_summary(ms["dense"]), "models": out}
    decode_file(on).write_text(json.dumps(series, indent=1))
    return series


def row_label(r: dict) -> str:
    return f"{r['point']} {r['method']} {r['variant']}".strip()


def decode_file(on: str) -> Path:
    """The last decode series on `on` (torch or BACKEND:PRECISION), kept so --report-only shows it."""
    return WORK / f"decode-{on.replace(':', '-')}.json"


def write_report(dense: dict, rows: list[dict], command: str, decode: dict | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    dense_row = {**{f"{t}_ppl": round(p, 3) for t, p in dense["perplexity"].items()},
                 **{t: round(m["acc_norm"], 4) for t, m in dense["tasks"].items()},
                 "unique_params": round(rows[0]["unique_params"] / (1 - rows[0]["unique_reduction"]))}
    saved = [{k: v for k, v in r.items() if not k.startswith("_") and k != "reused"} for r in rows]
    stand, compared = standing(rows, committed()[3])
    (RESULTS / "quality.json").write_text(json.dumps({"command": command, "dense": dense_row, "rows": saved,
                                                      "decode": decode, "standing": compared}, indent=1))
    kept = [r for r in rows if r["_eval"]]
    ids = {t: m["ids"] for r in kept for t, m in r["_eval"]["tasks"].items()}
    (RESULTS / "quality_items.json").write_text(json.dumps({"ids": ids, "rows": {
        row_label(r): {t: "".join("1" if c else "0" for c in m["correct"]) for t, m in r["_eval"]["tasks"].items()}
        for r in kept}}, indent=1))
    tasks = list(dense["tasks"])
    speed = decode is not None and any(row_label(r) in decode["models"] for r in rows)
    sized = speed and decode["on"] != "torch"
    models = decode["models"] if speed else {}

    def deploy_cells(name: str) -> list[str]:
        m = models.get(name, {})
        cells = [f"{m['decode_vs_dense']:.2f}x" if "decode_vs_dense" in m else "-"]
        if sized:
            cells.insert(0, f"{m['artifact_bytes'] / 2**20:.1f}" if "artifact_bytes" in m
                         else "not exported" if "export_error" in m else "-")
        return cells if speed else []

    extra = ([f"{decode['on']} MiB"] if sized else []) + (["decode x dense"] if speed else [])
    lines = [
        "# Quality per byte: FoldGPT variants and peers on SmolLM2-135M-Instruct",
        "",
        f"Reproduce: `{command}` (dev sets from ../shared/data/dev, measurement only; calibration and",
        "healing text generated by the dense model; every row the same 20-minute budget and the same text settings:",
        "the rows list each row's CPU, which sets the steps those minutes buy, and its healing text's fingerprint).",
        "Perplexity: in brackets x dense. Accuracy: acc_norm, in brackets relative to dense."
        + (f" Decode: {decode['on']} speed x dense through the runtime harness, {decode['tokens']} tokens, median of "
           f"{decode['rounds']} paired rounds (`--decode-on {decode['on']} --decode-rounds {decode['rounds']}`)." if speed else ""),
        "",
        "| point | method | variant | unique params | wikitext2 ppl | self held-out ppl | " + " | ".join(tasks)
        + " | healing |" + "".join(f" {c} |" for c in extra),
        "|---" * (7 + len(tasks) + len(extra)) + "|",
        f"| - | dense | - | {dense_row['unique_params'] / 1e6:.1f}M | {dense_row['wikitext2_ppl']:.2f} | "
        f"{dense_row['self_held_out_ppl']:.2f} | " + " | ".join(f"{dense_row[t]:.3f}" for t in tasks) + " | - |"
        + "".join(f" {c} |" for c in deploy_cells("dense")),
    ]
    for r in sorted(rows, key=lambda r: (POINTS.index(r["point"]), r["method"] != "foldgpt", r["method"], r["variant"])):
        cells = [r["point"], r["method"], r["variant"] or "-", f"{r['unique_params'] / 1e6:.1f}M (-{r['unique_reduction']:.0%})"]
        cells += [f"{r[k]:.2f} ({r[k] / dense_row[k]:.2f}x)" for k in ("wikitext2_ppl", "self_held_out_ppl")]
        cells += [f"{r[t]:.3f} ({r[t] / dense_row[t]:.0%})" for t in tasks]
        cells.append(f"{r['heal_steps']} steps, {r['heal_minutes']:g} min"
                     + (f" + local {r['local_minutes']:g} min" if r["local_minutes"] else ""))
        cells += deploy_cells(row_label(r))
        lines.append("| " + " | ".join(cells) + " |")
    for error in sorted({m["export_error"] for m in models.values() if "export_error" in m}):
        names = [name for name, m in models.items() if m.get("export_error") == error]
        lines += ["", f"Not exported ({', '.join(names)}): {error}"]
    lines += stand
    lines += ["", "Rows and their work dirs (a finished dir is reused on a rerun):", ""]
    lines += [f"- {r['point']} {r['method']} {r['variant']}: removed {r['removed_blocks']}, schedule {r['schedule']}, "
              f"`{r['dir']}`" + (f", trained on {r['cpu']}, healing text {r['heal_text_sha']}" if r.get("cpu")
                                 else ", CPU and healing text not recorded")
              + (" (taken from the committed results: its dir is not on this machine)"
                 if r.get("reused") == "committed" else "") for r in rows]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")
    plot(dense_row, rows, tasks)


def standing(rows: list[dict], kept: dict[str, dict] | None = None) -> tuple[list[str], dict[str, dict]]:
    """At each size: FoldGPT's row with the lowest WikiText perplexity against every peer row,
    accuracy differences paired over the same items (+- one SE; 'clear' beyond two). A size
    whose rows lack their per-item records keeps the line `kept` (the committed one) when it
    compared the same rows. Returns the lines and, per size, what each line compared."""
    lines = ["", "Where FoldGPT stands (at each size its row with the lowest WikiText perplexity against every peer",
             "row; accuracy differences paired over the same items, +- one SE, 'clear' beyond two):", ""]
    compared: dict[str, dict] = {}
    for point in POINTS:
        mine = [r for r in rows if r["point"] == point and r["method"] == "foldgpt"]
        others = [r for r in rows if r["point"] == point and r["method"] != "foldgpt"]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["wikitext2_ppl"])
        head = f"FoldGPT {best['variant']} wikitext2 {best['wikitext2_ppl']:.1f}"
        if not others:
            lines.append(f"- {point}: {head}; no peer run at this size in this series")
            continue
        lower = [f"{r['method']} {r['wikitext2_ppl']:.1f}" for r in others if r["wikitext2_ppl"] < best["wikitext2_ppl"]]
        parts = [head + ", " + (f"beaten by {', '.join(lower)}" if lower else "no peer lower")]
        key = {"best": row_label(best), "peers": sorted(row_label(r) for r in others)}
        if not best["_eval"] or not all(r["_eval"] for r in others):
            old = (kept or {}).get(point, {})
            if {k: old.get(k) for k in key} == key:
                compared[point] = old
                lines.append(old["line"])
            else:
                lines.append(f"- {point}: " + parts[0] + "; accuracy not paired: a row here predates the committed "
                             "per-item records (quality_items.json), rerun it to pair")
            continue
        for task, m in best["_eval"]["tasks"].items():
            diffs = [(r["method"], *paired_difference(r["_eval"]["tasks"][task], m)) for r in others]
            ahead = [f"{n} +{d * 100:.1f} +- {se * 100:.1f} pts{' (clear)' if d > 2 * se else ''}" for n, d, se in diffs if d > 0]
            parts.append(f"{task} {m['acc_norm']:.3f}, " + (f"beaten by {', '.join(ahead)}" if ahead else "no peer higher"))
        lines.append(f"- {point}: " + "; ".join(parts))
        compared[point] = {**key, "line": lines[-1]}
    return lines, compared


def plot(dense: dict, rows: list[dict], tasks: list[str]) -> None:
    """WikiText perplexity and each task's accuracy against unique parameters, a line per method / variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["wikitext2_ppl", *tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 3.5, 4))
    labels = list(dict.fromkeys(f"{r['method']} {r['variant']}".strip() for r in rows))
    colors = plt.cm.tab20(range(len(labels))) if len(labels) <= 20 else plt.cm.viridis([i / len(labels) for i in range(len(labels))])
    for ax, key in zip(axes, panels):
        for label, color in zip(labels, colors):
            pts = sorted((r["unique_params"] / 1e6, r[key]) for r in rows if f"{r['method']} {r['variant']}".strip() == label)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if label.startswith("foldgpt") else "s",
                    color=color, label=label)
        ax.scatter([dense["unique_params"] / 1e6], [dense[key]], color="black", marker="*", s=80, label="dense")
        ax.set_title(key)
        ax.set_xlabel("unique parameters (M)")
    axes[0].set_yscale("log")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=7)  # beside the panels, not over the points
    fig.suptitle("Quality vs size on the default model (20-minute budget)")
    fig.tight_layout(rect=(0, 0, 1 - 3.5 / fig.get_figwidth(), 1))
    fig.savefig(RESULTS / "quality.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="all", help="'all' or a comma list of METHOD:POINT[:VARIANT]")
    ap.add_argument("--heal-minutes", type=float, default=20.0, help="every row's training budget")
    ap.add_argument("--heal-sequences", type=int, default=HEAL_SEQUENCES)
    ap.add_argument("--limit", type=int, default=300, help="items per multiple-choice task")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished rows; run nothing")
    ap.add_argument("--decode-rounds", type=int, default=0, help="timed decode rounds over the rows' models at the end")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-on", default="torch", help="torch (eager fp32) or an export, e.g. executorch:8da4w")
    ap.add_argument("--decode-rows", default=None, help="the rows to time (default: every row), METHOD:POINT[:VARIANT] list")
    args = ap.parse_args()
    require_dev()
    wanted = parse_rows(args.rows)
    if args.decode_on != "torch":
        from foldgpt.pipeline import parse_exports
        try:
            parse_exports(args.decode_on)
        except ValueError as e:
            raise SystemExit(f"--decode-on: {e}")
    eval_cfg = eval_config(args.limit, args.ppl_tokens)
    reference = dense_reference(eval_cfg)
    command = "python benchmarks/quality.py " + shlex.join(a for a in sys.argv[1:] if a != "--report-only")
    rows = []
    for method, point, variant in wanted:
        if args.report_only and not (row_dir(method, point, variant) / "eval.json").is_file() and not committed_row(
                row_label({"method": method, "point": point, "variant": variant}), args):
            print(f"{method}:{point}:{variant}: not run, left out")
            continue
        t = time.monotonic()
        rows.append(run_row(method, point, variant, args, eval_cfg, reference))
        print(f"{method}:{point}:{variant}: {(time.monotonic() - t) / 60:.1f} min", flush=True)
        write_report(reference, rows, command)
    timed = {row_label({"method": m, "point": p, "variant": v}) for m, p, v in parse_rows(args.decode_rows)} \
        if args.decode_rows else {row_label(r) for r in rows}
    if args.decode_rounds and rows:
        decode = decode_speeds([r for r in rows if row_label(r) in timed], args.decode_rounds, args.decode_tokens, args.decode_on)
    else:  # the last series on this runtime, if any (here, else the committed one), so a report-only rewrite keeps it
        kept = committed()[2]
        decode = json.loads(decode_file(args.decode_on).read_text()) if decode_file(args.decode_on).is_file() \
            else kept if kept and kept["on"] == args.decode_on else None
    write_report(reference, rows, command, decode)
    print((RESULTS / "quality.md").read_text())


if __name__ == "__main__":
    main()
