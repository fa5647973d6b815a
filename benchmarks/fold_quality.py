"""Dense vs FoldGPT-folded default model at three compression points, same healing budget.

    python benchmarks/fold_quality.py [--heal-minutes 20] [--points p15r6,p25r10,p36r14] [--teacher-cache-mb 0]
    python benchmarks/fold_quality.py --points p25r10,p25r10:logits    # a cure variant beside the default

A point is NAME[:DISTILL][@MINUTES][+WINDOWS]: the cure's distillation target
(compress.heal.Distill: hidden, logits, both, none; default the HealConfig default), its
budget (default --heal-minutes) and its healing text in 256-token windows (default
--heal-sequences). A DISTILL or MINUTES variant reuses the data and fold stages of its
base point NAME[+WINDOWS] (same settings, so the same gates, removal and sharing) and
runs only its own cure; NAME+WINDOWS itself redoes them (the healing text is part of
their key), from the same calibration text and seeds, so its gates choose as NAME's did
(its row lists the removed blocks to check).

Writes benchmarks/results/NAME.{json,md} (--name, default fold_quality) and two plots (accuracy vs size,
gate values per block). Each point is a `compress` run with its own work dir under
benchmarks/work/ (not committed), so an interrupted benchmark resumes where it stopped.
Evaluation uses the development sets in ../shared/data/dev (measurement only: nothing
is trained or calibrated on them; calibration and healing text is the model's own), and
perplexity on held-out self text (another generation seed): the healing text's own
distribution, so a cure's reach can be told apart from the shift to WikiText.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

from compress.data import held_out_text

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "dev"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"

# name -> (removal_rate, unique blocks); ~15 / 25 / 36 % of total parameters removed.
# pNN shares adjacent pairs for most of the size; pNNrK removes K blocks by the gates and
# shares pairs for the rest (none when K covers the size). The default points remove only:
# the split fold_split.md found best at p25's size.
POINTS = {
    "p15": (0.1, 24),
    "p25": (0.1, 20),
    "p36": (0.2, 16),
    "p25r6": (0.2, 20),
    "p15r6": (0.2, 24),
    "p25r10": (1 / 3, 20),
    "p36r14": (14 / 30, 16),
}
DEFAULT_POINTS = ("p15r6", "p25r10", "p36r14")
HEAL_SEQUENCES = 256  # 256-token windows of self-generated healing text, every point and every method
HELD_OUT_TOKENS = 8192


def held_out_file(tokens: int = HELD_OUT_TOKENS) -> Path:
    """held_out_text as a file for EvalConfig.ppl_files (the dense model loads only to make it)."""
    file = WORK / f"self_held_out_{tokens}.txt"
    if not file.is_file():
        from compress.load import load_model

        WORK.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(held_out_text(*load_model("default"), tokens))  # compress.data
        tmp.replace(file)
    return file


def eval_config(limit: int | None, ppl_tokens: int):
    from compress.evaluate import EvalConfig

    return EvalConfig(
        ppl_files={"wikitext2": str(DEV / "wikitext2_valid" / "wiki.valid.raw"), "self_held_out": str(held_out_file())},
        ppl_max_tokens=ppl_tokens,
        tasks={
            "arc_challenge": str(DEV / "arc_challenge" / "ARC-Challenge-Test.jsonl"),
            "openbookqa": str(DEV / "openbookqa" / "test.jsonl"),
            "arc_easy_dev": str(DEV / "arc_easy_dev" / "ARC-Easy-Dev.jsonl"),
        },
        limit=limit,
    )


def dense_reference(eval_cfg) -> dict:
    """The dense model's metrics, measured once and reused by every point."""
    from dataclasses import asdict

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


class Variant(NamedTuple):
    """FoldGPT settings other than its defaults, for ablations; `tag` names their work dirs."""
    tag: str = ""
    candidates: str | None = None  # compress.select candidates (comma list)
    repair: str | None = None  # compress.repair fit, or "none"
    local_minutes: float | None = None  # compress.local_heal, out of the cure's minutes
    remove: tuple[int, ...] | None = None  # source blocks to remove (FoldConfig.remove), e.g. another row's choice
    delta_rank: int | None = None  # compress.delta: per-depth low-rank deltas on shared groups


def compress_config(name: str, heal, eval_cfg=None, reference: dict | None = None,
                    heal_sequences: int = HEAL_SEQUENCES, variant: Variant = Variant()):
    """The `compress` run of point `name` (fold_split.py runs the same data and fold stages)."""
    from compress.data import DataConfig
    from compress.delta import DeltaConfig
    from compress.fold import FoldConfig
    from compress.local_heal import LocalHealConfig
    from compress.recipe import CompressConfig
    from compress.repair import RepairConfig
    from compress.select import SelectConfig

    p = parse_point(name)
    rate, unique = POINTS[p.name]
    fold = {"select": SelectConfig(candidates=variant.candidates)} if variant.candidates else {}
    if variant.repair:
        fold["repair"] = None if variant.repair == "none" else RepairConfig(fit=variant.repair)
    if variant.remove is not None:
        fold["remove"] = list(variant.remove)
    if variant.delta_rank:
        fold["delta"] = DeltaConfig(rank=variant.delta_rank)
    return CompressConfig(
        out=str(point_dir(name, variant.tag)), model="default",
        heal_data=DataConfig(num_sequences=p.windows or heal_sequences, seq_len=256, seed=1),
        fold=FoldConfig(removal_rate=rate, group_size=None, num_unique_blocks=unique, **fold),
        local=LocalHealConfig(max_minutes=variant.local_minutes) if variant.local_minutes else None,
        heal=heal, eval=eval_cfg, eval_reference=reference, resume=True,
    )


class Point(NamedTuple):
    name: str
    distill: str  # "" = the HealConfig default
    minutes: float | None  # None = --heal-minutes
    windows: int | None  # None = --heal-sequences

    def variant(self) -> str:
        """What sets the point apart from its base, for labels ("" for a base point)."""
        return ", ".join(([self.distill] if self.distill else []) + ([f"{self.minutes:g}-min cure"] if self.minutes else [])
                         + ([f"{self.windows} healing windows"] if self.windows else []))


def parse_point(point: str) -> Point:
    """NAME[:DISTILL][@MINUTES][+WINDOWS] -> Point."""
    grammar = "expected NAME[:DISTILL][@MINUTES][+WINDOWS]"
    head, _, windows = point.partition("+")
    head, _, minutes = head.partition("@")
    name, _, distill = head.partition(":")
    if name not in POINTS:
        raise SystemExit(f"unknown point {name!r}; known: {', '.join(POINTS)} ({grammar})")
    try:
        parsed = Point(name, distill, float(minutes) if minutes else None, int(windows) if windows else None)
    except ValueError:
        raise SystemExit(f"bad cure minutes or windows in {point!r}: {grammar}") from None
    if (parsed.minutes is not None and parsed.minutes <= 0) or (parsed.windows is not None and parsed.windows < 1):
        raise SystemExit(f"{point!r}: minutes and windows must be positive")
    return parsed


def point_dir(point: str, tag: str = "") -> Path:
    """p25r10 -> work/p25r10, p25r10:logits@40+1024 -> work/p25r10-logits-40m-1024w; a variant's under work/TAG/."""
    p = parse_point(point)
    return (WORK / tag if tag else WORK) / "-".join([p.name] + ([p.distill] if p.distill else []) + ([f"{p.minutes:g}m"] if p.minutes else [])
                           + ([f"{p.windows}w"] if p.windows else []))


def run_point(point: str, heal_minutes: float, eval_cfg, reference: dict, heal_sequences: int,
              teacher_cache_mb: float = 0.0, variant: Variant = Variant()) -> dict:
    from compress.heal import HealConfig
    from compress.recipe import compress

    name, distill, minutes, windows = parse_point(point)
    rate, unique = POINTS[name]
    heal = HealConfig(max_minutes=minutes or heal_minutes, teacher_cache_mb=teacher_cache_mb,
                      **({"distill": distill} if distill else {}))
    out = point_dir(point, variant.tag)
    if (out / "eval.json").is_file():
        check_budget(out, heal.max_minutes - (variant.local_minutes or 0))
    else:
        base_point = name + (f"+{windows}" if windows else "")  # same data and fold stages, other cure
        base = Path(f"{point_dir(base_point, variant.tag)}.work")
        work = Path(f"{out}.work")
        if (distill or minutes) and not work.exists():
            if not ((base / "fold.json").is_file() and json.loads((base / "fold.json").read_text())["done"]):
                raise SystemExit(f"{point} copies the fold of {base_point}, which has not run: run point {base_point} first")
            work.mkdir(parents=True)
            for f in ("calib.pt", "heal.pt", "data.json", "fold.json", "fold_report.json"):
                shutil.copy2(base / f, work / f)
            shutil.copytree(base / "folded", work / "folded")
        compress(compress_config(point, heal, eval_cfg, reference, heal_sequences, variant))
    config = json.loads((out / "config.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    prov = config["fold"]["provenance"]
    return {"name": point, "removal_rate": rate, "unique_blocks": unique, "distill": heal.distill.value,
            "heal_minutes": recorded_minutes(Path(f"{out}.work")), "heal_windows": windows or heal_sequences,
            "schedule": config["fold"]["schedule"], "removed_blocks": prov["removed_blocks"], "params": prov["params"],
            "cure": prov["cure"], "gates": prov["gates"], "dense": ev["dense"], "folded": ev["folded"],
            "bytes": (out / "model.safetensors").stat().st_size, **run_settings(Path(f"{out}.work")),
            "variant": variant._asdict(), "selection": prov.get("removal_selection"), "repair": prov.get("repair"),
            "local_heal": prov.get("local_heal")}


def recorded_minutes(work: Path) -> float | None:
    """The training budget a finished run had, from its stage records: the cure's, or an
    untrained-cure method's own training (Streamline's replacement); None without either."""
    for stage, path in (("cure", ("heal", "max_minutes")), ("fold", ("peer", "train_minutes"))):
        file = work / f"{stage}.json"
        if file.is_file():
            value = json.loads(file.read_text())["settings"]
            for key in path:
                value = (value or {}).get(key)
            if value is not None:
                return value
    return None


def check_budget(out: Path, minutes: float | None) -> None:
    """A finished run is reused only if it had the budget asked for now."""
    ran = recorded_minutes(Path(f"{out}.work"))
    if ran != minutes:
        raise SystemExit(f"{out} ran with a {ran} min budget, not {minutes}: delete it (and {out}.work) to rerun")


def run_settings(work: Path) -> dict:
    """How a finished point's gates and cure ran, from its work dir's stage records: runs
    made before the gates' defaults were recorded (60 steps of 2 x 128 tokens, one sample
    per step) or before the teacher cache say so."""
    fold = json.loads((work / "fold.json").read_text())["settings"]["fold"] if (work / "fold.json").is_file() else {}
    cure = json.loads((work / "cure.json").read_text())["settings"]["heal"] if (work / "cure.json").is_file() else {}
    gate = fold.get("gate")
    return {"gate_setting": f"{gate['steps']} steps x {gate['batch_size']} x {gate['seq_len']}" if gate
            else "60 steps x 2 x 128, one sample per step (before 240 x 4 x 64)",
            "teacher_cache_mb": cure.get("teacher_cache_mb", 0.0)}


def row(label: str, unique: int, nbytes: int | None, m: dict, dense: dict | None, heal_s, extra: tuple[str, ...] = ()) -> str:
    accs = {t: m["tasks"][t]["acc_norm"] for t in m["tasks"]}
    stab = {t: m["tasks"][t].get("stability") for t in m["tasks"]}
    cells = [label, f"{unique / 1e6:.1f}M", f"{nbytes / 2**20:.0f} MiB" if nbytes else "-"]
    for name in (dense or m)["perplexity"]:  # the dense row's texts are the columns
        ppl = m["perplexity"].get(name)
        rel = "" if dense is None or ppl is None else f" ({ppl / dense['perplexity'][name]:.2f}x)"
        cells.append("-" if ppl is None else f"{ppl:.2f}{rel}")
    for t, a in accs.items():
        r = "" if dense is None else f" ({a / dense['tasks'][t]['acc_norm']:.0%})"
        cells.append(f"{a:.3f}{r}")
    cells.append(", ".join(f"{s:.3f}" for s in stab.values() if s is not None) or "-")
    cells.append("-" if heal_s is None else f"{heal_s / 60:.1f} min")
    cells += extra
    return "| " + " | ".join(cells) + " |"


def table_head(dense: dict, source_unique: int, last_column: str, extra: dict[str, str] | None = None) -> list[str]:
    """The metric table's header, legend and dense row (this benchmark's and peers.py's);
    `extra` maps further column names to the dense row's cell."""
    tasks, texts, extra = list(dense["tasks"]), [f"{t} ppl" for t in dense["perplexity"]], extra or {}
    held_out = ["self_held_out: self-generated text of another generation seed, the healing text's distribution but never trained on."]
    return [
        "acc_norm: length-normalised zero-shot accuracy, in brackets relative to dense; stability per task (LLM-Streamline).",
        *(held_out if "self_held_out" in dense["perplexity"] else []),  # results made before it have no such column
        "",
        "| model | unique params | bytes | " + " | ".join([*texts, *tasks, "stability", last_column, *extra]) + " |",
        "|---" * (5 + len(texts) + len(tasks) + len(extra)) + "|",
        row("dense", source_unique, None, dense, None, None, tuple(extra.values())),
    ]


def write_report(points: list[dict], name: str = "fold_quality") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(points, indent=1, default=str))
    dense = points[0]["dense"]
    named = "" if name == "fold_quality" else f" --name {name}"
    lines = [
        "# FoldGPT on SmolLM2-135M-Instruct: quality vs size",
        "",
        f"Reproduce: `python benchmarks/fold_quality.py --points {','.join(p['name'] for p in points)}{named}` "
        "(dev sets from ../shared/data/dev; measurement only).",
        "Calibration and healing text: generated by the dense model itself. Same cure budget and healing text at every",
        "point unless its name says otherwise (NAME[:DISTILL][@MINUTES][+WINDOWS]: distill target, cure minutes, 256-token windows).",
        "pNN: about NN% of total parameters removed; rK: K blocks removed by the gates, the rest of the size (if any)",
        "by sharing adjacent pairs. Layers / blocks: depth / unique blocks. The default points remove only (the split",
        "fold_split.md found best at p25's size, uncured, on held-out self-generated text); p25r6 and p25 share pairs.",
    ] + table_head(dense, points[0]["params"]["source_unique"], "cure")
    for p in points:
        label = (f"{p['name']}: -{p['params']['unique_reduction']:.0%} unique, {len(p['schedule'])} layers / "
                 f"{p['unique_blocks']} blocks, distill {p['distill']}")
        lines.append(row(label, p["params"]["unique"], p["bytes"], p["folded"], dense, (p["cure"] or {}).get("seconds")))
    lines += ["", "Removed blocks and schedules:", ""]
    lines += [f"- {p['name']}: removed {p['removed_blocks']}, schedule {p['schedule']}; gates {p['gate_setting']}; "
              f"cure {(p['cure'] or {}).get('steps')} steps on {p['heal_windows']} healing windows, teacher cache {'on' if p['teacher_cache_mb'] else 'off'}"
              for p in points]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(points, name)


def plot(points: list[dict], name: str = "fold_quality") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = points[0]["dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dense["tasks"]:  # a line through the default points and dense; other splits as open markers
        xy = sorted([(p["bytes"] / 2**20, p["folded"]["tasks"][task]["acc_norm"]) for p in points if p["name"] in DEFAULT_POINTS]
                    + [(points[0]["params"]["source_unique"] * 4 / 2**20, dense["tasks"][task]["acc_norm"])])
        line, = ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=task)
        other = [(p["bytes"] / 2**20, p["folded"]["tasks"][task]["acc_norm"]) for p in points if p["name"] not in DEFAULT_POINTS]
        ax.scatter([x for x, _ in other], [y for _, y in other], facecolors="none", edgecolors=line.get_color())
    ax.set_xlabel("fp32 weight bytes (MiB)")
    ax.set_ylabel("acc_norm")
    ax.set_title("FoldGPT: accuracy vs size (rightmost: dense; open: other splits)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_accuracy.png", dpi=120)

    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3), sharey=True)
    for ax, p in zip(axes if len(points) > 1 else [axes], points):
        gates = p["gates"] or []
        ax.bar(range(len(gates)), gates, color=["tab:red" if d in p["removed_blocks"] else "tab:blue" for d in range(len(gates))])
        removed = [d for d in p["removed_blocks"] if d < len(gates)]  # closed gates are ~0: mark them
        ax.scatter(removed, [0.05] * len(removed), marker="x", color="tab:red", zorder=3)
        ax.set_title(f"{p['name']}: gates (x = removed)")
        ax.set_xlabel("source block")
    axes[0].set_ylabel("final gate value") if len(points) > 1 else None
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}_gates.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heal-minutes", type=float, default=20.0)
    ap.add_argument("--points", default=",".join(DEFAULT_POINTS), help=f"of {', '.join(POINTS)}")
    ap.add_argument("--limit", type=int, default=300, help="items per multiple-choice task")
    ap.add_argument("--ppl-tokens", type=int, default=32768)
    ap.add_argument("--heal-sequences", type=int, default=HEAL_SEQUENCES, help="256-token windows of self-generated healing text")
    ap.add_argument("--teacher-cache-mb", type=float, default=0.0,
                    help="the cure's teacher cache (compress.heal.TeacherCache); 0 keeps cures comparable with peers.py's")
    ap.add_argument("--name", default="fold_quality", help="results file stem: an experiment beside the main report")
    ap.add_argument("--tag", default="", help="a FoldGPT variant: its work dirs go under benchmarks/work/TAG/")
    ap.add_argument("--candidates", default=None, help="variant: removal candidates (compress.select), comma list")
    ap.add_argument("--repair", default=None, help="variant: cut repair fit (sequential, dense, none)")
    ap.add_argument("--local-minutes", type=float, default=None, help="variant: block-local healing minutes, out of the cure's")
    args = ap.parse_args()
    variant = Variant(args.tag, args.candidates, args.repair, args.local_minutes)
    if not DEV.is_dir():
        raise SystemExit(f"{DEV} not found: this benchmark needs the development sets beside the repository")
    eval_cfg = eval_config(args.limit, args.ppl_tokens)
    reference = dense_reference(eval_cfg)
    points = []
    names = args.points.split(",")
    for name in names:
        parse_point(name)  # every name checked before the first run starts
    for name in names:
        t = time.monotonic()
        points.append(run_point(name, args.heal_minutes, eval_cfg, reference, args.heal_sequences, args.teacher_cache_mb,
                                variant))
        print(f"{name}: done in {(time.monotonic() - t) / 60:.1f} min", flush=True)
        write_report(points, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
