"""Closed-form repair at each cut (ReplaceMe, Shopkhoev et al., arXiv 2505.02819).

Removing a run of blocks hands the state leaving the last kept block before it to a
block that was trained on the state leaving the run. One linear map T (hidden x hidden)
per cut, fitted by least squares on calibration tokens, bridges the two:

    min_T || Y + M T - L ||^2      M  the MLP output of the last kept block before the cut
                                   Y  that block's output without its MLP term
                                   L  the dense model's state leaving the run's last removed block

T = (M^T M + lam I)^-1 (M^T (L - Y) + lam I), least squares with a ridge towards the
identity (lam -> infinity leaves the block as it is), is folded into that block's down projection
(W <- T^T W), so the repaired model has exactly the pruned model's tensors and layout:
no new parameters, nothing new for the exporters. A cut before the first kept block has
no block to fold into and is left as it is (the report says so).

How M and Y are measured (RepairFit):
  sequential  on the pruned model itself, cut after cut from the shallowest, each after
              the ones before it were repaired: a later cut sees what the earlier ones
              left (default: with many cuts, fits on dense activations compound)
  dense       every cut on the dense model's activations, as the paper fits them
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import fold_info, schedule_of
from compress.capture import batches, block_io
from compress.registry import enum_choice


class RepairFit(str, Enum):
    SEQUENTIAL = "sequential"
    DENSE = "dense"


@dataclass
class RepairConfig:
    fit: RepairFit = RepairFit.SEQUENTIAL
    batch_size: int = 4
    max_sequences: int | None = None  # calibration sequences used (None: all)
    ridge: float = 1e-4  # pull towards T = I (no repair), relative to the mean diagonal of M^T M

    def __post_init__(self):
        self.fit = enum_choice(RepairFit, self.fit, "repair fit")
        if self.batch_size < 1:
            raise ValueError(f"repair batch_size must be positive, got {self.batch_size}")
        if self.ridge < 0:
            raise ValueError(f"repair ridge must be >= 0, got {self.ridge}")

    def check(self, calib: torch.Tensor, hidden_size: int) -> None:
        """Least squares for a hidden x hidden map needs at least `hidden_size` tokens."""
        n = len(calib) if self.max_sequences is None else min(len(calib), self.max_sequences)
        if n * calib.shape[-1] < hidden_size:
            raise ValueError(f"cut repair needs at least hidden_size={hidden_size} calibration tokens, "
                             f"got {n * calib.shape[-1]}")


@dataclass
class Cut:
    depth: int  # current depth of the last kept block before the cut (-1: the cut is before every block)
    removed: list[int]  # source depths removed at this cut
    target: int  # source depth whose output the repaired block should reproduce


@dataclass
class RepairReport:
    fit: str
    cuts: list[dict] = field(default_factory=list)  # per cut: depth, removed, mse before / after, tokens
    skipped: list[dict] = field(default_factory=list)  # cuts with no block to fold T into


def find_cuts(model: nn.Module) -> list[Cut]:
    """The runs of removed source blocks, each with the kept block in front of it."""
    prov = fold_info(model)["provenance"]
    kept, n = prov["source_depths"], prov["source_num_layers"]
    cuts = []
    if kept[0] > 0:
        cuts.append(Cut(-1, list(range(kept[0])), kept[0] - 1))
    for d, src in enumerate(kept):
        nxt = kept[d + 1] if d + 1 < len(kept) else n
        if nxt > src + 1:
            cuts.append(Cut(d, list(range(src + 1, nxt)), nxt - 1))
    return cuts


def _mlp_out(model: nn.Module, depth: int) -> nn.Linear:
    adapter = get_adapter(model)
    if adapter.mlp_out is None:
        raise ValueError(f"cut repair does not apply to {adapter.model_type}: a norm follows its MLP, "
                         "so a map on the MLP output cannot fold into the down projection")
    return adapter.get_layers(model)[depth].get_submodule(adapter.mlp_out)


def _accumulate(model: nn.Module, depth: int, data: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
    """Normal equations of one cut: A = M^T M, B = M^T (L - Y), and ||L - Y||^2, over `data`."""
    proj = _mlp_out(model, depth)
    seen = {}
    handle = proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("m", out))
    h = model.config.hidden_size
    acc = {"A": torch.zeros(h, h, dtype=torch.float64), "B": torch.zeros(h, h, dtype=torch.float64),
           "rr": 0.0, "tokens": 0}
    try:
        for batch, target in zip(data, targets):
            out = block_io(model, batch, outputs=[depth]).outputs[depth]
            m = seen["m"].flatten(0, -2).double()
            r = target.flatten(0, -2).double() - (out.flatten(0, -2).double() - m)  # L - Y
            acc["A"] += m.T @ m
            acc["B"] += m.T @ r
            acc["rr"] += float((r * r).sum())
            acc["tokens"] += len(m)
    finally:
        handle.remove()
    return acc


def _solve(acc: dict, ridge: float) -> tuple[torch.Tensor, float, float]:
    """T and the mean squared error per token before (T = I) and after."""
    a, b = acc["A"], acc["B"]
    lam = ridge * float(torch.diagonal(a).mean().clamp_min(1e-12))
    eye = torch.eye(len(a), dtype=a.dtype)
    t = torch.linalg.solve(a + lam * eye, b + lam * eye)

    def sse(m):  # ||M m - R||^2 from the normal equations
        return float(torch.trace(m.T @ a @ m) - 2 * torch.trace(m.T @ b)) + acc["rr"]

    n = acc["tokens"]
    return t, sse(torch.eye(len(a), dtype=a.dtype)) / n, sse(t) / n


@torch.no_grad()
def fold_map(proj: nn.Linear, t: torch.Tensor) -> None:
    """Make `proj` output y T instead of y: W <- T^T W (and b <- b T)."""
    proj.weight.copy_((t.T @ proj.weight.double()).to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((proj.bias.double() @ t).to(proj.bias.dtype))


@torch.no_grad()
def repair_cuts(model: nn.Module, dense: nn.Module, calib: torch.Tensor, cfg: RepairConfig) -> tuple[nn.Module, RepairReport]:
    """Fit and fold one map per cut of the pruned `model` (edited in place) against `dense`,
    the model it was pruned from. Raises ValueError when nothing was removed, when a block
    before a cut is shared (repair before sharing), or with too few calibration tokens."""
    cuts = find_cuts(model)
    if not cuts:
        raise ValueError("nothing was removed: there is no cut to repair")
    cfg.check(calib, model.config.hidden_size)
    if len(get_adapter(dense).get_layers(dense)) != fold_info(model)["provenance"]["source_num_layers"]:
        raise ValueError("the reference for cut repair must be the unpruned source model")
    schedule = schedule_of(model)
    report = RepairReport(cfg.fit.value)
    report.skipped = [{"removed": c.removed, "why": "no kept block before the cut"} for c in cuts if c.depth < 0]
    cuts = [c for c in cuts if c.depth >= 0]
    if not cuts:
        return model, report
    for c in cuts:
        if schedule.count(schedule[c.depth]) > 1:
            raise ValueError(f"depth {c.depth} (before cut {c.removed}) is shared: repair cuts before sharing")
        _mlp_out(model, c.depth)  # the family check, before any forward
    data = batches(calib, cfg.batch_size, cfg.max_sequences)
    targets = {c.target: [] for c in cuts}
    for batch in tqdm(data, desc="dense states at the cuts", leave=False):
        io = block_io(dense, batch, outputs=targets)
        for t in targets:
            targets[t].append(io.outputs[t])
    source = fold_info(model)["provenance"]["source_depths"]
    fits = {}
    if cfg.fit is RepairFit.DENSE:  # every map from dense activations, all fitted before any is folded
        fits = {c.depth: _accumulate(dense, source[c.depth], data, targets[c.target]) for c in cuts}
    for c in tqdm(cuts, desc="repairing cuts"):
        acc = fits.get(c.depth) or _accumulate(model, c.depth, data, targets[c.target])
        t, before, after = _solve(acc, cfg.ridge)
        fold_map(_mlp_out(model, c.depth), t)
        report.cuts.append({"depth": c.depth, "removed": c.removed, "tokens": acc["tokens"],
                            "mse_before": round(before, 6), "mse_after": round(after, 6)})
    return model, report
