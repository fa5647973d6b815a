"""Per-depth low-rank deltas on shared blocks: sharing that keeps each depth's own direction.

Pure tying makes every depth of a group compute the same function up to its norms, which
costs more quality than removing a block of the same size (benchmarks/results/peers.md).
DeltaLLM (arXiv 2501.18596) and Relaxed Recursive Transformers (arXiv 2410.20672) give
each depth a small low-rank correction on the shared weights, initialised from the
truncated SVD of (W_depth - W_shared): y = x W^T + b + (x A^T) B^T. W is stored once
for the group; A (rank x in) and B (out x rank) are this depth's own tensors, never
added into a materialised W + AB, so the bytes stay the base's plus the deltas'.

A delta lives in a `DeltaLinear`, an nn.Linear whose `weight` and `bias` are the group's
shared Parameters (same names, so sharing by Parameter identity and the saved layout are
unchanged) with a child `delta` (`LowRankDelta`) holding `a` and `b`. The adapter counts
delta tensors as per-depth, like norms (compress.adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from compress.adapter import get_adapter
from compress.registry import enum_choice


class DeltaBase(str, Enum):
    SCORED = "scored"  # the shared weights fold picks by KL without deltas (a member, the mean or RegMean)
    FIRST = "first"  # the group's first member: its own depth starts exact
    MEAN = "mean"
    REGMEAN = "regmean"


class DeltaInit(str, Enum):
    SVD = "svd"  # truncated SVD of (W_depth - W_shared): the best rank-r start
    ZERO = "zero"  # LoRA's start: A random, B = 0, so the delta begins as nothing


@dataclass
class DeltaConfig:
    rank: int = 16
    init: DeltaInit = DeltaInit.SVD
    linears: tuple[str, ...] | None = None  # Linear names in a block (e.g. "mlp.down_proj"); None: every shared Linear
    base: DeltaBase = DeltaBase.SCORED  # what the deltas correct: with deltas the best base may differ

    def __post_init__(self):
        self.init = enum_choice(DeltaInit, self.init, "delta init")
        self.base = enum_choice(DeltaBase, self.base, "delta base")
        if isinstance(self.linears, str):
            self.linears = tuple(n for n in self.linears.split(",") if n)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"delta rank must be a positive integer, got {self.rank!r}")

    def targets(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The Linears of `block` that get a delta; raises ValueError for an unknown name or a
        rank above min(in, out) of one of them (where a low-rank delta is no saving)."""
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        names = list(self.linears) if self.linears is not None else list(linears)
        unknown = [n for n in names if n not in linears]
        if unknown:
            raise ValueError(f"no Linear {unknown[0]!r} in a block; its Linears: {', '.join(linears)}")
        for n in names:
            m = linears[n]
            if self.rank > min(m.in_features, m.out_features):
                raise ValueError(f"delta rank {self.rank} exceeds min(in, out) = "
                                 f"{min(m.in_features, m.out_features)} of {n}")
        return {n: linears[n] for n in names}

    def params_per_depth(self, block: nn.Module) -> int:
        """Parameters one depth's deltas add: rank x (in + out) per Linear."""
        return sum(self.rank * (m.in_features + m.out_features) for m in self.targets(block).values())


class LowRankDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b)


class DeltaLinear(nn.Linear):
    """A shared Linear (the same `weight` / `bias` Parameters as its group) plus this
    depth's delta. Still an nn.Linear, so code that looks for Linears finds it."""

    def __init__(self, linear: nn.Linear, rank: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.delta = LowRankDelta(linear.in_features, linear.out_features, rank).to(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)


def _replace(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


@torch.no_grad()
def init_delta(delta: LowRankDelta, diff: torch.Tensor | None, init: DeltaInit, generator: torch.Generator) -> float:
    """Start `delta` at the best rank-r approximation of `diff` (SVD) or at zero (B = 0);
    A is random where the SVD leaves nothing to start from, so B still gets gradients.
    Returns the relative Frobenius error of the start, ||diff - BA|| / ||diff|| (0 for no diff)."""
    rank, in_features = delta.a.shape
    random_a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
    norm = 0.0 if diff is None else diff.double().norm().item()
    if init is DeltaInit.ZERO or norm == 0.0:
        delta.a.copy_(random_a)
        delta.b.zero_()
        return 0.0 if norm == 0.0 else 1.0
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    root = s[:rank].sqrt()
    delta.b.copy_((u[:, :rank] * root).to(delta.b.dtype))
    delta.a.copy_((root[:, None] * vh[:rank]).to(delta.a.dtype))
    return (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def add_deltas(model: nn.Module, originals: dict[int, dict[str, torch.Tensor]], cfg: DeltaConfig,
               seed: int = 0) -> dict:
    """Give each depth in `originals` (depth -> its own weights before sharing, by parameter
    name) a delta on every target Linear, initialised from (original - shared). Edits
    `model` in place; returns {depth: {linear: relative init error}}."""
    layers = get_adapter(model).get_layers(model)
    gen = torch.Generator().manual_seed(seed)
    errors: dict[int, dict[str, float]] = {}
    for depth, weights in sorted(originals.items()):
        block = layers[depth]
        errors[depth] = {}
        for name, linear in cfg.targets(block).items():
            wrapped = DeltaLinear(linear, cfg.rank)
            own = weights.get(f"{name}.weight")
            diff = None if own is None else own.to(linear.weight.dtype) - linear.weight.detach()
            errors[depth][name] = round(init_delta(wrapped.delta, diff, cfg.init, gen), 6)
            _replace(block, name, wrapped)
    return errors


def delta_spec(model: nn.Module) -> dict[str, dict[str, int]]:
    """{depth: {linear: rank}} of every delta: what the folded format records to rebuild them."""
    spec: dict[str, dict[str, int]] = {}
    for depth, block in enumerate(get_adapter(model).get_layers(model)):
        ranks = {n: m.delta.a.shape[0] for n, m in block.named_modules() if isinstance(m, DeltaLinear)}
        if ranks:
            spec[str(depth)] = ranks
    return spec


def attach_deltas(model: nn.Module, spec: dict[str, dict[str, int]]) -> nn.Module:
    """Rebuild empty deltas from `delta_spec` output (the loader then fills them)."""
    layers = get_adapter(model).get_layers(model)
    for depth, ranks in spec.items():
        block = layers[int(depth)]
        for name, rank in ranks.items():
            linear = block.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"delta on {name!r} at depth {depth}: not a Linear in this architecture")
            _replace(block, name, DeltaLinear(linear, rank))
    return model
