"""Levers for sharing with per-depth deltas, uncured: base, init, where the rank goes, local training.

    python benchmarks/delta_levers.py [--steps 60] [--ppl-tokens 4096]

The cured rows of quality.py answer whether sharing + deltas pays at equal unique bytes;
this asks which lever moves it most, cheaply. Every configuration starts from one pruned
model, the removal and shared groups of quality.py's p25 share-d32 row (cuts repaired as
there), so only the lever differs; "removal" is the p25 removal row's set (same unique
bytes, no sharing). Block-local healing (compress.local_heal) is bounded in steps, not
minutes, so the figures do not depend on the machine's load. Perplexity uncured on
held-out self text (the healing text's distribution, never trained on) and WikiText-2
(measurement only: nothing here is chosen on it).

Writes benchmarks/results/delta_levers.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from common import RESULTS, WIKI, WORK, held_out_file, require_dev

SHARE_ROW = WORK / "share-d32" / "p25r6"
REMOVAL_ROW = WORK / "repair" / "p25r10"
# name -> (rank, init, base, linears, local); base "scored" = what the row's sharing chose per group (read
# from its provenance; RegMean for every group of the committed row)
CONFIGS = {
    "removal (10 blocks), local": None,
    "share, no deltas, local": (0, "svd", "scored", None, True),
    "share-d32 svd, no local": (32, "svd", "scored", None, False),
    "share-d32 svd, local": (32, "svd", "scored", None, True),
    "share-d32 zero init, local": (32, "zero", "scored", None, True),
    "share-d32 base first member, local": (32, "svd", "first", None, True),
    "share-d32 base mean, local": (32, "svd", "mean", None, True),
    "share-d51 MLP only (same bytes), local": (51, "svd", "scored", "mlp.gate_proj,mlp.up_proj,mlp.down_proj", True),
}
# Refill: nothing is deleted; each of the removal row's 10 depths reruns its preceding kept block's
# weights (shared, so the unique bytes are the removal's plus per-depth norms and deltas) with
# its own norms scaled by EPS, so it starts near the identity, i.e. near the removal itself;
# local healing then trains each depth towards its dense block. name -> (rank, norm scale)
REFILL = {"refill norms x0.1, local": (0, 0.1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="local healing steps per cut or group")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--configs", default=";".join([*CONFIGS, *REFILL]), help="semicolon list of: " + "; ".join([*CONFIGS, *REFILL]))
    args = ap.parse_args()
    require_dev()
    names = args.configs.split(";")
    unknown = [n for n in names if n not in CONFIGS and n not in REFILL]
    if unknown:
        raise SystemExit(f"unknown config {unknown[0]!r}")
    if not (SHARE_ROW / "config.json").is_file() or not (REMOVAL_ROW / "config.json").is_file():
        raise SystemExit("run `python benchmarks/quality.py --rows foldgpt:p25:removal,foldgpt:p25:share-d32` first")

    import torch

    from compress.blocks import count_parameters, remove_blocks, share_blocks
    from compress.delta import DeltaConfig, add_deltas
    from compress.evaluate import perplexity
    from compress.fold import FoldConfig, ShareScorer
    from compress.load import load_model
    from compress.local_heal import LocalHealConfig, local_heal
    from compress.repair import RepairConfig, repair_cuts
    from compress.select import SelectConfig

    torch.manual_seed(0)
    dense, tok = load_model("default")
    calib = torch.load(f"{SHARE_ROW}.work/calib.pt")
    heal = torch.load(f"{SHARE_ROW}.work/heal.pt")
    texts = {"self_held_out": held_out_file().read_text(), "wikitext2": WIKI.read_text()}
    fold = json.loads((SHARE_ROW / "config.json").read_text())["fold"]
    schedule = fold["schedule"]
    groups = [[d for d, b in enumerate(schedule) if b == blk] for blk in sorted(set(schedule)) if schedule.count(blk) > 1]
    blocks = [schedule[g[0]] for g in groups]
    # what the row's own sharing chose per block: "regmean", "mean" or "depth D" (D in the row's numbering)
    sources = fold["provenance"]["share_sources"]
    scored = {blk: sources[str(blk)] if sources[str(blk)] in ("mean", "regmean") else int(sources[str(blk)].split()[1])
              for blk in blocks}
    fit = SelectConfig().split(calib)[0]

    def pruned(removed: list[int]):
        model = remove_blocks(copy.deepcopy(dense), removed)
        repair_cuts(model, dense, fit, RepairConfig())
        return model

    base_model = pruned(fold["provenance"]["removed_blocks"])
    scorer = ShareScorer(base_model, calib, FoldConfig(removal_rate=0.0, group_size=None, num_unique_blocks=len(set(schedule))))
    local = LocalHealConfig(max_minutes=None, max_steps=args.steps)
    file = RESULTS / "delta_levers.json"
    rows = {r["config"]: r for r in json.loads(file.read_text())["rows"]} if file.is_file() else {}
    for name in names:
        if name in rows and rows[name]["steps"] == args.steps and rows[name]["ppl_tokens"] == args.ppl_tokens:
            print(f"{name}: kept from {file.name}")
            continue
        t = time.monotonic()
        removal_set = json.loads((REMOVAL_ROW / "config.json").read_text())["fold"]["provenance"]["removed_blocks"]
        if name in REFILL:
            model = refilled(dense, removal_set, *REFILL[name])
        elif CONFIGS[name] is None:
            model = pruned(removal_set)
        else:
            rank, init, base, linears, heal_locally = CONFIGS[name]
            model = copy.deepcopy(base_model)
            layers = model.model.layers
            names_of = scorer.adapter.shared_param_names(layers[0])
            own = {d: {n: layers[d].get_parameter(n).detach().clone() for n in names_of} for g in groups for d in g}
            with torch.no_grad():
                for blk, g in zip(blocks, groups):
                    choice = g[0] if base == "first" else base if base != "scored" else scored[blk]
                    for n, w in scorer.candidate(g, choice).items():
                        layers[g[0]].get_parameter(n).copy_(w)
            share_blocks(model, schedule)
            if rank:
                add_deltas(model, own, DeltaConfig(rank=rank, init=init, linears=linears))
        report = local_heal(model, dense, heal, local)[1] if name in REFILL or CONFIGS[name] is None or CONFIGS[name][4] else None
        ppl = {k: perplexity(model, tok, text, max_tokens=args.ppl_tokens) for k, text in texts.items()}
        rows[name] = {"config": name, "unique_params": count_parameters(model).unique, "steps": args.steps,
                      "ppl_tokens": args.ppl_tokens, **{f"{k}_ppl": round(v, 3) for k, v in ppl.items()},
                      "local_mse": [(u["eval_before"], u["eval_after"]) for u in (report.groups + report.cuts)] if report else None,
                      "seconds": round(time.monotonic() - t, 1)}
        print(f"{name}: {rows[name]}", flush=True)
        write(rows, args)
    write(rows, args)


def refilled(dense, removed: list[int], rank: int, eps: float):
    """The dense model with each `removed` depth sharing its preceding kept block's weights
    (the first kept block, for a leading run), its norms scaled by `eps`, deltas of `rank`."""
    import torch

    from compress.adapter import get_adapter
    from compress.blocks import share_blocks
    from compress.delta import DeltaConfig, add_deltas

    model = copy.deepcopy(dense)
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    kept = [d for d in range(len(layers)) if d not in set(removed)]
    owner = [max([k for k in kept if k <= d], default=kept[0]) for d in range(len(layers))]
    schedule = [kept.index(o) for o in owner]
    names = adapter.shared_param_names(layers[0])
    own = {d: {n: layers[d].get_parameter(n).detach().clone() for n in names} for d in removed} if rank else {}
    with torch.no_grad():
        for d in removed:
            for n in adapter.norm_param_names(layers[d]):
                layers[d].get_parameter(n).mul_(eps)
    share_blocks(model, schedule, sources={kept.index(k): k for k in kept})
    if rank:  # deltas only where a depth reruns another block's weights; the kept depths stay exact
        add_deltas(model, {d: own[d] for d in removed}, DeltaConfig(rank=rank))
    return model


def write(rows: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delta_levers.json").write_text(json.dumps({"rows": list(rows.values())}, indent=1))
    lines = ["# Sharing with per-depth deltas: which lever moves it (p25 size, uncured)", "",
             f"Reproduce: `python benchmarks/delta_levers.py --steps {args.steps} --ppl-tokens {args.ppl_tokens}`. "
             "Same removal and shared groups (quality.py's p25 share-d32 row: 6 removed, 5 pairs)",
             "for every share row; local healing bounded in steps per cut or group; no cure. Perplexity on",
             f"{args.ppl_tokens} tokens of held-out self text and of WikiText-2 (measurement only).",
             "Refill: nothing deleted; the removal row's 10 depths each rerun their preceding kept block's",
             "weights (shared) with their own norms scaled by 0.1 (near the identity), trained locally as a group.", "",
             "| config | unique params | self held-out ppl | wikitext2 ppl | local MSE before -> after (mean over units) |",
             "|---|---|---|---|---|"]
    for r in rows.values():
        mse = r["local_mse"]
        cell = f"{sum(a for a, _ in mse) / len(mse):.2f} -> {sum(b for _, b in mse) / len(mse):.2f}" if mse else "-"
        lines.append(f"| {r['config']} | {r['unique_params'] / 1e6:.2f}M | {r['self_held_out_ppl']:.2f} | "
                     f"{r['wikitext2_ppl']:.2f} | {cell} |")
    (RESULTS / "delta_levers.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
