"""Block-local healing at each cut and in each shared group, before end-to-end healing.

Healing's step is a forward and backward of the whole model and its head (on the
default model the head alone costs as much as 8 blocks), so in minutes it takes few
steps. Most of what a fold breaks is local, and local training costs one block a step:

- a cut: the kept block before it hands the next block a state it was never trained
  on. That block (weights and norms) is trained to reproduce the dense model's state at
  the cut's far side from the pruned model's own input (as healed so far), shallow to
  deep (compress.repair.find_cuts; a cut before every block has no block to train).
- a shared group: its one set of weights now serves several depths. The group's base,
  each depth's deltas (compress.delta) and norms are trained together so that every
  depth reproduces its dense block's output (the dense state entering the next kept
  source block, so a cut after the depth is covered too) from cached dense inputs.

Inputs and targets are captured once for `pool` healing windows; AdamW on MSE (or 1 -
cosine); the minutes are split over the units by how many blocks a step of each runs.
Under several processes every process captures the pool, draws the same batches and trains
on its rows of each, gradients averaged (compress.parallel): one process's result, sooner.
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
from compress.blocks import fold_info, schedule_of
from compress.capture import block_io
from compress.parallel import any_process, average_gradients, own_rows, world
from compress.repair import find_cuts
from compress.registry import enum_choice


class LocalLoss(str, Enum):
    MSE = "mse"
    COSINE = "cosine"


@dataclass
class LocalHealConfig:
    max_minutes: float | None = 4.0  # for all cuts and groups together, split by blocks per step
    max_steps: int | None = None  # per cut or group
    pool: int = 64  # healing windows whose block inputs and dense targets are captured (all, if fewer)
    batch_size: int = 4
    lr: float = 1e-4
    norm_lr: float = 1e-3
    loss: LocalLoss = LocalLoss.MSE
    eval_windows: int = 8  # of the pool (at most a quarter of it), kept out of training to report the error before / after
    groups: bool = True  # also train each shared group (base, deltas, norms) towards its dense blocks
    seed: int = 0

    def __post_init__(self):
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
    groups: list[dict] = field(default_factory=list)  # depths, source depths, steps, seconds, eval loss before / after
    seconds: float = 0.0  # the whole stage, captures included: what max_minutes bounds
    skipped: list[dict] = field(default_factory=list)


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: LocalLoss) -> torch.Tensor:
    if kind is LocalLoss.MSE:
        return F.mse_loss(pred.float(), target.float())
    return 1 - F.cosine_similarity(pred.float().flatten(0, -2), target.float().flatten(0, -2), dim=-1).mean()


def _run(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def has_units(model: nn.Module, cfg: LocalHealConfig) -> bool:
    """Whether `model` has a cut or (with cfg.groups) a shared group for local healing to train."""
    schedule = schedule_of(model)
    return bool(find_cuts(model)) or (cfg.groups and len(set(schedule)) < len(schedule))


def local_heal(model: nn.Module, dense: nn.Module, data: torch.Tensor, cfg: LocalHealConfig) -> tuple[nn.Module, LocalHealReport]:
    """Train the block before each cut of `model` (edited in place), and each shared group,
    towards `dense`, the model it was folded from, on windows of `data` (LongTensor [n, seq]).
    Raises ValueError when nothing was removed or shared, given fewer than 2 windows, or a batch
    that does not split over the processes."""
    schedule = schedule_of(model)
    shared = {b for b in schedule if schedule.count(b) > 1}
    all_cuts = find_cuts(model)
    groups = [[d for d, b in enumerate(schedule) if b == blk] for blk in sorted(shared)] if cfg.groups else []
    if not all_cuts and not groups:
        raise ValueError("nothing was removed or shared: there is no cut or group to heal locally")
    if len(data) < 2:
        raise ValueError(f"local healing needs at least 2 healing windows (one to train on, one to measure); got {len(data)}")
    report = LocalHealReport()
    report.skipped = [{"removed": c.removed, "why": "no kept block before the cut"} for c in all_cuts if c.depth < 0]
    report.skipped += [{"removed": c.removed, "why": f"depth {c.depth} is shared"
                        + (" (trained with its group)" if cfg.groups else "")}
                       for c in all_cuts if c.depth >= 0 and schedule[c.depth] in shared]
    cuts = [c for c in all_cuts if c.depth >= 0 and schedule[c.depth] not in shared]
    if not cuts and not groups:
        return model, report
    t_start = time.monotonic()
    deadline = None if cfg.max_minutes is None else t_start + cfg.max_minutes * 60
    gen = torch.Generator().manual_seed(cfg.seed)
    pool = data[torch.randperm(len(data), generator=gen)[: cfg.pool]]
    adapter = get_adapter(model)
    layers = adapter.get_layers(model)
    norms = {id(layer.get_parameter(n)) for layer in layers for n in adapter.norm_param_names(layer)}
    src = fold_info(model)["provenance"]["source_depths"]
    n = fold_info(model)["provenance"]["source_num_layers"]
    targets = {d: (src[d + 1] if d + 1 < len(src) else n) - 1 for g in groups for d in g}  # dense block leaving the next input
    # one pass of the dense model gives every group's inputs and targets and every cut's target
    dense_in, dense_out, dense_kw = _capture(dense, pool, [src[d] for g in groups for d in g],
                                             list(targets.values()) + [c.target for c in cuts], cfg.batch_size)
    remaining = sum(len(g) for g in groups) + len(cuts)  # blocks one step of every unit left runs

    def allowance(cost: int, since: float) -> float | None:
        """The unit's share of the time left (capture included), by the blocks its step runs."""
        return None if deadline is None else max(0.0, (deadline - since) * cost / remaining - (time.monotonic() - since))

    quiet = world()[0] != 0
    for depths in tqdm(groups, desc="local healing of shared groups", disable=quiet):
        t0 = time.monotonic()
        x, y = [dense_in[src[d]] for d in depths], [dense_out[targets[d]] for d in depths]
        steps, before, after = _train([layers[d] for d in depths], x, y, dense_kw, cfg, allowance(len(depths), t0), gen, norms)
        remaining -= len(depths)
        report.groups.append({"depths": depths, "source_depths": [src[d] for d in depths], "steps": steps,
                              "seconds": round(time.monotonic() - t0, 1), "loss": cfg.loss.value,
                              "eval_before": round(before, 6), "eval_after": round(after, 6)})
    for c in tqdm(cuts, desc="local healing at the cuts", disable=quiet):  # after the groups: a cut's input is the model's own, as healed
        t0 = time.monotonic()
        x, _, kw = _capture(model, pool, [c.depth], [], cfg.batch_size)
        steps, before, after = _train([layers[c.depth]], [x[c.depth]], [dense_out[c.target]], kw, cfg, allowance(1, t0), gen, norms)
        remaining -= 1
        report.cuts.append({"depth": c.depth, "removed": c.removed, "steps": steps,
                            "seconds": round(time.monotonic() - t0, 1), "loss": cfg.loss.value,
                            "eval_before": round(before, 6), "eval_after": round(after, 6)})
    report.seconds = round(time.monotonic() - t_start, 1)
    return model, report


@torch.no_grad()
def _capture(model: nn.Module, pool: torch.Tensor, inputs: list[int], outputs: list[int],
             batch_size: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict | None]:
    """The states entering `inputs` and leaving `outputs` (depths of `model`) for every pool
    window, and the call keyword arguments of the first input depth (mask, rotary
    embeddings: the same at every depth)."""
    ins: dict[int, list[torch.Tensor]] = {d: [] for d in inputs}
    outs: dict[int, list[torch.Tensor]] = {d: [] for d in outputs}
    kw = None
    for i in range(0, len(pool), batch_size):
        io = block_io(model, pool[i : i + batch_size], inputs=list(ins), outputs=list(outs), kwargs=inputs[:1])
        for d in ins:
            ins[d].append(io.inputs[d])
        for d in outs:
            outs[d].append(io.outputs[d])
        kw = io.kwargs[inputs[0]] if inputs else None
    return {d: torch.cat(t) for d, t in ins.items()}, {d: torch.cat(t) for d, t in outs.items()}, kw


def _train(blocks: list[nn.Module], xs: list[torch.Tensor], ys: list[torch.Tensor], kw: dict,
           cfg: LocalHealConfig, seconds: float | None, gen: torch.Generator, norms: set[int]) -> tuple[int, float, float]:
    """AdamW on the mean loss of `blocks[i](xs[i]) ~ ys[i]` over the blocks' unique parameters
    (shared weights once, each depth's norms and deltas; `norms`: ids of norm weights, at
    norm_lr); returns (steps, eval loss before, eval loss after)."""
    params = list({id(p): p for b in blocks for p in b.parameters()}.values())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in norms], "lr": cfg.lr},
                             {"params": [p for p in params if id(p) in norms], "lr": cfg.norm_lr}], weight_decay=0.0)
    n_train = len(xs[0]) - min(cfg.eval_windows, max(1, len(xs[0]) // 4))  # a small pool keeps most for training
    rows = own_rows(min(cfg.batch_size, n_train), "local healing")

    def loss_on(idx) -> torch.Tensor:
        return sum(_loss(_run(b, x[idx], _expand(kw, len(x[idx]))), y[idx], cfg.loss)
                   for b, x, y in zip(blocks, xs, ys)) / len(blocks)

    def evaluate() -> float:
        with torch.no_grad():
            return loss_on(slice(n_train, None)).item()

    t0, step = time.monotonic(), 0
    before = evaluate()
    try:
        while (cfg.max_steps is None or step < cfg.max_steps) and not any_process(
                seconds is not None and time.monotonic() - t0 >= seconds):
            loss = loss_on(torch.randint(n_train, (min(cfg.batch_size, n_train),), generator=gen)[rows])
            opt.zero_grad()
            loss.backward()
            average_gradients(params)
            opt.step()
            step += 1
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return step, before, evaluate()


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
