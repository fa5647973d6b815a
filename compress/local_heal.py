"""Block-local healing at each cut, before the end-to-end cure.

The cure's step is a forward and backward of the whole model and its head (on the
default model the head alone costs as much as 8 blocks), so in minutes it takes few
steps. Most of what a removal breaks is local: the kept block before a cut hands the
next block a state it was never trained on. Training just that block (its weights and
norms) to reproduce the dense model's state at the cut's far side costs one block per
step, so the same minutes buy many more steps there.

For each cut, shallow to deep (compress.repair.find_cuts; a cut before every block has
no block to train), the pruned model's input to that block and the dense state leaving
the run are captured once for `pool` healing windows, on the model as healed so far,
and the block is trained on them by MSE (or 1 - cosine) with AdamW. A block that shares
its weights with other depths is left to the cure (training it here would move them too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.blocks import schedule_of
from compress.capture import block_io
from compress.repair import find_cuts


class LocalLoss(str, Enum):
    MSE = "mse"
    COSINE = "cosine"


@dataclass
class LocalHealConfig:
    max_minutes: float | None = 4.0  # for all cuts together, split evenly
    max_steps: int | None = None  # per cut
    pool: int = 64  # healing windows whose block inputs and dense targets are captured per cut
    batch_size: int = 4
    lr: float = 1e-4
    norm_lr: float = 1e-3
    loss: LocalLoss = LocalLoss.MSE
    eval_windows: int = 8  # of the pool, kept out of training to report the error before / after
    seed: int = 0

    def __post_init__(self):
        from compress.methods import enum_choice

        self.loss = enum_choice(LocalLoss, self.loss, "local healing loss")
        if self.max_minutes is None and self.max_steps is None:
            raise ValueError("local healing needs a budget: max_minutes or max_steps")
        for name in ("max_minutes", "max_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"local healing {name} must be positive, got {v}")
        if self.batch_size < 1 or self.pool <= self.eval_windows or self.eval_windows < 1:
            raise ValueError("local healing needs batch_size >= 1 and pool > eval_windows >= 1")


@dataclass
class LocalHealReport:
    cuts: list[dict] = field(default_factory=list)  # depth, removed, steps, seconds, eval loss before / after
    skipped: list[dict] = field(default_factory=list)


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: LocalLoss) -> torch.Tensor:
    if kind is LocalLoss.MSE:
        return F.mse_loss(pred.float(), target.float())
    return 1 - F.cosine_similarity(pred.float().flatten(0, -2), target.float().flatten(0, -2), dim=-1).mean()


def _run(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def local_heal(model: nn.Module, dense: nn.Module, data: torch.Tensor, cfg: LocalHealConfig) -> tuple[nn.Module, LocalHealReport]:
    """Train the block before each cut of `model` (edited in place) towards `dense`, the
    model it was pruned from, on windows of `data` (LongTensor [n, seq]). Raises ValueError
    when nothing was removed or there are fewer windows than the pool needs."""
    cuts = find_cuts(model)
    if not cuts:
        raise ValueError("nothing was removed: there is no cut to heal")
    if len(data) < cfg.pool:
        raise ValueError(f"local healing captures {cfg.pool} windows per cut; only {len(data)} were given")
    schedule = schedule_of(model)
    report = LocalHealReport()
    report.skipped = [{"removed": c.removed, "why": "no kept block before the cut"} for c in cuts if c.depth < 0]
    report.skipped += [{"removed": c.removed, "why": f"depth {c.depth} is shared"} for c in cuts
                       if c.depth >= 0 and schedule.count(schedule[c.depth]) > 1]
    cuts = [c for c in cuts if c.depth >= 0 and schedule.count(schedule[c.depth]) == 1]
    if not cuts:
        return model, report
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = data[torch.randperm(len(data), generator=gen)[: cfg.pool]]
    seconds = None if cfg.max_minutes is None else cfg.max_minutes * 60 / len(cuts)
    for c in tqdm(cuts, desc="local healing at the cuts"):
        t0 = time.monotonic()
        xs, ys, kw = [], [], None
        with torch.no_grad():
            for i in range(0, len(pool), cfg.batch_size):
                batch = pool[i : i + cfg.batch_size]
                io = block_io(model, batch, inputs=[c.depth], kwargs=[c.depth])
                xs.append(io.inputs[c.depth])
                kw = io.kwargs[c.depth]
                ys.append(block_io(dense, batch, outputs=[c.target]).outputs[c.target])
        x, y = torch.cat(xs), torch.cat(ys)  # (pool, T, H)
        n_train = len(x) - cfg.eval_windows
        block = adapter.get_layers(model)[c.depth]
        norms = set(adapter.per_depth_param_names(block))
        params = dict(block.named_parameters())
        was = {n: p.requires_grad for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if n not in norms], "lr": cfg.lr},
                                 {"params": [p for n, p in params.items() if n in norms], "lr": cfg.norm_lr}],
                                weight_decay=0.0)

        def evaluate() -> float:
            with torch.no_grad():
                return _loss(_run(block, x[n_train:], _expand(kw, cfg.eval_windows)), y[n_train:], cfg.loss).item()

        before, step = evaluate(), 0
        try:
            while (cfg.max_steps is None or step < cfg.max_steps) and (seconds is None or time.monotonic() - t0 < seconds):
                idx = torch.randint(n_train, (min(cfg.batch_size, n_train),), generator=gen)
                loss = _loss(_run(block, x[idx], _expand(kw, len(idx))), y[idx], cfg.loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        finally:
            for n, p in params.items():
                p.requires_grad_(was[n])
        report.cuts.append({"depth": c.depth, "removed": c.removed, "steps": step,
                            "seconds": round(time.monotonic() - t0, 1), "loss": cfg.loss.value,
                            "eval_before": round(before, 6), "eval_after": round(evaluate(), 6)})
    return model, report


def _expand(kwargs: dict, batch: int) -> dict:
    """The captured call arguments for a batch of another size: masks and positions repeat per row."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] not in (1, batch):
            v = v[:1].expand(batch, *v.shape[1:])
        elif isinstance(v, tuple):
            v = tuple(t[:1].expand(batch, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.shape[0] not in (1, batch)
                      else t for t in v)
        out[k] = v
    return out
