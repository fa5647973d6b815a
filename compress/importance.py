"""Block importance by learnable gates (FoldGPT, arXiv 2407.00928, step 1).

Each decoder block i gets a gate that scales its residual update,
    h_out = h + g_i * (block(h) - h),
and all gates are trained *jointly* with the block weights frozen, so a block's score
reflects what the others already do (ShortGPT-style per-block scores cannot see that
two adjacent blocks may be redundant only together).

Gates are stochastic: s_i is the logit of block i's keep probability p_i = sigmoid(s_i),
and each sequence of a step's batch draws its own relaxed Bernoulli sample
g_i = sigmoid((s_i + L_i) / T) with logistic noise L_i (the binary-concrete relaxation),
so a step averages the gradient over batch_size sub-networks for the cost of one batch.
One sample per step left the choice at the mercy of the seed (at 10 of 30 blocks on the
default model, seeds 0/1/2 chose removals 7.1x/13.5x/19.4x dense held-out perplexity:
benchmarks/results/gate_settings_one_sample.md). The loss is

    KL(dense || gated) on next-token distributions   (+ optional final-hidden MSE)
  + polarization * mean(4 p (1 - p))                  drives every probability to 0 or 1

under the budget constraint sum_i w_i p_i = K, with K the cost of the blocks kept and
w_i a block's share of cost (1 per block, or its parameters / mean block parameters).
So the gates minimise the expected loss of sub-networks that meet the budget: a sample
actually drops some blocks, and a block whose absence hurts gets its p pushed up.
Why not deterministic gates: near g = 0.9 for all, their gradient measures "every
block scaled by 0.9", where some blocks compensate for the others (positive gradients),
which is not the cost of removing any of them.

The constraint is held exactly, not penalised: after every step all logits shift by one
common constant (bisection) so the expected open mass is K. Steps are normalised by the
largest gradient (s -= lr * grad / max|grad|): Adam's per-parameter normalisation would
turn every gate's step into the sign of its gradient and erase the magnitudes that rank
the blocks. T anneals geometrically (1 -> 0.05), so late samples are nearly binary. The
closed set is the `num_remove` lowest logits (in params units, lowest first while the
budget of the `num_remove` smallest blocks pays for them). Reported gates are deterministic,
sigmoid(s / T) after a final anneal that separates the R-th and (R+1)-th logits, so
exactly R gates are below 0.5 unless two logits tie; `separated` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.adapter import get_adapter
from compress.parallel import average_gradients, own_rows, world


class BudgetUnit(str, Enum):
    BLOCKS = "blocks"
    PARAMS = "params"


@dataclass
class GateConfig:
    num_remove: int = 0  # blocks to close; fold() sets it from FoldConfig.removal_rate
    # 240 steps of 4 sequences x 64 tokens (4 sub-network samples per step): at 10 of 30 blocks
    # two seeds chose removals of 6.2x / 5.1x dense held-out perplexity, where 60 steps of 2 x 128
    # chose 7.1x-19.4x by seed (benchmarks/results/gate_settings*.md); about 5.5 min on 2 cores
    steps: int = 240
    lr: float = 0.2  # the largest logit move per step (gradients are normalised by their max)
    batch_size: int = 4
    seq_len: int | None = 64  # gates rank blocks; a short window is enough, and samples matter more than length
    polarization: float = 1.0
    budget_unit: BudgetUnit = BudgetUnit.BLOCKS
    hidden_mse: float = 0.0  # weight of the final-hidden-state MSE term
    temperature: tuple[float, float] = (1.0, 0.05)  # g = sigmoid(s / T), T annealed geometrically
    seed: int = 0
    init: tuple[float, ...] | None = None  # starting logits, one per block (e.g. another method's ranking); None: all equal

    def __post_init__(self):
        self.budget_unit = BudgetUnit(self.budget_unit)
        if self.num_remove < 0:
            raise ValueError(f"num_remove must be >= 0, got {self.num_remove}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive (got {self.steps}, {self.batch_size})")
        if self.init is not None:
            self.init = tuple(float(x) for x in self.init)


@dataclass
class GateResult:
    gates: list[float]  # final g_i per block
    closed: list[int]  # exactly num_remove blocks, lowest gates first
    separated: bool  # every closed gate < 0.5 <= every open gate
    trajectory: list[list[float]] = field(default_factory=list)  # g per step
    losses: list[dict] = field(default_factory=list)


class BlockGates(nn.Module):
    """Forward hooks that gate each block's residual update; `enabled=False` gives the dense model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.layers = get_adapter(model).get_layers(model)
        self.logits = nn.Parameter(torch.zeros(len(self.layers)))
        self.temperature = 1.0
        self.noise: torch.Tensor | None = None  # logistic noise of this step's sample, or None
        self.enabled = True
        self._handles = [
            layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]

    def values(self) -> torch.Tensor:
        """Gate values: sigmoid((s + noise) / T), relaxed Bernoulli(sigmoid(s)) samples, one
        row per sequence, when noise (batch, blocks) is set; the deterministic gates otherwise."""
        z = self.logits if self.noise is None else self.logits + self.noise
        return torch.sigmoid(z / self.temperature)

    def keep_probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            if not self.enabled:
                return output
            h = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            g = self.values()[..., i].to(out.dtype)
            gated = h + (g if g.ndim == 0 else g.view(-1, *[1] * (out.ndim - 1))) * (out - h)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _block_weights(model: nn.Module, unit: BudgetUnit) -> torch.Tensor:
    layers = get_adapter(model).get_layers(model)
    if unit is BudgetUnit.BLOCKS:
        return torch.ones(len(layers))
    sizes = torch.tensor([float(sum(p.numel() for p in layer.parameters())) for layer in layers])
    return sizes / sizes.mean()


@torch.no_grad()
def _project_to_budget(logits: torch.Tensor, weights: torch.Tensor, target: float, temperature: float) -> None:
    """Shift all logits by one constant c so that sum_i w_i sigmoid((s_i + c) / T) = target."""
    lo, hi = -100.0, 100.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if float((weights * torch.sigmoid((logits + mid) / temperature)).sum()) > target:
            hi = mid
        else:
            lo = mid
    logits.add_((lo + hi) / 2)


def _fit_budget(order: list[int], weights: torch.Tensor, removal: float) -> list[int]:
    """Lowest logits first, close each block whose cost still fits the removal budget. In
    blocks this is the first R; in params a large block the budget cannot pay for stays,
    even when its gate is the lowest (the budget held every step, so it never reached 0)."""
    closed, left = [], removal + 1e-6
    for i in order:
        if weights[i] <= left:
            closed.append(i)
            left -= float(weights[i])
    return closed


def learn_gates(model: nn.Module, data: torch.Tensor, cfg: GateConfig) -> GateResult:
    """Train one gate per block on `data` (LongTensor [n, seq]) and pick the blocks to close.

    The model's weights are not changed. Under several processes each trains on its rows of every
    batch, and the gradients are averaged: the gates one process would learn, sooner (the
    logged losses are each process's own rows). Raises
    ValueError if `num_remove` would leave no block, or the batch does not split over the processes.
    """
    n_blocks = len(get_adapter(model).get_layers(model))
    if cfg.num_remove >= n_blocks:
        raise ValueError(f"cannot close {cfg.num_remove} of {n_blocks} blocks: at least one must stay")
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"gate data must be a non-empty (n, seq) token tensor, got shape {tuple(data.shape)}")
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    gates = BlockGates(model)
    if cfg.init is not None:
        if len(cfg.init) != n_blocks:
            raise ValueError(f"gate init has {len(cfg.init)} logits for {n_blocks} blocks")
        with torch.no_grad():
            gates.logits.copy_(torch.tensor(cfg.init))
    weights = _block_weights(model, cfg.budget_unit)
    target = float(weights.sum() - weights.sort().values[: cfg.num_remove].sum())
    _project_to_budget(gates.logits, weights, target, 1.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = own_rows(min(cfg.batch_size, len(data)), "gate learning")  # all of it in one process
    result = GateResult(gates=[], closed=[], separated=False)
    was_training = model.training
    model.eval()
    try:
        for step in tqdm(range(cfg.steps), desc="learning block gates", disable=world()[0] != 0):
            t0, t1 = cfg.temperature
            gates.temperature = t0 * (t1 / t0) ** (step / max(1, cfg.steps - 1))
            # every process draws the same global batch and samples, and takes its rows of them
            batch = data[torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=gen)][:, : cfg.seq_len]
            u = torch.rand(len(batch), n_blocks, generator=gen).clamp(1e-6, 1 - 1e-6)
            batch, u = batch[rows], u[rows]
            gates.enabled = False
            with torch.no_grad():
                dense = model(batch, output_hidden_states=cfg.hidden_mse > 0)
            gates.enabled = True
            gates.noise = torch.log(u) - torch.log1p(-u)  # logistic: sigmoid(s + noise) > 0.5 w.p. sigmoid(s)
            gated = model(batch, output_hidden_states=cfg.hidden_mse > 0)
            kl = F.kl_div(
                F.log_softmax(gated.logits.float(), -1).flatten(0, 1),
                F.log_softmax(dense.logits.float(), -1).flatten(0, 1),
                log_target=True, reduction="batchmean",
            )
            p = gates.keep_probabilities()
            ramp = min(1.0, step / max(1, cfg.steps // 2))
            polar = (4 * p * (1 - p)).mean()
            loss = kl + cfg.polarization * ramp * polar
            terms = {"kl": kl.item(), "polarization": polar.item()}
            if cfg.hidden_mse > 0:
                mse = F.mse_loss(gated.hidden_states[-1], dense.hidden_states[-1])
                loss = loss + cfg.hidden_mse * mse
                terms["hidden_mse"] = mse.item()
            gates.logits.grad = None
            loss.backward()
            average_gradients([gates.logits])  # the whole batch's gradient on every process
            with torch.no_grad():  # normalised gradient step: see the module docstring
                grad = gates.logits.grad
                gates.logits.sub_(cfg.lr * grad / grad.abs().max().clamp_min(1e-12))
            _project_to_budget(gates.logits, weights, target, 1.0)
            result.trajectory.append([round(x, 5) for x in gates.keep_probabilities().tolist()])
            result.losses.append({k: round(v, 6) for k, v in terms.items()})
    finally:
        gates.noise = None
        gates.remove()
        for p, req in frozen:
            p.requires_grad_(req)
        model.train(was_training)
    # Finish the anneal: lower T until the R-th and (R+1)-th logits are 10 T apart, so the
    # budget projection leaves exactly R gates near 0 (ties aside) even after a short run.
    logits = gates.logits.detach()
    order = torch.argsort(logits).tolist()
    if 0 < cfg.num_remove < n_blocks:
        gap = float(logits[order[cfg.num_remove]] - logits[order[cfg.num_remove - 1]])
        gates.temperature = min(gates.temperature, max(gap, 1e-6) / 10)
        _project_to_budget(gates.logits, weights, target, gates.temperature)
    final = gates.values().detach()
    closed = _fit_budget(order, weights, float(weights.sort().values[: cfg.num_remove].sum()))
    opened = [i for i in order if i not in closed]
    result.gates = [round(x, 5) for x in final.tolist()]
    result.closed = closed
    result.separated = all(final[c] < 0.5 for c in closed) and all(final[o] >= 0.5 for o in opened)
    return result
