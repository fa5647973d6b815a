"""FoldGPT steps 2-3: remove the blocks chosen by measurement (compress.select: the
gates' set among other candidates), repair each cut in closed form (compress.repair),
then let groups of adjacent retained blocks share one set of large weights.

Which weights a group shares is chosen by a measured criterion: for every candidate
(each member's own weights, and their mean) we install it in the whole group, keeping
every depth's own norms, and score KL(current || candidate) on the model's next-token
distributions over calibration batches. The candidate with the lowest KL wins.
With a target number of unique blocks instead of a fixed group size, the same score
decides *which* adjacent blocks to merge: start from singletons and repeatedly merge
the adjacent pair of groups whose best candidate costs least.

Besides the members and their mean, a third merge is a candidate: RegMean (Jin et al.,
"Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023). For each
Linear it takes the weight that best reproduces every member's own output on that
member's own inputs, W^T = (sum_d G_d)^-1 sum_d G_d W_d^T with G_d = X_d^T X_d the Gram
matrix of depth d's inputs to that Linear (off-diagonals scaled by `regmean_alpha`, as
in the paper). A plain mean averages weights of blocks that were never trained to agree;
RegMean weights each member by the directions its inputs actually use.

With `delta` set, every depth of a shared group then gets its own low-rank correction,
started from the SVD of (its own weights - the shared ones) (compress.delta); the
deltas count as unique parameters, so planning by `num_unique_blocks` merges more pairs
to pay for them.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import count_parameters, fold_info, remove_blocks, share_blocks
from compress.capture import Replay
from compress.delta import DeltaConfig, add_deltas
from compress.importance import GateConfig, GateResult
from compress.repair import RepairConfig, repair_cuts
from compress.select import SelectConfig, choose_removal
from compress.methods import DEFAULT_HEAL_MINUTES, register_method

MEAN = "mean"
REGMEAN = "regmean"


@dataclass
class FoldConfig:
    removal_rate: float = 0.2  # fraction of decoder blocks removed (rounded to whole blocks)
    group_size: int | None = None  # adjacent retained blocks per shared group (None / 1: none shared) ...
    num_unique_blocks: int | None = None  # ... or the number of unique blocks to keep
    max_group_size: int = 4  # cap on a merged group when num_unique_blocks decides
    merge_candidates: bool = True  # also try the members' mean and their RegMean merge
    regmean_alpha: float = 0.9  # RegMean's scale on the Gram matrices' off-diagonal entries
    score_batches: int = 2  # calibration batches per candidate score
    score_batch_size: int = 4
    gate: GateConfig | None = None  # defaults derived from removal_rate
    select: SelectConfig = field(default_factory=SelectConfig)  # which removal: candidates scored on held-back windows
    # closed-form map at each cut; off by default: it lowers the unhealed error, but after 20 min of healing at
    # 25% the gates' set ended at 3.18x dense WikiText without it and 3.67x with it, self text level
    # (benchmarks/results/quality.md, removal+local vs removal+local+norepair)
    repair: RepairConfig | None = None
    remove: list[int] | None = None  # source blocks to remove, chosen elsewhere: skips the selection
    delta: DeltaConfig | None = None  # per-depth low-rank deltas on shared groups; they count as unique parameters

    def __post_init__(self):
        if not 0 <= self.removal_rate < 1:
            raise ValueError(f"removal_rate must be in [0, 1), got {self.removal_rate}")
        if self.group_size is not None and self.num_unique_blocks is not None:
            raise ValueError("give group_size or num_unique_blocks, not both")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.num_unique_blocks is not None and self.num_unique_blocks < 1:
            raise ValueError(f"num_unique_blocks must be >= 1, got {self.num_unique_blocks}")
        if not 0 < self.regmean_alpha <= 1:
            raise ValueError(f"regmean_alpha must be in (0, 1], got {self.regmean_alpha}")
        if self.delta is not None and self.group_size is not None and self.group_size < 2:
            raise ValueError("deltas need shared groups: group_size 1 shares nothing (share with group_size >= 2 or num_unique_blocks)")

    def num_remove(self, num_layers: int) -> int:
        return len(set(self.remove)) if self.remove is not None else round(self.removal_rate * num_layers)

    def check(self, num_layers: int) -> None:
        """Everything that can be rejected before heavy work, given the model's depth."""
        bad = [b for b in self.remove or [] if not (isinstance(b, int) and 0 <= b < num_layers)]
        if bad:
            raise ValueError(f"cannot remove blocks {bad}: the model has blocks 0..{num_layers - 1}")
        n_remove = self.num_remove(num_layers)
        kept = num_layers - n_remove
        if kept < 1:
            raise ValueError(f"removal_rate {self.removal_rate} removes all {num_layers} blocks")
        if self.group_size is not None and self.group_size > kept:
            raise ValueError(f"group_size {self.group_size} is larger than the {kept} retained blocks")
        if self.num_unique_blocks is not None:
            if self.num_unique_blocks > kept:
                raise ValueError(f"num_unique_blocks {self.num_unique_blocks} exceeds the {kept} retained blocks")
            if self.delta is not None and self.num_unique_blocks >= kept:
                raise ValueError(f"deltas need shared groups: {self.num_unique_blocks} unique blocks for "
                                 f"{kept} retained blocks shares nothing")
            if self.num_unique_blocks * self.max_group_size < kept:
                raise ValueError(
                    f"{kept} retained blocks cannot fit in {self.num_unique_blocks} groups of at most "
                    f"{self.max_group_size} (raise max_group_size)"
                )


    def check_model(self, model: nn.Module) -> None:
        """What needs the model's layer shapes: a delta rank or Linear name, and whether the
        unique-block budget can pay for the deltas. Raises ValueError in one line."""
        if self.delta is not None:
            self.delta.targets(get_adapter(model).get_layers(model)[0])
            _check_delta_budget(model, self)


@dataclass
class FoldReport:
    gates: GateResult | None
    removed: list[int]  # source-model depths removed so far
    schedule: list[int]
    sources: dict[int, str]  # block -> "depth d", "mean" or "regmean", after removal numbering
    share_scores: dict[str, float] = field(default_factory=dict)  # "depths:candidate" -> KL
    params: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)  # winner and every removal candidate with its held-back KL
    repair: dict | None = None  # compress.repair.RepairReport, when cuts were repaired
    deltas: dict | None = None  # depth -> {linear: relative error of the delta's SVD start}


def fold(model: nn.Module, calib: torch.Tensor, cfg: FoldConfig) -> tuple[nn.Module, FoldReport]:
    """Remove the chosen blocks, repair the cuts, share the rest in groups; edits `model` in place."""
    layers = get_adapter(model).get_layers(model)
    cfg.check(len(layers))
    cfg.check_model(model)
    before = count_parameters(model)
    n_remove = cfg.num_remove(len(layers))
    fit = cfg.select.split(calib)[0]
    if n_remove and cfg.repair is not None:
        cfg.repair.check(fit, model.config.hidden_size)  # before any heavy work
    gates, selection, repaired = None, {}, None
    if cfg.remove is not None:  # a set chosen elsewhere: nothing to select, the repair as configured
        removed_now, repair_it = sorted(set(cfg.remove)), cfg.repair is not None
        selection = {"winner": "given", "repaired": repair_it, "candidates": {}}
    elif n_remove:
        chosen = choose_removal(model, calib, n_remove, cfg.select, cfg.gate, cfg.repair)
        gates, selection = chosen.gates, {"winner": chosen.winner, "repaired": chosen.repaired, "candidates": chosen.table}
        removed_now, repair_it = chosen.removed, cfg.repair is not None and chosen.repaired
    if n_remove:
        reference = copy.deepcopy(model) if repair_it else None
        remove_blocks(model, removed_now)
        if reference is not None:
            repaired = asdict(repair_cuts(model, reference, fit, cfg.repair)[1])
            del reference
    elif cfg.repair is not None:
        print("cut repair: nothing removed, so there is no cut to repair")
    removed = list(fold_info(model)["provenance"]["removed_blocks"])
    scorer = ShareScorer(model, calib, cfg)
    groups = plan_groups(model, scorer, cfg)
    schedule = [b for b, g in enumerate(groups) for _ in g]
    # every choice is scored on the unchanged model first, then all are installed
    choices = {b: scorer.best(depths) for b, depths in enumerate(tqdm(groups, desc="choosing shared weights"))
               if len(depths) > 1}
    forced = cfg.delta.base.value if cfg.delta is not None and cfg.delta.base.value != "scored" else None
    if forced:  # the deltas' base as configured, the scores kept for the record
        choices = {b: (groups[b][0] if forced == "first" else forced, table) for b, (_, table) in choices.items()}
    scores: dict[str, float] = {}
    sources: dict[int, str] = {}
    merged = {b: scorer.candidate(depths, choices[b][0]) for b, depths in enumerate(groups) if b in choices}
    current = get_adapter(model).get_layers(model)  # `layers` is the stack before removal
    originals = ({d: {n: current[d].get_parameter(n).detach().clone() for n in _shared_names(model, d)}
                  for b in choices for d in groups[b]} if cfg.delta is not None else {})
    for b, depths in enumerate(groups):
        if b not in choices:
            sources[b] = f"depth {depths[0]}"
            continue
        best, table = choices[b]
        scores.update({f"{depths}:{k}": v for k, v in table.items()})
        _install(model, depths, merged[b])
        sources[b] = best if isinstance(best, str) else f"depth {best}"
    share_blocks(model, schedule)
    deltas = add_deltas(model, originals, cfg.delta) if originals else None
    after = count_parameters(model)
    params = {
        "source_effective": before.effective, "source_unique": before.unique,
        "effective": after.effective, "unique": after.unique,
        "removed_blocks": n_remove, "removed_fraction_blocks": n_remove / len(layers),
        "unique_reduction": 1 - after.unique / before.unique,
        "effective_reduction": 1 - after.effective / before.effective,
    }
    return model, FoldReport(gates, removed, schedule, sources, scores, params, selection, repaired, deltas)


@register_method("foldgpt", FoldConfig, heal_minutes=DEFAULT_HEAL_MINUTES, configured_by_fold=True)
def fold_method(model: nn.Module, calib: torch.Tensor, cfg: FoldConfig) -> tuple[nn.Module, dict]:
    """`fold` behind the methods interface (compress.methods): the report as a dict."""
    model, report = fold(model, calib, cfg)
    return model, asdict(report)


def plan_groups(model: nn.Module, scorer: "ShareScorer", cfg: FoldConfig) -> list[list[int]]:
    """Partition depths 0..n-1 into runs of adjacent depths."""
    n = len(get_adapter(model).get_layers(model))
    if cfg.num_unique_blocks is None:
        size = cfg.group_size or 1
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    groups = [[d] for d in range(n)]
    delta = _delta_share(model, cfg)
    with tqdm(total=n - cfg.num_unique_blocks, desc="planning shared groups") as bar:
        while _unique_blocks(groups, delta) > cfg.num_unique_blocks + 1e-9:
            options = []
            for i in range(len(groups) - 1):
                merged = groups[i] + groups[i + 1]
                if len(merged) <= cfg.max_group_size:
                    options.append((min(scorer.best(merged)[1].values()), i))
            if not options:
                raise ValueError(f"cannot reach {cfg.num_unique_blocks} unique blocks with groups of at most "
                                 f"{cfg.max_group_size} (deltas cost {delta:.3f} block per shared depth)")
            _, i = min(options)
            groups[i : i + 2] = [groups[i] + groups[i + 1]]
            bar.update(1)
    return groups


def _delta_share(model: nn.Module, cfg: FoldConfig) -> float:
    """One depth's deltas as a fraction of a block's parameters (0 without deltas)."""
    if cfg.delta is None:
        return 0.0
    block = get_adapter(model).get_layers(model)[0]
    return cfg.delta.params_per_depth(block) / sum(p.numel() for p in block.parameters())


def _unique_blocks(groups: list[list[int]], delta: float) -> float:
    """Unique parameters of a grouping in blocks: one per group, plus each shared depth's deltas."""
    return len(groups) + delta * sum(len(g) for g in groups if len(g) > 1)


def _check_delta_budget(model: nn.Module, cfg: FoldConfig) -> None:
    """With deltas, groups of max_group_size must still fit num_unique_blocks: say so before heavy work."""
    if cfg.num_unique_blocks is None:
        return
    kept = len(get_adapter(model).get_layers(model)) - cfg.num_remove(len(get_adapter(model).get_layers(model)))
    size = cfg.max_group_size
    densest = [list(range(i, min(i + size, kept))) for i in range(0, kept, size)]
    delta = _delta_share(model, cfg)
    if _unique_blocks(densest, delta) > cfg.num_unique_blocks + 1e-9:
        raise ValueError(f"{cfg.num_unique_blocks} unique blocks cannot hold {kept} retained blocks with rank "
                         f"{cfg.delta.rank} deltas ({delta:.3f} block per shared depth): lower the rank or raise "
                         "num_unique_blocks / max_group_size")


def _shared_names(model: nn.Module, depth: int) -> list[str]:
    adapter = get_adapter(model)
    return adapter.shared_param_names(adapter.get_layers(model)[depth])


def best_candidate(model: nn.Module, calib: torch.Tensor, depths: list[int], cfg: FoldConfig) -> tuple[int | str, dict]:
    """Score each candidate set of shared weights for `depths`; returns (best, {candidate: KL})."""
    return ShareScorer(model, calib, cfg).best(depths)


class ShareScorer:
    """KL(unchanged model || model with one group sharing a candidate's weights) on fixed
    calibration batches, memoised per group.

    The input of every depth (hidden states and the layer's own keyword arguments: mask,
    rotary embeddings) is captured once from the unchanged model. Installing a candidate
    in a group that starts at depth d leaves depths < d untouched, so a score reruns
    only depths d..n-1, the final norm and the head: about half a forward on average
    instead of a whole one. All scores refer to the unchanged model, so score before
    installing anything.
    """

    def __init__(self, model: nn.Module, calib: torch.Tensor, cfg: FoldConfig):
        self.model, self.cfg = model, cfg
        self.adapter = get_adapter(model)
        self.layers = self.adapter.get_layers(model)
        self.memo: dict[tuple[int, ...], tuple[int | str, dict]] = {}
        self.gram_memo: dict[int, dict[str, torch.Tensor]] = {}
        self.replay = Replay(model, _score_batches(calib, cfg))
        self.inputs = self.replay.inputs  # batch -> depth -> (args, kwargs)
        self.reference = [F.log_softmax(logits.float(), -1) for logits in self.replay.logits]
        self.replay.logits.clear()

    def tail_logits(self, batch: int, start: int) -> torch.Tensor:
        """Logits of depths start..n-1 run on depth `start`'s captured input."""
        return self.replay.tail_logits(batch, start)

    def best(self, depths: list[int]) -> tuple[int | str, dict]:
        """(best candidate, {candidate: KL}) for sharing one set of weights across `depths`."""
        key = tuple(depths)
        if key not in self.memo:
            candidates: list[int | str] = list(depths) + ([MEAN, REGMEAN] if self.cfg.merge_candidates else [])
            table = {}
            for cand in candidates:
                with _swapped(self.model, depths, self.candidate(depths, cand)):
                    table[str(cand)] = sum(
                        F.kl_div(F.log_softmax(self.tail_logits(b, depths[0]).float(), -1).flatten(0, 1),
                                 ref.flatten(0, 1), log_target=True, reduction="batchmean").item()
                        for b, ref in enumerate(self.reference)
                    ) / len(self.reference)
            best = min(table, key=table.get)
            self.memo[key] = (best if best in (MEAN, REGMEAN) else int(best)), table
        return self.memo[key]

    def candidate(self, depths: list[int], cand: int | str) -> dict[str, torch.Tensor]:
        """The large weights a candidate gives the group, by parameter name."""
        names = self.adapter.shared_param_names(self.layers[depths[0]])
        if isinstance(cand, int):
            return {n: self.layers[cand].get_parameter(n).detach().clone() for n in names}
        members = {n: [self.layers[d].get_parameter(n).detach() for d in depths] for n in names}
        grams = [self.grams(d) for d in depths] if cand == REGMEAN else None
        merged = {}
        for n, ws in members.items():
            module = n.rpartition(".")[0]
            if grams and n.endswith(".weight") and module in grams[0]:
                merged[n] = regmean(ws, [g[module] for g in grams], self.cfg.regmean_alpha)
            else:  # the mean, and RegMean's choice for what is not a Linear weight (biases)
                merged[n] = torch.stack(ws).mean(0)
        return merged

    @torch.no_grad()
    def grams(self, depth: int) -> dict[str, torch.Tensor]:
        """X^T X of the inputs to every Linear of `depth`, over the calibration batches
        (inputs of the unchanged model, like every score)."""
        if depth not in self.gram_memo:
            layer = self.layers[depth]
            grams: dict[str, torch.Tensor] = {}

            def accumulate(name):
                def hook(_m, args):
                    x = args[0].detach().flatten(0, -2).double()
                    grams[name] = grams.get(name, 0) + x.T @ x
                return hook

            hooks = [m.register_forward_pre_hook(accumulate(n)) for n, m in layer.named_modules()
                     if isinstance(m, nn.Linear)]
            try:
                for inputs in self.inputs:
                    args, kwargs = inputs[depth]
                    layer(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            self.gram_memo[depth] = grams
        return self.gram_memo[depth]


def regmean(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """RegMean merge of Linear weights (out, in) given each member's input Gram (in, in):
    argmin_W sum_d ||X_d W^T - X_d W_d^T||^2 with off-diagonal Gram entries scaled by alpha."""
    def shrink(g):
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))

    g = [shrink(x.double()) for x in grams]
    lhs = sum(g)
    rhs = sum(gd @ w.double().T for gd, w in zip(g, weights))
    # a Linear whose inputs never span some direction leaves lhs singular: a tiny ridge keeps it solvable
    ridge = 1e-6 * torch.diagonal(lhs).mean().clamp_min(1e-12)
    sol = torch.linalg.solve(lhs + ridge * torch.eye(len(lhs), dtype=lhs.dtype), rhs)
    return sol.T.to(weights[0].dtype).contiguous()


def _score_batches(calib: torch.Tensor, cfg: FoldConfig) -> list[torch.Tensor]:
    n = min(len(calib), cfg.score_batches * cfg.score_batch_size)
    return [calib[i : i + cfg.score_batch_size] for i in range(0, n, cfg.score_batch_size)]


class _swapped:
    """Temporarily give every depth in `depths` the candidate's large weights."""

    def __init__(self, model, depths, tensors: dict[str, torch.Tensor]):
        self.layers = get_adapter(model).get_layers(model)
        self.depths = depths
        self.new = tensors
        self.saved = {}

    def __enter__(self):
        for d in self.depths:
            for n, t in self.new.items():
                p = self.layers[d].get_parameter(n)
                self.saved[(d, n)] = p.data
                p.data = t

    def __exit__(self, *exc):
        for (d, n), data in self.saved.items():
            self.layers[d].get_parameter(n).data = data


def _install(model: nn.Module, depths: list[int], tensors: dict[str, torch.Tensor]) -> None:
    """Write the chosen weights into the group's first depth (which `share_blocks` then shares)."""
    layers = get_adapter(model).get_layers(model)
    with torch.no_grad():
        for n, t in tensors.items():
            layers[depths[0]].get_parameter(n).copy_(t)
